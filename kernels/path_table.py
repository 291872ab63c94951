"""Choosing between equivalent kernel paths by measured GPU time, once per shape.

Several operations have more than one implementation that computes the same result
(the fused B-cos convolution vs cuDNN + post-op, two concept encodes). Which is faster
depends on the shape, the dtype and the card, so the dispatchers time the candidates
the first time a key is seen and remember the winner.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable

import torch

from kernels._common import next_power_of_two

__all__ = ["PathTable", "batch_bucket", "covering_batch_sizes", "eager_median_ms"]

log = logging.getLogger(__name__)


def batch_bucket(rows: int) -> int:
    """The dispatch key's bucket of a call on ``rows`` rows: the smallest power of two ≥ ``rows`` (1 for ≤ 1).

    Calls whose batches share a bucket share one measured choice: a server batching 1…32
    requests measures 6 buckets, not 32.
    """
    return next_power_of_two(rows)


def covering_batch_sizes(largest: int) -> tuple[int, ...]:
    """Batch sizes whose calls meet every bucket that any batch of 1…``largest`` images can meet.

    The powers of two below ``largest``, and ``largest``. This holds for every layer at once,
    whatever number ``P`` of rows each image makes there (``P = 1`` for a convolution's batch,
    the positions of a feature map for the concept encode): ``batch_bucket(P·2n) = 2·batch_bucket(P·n)``,
    so the powers of two step through consecutive buckets, and the rows of the batches above the
    largest power of two end in ``batch_bucket(P·largest)`` or one bucket below it.
    """
    if isinstance(largest, bool) or not isinstance(largest, int) or largest < 1:
        raise ValueError(f"largest must be a positive int, got {largest!r}")
    sizes = []
    size = 1
    while size < largest:
        sizes.append(size)
        size *= 2
    return (*sizes, largest)


def eager_median_ms(run: Callable[[], object], warmup: int = 1, repeats: int = 3) -> float:
    """Median milliseconds of ``run()`` called eagerly on the current CUDA stream, launches included.

    For candidates that cannot be captured in a CUDA graph (autograd backward passes) and whose
    Python launch cost is part of what is compared (a loop of passes against one batched pass).
    Grad mode is left as it is.
    """
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class PathTable:
    """Per key (a layer or operator shape), the fastest of some candidate paths, measured once on the GPU."""

    def __init__(
        self, warmup: int = 2, repeats: int = 5, timer: Callable[[Callable[[], object]], float] | None = None
    ) -> None:
        """``timer`` replaces the CUDA-graph timing (milliseconds of one call of its argument), for tests."""
        self.warmup = warmup
        self.repeats = repeats
        self.timer = timer or self._median_ms
        self.choices: dict[tuple, str] = {}
        self.timings_ms: dict[tuple, dict[str, float]] = {}

    def choose(self, key: tuple, candidates: dict[str, Callable[[], object]]) -> str:
        """The name of the fastest candidate for ``key`` (timed with CUDA events at first sight)."""
        if key in self.choices:
            return self.choices[key]
        timings = {name: self.timer(run) for name, run in candidates.items()}
        best = min(timings, key=timings.__getitem__)
        self.choices[key] = best
        self.timings_ms[key] = timings
        log.debug("path %s: %s → %s", key, timings, best)
        return best

    def _median_ms(self, run: Callable[[], object]) -> float:
        """GPU time of ``run``: replays of a captured CUDA graph, so Python's launch cost doesn't decide."""
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use the GPU
                    run()
                replay: Callable[[], object] = graph.replay
            except RuntimeError:  # not capturable here: time the eager calls instead
                replay = run
            return eager_median_ms(replay, warmup=0, repeats=self.repeats)

    def clear(self) -> None:
        """Forget every measured choice."""
        self.choices.clear()
        self.timings_ms.clear()
