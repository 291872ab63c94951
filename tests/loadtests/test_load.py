"""A short, bounded Locust run against a real server on loopback: no request may fail."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

# Locust runs in its own process; importing it here would gevent-patch ssl inside pytest.
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is not installed"),
    pytest.mark.slow,  # a server and a locust run
]


def test_short_load_run_has_no_failures(tmp_path):
    path = Path(__file__).resolve().parents[2] / "loadtests" / "run.py"
    spec = importlib.util.spec_from_file_location("fact_load_run", path)
    load_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_run)

    # The latency goal is checked by the documented runs (docs/LOAD.md), not here: a shared CI
    # machine's timings are not a test. Failures (including any 5xx) are.
    status = load_run.main(
        ["--users", "3", "--spawn-rate", "3", "--duration", "12s", "--out", str(tmp_path), "--p95-goal-ms", "1e9",
         "--sample-every", "4"]
    )  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    endpoints = summary["endpoints"]
    total = endpoints["Aggregated"]
    assert status == 0, summary
    assert total["requests"] > 20 and total["failures"] == 0
    assert {"/predict", "/explain [png]"} <= set(endpoints)
    # Natural photographs (scikit-image's) went out alongside the dataset images, and passed the content checks.
    photos = [e for name, e in endpoints.items() if "photo" in name]
    assert photos and sum(e["requests"] for e in photos) > 0 and all(e["failures"] == 0 for e in photos)
    # The soak's per-window table: every request in a window, each window with the server's RSS.
    windows = summary["windows"]
    assert len(windows) >= 3 and sum(w["requests"] for w in windows) >= total["requests"]  # + ones finishing at stop
    assert all(w["rss_mib"] > 100 and w["p50_ms"] <= w["p95_ms"] for w in windows)
