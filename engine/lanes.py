"""Run a model's ``predict`` off the caller's thread, split across CPU lanes.

``Lanes`` wraps one model (a predictor). Each call is handed to ``offload`` — the default calls it
directly; a server under eventlet passes ``tpool.execute`` so the model runs on a native thread
and the event loop carries on. On the CPU, ``lanes`` > 1 splits a batch into that many parts
predicted at once, each with ``cpu_threads / lanes`` torch threads: on two cores, two one-thread
lanes can outrun one two-thread call, because much of the model is memory-bound element-wise work
that scales poorly across the threads of one op. Whether they do is measured (engine/tuning.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from engine.model import Prediction

Offload = Callable[..., Any]


def call_directly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


class Predictor(Protocol):
    """What the batcher calls: equal-length windows in, one probability row per window out."""

    device: str

    def predict(self, windows: np.ndarray, *, embeddings: bool = False) -> Prediction: ...


class Lanes:
    def __init__(
        self,
        model: Predictor,
        *,
        lanes: int = 1,
        cpu_threads: int | None = None,
        offload: Offload = call_directly,
    ) -> None:
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {lanes}")
        self.model = model
        self.device = model.device
        self.lanes = lanes if model.device == "cpu" else 1
        self.cpu_threads = cpu_threads or os.cpu_count() or 1
        self._offload = offload

    def _call(self, windows: np.ndarray, embeddings: bool, lanes: int) -> Prediction:
        threads = max(1, self.cpu_threads // lanes)

        def run() -> Prediction:
            if self.device == "cpu":
                torch.set_num_threads(threads)  # per OS thread: the one offload runs this on
            return self.model.predict(windows, embeddings=embeddings)

        return self._offload(run)

    def predict(self, windows: np.ndarray, *, embeddings: bool = False) -> Prediction:
        lanes = min(self.lanes, windows.shape[0])
        if lanes == 1:
            return self._call(windows, embeddings, 1)
        parts = np.array_split(windows, lanes)
        results: list[Any] = [None] * lanes

        def run(i: int) -> None:
            try:
                results[i] = self._call(parts[i], embeddings, lanes)
            except BaseException as exc:  # re-raised by the caller below
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
            device=self.device,
        )
