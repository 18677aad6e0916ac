"""One runner per session, for every source: audio in, results out, in order.

The runner owns the session's inbox, one pipeline per analysed track (a Socket.IO stream has one;
a call one per party) and the window policy. The edge that feeds it — Socket.IO, Twilio,
FreeSWITCH, a file upload — only pushes audio and ends it. What the runner produces is published
as typed events (server/sessions/events.py); subscribers send, store and count them.

Lifecycle: ``push`` (refused once ended, and refused while ``inbox_max_bytes`` wait unread),
``end(reason)``, after which the worker (``run``, one greenthread) decodes what is still queued,
finishes every track with its final window, waits for the windows in flight, publishes ``Ended`` and
stops. ``end(reason, hand_off=True)`` does the same but publishes ``HandedOff``: every track's
checkpoint, for another node to continue the session (a draining node's). A failure in one window is
reported as an ``Error`` event and the session carries on; a failure of the worker itself still ends
the session with a summary.

Window policy: every window that comes due is submitted at once, with a deadline — the moment
its audio arrived plus ``latency_budget_s`` — and its track as the batcher's fairness key. The
batcher (engine/batcher.py) answers it in time or drops it unanalysed (``expired``): under
overload every track thins evenly, and no result arrives late. The result that follows says how
many of its track's windows expired since the previous one, and its hop. File analysis has no
deadline: it keeps at most ``max_inflight`` windows submitted, waiting for room, so every window
of a file is analysed. Windows complete in stream order: the stress index of one builds on the
last.

Utterances (engine/utterances.py; when the track's pipeline cuts them): each goes to the batcher at
``utterance`` priority, which runs it only in idle time that cannot make a live window late, and
drops it if it waits more than ``utterance_delay_s`` (or falls out of the track's bounded
backlog). A track's utterances complete in order, each as an ``UtteranceDone``: analysed, or
dropped and counted by outcome. At the end the summary waits ``utterance_wait_s`` at most for the
utterances still out; what is left then is dropped as ``ended``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.audio import RAW_BYTES_PER_SAMPLE
from engine.batcher import WindowExpired
from engine.dynamics import SpeechLog, call_dynamics
from engine.lanes import call_directly
from engine.pipeline import StreamPipeline
from engine.utterances import Utterance
from engine.windowing import Window
from server.runtime import ThreadRuntime
from server.sessions import wire
from server.sessions.analysis import Analysis, AnalysisError
from server.sessions.events import (
    Ended,
    Error,
    Event,
    HandedOff,
    Result,
    Skipped,
    UtteranceDone,
    VadChange,
)
from server.sessions.session import Session

log = logging.getLogger(__name__)

# (samples, *, narrowband, embeddings, priority, deadline, key) -> Analysis; raises WindowExpired
Analyse = Callable[..., Analysis]


class InboxFull(Exception):
    """The session has ``inbox_max_bytes`` of audio waiting: the sender is ahead of the server."""


class SessionClosed(Exception):
    """Audio for a session that has ended."""


@dataclass(frozen=True, slots=True)
class WindowPolicy:
    priority: str = "live"  # the batcher's priority (engine/batcher.py)
    latency_budget_s: float | None = 1.5  # a result is due this long after its audio arrived
    max_inflight: int | None = None  # windows submitted per track at most (None: the deadlines
    # bound them); beyond, the track waits for room
    utterance_delay_s: float = 60.0  # an utterance not started this long after it ended is dropped
    utterance_wait_s: float = 10.0  # the summary waits this long at most for utterances still out


LIVE = WindowPolicy()
FILE = WindowPolicy(priority="bulk", latency_budget_s=None, max_inflight=4, utterance_wait_s=600.0)


FEED_MAX_BYTES = 1 << 20  # audio decoded in one go at most: 33 s of 16 kHz PCM16; a burst is
# taken in slices of this, so one session's catch-up never holds a decode thread for long
INBOX_ITEM_BYTES = 256  # what one queued chunk costs beyond its audio: the inbox budget counts it
COALESCE_BYTES = 16_384  # small raw chunks of a track join into pieces of up to this many bytes
# A feed of up to this many bytes runs on the event loop: at most 2 s of audio at 16 kHz (G.711,
# one byte per 8 kHz sample, upsampled), a few ms. The hop to a native thread and back costs more
# CPU than such a feed itself (BENCHMARKS.md, where the time goes); a bigger one is offloaded.
INLINE_FEED_BYTES = 16_384


@dataclass(eq=False, slots=True)
class _Audio:
    track: str | None
    data: bytearray | bytes | np.ndarray  # bytearray: raw whole frames, open to joining
    received_at: float  # when its first chunk arrived


def _size(data: bytes | bytearray | np.ndarray) -> int:
    return data.nbytes if isinstance(data, np.ndarray) else len(data)


@dataclass(eq=False, slots=True)
class _Slot:
    window: Window
    received_at: float
    analysis: Analysis | None = None
    error: tuple[str, str] | None = None
    expired: bool = False
    done: bool = False


@dataclass(eq=False, slots=True)
class _UtteranceSlot:
    utterance: Utterance
    received_at: float  # when the audio that ended it arrived
    analysis: Analysis | None = None
    outcome: str = "analysed"  # events.UTTERANCE_OUTCOMES
    error: tuple[str, str] | None = None
    done: bool = False


@dataclass(eq=False)
class Track:
    """One analysed voice of a session, and its windows on their way through analysis (in
    stream order). Hashed by identity: the batcher's fairness key."""

    name: str | None
    pipeline: StreamPipeline
    inflight: deque[_Slot] = field(default_factory=deque)
    expired: int = 0
    expired_since_result: int = 0
    failed: int = 0
    last_start_s: float | None = None
    speech: SpeechLog = field(default_factory=SpeechLog)  # its VAD segments, for the dynamics
    utterances: deque[_UtteranceSlot] = field(default_factory=deque)  # out, in order
    utterances_dropped: dict[str, int] = field(default_factory=dict)  # by outcome

    @property
    def idle(self) -> bool:
        return not self.inflight

    def checkpoint(self) -> dict[str, Any]:
        """The finished track's state for another node (JSON values)."""
        return {
            "pipeline": self.pipeline.checkpoint(),
            "expired": self.expired,
            "failed": self.failed,
            "last_start_s": self.last_start_s,
            "speech": [list(s) for s in self.speech.segments],
            "utterances_dropped": dict(self.utterances_dropped),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """The counters and speech of :meth:`checkpoint` (the pipeline is built from it)."""
        self.expired = int(state["expired"])
        self.failed = int(state["failed"])
        last = state.get("last_start_s")
        self.last_start_s = None if last is None else float(last)
        self.speech.segments = [(float(a), float(b)) for a, b in state["speech"]]
        dropped = state.get("utterances_dropped", {})
        self.utterances_dropped = {str(k): int(v) for k, v in dropped.items()}


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
        feed_max_bytes: int = FEED_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
        on_done: Callable[[SessionRunner], None] | None = None,
        forget: Callable[[Hashable], int] | None = None,
    ) -> None:
        """``forget(track)``: drop the track's utterances still waiting for the model (the
        batcher's ``forget``), once the summary stops waiting for them."""
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
        self._forget = forget or (lambda track: 0)
        self._inbox: deque[_Audio] = deque()
        self._inbox_bytes = 0  # audio waiting, plus INBOX_ITEM_BYTES per item
        self._end_reason: str | None = None  # once end() was called
        self._hand_off = False
        self._cond = threading.Condition()  # guards the inbox and every track's windows
        fmt = session.format
        self._frame_bytes = (
            RAW_BYTES_PER_SAMPLE[fmt.encoding] * fmt.channels
            if fmt.encoding in RAW_BYTES_PER_SAMPLE
            else 0
        )
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
        16 kHz. Raises InboxFull (or waits, with ``block``) while the inbox is full. Small
        whole-frame raw chunks join the previous chunk of their track, so a flood of tiny
        messages costs no more memory, or decoding, than the audio they hold."""
        if self.session.ended:
            raise SessionClosed(f"session {self.session.id} has ended")
        joinable = isinstance(data, bytes | bytearray) and self._joinable(data)
        with self._cond:
            last = self._inbox[-1] if self._inbox else None
            joins = (
                joinable
                and last is not None
                and last.track == track
                and isinstance(last.data, bytearray)
                and len(last.data) + len(data) <= COALESCE_BYTES
            )
            cost = len(data) if joins else _size(data) + INBOX_ITEM_BYTES
            while self._inbox_bytes and self._inbox_bytes + cost > self.inbox_max_bytes:
                if not block:
                    raise InboxFull(f"{self._inbox_bytes} bytes of audio wait to be decoded")
                self._cond.wait()
                joins = joins and bool(self._inbox) and self._inbox[-1] is last
                cost = len(data) if joins else _size(data) + INBOX_ITEM_BYTES
            if joins:
                assert last is not None and isinstance(last.data, bytearray)
                assert isinstance(data, bytes | bytearray)
                last.data += data
            else:
                now = self._clock() if received_at is None else received_at
                item = bytearray(data) if joinable else data
                self._inbox.append(_Audio(track, item, now))
            self._inbox_bytes += cost
            self._cond.notify_all()

    @property
    def handing_off(self) -> bool:
        """Ended for another node to continue (``end(..., hand_off=True)``)."""
        return self._hand_off

    def _joinable(self, data: bytes | bytearray) -> bool:
        return bool(self._frame_bytes) and len(data) % self._frame_bytes == 0

    def end(self, reason: str, *, hand_off: bool = False) -> None:
        """No more audio: analyse what is queued, then publish the summary (or, ``hand_off``,
        the state another node continues from). Idempotent."""
        if not self.session.ended:
            self.session.ended = True
            with self._cond:
                self._end_reason = reason
                self._hand_off = hand_off
                self._cond.notify_all()

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

    def _take(self) -> tuple[list[_Audio], str | None]:
        """Everything already queued (one decode per track rather than one per chunk), up to
        ``feed_max_bytes``; and the end reason once the inbox is empty and the end was asked."""
        items: list[_Audio] = []
        taken = 0
        with self._cond:
            while not self._inbox and self._end_reason is None:
                self._cond.wait()
            while self._inbox and (not items or taken < self.feed_max_bytes):
                item = self._inbox.popleft()
                items.append(item)
                taken += _size(item.data)
                self._inbox_bytes -= _size(item.data) + INBOX_ITEM_BYTES
            finish = self._end_reason if not self._inbox else None
            self._cond.notify_all()
        return items, finish

    def _feed(self, items: list[_Audio]) -> None:
        per_track: dict[str | None, list[_Audio]] = {}
        for item in items:
            per_track.setdefault(item.track, []).append(item)
        for name, parts in per_track.items():
            self._feed_track(self.tracks[name], parts)

    def _feed_track(self, track: Track, parts: list[_Audio]) -> None:
        received_at = parts[0].received_at  # latency counts from the first chunk: never understated
        data = [bytes(p.data) if isinstance(p.data, bytearray) else p.data for p in parts]
        pipeline = track.pipeline
        run = call_directly if sum(map(_size, data)) <= INLINE_FEED_BYTES else self._runtime.offload
        try:
            if isinstance(data[0], np.ndarray):
                fed, errors = run(pipeline.feed_samples, np.concatenate(data)), []
            else:
                fed, errors = run(pipeline.feed_chunks, data)
        except Exception as exc:
            log.exception("feeding audio failed", extra={"session_id": self.session.id})
            self._publish(Error(self.session, "INVALID_AUDIO", f"could not process audio: {exc}"))
            return
        for bad in errors:
            self._publish(Error(self.session, bad.code, str(bad)))
        self._after_feed(track, fed, received_at)

    def _after_feed(self, track: Track, fed: Any, received_at: float) -> None:
        for change in fed.vad_events:
            track.speech.change(change.speech, change.at_s)
            if not change.speech:  # a segment closed: the monitor's dynamics so far
                self.session.dynamics = self._dynamics()
            payload = wire.vad(self.session.id, track.name, change.speech, change.at_s)
            self._publish(VadChange(self.session, payload))
        if fed.skipped_silence:
            self._publish(Skipped(self.session, track.name, "silence", fed.skipped_silence))
        for window in fed.windows:
            self._due(track, window, received_at)
        for utterance in fed.utterances:
            self._utterance_due(track, utterance, received_at)

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
        self._wait_utterances()
        tracks = {
            name: wire.track_summary(
                t.pipeline.summary_dict(),
                expired=t.expired,
                failed=t.failed,
                utterances_dropped=t.utterances_dropped,
            )
            for name, t in self.tracks.items()
        }
        summary = wire.summary(self.session, reason, tracks, self.random_weights)
        for t in self.tracks.values():
            t.speech.close(t.pipeline.audio_s)
        summary["dynamics"] = self.session.dynamics = self._dynamics()
        if self._hand_off:
            session = self.session
            state = {  # the resume token is not in it: the store keeps only its hash
                "seq": session.seq,
                "audio_s": session.audio_s,
                "utterances": any(t.pipeline.config.utterances for t in self.tracks.values()),
                "tracks": {t.name or "": t.checkpoint() for t in self.tracks.values()},
                "summary": {**summary, "reason": "not continued"},
            }
            self._publish(HandedOff(session, state))
            return
        self._publish(Ended(self.session, reason, summary))

    def _dynamics(self) -> dict[str, Any]:
        """The conversation's measures over every track's closed speech segments."""
        return call_dynamics(
            {t.name or "speaker": t.speech.segments for t in self.tracks.values()},
            max((t.pipeline.audio_s for t in self.tracks.values()), default=0.0),
        )

    def _wait_idle(self) -> None:
        with self._cond:
            while not all(t.idle for t in self.tracks.values()):
                self._cond.wait()

    def _wait_utterances(self) -> None:
        """Wait ``utterance_wait_s`` at most (real time) for every track's utterances; drop
        what is still out then, as ``ended`` (a late answer finds its slot gone)."""
        until = time.monotonic() + self.policy.utterance_wait_s
        with self._cond:
            while any(t.utterances for t in self.tracks.values()):
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            for track in self.tracks.values():
                while track.utterances:
                    self._utterance_outcome(track, track.utterances.popleft())
        for track in self.tracks.values():
            self._forget(track)

    # --- the window policy -------------------------------------------------------------------

    def _due(self, track: Track, window: Window, received_at: float) -> None:
        slot = _Slot(window, received_at)
        with self._cond:
            limit = self.policy.max_inflight
            while limit is not None and len(track.inflight) >= limit:
                self._cond.wait()
            track.inflight.append(slot)
        self._runtime.spawn(self._analyse_slot, track, slot)

    def _analyse_slot(self, track: Track, slot: _Slot) -> None:
        budget = self.policy.latency_budget_s
        try:
            slot.analysis = self._analyse(
                slot.window.samples,
                narrowband=track.pipeline.narrowband,
                embeddings=self.session.embeddings,
                priority=self.policy.priority,
                deadline=None if budget is None else slot.received_at + budget,
                key=track,
            )
        except WindowExpired:
            slot.expired = True
        except AnalysisError as exc:
            slot.error = (exc.code, exc.message)
        except Exception as exc:
            log.exception("analysing a window failed", extra={"session_id": self.session.id})
            slot.error = ("INFERENCE_FAILED", f"could not analyse the window: {exc}")
        with self._cond:
            slot.done = True
            self._complete_ready(track)
            self._cond.notify_all()

    def _complete_ready(self, track: Track) -> None:
        """Turn finished windows into results, in stream order."""
        while track.inflight and track.inflight[0].done:
            slot = track.inflight.popleft()
            if slot.expired:
                track.expired += 1
                track.expired_since_result += 1
                self._publish(Skipped(self.session, track.name, "expired", 1))
            elif slot.error is None:
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
                slot.window, a.answer, a.prosody, prosody_missing=a.prosody_missing
            )
        except Exception as exc:
            log.exception("scoring a window failed", extra={"session_id": self.session.id})
            track.failed += 1
            self._publish(Error(self.session, "INFERENCE_FAILED", f"could not score: {exc}"))
            return
        hop_s = None if track.last_start_s is None else frame.start_s - track.last_start_s
        track.last_start_s = frame.start_s
        session = self.session
        latency_ms = (self._clock() - slot.received_at) * 1000
        result = session.record(
            lambda seq: wire.result(
                session.id,
                seq,
                frame,
                track=track.name,
                latency_ms=latency_ms,
                hop_s=hop_s,
                expired=track.expired_since_result,
                random_weights=self.random_weights,
            )
        )
        track.expired_since_result = 0
        self._publish(Result(session, track.name, result, slot.received_at, frame))

    # --- utterances ------------------------------------------------------------------------

    def _utterance_due(self, track: Track, utterance: Utterance, received_at: float) -> None:
        slot = _UtteranceSlot(utterance, received_at)
        with self._cond:
            limit = self.policy.max_inflight  # a file's: every one waits for its turn
            while limit is not None and len(track.utterances) >= limit:
                self._cond.wait()
            track.utterances.append(slot)
        self._runtime.spawn(self._analyse_utterance, track, slot)

    def _analyse_utterance(self, track: Track, slot: _UtteranceSlot) -> None:
        bulk = self.policy.priority == "bulk"  # a file's: every one is analysed, in idle time
        try:
            slot.analysis = self._analyse(
                slot.utterance.samples,
                narrowband=track.pipeline.narrowband,
                embeddings=False,
                priority="bulk" if bulk else "utterance",
                deadline=None if bulk else self._clock() + self.policy.utterance_delay_s,
                key=track,
            )
        except WindowExpired as exc:
            slot.outcome = "ended" if exc.reason == "forgotten" else exc.reason
        except AnalysisError as exc:
            slot.outcome, slot.error = "failed", (exc.code, exc.message)
        except Exception as exc:
            log.exception("analysing an utterance failed", extra={"session_id": self.session.id})
            slot.outcome = "failed"
            slot.error = ("INFERENCE_FAILED", f"could not analyse the utterance: {exc}")
        with self._cond:
            slot.done = True
            while track.utterances and track.utterances[0].done:  # in the track's order
                self._utterance_outcome(track, track.utterances.popleft())
            self._cond.notify_all()

    def _utterance_outcome(self, track: Track, slot: _UtteranceSlot) -> None:
        """Publish what became of an utterance taken out of its track's queue."""
        a = slot.analysis
        payload = None
        if slot.outcome == "analysed" and a is not None:
            try:
                result = track.pipeline.complete_utterance(
                    slot.utterance, a.answer, a.prosody, prosody_missing=a.prosody_missing
                )
                payload = wire.utterance(
                    self.session.id, result, track=track.name, random_weights=self.random_weights
                )
            except Exception as exc:
                log.exception("scoring an utterance failed", extra={"session_id": self.session.id})
                slot.outcome, slot.error = "failed", ("INFERENCE_FAILED", f"could not score: {exc}")
        elif slot.outcome == "analysed":
            slot.outcome = "ended"  # still out when the summary stopped waiting
        slot.utterance.samples = _NO_SAMPLES
        if slot.error is not None:
            self._publish(Error(self.session, *slot.error))
        if payload is None:
            dropped = track.utterances_dropped
            dropped[slot.outcome] = dropped.get(slot.outcome, 0) + 1
        delay_s = max(0.0, self._clock() - slot.received_at)
        self._publish(UtteranceDone(self.session, track.name, slot.outcome, payload, delay_s))


_NO_SAMPLES = np.zeros(0, dtype=np.float32)
