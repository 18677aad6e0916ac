"""API tokens: checked on Socket.IO connect, REST calls and telephony WebSockets."""

from __future__ import annotations

import hmac

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
