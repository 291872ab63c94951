"""Concept-layer Triton kernels (fused encode, sparse decode, their backward) against PyTorch.

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1``), so shapes stay tiny. References are computed in float64 from
the same inputs; inputs are continuous random values, so exact ties in the top-k do
not occur except where a test builds them (ReLU zeros).
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from fact_model.bcos.encoding import encode_rgb
from fact_model.explain import explain
from fact_model.options import Options
from kernels._common import KernelInputError, interpreting
from tests.conftest import make_model

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreting()), reason="needs CUDA or TRITON_INTERPRET=1"
)

from kernels.concept_decode import (  # noqa: E402
    gather_dot,
    gather_sum,
    scatter_rows,
)
from kernels.concept_encode import (  # noqa: E402
    MAX_K,
    encode_candidates,
    encode_path,
    encode_topk,
    encode_topk_reference,
    fastest_encode_path,
    merge_candidates,
)
from kernels.concept_select import (  # noqa: E402
    encode_topk_gemm_select,
    gemm_select_candidates,
    gemm_select_plan,
    select_candidates,
    select_candidates_reference,
    select_config,
)
from kernels.path_table import PathTable  # noqa: E402  (after the skip: importing kernels imports triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5
FP16_TOL = 2e-3  # fp32 accumulation, one fp16 rounding of the output (2^-11 ≈ 5e-4) plus the inputs'


def rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference).norm() / reference.norm().clamp_min(1e-30))


def dense_topk(x: torch.Tensor, encoder: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent float64 reference: dense pre-activations, ReLU, sorted top-k."""
    return torch.topk(F.relu(x.double() @ encoder.double().t()), k, dim=1)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


# ---------------------------------------------------------------------------- encode
@pytest.mark.parametrize(
    ("m", "c", "num_concepts", "k", "blocks"),
    [
        (37, 19, 50, 5, {}),  # one tile, C not a multiple of the block
        (37, 32, 200, 7, {"block_n": 16, "splits": 3}),  # many tiles per split, several splits
        (40, 64, 300, 4, {"block_m": 16, "block_n": 32}),  # several row blocks, the last one partial
        (9, 16, 33, 1, {"block_n": 16}),  # k = 1, last tile partial
        (6, 32, 64, 16, {"block_n": 16, "splits": 2}),  # k = 16: two tiles of 16 per split
    ],
)
def test_encode_matches_dense_topk_fp32(m, c, num_concepts, k, blocks):
    x, encoder = randn(m, c, seed=1), randn(num_concepts, c, seed=2)
    values, indices = encode_topk(x, encoder, k, **blocks)
    ref_values, ref_indices = dense_topk(x, encoder, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == indices.shape == (m, k)
    assert (ref_values[:, -1] > 0).all()  # every slot positive: the indices are unambiguous
    assert rel_err(values, ref_values) <= FP32_TOL
    assert torch.equal(indices.cpu(), ref_indices.cpu())


def test_encode_fp16():
    x, encoder = randn(24, 48, seed=3, dtype=torch.float16), randn(100, 48, seed=4, dtype=torch.float16)
    values, indices = encode_topk(x, encoder, 6, block_n=32)
    ref_values, ref_indices = dense_topk(x, encoder, 6)
    assert values.dtype == torch.float16
    assert rel_err(values, ref_values) <= FP16_TOL
    assert torch.equal(indices.cpu(), ref_indices.cpu())


def test_encode_rows_with_fewer_positive_pre_activations_than_k():
    """Only the positive slots are determined; the rest are zeros of other, distinct concepts."""
    m, c, num_concepts, k = 20, 16, 48, 12
    x = randn(m, c, seed=5).abs()
    encoder = -randn(num_concepts, c, seed=6).abs()  # all pre-activations negative ...
    encoder[::7] = encoder[::7].abs()  # ... except for 7 concepts (always positive)
    for mixed in (10, 17, 30):  # and 3 concepts with mixed signs: 7 to 10 positives per row
        encoder[mixed] = encoder[mixed].abs() * torch.linspace(-1, 1, c, device=DEVICE)
    values, indices = encode_topk(x, encoder, k, block_n=16, splits=2)
    pre = F.relu(x.double() @ encoder.double().t())
    positives = (pre > 0).sum(dim=1)
    assert (positives < k).all() and (positives > 0).all() and positives.unique().numel() > 1
    for row in range(m):
        count = int(positives[row])
        expected = pre[row].topk(count)
        assert rel_err(values[row, :count], expected.values) <= FP32_TOL
        assert torch.equal(indices[row, :count].cpu(), expected.indices.cpu())
        assert (values[row, count:] == 0).all()
    assert all(row.unique().numel() == k for row in indices)  # distinct concepts per row
    assert ((indices >= 0) & (indices < num_concepts)).all()


def test_encode_candidates_fully_written():
    m, k = 19, 3
    x, encoder = randn(m, 16, seed=7), randn(64, 16, seed=8)
    poison = torch.iinfo(torch.int64).min
    shape = (m, 4, k)  # 64 concepts in tiles of 16: 4 splits
    out = torch.full(shape, poison, dtype=torch.int64, device=DEVICE)
    keys = encode_candidates(x, encoder, k, out=out, block_n=16, splits=4)
    assert keys is out and not (out == poison).any()
    # each split's candidates are that split's own top-k
    pre = F.relu(x.double() @ encoder.double().t())
    for split in range(4):
        ids = out[:, split] & 0xFFFFFFFF
        values = (out[:, split] >> 32).to(torch.int32).view(torch.float32)
        assert ((ids >= 16 * split) & (ids < 16 * (split + 1))).all()
        torch.testing.assert_close(values.double(), pre.gather(1, ids), rtol=FP32_TOL, atol=1e-6)  # key = its value
        expected = pre[:, 16 * split : 16 * (split + 1)].topk(k).values  # ... and they are the split's top k
        torch.testing.assert_close(
            values.double().sort(dim=1, descending=True).values, expected, rtol=FP32_TOL, atol=1e-6
        )


def test_encode_backward_matches_autograd_of_reference():
    """k = K keeps ReLU-inactive slots too: their gradient must be zero."""
    for k, num_concepts in ((5, 40), (12, 12)):
        x = randn(21, 24, seed=9).requires_grad_(True)
        encoder = randn(num_concepts, 24, seed=10).requires_grad_(True)
        values, indices = torch.ops.fact.concept_encode(x, encoder, k)
        seed = randn(21, k, seed=11)
        grad_x, grad_e = torch.autograd.grad((values * seed).sum(), [x, encoder])
        x64 = x.detach().double().requires_grad_(True)
        e64 = encoder.detach().double().requires_grad_(True)
        ref_values, ref_indices = torch.topk(F.relu(x64 @ e64.t()), k, dim=1)
        if k == num_concepts:
            assert (ref_values == 0).any()
            # zeros tie: align our slots with the reference's by concept id before comparing
            order = torch.argsort(indices, dim=1)
            ref_order = torch.argsort(ref_indices, dim=1)
            seed64 = torch.zeros_like(ref_values)
            seed64.scatter_(1, ref_order, seed.double().gather(1, order))
        else:
            assert torch.equal(indices, ref_indices)
            seed64 = seed.double()
        ref_grad_x, ref_grad_e = torch.autograd.grad((ref_values * seed64).sum(), [x64, e64])
        assert rel_err(grad_x, ref_grad_x) <= FP32_TOL
        assert rel_err(grad_e, ref_grad_e) <= FP32_TOL


# ---------------------------------------------------------------------------- select and the gemm_select path
@pytest.mark.parametrize(
    ("dtype", "m", "n", "k", "blocks"),
    [
        (torch.float32, 37, 150, 5, {"block_m": 8, "block_n": 16, "span": 48}),  # 4 lanes, the last 6 wide; k = 5
        (torch.float16, 21, 100, 7, {"block_m": 4, "block_n": 32, "span": 100}),  # one lane, last tile partial
        (torch.float32, 5, 64, 16, {"block_m": 8, "block_n": 16, "span": 64}),  # k = 16, rows < BLOCK_M
    ],
)
def test_select_matches_topk_of_relu(dtype, m, n, k, blocks):
    scores = randn(m, n, seed=30, dtype=dtype)
    keys = select_candidates(scores, k, concept_offset=1000, **blocks)
    assert keys.shape == (m, select_config(m, n, scores.device, **blocks).lanes, k)
    assert torch.equal(
        keys.sort(dim=2, descending=True).values, select_candidates_reference(scores, k, blocks["span"], 1000)
    )
    values, indices = merge_candidates(keys, k, dtype)
    ref_values, ref_indices = torch.topk(F.relu(scores.float()), k, dim=1)
    assert (ref_values[:, -1] > 0).all()  # every slot positive: no ties
    assert values.dtype == dtype and torch.equal(values.float(), ref_values)  # exact: the keys carry the values
    assert torch.equal(indices, ref_indices + 1000)


def test_select_rows_with_fewer_positive_values_than_k_and_narrow_lanes():
    """Positives are exact; the other slots are zeros of distinct concepts; a 4-wide lane keeps fill keys."""
    m, n, k = 12, 20, 6
    scores = -randn(m, n, seed=31).abs()
    scores[torch.arange(m), torch.arange(m)] = torch.arange(m, dtype=torch.float32, device=DEVICE) + 1  # one positive
    scores[:, 17] = torch.where(torch.arange(m, device=DEVICE) % 2 == 0, 0.5, -0.0)  # a second one in even rows
    scores[0, 3] = float("nan")  # counts as 0
    keys = select_candidates(scores, k, block_m=4, block_n=8, span=16)  # lanes of 16 and 4 columns
    reference = select_candidates_reference(scores, k, 16)
    mine = keys.sort(dim=2, descending=True).values
    positive = reference >= (1 << 32)  # keys of values > 0: unique; zeros tie
    assert torch.equal(mine[positive], reference[positive]) and torch.equal(mine < 0, reference < 0)
    assert (mine[:, 1] < 0).sum(dim=1).eq(k - 4).all()  # the 4-wide lane: 4 real keys, k - 4 fill keys
    values, indices = merge_candidates(keys, k, scores.dtype)
    ref_values = torch.topk(F.relu(scores.nan_to_num(0.0)), k, dim=1).values
    assert torch.equal(values, ref_values)
    positives = (ref_values > 0).sum(dim=1)
    for row in range(m):
        assert torch.equal(
            indices[row, : positives[row]], torch.topk(scores[row].nan_to_num(0.0), int(positives[row])).indices
        )
    assert all(row.unique().numel() == k for row in indices) and ((indices >= 0) & (indices < n)).all()


def test_select_carry_continues_from_the_previous_chunks():
    """Chunk 2 starts from chunk 1's keys: the slots hold the top-k of both (rows with few positives included)."""
    m, k = 10, 5
    scores = randn(m, 40, seed=43) - 1.5  # about 2 to 6 positives per row, over both chunks
    first, second = scores[:, :24].contiguous(), scores[:, 24:].contiguous()
    keys = select_candidates(first, k, block_m=4, block_n=8, span=16)  # lanes of 16 and 8 columns
    select_candidates(second, k, out=keys, concept_offset=24, carry=True, block_m=4, block_n=8, span=16)
    values, indices = merge_candidates(keys, k, scores.dtype)
    ref_values, ref_indices = torch.topk(F.relu(scores), k, dim=1)
    assert torch.equal(values, ref_values) and (ref_values[:, -1] == 0).any() and (ref_values[:, 0] > 0).all()
    determined = ref_values > 0
    assert torch.equal(indices[determined], ref_indices[determined])
    assert all(row.unique().numel() == k for row in indices)


@pytest.mark.parametrize(
    ("dtype", "m", "c", "num_concepts", "k", "chunk"),
    [
        (torch.float32, 40, 24, 300, 7, 64),  # 5 chunks, the last 44 wide
        (torch.float16, 19, 32, 50, 5, 16),  # the last chunk (2 concepts) narrower than k
        (torch.float32, 9, 16, 40, 3, None),  # one chunk (default size)
    ],
)
def test_gemm_select_equals_reference(dtype, m, c, num_concepts, k, chunk):
    x, encoder = randn(m, c, seed=32, dtype=dtype), randn(num_concepts, c, seed=33, dtype=dtype)
    lanes = gemm_select_plan(x, num_concepts, chunk)[1].lanes
    poison = torch.iinfo(torch.int64).min
    out = torch.full((m, lanes, k), poison, dtype=torch.int64, device=DEVICE)
    assert gemm_select_candidates(x, encoder, k, chunk=chunk, out=out) is out and not (out == poison).any()
    values, indices = encode_topk_gemm_select(x, encoder, k, chunk=chunk)
    ref_values, ref_indices = encode_topk_reference(x, encoder, k)
    assert (ref_values[:, -1] > 0).all()
    assert values.dtype == dtype and torch.equal(values, ref_values)  # same GEMM rounding, exact selection
    assert torch.equal(indices, ref_indices)


def test_operator_paths_agree_with_reference(use_options):
    """The ``concept_encode_path`` option forces the operator's path; forward and backward agree."""
    x, encoder = randn(30, 24, seed=34), randn(90, 24, seed=35)
    ref_values, ref_indices = encode_topk_reference(x, encoder, 6)
    grads = {}
    for path in ("fused", "gemm_select"):
        use_options(concept_encode_path=path)
        assert encode_path(x, encoder, 6) == path
        xg, eg = x.clone().requires_grad_(True), encoder.clone().requires_grad_(True)
        values, indices = torch.ops.fact.concept_encode(xg, eg, 6)
        assert torch.equal(indices, ref_indices) and rel_err(values.detach(), ref_values.double()) <= FP32_TOL
        grads[path] = torch.autograd.grad((values * randn(30, 6, seed=36)).sum(), [xg, eg])
    for fused, selected in zip(grads["fused"], grads["gemm_select"], strict=True):
        assert rel_err(selected, fused.double()) <= FP32_TOL
    use_options(concept_encode_path="auto")
    assert encode_path(x, encoder, 6) in ("fused", "gemm_select")
    if DEVICE == "cpu":
        assert encode_path(x, encoder, 6) == "fused"  # the interpreter keeps the fused kernel unless forced


def test_encode_path_env_value_is_checked():
    message = r"FACT_CONCEPT_ENCODE_PATH \(concept_encode_path\) must be one of \['auto', 'fused', 'gemm_select'\]"
    with pytest.raises(ValueError, match=message):
        Options.from_environ({"FACT_CONCEPT_ENCODE_PATH": "cublas"})
    with pytest.raises(ValueError, match=message):
        Options(concept_encode_path="cublas")


def test_dispatcher_times_each_shape_key_once_and_keeps_the_faster(monkeypatch):
    import kernels.concept_encode as concept_encode

    monkeypatch.setattr(concept_encode, "_run_path", lambda path, x, encoder, k: path)
    costs = {"fused": 2.0, "gemm_select": 1.0}
    calls = []

    def timer(run):
        calls.append(run())
        return costs[calls[-1]]

    table = PathTable(timer=timer)
    encoder = randn(64, 8, seed=39)
    assert fastest_encode_path(randn(40, 8, seed=40), encoder, 4, table) == "gemm_select" and len(calls) == 2
    costs["fused"] = 0.5
    assert fastest_encode_path(randn(50, 8, seed=41), encoder, 4, table) == "gemm_select"  # M bucket 64: known
    assert len(calls) == 2
    assert fastest_encode_path(randn(70, 8, seed=42), encoder, 4, table) == "fused"  # bucket 128: measured
    assert fastest_encode_path(randn(40, 8, seed=40), encoder, 5, table) == "fused" and len(calls) == 6  # new k
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high" if previous == "highest" else "highest")
        fastest_encode_path(randn(40, 8, seed=40), encoder, 4, table)  # the TF32 state is part of the key
    finally:
        torch.set_float32_matmul_precision(previous)
    assert len(calls) == 8 and len(table.choices) == 4


# ---------------------------------------------------------------------------- decode
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_matches_reference(dtype):
    m, k, num_concepts, c = 37, 5, 23, 150  # repeated ids within rows and across rows; two column blocks
    values = randn(m, k, seed=12, dtype=dtype)
    indices = torch.randint(0, num_concepts, (m, k), generator=torch.Generator().manual_seed(13)).to(DEVICE)
    decoder = randn(num_concepts, c, seed=14, dtype=dtype)
    out = torch.full((m, c), float("nan"), dtype=dtype, device=DEVICE)
    result = gather_sum(values, indices, decoder, out=out)
    expected = (values.double()[:, :, None] * decoder.double()[indices]).sum(dim=1)
    assert result is out and not out.isnan().any()
    assert rel_err(out, expected) <= (FP32_TOL if dtype == torch.float32 else FP16_TOL)


def test_decode_backward_matches_autograd_of_reference():
    m, k, num_concepts, c = 30, 4, 17, 40
    values = randn(m, k, seed=15).requires_grad_(True)
    indices = torch.randint(0, num_concepts, (m, k), generator=torch.Generator().manual_seed(16)).to(DEVICE)
    decoder = randn(num_concepts, c, seed=17).requires_grad_(True)
    seed = randn(m, c, seed=18)
    grad_v, grad_d = torch.autograd.grad(
        (torch.ops.fact.concept_decode(values, indices, decoder) * seed).sum(), [values, decoder]
    )
    v64 = values.detach().double().requires_grad_(True)
    d64 = decoder.detach().double().requires_grad_(True)
    dense = torch.zeros(m, num_concepts, dtype=torch.float64, device=DEVICE).scatter_add(1, indices, v64)
    ref_v, ref_d = torch.autograd.grad(((dense @ d64) * seed.double()).sum(), [v64, d64])
    assert rel_err(grad_v, ref_v) <= FP32_TOL
    assert rel_err(grad_d, ref_d) <= FP32_TOL
    # the building blocks alone, with a poisoned output for the gather
    out = torch.full((m, k), float("nan"), device=DEVICE)
    assert rel_err(gather_dot(seed, indices, decoder.detach(), out=out), ref_v) <= FP32_TOL
    assert rel_err(scatter_rows(values.detach(), indices, seed, num_concepts), ref_d) <= FP32_TOL


def test_operators_fall_back_to_pytorch_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, encoder = randn(8, 16, seed=19).cpu(), randn(30, 16, seed=20).cpu()
    values, indices = torch.ops.fact.concept_encode(x, encoder, 3)
    ref_values, ref_indices = dense_topk(x, encoder, 3)
    assert torch.equal(indices, ref_indices) and rel_err(values, ref_values) <= FP32_TOL
    with pytest.raises(KernelInputError, match="TRITON_INTERPRET"):  # the launcher itself refuses CPU tensors
        encode_topk(x, encoder, 3)


# ---------------------------------------------------------------------------- launcher errors
def _bad_calls():
    x, e = randn(8, 16, seed=0), randn(30, 16, seed=1)
    v = randn(8, 3, seed=2)
    i = torch.zeros(8, 3, dtype=torch.int64, device=DEVICE)
    g = randn(8, 16, seed=3)
    return [
        (lambda: encode_topk(x.to(torch.int32), e, 3), "x has dtype"),
        (lambda: encode_topk(x.double(), e.double(), 3), "x has dtype"),
        (lambda: encode_topk(x, e[:, :8].contiguous(), 3), "encoder has 8 input channels"),
        (lambda: encode_topk(x, e.half(), 3), "encoder has dtype"),
        (lambda: encode_topk(x.t().contiguous().t(), e, 3), "x must be contiguous"),
        (lambda: encode_topk(x, e, 31), r"k \(31\) exceeds"),
        (lambda: encode_topk(x, e, 0), "k must be a positive int"),
        (lambda: encode_topk(x.to("meta"), e, 3), "x is on meta"),
        (lambda: encode_topk(x[None], e, 3), "x must have 2 dimensions"),
        (lambda: encode_topk_gemm_select(x, e, 3, chunk=0), "chunk must be an int ≥ 1"),
        (lambda: encode_topk_gemm_select(x, e.half(), 3), "encoder has dtype"),
        (lambda: select_candidates(x.to(torch.int32), 3), "scores has dtype"),
        (lambda: select_candidates(x.t(), 3), "scores must be contiguous"),
        (lambda: select_candidates(x[0], 3), "scores must have 2 dimensions"),
        (lambda: select_candidates(x, 0), "k must be an int ≥ 1"),
        (lambda: select_candidates(x, MAX_K + 1), r"k \(257\) exceeds"),
        (lambda: select_candidates(x, 3, block_m=3), "block_m must be a power of two"),
        (lambda: select_candidates(x, 3, concept_offset=-1), "concept_offset must be an int ≥ 0"),
        (lambda: select_candidates(x, 3, carry=True), "carry=True needs out"),
        (lambda: select_candidates(x, 3, out=i[:, None].float()), "out has dtype"),
        (lambda: select_candidates(x, 3, out=i[:, None, :2].contiguous()), r"out must have shape \(8, splits, 3\)"),
        (lambda: select_candidates(x, 3, out=i[:, None], split_offset=1), "out has 1 splits"),
        (lambda: select_candidates(x, 3, out=i[:, None].to("meta")), "out is on meta"),
        (lambda: gather_sum(v, i[:, :2].contiguous(), e), "indices must have the shape of weights"),
        (lambda: gather_sum(v, i.int(), e), "indices has dtype"),
        (lambda: gather_sum(v, i + 30, e), r"indices holds ids in \[30, 30\]"),
        (lambda: gather_sum(v, i - 1, e), "outside the table's rows"),
        (lambda: gather_sum(v.half(), i, e), "weights has dtype"),
        (lambda: gather_sum(v, i, e.to("meta")), "table is on meta"),
        (lambda: gather_sum(v, i, e.t()), "table must be contiguous"),
        (lambda: gather_dot(g[:, :5].contiguous(), i, e), "table has 16 columns but grad has 5"),
        (lambda: gather_dot(g[:4].contiguous(), i, e), "indices has 8 rows but grad has 4"),
        (lambda: scatter_rows(v, i, g[:5].contiguous(), 30), "rows has 5 rows but weights has 8"),
        (lambda: scatter_rows(v, i, g, 0), "outside the table's rows"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_launchers_refuse_bad_inputs_naming_the_argument(case):
    call, message = _bad_calls()[case]
    if DEVICE == "cuda" and ("outside" in message or "holds ids" in message):
        pytest.skip("index ranges are checked on the CPU only (on CUDA bad ids give NaN rows)")
    with pytest.raises(KernelInputError, match=message):
        call()


# ---------------------------------------------------------------------------- model level
@pytest.fixture
def concept_kernels_only(monkeypatch):
    """Keep the B-cos layers on their PyTorch path: this compares the concept kernels alone
    (the B-cos kernels have their own tests, and are slow in the interpreter)."""
    for name, module in list(sys.modules.items()):
        if name.startswith("fact_model.bcos") and hasattr(module, "triton_runs_on"):
            monkeypatch.setattr(module, "triton_runs_on", lambda tensor: False)
    return monkeypatch


def test_model_with_concept_kernels_equals_model_without(concept_kernels_only, use_options, images):
    model = make_model([("layer2", 32, 4), ("layer3", 64, 4)])
    runs = {}
    for mode in ("torch", "triton"):
        use_options(kernels=mode)
        with torch.no_grad():
            record = model.forward_encoded(encode_rgb(images))
        runs[mode] = (record, explain(model, images))
    (ref_record, ref_expl), (record, expl) = runs["torch"], runs["triton"]
    for name, ref_codes in ref_record.codes.items():
        codes = record.codes[name]
        assert codes.values.shape == ref_codes.values.shape and codes.indices.dtype == torch.int64
        # same concepts per position (slot order differs: the kernel sorts, the reference does not)
        assert torch.equal(codes.indices.sort(dim=-1).values, ref_codes.indices.sort(dim=-1).values)
        torch.testing.assert_close(codes.totals(), ref_codes.totals(), rtol=FP32_TOL, atol=1e-6)
    torch.testing.assert_close(record.logits, ref_record.logits, rtol=FP32_TOL, atol=1e-6)
    for name, contributions in expl.contributions.items():
        scale = contributions.abs().sum(dim=1)
        assert ((contributions - ref_expl.contributions[name]).abs().sum(dim=1) <= FP32_TOL * scale).all()
        assert (expl.residuals[name] <= 1e-4 * scale).all()  # completeness: Σ contributions = explained logit


def test_model_training_step_gradients_equal(concept_kernels_only, use_options, images):
    """Training backward through the fused encode and decode: parameter gradients as with PyTorch."""
    model = make_model([("layer3", 64, 4)])  # eval mode (fixed norm statistics), gradients on
    grads = {}
    for mode in ("torch", "triton"):
        use_options(kernels=mode)
        model.zero_grad()
        model(images[:2]).logsumexp(dim=1).sum().backward()
        layer = model.concept_layer("layer3")
        grads[mode] = [layer.encoder.grad.clone(), layer.decoder.grad.clone()]
    for ours, theirs in zip(grads["triton"], grads["torch"], strict=True):
        assert theirs.abs().sum() > 0
        assert rel_err(ours, theirs.double()) <= 1e-4
