"""Start and stop a real ``bentoml serve`` of the service on a free loopback port (tests, benchmarks, load tests)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root (the server runs there, with it on PYTHONPATH)."""


class ServerURL(str):
    """The base URL of a running server, with the pid of its ``bentoml serve`` process as ``pid``."""

    pid: int


def _process_table() -> dict[int, tuple[int, int]]:
    """``pid → (parent pid, RSS bytes)`` of every process (Linux ``/proc``)."""
    table = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[21]) * page)  # fields 4 and 24 of /proc/PID/stat
    return table


def process_tree(pid: int, table: dict[int, tuple[int, int]] | None = None) -> set[int]:
    """``pid`` and all its descendants.

    BentoML starts its worker (the process that loads the model and serves requests) in a
    session and process group of its own, so a server's process *group* holds only the
    ``bentoml serve`` arbiter: memory and cleanup must follow the process *tree*.
    """
    table = _process_table() if table is None else table
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, (ppid, _) in table.items() if ppid == parent and child not in tree]
        tree.update(children)
        frontier.extend(children)
    return tree


def server_rss(pid: int) -> int:
    """Resident memory, in bytes, of process ``pid`` and all its descendants."""
    table = _process_table()
    return sum(table[p][1] for p in process_tree(pid, table) if p in table)


def _signal_all(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30):
    """``(status, parsed JSON or raw bytes)`` of one request (HTTP errors are returned, not raised)."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, data = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, data = err.code, err.read()
    try:
        return status, json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return status, data


def metrics_text_of(url: str) -> str:
    """The server's ``/metrics`` page as text."""
    status, body = http("GET", f"{url}/metrics")
    return body.decode() if isinstance(body, bytes) else str(body)


def post_json(url: str, payload: object, timeout: float = 30):
    return http("POST", url, json.dumps(payload).encode(), {"Content-Type": "application/json"}, timeout)


def post_multipart(url: str, fields: dict[str, str], file_field: str, filename: str, data: bytes, timeout: float = 30):
    boundary = "----factboundary7MA4YWxkTrZu0gW"
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return http("POST", url, b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout)


@contextlib.contextmanager
def running_server(
    bentoml_home: Path,
    env: dict[str, str] | None = None,
    startup_timeout: float = 120,
    readiness: list[int | None] | None = None,
    repo: Path = REPO,
) -> Iterator[ServerURL]:
    """Yield the base URL of a ready server; always stop it (its process group and every descendant) afterwards.

    ``readiness``, when given, receives the status of every ``/readyz`` poll while starting
    (None for a refused connection), polled every 0.1 s. ``repo``: the source tree to serve
    (another checkout, e.g. to measure an older version side by side).
    """
    port = free_port()
    environment = {**os.environ, "BENTOML_HOME": str(bentoml_home), "PYTHONPATH": str(repo), **(env or {})}
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = open(bentoml_home / f"server-{port}.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "service.service:FaCTService", "--host", "127.0.0.1",
         "--port", str(port)],
        cwd=repo, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = ServerURL(f"http://127.0.0.1:{port}")
    url.pid = process.pid
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}: {log.name}")
            try:
                status = http("GET", f"{url}/readyz", timeout=2)[0]
            except OSError:
                status = None
            if readiness is not None:
                readiness.append(status)
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {startup_timeout}s: {log.name}")
            time.sleep(0.1 if readiness is not None else 0.5)
        yield url
    finally:
        # The tree is read before anything stops: once the arbiter is gone its worker is re-parented.
        tree = process_tree(process.pid) - {process.pid}
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (alive := {p for p in tree if Path(f"/proc/{p}").exists()}) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_all(alive, signal.SIGKILL)  # a worker the arbiter did not stop in time
        log.close()


def jpeg_declaring(width: int, height: int) -> bytes:
    """A dimension bomb: a real 16×16 JPEG of a few hundred bytes whose header declares ``width × height``."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 20, 200)).save(buffer, format="JPEG", quality=50)
    small = buffer.getvalue()
    marker = small.index(b"\xff\xc0")  # start of frame: length (2 bytes), precision (1), height (2), width (2)
    return small[: marker + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + small[marker + 9 :]


def grey_png(width: int, height: int) -> bytes:
    """A decompression bomb: a valid grey PNG of ``width × height`` pixels in tens of kB (built without decoding)."""
    import zlib

    raw = b"".join(b"\0" + b"\x80" * width for _ in range(height))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
