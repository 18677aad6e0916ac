"""A session: one stream's identity, who owns it, and what it has published.

Its fields are read by anyone; its transitions are its own methods, and they are the only code
that takes its lock. The lock orders three things that would otherwise race: the runner numbering
a result (``record``), the room publisher emitting it (``publish``), and a resuming client or a
new supervisor catching up before it joins the room (``catch_up``) — so a client that resumes
gets every result once: those the room had before it joined, then the room's.

A session belongs to the connection that started it (a Socket.IO sid, or a call's current media
connection). Another Socket.IO connection can act on it only by presenting its ``resume_token``,
which moves the session to that connection. A session whose connection dropped waits
``resume_ttl_s`` (a call: ``call_rejoin_s``) to be resumed; one without audio for
``idle_timeout_s`` is closed (server/sessions/registry.py).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from engine.audio import AudioFormat

Result = dict[str, Any]  # a result as it goes over the wire (server/sessions/wire.py)


@dataclass(eq=False)
class Session:
    id: str
    source: str  # socketio, a telephony protocol (twilio, audiohook, …), or file (unregistered)
    format: AudioFormat
    results_kept: int = 600
    embeddings: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    owner: str | None = None  # the Socket.IO sid that may send and receive
    client: str = ""  # the address that started it (behind trusted proxies: the forwarded one)
    connection: Any = None  # a call's current media connection (calls.CallStream)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    last_audio: float = field(default_factory=time.monotonic)
    disconnected_at: float | None = None
    audio_s: float = 0.0
    seq: int = 0
    published_seq: int = 0  # the last seq emitted to the session's room
    ended: bool = False
    dynamics: dict[str, Any] | None = None  # the call's so far, as of its last closed segment

    def __post_init__(self) -> None:
        self.results: deque[Result] = deque(maxlen=self.results_kept)
        self._lock = threading.Lock()
        self.summarised = threading.Event()  # the summary is stored and sent to the room

    # --- results -------------------------------------------------------------------------------

    def record(self, build: Callable[[int], Result]) -> Result:
        """Number the next result (``build(seq)`` makes it) and keep it for resumes."""
        with self._lock:
            self.seq += 1
            result = build(self.seq)
            self.results.append(result)
            return result

    def publish(self, result: Result, emit: Callable[[Result], None]) -> None:
        """Emit ``result`` to the room, then count it as the room's."""
        with self._lock:
            emit(result)
            self.published_seq = max(self.published_seq, int(result["seq"]))

    def catch_up(
        self,
        since_seq: int,
        stored: Iterable[Result],
        send: Callable[[Result], None],
        join: Callable[[], None],
    ) -> int:
        """Send every result after ``since_seq`` that the room has had — from memory, and from
        ``stored`` (read by the caller before this, without the lock: a slow database must not
        hold up the room) for what memory no longer holds — then ``join`` the room; how many
        were sent. From then on the room's emits reach the client: none twice, none lost."""
        with self._lock:
            merged = {int(r["seq"]): r for r in stored if since_seq < int(r["seq"])}
            merged.update({int(r["seq"]): r for r in self.results if since_seq < int(r["seq"])})
            due = [merged[seq] for seq in sorted(merged) if seq <= self.published_seq]
            for result in due:
                send(result)
            join()
            return len(due)

    def needs_store(self, since_seq: int) -> bool:
        """Whether a catch-up after ``since_seq`` needs results memory no longer holds."""
        oldest = int(self.results[0]["seq"]) if self.results else self.published_seq + 1
        return since_seq + 1 < oldest

    def recent_then(self, count: int, join: Callable[[], None]) -> list[Result]:
        """The room's last ``count`` results, and ``join`` the room: a new supervisor's view,
        with nothing missed between the two."""
        with self._lock:
            join()
            return [r for r in self.results if int(r["seq"]) <= self.published_seq][-count:]

    # --- who owns it ---------------------------------------------------------------------------

    def attach(self, owner: str) -> str | None:
        """``owner`` (a Socket.IO sid) resumes the session; the previous owner, if another."""
        previous, self.owner, self.disconnected_at = self.owner, owner, None
        return previous if previous != owner else None

    def detach(self, now: float) -> None:
        """The owner's connection is gone: the session waits to be resumed."""
        self.owner, self.disconnected_at = None, now

    def connect_call(self, connection: Any) -> Any:
        """A media connection takes the call over; the one it replaces."""
        previous, self.connection, self.disconnected_at = self.connection, connection, None
        return previous

    def drop_call(self, connection: Any, now: float) -> bool:
        """``connection`` is gone; True if it was the call's (it then waits to be rejoined)."""
        if self.connection is not connection:
            return False
        self.connection, self.disconnected_at = None, now
        return True

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
