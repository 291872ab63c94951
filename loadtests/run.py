"""Bounded, loopback-only load test: start the service, run Locust headless, summarise, stop.

    python loadtests/run.py --users 8 --spawn-rate 4 --duration 60s --mix mixed --out runs/load

Writes Locust's CSV and HTML reports and ``summary.json`` (requests/s, p50/p95/p99 per
endpoint, failures, /metrics before and after) into ``--out``; exits non-zero when any
request failed or the aggregated p95 exceeds ``--p95-goal-ms``.

Soak (``make soak``): ``--throughput`` fixes each user's task rate (an open, steady load) and
``--sample-every 60`` adds a per-window table to the summary: requests/s, failures and
p50/p95/p99 of the requests completed in each window, and the server's resident memory (all
its processes) at the window's end; the run then also fails when the last RSS sample exceeds
``--max-rss-growth`` × the first.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests._support.server import http, running_server, server_rss  # noqa: E402

log = logging.getLogger("loadtests.run")


def _metrics(url: str) -> str:
    status, body = http("GET", f"{url}/metrics")
    return body.decode() if isinstance(body, bytes) else str(body)


def _run_locust(command: list[str], env: dict, sample_every: float | None, server_pid: int) -> tuple:
    """Run Locust to completion; every ``sample_every`` s record the server's RSS. → (process, output, samples)."""
    started = time.monotonic()
    samples = [{"t_s": 0.0, "rss_bytes": server_rss(server_pid)}]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not sample_every:
        output, _ = process.communicate()
        return process, output, samples
    while True:
        try:
            output, _ = process.communicate(timeout=sample_every - (time.monotonic() - started) % sample_every)
            break
        except subprocess.TimeoutExpired:
            samples.append({"t_s": round(time.monotonic() - started, 1), "rss_bytes": server_rss(server_pid)})
            log.info("t=%.0f s: server RSS %.0f MiB", samples[-1]["t_s"], samples[-1]["rss_bytes"] / 2**20)
    samples.append({"t_s": round(time.monotonic() - started, 1), "rss_bytes": server_rss(server_pid)})
    return process, output, samples


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--spawn-rate", type=float, default=4)
    parser.add_argument("--duration", default="60s", help="Locust --run-time (bounded)")
    parser.add_argument("--mix", choices=["mixed", "predict", "explain"], default="mixed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--p95-goal-ms", type=float, default=200.0)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "load")
    parser.add_argument("--throughput", type=_positive, help="tasks per second per user (default: closed loop)")
    parser.add_argument("--sample-every", type=_positive, metavar="SECONDS", help="per-window latency and RSS table")
    parser.add_argument("--max-rss-growth", type=_positive, default=1.2, help="with --sample-every: last/first RSS")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    windows_path = args.out / "windows.json"
    windows_path.unlink(missing_ok=True)

    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "BENTOML_HOME": home, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-m", "service.store"], cwd=REPO, env=env, check=True, capture_output=True)
        with running_server(Path(home)) as url:
            assert url.startswith("http://127.0.0.1:"), url  # loopback only
            before = _metrics(url)
            locust_env = {**env, "FACT_LOAD_SEED": str(args.seed), "FACT_LOAD_MIX": args.mix}
            if args.throughput:
                locust_env["FACT_LOAD_THROUGHPUT"] = str(args.throughput)
            if args.sample_every:
                locust_env.update(FACT_LOAD_WINDOWS=str(windows_path), FACT_LOAD_WINDOW_S=str(args.sample_every))
            locust, output, rss_samples = _run_locust(
                [sys.executable, "-m", "locust", "-f", str(REPO / "loadtests" / "locustfile.py"), "--headless",
                 "--host", url, "-u", str(args.users), "-r", str(args.spawn_rate), "--run-time", args.duration,
                 "--csv", str(args.out / "locust"), "--html", str(args.out / "locust.html"), "--only-summary",
                 "--stop-timeout", "10"],
                locust_env, args.sample_every, url.pid,
            )  # fmt: skip
            after = _metrics(url)
    (args.out / "locust.log").write_text(output)
    rows = list(csv.DictReader((args.out / "locust_stats.csv").open()))
    endpoints = {
        row["Name"]: {
            "requests": int(row["Request Count"]),
            "failures": int(row["Failure Count"]),
            "requests_per_s": float(row["Requests/s"]),
            "p50_ms": float(row["50%"]),
            "p95_ms": float(row["95%"]),
            "p99_ms": float(row["99%"]),
        }
        for row in rows
    }
    total = endpoints.get("Aggregated", {})
    summary = {
        "users": args.users,
        "duration": args.duration,
        "mix": args.mix,
        "seed": args.seed,
        "throughput_per_user": args.throughput,
        "endpoints": endpoints,
        "metrics_before_lines": len(before.splitlines()),
        "rejections_after": [line for line in after.splitlines() if line.startswith("fact_rejected_requests_total")],
    }
    rss_growth_ok = True
    if args.sample_every:
        windows = json.loads(windows_path.read_text())["windows"] if windows_path.exists() else []
        for window in windows:  # the RSS sample closest to the window's end
            end = window["start_s"] + args.sample_every
            window["rss_mib"] = round(min(rss_samples, key=lambda s: abs(s["t_s"] - end))["rss_bytes"] / 2**20, 1)
        summary["windows"] = windows
        summary["rss_mib"] = [round(s["rss_bytes"] / 2**20, 1) for s in rss_samples]
        summary["rss_samples_t_s"] = [s["t_s"] for s in rss_samples]
        # The first sample under load (the one before Locust started is the idle server) against the last.
        first, last = rss_samples[1 if len(rss_samples) > 2 else 0]["rss_bytes"], rss_samples[-1]["rss_bytes"]
        rss_growth_ok = last <= args.max_rss_growth * first
        summary["rss_growth"] = round(last / first, 3)
        print(f"{'window':>8s} {'span':>6s} {'req/s':>7s} {'fail':>5s} {'p50':>6s} {'p95':>6s} {'p99':>6s} RSS MiB")
        for w in windows:
            print(
                f"{w['start_s']:7.0f}s {w['span_s']:5.0f}s {w['requests_per_s']:7.1f} {w['failures']:5d} "
                f"{w['p50_ms']:6.0f} {w['p95_ms']:6.0f} {w['p99_ms']:6.0f} {w['rss_mib']:8.1f}"
            )
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, e in endpoints.items():
        print(
            f"{name:28s} {e['requests']:6d} req {e['failures']:4d} fail {e['requests_per_s']:7.1f} req/s "
            f"p50 {e['p50_ms']:6.0f} p95 {e['p95_ms']:6.0f} p99 {e['p99_ms']:6.0f} ms"
        )
    failed = total.get("failures", 1) > 0 or locust.returncode not in (0, 1)
    slow = total.get("p95_ms", float("inf")) > args.p95_goal_ms
    if failed:
        print("FAILED: some requests failed (see locust.log / locust_failures.csv)")
    if slow:
        print(f"FAILED: aggregated p95 {total.get('p95_ms')} ms > goal {args.p95_goal_ms} ms")
    if not rss_growth_ok:
        print(f"FAILED: server RSS grew {summary['rss_growth']}× during the run (> {args.max_rss_growth}×)")
    return 1 if failed or slow or not rss_growth_ok else 0


if __name__ == "__main__":
    sys.exit(main())
