"""Compile every kernel, as the launchers would launch it at real shapes, for a GPU — without a GPU.

The CPU tests run the kernels in Triton's interpreter, which executes the Python of a
kernel element by element: it never lowers the kernel, so it cannot see what only the
compiler does — a type or layout the GPU backend rejects, a tile configuration whose
pipelined buffers exceed the card's shared memory. A GPU session is short, so this
script finds those first: it runs the launchers on CPU tensors of realistic shapes
(B-cos ResNet-50 layers, the concept layer at K = 16384) with every kernel launch
recorded instead of run (:func:`recording`), expands autotuned kernels into their
configurations, specialises arguments as Triton's JIT would (16-divisible integers and
16-byte-aligned pointers), and compiles each distinct launch for the target (default
``sm_90``, H100) with the ``ptxas`` bundled in Triton; its ``cuobjdump`` reports each
variant's registers and spills.

``python -m benchmarks.compile_check`` prints one row per compiled variant (shared memory
against the card's limit) and exits non-zero if any fails; ``--quick`` compiles one
representative of each kernel (CI). Needs ``TRITON_INTERPRET`` unset (the interpreter
replaces kernels by Python functions that cannot be compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch

__all__ = ["Launch", "compile_launch", "main", "recording", "workload"]

SHARED_LIMIT = {90: 232448}
"""Largest shared memory per block (bytes) of each compute capability: H100 (sm_90) 227 KiB."""

_POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.int64: "*i64",
    torch.int32: "*i32",
}


@dataclass
class Launch:
    """One recorded kernel launch: the kernel object, its arguments, and what the launcher called it for."""

    kernel: Any
    args: tuple
    kwargs: dict
    label: str = ""


@dataclass
class Compiled:
    """One compiled variant of a launch."""

    kernel: str
    variant: str
    shared_bytes: int = 0
    seconds: float = 0.0
    error: str = ""
    extra: dict = field(default_factory=dict)


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` appends a :class:`Launch` instead of running."""

    def __init__(self, kernel: Any, sink: list[Launch], label: Callable[[], str]) -> None:
        self.kernel, self.sink, self.label = kernel, sink, label

    def __getitem__(self, grid: object) -> Callable[..., None]:
        def record(*args: object, **kwargs: object) -> None:
            self.sink.append(Launch(self.kernel, args, kwargs, self.label()))

        return record


_LAUNCHER_MODULES = ("kernels.bcos_postop", "kernels.bcos_conv", "kernels.concept_encode", "kernels.concept_decode",
                     "kernels.concept_select")  # fmt: skip


@contextlib.contextmanager
def recording(label: Callable[[], str] = lambda: "") -> Iterator[list[Launch]]:
    """Inside the block the launchers accept CPU tensors and record their launches instead of running them."""
    import importlib

    import kernels._common as common

    sink: list[Launch] = []
    with contextlib.ExitStack() as stack:
        # Input checks accept CPU tensors as under the interpreter; the launchers themselves still
        # take their GPU branches (their own `interpreting` is false: TRITON_INTERPRET is unset).
        stack.enter_context(mock.patch.object(common, "interpreting", lambda: True))
        for name in _LAUNCHER_MODULES:
            module = importlib.import_module(name)
            stack.enter_context(
                mock.patch.object(module, "launchable", lambda kernel, tensor: _Recorder(kernel, sink, label))
            )
        yield sink


# ----------------------------------------------------------------------------- workload


@contextlib.contextmanager
def _cudnn_tf32(enabled: bool) -> Iterator[None]:
    """PyTorch's TF32 switch for the block (the fused conv picks full-precision products when it is off)."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def workload(quick: bool) -> list[Launch]:
    """The launches of the B-cos and concept kernels at ResNet-50 / K = 16384 shapes, fp32 (TF32 and IEEE) and bf16."""
    from kernels.bcos_conv import dgrad_weight_layout, fused_weight_layout, launch_explain_dgrad, launch_fused_conv
    from kernels.bcos_postop import (
        ConvGeometry,
        launch_postop,
        launch_postop_backward,
        launch_scale_grad,
        launch_sumsq,
    )
    from kernels.concept_decode import gather_dot, gather_sum, scatter_rows
    from kernels.concept_encode import encode_candidates
    from kernels.concept_select import select_candidates

    cl = torch.channels_last
    current = {"label": ""}
    launches: list[Launch] = []
    dtypes = [torch.bfloat16] if quick else [torch.float32, torch.bfloat16]
    with recording(lambda: current["label"]) as sink:
        for dtype in dtypes:
            tf32_modes = [True, False] if dtype == torch.float32 else [True]
            n, c, h, w, o = 64, 256, 14, 14, 256  # layer3's 3×3 conv
            x = torch.empty(n, c, h, w, dtype=dtype).contiguous(memory_format=cl)
            weight = torch.empty(o, c, 3, 3, dtype=dtype)
            geometry = ConvGeometry(h, w, (3, 3), (1, 1), (1, 1))
            y = torch.empty(n, o, h, w, dtype=dtype).contiguous(memory_format=cl)
            current["label"] = str(dtype).removeprefix("torch.")
            q = launch_sumsq(x)
            for tf32 in tf32_modes:
                with _cudnn_tf32(tf32):
                    current["label"] = str(dtype).removeprefix("torch.") + ("" if tf32 else " (TF32 off)")
                    launch_fused_conv(x, fused_weight_layout(weight), geometry, 2.0)
                    if quick:
                        continue
                    launch_fused_conv(x, fused_weight_layout(weight), geometry, 2.5, write_scale=True)
                    launch_fused_conv(x, fused_weight_layout(weight), geometry, 2.0, q=q.float())
                    launch_explain_dgrad(y, y, dgrad_weight_layout(weight), geometry)
                    # the other kernel sizes of a ResNet-50: 1×1 (most layers) and the 7×7 stride-2 stem
                    pointwise = torch.empty(o, c, 1, 1, dtype=dtype)
                    launch_fused_conv(x, fused_weight_layout(pointwise), ConvGeometry(h, w, (1, 1)), 2.0)
                    stem_x = torch.empty(n, 6, 224, 224, dtype=dtype).contiguous(memory_format=cl)
                    stem = ConvGeometry(224, 224, (7, 7), (2, 2), (3, 3))
                    launch_fused_conv(stem_x, fused_weight_layout(torch.empty(64, 6, 7, 7, dtype=dtype)), stem, 2.0)
            current["label"] = str(dtype).removeprefix("torch.")
            launch_postop(y, q.float(), geometry, 2.0, write_scale=True)
            y2 = torch.empty(n, 2 * o, h, w, dtype=dtype).contiguous(memory_format=cl)
            launch_postop(y2, q.float(), geometry, 2.5, max_out=2)
            launch_postop_backward(y, y, q.float(), geometry, 2.0)
            launch_scale_grad(y, y, y2, 2)
            m, d, concepts, k = 64 * 7 * 7, 2048, 16384, 16
            rows = torch.empty(m, d, dtype=dtype)
            encode_candidates(rows, torch.empty(concepts, d, dtype=dtype), k)
            select_candidates(torch.empty(m, 4096, dtype=dtype), k)
            indices = torch.zeros(m, k, dtype=torch.int64)
            table = torch.empty(concepts, d, dtype=dtype)
            gather_sum(torch.empty(m, k, dtype=dtype), indices, table)
            gather_dot(rows, indices, table)
            scatter_rows(torch.empty(m, k, dtype=dtype), indices, rows, concepts)
        launches.extend(sink)
    return launches


# ----------------------------------------------------------------------------- compiling


def _variants(launch: Launch) -> list[tuple[Any, dict, dict]]:
    """``(JIT function, constexpr/argument values, compile options)`` per configuration of the launch."""
    from triton.runtime.autotuner import Autotuner

    kernel, kwargs = launch.kernel, dict(launch.kwargs)
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    if not isinstance(kernel, Autotuner):
        return [(kernel, kwargs, options)]
    return [
        (kernel.fn, {**kwargs, **config.kwargs}, {"num_warps": config.num_warps, "num_stages": config.num_stages})
        for config in kernel.configs
    ]


def _signature(fn: Any, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """Triton's ``(signature, constexprs, attrs)`` for these arguments, specialised as the JIT would."""
    names = list(fn.arg_names)
    values = dict(zip(names, args, strict=False)) | kwargs
    constexpr_positions = set(fn.constexprs)
    unspecialised = set(getattr(fn, "do_not_specialize", ()))
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = values[name]
        if i in constexpr_positions:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # allocations are 16-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and name not in unspecialised and i not in unspecialised:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    return signature, constexprs, attrs


def compile_launch(launch: Launch, capability: int = 90, shared_limit: int | None = None) -> list[Compiled]:
    """Compile every configuration of ``launch`` for ``sm_<capability>``; more shared memory than
    ``shared_limit`` bytes (default: the card's, :data:`SHARED_LIMIT`) is a failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    results = []
    for fn, kwargs, options in _variants(launch):
        signature, constexprs, attrs = _signature(fn, launch.args, kwargs)
        flags = " ".join(
            name if value is True else f"{name}={value}"
            for name, value in constexprs.items()
            if not name.startswith("BLOCK") and value is not False
        )
        blocks = "×".join(str(v) for k, v in constexprs.items() if k.startswith("BLOCK"))
        warps, stages = options["num_warps"], options["num_stages"]
        variant = f"{launch.label}: {flags}; blocks {blocks}, {warps} warps, {stages} stages"
        result = Compiled(fn.__name__, variant)
        started = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
            result.shared_bytes = int(compiled.metadata.shared)
            result.extra = _resource_usage(compiled.asm["cubin"])
        except Exception as error:  # the point of the script: report every failure, keep going
            result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
        result.seconds = time.perf_counter() - started
        limit = shared_limit if shared_limit is not None else SHARED_LIMIT.get(capability)
        if not result.error and limit is not None and result.shared_bytes > limit:
            result.error = f"needs {result.shared_bytes} bytes of shared memory, the card has {limit}"
        results.append(result)
    return results


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread and spill (local/stack) bytes of a cubin, by the ``cuobjdump`` bundled with Triton."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True, text=True).stdout
    found = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", report)}
    return {"registers": found.get("REG", 0), "spill_bytes": found.get("STACK", 0) + found.get("LOCAL", 0)}


def _distinct(launches: list[Launch]) -> list[Launch]:
    """One launch per (kernel, argument types, constexprs): the compiler sees nothing else."""
    seen, kept = set(), []
    for launch in launches:
        fn = getattr(launch.kernel, "fn", launch.kernel)
        key_args = tuple(
            (a.dtype if isinstance(a, torch.Tensor) else (type(a), a % 16 == 0 if isinstance(a, int) else None))
            for a in launch.args
        )
        key = (id(launch.kernel), id(fn), key_args, tuple(sorted((k, repr(v)) for k, v in launch.kwargs.items())))
        if key not in seen:
            seen.add(key)
            kept.append(launch)
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capability", type=int, default=90, help="CUDA compute capability to compile for (90: H100)")
    parser.add_argument("--quick", action="store_true", help="one representative per kernel, bf16 only")
    parser.add_argument("--shared-limit", type=int, help="bytes of shared memory per block (default: the card's)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled", file=sys.stderr)
        return 2

    from rich.console import Console
    from rich.table import Table

    started = time.perf_counter()
    results = [
        r
        for launch in _distinct(workload(args.quick))
        for r in compile_launch(launch, args.capability, args.shared_limit)
    ]
    table = Table(title=f"Triton kernels compiled for sm_{args.capability} (no GPU needed)")
    numeric = ("shared KiB", "regs", "spill B", "s")
    for column in ("kernel", "variant", *numeric, "result"):
        table.add_column(column, justify="right" if column in numeric else "left")
    for r in results:
        regs, spills = r.extra.get("registers", "–"), r.extra.get("spill_bytes", "–")
        table.add_row(
            r.kernel, r.variant, f"{r.shared_bytes / 1024:.0f}", str(regs), str(spills), f"{r.seconds:.1f}",
            r.error or "ok",
        )  # fmt: skip
    console = Console(width=220)
    console.print(table)
    failed = [r for r in results if r.error]
    spilling = [r for r in results if r.extra.get("spill_bytes")]
    console.print(
        f"{len(results) - len(failed)}/{len(results)} variants compile; {len(spilling)} spill registers "
        f"(slower, not wrong); {time.perf_counter() - started:.0f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
