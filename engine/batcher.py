"""One worker owns the model: it batches windows from every session and resolves each request.

Only the batcher's worker (and, for the deadline, the short-lived primary thread it starts) may
call a model's ``predict``; nothing else touches the model. The worker takes the first waiting
request, collects more for up to ``max_wait_ms`` or until ``max_batch``, splits them by window
length (equal lengths stack without padding, which would change the output), runs each group in
one forward pass and resolves every request's future. An error reaches every request of the
failed group; the worker carries on with the next.

With a fallback model (the CPU, when the primary is a GPU) the primary gets ``deadline_s`` per
batch; past it, or on CUDA out-of-memory or any other error, the batch is recomputed on the
fallback and its results say so. After ``failure_threshold`` failures in a row the primary is
bypassed for ``cooldown_s``, then probed again with the next batch (a circuit breaker).

``offload`` runs the blocking predict call; the default calls it directly. A server running
under eventlet passes ``eventlet.tpool.execute`` so the model runs on a native thread.

On the CPU, ``lanes`` > 1 splits a batch into that many parts predicted at once, each with
``cores / lanes`` torch threads: two single-threaded lanes on two cores outrun one two-threaded
call, because much of the model is memory-bound element-wise work that scales poorly across
threads of one op (see BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from engine.model import Prediction

log = logging.getLogger(__name__)

Offload = Callable[..., Any]


class Predictor(Protocol):
    device: str

    def predict(self, windows: np.ndarray, *, embeddings: bool = False) -> Prediction: ...


class BatchObserver(Protocol):
    """Hooks for metrics; the server implements them, the default ignores them."""

    def batch_done(self, device: str, size: int, seconds: float, outcome: str) -> None: ...

    def fallback(self, reason: str) -> None: ...

    def queue_changed(self, depth: int) -> None: ...


class _NoObserver:
    def batch_done(self, device: str, size: int, seconds: float, outcome: str) -> None:
        pass

    def fallback(self, reason: str) -> None:
        pass

    def queue_changed(self, depth: int) -> None:
        pass


@dataclass(slots=True)
class InferenceResult:
    probs: np.ndarray  # (labels,)
    embedding: np.ndarray | None
    device: str
    fallback_reason: str | None  # why the fallback device answered, None if the primary did
    batch_size: int
    queued_s: float
    inference_s: float


@dataclass(slots=True)
class _Request:
    window: np.ndarray
    embeddings: bool
    future: Future[InferenceResult]
    submitted: float


class PrimaryFailed(Exception):
    def __init__(self, reason: str, cause: BaseException | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class CircuitBreaker:
    """Closed: use the primary. Open: bypass it until ``cooldown_s`` passes, then probe once."""

    def __init__(
        self,
        failure_threshold: int = 3,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self.failures = 0
        self.opened_at: float | None = None

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        if self._clock() - self.opened_at >= self.cooldown_s:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        return self.state != "open"

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def failure(self) -> None:
        self.failures += 1
        if self.opened_at is not None or self.failures >= self.failure_threshold:
            self.opened_at = self._clock()  # a failed probe re-opens for a full cool-down


class InferenceBatcher:
    def __init__(
        self,
        primary: Predictor,
        fallback: Predictor | None = None,
        *,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        deadline_s: float = 1.0,
        failure_threshold: int = 3,
        cooldown_s: float = 30.0,
        offload: Offload | None = None,
        observer: BatchObserver | None = None,
        lanes: int = 1,
        cpu_threads: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {lanes}")
        self.lanes = lanes
        self.cpu_threads = cpu_threads or os.cpu_count() or 1
        self.primary = primary
        self.fallback = fallback
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.deadline_s = deadline_s
        self.breaker = CircuitBreaker(failure_threshold, cooldown_s)
        self._offload: Offload = offload or (lambda fn, *a, **kw: fn(*a, **kw))
        self._observer: BatchObserver = observer or _NoObserver()
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._primary_busy = False
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="voxaffect-batcher", daemon=True)
        self._worker.start()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def submit(self, window: np.ndarray, *, embeddings: bool = False) -> Future[InferenceResult]:
        future: Future[InferenceResult] = Future()
        if self._closed:
            future.set_exception(RuntimeError("the inference batcher is closed"))
            return future
        self._queue.put(_Request(window, embeddings, future, time.perf_counter()))
        self._observer.queue_changed(self._queue.qsize())
        return future

    def close(self, timeout_s: float = 5.0) -> None:
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout_s)

    # --- worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            stop = self._collect(batch)
            self._observer.queue_changed(self._queue.qsize())
            groups: dict[int, list[_Request]] = {}
            for request in batch:
                groups.setdefault(request.window.shape[0], []).append(request)
            for group in groups.values():
                self._run_group(group)
            if stop:
                break
        self._fail_pending()

    def _collect(self, batch: list[_Request]) -> bool:
        """Add requests until max_batch or max_wait; True if the close sentinel came."""
        until = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = until - time.perf_counter()
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                return False
            if item is None:
                return True
            batch.append(item)
        return False

    def _fail_pending(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.future.set_exception(RuntimeError("the inference batcher is closed"))

    def _run_group(self, group: list[_Request]) -> None:
        started = time.perf_counter()
        windows = np.stack([r.window for r in group])
        embeddings = any(r.embeddings for r in group)
        try:
            prediction, device, reason = self._infer(windows, embeddings)
            returned = prediction.probs.shape[0]
            if returned != len(group):
                raise RuntimeError(f"the model returned {returned} results for {len(group)} inputs")
        except Exception as exc:
            log.warning("inference batch failed", extra={"size": len(group), "error": repr(exc)})
            self._observer.batch_done("none", len(group), time.perf_counter() - started, "error")
            for request in group:
                request.future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        self._observer.batch_done(device, len(group), seconds, "fallback" if reason else "ok")
        for i, request in enumerate(group):
            request.future.set_result(
                InferenceResult(
                    probs=prediction.probs[i],
                    embedding=None if prediction.embeddings is None else prediction.embeddings[i],
                    device=device,
                    fallback_reason=reason,
                    batch_size=len(group),
                    queued_s=started - request.submitted,
                    inference_s=seconds,
                )
            )

    def _call(
        self, model: Predictor, windows: np.ndarray, embeddings: bool, lanes: int
    ) -> Prediction:
        threads = max(1, self.cpu_threads // lanes)

        def run() -> Prediction:
            if model.device == "cpu":
                torch.set_num_threads(threads)  # per OS thread: the thread offload runs this on
            return model.predict(windows, embeddings=embeddings)

        return self._offload(run)

    def _predict(self, model: Predictor, windows: np.ndarray, embeddings: bool) -> Prediction:
        """``model.predict``, split across lanes when it runs on the CPU."""
        lanes = min(self.lanes, windows.shape[0]) if model.device == "cpu" else 1
        if lanes == 1:
            return self._call(model, windows, embeddings, 1)
        parts = np.array_split(windows, lanes)
        results: list[Any] = [None] * lanes

        def run(i: int) -> None:
            try:
                results[i] = self._call(model, parts[i], embeddings, lanes)
            except BaseException as exc:  # re-raised on the worker below
                results[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(1, lanes)]
        for t in threads:
            t.start()
        run(0)
        for t in threads:
            t.join()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        embs = [r.embeddings for r in results]
        return Prediction(
            probs=np.concatenate([r.probs for r in results]),
            embeddings=None if any(e is None for e in embs) else np.concatenate(embs),
        )

    def _infer(self, windows: np.ndarray, embeddings: bool) -> tuple[Prediction, str, str | None]:
        if self.fallback is None:
            return self._predict(self.primary, windows, embeddings), self.primary.device, None
        if not self.breaker.allow():
            reason = "circuit_open"
        elif self._primary_busy:
            reason = "busy"  # a timed-out batch still holds the primary
        else:
            try:
                prediction = self._call_primary(windows, embeddings)
                self.breaker.success()
                return prediction, self.primary.device, None
            except PrimaryFailed as failed:
                reason = failed.reason
                self.breaker.failure()
                log.warning(
                    "primary device failed; recomputing on %s",
                    self.fallback.device,
                    extra={"reason": reason, "cause": repr(failed.cause)},
                )
        self._observer.fallback(reason)
        prediction = self._predict(self.fallback, windows, embeddings)
        return prediction, self.fallback.device, reason

    def _call_primary(self, windows: np.ndarray, embeddings: bool) -> Prediction:
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["prediction"] = self._call(self.primary, windows, embeddings, 1)
            except BaseException as exc:  # reported to the worker, which falls back
                box["error"] = exc
            finally:
                self._primary_busy = False
                done.set()

        self._primary_busy = True
        threading.Thread(target=run, name="voxaffect-primary", daemon=True).start()
        if not done.wait(self.deadline_s):
            raise PrimaryFailed("timeout")
        error = box.get("error")
        if error is not None:
            if is_oom(error):
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise PrimaryFailed("oom", error)
            raise PrimaryFailed("error", error)
        return box["prediction"]
