"""The folder path end to end on real images: ``python -m benchmarks.digits``.

scikit-learn's handwritten digits (1,797 real scans) exported as an ImageNet-layout folder
(``train/`` and ``test/``), then, with the ``fact`` CLI's default recipe for folders and no
per-dataset tuning: ``fact train backbone`` → ``fact train concepts`` → ``fact evaluate`` on the
held-out ``test/`` folder → ``fact stats`` → a real ``bentoml serve`` of the artifact answering
``/explain`` for test digits. Prints the accuracies, the largest completeness residual and the
seconds of every step. Goals (issue 14): backbone ≥ 97 % test accuracy, FaCT within 1 point of
it, exact decomposition. ``--fast`` is a smaller run of the same steps (the test suite uses it).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from fact_model.cli import main as fact

__all__ = ["main", "run"]


def _fact(*args: str) -> None:
    status = fact(["-q", *args])
    if status != 0:
        raise RuntimeError(f"fact {' '.join(args)} exited with {status}")


def _serve_and_explain(artifact: Path, folder: Path, work: Path, images: int) -> dict[str, Any]:
    from tests._support.server import http, post_json, running_server

    home = work / "bentoml"
    home.mkdir(exist_ok=True)
    env = {"FACT_ARTIFACT": str(artifact), "FACT_MODEL_TAG": "absent:latest"}
    every = sorted(folder.glob("*/*.png"))
    files = every[:: max(1, len(every) // images)][:images]  # spread over the classes
    classes = json.loads((folder / "classes.json").read_text())
    folder_to_class = dict(zip(classes["folders"], classes["class_names"], strict=True))
    worst, correct = 0.0, 0
    with running_server(home, env=env) as url:
        status, summary = http("GET", f"{url}/model")
        if status != 200:
            raise RuntimeError(f"/model answered {status}: {summary}")
        for path in files:
            payload = {"image_base64": base64.b64encode(path.read_bytes()).decode(), "top_k": 5}
            status, result = post_json(f"{url}/explain", payload)
            if status != 200:
                raise RuntimeError(f"/explain answered {status}: {result}")
            total = sum(c["contribution"] for c in result["concepts"]) + result["other"]["contribution"]
            scale = max(abs(result["explained"]), 1e-6)
            worst = max(worst, abs(total - result["explained"]) / scale, result["completeness"]["relative_residual"])
            correct += result["prediction"]["name"] == folder_to_class[path.parent.name]
    return {"served_images": len(files), "served_accuracy": correct / len(files), "served_max_relative_residual": worst}


def run(work: Path, fast: bool = False, serve: bool = True) -> dict[str, Any]:
    """Run every step under ``work``; returns the figures (see the module docstring)."""
    work.mkdir(parents=True, exist_ok=True)
    data, size = work / "digits", "16" if fast else "32"  # the scans are 8×8: 16 px loses nothing
    seconds: dict[str, float] = {}

    def step(name: str, *args: str) -> None:
        start = time.perf_counter()
        _fact(*args)
        seconds[name] = round(time.perf_counter() - start, 1)

    step("export", "data", "digits", "--out", str(data), "--size", size, "--overwrite")
    common = ["--data", str(data), "--image-size", size]
    backbone = ["--epochs", "10", "--batch-size", "32", "--arch", "bcos_resnet8", "--width", "8"] if fast else []
    step("train backbone", "train", "backbone", *common, *backbone, "--out", str(work / "backbone"))
    layer = "layer3:64:8" if fast else "layer3:256:8"
    concepts = ["--epochs", "4"] if fast else []
    step(
        "train concepts", "train", "concepts", *common, "--model", str(work / "backbone" / "model"),
        "--layer", layer, *concepts, "--out", str(work / "concepts"),
    )  # fmt: skip
    artifact = work / "concepts" / "model"
    step("evaluate (test/)", "evaluate", *common, "--model", str(artifact), "--out", str(work / "evaluation"))
    step("stats (test/)", "stats", *common, "--model", str(artifact))
    report = json.loads((work / "evaluation" / "evaluation.json").read_text())
    figures: dict[str, Any] = {
        "test_images": report["images"],
        "backbone_test_accuracy": report["backbone_accuracy"],
        "fact_test_accuracy": report["fact_accuracy"],
        "max_relative_residual": max(layer["max_relative_residual"] for layer in report["layers"]),
        "seconds": seconds,
    }
    if serve:
        start = time.perf_counter()
        figures.update(_serve_and_explain(artifact, data / "test", work, images=10 if fast else 50))
        seconds["serve + /explain"] = round(time.perf_counter() - start, 1)
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--fast", action="store_true", help="smaller model and fewer epochs (tests)")
    parser.add_argument("--no-serve", action="store_true", help="skip the bentoml serve step")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory() as tmp:
        figures = run(args.out or Path(tmp), fast=args.fast, serve=not args.no_serve)
    table = Table(title="digits (scikit-learn load_digits), folder path end to end")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        if key == "seconds":
            for name, s in value.items():
                table.add_row(f"seconds: {name}", f"{s:.1f}")
        else:
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
    gap = figures["backbone_test_accuracy"] - figures["fact_test_accuracy"]
    Console().print(
        f"goals: backbone ≥ 97 %: {'met' if figures['backbone_test_accuracy'] >= 0.97 else 'missed'}; "
        f"FaCT within 1 point ({gap * 100:+.2f} points): {'met' if gap <= 0.01 else 'missed'}; "
        f"cpu count {os.cpu_count()}"
    )
    return figures


if __name__ == "__main__":
    main()
