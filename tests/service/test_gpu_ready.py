"""The CUDA-specific parts of serving, checked without a GPU.

* One device→host copy per response: after the model call, every value a response reads comes
  from :meth:`service.compute.Compute.to_host`'s copy (a tracker follows every tensor derived
  from the model's outputs and fails on any read of one), and ``to_host`` runs once per response.
* :func:`fact_model.host_transfer.to_host` is exact for every dtype and layout.
* ``FACT_DTYPE``: the switches each value sets, bfloat16 serving with its residual still reported.
* The CUDA stream belongs to the model thread; uploads are pinned and non-blocking.
* Warm-up meets every batch-size bucket the kernel dispatchers key on.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from fact_model import host_transfer, serialize
from fact_model.artifacts import resolve_artifact_path
from fact_model.data.synthetic import SyntheticConfig, render_sample
from kernels.path_table import batch_bucket, covering_batch_sizes
from service import compute as compute_module
from service.compute import Compute, precision_flags
from service.engine import Engine
from service.queries import ConceptQuery, RegionQuery
from service.settings import DTYPES, Settings


def settings(**overrides: object) -> Settings:
    fixed = {"device": "cpu", "runtime": "pytorch", "max_pixels": None, "max_top_k": 20, "torch_threads": None}
    return dataclasses.replace(Settings.from_env(), **{**fixed, **overrides})


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(resolve_artifact_path("default"), settings(), "fact-default", "test")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.fromarray(render_sample(SyntheticConfig(), "test", i)[0]) for i in range(3)]


# ----------------------------------------------------------------------------- to_host


def test_to_host_is_exact_for_every_dtype_and_layout_and_keeps_the_structure():
    @dataclasses.dataclass(frozen=True)
    class Bundle:
        values: torch.Tensor
        named: dict
        items: list
        label: str

    Pair = collections.namedtuple("Pair", "a b")
    base = torch.randn(6, 8)
    tensors = {
        "float32": base,
        "bfloat16": base.to(torch.bfloat16),
        "float64": base.double(),
        "int64": torch.arange(-5, 7),
        "bool": base > 0,
        "uint8": torch.randint(0, 256, (3, 5), dtype=torch.uint8),
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "odd_stride_row": base[2:3, 4:5],  # size-1 dims with strides other than 1
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.5),
    }
    tree = Bundle(tensors["float32"], tensors, [tensors["int64"], None, 7, Pair(tensors["bool"], "x")], "kept")
    host = host_transfer.to_host(tree)
    assert isinstance(host, Bundle) and host.label == "kept" and host.items[1] is None and host.items[2] == 7
    assert isinstance(host.items[3], Pair) and host.items[3].b == "x"
    for name, original in tensors.items():
        copied = host.named[name]
        assert copied.dtype == original.dtype and copied.shape == original.shape, name
        assert torch.equal(copied, original), name
    assert torch.equal(host.items[3].a, tensors["bool"])
    # One buffer: every copy is a view of the same storage, and none aliases its input.
    storages = {t.untyped_storage().data_ptr() for t in host_transfer.tree_tensors(host)}
    assert len(storages) == 1
    before = host.named["float32"].clone()
    base.add_(1)
    assert torch.equal(host.named["float32"], before)


def test_to_host_leaves_a_tree_without_tensors_alone():
    tree = {"a": [1, 2.5, "x"], "b": None}
    assert host_transfer.to_host(tree) is tree


def test_one_image_of_an_explanation_serialises_like_the_batch(engine, images):
    batch = engine.model.preprocess(images)
    expl = engine.model.explain(batch, top_k=4)
    for n in range(len(images)):
        one = host_transfer.to_host(expl.image(n, maps=False))
        assert one.maps is None and one.logits.shape[0] == 1
        assert serialize.explanation_record(one, 0, engine.model.class_names) == serialize.explanation_record(
            expl, n, engine.model.class_names
        )


# ----------------------------------------------------------------------------- one copy per response


class DeviceReads(TorchDispatchMode):
    """Follows every tensor derived from "device" tensors and records each value read from one.

    On a GPU such a read (``float()``, ``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``) is
    a device→host copy and a wait; on this CPU it is recorded instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self.device = WeakTensorKeyDictionary()
        self.reads: list[str] = []
        self.paused = False

    def mark(self, tree: object) -> None:
        for t in host_transfer.tree_tensors(tree):
            self.device[t] = True

    def is_device(self, t: torch.Tensor) -> bool:
        return t in self.device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        inputs = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
        if any(self.is_device(t) for t in inputs):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.reads.append(str(func))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.device[t] = True
        return out


@contextlib.contextmanager
def tracked(engine: Engine, monkeypatch, model_call: str):
    """Mark ``engine.model.<model_call>``'s outputs (and its inputs) as device tensors; count ``to_host``."""
    mode = DeviceReads()
    copies: list[int] = []
    original_call = getattr(engine.model, model_call) if model_call != "predict_tensors" else engine.predict_tensors
    original_to_host = engine.compute.to_host

    def call(*args, **kwargs):
        result = original_call(*args, **kwargs)
        mode.mark((args, kwargs, result))
        return result

    def to_host(tree):
        mode.paused = True  # the one sanctioned copy
        try:
            copies.append(len(host_transfer.tree_tensors(tree)))
            return original_to_host(tree)
        finally:
            mode.paused = False

    for method in ("tolist", "numpy", "cpu"):
        original = getattr(torch.Tensor, method)

        def checked(self, *args, _original=original, _name=method, **kwargs):
            if not mode.paused and mode.is_device(self):
                mode.reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, checked)
    if model_call == "predict_tensors":
        monkeypatch.setattr(engine, "predict_tensors", call)
    else:
        monkeypatch.setattr(engine.model, model_call, call)
    monkeypatch.setattr(engine.compute, "to_host", to_host)
    with mode:
        yield mode, copies


@pytest.mark.parametrize(
    ("heatmaps", "kind"), [("png", "bcos"), ("webp", "signed"), ("png8", "spatial"), ("float32", "bcos")]
)
def test_explain_reads_every_value_from_one_copy_per_response(engine, images, monkeypatch, heatmaps, kind):
    region = RegionQuery(box=(0, 0, 24, 24))
    where = ConceptQuery(None, 3)
    with tracked(engine, monkeypatch, "explain") as (mode, copies):
        results = engine.explain_many(
            images, [None] * 3, [None] * 3, 5, None, heatmaps, kind, region=region, where=where
        )
    assert len(results) == 3 and all(r["concepts"][0]["heatmap"] is not None for r in results)
    assert len(copies) == 3, "one device→host copy per response"
    assert mode.reads == [], f"values read from device tensors outside the one copy: {mode.reads[:10]}"


def test_the_tracker_catches_a_read_of_the_device_explanation(engine, images, monkeypatch):
    """The harness above can fail: reading the model's own output after the call is seen."""
    with tracked(engine, monkeypatch, "explain") as (mode, _):
        expl = engine.model.explain(engine.model.preprocess(images[:1]), top_k=2)
        float(expl.contributions[expl.layer_names[-1]][0, 0])
        expl.logits.tolist()
    assert mode.reads == ["aten._local_scalar_dense.default", "tolist"]


def test_intervene_reads_every_value_from_one_copy(engine, images, monkeypatch):
    with tracked(engine, monkeypatch, "intervene") as (mode, copies):
        result = engine.intervene(images[0], remove_top=2, top_k=3, heatmaps="png")
    assert result["after"]["concepts"] and len(copies) == 1
    assert mode.reads == [], mode.reads[:10]


def test_predict_reads_a_merged_batch_back_in_one_copy(engine, images, monkeypatch):
    with tracked(engine, monkeypatch, "predict_tensors") as (mode, copies):
        results = engine.predict(images * 2, top_k=3)
    assert len(results) == 6 and copies == [5]  # logits, probabilities, ranking, ids, contributions
    assert mode.reads == [], mode.reads[:10]


# ----------------------------------------------------------------------------- precision


def test_precision_flags_turn_tf32_on_only_for_tf32():
    assert precision_flags("tf32") == {
        "cuda_matmul_allow_tf32": True,
        "cudnn_allow_tf32": True,
        "float32_matmul_precision": "high",
    }
    for dtype in ("float32", "bfloat16"):
        flags = precision_flags(dtype)
        assert not flags["cuda_matmul_allow_tf32"] and not flags["cudnn_allow_tf32"]
        assert flags["float32_matmul_precision"] == "highest"
    with pytest.raises(ValueError, match="FACT_DTYPE must be one of float32, tf32, bfloat16, got 'fp8'"):
        precision_flags("fp8")


def test_fact_dtype_is_read_and_checked(monkeypatch):
    for value in DTYPES:
        monkeypatch.setenv("FACT_DTYPE", value)
        assert Settings.from_env().dtype == value
    monkeypatch.setenv("FACT_DTYPE", "")
    assert Settings.from_env().dtype == "float32"
    monkeypatch.setenv("FACT_DTYPE", "half")
    with pytest.raises(ValueError, match="FACT_DTYPE must be one of float32, tf32, bfloat16, got 'half'"):
        Settings.from_env()


def test_bfloat16_serving_reports_its_float32_residual(engine, images):
    bf16 = Engine(resolve_artifact_path("default"), settings(dtype="bfloat16"), "fact-default", "bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert bf16.model_summary()["dtype"] == "bfloat16" and engine.model_summary()["dtype"] == "float32"
    exact = engine.explain_many(images, [None] * 3, [None] * 3, 5, None, "png", "bcos")
    rounded = bf16.explain_many(images, [None] * 3, [None] * 3, 5, None, "png", "bcos")
    batch = bf16.compute.to_device(bf16.model.preprocess(images))
    expl = bf16.model.explain(batch, top_k=5)
    layer = expl.layer_names[-1]
    for n, (e, r) in enumerate(zip(exact, rounded, strict=True)):
        assert e["completeness"]["relative_residual"] <= 1e-5
        # The bfloat16 residual, recomputed here in float64 from the bfloat16 contributions.
        independent = abs(expl.contributions[layer][n].double().sum() - expl.explained[n].double())
        assert r["completeness"]["residual"] == pytest.approx(float(independent), rel=1e-3, abs=1e-6)
        assert r["completeness"]["relative_residual"] <= 5e-2
        assert r["prediction"]["index"] == e["prediction"]["index"]
        assert r["concepts"][0]["heatmap"]["png_base64"]
    assert max(r["completeness"]["residual"] for r in rounded) > 0  # bfloat16 rounding is visible
    # Every other model call takes bfloat16 too: predictions, interventions, concept cards.
    assert bf16.predict(images[:1])[0]["prediction"]["index"] == exact[0]["prediction"]["index"]
    change = bf16.intervene(images[0], remove_top=1, heatmaps="png")["change"]
    assert change["measured"] < 0 and abs(change["gap"] - (change["measured"] - change["predicted"])) < 1e-6
    card = bf16.concept_card(bf16.layer_names[-1], 0)
    assert card["examples"] and all("heatmap_png_base64" in e for e in card["examples"])


def test_compute_casts_uploads_to_the_model_dtype_on_its_device():
    batch = torch.rand(2, 3, 8, 8)
    up = Compute("cpu", "bfloat16").to_device(batch)
    assert up.dtype == torch.bfloat16 and up.device.type == "cpu"
    assert torch.equal(up, batch.to(torch.bfloat16))
    assert Compute("cpu", "float32").to_device(batch).dtype == torch.float32


def test_cuda_uploads_are_pinned_and_non_blocking(monkeypatch):
    compute = Compute("cpu", "bfloat16")
    compute.device = torch.device("cuda")  # what Compute("cuda") holds; the copies are recorded, not made
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        calls.append(("to", args, kwargs))
        args = tuple("cpu" if isinstance(a, torch.device) and a.type == "cuda" else a for a in args)
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    out = compute.to_device(torch.rand(1, 3, 4, 4))
    assert calls[0] == "pin"
    assert calls[1] == ("to", (torch.device("cuda"),), {"non_blocking": True})  # upload first, then cast
    assert calls[2] == ("to", (torch.bfloat16,), {})
    assert out.dtype == torch.bfloat16


def test_the_cuda_stream_is_used_on_its_own_thread_only(monkeypatch):
    compute = Compute("cpu")
    compute.stream = object()  # as on CUDA: model work then runs on this stream
    entered = []

    @contextlib.contextmanager
    def stream(s):
        entered.append(s)
        yield

    monkeypatch.setattr(compute_module.torch.cuda, "stream", stream)
    with compute.session():
        pass
    assert entered == [compute.stream]
    host = compute.to_host({"a": torch.ones(2)})  # the copy queues behind the model's work, on its stream
    assert entered == [compute.stream] * 2 and torch.equal(host["a"], torch.ones(2))
    entered.clear()
    errors = []

    def elsewhere():
        try:
            with compute.session():
                pass
        except RuntimeError as err:
            errors.append(str(err))

    thread = threading.Thread(target=elsewhere, name="not-the-model-thread")
    thread.start()
    thread.join()
    assert len(errors) == 1 and "not-the-model-thread" in errors[0] and entered == []


def test_on_the_cpu_no_stream_and_any_thread():
    compute = Compute("cpu", "tf32")
    assert compute.stream is None and not compute.uses_cuda
    done = []
    thread = threading.Thread(target=lambda: done.append(compute.session().__enter__() is None))
    thread.start()
    thread.join()
    assert done == [True]


# ----------------------------------------------------------------------------- warm-up buckets


@pytest.mark.parametrize("rows_per_image", [1, 3, 49, 196, 100, 7])
def test_covering_batch_sizes_meet_every_bucket(rows_per_image):
    for largest in range(1, 70):
        sizes = covering_batch_sizes(largest)
        assert max(sizes) == largest and len(set(sizes)) == len(sizes)
        needed = {batch_bucket(rows_per_image * n) for n in range(1, largest + 1)}
        met = {batch_bucket(rows_per_image * n) for n in sizes}
        assert needed == met, (rows_per_image, largest)


def test_batch_bucket_is_the_next_power_of_two():
    assert [batch_bucket(n) for n in range(0, 10)] == [1, 1, 2, 4, 4, 8, 8, 8, 8, 16]
    with pytest.raises(ValueError):
        covering_batch_sizes(0)


def test_warmup_on_every_bucket_runs_each_covering_batch_size(monkeypatch):
    engine = Engine(
        resolve_artifact_path("default"),
        settings(predict_max_batch=5, max_batch_items=3, max_top_k=6),
        "fact-default",
        "warm",
    )
    seen = collections.Counter()
    original = engine.model.forward_encoded
    original_explain = engine.model.explain

    def forward_encoded(x6, *args, **kwargs):
        seen[(kwargs.get("code_leaves", False), x6.shape[0])] += 1
        return original(x6, *args, **kwargs)

    def explain(images, *args, **kwargs):
        seen[("top_k", images.shape[0], kwargs["top_k"])] += 1
        return original_explain(images, *args, **kwargs)

    monkeypatch.setattr(engine.model, "forward_encoded", forward_encoded)
    monkeypatch.setattr(engine.model, "explain", explain)
    assert engine.warmup_batch_sizes() == {"predict": (1, 2, 4, 5), "explain": (1, 2, 3), "top_k": (1, 2, 4, 6)}
    engine.warmup(every_bucket=True)
    predicted = {key[1] for key in seen if key[0] is False}
    explained = {key[1] for key in seen if key[0] is True}
    ranks_of_one = {key[2] for key in seen if key[0] == "top_k" and key[1] == 1}
    assert {1, 2, 4, 5} <= predicted and {1, 2, 3} <= explained and {1, 2, 4, 6} <= ranks_of_one
    seen.clear()
    engine.warmup()  # on the CPU: nothing to tune, one call of each kind
    assert {key[1] for key in seen} == {1}
