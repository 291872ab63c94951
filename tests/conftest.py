"""Shared fixtures: small random FaCT models with non-trivial norm statistics."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated (at import), so switch the CPU
# interpreter on before any test imports kernels/: without a GPU the kernels run there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fact_model.config import ConceptLayerSpec, FaCTConfig, Preprocessing
from fact_model.model import FaCTModel

NUM_CLASSES = 6


def randomise_norm_statistics(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every uncentred norm random weights and running variances (eval mode uses them)."""
    for module in model.modules():
        if hasattr(module, "running_var") and module.running_var is not None:
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) * 2 + 0.1)
        if isinstance(getattr(module, "weight", None), torch.nn.Parameter) and module.weight.ndim == 1:
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)


def make_model(
    concept_layers: list[tuple[str, int, int]],
    backbone: str = "bcos_resnet8",
    seed: int = 0,
    **backbone_kwargs: object,
) -> FaCTModel:
    """A random-weight FaCT model on the small ResNet (width 8), in eval mode."""
    torch.manual_seed(seed)
    kwargs = {"width": 8, **backbone_kwargs} if backbone.startswith("bcos_resnet") else dict(backbone_kwargs)
    config = FaCTConfig(
        backbone=backbone,
        class_names=[f"class_{i}" for i in range(NUM_CLASSES)],
        preprocessing=Preprocessing(32),
        concept_layers=[ConceptLayerSpec(name, k_total, k) for name, k_total, k in concept_layers],
        backbone_kwargs=kwargs,
    )
    model = FaCTModel(config)
    randomise_norm_statistics(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


@pytest.fixture
def images() -> torch.Tensor:
    """Four random RGB images (4, 3, 32, 32) in [0, 1]."""
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(123))


@pytest.fixture
def use_options():
    """``use_options(kernels="triton", ...)``: library options (:mod:`fact_model.options`) for the rest of a test.

    Each call nests inside the previous one; all are undone when the test ends.
    """
    from fact_model import options

    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(options.using(**changes))
