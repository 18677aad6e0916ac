"""Sessions: who owns a stream, how to resume it, and the state one stream keeps.

A session belongs to the connection that started it. Another connection can act on it only by
presenting its ``resume_token``, which moves the session to that connection. A session whose
connection dropped waits ``resume_ttl_s`` to be resumed; one without audio for ``idle_timeout_s``
is closed. Every piece of per-session state is bounded: the engine's ring buffer, the results
kept for resume (``results_kept``) and the inbox of chunks waiting to be decoded.
"""

from __future__ import annotations

import hmac
import queue
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from engine.audio import AudioFormat
from engine.pipeline import StreamPipeline
from server.protocol import ProtocolError

INBOX_CHUNKS = 500  # ~50 s of 100 ms chunks; a client further ahead is told to slow down
RATE_BURST_S = 5.0  # audio a client may send ahead of the real-time allowance


@dataclass(eq=False)
class Track:
    """One analysed voice of a session (a Socket.IO stream has one; a call one per party)."""

    name: str | None
    pipeline: StreamPipeline
    inflight: bool = False
    skipped_busy: int = 0


@dataclass(eq=False)
class Session:
    id: str
    source: str  # socketio, twilio or audiofork
    format: AudioFormat
    tracks: dict[str | None, Track]
    results_kept: int = 600
    embeddings: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    owner: str | None = None  # the Socket.IO sid that may send and receive
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    last_audio: float = field(default_factory=time.monotonic)
    disconnected_at: float | None = None
    audio_s: float = 0.0
    seq: int = 0
    ended: bool = False

    def __post_init__(self) -> None:
        self.results: deque[dict[str, Any]] = deque(maxlen=self.results_kept)
        self.inbox: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=INBOX_CHUNKS)
        self.lock = threading.Lock()  # green under eventlet: orders delivery against replay

    @property
    def room(self) -> str:
        return f"session:{self.id}"

    def allow_audio(self, seconds: float, max_realtime_factor: float) -> bool:
        """Accept ``seconds`` more audio unless the stream runs ahead of the allowed rate."""
        allowance = max_realtime_factor * (time.monotonic() - self.started) + RATE_BURST_S
        if self.audio_s + seconds > allowance:
            return False
        self.record_audio(seconds)
        return True

    def record_audio(self, seconds: float) -> None:
        self.audio_s += seconds
        self.last_audio = time.monotonic()

    def state(self) -> dict[str, Any]:
        """What the monitor shows of a session."""
        last = self.results[-1] if self.results else None
        return {
            "session_id": self.id,
            "source": self.source,
            "connected": self.owner is not None or self.source != "socketio",
            "started_at": self.started_wall,
            "audio_s": round(self.audio_s, 1),
            "results": self.seq,
            "meta": self.meta,
            "last": last,
        }


class SessionRegistry:
    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._by_id: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def all(self) -> list[Session]:
        return list(self._by_id.values())

    def new_id(self) -> str:
        return uuid.uuid4().hex

    def add(self, session: Session) -> None:
        if session.id in self._by_id:
            raise ProtocolError(
                "UNAUTHORIZED",
                f"session {session.id} exists; present its resume_token to resume it",
                session.id,
            )
        if len(self._by_id) >= self.max_sessions:
            raise ProtocolError(
                "SESSION_LIMIT", f"the server holds its maximum of {self.max_sessions} sessions"
            )
        self._by_id[session.id] = session

    def get(self, session_id: str) -> Session | None:
        return self._by_id.get(session_id)

    def by_token(self, token: str) -> Session | None:
        for session in self._by_id.values():
            if hmac.compare_digest(session.token, token):
                return session
        return None

    def owned(self, session_id: str, sid: str) -> Session:
        session = self._by_id.get(session_id)
        if session is None or session.ended:
            raise ProtocolError("UNKNOWN_SESSION", f"no open session {session_id}", session_id)
        if session.owner != sid:
            raise ProtocolError(
                "UNAUTHORIZED",
                f"session {session_id} belongs to another connection; resume it with its token",
                session_id,
            )
        return session

    def detach(self, sid: str) -> list[Session]:
        """The connection ``sid`` is gone: its sessions wait to be resumed."""
        gone = []
        for session in self._by_id.values():
            if session.owner == sid:
                session.owner = None
                session.disconnected_at = time.monotonic()
                gone.append(session)
        return gone

    def expired(self, resume_ttl_s: float, idle_timeout_s: float) -> list[tuple[Session, str]]:
        now = time.monotonic()
        out = []
        for session in self._by_id.values():
            if session.ended:
                continue
            if session.disconnected_at is not None and now - session.disconnected_at > resume_ttl_s:
                out.append((session, "not resumed"))
            elif now - session.last_audio > idle_timeout_s:
                out.append((session, "idle"))
        return out

    def remove(self, session: Session) -> None:
        self._by_id.pop(session.id, None)
