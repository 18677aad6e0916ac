"""Run the real server in a subprocess on a free port, and talk to it."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent


def under_eventlet(
    script: str, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter. eventlet is never imported into the test process:
    once it is, socketserver-based receivers there stop answering some requests (tests/conftest.py
    refuses it)."""
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _port_slice() -> range:
    """This process's ports: below the kernel's ephemeral range, split between xdist workers.
    A port from the ephemeral range (what binding port 0 gives) can be handed to an outgoing
    connection in the seconds before a server binds it (that failed a server's start)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    base = min(10000, low // 2)
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    span = (low - base) // max(workers, 1)
    return range(base + worker * span, base + (worker + 1) * span)


_PORTS = _port_slice()
_next_port = _PORTS.start + os.getpid() % len(_PORTS)  # runs one after another start apart


# ports Chromium refuses to open (ERR_UNSAFE_PORT; net/base/port_util.cc), above 1024: a page
# test given 10080 failed
BROWSER_UNSAFE_PORTS = frozenset(
    {1719, 1720, 1723, 2049, 3659, 4045, 4190, 5060, 5061, 6000, 6566, 6679, 6697, 10080}
    | set(range(6665, 6670))
)


def free_port() -> int:
    """A port nobody is bound to, never handed out twice by this process, that a browser opens."""
    global _next_port
    for _ in range(len(_PORTS)):
        port, _next_port = _next_port, _PORTS.start + (_next_port + 1 - _PORTS.start) % len(_PORTS)
        if port in BROWSER_UNSAFE_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS}")


class ServerProcess:
    def __init__(
        self,
        model_dir: Path,
        workdir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        db: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.db = db or workdir / "voxaffect.db"
        self.log_path = workdir / f"server-{self.port}.log"
        self.args = [
            "--model",
            str(model_dir),
            "--port",
            str(self.port),
            "--db",
            str(self.db),
            "--dtype",
            "fp32",
            "--drain-timeout-s=0",  # stop() stops at once; a drain test sets its own
            *args,
        ]
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            # never the user's own; one per test checkpoint, so only a worker's first server
            # measures (2-4 s and a core's load, under a full run, for every other start)
            "VOXAFFECT_TUNING_CACHE": str(model_dir.parent / "tuning.json"),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120.0) -> ServerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", *self.args],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, body = self.get("/readyz")
                if status == 200 and body.get("ready"):
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def request(
        self,
        path: str,
        *,
        token: str | None = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        method: str | None = None,
    ) -> tuple[int, bytes, dict[str, str]]:
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={**(headers or {})}
        )
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read(), dict(err.headers)

    def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        status, body, _ = self.request(path, token=token)
        return status, json.loads(body) if body.startswith((b"{", b"[")) else body

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from /metrics (0.0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        _, body, _ = self.request("/metrics")
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0


def multipart(field: str, filename: str, content: bytes) -> tuple[bytes, str]:
    boundary = "voxaffect-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server on loopback (no persistence); yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [
            *(shutil.which("redis-server") or "redis-server", "--port", str(port)),
            *("--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


class Receiver:
    """A local webhook endpoint: answers each POST with the next status in ``statuses``; with
    ``hang``, holds every request open until closed."""

    def __init__(
        self,
        statuses: list[int] | None = None,
        hang: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.got: list[tuple[dict, bytes]] = []
        self.statuses = statuses or []
        self.times: list[float] = []
        self.closed = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.got.append((dict(self.headers), body))
                outer.times.append(time.monotonic())
                if hang:
                    outer.closed.wait()
                    return
                self.send_response(outer.statuses.pop(0) if outer.statuses else 204)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.timeout = 0.05
        self.server.daemon_threads = True
        # handle_request in a loop, so close() never waits on serve_forever's shutdown handshake
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed.is_set():
            self.server.handle_request()

    def close(self) -> None:
        self.closed.set()
        self.server.server_close()
