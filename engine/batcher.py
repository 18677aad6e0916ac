"""One scheduler owns the model: live windows by deadline and fairly across tracks, whole-file
windows in idle time, on ``lanes`` workers that each run one batch at a time.

Only the batcher's workers may call the predictor; nothing else touches the model. A worker that
is free builds its next batch, runs it in one call and resolves every request's future. An error
reaches every request of the failed batch; the worker carries on with the next. The predictor
must return one row per input, or the batch fails. Equal lengths stack without padding (padding
would change the output), so a batch holds windows of one length.

Real time is a deadline, not a queue. A ``live`` request carries the clock time by which its
result is due (its audio's arrival plus the latency budget). When a worker is free, any live
request that could no longer be answered in time — now + the expected batch time + ``slack_s``
for delivery > its deadline — is not computed: its future raises :class:`WindowExpired`. Work
that still fits is never dropped. A track's windows are due at least one service time apart:
when a window joins earlier ones of its track that still wait, its deadline is at least theirs
plus the time a window takes (over all lanes), since a burst of windows cannot be answered at
once. So a catch-up burst on an idle server is analysed whole, and under load its later windows
are the first to go.

Live requests are grouped by ``key`` (a track). A key's requests run in the order they came;
across keys, while taking them in deadline order would answer every waiting request in time
(at the expected batch time), the next is the one due first: then nothing need be shed, and a
window that fits is never dropped for another's turn. Otherwise, when some must go, the next is
the head of the key served least of late: the fewest windows over the last ``SERVICE_MEMORY_S``
or so, each weighing less as it ages (a key never served goes first), then the key served
longest ago, then the earliest deadline. So under overload every track thins evenly instead of
first come, first served. Turns count service, not demand: a key
whose window expired unserved keeps its place for the next turn (tie-breaking by deadline alone
would hand every contest to the streams whose audio happens to arrive a few milliseconds
earlier), and a track that asks for less than its share gets all it asks. Only the last turn
is not enough memory: calls speak and pause, and a track whose speech keeps starting just after
its neighbours' would be served once a phase while they were served twice.
``utterance`` requests (a whole utterance, classified as one clip: engine/utterances.py) come
next. They use spare capacity only: none runs while the live demand is above
``UTTERANCE_LIVE_SHARE`` of the capacity, nor within ``DEMAND_WINDOW_S`` of a live window
expiring (the capacity estimate is the batches' own, and the serving machine may not reach it:
a window shed is the proof that there is no spare time). Below that, one runs only when no
live request waits and it cannot make a live window late: no live window was due over the last
``DEMAND_WINDOW_S``; or, with several lanes, the other lanes' capacity covers the live demand
with room to spare; or its expected time, plus a batch of the live windows that may come due
meanwhile, fits inside the live latency budget. Each runs alone (clips differ in length) on at
most ``lanes - 1`` lanes at once (one, with one lane). So under load they wait, in the order they
came, and are late rather than lost — up to their ``deadline`` (the submitter's
limit of lateness), and up to ``UTTERANCE_KEY_MAX_S`` of audio waiting per key; beyond either, the
oldest is dropped unanalysed (:class:`WindowExpired`, ``reason`` "late" or "backlog"), which the
caller counts.
``bulk`` requests (whole-file analysis) have no deadline and run only when no live request
waits, in batches of at most ``bulk_max_batch``, so a live window that arrives meanwhile waits
for one small batch at most.

The batcher measures what it serves: the expected time of a batch of each size (a moving
average, seeded by the tuner's measurement), the capacity that follows (windows a second over all
lanes) and the live demand (windows due a second), so a server can report its headroom.
Device fallback and CPU threads are predictor wrappers (engine/fallback.py, engine/lanes.py).
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engine.lanes import Predictor
from engine.model import WindowAnswer

log = logging.getLogger(__name__)

PRIORITIES = ("live", "utterance", "bulk")
SERVICE_SAMPLES = 9  # recent batches the expected batch time is the median of
PROBE_AFTER_S = 1.0  # no batch this long: the next window runs, however slow it looks
DEMAND_WINDOW_S = 10.0  # live demand is measured over this much recent time
SERVICE_MEMORY_S = 30.0  # a key's past service counts against its turns with this time constant
KEY_IDLE_S = 10.0  # a key with nothing waiting for this long leaves the rotation
LIVE_QUEUE_MAX = 512  # live windows waiting at most (64 MB of 2 s windows): beyond, the most
# overdue goes; the deadlines keep the queue far shorter than this in any real load
UTTERANCE_KEY_MAX_S = 120.0  # utterance audio one key may have waiting; beyond, its oldest goes
UTTERANCE_QUEUE_MAX_S = 900.0  # over every key (58 MB of float32); beyond, the oldest goes
UTTERANCE_LIVE_SHARE = 0.7  # live demand, as a share of capacity, above which no utterance runs
# (and, with several lanes, the share the lanes an utterance leaves free may carry)
UTTERANCE_RECHECK_S = 0.05  # a worker with only utterances that do not fit looks again this often
_SAMPLES_PER_S = 16_000


_EXPIRED = {
    "deadline": "the window could not be analysed by its deadline",
    "late": "the utterance waited longer than its limit for idle model time",
    "backlog": "newer utterances pushed the utterance out of the bounded queue",
    "forgotten": "the utterance's session ended before it was analysed",
}


class BatchObserver(Protocol):
    """Hooks for metrics; the server implements them, the default ignores them."""

    def batch_done(self, device: str, size: int, seconds: float, outcome: str) -> None: ...

    def queue_changed(self, depth: int) -> None: ...


class _NoObserver:
    def batch_done(self, device: str, size: int, seconds: float, outcome: str) -> None:
        pass

    def queue_changed(self, depth: int) -> None:
        pass


@dataclass(slots=True)
class InferenceResult:
    answer: WindowAnswer  # what the model said, whole
    batch_size: int
    queued_s: float
    inference_s: float

    @property
    def probs(self) -> np.ndarray:
        return self.answer.probs

    @property
    def device(self) -> str:
        return self.answer.device

    @property
    def fallback_reason(self) -> str | None:
        return self.answer.fallback_reason


class BatcherClosed(RuntimeError):
    pass


class WindowExpired(Exception):
    """A request dropped unanalysed. ``reason``: "deadline" (a live window that could no longer
    be answered in time), "late" (an utterance past its deadline), "backlog" (an utterance
    pushed out by newer ones), "forgotten" (an utterance its caller gave up: :meth:`forget`)."""

    def __init__(self, message: str, reason: str = "deadline") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True, eq=False)
class _Request:
    window: np.ndarray
    embeddings: bool
    priority: str
    future: Future[InferenceResult]
    submitted: float
    deadline: float  # clock time its result is due by (inf: none)
    key: Hashable
    on_start: Callable[[], None] | None
    expired_reason: str = "deadline"


@dataclass(slots=True)
class _Key:
    """One key's waiting live requests, in order, and how much and when it was last served."""

    waiting: deque[_Request] = field(default_factory=deque)
    turn: int = -1  # the batcher's count of takes when this key was last served; -1: never
    served_at: float = float("-inf")  # clock time of that take
    service: float = 0.0  # windows served, each weighing exp(-age / SERVICE_MEMORY_S) at served_at

    def recent_service(self, now: float) -> float:
        return self.service * math.exp((self.served_at - now) / SERVICE_MEMORY_S)  # never: 0


class ServiceTime:
    """Expected seconds of a batch of each size: the median of the last few batches of that
    size, else the median per window times the size; the tuner's measurement fills the record
    to begin with. A median, because a few stalled batches (a swapped page, a GPU hiccup) must
    not make every later window look too slow to make its deadline."""

    def __init__(self, seconds_per_window: float) -> None:
        seed = max(seconds_per_window, 1e-4)
        self._per_window: deque[float] = deque([seed] * SERVICE_SAMPLES, maxlen=SERVICE_SAMPLES)
        self._by_size: dict[int, deque[float]] = {}

    @property
    def per_window(self) -> float:
        return statistics.median(self._per_window)

    def expected(self, size: int) -> float:
        seen = self._by_size.get(size)
        if seen is not None and len(seen) >= 3:
            return statistics.median(seen)
        return self.per_window * size

    def observe(self, size: int, seconds: float) -> None:
        """A batch's time. One under half the expected, or half its size's record so far (too
        short yet to be what is expected), starts the record afresh: the slow spell is over (a
        probe after it, say), and windows should not keep expiring for it."""
        seen = self._by_size.get(size)
        record = statistics.median(seen) if seen else 0.0
        if seconds < 0.5 * max(self.expected(size), record):
            self._per_window.clear()
            self._by_size.clear()
        self._by_size.setdefault(size, deque(maxlen=SERVICE_SAMPLES)).append(seconds)
        self._per_window.append(seconds / size)


class InferenceBatcher:
    def __init__(
        self,
        predictor: Predictor,
        *,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        bulk_max_batch: int = 2,
        lanes: int = 1,
        seconds_per_window: float = 0.1,
        slack_s: float = 0.0,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch < 1 or bulk_max_batch < 1 or lanes < 1:
            raise ValueError(
                f"batch sizes and lanes must be at least 1, got {max_batch}, {bulk_max_batch}, "
                f"{lanes}"
            )
        self.predictor = predictor
        self.max_batch = max_batch
        self.bulk_max_batch = min(bulk_max_batch, max_batch)
        self.max_wait_s = max_wait_ms / 1000.0
        self.lanes = lanes
        self.slack_s = slack_s
        self.service = ServiceTime(seconds_per_window)
        self._observer: BatchObserver = observer or _NoObserver()
        self._clock = clock
        self._keys: dict[Hashable, _Key] = {}
        self._live = 0  # live requests waiting, over every key
        self._bulk: deque[_Request] = deque()
        self._utterances: deque[_Request] = deque()  # in the order they came, every key
        self._utterance_samples = 0  # audio waiting in them
        self._utterance_busy = 0  # lanes running an utterance now
        self._utterance_rate: deque[float] = deque(maxlen=SERVICE_SAMPLES)  # model s per sample
        self._live_samples = 2 * _SAMPLES_PER_S  # a live window's length, as last seen
        self._budget_s = float("inf")  # a live window's latency budget, as last seen
        self._turns = 0  # live requests taken so far: orders keys by when they were served
        self._busy = 0  # lanes inside the model now
        self._last_done = float("-inf")  # clock time the last batch ended
        self._shed_at = float("-inf")  # clock time a live window last expired unanalysed
        self._due: deque[float] = deque()  # submit times of live requests, last DEMAND_WINDOW_S
        self._cond = threading.Condition()
        self._closed = False
        self._workers = [
            threading.Thread(target=self._run, name=f"voxaffect-batcher-{i}", daemon=True)
            for i in range(lanes)
        ]
        for worker in self._workers:
            worker.start()

    # --- the callers' side ---------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self._live + len(self._utterances) + len(self._bulk)

    def expected_utterance_s(self, samples: int) -> float:
        """Expected model seconds of one clip of ``samples``: the median seconds per sample of
        recent utterances, else a live window's time scaled by length. (A transformer's cost
        grows a little faster than the length: the record, once there is one, says how much.)"""
        if self._utterance_rate:
            return statistics.median(self._utterance_rate) * samples
        return self.service.per_window * samples / self._live_samples

    @property
    def capacity_windows_per_s(self) -> float:
        """Windows a second every lane together can analyse, as batches take now."""
        return self.lanes / self.service.per_window

    def demand_windows_per_s(self) -> float:
        """Live windows submitted a second, over the last ``DEMAND_WINDOW_S``."""
        with self._cond:
            self._forget_demand(self._clock())
            return len(self._due) / DEMAND_WINDOW_S

    def submit(
        self,
        window: np.ndarray,
        *,
        embeddings: bool = False,
        priority: str = "live",
        deadline: float | None = None,
        key: Hashable = None,
        on_start: Callable[[], None] | None = None,
    ) -> Future[InferenceResult]:
        """Queue one window. ``deadline``: clock time a live window's result is due by, or the
        latest an utterance may start (bulk: ignored). ``key``: the track it belongs to
        (fairness and order). ``on_start``: called once a worker takes the request into a
        batch (not for one that expires)."""
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
        future: Future[InferenceResult] = Future()
        expired: list[_Request] = []
        with self._cond:
            if self._closed:
                future.set_exception(BatcherClosed("the inference batcher is closed"))
                return future
            now = self._clock()
            request = _Request(
                window,
                embeddings,
                priority,
                future,
                now,
                float("inf") if deadline is None or priority == "bulk" else deadline,
                key,
                on_start,
            )
            if priority == "bulk":
                self._bulk.append(request)
            elif priority == "utterance":
                expired += self._add_utterance(request)
            else:
                self._live_samples = window.shape[0]
                if deadline is not None:
                    self._budget_s = deadline - now
                self._due.append(now)
                self._forget_demand(now)
                queue = self._keys.get(key)
                if queue is None:
                    queue = self._keys[key] = _Key()
                elif queue.waiting:  # one service time after the track's last waiting window
                    spacing = self.service.per_window / self.lanes
                    request.deadline = max(request.deadline, queue.waiting[-1].deadline + spacing)
                queue.waiting.append(request)
                self._live += 1
                if self._live > LIVE_QUEUE_MAX:
                    expired.append(self._pop_most_overdue())
            depth = self.queue_depth
            self._cond.notify()
        self._expire(expired)
        self._observer.queue_changed(depth)
        return future

    def forget(self, key: Hashable) -> int:
        """Drop every utterance of ``key`` still waiting (its session ended without them); how
        many."""
        with self._cond:
            gone = [r for r in self._utterances if r.key == key]
            if gone:
                self._utterances = deque(r for r in self._utterances if r.key != key)
                for request in gone:
                    request.expired_reason = "forgotten"
                    self._utterance_samples -= request.window.shape[0]
        self._expire(gone)
        return len(gone)

    def _add_utterance(self, request: _Request) -> list[_Request]:
        """Queue an utterance; the ones it pushes out (its key's oldest beyond
        UTTERANCE_KEY_MAX_S of audio, then the oldest of all beyond UTTERANCE_QUEUE_MAX_S)."""
        self._utterances.append(request)
        self._utterance_samples += request.window.shape[0]
        out: list[_Request] = []
        mine = [r for r in self._utterances if r.key == request.key]
        held = sum(r.window.shape[0] for r in mine)
        while len(mine) > 1 and held > UTTERANCE_KEY_MAX_S * _SAMPLES_PER_S:
            oldest = mine.pop(0)
            held -= oldest.window.shape[0]
            out.append(oldest)
        while len(self._utterances) - len(out) > 1 and (
            self._utterance_samples - sum(r.window.shape[0] for r in out)
            > UTTERANCE_QUEUE_MAX_S * _SAMPLES_PER_S
        ):
            oldest = next(r for r in self._utterances if r not in out)
            out.append(oldest)
        for gone in out:
            gone.expired_reason = "backlog"
            self._utterances.remove(gone)
            self._utterance_samples -= gone.window.shape[0]
        return out

    def close(self, timeout_s: float = 5.0) -> None:
        """Finish what is queued, refuse anything new, and stop the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout_s
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    # --- the workers -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch, expired = self._next_batch()
            self._expire(expired)
            if batch is None:
                return
            utterance = bool(batch) and batch[0].priority == "utterance"
            # A request its caller gave up on (future cancelled) is dropped, not computed.
            batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
            self._observer.queue_changed(self.queue_depth)
            for request in batch:
                if request.on_start is not None:
                    request.on_start()
            with self._cond:
                self._busy += bool(batch)
            try:
                if batch:
                    self._run_batch(batch, utterance=utterance)
            finally:
                with self._cond:
                    self._busy -= bool(batch)
                    self._utterance_busy -= utterance
                    if batch:
                        self._last_done = self._clock()
                    self._cond.notify_all()

    def _next_batch(self) -> tuple[list[_Request] | None, list[_Request]]:
        """Live requests that can still make their deadlines, chosen fairly (waiting up to
        max_wait for more while the batch is not full), else an utterance that fits (alone),
        else a small bulk batch. None once closed and drained; empty when only expired requests
        were found. Also the requests that expired meanwhile."""
        expired: list[_Request] = []
        with self._cond:
            while True:
                expired += self._sweep()
                utterance = self._utterance_that_fits()
                if self._live or self._bulk or utterance:
                    break
                if expired:  # resolved before this worker waits for more
                    return [], expired
                if self._closed and not self._utterances:
                    return None, expired
                self._cond.wait(UTTERANCE_RECHECK_S if self._utterances else None)
            if not self._live:
                if utterance:
                    request = self._utterances.popleft()
                    self._utterance_samples -= request.window.shape[0]
                    self._utterance_busy += 1
                    return [request], expired
                length = self._bulk[0].window.shape[0]
                batch: list[_Request] = []
                while self._bulk and len(batch) < self.bulk_max_batch:
                    if self._bulk[0].window.shape[0] != length:
                        break
                    batch.append(self._bulk.popleft())
                return batch, expired
            batch = [self._take(self._choose())]
            until = self._clock() + self.max_wait_s
            while len(batch) < self.max_batch:
                expired += self._sweep()
                if self._live:
                    key = self._choose()
                    if not self._fits(batch, key):
                        break
                    batch.append(self._take(key))
                    continue
                remaining = until - self._clock()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            return batch, expired

    def _utterance_that_fits(self) -> bool:
        """Whether the oldest waiting utterance may run now without making a live window late
        (the rules are in the module's docstring). Closed, every one runs."""
        if not self._utterances or self._live:
            return False
        if self._closed:
            return True
        if self._utterance_busy >= max(1, self.lanes - 1):
            return False
        now = self._clock()
        self._forget_demand(now)
        if not self._due:
            return True
        demand = len(self._due) / DEMAND_WINDOW_S
        per_window = max(self.service.per_window, 1e-6)
        if now - self._shed_at < DEMAND_WINDOW_S:
            return False  # live windows are being shed: there is no spare capacity
        if demand > UTTERANCE_LIVE_SHARE * self.lanes / per_window:
            return False  # near capacity: the live windows need every lane's time
        free_lanes = self.lanes - 1 - self._utterance_busy - max(0, self._busy - 1)
        if free_lanes > 0 and demand <= UTTERANCE_LIVE_SHARE * free_lanes / per_window:
            return True
        tracks = min(self.max_batch, max(1, len(self._keys)))
        takes = (
            self.expected_utterance_s(self._utterances[0].window.shape[0])
            + self.service.expected(tracks)
            + self.slack_s
        )
        return takes <= self._budget_s

    def _fits(self, batch: list[_Request], key: Hashable) -> bool:
        """Whether ``key``'s next request can join ``batch``: the same length, and the bigger
        batch still answers every member and it in time."""
        head = self._keys[key].waiting[0]
        if head.window.shape[0] != batch[0].window.shape[0]:
            return False
        finish = self._clock() + self.service.expected(len(batch) + 1) + self.slack_s
        return finish <= min(head.deadline, *(r.deadline for r in batch))

    def _choose(self) -> Hashable:
        """The key whose head is due first, while deadline order answers every waiting window
        in time (nothing need be shed, and that order is the one that keeps it so); when some
        must go, the key served least of late, then longest ago, then due first."""
        now = self._clock()
        waiting = [(key, queue) for key, queue in self._keys.items() if queue.waiting]

        def fair(queue: _Key) -> tuple[float, int, float]:
            return (queue.recent_service(now), queue.turn, queue.waiting[0].deadline)

        if self._all_in_time(now):
            return min(waiting, key=lambda kq: (kq[1].waiting[0].deadline, fair(kq[1])))[0]
        return min(waiting, key=lambda kq: fair(kq[1]))[0]

    def _all_in_time(self, now: float) -> bool:
        """Whether every waiting live window would be answered by its deadline if the lanes
        took them in deadline order, one at a time at the expected time, the lanes now in the
        model each busy for one more such time."""
        step = self.service.expected(1)
        deadlines = sorted(r.deadline for queue in self._keys.values() for r in queue.waiting)
        return all(
            now + ((i + self._busy) // self.lanes + 1) * step + self.slack_s <= deadline
            for i, deadline in enumerate(deadlines)
        )

    def _take(self, key: Hashable) -> _Request:
        queue = self._keys[key]
        now = self._clock()
        queue.service = queue.recent_service(now) + 1.0
        queue.turn, queue.served_at = self._turns, now
        self._turns += 1
        self._live -= 1
        request = queue.waiting.popleft()
        # A key keeps its place in the rotation while it is in use; one idle this long is
        # forgotten (back, it starts afresh, as a key never served does: first, until its
        # recent service catches up with the others').
        idle = [
            k for k, q in self._keys.items() if not q.waiting and q.served_at < now - KEY_IDLE_S
        ]
        for other in idle:
            del self._keys[other]
        return request

    def _sweep(self) -> list[_Request]:
        """Take out every live request that a batch of one, starting now, could not answer in
        time (a key's requests are in deadline order: only heads need looking at). When no
        batch has run for PROBE_AFTER_S, only what is already past its deadline goes: the
        estimate may be stale (the model was slow for a while, then everything expired and
        nothing ran), and running a window is how it is learnt again. Utterances past their
        deadline go too ("late")."""
        now = self._clock()
        late = [r for r in self._utterances if r.deadline < now]
        for request in late:
            request.expired_reason = "late"
            self._utterances.remove(request)
            self._utterance_samples -= request.window.shape[0]
        if not self._live:
            return late
        fresh = self._busy or now - self._last_done <= PROBE_AFTER_S
        earliest = now + self.service.expected(1) + self.slack_s if fresh else now
        out: list[_Request] = []
        for key in list(self._keys):
            waiting = self._keys[key].waiting
            while waiting and waiting[0].deadline < earliest:
                out.append(waiting.popleft())
        self._live -= len(out)
        if out:
            self._shed_at = now
        return late + out

    def _pop_most_overdue(self) -> _Request:
        waiting = [k for k, q in self._keys.items() if q.waiting]
        key = min(waiting, key=lambda k: self._keys[k].waiting[0].deadline)
        request = self._keys[key].waiting.popleft()
        self._live -= 1
        self._shed_at = self._clock()
        return request

    def _forget_demand(self, now: float) -> None:
        while self._due and self._due[0] < now - DEMAND_WINDOW_S:
            self._due.popleft()

    @staticmethod
    def _expire(requests: list[_Request]) -> None:
        for request in requests:
            if request.future.set_running_or_notify_cancel():
                reason = request.expired_reason
                request.future.set_exception(WindowExpired(_EXPIRED[reason], reason))

    def _run_batch(self, batch: list[_Request], *, utterance: bool = False) -> None:
        started = self._clock()
        try:
            prediction = self.predictor.predict(
                np.stack([r.window for r in batch]), embeddings=any(r.embeddings for r in batch)
            )
            returned = prediction.probs.shape[0]
            if returned != len(batch):
                raise RuntimeError(f"the model returned {returned} results for {len(batch)} inputs")
        except Exception as exc:
            log.warning("inference batch failed", extra={"size": len(batch), "error": repr(exc)})
            self._observer.batch_done("none", len(batch), self._clock() - started, "error")
            for request in batch:
                request.future.set_exception(exc)
            return
        seconds = self._clock() - started
        with self._cond:
            if utterance:  # another length: not a live window's record
                self._utterance_rate.append(seconds / max(1, batch[0].window.shape[0]))
            else:
                self.service.observe(len(batch), seconds)
        outcome = "fallback" if prediction.fallback_reason else "ok"
        self._observer.batch_done(prediction.device, len(batch), seconds, outcome)
        for i, request in enumerate(batch):
            request.future.set_result(
                InferenceResult(
                    answer=prediction.answer(i),
                    batch_size=len(batch),
                    queued_s=started - request.submitted,
                    inference_s=seconds,
                )
            )
