"""Several processes on one pass: sharding, the launch environment, and real 2-process gloo runs vs one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fact_model import distributed
from fact_model.analysis.concept_stats import _merge_top, load_concept_stats
from fact_model.artifacts import save
from fact_model.config import ConceptLayerSpec, FaCTConfig, Preprocessing
from fact_model.data.synthetic import CLASS_NAMES
from fact_model.distributed import SINGLE_PROCESS, DistributedContext, shard
from fact_model.model import FaCTModel
from fact_model.options import TorchrunEnvironment, torchrun_environment
from tests._support import torchrun

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- sharding
@pytest.mark.parametrize(
    ("n", "world_size", "block"),
    [(0, 2, 1), (1, 2, 1), (7, 2, 1), (10, 3, 1), (23, 2, 4), (24, 2, 4), (23, 4, 5), (3, 8, 1), (9, 8, 4), (5, 1, 2)],
)
def test_shards_are_disjoint_cover_keep_order_and_whole_blocks(n, world_size, block):
    parts = [shard(n, rank, world_size, block) for rank in range(world_size)]
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n)) and len(flat) == n  # disjoint and covering
    assert all(part == sorted(part) for part in parts)  # each rank reads in the original order
    blocks = [list(range(i, min(i + block, n))) for i in range(0, n, block)]  # the single-process batches
    for rank, part in enumerate(parts):
        chunks = [part[i : i + block] for i in range(0, len(part), block)]  # what the rank's loader batches
        assert chunks == blocks[rank::world_size]  # block b to rank b mod W, each a whole single-process batch
    sizes = [len(p) for p in parts]
    assert max(sizes, default=0) - min(sizes, default=0) <= block  # within one block of each other
    assert parts == [shard(n, rank, world_size, block) for rank in range(world_size)]  # deterministic


def test_more_ranks_than_items_leaves_some_ranks_empty():
    assert [shard(3, rank, 5) for rank in range(5)] == [[0], [1], [2], [], []]


def test_shard_takes_counts_sequences_tensors_and_sized_collections():
    assert shard(["a", "b", "c", "d", "e"], 1, 2) == ["b", "d"]
    assert shard(torch.tensor([10, 11, 12, 13]), 0, 2, block=2) == [10, 11]
    assert shard(range(5, 10), 1, 2) == [6, 8]

    class Dataset:  # sized, not a sequence: its positions are sharded
        def __len__(self) -> int:
            return 5

    assert shard(Dataset(), 0, 2) == [0, 2, 4]
    assert DistributedContext(rank=1, world_size=3).shard(7, block=2) == [2, 3]


@pytest.mark.parametrize(("rank", "world_size", "block"), [(2, 2, 1), (-1, 2, 1), (0, 0, 1), (0, 2, 0)])
def test_shard_refuses_bad_arguments_quoting_them(rank, world_size, block):
    with pytest.raises(ValueError, match=r", got (rank )?-?[0-9]"):
        shard(5, rank, world_size, block)


def test_single_process_collectives_are_the_identity():
    t = torch.arange(4.0)
    assert SINGLE_PROCESS.all_reduce_sum(t) is t and SINGLE_PROCESS.all_reduce_max(t) is t
    assert SINGLE_PROCESS.all_gather_object({"a": 1}) == [{"a": 1}]
    SINGLE_PROCESS.barrier()
    assert SINGLE_PROCESS.is_main and not SINGLE_PROCESS.is_distributed and SINGLE_PROCESS.device.type == "cpu"
    assert distributed.context() == SINGLE_PROCESS  # no process group in this process
    with distributed.session(None) as ctx:
        assert ctx is SINGLE_PROCESS
    one = TorchrunEnvironment(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=1)
    with distributed.session(one) as ctx:  # torchrun --nproc-per-node 1: no group needed
        assert ctx is SINGLE_PROCESS


# ----------------------------------------------------------------------------- the launch environment
def test_torchrun_environment_is_read_from_torchruns_variables():
    assert torchrun_environment({}) is None
    assert torchrun_environment({"FACT_KERNELS": "torch"}) is None
    environ = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29400"}
    assert torchrun_environment(environ) == TorchrunEnvironment(3, 4, 1, "10.0.0.2", 29400)
    assert torchrun_environment({"RANK": "1", "WORLD_SIZE": "2"}) == TorchrunEnvironment(1, 2, 1, "127.0.0.1", 29500)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RANK": "0"}, "WORLD_SIZE is missing"),
        ({"WORLD_SIZE": "2"}, "RANK is missing"),
        ({"RANK": "two", "WORLD_SIZE": "2"}, "RANK must be an integer, got 'two'"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK must lie in \[0, WORLD_SIZE = 2\), got 2"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE must be ≥ 1, got 0"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "x"}, "MASTER_PORT must be an integer, got 'x'"),
    ],
)
def test_a_bad_launch_environment_names_the_variable(environ, message):
    with pytest.raises(ValueError, match=message):
        torchrun_environment(environ)


# ----------------------------------------------------------------------------- the top-image merge
def test_top_merge_is_a_total_order_whatever_the_grouping():
    """Ties (the many zero activations) go to the smaller image index, so any split of the candidates into
    batches or ranks keeps the same top images: the single-process lists and the merged per-rank lists agree."""
    generator = torch.Generator().manual_seed(0)
    k, n, t, extra = 5, 40, 6, 3
    values = torch.randint(0, 4, (k, n), generator=generator).float()  # many ties
    values[0] = 0  # a dead concept: all ties
    indices = torch.arange(n)[None].expand(k, -1)
    contributions = torch.randn(k, n, extra, generator=generator)
    reference = torch.stack(  # the rule, written out: largest value first, then the smaller index
        [torch.tensor(sorted(range(n), key=lambda i, r=row: (-float(values[r, i]), i))[:t]) for row in range(k)]
    )

    def merged(groups: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        best = torch.empty(k, 0), torch.empty(k, 0, dtype=torch.long), torch.empty(k, 0, extra)
        for g in groups:
            best = _merge_top(*best, values[:, g], indices[:, g], contributions[:, g], t)
        return best

    for groups in (
        [torch.arange(n)],
        list(torch.arange(n).split(7)),
        list(torch.randperm(n, generator=generator).split(9)),  # ranks' candidates in any order
    ):
        top_values, top_indices, top_extra = merged(groups)
        assert torch.equal(top_indices, reference)
        assert torch.equal(top_values, values.gather(1, reference))
        assert torch.equal(top_extra, contributions[torch.arange(k)[:, None], reference])


# ----------------------------------------------------------------------------- real runs: 2 gloo processes vs 1
def _tiny_artifact(directory: Path) -> Path:
    """A random, narrow FaCT model for the embedded dataset's classes at 32² (two concept layers)."""
    torch.manual_seed(0)
    config = FaCTConfig(
        backbone="bcos_resnet8",
        backbone_kwargs={"width": 4},
        class_names=CLASS_NAMES,
        preprocessing=Preprocessing(32),
        concept_layers=(ConceptLayerSpec("layer2", 12, 3), ConceptLayerSpec("layer3", 16, 4)),
    )
    return save(FaCTModel(config).eval(), directory)


def _run(command: list[str], processes: int, timeout: float = 240) -> float:
    """``fact COMMAND`` in 1 process, or in ``processes`` torchrun workers on loopback; returns the seconds it took."""
    return torchrun.run("fact_model.cli", ["-q", *command], processes, timeout)


DATA = ["--image-size", "32", "--test-size", "23"]  # 23 images in batches of 4: 6 batches, the last one short


@pytest.mark.slow  # two torchrun launches of 2 gloo processes and two single runs (~1 min on 2 cores)
def test_evaluate_and_stats_on_two_processes_equal_one_process(tmp_path):
    artifact = _tiny_artifact(tmp_path / "model")
    seconds = {}
    for processes in (1, 2):
        out = tmp_path / f"eval{processes}"
        seconds[f"evaluate {processes}"] = _run(
            ["evaluate", "--model", str(artifact), *DATA, "--batch-size", "4", "--out", str(out)], processes
        )
        seconds[f"stats {processes}"] = _run(
            ["stats", "--model", str(artifact), *DATA, "--batch-size", "4", "--top", "5"], processes
        )
        (artifact / "concept_stats.safetensors").rename(tmp_path / f"stats{processes}.safetensors")
        (artifact / "concept_stats.json").rename(tmp_path / f"stats{processes}.json")
    print("seconds:", seconds)

    one, two = (json.loads((tmp_path / f"eval{p}" / "evaluation.json").read_text()) for p in (1, 2))
    assert one["images"] == two["images"] == 23
    float_sums = {"reconstruction_nmse"}  # float64 sums added in another order
    for key in ("images", "num_classes", "backbone_accuracy", "fact_accuracy", "data"):
        assert one[key] == two[key], key
    for layer_one, layer_two in zip(one["layers"], two["layers"], strict=True):
        for key, value in layer_one.items():
            if key in float_sums:
                assert layer_two[key] == pytest.approx(value, rel=1e-12), key
            else:
                assert layer_two[key] == value, key  # counts, means of counts, maxima, thresholds: exact
    assert (tmp_path / "eval1" / "evaluation.md").read_text() == (tmp_path / "eval2" / "evaluation.md").read_text()

    stats = []
    for p in (1, 2):
        for name in ("safetensors", "json"):
            (tmp_path / f"stats{p}.{name}").rename(artifact / f"concept_stats.{name}")
        stats.append(load_concept_stats(artifact))
    (tensors_one, meta_one), (tensors_two, meta_two) = stats
    assert {k: v for k, v in meta_one.items() if k != "sha256"} == {k: v for k, v in meta_two.items() if k != "sha256"}
    assert set(tensors_one) == set(tensors_two)
    for key, value in tensors_one.items():
        if key.endswith("class_mean_contributions"):  # float64 sums over the ranks, stored as float32
            torch.testing.assert_close(tensors_two[key], value, rtol=1e-6, atol=1e-7)
        else:  # the top images (ties to the smaller index), their activations and contributions, frequencies
            assert torch.equal(tensors_two[key], value), key


@pytest.mark.slow  # the C² pipeline on 2 gloo processes and on one (~1 min on 2 cores)
def test_quality_on_two_processes_equals_one_process(tmp_path):
    artifact = _tiny_artifact(tmp_path / "model")
    for processes in (1, 2):
        _run(["quality", "--model", str(artifact), *DATA, "--out", str(tmp_path / f"q{processes}")], processes)
    for name in ("quality.json", "quality.md"):
        assert (tmp_path / "q1" / name).read_text() == (tmp_path / "q2" / name).read_text()  # the same floats
    reports = json.loads((tmp_path / "q1" / "quality.json").read_text())
    assert [(r["layer"], r["source"]) for r in reports] == [
        ("layer2", "fact"), ("layer2", "channels"), ("layer3", "fact"), ("layer3", "channels"),
    ]  # fmt: skip
    assert any(r["per_unit"] for r in reports)  # some units were scored (and split over the ranks)
