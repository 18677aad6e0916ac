"""API tokens: checked on Socket.IO connect, REST calls and telephony WebSockets."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from flask import Request

from server.settings import Settings


def token_ok(settings: Settings, token: str | None) -> bool:
    """True when no tokens are configured, or ``token`` is one of them (constant-time)."""
    if not settings.auth_required:
        return True
    if not token:
        return False
    return any(hmac.compare_digest(token.encode(), t.encode()) for t in settings.api_tokens)


def request_token(request: Request) -> str | None:
    """A token from ``Authorization: Bearer``, ``X-API-Token`` or ``?token=``."""
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[7:].strip()
    return request.headers.get("X-API-Token") or request.args.get("token")


def origin_allowed(settings: Settings, origin: str | None, environ: dict[str, Any]) -> bool:
    """A browser's Origin is allowed if it is the page's own (as the client reached it, through a
    proxy's X-Forwarded-* too) or one of ``settings.cors_origins``. No Origin (a media server, a
    script) is allowed: Origin guards browsers only."""
    if origin is None or origin in settings.cors_origins:
        return True
    host = environ.get("HTTP_HOST", "")
    scheme = environ.get("wsgi.url_scheme", "http")
    own = {f"{scheme}://{host}"}
    if "HTTP_X_FORWARDED_HOST" in environ or "HTTP_X_FORWARDED_PROTO" in environ:
        fwd_scheme = environ.get("HTTP_X_FORWARDED_PROTO", scheme).split(",")[0].strip()
        fwd_host = environ.get("HTTP_X_FORWARDED_HOST", host).split(",")[0].strip()
        own.add(f"{fwd_scheme}://{fwd_host}")
    return origin in own


def origin_check(settings: Settings) -> Callable[[str | None, dict[str, Any]], bool]:
    """python-engineio's CORS check: the page's own origin plus ``settings.cors_origins``.

    (A list passed to python-engineio replaces its same-origin rule rather than adding to it.)
    """
    return lambda origin, environ: origin_allowed(settings, origin, environ)
