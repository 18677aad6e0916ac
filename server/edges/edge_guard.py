"""The outermost WSGI layer, in front of Engine.IO, the telephony WebSockets and the HTTP API:
requests that are not for this server, or not well-formed upgrades, are answered here.

- ``Host`` must name this server (server/edges/auth.py: the bind address, loopback or
  ``allowed_hosts``): otherwise ``421`` — a page whose own name was rebound to 127.0.0.1 (DNS
  rebinding) cannot read the API or open a WebSocket of a server without tokens.
- A WebSocket upgrade must carry ``Sec-WebSocket-Key`` and version 13 (RFC 6455): otherwise
  ``400`` or ``426`` with ``Sec-WebSocket-Version: 13``, instead of a traceback deeper down.

Every refusal is JSON, ``{"error": {"code", "message"}}``, counted, and closes its connection: a
client refused an upgrade must not keep the socket (and its slot) until the keep-alive timeout.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from server.edges.auth import host_allowed
from server.edges.listener import CLOSE_CONNECTION
from server.settings import Settings

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def json_error(
    start_response: StartResponse,
    status: str,
    code: str,
    message: str,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            *(headers or []),
        ],
    )
    return [body]


class EdgeGuard:
    def __init__(self, app: WsgiApp, settings: Settings, on_refused: Callable[[str], None]):
        self.app = app
        self.settings = settings
        self._on_refused = on_refused

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        def refuse(
            status: str, message: str, headers: tuple[tuple[str, str], ...] = ()
        ) -> list[bytes]:
            environ[CLOSE_CONNECTION] = True
            return json_error(
                start_response,
                status,
                "INVALID_MESSAGE",
                message,
                [("Connection", "close"), *headers],
            )

        if not host_allowed(self.settings, environ):
            self._on_refused("host")
            host = str(environ.get("HTTP_HOST", ""))[:80]
            return refuse(
                "421 Misdirected Request",
                f"this server does not answer to host {host!r} (allowed_hosts)",
            )
        if str(environ.get("HTTP_UPGRADE", "")).lower() == "websocket":
            if not environ.get("HTTP_SEC_WEBSOCKET_KEY"):
                self._on_refused("bad_upgrade")
                return refuse(
                    "400 Bad Request",
                    "a WebSocket upgrade needs Sec-WebSocket-Key",
                )
            if str(environ.get("HTTP_SEC_WEBSOCKET_VERSION", "")).strip() != "13":
                self._on_refused("bad_upgrade")
                return refuse(
                    "426 Upgrade Required",
                    "only WebSocket version 13 is spoken here",
                    (("Sec-WebSocket-Version", "13"),),
                )
        return self.app(environ, start_response)
