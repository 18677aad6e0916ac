"""One runner per session, for every source: audio in, results out, in order.

The runner owns the session's inbox, one pipeline per analysed track (a Socket.IO stream has one;
a call one per party) and the window policy. The edge that feeds it — Socket.IO, Twilio,
FreeSWITCH, a file upload — only pushes audio and ends it. What the runner produces is published
as typed events (server/events.py); subscribers send, store and count them.

Lifecycle: ``push`` (refused once ended, and refused while ``inbox_max_bytes`` wait unread),
``end(reason)``, after which the worker (``run``, one greenthread) decodes what is still queued,
finishes every track with its final window, waits for the windows in flight, publishes ``Ended``
and stops. A failure in one window is reported as an ``Error`` event and the session carries on;
a failure of the worker itself still ends the session with a summary.

Window policy, per track: at most ``max_inflight`` windows being analysed and ``max_pending``
waiting. Live streams keep one of each: a window that comes due while another is in flight waits,
and starts as soon as that one is done; a newer due window replaces the waiting one (counted as
``superseded``), so under overload every session's effective hop widens evenly and each result
says what its hop was. File analysis waits for room instead of superseding, so every window of a
file is analysed. Windows complete in stream order: the stress index of one builds on the last.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.pipeline import StreamPipeline
from engine.windowing import Window
from server import wire
from server.analysis import Analysis, AnalysisError
from server.events import Ended, Error, Event, Result, Skipped, VadChange
from server.runtime import ThreadRuntime
from server.sessions import Session

log = logging.getLogger(__name__)

Analyse = Callable[..., Analysis]  # (samples, *, narrowband, embeddings, priority) -> Analysis


class InboxFull(Exception):
    """The session has ``inbox_max_bytes`` of audio waiting: the sender is ahead of the server."""


class SessionClosed(Exception):
    """Audio for a session that has ended."""


@dataclass(frozen=True, slots=True)
class WindowPolicy:
    max_inflight: int = 1
    max_pending: int = 1
    supersede: bool = True  # a newer due window replaces a waiting one; else it waits for room
    priority: str = "live"  # the batcher's priority (engine/batcher.py)


LIVE = WindowPolicy()
FILE = WindowPolicy(max_inflight=4, max_pending=4, supersede=False, priority="bulk")


@dataclass(eq=False, slots=True)
class _Slot:
    window: Window
    received_at: float
    analysis: Analysis | None = None
    error: tuple[str, str] | None = None
    done: bool = False


@dataclass(eq=False)
class Track:
    """One analysed voice of a session, and its windows on their way through analysis."""

    name: str | None
    pipeline: StreamPipeline
    pending: deque[_Slot] = field(default_factory=deque)
    inflight: deque[_Slot] = field(default_factory=deque)
    superseded: int = 0
    failed: int = 0
    last_start_s: float | None = None

    @property
    def idle(self) -> bool:
        return not self.pending and not self.inflight


class SessionRunner:
    def __init__(
        self,
        session: Session,
        tracks: dict[str | None, Track],
        *,
        analyse: Analyse,
        publish: Callable[[Event], None],
        runtime: ThreadRuntime,
        policy: WindowPolicy = LIVE,
        random_weights: bool = False,
        inbox_max_bytes: int = 4 << 20,
        feed_max_bytes: int = 1 << 20,
        clock: Callable[[], float] = time.monotonic,
        on_done: Callable[[SessionRunner], None] | None = None,
    ) -> None:
        self.session = session
        self.tracks = tracks
        self.policy = policy
        self.random_weights = random_weights
        self.inbox_max_bytes = inbox_max_bytes
        self.feed_max_bytes = feed_max_bytes
        self._analyse = analyse
        self._publish = publish
        self._runtime = runtime
        self._clock = clock
        self._on_done = on_done or (lambda runner: None)
        self._inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._inbox_bytes = 0
        self._cond = threading.Condition()  # guards the inbox size and every track's windows
        self.done = threading.Event()

    # --- the edge's side -----------------------------------------------------------------------

    def push(
        self,
        track: str | None,
        data: bytes | np.ndarray,
        *,
        received_at: float | None = None,
        block: bool = False,
    ) -> None:
        """Queue audio for ``track``: bytes in the session's encoding, or float32 samples at
        16 kHz. Raises InboxFull (or waits, with ``block``) while the inbox is full."""
        if self.session.ended:
            raise SessionClosed(f"session {self.session.id} has ended")
        size = data.nbytes if isinstance(data, np.ndarray) else len(data)
        with self._cond:
            while self._inbox_bytes and self._inbox_bytes + size > self.inbox_max_bytes:
                if not block:
                    raise InboxFull(f"{self._inbox_bytes} bytes of audio wait to be decoded")
                self._cond.wait()
            self._inbox_bytes += size
        self._inbox.put(
            ("audio", track, data, self._clock() if received_at is None else received_at)
        )

    def end(self, reason: str) -> None:
        """No more audio: analyse what is queued, then publish the summary. Idempotent."""
        if not self.session.ended:
            self.session.ended = True
            self._inbox.put(("finish", reason))

    # --- the worker --------------------------------------------------------------------------

    def run(self) -> None:
        reason = "internal error"
        ended = False
        try:
            while True:
                items, finish = self._take()
                self._feed(items)
                if finish is not None:
                    reason = finish
                    break
            self._finish(reason)
            ended = True
        except Exception:
            log.exception("session runner failed", extra={"session_id": self.session.id})
        finally:
            self.session.ended = True
            if not ended:  # never leave a client waiting for a summary
                summary = wire.summary(self.session, reason, {}, self.random_weights)
                self._publish(Ended(self.session, reason, summary))
            self.done.set()
            self._on_done(self)

    def _take(self) -> tuple[list[tuple[Any, ...]], str | None]:
        """Everything already queued (one decode per track rather than one per chunk), up to
        ``feed_max_bytes``; and the end reason if the end was queued."""
        items: list[tuple[Any, ...]] = []
        taken = 0
        item = self._inbox.get()
        while True:
            if item[0] == "finish":
                finish: str | None = item[1]
                break
            items.append(item)
            taken += item[2].nbytes if isinstance(item[2], np.ndarray) else len(item[2])
            if taken >= self.feed_max_bytes:
                finish = None
                break
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                finish = None
                break
        with self._cond:
            self._inbox_bytes -= taken
            self._cond.notify_all()
        return items, finish

    def _feed(self, items: list[tuple[Any, ...]]) -> None:
        per_track: dict[str | None, list[tuple[Any, float]]] = {}
        for _, name, data, received_at in items:
            per_track.setdefault(name, []).append((data, received_at))
        for name, parts in per_track.items():
            self._feed_track(self.tracks[name], parts)

    def _feed_track(self, track: Track, parts: list[tuple[Any, float]]) -> None:
        received_at = parts[0][1]  # latency counts from the first chunk: never understated
        data = [d for d, _ in parts]
        pipeline = track.pipeline
        try:
            if isinstance(data[0], np.ndarray):
                fed, errors = self._runtime.offload(pipeline.feed_samples, np.concatenate(data)), []
            else:
                fed, errors = self._runtime.offload(pipeline.feed_chunks, data)
        except Exception as exc:
            log.exception("feeding audio failed", extra={"session_id": self.session.id})
            self._publish(Error(self.session, "INVALID_AUDIO", f"could not process audio: {exc}"))
            return
        for bad in errors:
            self._publish(Error(self.session, bad.code, str(bad)))
        self._after_feed(track, fed, received_at)

    def _after_feed(self, track: Track, fed: Any, received_at: float) -> None:
        for change in fed.vad_events:
            payload = wire.vad(self.session.id, track.name, change.speech, change.at_s)
            self._publish(VadChange(self.session, payload))
        if fed.skipped_silence:
            self._publish(Skipped(self.session, track.name, "silence", fed.skipped_silence))
        for window in fed.windows:
            self._due(track, window, received_at)

    def _finish(self, reason: str) -> None:
        self._wait_idle()
        for track in self.tracks.values():
            try:
                fed = self._runtime.offload(track.pipeline.finish)
            except Exception:
                log.exception("finishing a track failed", extra={"session_id": self.session.id})
                continue
            self._after_feed(track, fed, self._clock())
        self._wait_idle()
        tracks = {
            name: wire.track_summary(
                t.pipeline.summary_dict(), superseded=t.superseded, failed=t.failed
            )
            for name, t in self.tracks.items()
        }
        summary = wire.summary(self.session, reason, tracks, self.random_weights)
        self._publish(Ended(self.session, reason, summary))

    def _wait_idle(self) -> None:
        with self._cond:
            while not all(t.idle for t in self.tracks.values()):
                self._cond.wait()

    # --- the window policy -------------------------------------------------------------------

    def _due(self, track: Track, window: Window, received_at: float) -> None:
        superseded = False
        with self._cond:
            if not self.policy.supersede:
                while len(track.pending) >= self.policy.max_pending:
                    self._cond.wait()
            elif len(track.pending) >= self.policy.max_pending:
                track.pending.popleft()
                track.superseded += 1
                superseded = True
            track.pending.append(_Slot(window, received_at))
            self._start_ready(track)
        if superseded:
            self._publish(Skipped(self.session, track.name, "superseded", 1))

    def _start_ready(self, track: Track) -> None:
        while len(track.inflight) < self.policy.max_inflight and track.pending:
            slot = track.pending.popleft()
            track.inflight.append(slot)
            self._runtime.spawn(self._analyse_slot, track, slot)

    def _analyse_slot(self, track: Track, slot: _Slot) -> None:
        try:
            slot.analysis = self._analyse(
                slot.window.samples,
                narrowband=track.pipeline.narrowband,
                embeddings=self.session.embeddings,
                priority=self.policy.priority,
            )
        except AnalysisError as exc:
            slot.error = (exc.code, exc.message)
        except Exception as exc:
            log.exception("analysing a window failed", extra={"session_id": self.session.id})
            slot.error = ("INFERENCE_FAILED", f"could not analyse the window: {exc}")
        with self._cond:
            slot.done = True
            self._complete_ready(track)
            self._start_ready(track)
            self._cond.notify_all()

    def _complete_ready(self, track: Track) -> None:
        """Turn finished windows into results, in stream order."""
        while track.inflight and track.inflight[0].done:
            slot = track.inflight.popleft()
            if slot.error is None:
                self._complete(track, slot)
            else:
                track.failed += 1
                self._publish(Error(self.session, *slot.error))
            slot.window.samples = _NO_SAMPLES  # the audio is not needed any more

    def _complete(self, track: Track, slot: _Slot) -> None:
        a = slot.analysis
        assert a is not None
        try:
            frame = track.pipeline.complete(
                slot.window,
                a.probs,
                a.prosody,
                device=a.device,
                fallback_reason=a.fallback_reason,
                embedding=a.embedding,
                prosody_missing=a.prosody_missing,
            )
        except Exception as exc:
            log.exception("scoring a window failed", extra={"session_id": self.session.id})
            track.failed += 1
            self._publish(Error(self.session, "INFERENCE_FAILED", f"could not score: {exc}"))
            return
        hop_s = None if track.last_start_s is None else frame.start_s - track.last_start_s
        track.last_start_s = frame.start_s
        session = self.session
        with session.lock:
            session.seq += 1
            result = wire.result(
                session.id,
                session.seq,
                frame,
                track=track.name,
                latency_ms=(self._clock() - slot.received_at) * 1000,
                hop_s=hop_s,
                random_weights=self.random_weights,
            )
            session.results.append(result)
        self._publish(Result(session, track.name, result, slot.received_at))


_NO_SAMPLES = np.zeros(0, dtype=np.float32)
