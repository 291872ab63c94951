"""``python -m benchmarks.onnx_predict``: prediction throughput, PyTorch vs ONNX Runtime, on the default model.

Both compute the same outputs (logits, top-5 concept contributions of the predicted class,
concept totals, residual) for batches of 1 and 32 embedded-dataset test images; medians of
repeated runs, interleaved. Exports the model into a temporary copy of the artifact.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import fact_model
from fact_model.artifacts import resolve_artifact_path
from fact_model.data.synthetic import SyntheticConfig, SyntheticParts
from fact_model.onnx_export import PredictionGraph, export_onnx
from fact_model.onnx_runtime import OnnxPredictor

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    images, _, _ = SyntheticParts(SyntheticConfig(test=32), "test").tensors()
    images = images.float() / 255
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        shutil.copytree(resolve_artifact_path("default"), directory)
        export_onnx(directory)
        graph = PredictionGraph(fact_model.load(directory), 5).eval()
        session = OnnxPredictor(directory, device="cpu")
        rows = []
        for batch in (1, 32):
            x = images[:batch]
            runners = {"PyTorch": lambda x=x: graph(x), "ONNX Runtime": lambda x=x: session.run(x)}
            times = {name: [] for name in runners}
            with torch.no_grad():
                for fn in runners.values():
                    fn()
                for _ in range(args.repeats):
                    for name, fn in runners.items():
                        start = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - start)
            for name, ts in times.items():
                median = statistics.median(ts)
                rows.append((name, batch, 1e3 * median, batch / median))
    table = Table(title=f"prediction + concept decomposition, default model, median of {args.repeats}")
    for column in ("runtime", "batch", "ms / batch", "images/s"):
        table.add_column(column, justify="right")
    for name, batch, ms, throughput in rows:
        table.add_row(name, str(batch), f"{ms:.2f}", f"{throughput:.0f}")
    Console().print(table)
    Console().print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; providers {session.providers}")


if __name__ == "__main__":
    main()
