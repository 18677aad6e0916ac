"""One worker owns the model: it batches windows from every session and resolves each request.

Only the batcher's worker may call the predictor; nothing else touches the model. The worker
takes the first waiting request, collects more for up to ``max_wait_ms`` or until ``max_batch``,
splits them by window length (equal lengths stack without padding, which would change the
output), runs each group in one call and resolves every request's future. An error reaches every
request of the failed group; the worker carries on with the next. The predictor must return one
row per input, or the group fails.

Requests have a priority. ``live`` windows (streams a person is waiting on) always go first;
``bulk`` windows (whole-file analysis) run only when no live window waits, in batches of at most
``bulk_max_batch``, so a live window that arrives meanwhile waits for one small batch at most.

Device fallback and CPU lanes are predictor wrappers (engine/fallback.py, engine/lanes.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engine.lanes import Predictor

log = logging.getLogger(__name__)

PRIORITIES = ("live", "bulk")


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
    probs: np.ndarray  # (labels,)
    embedding: np.ndarray | None
    device: str
    fallback_reason: str | None  # why a fallback device answered, None if the primary did
    batch_size: int
    queued_s: float
    inference_s: float


@dataclass(slots=True)
class _Request:
    window: np.ndarray
    embeddings: bool
    priority: str
    future: Future[InferenceResult]
    submitted: float


class BatcherClosed(RuntimeError):
    pass


class InferenceBatcher:
    def __init__(
        self,
        predictor: Predictor,
        *,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        bulk_max_batch: int = 2,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if max_batch < 1 or bulk_max_batch < 1:
            raise ValueError(f"batch sizes must be at least 1, got {max_batch}, {bulk_max_batch}")
        self.predictor = predictor
        self.max_batch = max_batch
        self.bulk_max_batch = min(bulk_max_batch, max_batch)
        self.max_wait_s = max_wait_ms / 1000.0
        self._observer: BatchObserver = observer or _NoObserver()
        self._clock = clock
        self._queues: dict[str, deque[_Request]] = {p: deque() for p in PRIORITIES}
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="voxaffect-batcher", daemon=True)
        self._worker.start()

    @property
    def queue_depth(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def submit(
        self, window: np.ndarray, *, embeddings: bool = False, priority: str = "live"
    ) -> Future[InferenceResult]:
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
        future: Future[InferenceResult] = Future()
        with self._cond:
            if self._closed:
                future.set_exception(BatcherClosed("the inference batcher is closed"))
                return future
            self._queues[priority].append(
                _Request(window, embeddings, priority, future, self._clock())
            )
            depth = self.queue_depth
            self._cond.notify()
        self._observer.queue_changed(depth)
        return future

    def close(self, timeout_s: float = 5.0) -> None:
        """Finish what is queued, refuse anything new, and stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join(timeout_s)

    # --- worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            # A request its caller gave up on (future cancelled) is dropped, not computed.
            batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
            self._observer.queue_changed(self.queue_depth)
            groups: dict[int, list[_Request]] = {}
            for request in batch:
                groups.setdefault(request.window.shape[0], []).append(request)
            for group in groups.values():
                self._run_group(group)

    def _next_batch(self) -> list[_Request] | None:
        """Live requests (waiting up to max_wait for more), else a small bulk batch; None once
        closed and drained."""
        live, bulk = self._queues["live"], self._queues["bulk"]
        with self._cond:
            while not live and not bulk:
                if self._closed:
                    return None
                self._cond.wait()
            if not live:
                return [bulk.popleft() for _ in range(min(len(bulk), self.bulk_max_batch))]
            batch = [live.popleft()]
            until = self._clock() + self.max_wait_s
            while len(batch) < self.max_batch:
                if live:
                    batch.append(live.popleft())
                    continue
                remaining = until - self._clock()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            return batch

    def _run_group(self, group: list[_Request]) -> None:
        started = self._clock()
        try:
            prediction = self.predictor.predict(
                np.stack([r.window for r in group]), embeddings=any(r.embeddings for r in group)
            )
            returned = prediction.probs.shape[0]
            if returned != len(group):
                raise RuntimeError(f"the model returned {returned} results for {len(group)} inputs")
        except Exception as exc:
            log.warning("inference batch failed", extra={"size": len(group), "error": repr(exc)})
            self._observer.batch_done("none", len(group), self._clock() - started, "error")
            for request in group:
                request.future.set_exception(exc)
            return
        seconds = self._clock() - started
        outcome = "fallback" if prediction.fallback_reason else "ok"
        self._observer.batch_done(prediction.device, len(group), seconds, outcome)
        for i, request in enumerate(group):
            request.future.set_result(
                InferenceResult(
                    probs=prediction.probs[i],
                    embedding=None if prediction.embeddings is None else prediction.embeddings[i],
                    device=prediction.device,
                    fallback_reason=prediction.fallback_reason,
                    batch_size=len(group),
                    queued_s=started - request.submitted,
                    inference_s=seconds,
                )
            )
