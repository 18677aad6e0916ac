"""The running service's parts, built once: model(s), batcher, metrics, store and sessions.

The model loads (and is warmed up) here, before the HTTP port is opened, so a server that
accepts connections can analyse. On a GPU, a CPU copy is loaded as the fallback for batches that
miss their deadline or run out of GPU memory.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.batcher import InferenceBatcher, Predictor
from engine.model import load_model
from engine.prosody import Prosody, measure
from server.concurrency import eventlet_active, offload
from server.metrics import Metrics
from server.prosody_pool import ProsodyPool
from server.sessions import SessionRegistry
from server.settings import Settings
from server.store import Store

if TYPE_CHECKING:
    from server.streaming import Streams

log = logging.getLogger(__name__)


class Service:
    def __init__(
        self, settings: Settings, model: Predictor, fallback: Predictor | None = None
    ) -> None:
        self.settings = settings
        self.model = model
        self.model_info: dict[str, Any] = model.describe()  # type: ignore[attr-defined]
        labels = tuple(self.model_info["labels"])
        self.metrics = Metrics(labels)
        self.metrics.describe_model(self.model_info)
        self.batcher = InferenceBatcher(
            model,
            fallback,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            deadline_s=settings.deadline_s,
            offload=offload,
            observer=self.metrics,
            lanes=settings.cpu_lanes,
            cpu_threads=settings.cpu_threads or os.cpu_count() or 1,
        )
        self.store = Store(settings.db)
        # Under eventlet, Praat must run in other processes (it holds the GIL); else in-process.
        self.prosody = ProsodyPool(settings.prosody_workers) if eventlet_active() else None
        self.registry = SessionRegistry(settings.max_sessions)
        self.streams: Streams | None = None  # set by create_app, which owns the Socket.IO server
        self.ready = True
        self.metrics.ready.set(1)
        if str(model.device).startswith("cuda"):
            self.metrics.enable_gpu()

    @classmethod
    def load(cls, settings: Settings) -> Service:
        started = time.perf_counter()
        threads = settings.cpu_threads or None
        model = load_model(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            hub=settings.hub,
            threads=threads,
        )
        fallback = None
        if model.device.startswith("cuda") and settings.cpu_fallback:
            fallback = load_model(settings.model, device="cpu", dtype="auto", hub=settings.hub)
        log.info(
            "model ready",
            extra={
                **model.describe(),
                "fallback": bool(fallback),
                "load_s": round(time.perf_counter() - started, 1),
            },
        )
        if model.random_weights:
            log.warning(
                "RANDOM-WEIGHT model: results are noise, not emotions (made by random-model)"
            )
        return cls(settings, model, fallback)

    def measure(self, samples: np.ndarray, narrowband: bool) -> Prosody:
        """A window's prosody without holding the hub (call from a greenthread)."""
        if self.prosody is not None:
            return self.prosody.measure(samples, narrowband)
        return offload(measure, samples, narrowband=narrowband)

    def close(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        self.batcher.close()
        self.store.close()
        if self.prosody is not None:
            self.prosody.close()
