"""The library's run-time options: read from the environment once, overridden in a block, nowhere else."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

import fact_model
from fact_model import options
from fact_model.options import ENVIRONMENT, Options

PACKAGE = Path(fact_model.__file__).resolve().parent


def test_from_environ_reads_every_variable_and_defaults_the_rest():
    environ = {
        "FACT_KERNELS": "TORCH",
        "FACT_BCOS_CONV_PATH": " cudnn ",
        "FACT_CONCEPT_ENCODE_PATH": "",  # empty: the default
        "FACT_EXPLAIN_VJP": "batched",
        "FACT_DINOV2_WEIGHTS": "/weights/Dino.pth",  # a path keeps its case
        "UNRELATED": "x",
    }
    got = Options.from_environ(environ)
    assert got == Options(
        kernels="torch",
        bcos_conv_path="cudnn",
        concept_encode_path="auto",
        explain_vjp="batched",
        dinov2_weights="/weights/Dino.pth",
    )
    assert Options.from_environ({}) == Options()
    assert set(ENVIRONMENT) == {f.name for f in Options.__dataclass_fields__.values()}


@pytest.mark.parametrize(
    ("field", "value"),
    [("kernels", "fast"), ("bcos_conv_path", "gpu"), ("concept_encode_path", "cublas"), ("explain_vjp", "vmap")],
)
def test_a_bad_value_names_the_variable_the_field_and_the_choices(field, value):
    with pytest.raises(ValueError, match=rf"^{ENVIRONMENT[field]} \({field}\) must be one of \[.*\], got '{value}'$"):
        Options.from_environ({ENVIRONMENT[field]: value})
    with pytest.raises(ValueError, match=rf"\({field}\) must be one of"):
        Options().replace(**{field: value})


def test_using_nests_restores_and_stays_in_its_thread():
    before = options.current()
    seen_in_thread = []
    with options.using(kernels="torch") as outer:
        assert options.current() is outer and outer.kernels == "torch"
        with options.using(explain_vjp="batched") as inner:  # changes apply on top of what is in force
            assert (inner.kernels, inner.explain_vjp) == ("torch", "batched")
            thread = threading.Thread(target=lambda: seen_in_thread.append(options.current()))
            thread.start()
            thread.join()
        assert options.current() is outer
        with options.using(Options(concept_encode_path="fused")) as whole:  # a whole set replaces, not merges
            assert whole.kernels == "auto"
    assert options.current() == before
    assert seen_in_thread == [before]  # another thread keeps the process's options


def test_no_module_of_the_library_reads_the_environment_but_the_options_module():
    readers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if re.search(r"os\.environ|os\.getenv|getenv\(", text) and path.name != "options.py":
            readers.append(str(path.relative_to(PACKAGE)))
    assert readers == []


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # the reference decode's backward under vmap
def test_the_engine_runs_the_model_under_its_settings_options(monkeypatch):
    """``Settings.options`` reaches explain(): the engine's explanations follow its explain_vjp, not the process's."""
    from dataclasses import replace

    from fact_model.artifacts import resolve_artifact_path
    from fact_model.explain import _CodeBackprop
    from service.engine import Engine
    from service.settings import SETTINGS

    settings = replace(SETTINGS, device="cpu", options=Options(explain_vjp="batched"))
    engine = Engine(resolve_artifact_path("default"), settings, "fact-default", "test")
    batched_flags = []
    original = _CodeBackprop.rank_passes

    def recording(self, top_ids, map_layers, batched=False):
        batched_flags.append(batched)
        return original(self, top_ids, map_layers, batched)

    monkeypatch.setattr(_CodeBackprop, "rank_passes", recording)
    from PIL import Image

    image = Image.new("RGB", (48, 48), (200, 40, 40))
    result = engine.explain(image, None, None, 2, None, "none", "bcos")
    assert batched_flags == [True]
    assert options.current().explain_vjp == "auto"  # the engine's options stayed inside its call
    assert result["completeness"]["residual"] <= 1e-4 * max(1.0, abs(result["explained"]))
