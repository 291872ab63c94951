"""Bounded, loopback-only load test: start the service, run Locust headless, summarise, stop.

    python loadtests/run.py --users 8 --spawn-rate 4 --duration 60s --mix mixed --out runs/load

Writes Locust's CSV and HTML reports and ``summary.json`` (requests/s, p50/p95/p99 per
endpoint, failures, /metrics before and after) into ``--out``; exits non-zero when any
request failed or the aggregated p95 exceeds ``--p95-goal-ms``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.harness import http, running_server  # noqa: E402


def _metrics(url: str) -> str:
    status, body = http("GET", f"{url}/metrics")
    return body.decode() if isinstance(body, bytes) else str(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--spawn-rate", type=float, default=4)
    parser.add_argument("--duration", default="60s", help="Locust --run-time (bounded)")
    parser.add_argument("--mix", choices=["mixed", "predict", "explain"], default="mixed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--p95-goal-ms", type=float, default=200.0)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "load")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "BENTOML_HOME": home, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-m", "service.store"], cwd=REPO, env=env, check=True, capture_output=True)
        with running_server(Path(home)) as url:
            assert url.startswith("http://127.0.0.1:"), url  # loopback only
            before = _metrics(url)
            locust = subprocess.run(
                [sys.executable, "-m", "locust", "-f", str(REPO / "loadtests" / "locustfile.py"), "--headless",
                 "--host", url, "-u", str(args.users), "-r", str(args.spawn_rate), "--run-time", args.duration,
                 "--csv", str(args.out / "locust"), "--html", str(args.out / "locust.html"), "--only-summary",
                 "--stop-timeout", "10"],
                cwd=REPO, env={**env, "FACT_LOAD_SEED": str(args.seed), "FACT_LOAD_MIX": args.mix},
                capture_output=True, text=True,
            )  # fmt: skip
            after = _metrics(url)
    (args.out / "locust.log").write_text(locust.stdout + locust.stderr)
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
        "endpoints": endpoints,
        "metrics_before_lines": len(before.splitlines()),
        "rejections_after": [line for line in after.splitlines() if line.startswith("fact_rejected_requests_total")],
    }
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
    return 1 if failed or slow else 0


if __name__ == "__main__":
    sys.exit(main())
