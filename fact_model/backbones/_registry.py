"""A small explicit registry of backbone architectures.

A builder takes keyword arguments (JSON-serialisable, recorded in the artifact
manifest) and returns a :class:`~fact_model.backbones.staged.StagedBackbone`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fact_model.backbones.staged import StagedBackbone

__all__ = ["create_backbone", "list_backbones", "register_backbone"]

BackboneBuilder = Callable[..., StagedBackbone]

_BUILDERS: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator registering ``builder`` under ``name``; raises on duplicates."""

    def decorate(builder: BackboneBuilder) -> BackboneBuilder:
        if name in _BUILDERS:
            raise ValueError(f"backbone {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder

    return decorate


def list_backbones() -> list[str]:
    """Names of every registered architecture, sorted."""
    return sorted(_BUILDERS)


def create_backbone(name: str, **kwargs: Any) -> StagedBackbone:
    """Build the architecture ``name`` with ``kwargs`` (randomly initialised).

    Raises:
        ValueError: ``name`` is not registered (the message lists valid names), or a
            keyword argument is not accepted by that architecture.
    """
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; valid: {list_backbones()}") from None
    try:
        backbone = builder(**kwargs)
    except TypeError as err:
        raise ValueError(f"invalid arguments for architecture {name!r}: {err}") from err
    backbone.arch_name = name
    backbone.arch_kwargs = dict(kwargs)
    return backbone
