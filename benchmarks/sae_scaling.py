"""Data-parallel SAE training throughput: ``python -m benchmarks.sae_scaling``.

Writes seeded synthetic feature shards once (each vector a sum of ``k`` random unit atoms with
random weights, plus a little noise, so the SAE has something to learn), then trains one
concept layer on them with :func:`~fact_model.training.concepts.train_sae` under
``torchrun`` (``python -m torch.distributed.run``, gloo, loopback only) for every process
count of ``--processes``, and prints a Markdown table: processes, threads per process,
seconds, feature vectors/s, speed-up over the 1-process run of the same invocation, and the
final epoch's NMSE of every run (both should converge alike).

Threads: every worker gets ``OMP_NUM_THREADS = cores // N`` (at least 1), ``cores`` being the
CPUs this process may run on, so the ``N`` workers together use the machine's cores and no
more (``--threads T`` gives every worker ``T`` instead). ``config.batch_size`` is the *global*
batch: each of ``N`` ranks steps on ``B / N`` vectors and the gradients are all-reduced, so
every run does the same optimisation work.

Timing: the first epoch is warm-up (allocation, the norm-factor pass over the shards, the
first collectives). The timed span runs from the end of epoch 1 to the end of the last epoch,
as seen by rank 0 (its ``evaluate`` callback stamps the time after every epoch; every step has
collectives, so rank 0 cannot finish ahead of the others); it includes the per-epoch checkpoint
write and barrier. ``vectors/s = vectors × (epochs − 1) / seconds``. One launch per process
count trains ``--repeats`` times (fresh checkpoint directories) and reports the median.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

SMOKE = {
    "vectors": 4096,
    "dim": 32,
    "concepts": 128,
    "k": 4,
    "batch_size": 256,
    "epochs": 3,
    "repeats": 2,
    "shard_count": 8,
}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_shards(directory: Path, vectors: int, dim: int, atoms: int, k: int, shards: int, seed: int = 0) -> None:
    """Write ``shards`` safetensors shards of ``vectors`` float32 vectors in all (``done.json`` with sizes)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, dim, generator=generator)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    sizes = [vectors // shards + (1 if i < vectors % shards else 0) for i in range(shards)]
    names = []
    for index, rows in enumerate(sizes):
        chunks = []
        for start in range(0, rows, 4096):
            n = min(4096, rows - start)
            chosen = torch.randint(0, atoms, (n, k), generator=generator)
            weights = torch.rand(n, k, generator=generator) + 0.5
            chunk = torch.bmm(weights[:, None, :], dictionary[chosen])[:, 0]
            chunks.append(chunk + 0.05 * torch.randn(n, dim, generator=generator))
        name = f"shard_{index:05d}.safetensors"
        save_file({"features": torch.cat(chunks).contiguous()}, str(directory / name))
        names.append(name)
    record = {"shards": names, "count": vectors, "dim": dim, "sizes": sizes}
    (directory / "done.json").write_text(json.dumps(record) + "\n")


def worker(args: argparse.Namespace) -> None:
    """One torchrun rank: train ``--repeats`` times; rank 0 writes the timings to ``--result``."""
    import torch

    from fact_model.config import ConceptLayerSpec
    from fact_model.distributed import session
    from fact_model.options import torchrun_environment
    from fact_model.training.concepts import ConceptTrainConfig, train_sae
    from fact_model.training.features import FeatureShards

    shards = FeatureShards.open(args.shards)
    spec = ConceptLayerSpec(layer="x", num_concepts=args.concepts, k=args.k)
    config = ConceptTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_steps=10)
    runs = []
    with session(torchrun_environment(), device="cpu") as ctx:
        for repeat in range(args.repeats):
            stamps: list[float] = []

            def evaluate(state: dict, stamps: list[float] = stamps) -> float:
                stamps.append(time.perf_counter())
                return 0.0

            ctx.barrier()
            started = time.perf_counter()
            result = train_sae(
                shards, spec, config, evaluate, Path(args.work) / f"ckpt_{repeat}", progress=False, context=ctx
            )
            ctx.barrier()
            runs.append(
                {
                    "timed_seconds": stamps[-1] - stamps[0],
                    "total_seconds": time.perf_counter() - started,
                    "nmse": [record["nmse"] for record in result.history],
                }
            )
        if ctx.is_main:
            summary = {
                "processes": ctx.world_size,
                "threads": torch.get_num_threads(),
                "vectors": shards.count,
                "epochs": args.epochs,
                "runs": runs,
            }
            Path(args.result).write_text(json.dumps(summary) + "\n")


def launch(processes: int, threads: int, args: argparse.Namespace, shard_dir: Path, work: Path) -> dict:
    """Run the workers for ``processes`` under torchrun; returns rank 0's summary."""
    result = work / f"result_{processes}.json"
    run_dir = work / f"run_{processes}"
    run_dir.mkdir()
    env = {name: value for name, value in os.environ.items() if name not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), GLOO_SOCKET_IFNAME="lo")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--max-restarts", "0",
        "-m", "benchmarks.sae_scaling", "--worker", "--shards", str(shard_dir), "--work", str(run_dir),
        "--result", str(result), "--concepts", str(args.concepts), "--k", str(args.k),
        "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--lr", str(args.lr),
        "--repeats", str(args.repeats),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    if done.returncode != 0 or not result.is_file():
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"the {processes}-process run failed (exit {done.returncode})")
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--concepts", type=int, default=4096)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4096, help="global batch (split over the processes)")
    parser.add_argument("--epochs", type=int, default=2, help="≥ 2: the first is warm-up, the rest are timed")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--shard-count", type=int, default=8, help="feature shards to write (dealt to the ranks)")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="threads per process (default: cores // processes)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, the whole run in well under a minute")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shards", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    shard_count = args.shard_count
    if args.epochs < 2:
        parser.error("--epochs must be ≥ 2 (the first epoch is not timed)")
    counts = [int(p) for p in args.processes.split(",")]
    cores = _cores()
    load = os.getloadavg()[0]

    rows = []
    with tempfile.TemporaryDirectory(prefix="sae_scaling_") as tmp:
        work = Path(tmp)
        shard_dir = work / "shards"
        shard_dir.mkdir()
        write_shards(shard_dir, args.vectors, args.dim, args.concepts, args.k, shard_count)
        for processes in counts:
            threads = args.threads or max(1, cores // processes)
            summary = launch(processes, threads, args, shard_dir, work)
            seconds = statistics.median(run["timed_seconds"] for run in summary["runs"])
            timed_vectors = summary["vectors"] * (summary["epochs"] - 1)
            rows.append(
                {
                    "processes": processes,
                    "threads": summary["threads"],
                    "seconds": seconds,
                    "all_seconds": [run["timed_seconds"] for run in summary["runs"]],
                    "vectors_per_s": timed_vectors / seconds,
                    "nmse": [run["nmse"][-1] for run in summary["runs"]],
                }
            )
    base = next((row["vectors_per_s"] for row in rows if row["processes"] == 1), None)
    for row in rows:
        row["speedup"] = row["vectors_per_s"] / base if base else math.nan

    print(
        f"SAE data-parallel training: {args.vectors} vectors × C={args.dim}, K={args.concepts}, k={args.k}, "
        f"global batch {args.batch_size}, {args.epochs} epochs (epochs 2–{args.epochs} timed), {shard_count} shards, "
        f"median of {args.repeats}; {cores} cores, threads per process = "
        + (str(args.threads) if args.threads else f"{cores} // processes")
        + f"; 1-min load average before the run {load:.2f}"
    )
    print()
    print(
        "| processes | threads / process | seconds (timed epochs) | vectors/s | speed-up vs 1 "
        "| final NMSE (each repeat) |"
    )
    print("|---:|---:|---:|---:|---:|---|")
    for row in rows:
        nmse = ", ".join(f"{value:.4f}" for value in row["nmse"])
        print(
            f"| {row['processes']} | {row['threads']} | {row['seconds']:.2f} | {row['vectors_per_s']:,.0f} | "
            f"{row['speedup']:.2f} | {nmse} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"arguments": vars(args), "cores": cores, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
