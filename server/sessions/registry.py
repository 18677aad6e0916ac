"""The live sessions of this process, by id: opening, lookup, ownership and expiry.

A session id is never reused: the registry refuses an id that is live, being opened, or ended
recently (the last ``REMEMBER_ENDED`` of them), and the session factory also refuses one the
store holds (and, across nodes without a shared store, one claimed in Redis).
"""

from __future__ import annotations

import hmac
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from server.edges.protocol import ProtocolError

if TYPE_CHECKING:
    from server.sessions.runner import SessionRunner

Clock = Callable[[], float]
# Ended ids kept so that none is taken again before the store would refuse it anyway: the store
# holds every id for its retention; this only spares a database round trip for recent ones.
REMEMBER_ENDED = 10_000


class SessionRegistry:
    def __init__(
        self,
        max_sessions: int,
        *,
        clock: Clock = time.monotonic,
        remember_ended: int = REMEMBER_ENDED,
    ) -> None:
        self.max_sessions = max_sessions
        self._clock = clock
        self._live: dict[str, SessionRunner] = {}
        self._opening: set[str] = set()
        self._ended: OrderedDict[str, None] = OrderedDict()  # recent ids, so none is reused
        self._remember = remember_ended

    def __len__(self) -> int:
        return len(self._live)

    def all(self) -> list[SessionRunner]:
        return list(self._live.values())

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def reserve(self, session_id: str) -> None:
        """Hold ``session_id`` while its session is being opened."""
        if session_id in self._ended:
            raise ProtocolError(
                "SESSION_EXISTS",
                f"session {session_id} has ended; an id is never used twice: start without a "
                "session_id",
                session_id,
            )
        if session_id in self._live or session_id in self._opening:
            raise ProtocolError(
                "SESSION_EXISTS",
                f"session {session_id} exists; resume it with its resume_token, "
                "or start without a session_id",
                session_id,
            )
        if len(self._live) + len(self._opening) >= self.max_sessions:
            raise ProtocolError(
                "SESSION_LIMIT", f"the server holds its maximum of {self.max_sessions} sessions"
            )
        self._opening.add(session_id)

    def release(self, session_id: str) -> None:
        self._opening.discard(session_id)

    def add(self, runner: SessionRunner) -> None:
        self._opening.discard(runner.session.id)
        self._live[runner.session.id] = runner

    def remove(self, runner: SessionRunner) -> None:
        if self._live.get(runner.session.id) is runner:
            del self._live[runner.session.id]
        self._ended[runner.session.id] = None
        while len(self._ended) > self._remember:
            self._ended.popitem(last=False)

    def get(self, session_id: str) -> SessionRunner | None:
        return self._live.get(session_id)

    def opening(self, session_id: str) -> bool:
        """The id is reserved by a session that is being opened right now."""
        return session_id in self._opening

    def held_by(self, *, owner: str | None = None, client: str | None = None) -> int:
        """Open sessions of one connection (``owner``) or one client address: those waiting
        to be resumed count too, they hold their slot."""
        return sum(
            1
            for r in self._live.values()
            if not r.session.ended
            and (owner is None or r.session.owner == owner)
            and (client is None or r.session.client == client)
        )

    def by_token(self, token: str) -> SessionRunner | None:
        for runner in self._live.values():
            if hmac.compare_digest(runner.session.token, token):
                return runner
        return None

    def owned(self, session_id: str, sid: str) -> SessionRunner:
        runner = self._live.get(session_id)
        if runner is None or runner.session.ended:
            raise ProtocolError("UNKNOWN_SESSION", f"no open session {session_id}", session_id)
        if runner.session.owner != sid:
            raise ProtocolError(
                "UNAUTHORIZED",
                f"session {session_id} belongs to another connection; resume it with its token",
                session_id,
            )
        return runner

    def detach(self, sid: str) -> list[SessionRunner]:
        """The connection ``sid`` is gone: its sessions wait to be resumed."""
        gone = []
        for runner in self._live.values():
            if runner.session.owner == sid:
                runner.session.detach(self._clock())
                gone.append(runner)
        return gone

    def expired(
        self, *, resume_ttl_s: float, idle_timeout_s: float, call_rejoin_s: float
    ) -> list[tuple[SessionRunner, str]]:
        now = self._clock()
        out = []
        for runner in self._live.values():
            session = runner.session
            if session.ended:
                continue
            ttl = resume_ttl_s if session.source == "socketio" else call_rejoin_s
            if session.disconnected_at is not None and now - session.disconnected_at > ttl:
                reason = "not resumed" if session.source == "socketio" else "connection dropped"
                out.append((runner, reason))
            elif now - session.last_audio > idle_timeout_s:
                out.append((runner, "idle"))
        return out
