"""A primary predictor (the GPU) with a deadline, backed by a fallback predictor (the CPU).

``FallbackPredictor`` gives the primary ``deadline_s`` per batch; past it, on CUDA out-of-memory
or on any other error, the batch is recomputed on the fallback and the prediction says why
(``fallback_reason``: timeout, oom, error). A timed-out call still holds the primary, so batches
meanwhile go straight to the fallback (``busy``). After ``failure_threshold`` failures in a row the
primary is bypassed for ``cooldown_s`` (``circuit_open``), then probed again with the next batch.
The circuit breaker reads an injected clock, so its timing is tested without sleeping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from engine.lanes import Predictor
from engine.model import Prediction

log = logging.getLogger(__name__)

REASONS = ("timeout", "oom", "error", "circuit_open", "busy")
# Three failures in a row is a device in trouble, not one unlucky batch; thirty seconds keeps a
# stuck GPU from costing every batch its deadline while leaving it a chance to recover soon.
FAILURE_THRESHOLD = 3
COOLDOWN_S = 30.0


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class CircuitBreaker:
    """Closed: use the primary. Open: bypass it until ``cooldown_s`` passes, then probe once."""

    def __init__(
        self,
        failure_threshold: int = FAILURE_THRESHOLD,
        cooldown_s: float = COOLDOWN_S,
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


class _PrimaryFailed(Exception):
    def __init__(self, reason: str, cause: BaseException | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause


class FallbackPredictor:
    def __init__(
        self,
        primary: Predictor,
        fallback: Predictor,
        *,
        deadline_s: float = 1.0,
        breaker: CircuitBreaker | None = None,
        on_fallback: Callable[[str], None] | None = None,
    ) -> None:
        self.primary = primary
        self.fallback = fallback
        self.device = primary.device
        self.deadline_s = deadline_s
        self.breaker = breaker or CircuitBreaker()
        self._on_fallback = on_fallback or (lambda reason: None)
        self._primary_busy = False

    def predict(self, windows: np.ndarray, *, embeddings: bool = False) -> Prediction:
        if not self.breaker.allow():
            reason = "circuit_open"
        elif self._primary_busy:
            reason = "busy"
        else:
            try:
                prediction = self._call_primary(windows, embeddings)
                self.breaker.success()
                return prediction
            except _PrimaryFailed as failed:
                reason = failed.reason
                self.breaker.failure()
                log.warning(
                    "primary device failed; recomputing on %s",
                    self.fallback.device,
                    extra={"reason": reason, "cause": repr(failed.cause)},
                )
        self._on_fallback(reason)
        prediction = self.fallback.predict(windows, embeddings=embeddings)
        prediction.device = self.fallback.device
        prediction.fallback_reason = reason
        return prediction

    def _call_primary(self, windows: np.ndarray, embeddings: bool) -> Prediction:
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["prediction"] = self.primary.predict(windows, embeddings=embeddings)
            except BaseException as exc:  # reported to the caller, which falls back
                box["error"] = exc
            finally:
                self._primary_busy = False
                done.set()

        self._primary_busy = True
        threading.Thread(target=run, name="voxaffect-primary", daemon=True).start()
        if not done.wait(self.deadline_s):
            raise _PrimaryFailed("timeout")
        error = box.get("error")
        if error is not None:
            if is_oom(error):
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise _PrimaryFailed("oom", error)
            raise _PrimaryFailed("error", error)
        prediction: Prediction = box["prediction"]
        prediction.device = self.primary.device
        return prediction
