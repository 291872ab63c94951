"""explain()'s CUDA-only logic, checked on the CPU with stand-ins for the CUDA timing.

* ``FACT_EXPLAIN_VJP=auto``: a loop on the CPU; on CUDA the faster of loop and batched rank
  passes, timed once per key (a scripted timer replaces the CUDA timing; the two paths'
  equality is tested in test_explain.py).
* Stage timings: CUDA events on CUDA (GPU time per stage), wall time on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from fact_model import explain as explain_module
from fact_model import options
from fact_model.artifacts import load, resolve_artifact_path
from kernels.path_table import PathTable


@pytest.fixture(scope="module")
def model():
    return load(resolve_artifact_path("default"), device="cpu")


@pytest.fixture
def passes(monkeypatch):
    """Records the ``batched`` argument of every rank-pass run."""
    seen: list[bool] = []
    original = explain_module._CodeBackprop.rank_passes

    def rank_passes(self, top_ids, map_layers, batched=False):
        seen.append(batched)
        return original(self, top_ids, map_layers, batched)

    monkeypatch.setattr(explain_module._CodeBackprop, "rank_passes", rank_passes)
    return seen


def scripted_table(monkeypatch, passes: list[bool], milliseconds: dict[bool, float]) -> list[str]:
    """A fresh table whose timer runs the candidate once and reports ``milliseconds[batched]``."""
    timed: list[str] = []

    def timer(run):
        before = len(passes)
        run()
        batched = passes[before]
        timed.append("batched" if batched else "loop")
        return milliseconds[batched]

    monkeypatch.setattr(explain_module, "vjp_table", PathTable(timer=timer))
    monkeypatch.setattr(explain_module, "_measures_vjp", lambda x: True)  # as on CUDA
    return timed


def images(n: int, size: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n))


def test_auto_loops_on_the_cpu(model, passes):
    assert options.Options().explain_vjp == "auto"
    with options.using(explain_vjp="auto"):
        model.explain(images(2, model.config.preprocessing.input_size), top_k=3, maps=True)
    assert passes and not any(passes)


@pytest.mark.parametrize("faster", ["loop", "batched"])
def test_auto_keeps_the_faster_path_and_measures_each_key_once(model, passes, monkeypatch, faster):
    slow, fast = 5.0, 1.0
    timed = scripted_table(
        monkeypatch, passes, {False: fast, True: slow} if faster == "loop" else {False: slow, True: fast}
    )
    size = model.config.preprocessing.input_size
    x = images(3, size)
    with options.using(explain_vjp="auto"):
        chosen = model.explain(x, top_k=4, maps=True)
        assert timed == ["loop", "batched"]  # both timed at first sight …
        assert passes[-1] is (faster == "batched")  # … then the faster one made the explanation
        passes.clear()
        model.explain(images(4, size), top_k=3, maps=True)  # same buckets (batch 4, ranks 4): no timing
        assert timed == ["loop", "batched"] and passes == [faster == "batched"]
        model.explain(images(5, size), top_k=3, maps=True)  # batch bucket 8: a new key
        assert timed == ["loop", "batched"] * 2
    reference = model.explain(x, top_k=4, maps=True, batched_vjp=False)
    layer = reference.layer_names[-1]
    torch.testing.assert_close(chosen.maps.concepts[layer], reference.maps.concepts[layer], rtol=1e-5, atol=1e-6)
    assert explain_module.vjp_table.choices and set(explain_module.vjp_table.choices.values()) == {faster}


def test_an_explicit_mode_is_never_timed(model, passes, monkeypatch):
    timed = scripted_table(monkeypatch, passes, {False: 1.0, True: 5.0})
    with options.using(explain_vjp="batched"):
        model.explain(images(2, model.config.preprocessing.input_size), top_k=2, maps=True)
    assert timed == [] and all(passes)


def test_stage_clock_uses_cuda_events_on_cuda_and_waits_once(monkeypatch):
    """On CUDA the stage times are GPU times between events; the last event is waited for, once."""
    now = [0.0]
    waits = []

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.at = None

        def record(self) -> None:
            self.at = now[0]

        def synchronize(self) -> None:
            waits.append(self.at)

        def elapsed_time(self, other: Event) -> float:
            return other.at - self.at

    monkeypatch.setattr(explain_module.torch.cuda, "Event", Event)
    clock = explain_module._StageClock(torch.device("cuda"))
    now[0] = 4.0
    clock.mark("forward")
    now[0] = 10.5
    clock.mark("backward")
    now[0] = 11.0
    assert clock.stages_ms() == {"forward": 4.0, "backward": 6.5, "total": 11.0}
    assert waits == [11.0]


def test_stage_clock_is_wall_time_on_the_cpu(model):
    expl = model.explain(images(2, model.config.preprocessing.input_size), top_k=2, maps=True)
    timings = expl.timings_ms
    assert timings["forward"] > 0 and timings["backward"] > 0
    assert timings["total"] >= timings["forward"] + timings["backward"]
