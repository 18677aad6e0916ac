"""The HTTP listener: connection limits and deadlines before a request reaches the application.

eventlet's WSGI server (with runtime.py, the only code that knows eventlet) gives each connection
a greenthread from a pool of fixed size and stops accepting while the pool is full, so sockets
that trickle a header byte every few seconds could fill it and lock every new client out. Here,
before the application sees anything:

- at accept, at most ``max_connections`` connections are open, and ``max_connections_per_ip``
  from one address (``trusted_proxies`` exempt: behind a proxy, cap per client there); one beyond
  either is answered ``503`` with a JSON error and ``Retry-After`` at once, closed and counted;
- the request line and headers must arrive within ``handshake_timeout_s`` in total, however
  slowly they trickle (an idle keep-alive connection gets the same), and a request body within
  ``body_timeout_s`` in total; past either, the connection is closed and counted.

A client's numbers never decide how long a connection is held: the deadlines are totals, not
per-read timeouts that each byte renews.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

CLOSE_CONNECTION = "voxaffect.close_connection"  # environ key: close once this answer is sent

POOL_SPARE = 16  # greenthreads beyond max_connections, so eventlet's pool never blocks accept
# The kernel's queue of connections not yet accepted: a burst beyond it has its handshakes
# dropped and retried a second later, a stall for a healthy client too (eventlet's default is 50).
LISTEN_BACKLOG = 1024
REFUSE_WRITE_S = 1.0  # how long a refusal gets to be written before the socket is closed
REFUSALS = (
    "full",
    "per_address",
    "header_timeout",
    "body_timeout",
    "auth_timeout",
    "host",  # server/edge_guard.py
    "bad_upgrade",
)


def parse_networks(
    values: Iterable[str],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Addresses or CIDR blocks (``10.0.0.0/8``); ValueError names a bad one."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network") from None
    return tuple(out)


def in_networks(address: str, networks: tuple[Any, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    max_connections: int
    max_connections_per_ip: int
    handshake_timeout_s: float
    body_timeout_s: float
    exempt: tuple[Any, ...] = ()  # networks the per-address cap does not apply to


class ConnectionCounts:
    """Open connections, in total and per address; thread-safe, though used from one hub."""

    def __init__(self, limits: ListenerLimits) -> None:
        self.limits = limits
        self.total = 0
        self.by_address: Counter[str] = Counter()
        self._lock = threading.Lock()

    def admit(self, address: str) -> str | None:
        """None if the connection may open (and it is counted), else why not."""
        with self._lock:
            if self.total >= self.limits.max_connections:
                return "full"
            capped = not in_networks(address, self.limits.exempt)
            if capped and self.by_address[address] >= self.limits.max_connections_per_ip:
                return "per_address"
            self.total += 1
            self.by_address[address] += 1
            return None

    def release(self, address: str) -> None:
        with self._lock:
            self.total -= 1
            self.by_address[address] -= 1
            if self.by_address[address] <= 0:
                del self.by_address[address]


def refusal(status: str, code: str, message: str, retry_after_s: int | None = None) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [
        f"HTTP/1.1 {status}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if retry_after_s is not None:
        head.append(f"Retry-After: {retry_after_s}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


REFUSED_FULL = refusal(
    "503 Service Unavailable",
    "OVERLOADED",
    "the server holds its maximum of open connections; retry shortly",
    retry_after_s=5,
)
REFUSED_PER_ADDRESS = refusal(
    "503 Service Unavailable",
    "OVERLOADED",
    "too many open connections from this address",
    retry_after_s=5,
)
TIMED_OUT = refusal("408 Request Timeout", "INVALID_MESSAGE", "the request took too long to arrive")
URI_TOO_LONG = refusal("414 URI Too Long", "INVALID_MESSAGE", "the request line is too long")
HEADERS_TOO_LARGE = refusal(
    "431 Request Header Fields Too Large", "INVALID_MESSAGE", "the request headers are too large"
)
# http.server's own errors (a malformed request line, say), as JSON like every other error
ERROR_FORMAT = '{"error": {"code": "INVALID_MESSAGE", "message": "%(message)s"}}\n'


def _json_string(text: str) -> str:
    return json.dumps(text)[1:-1]


def serve(
    app: Any,
    *,
    host: str,
    port: int,
    limits: ListenerLimits,
    socket_timeout_s: float,
    on_refused: Callable[[str], None],
) -> None:
    """Serve ``app`` (WSGI) on host:port under eventlet until the process ends."""
    import eventlet
    import eventlet.wsgi
    from eventlet.green import socket

    counts = ConnectionCounts(limits)
    family = socket.getaddrinfo(host, port)[0][0]
    listening = eventlet.listen(
        (host, port), family, backlog=max(LISTEN_BACKLOG, limits.max_connections + POOL_SPARE)
    )
    eventlet.wsgi.server(
        _GuardedSocket(listening, counts, on_refused),
        app,
        log_output=False,
        max_size=limits.max_connections + POOL_SPARE,
        protocol=_protocol(counts, on_refused),
        keepalive=limits.handshake_timeout_s,
        socket_timeout=socket_timeout_s,
    )


class _GuardedSocket:
    """The listening socket as eventlet's server sees it: ``accept`` answers only connections
    within the limits; the others are refused in a greenthread of their own."""

    def __init__(self, sock: Any, counts: ConnectionCounts, on_refused: Callable[[str], None]):
        self._sock = sock
        self._counts = counts
        self._on_refused = on_refused

    def accept(self) -> tuple[Any, Any]:
        import eventlet

        while True:
            conn, addr = self._sock.accept()
            reason = self._counts.admit(str(addr[0]))
            if reason is None:
                return conn, addr
            self._on_refused(reason)
            answer = REFUSED_FULL if reason == "full" else REFUSED_PER_ADDRESS
            eventlet.spawn_n(_answer_and_close, conn, answer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _answer_and_close(conn: Any, answer: bytes) -> None:
    try:
        conn.settimeout(REFUSE_WRITE_S)
        conn.sendall(answer)
    except OSError:
        pass
    finally:
        conn.close()


class _HeaderDeadline(Exception):
    """The request line and headers did not arrive in time."""


def _protocol(counts: ConnectionCounts, on_refused: Callable[[str], None]) -> type:
    import eventlet
    import eventlet.wsgi

    limits = counts.limits
    # eventlet writes this constant as it is; its plain-text body is the only one left otherwise
    eventlet.wsgi.RESPONSE_414 = URI_TOO_LONG

    class GuardedProtocol(eventlet.wsgi.HttpProtocol):
        """eventlet's HTTP protocol with total deadlines and JSON errors; releases its
        connection's count."""

        error_message_format = ERROR_FORMAT
        error_content_type = "application/json"

        def send_error(
            self, code: int, message: str | None = None, explain: str | None = None
        ) -> None:
            super().send_error(code, _json_string(message or ""), explain)

        def parse_request(self) -> bool:
            try:
                parsed: bool = super().parse_request()
            except (eventlet.wsgi.HeaderLineTooLong, eventlet.wsgi.HeadersTooLarge):
                self.wfile.write(HEADERS_TOO_LARGE)
                self.close_connection = 1
                return False
            return parsed

        def __init__(self, conn_state: Any, server: Any) -> None:
            address = str(conn_state[0][0])
            try:
                super().__init__(conn_state, server)
            finally:
                counts.release(address)

        def handle_one_request(self) -> None:
            self._deadline = eventlet.Timeout(limits.handshake_timeout_s, _HeaderDeadline())
            try:
                super().handle_one_request()
                if getattr(self, "environ", {}).pop(CLOSE_CONNECTION, False):
                    self.close_connection = 1  # a refusal at the edge (server/edges/edge_guard.py)
            except _HeaderDeadline:
                on_refused("header_timeout")
                self.close_connection = 1
                try:
                    self.wfile.write(TIMED_OUT)
                    self.wfile.flush()
                except OSError:
                    pass
            finally:
                self._deadline.cancel()

        def get_environ(self) -> dict[str, Any]:
            # The headers are in: the application's time starts here, with the body's deadline.
            self._deadline.cancel()
            environ: dict[str, Any] = super().get_environ()
            environ["wsgi.input"] = _DeadlineInput(
                environ["wsgi.input"], limits.body_timeout_s, on_refused
            )
            return environ

    return GuardedProtocol


class BodyTimeout(Exception):
    """A request body did not arrive within ``body_timeout_s``."""


class _DeadlineInput:
    """A request body whose reads together may take at most ``seconds``."""

    def __init__(self, inner: Any, seconds: float, on_refused: Callable[[str], None]) -> None:
        import time

        self._inner = inner
        self._until = time.monotonic() + seconds
        self._on_refused = on_refused

    def _call(self, name: str, *args: Any) -> Any:
        import time

        import eventlet

        remaining = self._until - time.monotonic()
        if remaining <= 0:
            self._expired()
        try:
            with eventlet.Timeout(remaining, BodyTimeout()):
                return getattr(self._inner, name)(*args)
        except BodyTimeout:
            self._expired()

    def _expired(self) -> None:
        from werkzeug.exceptions import RequestTimeout

        self._on_refused("body_timeout")
        raise RequestTimeout("the request body took too long to arrive")

    def read(self, *args: Any) -> bytes:
        data: bytes = self._call("read", *args)
        return data

    def readline(self, *args: Any) -> bytes:
        data: bytes = self._call("readline", *args)
        return data

    def readlines(self, *args: Any) -> list[bytes]:
        data: list[bytes] = self._call("readlines", *args)
        return data

    def __iter__(self) -> Any:
        while True:
            line = self.readline()
            if not line:
                return
            yield line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
