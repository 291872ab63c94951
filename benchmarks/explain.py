"""Explain-throughput benchmark: ``python -m benchmarks.explain``.

Measures, in one run on the same model and batch, explanations with top-n concept
input maps by three methods, against a plain forward pass:

(a) per image: forward, ∂y/∂u by autograd, then one backward per concept
    (what a naive one-request-at-a-time server does);
(b) the research code's approach: the whole batch at once, ∂y/∂u by autograd,
    then one backward per concept rank, retaining the graph;
    (a), (b) and (b') run the same weights on the research code's stack
    (:class:`ResearchStack`: the ``bcos`` package's layers, NCHW, autograd through
    the dense concept-layer Jacobian);
(b') as (b) with all ranks in one ``is_grads_batched`` (vmap) backward, the
     alternative to a loop over ranks;
(c) ours, ``FaCTModel.explain(maps=True)``: closed-form contributions, one backward
    per rank for the whole batch;
(c') the same with ``batched_vjp=True``: all ranks in one ``torch.func.vmap``'d backward.

Prints medians (seconds per batch), images/s and the ratios the issue asks for.
``--scale`` runs :mod:`benchmarks.scale` instead (the paper's models at 224²).
Not a test: timings are recorded in ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from fact_model.bcos.encoding import encode_rgb
from fact_model.config import ConceptLayerSpec, FaCTConfig, Preprocessing
from fact_model.model import FaCTModel

__all__ = ["build_bench_model", "main", "run_benchmark"]


def build_bench_model(arch: str, width: int, size: int, num_concepts: int, k: int, num_classes: int) -> FaCTModel:
    """A random-weight FaCT model with one concept layer at the last stage."""
    torch.manual_seed(0)
    probe = FaCTConfig(
        backbone=arch,
        class_names=[f"class_{i}" for i in range(num_classes)],
        preprocessing=Preprocessing(size),
        backbone_kwargs={"width": width},
    )
    last_stage = FaCTModel(probe).backbone.stage_names[-1]
    config = FaCTConfig(
        backbone=arch,
        class_names=probe.class_names,
        preprocessing=probe.preprocessing,
        concept_layers=[ConceptLayerSpec(last_stage, num_concepts, k)],
        backbone_kwargs={"width": width},
    )
    return FaCTModel(config).eval()


class ResearchStack:
    """The same FaCT model on the research code's stack: the ``bcos`` package's own B-cos
    convolutions and uncentred batch norms (same weights), NCHW tensors, and autograd
    through the whole concept layer (dense ``TopK ∘ ReLU`` Jacobian). Variants (a), (b)
    and (b') run on this; (c) runs on ours.
    """

    def __init__(self, model: FaCTModel) -> None:
        from bcos.modules import BcosConv2d as PackageConv2d
        from bcos.modules import norms as package_norms

        from fact_model.bcos import BatchNormUncentered2d, BcosConv2d

        self.model = copy.deepcopy(model)
        swapped: dict[int, torch.nn.Module] = {}
        for parent in list(self.model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, BcosConv2d):
                    if child.dilation != (1, 1):
                        raise ValueError("the research stack supports dilation 1 only")
                    new = PackageConv2d(
                        child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                        groups=child.groups, b=child.b, max_out=child.max_out,
                    )  # fmt: skip
                elif isinstance(child, BatchNormUncentered2d):
                    new = package_norms.NoBias(package_norms.BatchNormUncentered2d)(child.num_features)
                else:
                    continue
                new.load_state_dict(child.state_dict(), strict=True)
                setattr(parent, name, new.eval())
                swapped[id(child)] = new
        backbone = self.model.backbone
        self.stages = [(name, swapped.get(id(m), m)) for name, m in backbone.stages]
        self.head = swapped[id(backbone.head)]
        self.layer = self.model.concept_layers[-1].name

    def explanation_mode(self):
        from bcos.common import explanation_mode

        return explanation_mode(self.model)

    def codes_and_contributions(self, x6: torch.Tensor) -> tuple:
        """Forward (NCHW, full graph); ``∂y_pred/∂u`` by autograd; contributions per concept."""
        h, codes = x6, None
        for name, stage in self.stages:
            h = stage(h)
            if name == self.layer:
                concept_layer = self.model.concept_layer(name)
                codes = concept_layer.encode(h)
                h = concept_layer.decode(codes)
        scores = self.head(h).mean(dim=(2, 3)) / self.model.logit_temperature
        y = scores.gather(1, scores.argmax(dim=1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(y, codes.values, retain_graph=True)
        return codes, codes.scatter(codes.values.detach() * grad)


def per_image_loop(stack: ResearchStack, images: torch.Tensor, top_n: int) -> list[torch.Tensor]:
    """(a) One image at a time; one backward per concept."""
    maps = []
    with stack.explanation_mode(), torch.enable_grad():
        for image in images:
            x6 = encode_rgb(image[None]).requires_grad_(True)
            codes, contributions = stack.codes_and_contributions(x6)
            for concept in contributions[0].topk(top_n).indices.tolist():
                activation = codes.values[codes.indices == concept].sum()
                maps.append(torch.autograd.grad(activation, x6, retain_graph=True)[0])
    return maps


def batch_rank_loop(stack: ResearchStack, images: torch.Tensor, top_n: int) -> list[torch.Tensor]:
    """(b) The batch at once; ∂y/∂u by autograd; one backward per concept rank, retaining the graph."""
    maps = []
    with stack.explanation_mode(), torch.enable_grad():
        x6 = encode_rgb(images).requires_grad_(True)
        codes, contributions = stack.codes_and_contributions(x6)
        top_ids = contributions.topk(top_n, dim=1).indices
        for rank in range(top_n):
            selected = codes.indices == top_ids[:, rank, None, None]
            activation = (codes.values * selected).sum()
            maps.append(torch.autograd.grad(activation, x6, retain_graph=True)[0])
    return maps


def batch_vmap(stack: ResearchStack, images: torch.Tensor, top_n: int) -> torch.Tensor:
    """(b') Like (b), but all ranks in one ``is_grads_batched`` (vmap) backward — the design we measured against."""
    with stack.explanation_mode(), torch.enable_grad():
        x6 = encode_rgb(images).requires_grad_(True)
        codes, contributions = stack.codes_and_contributions(x6)
        top_ids = contributions.topk(top_n, dim=1).indices
        seeds = codes.select(top_ids).movedim(1, 0)  # (R, N, P, k)
        (maps,) = torch.autograd.grad(codes.values, x6, seeds, is_grads_batched=True)
    return maps


def _interleaved_medians(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each variant, timed round-robin so that drifts in machine load hit all alike."""
    for fn in variants.values():
        fn()  # warm-up (allocator, lazy init)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_benchmark(model: FaCTModel, batch: int, top_n: int, repeats: int) -> dict[str, float]:
    """Median seconds per batch for: forward (ours, no grad), (a), (b), (b'), (c), (c')."""
    size = model.config.preprocessing.input_size
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))

    stack = ResearchStack(model)

    def forward() -> None:
        with torch.no_grad():
            model(images)

    return _interleaved_medians(
        {
            "forward": forward,
            "a_per_image_loop": lambda: per_image_loop(stack, images, top_n),
            "b_batch_rank_loop": lambda: batch_rank_loop(stack, images, top_n),
            "b_vmap": lambda: batch_vmap(stack, images, top_n),
            "c_fact_explain": lambda: model.explain(images, top_k=top_n, maps=True, map_kinds=("concepts",)),
            "c_batched_vjp": lambda: model.explain(
                images, top_k=top_n, maps=True, map_kinds=("concepts",), batched_vjp=True
            ),
        },
        repeats,
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--scale" in argv:  # the 224 px benchmark of the paper's models (benchmarks.scale)
        from benchmarks import scale

        scale.main([a for a in argv if a != "--scale"])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="bcos_resnet14", help="small backbone architecture")
    parser.add_argument("--width", type=int, default=16, help="first-stage channels")
    parser.add_argument("--size", type=int, default=32, help="input size in pixels")
    parser.add_argument("--concepts", type=int, default=256, help="concept dictionary size K")
    parser.add_argument("--k", type=int, default=8, help="active concepts per position")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--top", type=int, default=5, help="concept maps per image")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    model = build_bench_model(args.arch, args.width, args.size, args.concepts, args.k, args.classes)
    results = run_benchmark(model, args.batch, args.top, args.repeats)
    fwd, a, b, c = (results[k] for k in ("forward", "a_per_image_loop", "b_batch_rank_loop", "c_fact_explain"))

    table = Table(
        title=(
            f"explain with top-{args.top} concept maps, batch {args.batch}, {args.arch} w{args.width} "
            f"{args.size}px, K={args.concepts} k={args.k} — median of {args.repeats}"
        )
    )
    for column in ("variant", "s / batch", "images/s", "× forward", "speed-up vs (a)"):
        table.add_column(column, justify="right" if column != "variant" else "left")
    rows = [
        ("plain forward (no grad)", fwd),
        ("(a) per-image loop, 1 backward / concept", a),
        ("(b) batch, 1 backward / rank, retain graph", b),
        ("(b') batch, all ranks in 1 vmap'd backward", results["b_vmap"]),
        ("(c) FaCTModel.explain (ours)", c),
        ("(c') ours, ranks in 1 vmap'd backward", results["c_batched_vjp"]),
    ]
    for label, seconds in rows:
        ratios = f"{seconds / fwd:.2f}", f"{a / seconds:.2f}"
        table.add_row(label, f"{seconds:.4f}", f"{args.batch / seconds:.1f}", *ratios)
    console = Console()
    console.print(table)
    console.print(
        f"(c) vs (a): {a / c:.2f}×   (b) vs (a): {a / b:.2f}×   (c) vs (b): {b / c:.2f}×   "
        f"(c) / forward: {c / fwd:.2f}   torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )


if __name__ == "__main__":
    main()
