"""``service.settings.Settings.from_env`` over a controlled environment: defaults, parsing, every refusal's message,
and ``resolve_device``."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
import torch

from service.settings import Settings

INT_VARIABLES = {
    "FACT_WORKERS": "workers",
    "FACT_MAX_REQUEST_BYTES": "max_request_bytes",
    "FACT_MAX_PIXELS": "max_pixels",
    "FACT_MAX_TOP_K": "max_top_k",
    "FACT_MAX_BATCH_ITEMS": "max_batch_items",
    "FACT_REQUEST_TIMEOUT": "request_timeout",
    "FACT_MAX_CONCURRENCY": "max_concurrency",
    "FACT_PREDICT_MAX_BATCH": "predict_max_batch",
    "FACT_PREDICT_MAX_LATENCY": "predict_max_latency_ms",
    "FACT_TORCH_THREADS": "torch_threads",
    "FACT_DECODE_CONCURRENCY": "decode_concurrency",
}
FLOAT_VARIABLES = {"FACT_BODY_TIMEOUT": "body_timeout_s", "FACT_QUEUE_BUDGET": "queue_budget_s"}


@pytest.fixture
def env(monkeypatch):
    """An environment without any FACT_* variable; returns the monkeypatch to set some."""
    for name in list(os.environ):
        if name.startswith("FACT_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults(env):
    s = Settings.from_env()
    expected = {
        "model_tag": "fact-default:latest",
        "artifact": None,
        "device": "auto",
        "workers": 1,
        "max_request_bytes": 10 * 1024 * 1024,
        "max_pixels": None,
        "max_top_k": 20,
        "max_batch_items": 16,
        "request_timeout": 30,
        "max_concurrency": 64,
        "predict_max_batch": 32,
        "predict_max_latency_ms": 500,
        "torch_threads": None,
        "runtime": "pytorch",
        "body_timeout_s": 5.0,
        "queue_budget_s": 2.0,
        "decode_concurrency": 2,
        "cors_origins": (),
    }
    assert {name: getattr(s, name) for name in expected} == expected
    assert isinstance(s.body_timeout_s, float) and isinstance(s.workers, int)


def test_every_variable_is_read_into_its_field(env):
    values = {name: str(7 + i) for i, name in enumerate(INT_VARIABLES)}
    values |= {"FACT_BODY_TIMEOUT": "0.25", "FACT_QUEUE_BUDGET": "12.5"}
    values |= {"FACT_MODEL_TAG": "fact-other:v3", "FACT_ARTIFACT": "/models/x", "FACT_DEVICE": "cpu"}
    values |= {"FACT_RUNTIME": "onnx", "FACT_CORS_ORIGINS": " https://a.example , ,https://b.example,"}
    for name, value in values.items():
        env.setenv(name, value)
    s = Settings.from_env()
    for i, (name, field) in enumerate(INT_VARIABLES.items()):
        assert getattr(s, field) == 7 + i and isinstance(getattr(s, field), int), name
    assert (s.body_timeout_s, s.queue_budget_s) == (0.25, 12.5)
    assert (s.model_tag, s.artifact, s.device, s.runtime) == ("fact-other:v3", "/models/x", "cpu", "onnx")
    assert s.cors_origins == ("https://a.example", "https://b.example")


@pytest.mark.parametrize("name", [*INT_VARIABLES, *FLOAT_VARIABLES, "FACT_ARTIFACT"])
def test_an_empty_variable_means_the_default(env, name):
    field = {**INT_VARIABLES, **FLOAT_VARIABLES, "FACT_ARTIFACT": "artifact"}[name]
    default = getattr(Settings.from_env(), field)
    env.setenv(name, "")
    assert getattr(Settings.from_env(), field) == default


def test_integers_may_carry_surrounding_whitespace(env):
    env.setenv("FACT_WORKERS", " 3 ")
    assert Settings.from_env().workers == 3


@pytest.mark.parametrize("name", list(INT_VARIABLES))
@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("abc", "must be an integer, got 'abc'"),
        ("1.5", "must be an integer, got '1.5'"),
        ("0x10", "must be an integer, got '0x10'"),
        ("0", "must be ≥ 1, got 0"),
        ("-1", "must be ≥ 1, got -1"),
    ],
)
def test_an_integer_variable_that_is_no_positive_integer_is_named_with_its_value(env, name, raw, problem):
    env.setenv(name, raw)
    with pytest.raises(ValueError) as info:
        Settings.from_env()
    also = " (or 'per-gpu': one worker per visible GPU)" if name == "FACT_WORKERS" else ""
    assert str(info.value) == f"environment variable {name} {problem}{also}"


@pytest.mark.parametrize("name", list(FLOAT_VARIABLES))
def test_a_number_variable_that_is_no_number_is_named_with_its_value(env, name):
    env.setenv(name, "soon")
    with pytest.raises(ValueError) as info:
        Settings.from_env()
    assert str(info.value) == f"environment variable {name} must be a number, got 'soon'"


@pytest.mark.parametrize("name", list(FLOAT_VARIABLES))
@pytest.mark.parametrize("raw", ["0", "-0.5"])  # nan and inf: test_a_number_variable_must_be_finite
def test_a_number_variable_not_above_0_is_refused(env, name, raw):
    env.setenv(name, raw)
    with pytest.raises(ValueError) as info:
        Settings.from_env()
    assert str(info.value) == f"environment variable {name} must be > 0, got {float(raw)}"


@pytest.mark.parametrize("raw", ["gpu", "CPU", "cuda:0", " cpu"])
def test_unknown_device_is_refused_with_the_choices(env, raw):
    env.setenv("FACT_DEVICE", raw)
    with pytest.raises(ValueError, match=re.escape(f"FACT_DEVICE must be auto, cpu or cuda, got {raw!r}")):
        Settings.from_env()


def test_empty_device_and_runtime_take_their_defaults(env):
    env.setenv("FACT_DEVICE", "")
    env.setenv("FACT_RUNTIME", "")
    settings = Settings.from_env()
    assert (settings.device, settings.runtime) == ("auto", "pytorch")


@pytest.mark.parametrize("raw", ["inf", "nan", "-inf"])
def test_a_number_variable_must_be_finite(env, raw):
    env.setenv("FACT_BODY_TIMEOUT", raw)
    with pytest.raises(ValueError) as info:
        Settings.from_env()
    assert str(info.value) == f"environment variable FACT_BODY_TIMEOUT must be a finite number, got {raw!r}"


@pytest.mark.parametrize("raw", ["tensorrt", "ONNX", "onnxruntime"])
def test_unknown_runtime_is_refused_with_the_choices(env, raw):
    env.setenv("FACT_RUNTIME", raw)
    with pytest.raises(ValueError, match=re.escape(f"FACT_RUNTIME must be pytorch or onnx, got {raw!r}")):
        Settings.from_env()


def test_settings_are_frozen(env):
    s = Settings.from_env()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.workers = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("device", "cuda", "expected"),
    [
        ("auto", False, "cpu"),
        ("auto", True, "cuda"),
        ("cpu", True, "cpu"),
        ("cpu", False, "cpu"),
        ("cuda", True, "cuda"),
    ],
)
def test_resolve_device(env, device, cuda, expected):
    env.setattr(torch.cuda, "is_available", lambda: cuda)
    assert dataclasses.replace(Settings.from_env(), device=device).resolve_device() == expected


def test_cuda_without_a_cuda_device_is_refused(env):
    env.setattr(torch.cuda, "is_available", lambda: False)
    env.setenv("FACT_DEVICE", "cuda")
    settings = Settings.from_env()  # reading the setting does not touch the device
    with pytest.raises(ValueError) as info:
        settings.resolve_device()
    assert str(info.value) == "FACT_DEVICE=cuda but no CUDA device is available"
