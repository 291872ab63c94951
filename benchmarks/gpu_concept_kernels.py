"""Correctness checks and timings of the concept-layer kernels, for :mod:`benchmarks.gpu_kernels`.

* :func:`check_concept_kernels` — every concept kernel (encode forward by both paths,
  ``fused`` and ``gemm_select``, encode backward, decode forward and backward) against a
  float64 PyTorch reference on the given device:
  fresh random inputs per check, outputs poisoned before the run and checked fully
  written, relative error ``‖out − ref‖ / ‖ref‖`` against a per-dtype threshold.
* :func:`time_concept_kernels` — on CUDA, ``triton.testing.do_bench`` medians at the
  FaCT ResNet-50 ``layer4`` shape (M = 64·7·7 positions, C = 2048, K = 16384, k = 16):
  both encode paths (fused; cuBLAS chunks + Triton select) vs one measurement of
  ``matmul + relu + topk``, marking the one the dispatcher picks (``dispatch_pick``),
  sparse decode vs the dense decode and vs
  ``F.embedding_bag``, and both training backwards vs autograd of the dense path.
  ``smoke`` (CPU under ``TRITON_INTERPRET=1``): tiny shapes, ``time.perf_counter``, the
  same rows (the interpreter's times say nothing about speed).

Both return lists of flat dicts (one table row each).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fact_model import options
from kernels._common import interpreting
from kernels.concept_decode import (
    gather_dot,
    gather_dot_reference,
    gather_sum,
    scatter_rows_reference,
)
from kernels.concept_encode import (
    encode_candidates,
    encode_config,
    encode_path,
    encode_topk,
    merge_candidates,
)
from kernels.concept_select import encode_topk_gemm_select, gemm_select_candidates, gemm_select_plan

__all__ = ["check_concept_kernels", "time_concept_kernels"]

logger = logging.getLogger(__name__)

LAYER4 = {"M": 64 * 7 * 7, "C": 2048, "K": 16384, "k": 16}
SMOKE = {"M": 40, "C": 48, "K": 200, "k": 8}
GOALS = {"encode": 1.5, "decode": 4.0}  # issue 5: speed-up over the dense PyTorch path


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _threshold(dtype: torch.dtype, gemm: bool) -> float:
    """Relative-error bound: output rounding of the dtype; TF32 dots (~1e-3) for fp32 GEMMs."""
    if dtype == torch.float32:
        return 2e-3 if gemm and torch.get_float32_matmul_precision() != "highest" else 1e-5
    return {torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]


def _rel(ours: Tensor, reference: Tensor) -> float:
    return float((ours.double() - reference).norm() / reference.norm().clamp_min(1e-30))


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _inputs(shape: dict[str, int], device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, Tensor]:
    """Fresh random operands: features, encoder and decoder rows (~unit pre-activations), codes."""
    m, c, num_concepts, k = shape["M"], shape["C"], shape["K"], shape["k"]
    gen = _generator(device, seed)

    def randn(*size: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*size, device=device, generator=gen) * scale).to(dtype)

    return {
        "x": randn(m, c),
        "encoder": randn(num_concepts, c, scale=c**-0.5),
        "decoder": randn(num_concepts, c, scale=c**-0.5),
        "values": randn(m, k).abs(),
        "indices": torch.randint(0, num_concepts, (m, k), device=device, generator=gen),
        "grad_out": randn(m, c),
        "grad_values": randn(m, k),
    }


def _row(kernel: str, dtype: torch.dtype, shape: dict[str, int], rel_err: float, threshold: float, **extra: Any):
    ok = bool(math.isfinite(rel_err) and rel_err <= threshold and all(v for k, v in extra.items() if k.endswith("_ok")))
    shape_text = " ".join(f"{k}={v}" for k, v in shape.items())
    return {"kernel": kernel, "dtype": _dtype_name(dtype), "shape": shape_text, "rel_err": rel_err,
            "threshold": threshold, "ok": ok, **extra}  # fmt: skip


def _gemm_select_chunk(shape: dict[str, int]) -> int | None:
    """The default chunk at the layer4 shape; elsewhere ~K/3, so that K is not a multiple of it."""
    return None if shape["K"] >= 8192 else max(shape["k"], shape["K"] // 3)


def _poisoned_keys(path: str, x: Tensor, encoder: Tensor, shape: dict[str, int]) -> tuple[Tensor, bool]:
    """The path's candidate keys, computed into a buffer poisoned with int64 min, and whether all were written."""
    k, poison = shape["k"], torch.iinfo(torch.int64).min
    if path == "fused":
        splits = encode_config(shape["M"], shape["C"], shape["K"], x.dtype, x.device).splits
        keys = torch.full((shape["M"], splits, k), poison, dtype=torch.int64, device=x.device)
        encode_candidates(x, encoder, k, out=keys)
    else:
        chunk = _gemm_select_chunk(shape)
        lanes = gemm_select_plan(x, shape["K"], chunk)[1].lanes
        keys = torch.full((shape["M"], lanes, k), poison, dtype=torch.int64, device=x.device)
        gemm_select_candidates(x, encoder, k, chunk=chunk, out=keys)
    return keys, not bool((keys == poison).any())


def _check_encode_path(path: str, shape: dict[str, int], device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    t = _inputs(shape, device, dtype, seed)
    x, encoder, k = t["x"], t["encoder"], shape["k"]
    keys, written = _poisoned_keys(path, x, encoder, shape)
    values, indices = merge_candidates(keys, k, dtype)
    dispatch = encode_path(x, encoder, k)  # what the operator picks unforced (timed once per shape on CUDA)
    with options.using(concept_encode_path=path):
        op_values, op_indices = torch.ops.fact.concept_encode(x, encoder, k)
    own_values, own_indices = values, indices
    if path == "gemm_select":  # the operator runs the default chunk
        own_values, own_indices = encode_topk_gemm_select(x, encoder, k)
    same_as_op = bool(torch.equal(op_values, own_values) and torch.equal(op_indices, own_indices))
    pre = F.relu(x.double() @ encoder.double().t())  # float64 reference
    ref_values, ref_indices = torch.topk(pre, k, dim=1)
    threshold = _threshold(dtype, gemm=True)
    exact_at_ours = pre.gather(1, indices)
    # A valid top-k (ties and rounding aside): every chosen concept reaches the true k-th value.
    slack = threshold * ref_values[:, :1].clamp_min(1e-30)
    valid = bool((exact_at_ours.min(dim=1, keepdim=True).values >= ref_values[:, -1:] - slack).all())
    distinct = bool((indices.sort(dim=1).values.diff(dim=1) > 0).all()) if k > 1 else True
    agreement = float((indices[:, :, None] == ref_indices[:, None, :]).any(dim=-1).double().mean())
    rel_err = max(_rel(values, ref_values), _rel(values, exact_at_ours))
    kernel = "encode fwd" if path == "fused" else f"encode fwd {path}"
    return _row(kernel, dtype, shape, rel_err, threshold, written_ok=written, selection_ok=valid,
                distinct_ok=distinct, op_ok=same_as_op, index_agreement=agreement, dispatch=dispatch)  # fmt: skip


def _check_encode_forward(shape: dict[str, int], device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    return _check_encode_path("fused", shape, device, dtype, seed)


def _check_encode_gemm_select(shape: dict[str, int], device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    return _check_encode_path("gemm_select", shape, device, dtype, seed)


def _check_encode_backward(shape: dict[str, int], device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    t = _inputs(shape, device, dtype, seed)
    x = t["x"].requires_grad_(True)
    encoder = t["encoder"].requires_grad_(True)
    values, indices = torch.ops.fact.concept_encode(x, encoder, shape["k"])
    grad_x, grad_e = torch.autograd.grad(values, [x, encoder], t["grad_values"])
    # float64 reference at the kernel's selection (checked by the forward check)
    exact = (x.detach().double() @ encoder.detach().double().t()).gather(1, indices)
    gated = t["grad_values"].double() * (exact > 0)
    ref_x = F.embedding_bag(indices, encoder.detach().double(), per_sample_weights=gated, mode="sum")
    ref_e = scatter_rows_reference(gated, indices, x.detach().double(), shape["K"])
    poisoned = torch.full_like(grad_x, float("nan"))
    gather_sum((t["grad_values"] * (values.detach() > 0)).contiguous(), indices, encoder.detach(), out=poisoned)
    written = not bool(poisoned.isnan().any())
    threshold = _threshold(dtype, gemm=False)
    rel_err = max(_rel(grad_x, ref_x), _rel(grad_e, ref_e))
    return _row("encode bwd (dX, dE)", dtype, shape, rel_err, threshold, written_ok=written,
                rel_err_dx=_rel(grad_x, ref_x), rel_err_de=_rel(grad_e, ref_e))  # fmt: skip


def _check_decode_forward(shape: dict[str, int], device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    t = _inputs(shape, device, dtype, seed)
    values, indices, decoder = t["values"], t["indices"], t["decoder"]
    out = torch.full((shape["M"], shape["C"]), float("nan"), dtype=dtype, device=device)
    gather_sum(values, indices, decoder, out=out)
    written = not bool(out.isnan().any())
    same_as_op = bool(torch.equal(torch.ops.fact.concept_decode(values, indices, decoder), out))
    reference = F.embedding_bag(indices, decoder.double(), per_sample_weights=values.double(), mode="sum")
    return _row("decode fwd", dtype, shape, _rel(out, reference), _threshold(dtype, gemm=False),
                written_ok=written, op_ok=same_as_op)  # fmt: skip


def _check_decode_backward(shape: dict[str, int], device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    t = _inputs(shape, device, dtype, seed)
    values = t["values"].requires_grad_(True)
    decoder = t["decoder"].requires_grad_(True)
    indices, grad_out = t["indices"], t["grad_out"]
    out = torch.ops.fact.concept_decode(values, indices, decoder)
    grad_v, grad_d = torch.autograd.grad(out, [values, decoder], grad_out)
    ref_v = gather_dot_reference(grad_out.double(), indices, decoder.detach().double())
    ref_d = scatter_rows_reference(values.detach().double(), indices, grad_out.double(), shape["K"])
    poisoned = torch.full_like(grad_v, float("nan"))
    gather_dot(grad_out, indices, decoder.detach(), out=poisoned)
    written = not bool(poisoned.isnan().any())
    rel_err = max(_rel(grad_v, ref_v), _rel(grad_d, ref_d))
    return _row("decode bwd (dvalues, dDt)", dtype, shape, rel_err, _threshold(dtype, gemm=False),
                written_ok=written, rel_err_dvalues=_rel(grad_v, ref_v), rel_err_ddt=_rel(grad_d, ref_d))  # fmt: skip


def _check_shapes(smoke: bool) -> list[dict[str, int]]:
    if smoke:
        return [SMOKE, {"M": 17, "C": 20, "K": 40, "k": 3}]
    # layer4 shape, and an uneven one (partial row/concept tiles, C not a multiple of the block)
    return [LAYER4, {"M": 1000, "C": 200, "K": 1000, "k": 7}]


def check_concept_kernels(device: str, dtype: torch.dtype, smoke: bool) -> list[dict[str, Any]]:
    """Correctness of the four concept kernels vs a float64 reference; one dict per check.

    Each dict: ``kernel``, ``dtype``, ``shape``, ``rel_err``, ``threshold``, ``ok`` and
    the sub-checks (``*_ok``: output fully written, valid top-k selection, …) that
    ``ok`` also requires; the encode row reports ``index_agreement`` with ``torch.topk``.
    """
    dev = torch.device(device)
    import kernels.concept_encode  # noqa: F401  (registers the fact:: operators)

    rows = []
    checks: list[Callable[..., dict]] = [
        _check_encode_forward,
        _check_encode_gemm_select,
        _check_encode_backward,
        _check_decode_forward,
        _check_decode_backward,
    ]
    for s, shape in enumerate(_check_shapes(smoke)):
        for c, check in enumerate(checks):
            seed = 1000 * s + c
            try:
                rows.append(check(shape, dev, dtype, seed))
            except Exception as err:  # report, keep checking the others
                logger.exception("concept check %s failed", check.__name__)
                name = check.__name__.removeprefix("_check_").replace("_", " ")
                error = f"{type(err).__name__}: {err}"
                rows.append(_row(name, dtype, shape, float("nan"), _threshold(dtype, gemm=False), error=error))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------- timings
def _timer(device: torch.device, smoke: bool) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of ``fn``: ``do_bench`` on CUDA, ``perf_counter`` in smoke mode."""
    if device.type == "cuda" and not smoke:
        from triton.testing import do_bench

        def bench(fn: Callable[[], object]) -> float:
            fn()  # compile / warm up outside the measurement
            torch.cuda.synchronize()
            return float(do_bench(fn, return_mode="median"))

        return bench

    def perf(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(3):
            started = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - started))
        return statistics.median(times)

    return perf


def _timing_row(kernel, dtype, shape, ours, ours_ms, baseline, baseline_ms, goal, device, **extra) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    speedup = baseline_ms / ours_ms if ours_ms > 0 else float("nan")
    return {
        "kernel": kernel,
        "dtype": _dtype_name(dtype),
        "shape": " ".join(f"{k}={v}" for k, v in shape.items()),
        "ours": ours,
        "ours_ms": ours_ms,
        "baseline": baseline,
        "baseline_ms": baseline_ms,
        "speedup": speedup,
        "goal": goal if goal is not None else "-",
        "meets_goal": "-" if goal is None else bool(speedup >= goal),
        "device": device,
        **extra,
    }


def time_concept_kernels(device: str, dtype: torch.dtype, smoke: bool) -> list[dict[str, Any]]:
    """Concept-layer timings (ms, median) of our kernels and the dense PyTorch path, same run.

    Rows: encode by each path (``path``: fused, gemm_select) vs one measurement of
    ``matmul + relu + topk``, ``dispatch_pick`` marking the path the operator's dispatcher
    takes; decode (sparse vs dense scatter + matmul, and vs ``F.embedding_bag``), encode and decode training backward
    (ours vs autograd of the dense path). Each row: ``ours_ms``, ``baseline_ms``,
    ``speedup`` = baseline / ours, the issue's ``goal`` where it sets one.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("time_concept_kernels: CUDA requested but not available")
        where = torch.cuda.get_device_name(dev)
    elif interpreting():
        where = "cpu (Triton interpreter: times are not speeds)"
    else:
        raise RuntimeError("time_concept_kernels needs CUDA, or the CPU with TRITON_INTERPRET=1")
    import kernels.concept_encode  # noqa: F401  (registers the fact:: operators)

    shape = SMOKE if smoke else LAYER4
    m, num_concepts, k = shape["M"], shape["K"], shape["k"]
    t = _inputs(shape, dev, dtype, seed=7)
    x, encoder, decoder = t["x"], t["encoder"], t["decoder"]
    with torch.no_grad():
        values, indices = torch.ops.fact.concept_encode(x, encoder, k)
    measure = _timer(dev, smoke)
    rows: list[dict[str, Any]] = []

    baselines: dict[tuple[str, str], float] = {}  # one measurement per (kernel, baseline), shared by its rows

    def add(kernel: str, ours: str, ours_fn, baseline: str, baseline_fn, goal: float | None, **extra) -> None:  # type: ignore[no-untyped-def]
        try:
            with torch.no_grad():
                ours_ms = measure(ours_fn)
                if (kernel, baseline) not in baselines:
                    baselines[kernel, baseline] = measure(baseline_fn)
            goal = None if smoke else goal  # the interpreter's times say nothing about speed
            baseline_ms = baselines[kernel, baseline]
            rows.append(_timing_row(kernel, dtype, shape, ours, ours_ms, baseline, baseline_ms, goal, where, **extra))
        except Exception as err:  # report, keep timing the others
            logger.exception("concept timing %s failed", kernel)
            rows.append({"kernel": kernel, "dtype": _dtype_name(dtype), "error": f"{type(err).__name__}: {err}"})
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def dense_encode() -> tuple[Tensor, Tensor]:
        return torch.topk(F.relu(x @ encoder.t()), k, dim=1, sorted=False)

    def dense_codes() -> Tensor:
        return torch.zeros(m, num_concepts, dtype=dtype, device=dev).scatter_(1, indices, values)

    with torch.no_grad():
        picked = encode_path(x, encoder, k)  # on CUDA: the dispatcher's own measurement of this shape
    for path, ours, run in (
        ("fused", "fused triton", lambda: encode_topk(x, encoder, k)),
        ("gemm_select", "cuBLAS chunks + triton select", lambda: encode_topk_gemm_select(x, encoder, k)),
    ):
        add("encode", ours, run, "matmul+relu+topk", dense_encode, GOALS["encode"], path=path,
            dispatch_pick=path == picked)  # fmt: skip
    add(
        "decode",
        "sparse triton",
        lambda: torch.ops.fact.concept_decode(values, indices, decoder),
        "dense scatter+matmul",
        lambda: dense_codes() @ decoder,
        GOALS["decode"],
    )
    add("decode", "sparse triton", lambda: torch.ops.fact.concept_decode(values, indices, decoder),
        "F.embedding_bag", lambda: F.embedding_bag(indices, decoder, per_sample_weights=values, mode="sum"),
        None)  # fmt: skip

    # training backward: gradients of the layer's parameters and inputs from one forward graph
    grad_values, grad_out = t["grad_values"], t["grad_out"]
    x_g, e_g, d_g = (p.detach().requires_grad_(True) for p in (x, encoder, decoder))
    v_g = values.detach().requires_grad_(True)
    with torch.enable_grad():
        ours_enc = torch.ops.fact.concept_encode(x_g, e_g, k)[0]
        dense_enc = torch.topk(F.relu(x_g @ e_g.t()), k, dim=1, sorted=False).values
        ours_dec = torch.ops.fact.concept_decode(v_g, indices, d_g)
        dense_dec = torch.zeros(m, num_concepts, dtype=dtype, device=dev).scatter(1, indices, v_g) @ d_g

    def backward(output: Tensor, inputs: list[Tensor], seed: Tensor) -> Callable[[], object]:
        def run() -> object:
            with torch.enable_grad():
                return torch.autograd.grad(output, inputs, seed, retain_graph=True)

        return run

    add("encode bwd", "gather-sum + scatter", backward(ours_enc, [x_g, e_g], grad_values),
        "autograd of dense", backward(dense_enc, [x_g, e_g], grad_values), None)  # fmt: skip
    add("decode bwd", "gather-dot + scatter", backward(ours_dec, [v_g, d_g], grad_out),
        "autograd of dense", backward(dense_dec, [v_g, d_g], grad_out), None)  # fmt: skip
    return rows
