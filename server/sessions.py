"""Sessions: who owns a stream, how to resume it, and the live sessions of this process.

A session belongs to the connection that started it (a Socket.IO sid, or a call's current media
connection). Another Socket.IO connection can act on it only by presenting its ``resume_token``,
which moves the session to that connection. A session whose connection dropped waits
``resume_ttl_s`` (a call: ``call_rejoin_s``) to be resumed; one without audio for
``idle_timeout_s`` is closed. A session id is never reused: the registry refuses an id that is
live, being opened, or ended recently, and the session factory also refuses one the store holds.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.audio import AudioFormat
from server.protocol import ProtocolError

if TYPE_CHECKING:
    from server.runner import SessionRunner

Clock = Callable[[], float]
SOURCES = ("socketio", "twilio", "audiofork")


@dataclass(eq=False)
class Session:
    id: str
    source: str  # socketio, twilio, audiofork (or file, never registered)
    format: AudioFormat
    results_kept: int = 600
    embeddings: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    owner: str | None = None  # the Socket.IO sid that may send and receive
    client: str = ""  # the address that started it (behind trusted proxies: the forwarded one)
    connection: Any = None  # a call's current media connection
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    last_audio: float = field(default_factory=time.monotonic)
    disconnected_at: float | None = None
    audio_s: float = 0.0
    seq: int = 0
    published_seq: int = 0  # the last seq emitted to the session's room (server/subscribers.py)
    ended: bool = False

    def __post_init__(self) -> None:
        self.results: deque[dict[str, Any]] = deque(maxlen=self.results_kept)
        self.lock = threading.Lock()  # orders room emits against replay to a resuming client

    @property
    def room(self) -> str:
        return f"session:{self.id}"

    @property
    def connected(self) -> bool:
        return self.disconnected_at is None

    def allow_audio(self, seconds: float, factor: float, burst_s: float, now: float) -> bool:
        """Accept ``seconds`` more audio unless the stream runs ahead of ``factor`` x real time
        (plus ``burst_s`` of slack)."""
        if self.audio_s + seconds > factor * (now - self.started) + burst_s:
            return False
        self.record_audio(seconds, now)
        return True

    def record_audio(self, seconds: float, now: float) -> None:
        self.audio_s += seconds
        self.last_audio = now


class SessionRegistry:
    def __init__(
        self, max_sessions: int, *, clock: Clock = time.monotonic, remember_ended: int = 10_000
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
                runner.session.owner = None
                runner.session.disconnected_at = self._clock()
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
