"""Analyse one window: its emotion probabilities from the batcher and its prosody, at once.

The window goes to the batcher first; while the model runs, its prosody is measured (in a worker
process under eventlet). Both have a time limit. A window whose prosody cannot be measured —
the worker died, hung past ``prosody_timeout_s`` or failed — is still analysed, without prosody,
and says why. A window the model does not answer within ``inference_timeout_s``, or fails on,
raises :class:`AnalysisError` with the protocol code to report.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.batcher import InferenceBatcher
from engine.prosody import Prosody

log = logging.getLogger(__name__)

Measure = Callable[[np.ndarray, bool], Prosody]


class ProsodyUnavailable(Exception):
    """Prosody could not be measured for a window; ``reason``: timeout, died or error."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class AnalysisError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class Analysis:
    probs: np.ndarray
    embedding: np.ndarray | None
    device: str
    fallback_reason: str | None
    prosody: Prosody
    prosody_missing: str | None  # why prosody is missing, None when it was measured


class WindowAnalyser:
    def __init__(
        self,
        batcher: InferenceBatcher,
        measure: Measure,
        *,
        inference_timeout_s: float,
        on_prosody_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.batcher = batcher
        self._measure = measure
        self.inference_timeout_s = inference_timeout_s
        self._on_prosody_failure = on_prosody_failure or (lambda reason: None)

    def __call__(
        self, samples: np.ndarray, *, narrowband: bool, embeddings: bool, priority: str
    ) -> Analysis:
        future = self.batcher.submit(samples, embeddings=embeddings, priority=priority)
        missing: str | None = None
        try:
            prosody = self._measure(samples, narrowband)
        except ProsodyUnavailable as exc:
            missing = exc.reason
        except Exception:
            log.exception("measuring prosody failed")
            missing = "error"
        if missing is not None:
            self._on_prosody_failure(missing)
            prosody = Prosody.unmeasured()
        try:
            answer = future.result(timeout=self.inference_timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()  # the batcher skips it if it has not started yet
            raise AnalysisError(
                "INFERENCE_TIMEOUT", f"no result within {self.inference_timeout_s:g} s"
            ) from None
        except Exception as exc:
            raise AnalysisError("INFERENCE_FAILED", f"inference failed: {exc}") from exc
        return Analysis(
            probs=answer.probs,
            embedding=answer.embedding,
            device=answer.device,
            fallback_reason=answer.fallback_reason,
            prosody=prosody,
            prosody_missing=missing,
        )
