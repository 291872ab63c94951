"""Correctness and speed of the kernels on a GPU, in one run: ``python -m benchmarks.gpu_kernels``.

1. **Correctness** of every kernel against the PyTorch reference on the device, fresh
   random inputs per check, the allocator poisoned with NaN before each run (every
   output element must be written), ``‖out − ref‖ / ‖ref‖`` against a float64
   reference with a threshold per dtype: B-cos forward, training backward
   (``dx``, ``dw``) and explanation backward over kernel sizes 1/3/7, strides 1/2,
   padding, dilation, groups, B ∈ {2, 2.5}, MaxOut, both paths; the concept-layer
   kernels (:mod:`benchmarks.gpu_concept_kernels`).
2. **Layer timings** (``triton.testing.do_bench`` medians) for every distinct B-cos
   convolution of B-cos ResNet-50 and a spread of DenseNet-121's at batch 64, 224²,
   float32 (TF32) and bfloat16, channels_last, against baselines measured in the same
   run: the ``bcos`` package's eager layer, the same under ``torch.compile``, and the
   bare cuDNN convolution of the same shape (the floor). Ours: the fused implicit GEMM,
   cuDNN + the fused post-op, and the path the dispatcher picks.
3. **Concept layer** at K = 16384, k = 16: fused encode vs ``matmul`` + ``topk``; sparse
   decode vs the dense path.
4. **End to end**: FaCT B-cos ResNet-50 (random weights, concept layer at ``layer4``,
   K = 16384, k = 16): forward and explain (top-5 maps) images/s, kernels on vs off.

Prints one table per section (the last lines of the output) and writes everything to
``--out``/kernels_bench.json. ``--budget`` seconds bounds the run: sections that would
start after it are skipped and say so. ``--smoke`` runs the whole script on the CPU in
Triton's interpreter at tiny shapes (CI runs it: ``tests/benchmarks/test_gpu_kernels_bench.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fact_model import options

__all__ = ["main"]

log = logging.getLogger("benchmarks.gpu_kernels")

# ‖out − ref‖/‖ref‖ allowed per dtype on the GPU (TF32 dots for float32) and in the interpreter.
GPU_THRESHOLDS = {"float32": 5e-3, "bfloat16": 3e-2, "float16": 5e-3}
CPU_THRESHOLDS = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 3e-2}


class Budget:
    """Wall-clock budget of the run; sections check it before they start."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


@dataclass(frozen=True)
class ConvShape:
    """One B-cos convolution as it runs in a network (batch excluded)."""

    net: str
    name: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    dilation: int
    groups: int
    height: int
    width: int
    b: float
    max_out: int

    def label(self) -> str:
        s = f"{self.in_channels}→{self.out_channels} {self.kernel}×{self.kernel}"
        if self.stride > 1:
            s += f" s{self.stride}"
        return f"{s} @{self.height}"


# ----------------------------------------------------------------------------- helpers


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _rel(out, ref) -> float:
    ref64 = ref.double()
    return float((out.detach().double() - ref64.detach()).norm() / ref64.detach().norm().clamp_min(1e-30))


def _poison(device: str) -> None:
    """Fill freed allocator blocks with NaN, so an unwritten output element shows up as NaN."""
    import torch

    if device == "cuda":
        junk = torch.full((64 * 1024 * 1024,), float("nan"), device=device)
        del junk


def _median_ms(fn: Callable[[], object], device: str, smoke: bool, graph: bool = False) -> float:
    """Median milliseconds of ``fn``: as called from Python, or (``graph``) as a CUDA-graph replay = GPU time only."""
    import torch

    if smoke or device != "cuda":
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    import triton.testing

    fn()
    torch.cuda.synchronize()
    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


# ----------------------------------------------------------------------------- 1. correctness

_CORRECTNESS_CASES = [
    # kernel, stride, padding, dilation, groups, b, max_out
    (1, 1, 0, 1, 1, 2.0, 1),
    (1, 2, 0, 1, 1, 2.0, 1),
    (3, 1, 1, 1, 1, 2.0, 1),
    (3, 2, 1, 1, 1, 2.5, 1),
    (3, 1, 2, 2, 4, 2.0, 1),
    (3, 1, 1, 1, 2, 2.0, 2),
    (7, 2, 3, 1, 1, 2.0, 1),
]


def check_bcos(device: str, dtype_name: str, smoke: bool) -> list[dict[str, Any]]:
    """Forward, training backward and explanation backward of both paths vs a float64 reference."""
    import torch

    from fact_model.bcos.conv import BcosConv2d
    from fact_model.bcos.functional import unit_norm_rows
    from kernels.bcos_layer import bcos_conv2d
    from kernels.bcos_postop import ConvGeometry

    dtype = _dtype(dtype_name)
    threshold = (CPU_THRESHOLDS if smoke else GPU_THRESHOLDS)[dtype_name]
    if smoke:
        torch.manual_seed(0)  # CI: the same inputs every run; on the GPU every run draws afresh
    rows = []
    n, c, h, w, o = (2, 8, 9, 7, 8) if smoke else (4, 32, 20, 18, 48)
    for kernel, stride, padding, dilation, groups, b, max_out in _CORRECTNESS_CASES:
        reference = BcosConv2d(c, o, kernel, stride, padding, dilation, groups, b=b, max_out=max_out)
        reference = reference.to(device=device, dtype=torch.float64)
        with torch.no_grad():  # the reference sees exactly the rounded weights and inputs the kernels get
            reference.linear.weight.copy_(reference.linear.weight.to(dtype))
            if max_out == 2:
                # Unit 1 = −unit 0, so MaxOut = |ŵ·x|: the units tie only where the output is ≈ 0. With
                # independent units, near-ties (within TF32/bf16 rounding) route a gradient to the other
                # unit in the kernel than in the float64 reference — a legitimate difference, not an error.
                units = reference.linear.weight.view(o, 2, -1)
                units[:, 1] = -units[:, 0]
        for path in ("fused", "fused_map", "cudnn"):
            if path != "cudnn" and (groups > 1 or max_out > 1):
                continue
            with options.using(bcos_conv_path=path):
                for mode in ("forward", "training", "explanation"):
                    x64 = torch.randn(n, c, h, w, device=device).to(dtype).double().requires_grad_(True)
                    reference.detach_dynamic = mode == "explanation"
                    ref = reference(x64)
                    seed = torch.randn_like(ref)
                    geometry = ConvGeometry(h, w, (kernel,) * 2, (stride,) * 2, (padding,) * 2, (dilation,) * 2, groups)
                    x = x64.detach().to(dtype).requires_grad_(mode != "forward")
                    weight = reference.weight.detach().to(dtype).requires_grad_(mode != "forward")
                    _poison(device)
                    with torch.set_grad_enabled(mode != "forward"):
                        out = bcos_conv2d(x, unit_norm_rows(weight), geometry, b, max_out, mode == "explanation")
                    checks = {"out": (out, ref)}
                    if mode != "forward":
                        ref_dx, ref_dw = torch.autograd.grad(ref, (x64, reference.weight), seed)
                        dx, dw = torch.autograd.grad(out, (x, weight), seed.to(dtype))
                        checks |= {"dx": (dx, ref_dx), "dw": (dw, ref_dw)}
                    for what, (got, expected) in checks.items():
                        err = _rel(got, expected)
                        finite = bool(torch.isfinite(got).all())
                        rows.append(
                            {
                                "kernel": f"bcos conv [{path}] {mode} {what}",
                                "case": f"k{kernel} s{stride} p{padding} d{dilation} g{groups} B{b} mo{max_out}",
                                "dtype": dtype_name,
                                "rel_err": err,
                                "threshold": threshold,
                                "all_written": finite,
                                "ok": finite and err <= threshold,
                            }
                        )
    return rows


# ----------------------------------------------------------------------------- 2. layer timings


def network_conv_shapes(arch: str, size: int, smoke: bool) -> list[ConvShape]:
    """Every distinct B-cos convolution of ``arch`` at ``size``² input, recorded by a forward pass."""
    import torch

    from fact_model.backbones import create_backbone
    from fact_model.bcos.conv import BcosConv2d

    kwargs: dict[str, Any] = {"num_classes": 10, "width": 4} if smoke else {"num_classes": 1000}
    backbone = create_backbone(arch, **kwargs).eval()
    seen: dict[tuple, ConvShape] = {}

    def record(name: str):
        def hook(module: BcosConv2d, inputs: tuple) -> None:
            x = inputs[0]
            shape = ConvShape(
                arch, name, module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0],
                module.padding[0], module.dilation[0], module.groups, x.shape[2], x.shape[3], float(module.b),
                module.max_out,
            )  # fmt: skip
            key = tuple(v for k, v in shape.__dict__.items() if k not in ("net", "name"))
            seen.setdefault(key, shape)

        return hook

    handles = [
        module.register_forward_pre_hook(record(name))
        for name, module in backbone.named_modules()
        if isinstance(module, BcosConv2d)
    ]
    try:
        with torch.no_grad():
            backbone(torch.rand(1, 6, size, size))
    finally:
        for handle in handles:
            handle.remove()
    return list(seen.values())


def _spread(shapes: list[ConvShape], count: int) -> list[ConvShape]:
    if len(shapes) <= count:
        return shapes
    step = (len(shapes) - 1) / (count - 1)
    return [shapes[round(i * step)] for i in range(count)]


def _intensity(shape: ConvShape, batch: int, bytes_per_element: int) -> float:
    """FLOPs per byte of the bare convolution (input, output and filters moved once)."""
    oh = (shape.height + 2 * shape.padding - shape.dilation * (shape.kernel - 1) - 1) // shape.stride + 1
    ow = (shape.width + 2 * shape.padding - shape.dilation * (shape.kernel - 1) - 1) // shape.stride + 1
    flops = 2 * batch * oh * ow * shape.out_channels * shape.kernel**2 * shape.in_channels / shape.groups
    moved = batch * (shape.in_channels * shape.height * shape.width + shape.out_channels * oh * ow)
    moved += shape.out_channels * shape.in_channels // shape.groups * shape.kernel**2
    return flops / (moved * bytes_per_element)


def time_layers(
    shapes: list[ConvShape],
    device: str,
    dtype_name: str,
    batch: int,
    smoke: bool,
    budget: Budget,
    compile_budget: float,
) -> list[dict[str, Any]]:
    """Median ms per layer shape: cuDNN floor, ``bcos`` eager and compiled, ours (fused, cuDNN + post-op, dispatch)."""

    rows = []
    compile_spent = 0.0
    for shape in shapes:
        if budget.left() < 0:
            rows.append({"net": shape.net, "layer": shape.label(), "dtype": dtype_name, "skipped": "budget"})
            continue
        start = time.monotonic()
        compile_ok = compile_spent < compile_budget and not smoke
        rows.append(_time_shape(shape, device, dtype_name, batch, smoke, compile_ok))
        if compile_ok:
            compile_spent += time.monotonic() - start
    return rows


def _time_shape(
    shape: ConvShape, device: str, dtype_name: str, batch: int, smoke: bool, compile_baseline: bool
) -> dict[str, Any]:
    import bcos.modules
    import torch
    import torch.nn.functional as F

    from fact_model.bcos.functional import unit_norm_rows
    from kernels.bcos_conv import WeightLayouts, dgrad_geometry
    from kernels.bcos_layer import bcos_conv2d, conv_data_grad, dgrad_key, explain_data_grad, forward_key, path_table
    from kernels.bcos_postop import ConvGeometry

    dtype = _dtype(dtype_name)
    x = torch.randn(batch, shape.in_channels, shape.height, shape.width, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    theirs = bcos.modules.BcosConv2d(
        shape.in_channels, shape.out_channels, shape.kernel, shape.stride, shape.padding, shape.dilation,
        shape.groups, b=shape.b, max_out=shape.max_out,
    ).to(device=device, dtype=dtype, memory_format=torch.channels_last)  # fmt: skip
    weight_hat = unit_norm_rows(theirs.linear.weight.detach())
    layouts = WeightLayouts(weight_hat)
    fusable = shape.groups == 1 and shape.max_out == 1
    geometry = ConvGeometry(
        shape.height, shape.width, (shape.kernel,) * 2, (shape.stride,) * 2, (shape.padding,) * 2,
        (shape.dilation,) * 2, shape.groups,
    )  # fmt: skip

    def ours(path: str) -> Callable[[], object]:
        def run() -> object:
            with options.using(bcos_conv_path=path):
                return bcos_conv2d(x, weight_hat, geometry, shape.b, shape.max_out, False, layouts)

        return run

    def floor() -> object:
        return F.conv2d(x, weight_hat, None, shape.stride, shape.padding, shape.dilation, shape.groups)

    row: dict[str, Any] = {"net": shape.net, "layer": shape.label(), "dtype": dtype_name}
    with torch.no_grad():
        # GPU time (CUDA-graph replays): what the kernels cost, without Python's launch overhead.
        row["cudnn_floor_ms"] = _median_ms(floor, device, smoke, graph=True)
        row["bcos_eager_ms"] = _median_ms(lambda: theirs(x), device, smoke, graph=True)
        if compile_baseline:
            compiled = torch.compile(theirs, dynamic=False)
            compiled(x)
            row["bcos_compiled_ms"] = _median_ms(lambda: compiled(x), device, smoke, graph=True)
        row["ours_cudnn_postop_ms"] = _median_ms(ours("cudnn"), device, smoke, graph=True)
        if fusable:
            row["ours_fused_ms"] = _median_ms(ours("fused"), device, smoke, graph=True)
            row["ours_fused_map_ms"] = _median_ms(ours("fused_map"), device, smoke, graph=True)
        row["dispatch_path"] = "fused" if fusable else "cudnn"
        if device == "cuda" and not smoke and fusable:
            ours("auto")()
            row["dispatch_path"] = path_table.choices.get(forward_key(x, weight_hat, geometry, shape.b), "cudnn")
        # Wall time per call from Python (launch overhead included), ours vs the bcos layer.
        row["ours_call_ms"] = _median_ms(ours(row["dispatch_path"]), device, smoke)
        row["bcos_eager_call_ms"] = _median_ms(lambda: theirs(x), device, smoke)
        if shape.max_out == 1:
            # Explanation backward: dx = conv_transpose(g ⊙ scale, ŵ), fused kernel vs multiply + cuDNN.
            grad = torch.randn_like(ours("cudnn")())
            scale = torch.rand_like(grad)

            def dgrad(path: str) -> Callable[[], object]:
                def run() -> object:
                    with options.using(bcos_conv_path=path):
                        return explain_data_grad(grad, scale, layouts, x.shape, geometry)

                return run

            row["dgrad_floor_ms"] = _median_ms(
                lambda: conv_data_grad(grad, weight_hat, x.shape, geometry), device, smoke, graph=True
            )
            row["dgrad_cudnn_ms"] = _median_ms(dgrad("cudnn"), device, smoke, graph=True)
            row["dgrad_dispatch_path"] = "cudnn"
            if fusable and dgrad_geometry(geometry) is not None:
                row["dgrad_fused_ms"] = _median_ms(dgrad("fused"), device, smoke, graph=True)
                row["dgrad_dispatch_path"] = "fused"
                if device == "cuda" and not smoke:
                    dgrad("auto")()
                    row["dgrad_dispatch_path"] = path_table.choices[dgrad_key(grad, weight_hat, geometry)]
    path_ms = {"fused": "ours_fused_ms", "fused_map": "ours_fused_map_ms", "cudnn": "ours_cudnn_postop_ms"}
    row["ours_dispatch_ms"] = row[path_ms[row["dispatch_path"]]]
    row["vs_floor"] = row["ours_dispatch_ms"] / row["cudnn_floor_ms"]
    row["speedup_vs_eager"] = row["bcos_eager_ms"] / row["ours_dispatch_ms"]
    row["flop_per_byte"] = _intensity(shape, batch, x.element_size())
    return row


# ----------------------------------------------------------------------------- 4. end to end


def end_to_end(device: str, smoke: bool, batch: int, repeats: int, top: int = 5) -> dict[str, Any]:
    """FaCT B-cos ResNet-50 (K=16384, k=16 at layer4): forward and explain top-5 images/s, kernels on vs off."""
    import torch

    from fact_model.config import ConceptLayerSpec, FaCTConfig, Preprocessing
    from fact_model.model import FaCTModel

    torch.manual_seed(0)
    if smoke:
        arch, size, kwargs, layer, k_total, k = "bcos_resnet8", 16, {"width": 4}, "layer3", 32, 4
    else:
        arch, size, kwargs, layer, k_total, k = "bcos_v2_resnet50", 224, {}, "layer4", 16384, 16
    classes = 10 if smoke else 1000
    config = FaCTConfig(
        backbone=arch,
        class_names=[f"class_{i}" for i in range(classes)],
        preprocessing=Preprocessing(size),
        concept_layers=[ConceptLayerSpec(layer, k_total, k)],
        backbone_kwargs=kwargs,
    )
    model = FaCTModel(config).eval().to(device=device, memory_format=torch.channels_last)
    images = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    def forward() -> object:
        with torch.no_grad():
            return model(images)

    def explain(batched: bool = False) -> object:
        return model.explain(images, top_k=top, maps=True, map_kinds=("concepts",), batched_vjp=batched)

    def explain_batched() -> object:
        return explain(batched=True)

    results: dict[str, Any] = {"arch": arch, "batch": batch, "size": size, "K": k_total, "k": k, "top": top}
    outputs = {}
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    # Equality on vs off is checked in full float32: with TF32 the two paths round differently and
    # near-tied top-k selections (random weights, K = 16384) can flip.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for mode in ("torch", "triton"):
        with options.using(kernels=mode):
            outputs[mode] = explain()
    with options.using(kernels="triton"):
        outputs["triton_batched"] = explain_batched()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    for mode in ("torch", "triton"):
        with options.using(kernels=mode):
            forward(), explain(), explain_batched()  # warm-up: autotuning, dispatch timing, cuDNN plans
        if device == "cuda":
            torch.cuda.synchronize()
    passes = (("forward", forward), ("explain", explain), ("explain_batched", explain_batched))
    times: dict[str, list[float]] = {f"{what}_{mode}": [] for what, _ in passes for mode in ("torch", "triton")}
    for _ in range(repeats):  # interleaved, so drift hits both equally
        for mode in ("torch", "triton"):
            with options.using(kernels=mode):
                for what, fn in passes:
                    if device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    fn()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times[f"{what}_{mode}"].append(time.perf_counter() - start)
    if device == "cuda" and not smoke:
        results["explain_profile"] = {}
        for mode in ("torch", "triton"):
            with options.using(kernels=mode):
                results["explain_profile"][mode] = _gpu_kernel_profile(explain)
    for name, values in times.items():
        results[f"{name}_images_per_s"] = batch / statistics.median(values)
    for what in ("forward", "explain"):
        results[f"{what}_speedup"] = results[f"{what}_triton_images_per_s"] / results[f"{what}_torch_images_per_s"]
    # Against the default kernels-off explain (ranks looped): the issue's baseline.
    for mode in ("torch", "triton"):
        results[f"explain_batched_{mode}_speedup"] = (
            results[f"explain_batched_{mode}_images_per_s"] / results["explain_torch_images_per_s"]
        )
    on, off = outputs["triton"], outputs["torch"]
    name = on.layer_names[-1]
    results["contributions_rel_diff"] = _rel(on.contributions[name], off.contributions[name])
    maps_on, maps_off = outputs["triton_batched"].maps.concepts[name], off.maps.concepts[name]
    results["batched_maps_rel_diff"] = _rel(maps_on, maps_off)
    results["max_relative_residual_on"] = float((on.residual.abs() / on.explained.abs().clamp_min(1e-6)).max())
    return results


def _gpu_kernel_profile(fn: Callable[[], object]) -> list[dict[str, Any]]:
    """GPU kernels of one call of ``fn`` by total device time: where an end-to-end gap comes from."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [
        {"name": e.key, "calls": e.count, "total_ms": e.device_time_total / 1e3}
        for e in prof.key_averages()
        if e.device_time_total > 0
    ]
    return sorted(rows, key=lambda r: -r["total_ms"])[:25]


# ----------------------------------------------------------------------------- report


_PATH_MARK = {"fused": "f", "fused_map": "m", "cudnn": "c"}


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    correctness = report.get("correctness", [])
    failed = [r for r in correctness if not r["ok"]]
    console.print(f"correctness: {len(correctness) - len(failed)}/{len(correctness)} checks pass")
    for row in failed[:20]:
        console.print(f"  FAIL {row}")
    worst: dict[tuple[str, str], float] = {}
    for row in correctness:
        key = (row["kernel"].split("[")[0].strip() + " " + row["kernel"].split("]")[-1].strip(), row["dtype"])
        worst[key] = max(worst.get(key, 0.0), row.get("rel_err", 0.0))
    table = Table(title="worst relative error per kernel and dtype")
    for column in ("kernel", "dtype", "max rel err"):
        table.add_column(column)
    for (kernel, dtype), err in sorted(worst.items()):
        table.add_row(kernel, dtype, f"{err:.1e}")
    console.print(table)

    layers = [r for r in report.get("layers", []) if "skipped" not in r]
    if layers:
        table = Table(
            title=f"B-cos conv layers, batch {report['batch']}: median GPU ms (CUDA-graph replay), "
            "then ms per call from Python"
        )
        columns = ("net", "layer", "dtype", "FLOP/B", "cuDNN", "bcos eager", "bcos compiled", "fused", "fused map",
                   "cuDNN+post", "dispatch", "×floor", "eager/ours", "call: bcos", "call: ours")  # fmt: skip
        for column in columns:
            table.add_column(column, justify="left" if column in ("net", "layer") else "right")
        for r in layers:
            compiled = r.get("bcos_compiled_ms")
            table.add_row(
                r["net"].replace("bcos_v2_", ""), r["layer"], r["dtype"], f"{r['flop_per_byte']:.0f}",
                f"{r['cudnn_floor_ms']:.3f}", f"{r['bcos_eager_ms']:.3f}", f"{compiled:.3f}" if compiled else "–",
                _ms(r.get("ours_fused_ms")), _ms(r.get("ours_fused_map_ms")), f"{r['ours_cudnn_postop_ms']:.3f}",
                f"{r['ours_dispatch_ms']:.3f} {_PATH_MARK[r['dispatch_path']]}", f"{r['vs_floor']:.2f}",
                f"{r['speedup_vs_eager']:.2f}", f"{r['bcos_eager_call_ms']:.3f}", f"{r['ours_call_ms']:.3f}",
            )  # fmt: skip
        console.print(table)
    dgrads = [r for r in layers if "dgrad_cudnn_ms" in r]
    if dgrads:
        table = Table(title="explanation backward dx = conv_transpose(g ⊙ scale, ŵ): median GPU ms")
        for column in ("net", "layer", "dtype", "cuDNN dgrad", "g⊙s + cuDNN", "fused", "dispatch", "×floor"):
            table.add_column(column, justify="left" if column in ("net", "layer") else "right")
        for r in dgrads:
            chosen = r["dgrad_fused_ms" if r["dgrad_dispatch_path"] == "fused" else "dgrad_cudnn_ms"]
            table.add_row(
                r["net"].replace("bcos_v2_", ""), r["layer"], r["dtype"], f"{r['dgrad_floor_ms']:.3f}",
                f"{r['dgrad_cudnn_ms']:.3f}", f"{r['dgrad_fused_ms']:.3f}" if "dgrad_fused_ms" in r else "–",
                f"{chosen:.3f} {_PATH_MARK[r['dgrad_dispatch_path']]}", f"{chosen / r['dgrad_floor_ms']:.2f}",
            )  # fmt: skip
        console.print(table)
    skipped = [r for r in report.get("layers", []) if "skipped" in r]
    if skipped:
        console.print(f"{len(skipped)} layer timings skipped (budget)")
    concept = report.get("concept_timings", [])
    if concept:
        table = Table(title="concept layer kernels")
        keys = sorted({k for r in concept for k in r})
        for key in keys:
            table.add_column(key)
        for r in concept:
            table.add_row(*(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys))
        console.print(table)
    e2e = report.get("end_to_end")
    if e2e:
        console.print(
            f"end to end {e2e['arch']} batch {e2e['batch']} {e2e['size']}px K={e2e['K']} k={e2e['k']}: "
            f"forward {e2e['forward_torch_images_per_s']:.1f} → {e2e['forward_triton_images_per_s']:.1f} img/s "
            f"({e2e['forward_speedup']:.2f}×); explain top-{e2e['top']} {e2e['explain_torch_images_per_s']:.1f} → "
            f"{e2e['explain_triton_images_per_s']:.1f} img/s ({e2e['explain_speedup']:.2f}×); batched VJPs: kernels "
            f"off {e2e['explain_batched_torch_images_per_s']:.1f} ({e2e['explain_batched_torch_speedup']:.2f}×), "
            f"on {e2e['explain_batched_triton_images_per_s']:.1f} ({e2e['explain_batched_triton_speedup']:.2f}×); "
            f"maps batched+on vs off rel diff {e2e['batched_maps_rel_diff']:.1e}; contributions on vs off "
            f"rel diff {e2e['contributions_rel_diff']:.1e}, max relative residual {e2e['max_relative_residual_on']:.1e}"
        )
        for mode, kernels in e2e.get("explain_profile", {}).items():
            table = Table(title=f"explain, FACT_KERNELS={mode}: GPU kernels by total time (one call)")
            for column in ("kernel", "calls", "total ms", "share"):
                table.add_column(column, justify="left" if column == "kernel" else "right")
            total = sum(k["total_ms"] for k in kernels) or 1.0
            for k in kernels[:12]:
                table.add_row(k["name"][:90], str(k["calls"]), f"{k['total_ms']:.3f}", f"{k['total_ms'] / total:.0%}")
            console.print(table)
    for note in report.get("notes", []):
        console.print(f"note: {note}")
    console.print(f"device: {report['device_name']}  torch {report['torch']}  triton {report['triton']}  "
                  f"total {report['seconds']:.0f} s")  # fmt: skip


class Sections:
    """Runs the benchmark's sections within the time budget, recording skips and failures in the report."""

    def __init__(self, wanted: set[str], budget: Budget, budget_s: float, report: dict[str, Any]) -> None:
        self.wanted, self.budget, self.budget_s, self.report = wanted, budget, budget_s, report

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """``fn()``'s result, or None when the section is not wanted, the budget is spent or it raised."""
        if name.split(":")[0].split(" ")[0] not in self.wanted:
            return None
        if self.budget.left() < 0:
            self.report["notes"].append(f"section {name} skipped: budget of {self.budget_s:.0f} s spent")
            return None
        start = time.monotonic()
        log.info("section %s …", name)
        try:
            result = fn()
        except Exception as err:  # a broken section must not hide the others' results
            log.exception("section %s failed", name)
            self.report["notes"].append(f"section {name} FAILED: {type(err).__name__}: {err}")
            return None
        log.info("section %s done in %.1f s", name, time.monotonic() - start)
        return result


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/kernels")))
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; later sections are skipped after it")
    parser.add_argument("--compile-budget", type=float, default=90.0, help="seconds of torch.compile for baselines")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--e2e-batch", type=int, default=32)
    parser.add_argument("--sections", default="correctness,layers,concept,e2e")
    parser.add_argument(
        "--dtypes", help="comma-separated, checked and timed (default: float32,bfloat16; --smoke: float32,float16)"
    )
    args = parser.parse_args(argv)
    unknown = set((args.dtypes or "float32").split(",")) - set(GPU_THRESHOLDS)
    if unknown:
        parser.error(f"unknown --dtypes {sorted(unknown)}: choose from {', '.join(GPU_THRESHOLDS)}")
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # Triton's own switch, read when triton is first imported
    else:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU, or use --smoke")
    return args


def _report_header(device: str, smoke: bool, batch: int) -> dict[str, Any]:
    import torch
    import triton

    return {
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "smoke": smoke,
        "batch": batch,
        "date": time.strftime("%Y-%m-%d"),
        "notes": [],
    }


def _correctness(sections: Sections, bench_concept: Any, device: str, dtypes: list[str], smoke: bool) -> list:
    rows: list[dict[str, Any]] = []
    for dtype_name in dtypes:
        rows += sections.run(f"correctness:bcos {dtype_name}", lambda d=dtype_name: check_bcos(device, d, smoke)) or []
        if bench_concept is None:
            continue
        rows += sections.run(
            f"correctness:concept {dtype_name}",
            lambda d=dtype_name: bench_concept.check_concept_kernels(device, _dtype(d), smoke),
        ) or []  # fmt: skip
    return rows


def _layer_timings(
    sections: Sections, device: str, dtypes: list[str], batch: int, smoke: bool, compile_budget: float
) -> list[dict[str, Any]]:
    """Every B-cos convolution shape of ResNet-50 (and a spread of DenseNet-121's) timed per dtype."""
    size = 16 if smoke else 224
    resnet = network_conv_shapes("bcos_resnet8" if smoke else "bcos_v2_resnet50", size, smoke)
    if smoke:
        resnet = _spread(resnet, 3)
    densenet = [] if smoke else _spread(network_conv_shapes("bcos_v2_densenet121", size, False), 8)
    rows: list[dict[str, Any]] = []
    for i, dtype_name in enumerate(dtypes):
        share = Budget(sections.budget.left() / (len(dtypes) - i))  # each dtype gets its part of what is left
        rows += sections.run(
            f"layers {dtype_name}",
            lambda d=dtype_name, b=share: time_layers(resnet + densenet, device, d, batch, smoke, b,
                                                      compile_budget / len(dtypes)),
        ) or []  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtypes = ["float32", "float16"] if args.smoke else ["float32", "bfloat16"]
    if args.dtypes:
        dtypes = args.dtypes.split(",")
    batch = 2 if args.smoke else args.batch
    report = _report_header(device, args.smoke, batch)
    sections = Sections(set(args.sections.split(",")), Budget(args.budget), args.budget, report)
    try:
        from benchmarks import gpu_concept_kernels as bench_concept
    except Exception as err:  # the concept kernels' checks live in their own module
        bench_concept = None
        report["notes"].append(f"concept-layer checks unavailable: {err}")
        sections.wanted -= {"concept"}

    report["correctness"] = _correctness(sections, bench_concept, device, dtypes, args.smoke)
    e2e_batch, repeats, top = (1, 1, 1) if args.smoke else (args.e2e_batch, 5, 5)
    report["end_to_end"] = sections.run("e2e", lambda: end_to_end(device, args.smoke, e2e_batch, repeats, top))
    # The per-layer tables come last: they are the longest section (one autotuning per layer shape and
    # path), and the budget then cuts their tail rather than a whole later section.
    report["concept_timings"] = [
        row
        for dtype_name in dtypes
        for row in sections.run(
            f"concept {dtype_name}",
            lambda d=dtype_name: bench_concept.time_concept_kernels(device, _dtype(d), args.smoke),
        ) or []
    ]  # fmt: skip
    if "layers" in sections.wanted:
        report["layers"] = _layer_timings(sections, device, dtypes, batch, args.smoke, args.compile_budget)
    report["seconds"] = sections.budget.elapsed()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels_bench.json").write_text(json.dumps(report, indent=1, default=str))
    _print_tables(report)
    failures = [r for r in report["correctness"] if not r["ok"]]
    broken = [n for n in report["notes"] if "FAILED" in n]
    return 1 if failures or broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
