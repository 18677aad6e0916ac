"""Who is calling: the signatures media servers put on their WebSocket upgrade.

Twilio (``twilio_auth_token``): ``X-Twilio-Signature`` is base64(HMAC-SHA1(auth token, the full
URL Twilio requested)); a WebSocket upgrade has no form parameters to append. Behind a
TLS-terminating proxy the public URL is rebuilt from ``X-Forwarded-Proto``/``-Host``, believed
only from ``trusted_proxies`` (https → wss). Twilio may or may not have written the default
port, so both spellings are accepted, as its own helper library does.

Genesys AudioHook (``audiohook_client_secret``): an HTTP message signature (RFC 9421) with
``alg="hmac-sha256"`` whose key is the base64 client secret. It must cover ``@request-target``,
``@authority`` and the ``audiohook-organization-id``, ``-session-id``, ``-correlation-id`` and
``x-api-key`` headers; its ``keyid`` must be the API key; ``created`` may be at most
``SIGNATURE_SKEW_S`` in the future and ``SIGNATURE_MAX_AGE_S`` in the past, ``expires`` not past;
a ``nonce`` is accepted once. Every comparison of a secret runs in constant time; a refusal
says what is wrong, never the secret or the expected signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import http_sfv

SIGNATURE_SKEW_S = 3.0  # how far a signature's ``created`` may be ahead of our clock
SIGNATURE_MAX_AGE_S = 300.0  # how old a signature may be (a nonce is remembered as long)
NONCES_KEPT = 100_000  # nonces remembered at most; the oldest go first
AUDIOHOOK_COMPONENTS = (
    "@request-target",
    "@authority",
    "audiohook-organization-id",
    "audiohook-session-id",
    "audiohook-correlation-id",
    "x-api-key",
)
DEFAULT_PORTS = {"wss": "443", "https": "443", "ws": "80", "http": "80"}


class SignatureError(Exception):
    """The request's signature does not hold; the message says why (never a secret)."""


# --- Twilio ------------------------------------------------------------------------------------


def twilio_urls(scheme: str, host: str, target: str) -> list[str]:
    """The public URL as Twilio may have signed it: with and without the default port."""
    scheme = {"https": "wss", "http": "ws"}.get(scheme, scheme)
    name, _, port = host.rpartition(":") if host.rsplit(":", 1)[-1].isdigit() else (host, "", "")
    default = DEFAULT_PORTS.get(scheme, "")
    if port and port != default:
        return [f"{scheme}://{host}{target}"]
    bare = name or host
    return [f"{scheme}://{bare}{target}", f"{scheme}://{bare}:{default}{target}"]


def twilio_signature(auth_token: str, url: str) -> str:
    digest = hmac.new(auth_token.encode(), url.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def check_twilio(auth_token: str, signature: str | None, urls: list[str]) -> None:
    if not signature:
        raise SignatureError("X-Twilio-Signature is missing")
    given = signature.encode()
    if not any(hmac.compare_digest(given, twilio_signature(auth_token, u).encode()) for u in urls):
        raise SignatureError("X-Twilio-Signature does not match this URL")


# --- AudioHook (RFC 9421) ----------------------------------------------------------------------


class NonceCache:
    """Nonces seen in the last ``SIGNATURE_MAX_AGE_S``, at most ``NONCES_KEPT`` of them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._clock = clock
        self._lock = threading.Lock()

    def first_use(self, nonce: str) -> bool:
        now = self._clock()
        with self._lock:
            while self._seen and (
                len(self._seen) >= NONCES_KEPT
                or next(iter(self._seen.values())) < now - SIGNATURE_MAX_AGE_S
            ):
                self._seen.popitem(last=False)
            if nonce in self._seen:
                return False
            self._seen[nonce] = now
            return True


def _component(name: str, target: str, headers: Mapping[str, str]) -> str:
    if name == "@request-target":
        return target
    if name == "@authority":
        return headers.get("host", "").strip().lower()
    if name.startswith("@"):
        raise SignatureError(f"the signature covers {name!r}, which is not supported")
    value = headers.get(name)
    if value is None:
        raise SignatureError(f"the signature covers {name!r}, which the request lacks")
    return value.strip()


def signature_base(covered: Any, target: str, headers: Mapping[str, str]) -> bytes:
    """The RFC 9421 signature base of ``covered`` (an http_sfv inner list with parameters)."""
    lines = [f'"{item.value}": {_component(item.value, target, headers)}' for item in covered]
    lines.append(f'"@signature-params": {covered}')
    return "\n".join(lines).encode()


def check_audiohook(
    secret_b64: str,
    api_key: str | None,
    target: str,
    headers: Mapping[str, str],
    nonces: NonceCache,
    now: float,
) -> None:
    """``headers``: lower-case names. ``now``: Unix time. Raises SignatureError."""
    signature_input, signature = headers.get("signature-input"), headers.get("signature")
    if not signature_input or not signature:
        raise SignatureError("the request is not signed (Signature-Input and Signature)")
    try:
        inputs, signatures = http_sfv.Dictionary(), http_sfv.Dictionary()
        inputs.parse(signature_input.encode())
        signatures.parse(signature.encode())
    except ValueError:
        raise SignatureError("Signature-Input or Signature is not a structured field") from None
    labels = [label for label in inputs if label in signatures]
    if len(labels) != 1:
        raise SignatureError("the request must carry exactly one signature")
    covered, value = inputs[labels[0]], signatures[labels[0]].value
    params = dict(covered.params)
    names = {getattr(item, "value", None) for item in covered}
    missing = [c for c in AUDIOHOOK_COMPONENTS if c not in names]
    if missing:
        raise SignatureError(f"the signature does not cover {', '.join(missing)}")
    if params.get("alg") != "hmac-sha256":
        raise SignatureError("the signature's alg must be hmac-sha256")
    key_id = params.get("keyid")
    if (
        not isinstance(key_id, str)
        or not api_key
        or not hmac.compare_digest(key_id.encode(), api_key.encode())
    ):
        raise SignatureError("the signature's keyid is not the request's API key")
    created, expires, nonce = params.get("created"), params.get("expires"), params.get("nonce")
    if not isinstance(created, int) or not isinstance(nonce, str) or not nonce:
        raise SignatureError("the signature needs created and nonce")
    if created > now + SIGNATURE_SKEW_S or created < now - SIGNATURE_MAX_AGE_S:
        raise SignatureError("the signature's created time is not now")
    if expires is not None and (not isinstance(expires, int) or expires < now):
        raise SignatureError("the signature has expired")
    if not isinstance(value, bytes):
        raise SignatureError("Signature must be a byte sequence")
    try:
        key = base64.b64decode(secret_b64, validate=True)
    except (ValueError, binascii.Error):
        raise SignatureError("the server's client secret is not base64") from None
    expected = hmac.new(key, signature_base(covered, target, headers), hashlib.sha256).digest()
    if not hmac.compare_digest(value, expected):
        raise SignatureError("the signature does not match")
    if not nonces.first_use(nonce):
        raise SignatureError("the signature's nonce was used before")
