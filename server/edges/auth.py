"""Who may do what: token roles, the client's address behind trusted proxies, Host and Origin.

Tokens come in two roles. ``ingest`` tokens (``ingest_tokens``: the browser page, TwiML, a media
server's fork URL) may start and stream their own sessions and analyse files. ``supervisor``
tokens (``api_tokens``) may do that and also read, subscribe to and delete every session. With no
token configured at all, anyone may ingest and read (bind to loopback, as by default), and nobody
may subscribe.

Forwarded headers (``X-Forwarded-For``, ``-Proto``, ``-Host``) are believed only from
``trusted_proxies``; the client is the right-most address of the chain that is not one of them,
as Werkzeug's ProxyFix takes it, but only when the request really came through a trusted proxy.

The ``Host`` header must name this server: the bind address, loopback, or ``allowed_hosts`` — a
page on another site that rebinds its own name to 127.0.0.1 (DNS rebinding) is refused.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable
from typing import Any

from flask import Request

from server.edges.listener import in_networks, parse_networks
from server.settings import Settings

ROLES = ("ingest", "supervisor")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def token_role(settings: Settings, token: Any) -> str | None:
    """``supervisor``, ``ingest``, or None for anything that is not a configured token (a
    number, a list or an empty string included). Compared in constant time."""
    if not isinstance(token, str) or not token:
        return None
    given = token.encode()
    if any(hmac.compare_digest(given, t.encode()) for t in settings.api_tokens):
        return "supervisor"
    if any(hmac.compare_digest(given, t.encode()) for t in settings.ingest_tokens):
        return "ingest"
    return None


def allowed(settings: Settings, token: Any, need: str) -> bool:
    """Whether ``token`` may do what needs role ``need``. No tokens configured: everyone may."""
    if not settings.auth_required:
        return True
    role = token_role(settings, token)
    return role == "supervisor" or (role == "ingest" and need == "ingest")


def token_ok(settings: Settings, token: Any) -> bool:
    """A token that may ingest (any configured token), or no tokens configured."""
    return allowed(settings, token, "ingest")


def request_token(request: Request) -> str | None:
    """A token from ``Authorization: Bearer`` (the scheme in any case), ``X-API-Token`` or
    ``?token=``."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("X-API-Token") or request.args.get("token")


def _trusted(settings: Settings) -> tuple[Any, ...]:
    return parse_networks(settings.trusted_proxies)


def via_trusted_proxy(settings: Settings, environ: dict[str, Any]) -> bool:
    return bool(settings.trusted_proxies) and in_networks(
        str(environ.get("REMOTE_ADDR", "")), _trusted(settings)
    )


def client_address(settings: Settings, environ: dict[str, Any]) -> str:
    """The client's address: the peer, or behind trusted proxies the right-most hop of
    ``X-Forwarded-For`` that is not a trusted proxy."""
    peer = str(environ.get("REMOTE_ADDR", ""))
    if not via_trusted_proxy(settings, environ):
        return peer
    trusted = _trusted(settings)
    hops = [h.strip() for h in str(environ.get("HTTP_X_FORWARDED_FOR", "")).split(",")]
    for hop in reversed([h for h in hops if h]):
        if not in_networks(hop, trusted):
            return hop if _is_ip(hop) else peer
    return peer


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def public_origin(settings: Settings, environ: dict[str, Any]) -> tuple[str, str]:
    """(scheme, host) the client used: the request's own, or a trusted proxy's forwarded ones."""
    scheme = str(environ.get("wsgi.url_scheme", "http"))
    host = str(environ.get("HTTP_HOST", ""))
    if via_trusted_proxy(settings, environ):
        scheme = str(environ.get("HTTP_X_FORWARDED_PROTO", scheme)).split(",")[0].strip()
        host = str(environ.get("HTTP_X_FORWARDED_HOST", host)).split(",")[0].strip()
    return scheme, host


def host_allowed(settings: Settings, environ: dict[str, Any]) -> bool:
    """The Host header names this server (see the module's docstring). A server bound to every
    interface with no ``allowed_hosts`` takes any Host (it cannot know its public names)."""
    _, host = public_origin(settings, environ)
    name = _host_name(host)
    allowed_names = {n.lower() for n in settings.allowed_hosts}
    if name in allowed_names or "*" in allowed_names:
        return True
    if name in LOOPBACK_NAMES:
        return True
    bind = settings.host.strip("[]").lower()
    if bind in ("0.0.0.0", "::", ""):
        return not allowed_names
    return name == bind


def _host_name(host: str) -> str:
    """``example.com:8080`` -> ``example.com``; ``[::1]:5000`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def origin_allowed(settings: Settings, origin: str | None, environ: dict[str, Any]) -> bool:
    """A browser's Origin is allowed if it is the page's own (as the client reached it, through
    a trusted proxy's X-Forwarded-* too) or one of ``settings.cors_origins``. No Origin (a media
    server, a script) is allowed: Origin guards browsers only."""
    if origin is None or origin in settings.cors_origins:
        return True
    own = {"{}://{}".format(*public_origin(settings, environ))}
    own.add("{}://{}".format(environ.get("wsgi.url_scheme", "http"), environ.get("HTTP_HOST", "")))
    return origin in own


def origin_check(settings: Settings) -> Callable[[str | None, dict[str, Any]], bool]:
    """python-engineio's CORS check: the page's own origin plus ``settings.cors_origins``.

    (A list passed to python-engineio replaces its same-origin rule rather than adding to it.)
    """
    return lambda origin, environ: origin_allowed(settings, origin, environ)
