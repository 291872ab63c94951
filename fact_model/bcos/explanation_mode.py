"""Explanation mode: detach every input-dependent factor of a model at once.

In explanation mode each dynamic-linear layer computes the same forward value, but
its input-dependent factor (``|cos|^(B-1)``, the patch norm, a norm layer's std) is
detached from autograd. Gradients then equal the rows of the dynamic matrix
``W̃(x)`` and ``y = Σ x ⊙ ∂y/∂x`` holds exactly (spec section 2).

The switch is a flag on each opt-in module, set and restored by a scoped context
manager; there is no global state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["Detachable", "explanation_mode", "in_explanation_mode", "module_flags"]


class Detachable:
    """Mixin for modules whose input-dependent factors can be detached.

    Subclasses read ``self.detach_dynamic`` in ``forward``. Mix in *before*
    ``nn.Module`` subclasses is not needed: the flag is a plain attribute.
    """

    detach_dynamic: bool = False


@contextmanager
def explanation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every :class:`Detachable` submodule of ``model`` into explanation mode.

    Restores each module's previous state on exit, also when the body raises,
    so nesting is safe.

    Example:
        >>> with explanation_mode(model):
        ...     logits = model(x)          # same values as outside
        ...     grad, = torch.autograd.grad(logits[0, c], x)   # = W̃(x)[c]
    """
    with module_flags(model, Detachable, "detach_dynamic", True):
        yield model


@contextmanager
def module_flags(model: nn.Module, kind: type, attribute: str, value: object) -> Iterator[nn.Module]:
    """For the block, set ``attribute = value`` on every submodule of ``model`` that is a ``kind``;
    each module's previous value is restored on exit, also when the body raises."""
    switched = [m for m in model.modules() if isinstance(m, kind)]
    previous = [getattr(m, attribute) for m in switched]
    for module in switched:
        setattr(module, attribute, value)
    try:
        yield model
    finally:
        for module, state in zip(switched, previous, strict=True):
            setattr(module, attribute, state)


def in_explanation_mode(model: nn.Module) -> bool:
    """True when every :class:`Detachable` submodule of ``model`` is detached."""
    flags = [m.detach_dynamic for m in model.modules() if isinstance(m, Detachable)]
    return bool(flags) and all(flags)
