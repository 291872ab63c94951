"""Overload and bomb figures of docs/LOAD.md: what cheap abusive requests cost the server (loopback only, bounded).

    python loadtests/abuse.py                        # this checkout
    python loadtests/abuse.py --repo /tmp/old-tree   # another checkout (e.g. `git worktree add /tmp/old-tree <rev>`)

Scenarios, each on the same warmed-up server, with a thread polling ``/livez`` every 50 ms:

* ``overload``: 32 and 160 (``--callers``) concurrent ``/explain`` calls (top_k 20, PNG
  heatmaps): answers by status, the slowest refusal, the slowest success;
* ``jpeg bombs``: 16 concurrent 633-byte JPEGs declaring 5000×5000 pixels;
* ``png bombs``: 4 concurrent 25-megapixel PNGs of ~25 kB;
* ``junk paths``: 1,000 GETs of distinct unknown paths, then the size and scrape time of ``/metrics``.

For each: wall time, server RSS growth (all its processes, peak over the scenario) and the
slowest ``/livez``. Prints a table and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests._support.server import grey_png, http, jpeg_declaring, post_json, running_server, server_rss  # noqa: E402


def _sample_png() -> bytes:
    from PIL import Image

    from fact_model.data.synthetic import SyntheticConfig, render_sample

    buffer = io.BytesIO()
    Image.fromarray(render_sample(SyntheticConfig(), "test", 8)[0]).save(buffer, format="PNG")
    return buffer.getvalue()


class _Probe:
    """Polls /livez every 50 ms and the server's RSS; reports the slowest probe and the peak RSS."""

    def __init__(self, url) -> None:
        self.url, self.slowest, self.peak = url, 0.0, server_rss(url.pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                http("GET", f"{self.url}/livez", timeout=30)
            except OSError:
                pass
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.peak = max(self.peak, server_rss(self.url.pid))
            self._stop.wait(0.05)

    def stop(self) -> tuple[float, int]:
        self._stop.set()
        self._thread.join()
        return self.slowest, self.peak


def _timed_post(url: str, payload: dict) -> tuple[int | str, float]:
    started = time.monotonic()
    try:
        status = post_json(url, payload, timeout=90)[0]
    except OSError as err:
        status = type(err).__name__
    return status, time.monotonic() - started


def _scenario(url, name: str, run) -> dict:
    baseline = server_rss(url.pid)
    probe = _Probe(url)
    started = time.monotonic()
    figures = run()
    wall = time.monotonic() - started
    slowest, peak = probe.stop()
    return {"scenario": name, "wall_s": round(wall, 2), "rss_growth_mib": round((peak - baseline) / 2**20),
            "slowest_livez_s": round(slowest, 2), **figures}  # fmt: skip


def _concurrent(url: str, payloads: list[dict]) -> dict:
    with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        answers = list(pool.map(lambda p: _timed_post(url, p), payloads))
    statuses = Counter(str(s) for s, _ in answers)
    refused = [t for s, t in answers if s != 200]
    served = [t for s, t in answers if s == 200]
    return {"statuses": dict(statuses), "slowest_refusal_s": round(max(refused, default=0), 2),
            "slowest_success_s": round(max(served, default=0), 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="source tree to serve (default: this checkout)")
    parser.add_argument("--out", type=Path, default=Path("runs/abuse/summary.json"))
    parser.add_argument("--callers", type=int, nargs="+", default=[32, 160], help="concurrent /explain callers")
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="fact-abuse-"))
    env = {**os.environ, "BENTOML_HOME": str(home), "PYTHONPATH": str(args.repo)}
    subprocess.run([sys.executable, "-m", "service.store"], env=env, cwd=args.repo, check=True, capture_output=True)
    image = base64.b64encode(_sample_png()).decode()
    jpeg_bomb = base64.b64encode(jpeg_declaring(5000, 5000)).decode()
    png_bomb = base64.b64encode(grey_png(5000, 5000)).decode()
    rows = []
    with running_server(home, repo=args.repo) as url:
        for _ in range(3):
            post_json(f"{url}/explain", {"image_base64": image})
        explain = {"image_base64": image, "top_k": 20}
        for callers in args.callers:
            rows.append(_scenario(url, f"overload: {callers} × /explain",
                                  lambda n=callers: _concurrent(f"{url}/explain", [explain] * n)))  # fmt: skip
        rows.append(_scenario(url, "jpeg bombs: 16 × 633 B, 5000²",
                              lambda: _concurrent(f"{url}/explain", [{"image_base64": jpeg_bomb}] * 16)))  # fmt: skip
        rows.append(_scenario(url, "png bombs: 4 × 25 MP",
                              lambda: _concurrent(f"{url}/explain", [{"image_base64": png_bomb}] * 4)))  # fmt: skip

        def junk() -> dict:
            before = len(http("GET", f"{url}/metrics")[1])
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(lambda i: http("GET", f"{url}/junk/{i}"), range(1000)))
            started = time.monotonic()
            after = len(http("GET", f"{url}/metrics")[1])
            return {"metrics_kb_before": round(before / 1e3, 1), "metrics_kb_after": round(after / 1e3, 1),
                    "scrape_s": round(time.monotonic() - started, 3)}  # fmt: skip

        rows.append(_scenario(url, "junk paths: 1000 distinct", junk))
    for row in rows:
        print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repo": str(args.repo), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
