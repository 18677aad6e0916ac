"""What a session runner tells the rest of the server, and how it reaches them.

A runner publishes typed events — ``Started``, ``Result``, ``UtteranceDone``, ``VadChange``,
``Skipped``, ``Error``,
``Ended`` (or ``HandedOff``, when a draining node passes it on), and ``Disconnected`` from the edges
— on an :class:`EventBus`. Each subscriber (socket rooms, the store, metrics, the monitor, alert
rules) has a mailbox of its own: a bounded queue drained by its own greenthread, in order.
Publishing never blocks, so a slow subscriber never holds back the runner or the others; a
subscriber that falls ``queue_size`` events behind loses the oldest, and each loss is counted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from engine.pipeline import FrameResult
    from server.runtime import ThreadRuntime
    from server.sessions.session import Session

log = logging.getLogger(__name__)

SKIP_REASONS = ("silence", "expired")  # why a due window was not analysed
UTTERANCE_OUTCOMES = ("analysed", "late", "backlog", "ended", "failed")  # what became of one


@dataclass(slots=True, eq=False)
class Started:
    session: Session
    config: dict[str, Any]
    continued: bool = False  # a session another node handed off, continued here


@dataclass(slots=True, eq=False)
class Result:
    session: Session
    track: str | None
    result: dict[str, Any]  # the wire payload (server/sessions/wire.py), seq included
    received_at: float  # clock time the window's audio arrived
    frame: FrameResult  # the window's own result, as the engine made it


@dataclass(slots=True, eq=False)
class UtteranceDone:
    """An utterance of a track, in the track's order: analysed (``payload``, the wire's
    ``utterance_result``) or dropped unanalysed (``payload`` None; ``outcome`` says why)."""

    session: Session
    track: str | None
    outcome: str  # one of UTTERANCE_OUTCOMES
    payload: dict[str, Any] | None = None
    delay_s: float = 0.0  # from the utterance's end in the audio's arrival to its result


@dataclass(slots=True, eq=False)
class VadChange:
    session: Session
    payload: dict[str, Any]


@dataclass(slots=True, eq=False)
class Skipped:
    session: Session
    track: str | None
    reason: str  # one of SKIP_REASONS
    count: int


@dataclass(slots=True, eq=False)
class Error:
    session: Session
    code: str
    message: str


@dataclass(slots=True, eq=False)
class Ended:
    session: Session
    reason: str
    summary: dict[str, Any]


@dataclass(slots=True, eq=False)
class HandedOff:
    """A draining node stopped a running session for another node to continue: ``state`` is
    what that node needs (server/sessions/factory.py, ``reopen``), with the summary the session
    gets if nobody continues it."""

    session: Session
    state: dict[str, Any]


@dataclass(slots=True, eq=False)
class Disconnected:
    session: Session


Event = (
    Started
    | Result
    | UtteranceDone
    | VadChange
    | Skipped
    | Error
    | Ended
    | HandedOff
    | Disconnected
)


class Subscriber(Protocol):
    name: str

    def handle(self, event: Event) -> None: ...


@dataclass(eq=False)
class _Mailbox:
    subscriber: Subscriber
    inbox: queue.Queue[Event | None]
    dropped: int = 0
    drained: threading.Event = field(default_factory=threading.Event)


class EventBus:
    def __init__(
        self,
        runtime: ThreadRuntime,
        subscribers: list[Subscriber],
        *,
        queue_size: int = 10_000,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self._on_drop = on_drop or (lambda name: None)
        self._boxes = [_Mailbox(s, queue.Queue(maxsize=queue_size)) for s in subscribers]
        for box in self._boxes:
            runtime.spawn(self._drain, box)

    def publish(self, event: Event) -> None:
        for box in self._boxes:
            while True:
                try:
                    box.inbox.put_nowait(event)
                    break
                except queue.Full:
                    try:  # the oldest goes: a subscriber this far behind needs the newest most
                        box.inbox.get_nowait()
                    except queue.Empty:
                        continue
                    box.dropped += 1
                    self._on_drop(box.subscriber.name)
                    if box.dropped == 1 or box.dropped % 1000 == 0:
                        log.warning(
                            "subscriber is behind; dropped events",
                            extra={"subscriber": box.subscriber.name, "dropped": box.dropped},
                        )

    def close(self, timeout_s: float = 5.0) -> bool:
        """Stop every mailbox once it has handled what it holds; False if one did not in time."""
        for box in self._boxes:
            try:
                box.inbox.put_nowait(None)
            except queue.Full:  # the stop takes the oldest event's place: a loss, counted
                box.inbox.get_nowait()
                box.dropped += 1
                self._on_drop(box.subscriber.name)
                box.inbox.put_nowait(None)
        deadline = time.monotonic() + timeout_s
        return all(box.drained.wait(max(0.0, deadline - time.monotonic())) for box in self._boxes)

    @staticmethod
    def _drain(box: _Mailbox) -> None:
        while True:
            event = box.inbox.get()
            if event is None:
                box.drained.set()
                return
            try:
                box.subscriber.handle(event)
            except Exception:
                log.exception(
                    "subscriber failed on an event",
                    extra={"subscriber": box.subscriber.name, "event": type(event).__name__},
                )
