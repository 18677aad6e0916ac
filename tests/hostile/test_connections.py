"""Connections that never become requests cannot lock anyone out (hardening round 3, defect 1):
trickled headers and bodies are cut at total deadlines, transports that never authenticate are
closed, one address cannot take every connection, and a full server refuses at once, clearly.
The attacker connects from 127.0.0.2 (any 127/8 address reaches loopback), the healthy client
from 127.0.0.1, so the per-address cap tells them apart."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websocket

from tests.hostile.conftest import Healthy, stall_limit_ms, stream_once
from tests.support.client import Recorder, wait_for
from tests.support.harness import ServerProcess

pytestmark = pytest.mark.hostile

TOKEN = "connections-test-token-0123456789"
HANDSHAKE_S, BODY_S, AUTH_S = 2.0, 3.0, 2.0
MAX_CONNECTIONS, PER_ADDRESS = 150, 60
ATTACKER = "127.0.0.2"


@pytest.fixture(scope="module")
def guarded(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tiny_model_dir,
        tmp_path_factory.mktemp("connections"),
        f"--handshake-timeout-s={HANDSHAKE_S}",
        f"--body-timeout-s={BODY_S}",
        f"--auth-timeout-s={AUTH_S}",
        f"--max-connections={MAX_CONNECTIONS}",
        f"--max-connections-per-ip={PER_ADDRESS}",
        env={"VOXAFFECT_API_TOKENS": TOKEN},
    ).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def guarded_reference(guarded: ServerProcess, healthy_audio: bytes) -> list[tuple[float, float]]:
    results, _, _ = stream_once(guarded.url, healthy_audio, speed=4.0, token=TOKEN)
    return [(r["start_s"], r["end_s"]) for r in results]


def connect_from(source: str, server: ServerProcess) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.port))
    return sock


class Trickler:
    """Sockets that each send one more header byte every ``every_s`` and never finish."""

    def __init__(self, server: ServerProcess, count: int, source: str, every_s: float = 0.5):
        self.socks = [connect_from(source, server) for _ in range(count)]
        self.closed_after: dict[int, float] = {}
        self.answers: dict[int, bytes] = {}
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
        at = 0
        while not self._stop.is_set() and len(self.closed_after) < len(self.socks):
            for i, sock in enumerate(self.socks):
                if i in self.closed_after:
                    continue
                try:
                    sock.setblocking(False)
                    try:
                        data = sock.recv(4096)  # before sending: an answer, or the end
                    except BlockingIOError:
                        data = None
                    finally:
                        sock.setblocking(True)
                    if data is not None:
                        self.answers[i] = data
                        self.closed_after[i] = time.monotonic() - self.started
                        continue
                    sock.send(request[at : at + 1])
                except OSError:
                    self.closed_after[i] = time.monotonic() - self.started
            at += 1
            time.sleep(every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self.socks:
            sock.close()


def refused(server: ServerProcess, reason: str) -> float:
    return server.metric("voxaffect_connections_refused_total", reason=reason)


def test_trickled_headers_are_cut_at_the_deadline_and_one_address_gets_its_cap_only(
    guarded, healthy_audio, guarded_reference
):
    before = {r: refused(guarded, r) for r in ("per_address", "header_timeout")}
    stall = stall_limit_ms(guarded, healthy_audio, guarded_reference, token=TOKEN)
    with Healthy(guarded, healthy_audio, guarded_reference, token=TOKEN, stall_ms=stall):
        trickle = Trickler(guarded, PER_ADDRESS + 40, ATTACKER)
        try:
            wait_for(lambda: len(trickle.closed_after) == len(trickle.socks), 30, "every close")
        finally:
            trickle.stop()
        # a new client from elsewhere is served meanwhile
        client = Recorder(guarded.url, token=TOKEN)
        client.close()
    # (a socket that kept sending after the server closed it may read a reset, not the answer)
    answers = [a for a in trickle.answers.values() if a]
    over_cap = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    cut = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
    assert len(over_cap) + len(cut) == len(answers) and over_cap and cut
    assert b'"OVERLOADED"' in over_cap[0] and b"Retry-After: 5" in over_cap[0]
    # trickling renews nothing: every admitted socket was cut near the total deadline
    assert max(trickle.closed_after.values()) < HANDSHAKE_S + 3
    assert refused(guarded, "per_address") - before["per_address"] == 40
    assert refused(guarded, "header_timeout") - before["header_timeout"] == PER_ADDRESS


def test_a_full_server_refuses_new_connections_at_once_and_recovers(guarded):
    sources = [f"127.0.0.{i}" for i in range(3, 6)]
    trickles = [Trickler(guarded, PER_ADDRESS, source, every_s=0.2) for source in sources[:2]]
    try:
        # 120 held, 30 left: the third address gets 30, then the server is full for everyone
        third = [connect_from(sources[2], guarded) for _ in range(40)]
        answers = [b""] * len(third)

        def refusals() -> int:  # written at once on accept; the admitted wait for a request
            for i, sock in enumerate(third):
                if answers[i]:
                    continue
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    answers[i] = sock.recv(4096)
            return sum(a.startswith(b"HTTP/1.1 503") for a in answers)

        # well before the held connections' deadline (HANDSHAKE_S) frees room again
        wait_for(lambda: refusals() >= 10, 1.0, "ten refusals")
        full = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert len(full) == 10 and b"maximum of open connections" in full[0]
        assert b"Retry-After: 5" in full[0]
    finally:
        for t in trickles:
            t.stop()
        for sock in third:
            sock.close()
    # the held connections are cut at the deadline: the server takes new ones again
    wait_for(lambda: guarded.get("/healthz")[0] == 200, 15, "/healthz after the flood")


def test_a_slow_request_body_is_cut_at_its_total_deadline(guarded):
    sock = connect_from(ATTACKER, guarded)
    sock.sendall(
        b"POST /api/analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
    )
    started = time.monotonic()
    answer = b""
    while time.monotonic() - started < BODY_S + 10:
        try:
            sock.send(b"x")
        except OSError:
            break
        sock.setblocking(False)
        try:
            answer += sock.recv(4096)
        except BlockingIOError:
            pass
        finally:
            sock.setblocking(True)
        if answer:
            break
        time.sleep(0.3)
    elapsed = time.monotonic() - started
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "INVALID_MESSAGE"
    assert elapsed < BODY_S + 3


def test_a_transport_that_never_authenticates_is_closed(guarded):
    before = refused(guarded, "auth_timeout")
    url = f"ws://127.0.0.1:{guarded.port}/socket.io/?EIO=4&transport=websocket"
    idle = [websocket.create_connection(url, timeout=10) for _ in range(5)]
    refused_auth = websocket.create_connection(url, timeout=10)
    assert refused_auth.recv().startswith("0{")  # Engine.IO open
    refused_auth.send('40{"token":"wrong"}')  # a Socket.IO connect with a bad token
    started = time.monotonic()
    closed = []
    for ws in [*idle, refused_auth]:
        try:
            while True:  # answer pings, as a client that means to stay would; never connect
                message = ws.recv()
                if message == "2":
                    ws.send("3")
                if not message:
                    break
        except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
            pass
        finally:
            ws.shutdown()  # (close() does nothing once the server has closed it: no fd freed)
        closed.append(time.monotonic() - started)
    assert max(closed) < AUTH_S + 4
    assert refused(guarded, "auth_timeout") - before == 6
