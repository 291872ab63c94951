"""The library's run-time options: read from the environment once, overridden in a block.

Every choice the library makes at run time without being told at the call site lives in one
frozen :class:`Options`; this is the only module that reads the environment for them (the
service's own limits are :mod:`service.settings`).

* ``kernels`` (``FACT_KERNELS``): ``auto`` (default) uses the Triton kernels for CUDA inference
  (no autograd graph recorded) and the PyTorch reference elsewhere; ``triton`` uses them for every
  CUDA pass (and on the CPU under ``TRITON_INTERPRET=1``); ``torch`` never;
* ``bcos_conv_path`` (``FACT_BCOS_CONV_PATH``): the B-cos convolution's kernel path, ``auto``
  (timed per shape), ``fused``, ``fused_map`` or ``cudnn``;
* ``concept_encode_path`` (``FACT_CONCEPT_ENCODE_PATH``): the concept encoder's kernel path,
  ``auto`` (timed per shape), ``fused`` or ``gemm_select``;
* ``explain_vjp`` (``FACT_EXPLAIN_VJP``): how ``explain`` runs its rank passes: ``auto`` (default:
  a loop on the CPU, where it measured faster; on CUDA the faster of the two, timed once per shape),
  ``loop`` or ``batched`` (one vmapped VJP per layer);
* ``dinov2_weights`` (``FACT_DINOV2_WEIGHTS``): a local DINOv2 ViT-S/14 weights file, or unset.

Apart from these, :func:`torchrun_environment` reads the variables ``torchrun`` gives each worker
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) for
:mod:`fact_model.distributed`; they describe the launch, not a choice of the library, so they are
not fields of :class:`Options`.

The environment is read at the first :func:`current` call of the process. Code that wants
other options for a while says so explicitly::

    with fact_model.options.using(kernels="torch"):
        model(images)            # the reference path, whatever FACT_KERNELS says

The override is held in a :class:`contextvars.ContextVar`, so it applies to the thread (or
task) that entered the block and to nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = [
    "BCOS_CONV_PATHS",
    "CONCEPT_ENCODE_PATHS",
    "ENVIRONMENT",
    "EXPLAIN_VJP_MODES",
    "KERNEL_MODES",
    "TORCHRUN_VARIABLES",
    "Options",
    "TorchrunEnvironment",
    "current",
    "torchrun_environment",
    "using",
]

KERNEL_MODES = ("auto", "triton", "torch")
BCOS_CONV_PATHS = ("auto", "fused", "fused_map", "cudnn")
CONCEPT_ENCODE_PATHS = ("auto", "fused", "gemm_select")
EXPLAIN_VJP_MODES = ("auto", "loop", "batched")

ENVIRONMENT: dict[str, str] = {
    "kernels": "FACT_KERNELS",
    "bcos_conv_path": "FACT_BCOS_CONV_PATH",
    "concept_encode_path": "FACT_CONCEPT_ENCODE_PATH",
    "explain_vjp": "FACT_EXPLAIN_VJP",
    "dinov2_weights": "FACT_DINOV2_WEIGHTS",
}
"""Option field → the environment variable it is read from."""

_CHOICES: dict[str, tuple[str, ...]] = {
    "kernels": KERNEL_MODES,
    "bcos_conv_path": BCOS_CONV_PATHS,
    "concept_encode_path": CONCEPT_ENCODE_PATHS,
    "explain_vjp": EXPLAIN_VJP_MODES,
}


@dataclass(frozen=True)
class Options:
    """What the library does when a call does not say (see the module docstring for each field).

    Raises:
        ValueError: a field outside its choices, naming the field, its variable and the choices.
    """

    kernels: str = "auto"
    bcos_conv_path: str = "auto"
    concept_encode_path: str = "auto"
    explain_vjp: str = "auto"
    dinov2_weights: str | None = None

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{ENVIRONMENT[name]} ({name}) must be one of {list(choices)}, got {value!r}")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Options:
        """The options an environment sets (default: this process's); unset or empty variables take defaults.

        Choice values are case-insensitive and stripped (``FACT_KERNELS=" Torch"`` is ``torch``).
        """
        environ = os.environ if environ is None else environ
        values: dict[str, str | None] = {}
        for name, variable in ENVIRONMENT.items():
            raw = environ.get(variable, "").strip()
            if raw:
                values[name] = raw.lower() if name in _CHOICES else raw
        return cls(**values)

    def replace(self, **changes: str | None) -> Options:
        """A copy with ``changes`` applied (validated like a new object)."""
        return dataclasses.replace(self, **changes)


_OVERRIDE: ContextVar[Options | None] = ContextVar("fact_model_options", default=None)


@functools.cache
def _from_process_environment() -> Options:
    return Options.from_environ()


def current() -> Options:
    """The options in force: the innermost :func:`using` block's, else the process environment's."""
    override = _OVERRIDE.get()
    return _from_process_environment() if override is None else override


@contextlib.contextmanager
def using(options: Options | None = None, /, **changes: str | None) -> Iterator[Options]:
    """Run a block under ``options`` (default: the current ones) with ``changes`` applied; yields them.

    ``using(kernels="torch")`` changes one field; ``using(settings.options)`` installs a whole set.
    Blocks nest; leaving one restores what was in force before it.
    """
    base = current() if options is None else options
    chosen = base.replace(**changes) if changes else base
    token = _OVERRIDE.set(chosen)
    try:
        yield chosen
    finally:
        _OVERRIDE.reset(token)


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What ``torchrun`` (``python -m torch.distributed.run``) sets in every worker it starts."""


@dataclass(frozen=True)
class TorchrunEnvironment:
    """Where this process stands in a ``torchrun`` launch (see :mod:`fact_model.distributed`)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"WORLD_SIZE must be ≥ 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK must lie in [0, WORLD_SIZE = {self.world_size}), got {self.rank}")
        if self.local_rank < 0:
            raise ValueError(f"LOCAL_RANK must be ≥ 0, got {self.local_rank}")


def torchrun_environment(environ: Mapping[str, str] | None = None) -> TorchrunEnvironment | None:
    """The launch ``torchrun`` describes in ``environ`` (default: this process's), or ``None`` outside one.

    ``None`` when neither ``RANK`` nor ``WORLD_SIZE`` is set (a plain ``fact`` command). ``LOCAL_RANK``
    defaults to ``RANK``, ``MASTER_ADDR``/``MASTER_PORT`` to ``127.0.0.1:29500`` (torch's defaults).

    Raises:
        ValueError: one of ``RANK``/``WORLD_SIZE`` without the other, or a value that is not an
            integer in range (naming the variable and the value).
    """
    environ = os.environ if environ is None else environ
    raw = {name: environ.get(name, "").strip() for name in TORCHRUN_VARIABLES}
    if not raw["RANK"] and not raw["WORLD_SIZE"]:
        return None
    if not (raw["RANK"] and raw["WORLD_SIZE"]):
        missing = "RANK" if not raw["RANK"] else "WORLD_SIZE"
        raise ValueError(f"a torchrun launch sets both RANK and WORLD_SIZE; {missing} is missing")

    def integer(name: str, default: str) -> int:
        text = raw[name] or default
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {text!r}") from None

    return TorchrunEnvironment(
        rank=integer("RANK", ""),
        world_size=integer("WORLD_SIZE", ""),
        local_rank=integer("LOCAL_RANK", raw["RANK"]),
        master_addr=raw["MASTER_ADDR"] or "127.0.0.1",
        master_port=integer("MASTER_PORT", "29500"),
    )
