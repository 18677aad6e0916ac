"""Run a model's ``predict`` off the caller's thread, with a set number of torch threads.

The batcher runs ``lanes`` workers, each one batch at a time; every worker calls the same
:class:`Lane`. Each call is handed to ``offload`` — the default calls it directly; a server under
eventlet passes ``tpool.execute`` so the model runs on a native thread and the event loop carries
on — and on the CPU sets ``threads`` torch threads on the thread that runs it. On two cores, two
one-thread lanes outrun one two-thread call, and far more so while the rest of the server takes
CPU too: an op split over two threads waits for the slower one whenever a core is taken away,
and much of the model is memory-bound element-wise work that scales poorly across threads.
Which split is fastest is measured (engine/tuning.py).
"""

from __future__ import annotations

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


class Lane:
    def __init__(self, model: Predictor, *, threads: int = 1, offload: Offload = call_directly):
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.model = model
        self.device = model.device
        self.threads = threads
        self._offload = offload

    def predict(self, windows: np.ndarray, *, embeddings: bool = False) -> Prediction:
        def run() -> Prediction:
            if self.device == "cpu":
                torch.set_num_threads(self.threads)  # per OS thread: the one offload runs on
            return self.model.predict(windows, embeddings=embeddings)

        result: Prediction = self._offload(run)
        return result
