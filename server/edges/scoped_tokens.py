"""Short-lived scoped tokens for browsers: the integrator's backend mints, the browser uses.

``POST /api/tokens`` (a supervisor token) mints a JWT (HS256 under ``token_signing_key``) that
lets one Socket.IO connection do one thing for a few minutes:

- ``start``: start one session (with ``session_id``, that id only); the token is used once;
- ``resume``: resume that session (its ``resume_token`` still required);
- ``subscribe``: receive that session's results.

It is accepted on the Socket.IO connect and where its scope applies, nowhere else (no HTTP route
takes it). An expired, tampered, reused or out-of-scope token is refused with ``UNAUTHORIZED``
and counted in ``voxaffect_scoped_tokens_refused_total{reason}``. Without ``token_signing_key``
each process signs with a random key of its own: its tokens hold on that node only.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt

from server.edges.protocol import ProtocolError, valid_id

SCOPES = ("start", "resume", "subscribe")
ISSUER = "voxaffect"
ALGORITHM = "HS256"
USED_KEPT = 100_000  # single-use ids remembered at most (each until its token expires)


@dataclass(frozen=True, slots=True)
class Scope:
    scope: str
    session_id: str | None
    token_id: str
    expires_at: float


class ScopedTokens:
    def __init__(
        self,
        key: str,
        max_ttl_s: float,
        on_refused: Callable[[str], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key or secrets.token_urlsafe(32)
        self.node_local = not key
        self.max_ttl_s = max_ttl_s
        self._on_refused = on_refused
        self._clock = clock
        self._used: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def looks_scoped(token: Any) -> TypeGuard[str]:
        return isinstance(token, str) and token.count(".") == 2 and token.startswith("eyJ")

    def mint(self, request: Any) -> dict[str, Any]:
        """A token for ``{scope, session_id?, ttl_s?}``; ProtocolError for a bad request."""
        if not isinstance(request, dict):
            raise ProtocolError("INVALID_MESSAGE", "send {scope, session_id?, ttl_s?} as JSON")
        scope, session_id = request.get("scope"), request.get("session_id")
        if scope not in SCOPES:
            raise ProtocolError("INVALID_MESSAGE", f"scope must be one of {', '.join(SCOPES)}")
        if session_id is not None and not valid_id(session_id):
            raise ProtocolError("INVALID_MESSAGE", "session_id is 1-128 letters, digits or ._:-")
        if scope != "start" and session_id is None:
            raise ProtocolError("INVALID_MESSAGE", f"a {scope} token names its session_id")
        ttl = request.get("ttl_s", self.max_ttl_s)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
            raise ProtocolError("INVALID_MESSAGE", "ttl_s must be a positive number of seconds")
        now = self._clock()
        expires = int(now + min(float(ttl), self.max_ttl_s))
        claims = {
            "iss": ISSUER,
            "scope": scope,
            "sid": session_id,
            "jti": secrets.token_urlsafe(12),
            "iat": int(now),
            "exp": expires,
        }
        token = jwt.encode(claims, self._key, algorithm=ALGORITHM)
        return {"token": token, "scope": scope, "session_id": session_id, "expires_at": expires}

    def verify(self, token: str) -> Scope:
        """The token's scope; ProtocolError(UNAUTHORIZED) naming why not (counted)."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                # expiry is checked below against our clock (injectable, so tests move it)
                options={"require": ["exp", "iat", "jti", "scope"], "verify_exp": False},
            )
        except jwt.InvalidSignatureError:
            raise self._refuse("bad_signature", "the token's signature is wrong") from None
        except jwt.InvalidTokenError:
            raise self._refuse("malformed", "the token is not one this server minted") from None
        if claims["exp"] <= self._clock():
            raise self._refuse("expired", "the token has expired; mint a new one")
        if claims["scope"] not in SCOPES:
            raise self._refuse("malformed", "the token's scope is unknown")
        return Scope(claims["scope"], claims.get("sid"), claims["jti"], float(claims["exp"]))

    def use_once(self, scope: Scope) -> None:
        """A ``start`` token starts one session, on any connection."""
        now = self._clock()
        with self._lock:
            while self._used and (
                len(self._used) >= USED_KEPT or next(iter(self._used.values())) <= now
            ):
                self._used.popitem(last=False)
            if scope.token_id in self._used:
                raise self._refuse("reused", "this token has started its session already")
            self._used[scope.token_id] = scope.expires_at

    def out_of_scope(self, scope: Scope, what: str) -> ProtocolError:
        may = f"{scope.scope} {scope.session_id or 'one session'}"
        return self._refuse("scope", f"this token may {may}, not {what}")

    def _refuse(self, reason: str, message: str) -> ProtocolError:
        self._on_refused(reason)
        return ProtocolError("UNAUTHORIZED", message)
