"""Analyse one window: its emotion probabilities from the batcher and its prosody, at once.

The window goes to the batcher first, with its deadline and track; once a batcher worker takes it
into a batch, its prosody is measured while the model runs (in a worker process under eventlet),
so a window that expires in the queue costs no prosody either. Both have a time limit. A window
whose prosody cannot be measured — the worker died, hung past ``prosody_timeout_s`` or failed —
is still analysed, without prosody, and says why. A window the model does not answer within
``inference_timeout_s``, or fails on, raises :class:`AnalysisError` with the protocol code to
report; one the batcher drops because it could no longer be answered in time raises the
batcher's :class:`WindowExpired`. An utterance (priority ``utterance``) may wait for idle model
time until its ``deadline``; the time limit counts from then.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np

from engine.batcher import InferenceBatcher, WindowExpired
from engine.model import WindowAnswer
from engine.prosody import Prosody
from server.sessions.prosody_pool import ProsodyUnavailable

log = logging.getLogger(__name__)

Measure = Callable[[np.ndarray, bool], Prosody]


class AnalysisError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class Analysis:
    answer: WindowAnswer  # what the model said, whole
    prosody: Prosody
    prosody_missing: str | None = None  # why prosody is missing, None when it was measured


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
        self,
        samples: np.ndarray,
        *,
        narrowband: bool,
        embeddings: bool,
        priority: str,
        deadline: float | None = None,
        key: Hashable = None,
    ) -> Analysis:
        started = threading.Event()
        future = self.batcher.submit(
            samples,
            embeddings=embeddings,
            priority=priority,
            deadline=deadline,
            key=key,
            on_start=started.set,
        )
        future.add_done_callback(lambda _: started.set())
        wait_s = self.inference_timeout_s
        if priority == "utterance" and deadline is not None:  # idle time may be a while coming
            wait_s += max(0.0, deadline - time.monotonic())
        until = time.monotonic() + wait_s
        if not started.wait(wait_s):
            future.cancel()  # the batcher skips it if it has not started yet
            raise AnalysisError(
                "INFERENCE_TIMEOUT", f"no result within {self.inference_timeout_s:g} s"
            )
        if future.done() and isinstance(exc := future.exception(), WindowExpired):
            raise WindowExpired(str(exc), exc.reason) from None
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
            answer = future.result(timeout=max(0.0, until - time.monotonic()))
        except concurrent.futures.TimeoutError:
            future.cancel()  # the batcher skips it if it has not started yet
            raise AnalysisError(
                "INFERENCE_TIMEOUT", f"no result within {self.inference_timeout_s:g} s"
            ) from None
        except Exception as exc:
            raise AnalysisError("INFERENCE_FAILED", f"inference failed: {exc}") from exc
        return Analysis(answer.answer, prosody, missing)
