"""The running service's parts, built once before the port opens: the model behind its batcher,
prosody, window analysis, metrics, the store and the registry of live sessions.

The model loads (and is warmed up) here, so a server that accepts connections can analyse. On a
GPU, a CPU copy is loaded as the fallback for batches that miss their deadline or run out of GPU
memory. The network edge (server/app.py) is built on top of a Service.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from engine.batcher import InferenceBatcher
from engine.fallback import CircuitBreaker, FallbackPredictor
from engine.lanes import Lanes, Predictor
from engine.model import EmotionModel, load_model
from engine.prosody import Prosody
from server import wire
from server.analysis import WindowAnalyser
from server.metrics import Metrics
from server.prosody_pool import InProcessProsody, ProsodyPool
from server.runtime import EventletRuntime, ThreadRuntime
from server.sessions import SessionRegistry
from server.settings import Settings
from server.store import Store, redacted

log = logging.getLogger(__name__)

WrapPredictor = Callable[[Predictor], Predictor]


class Service:
    def __init__(
        self,
        settings: Settings,
        runtime: ThreadRuntime,
        model: EmotionModel,
        *,
        fallback: EmotionModel | None = None,
        wrap_predictor: WrapPredictor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.clock = clock
        self.model_info: dict[str, Any] = model.describe()
        self.metrics = Metrics(tuple(self.model_info["labels"]))
        self.metrics.describe_model(self.model_info)
        cores = settings.cpu_threads or os.cpu_count() or 1
        predictor: Predictor = Lanes(
            model, lanes=settings.cpu_lanes, cpu_threads=cores, offload=runtime.offload
        )
        if fallback is not None:
            predictor = FallbackPredictor(
                predictor,
                Lanes(
                    fallback, lanes=settings.cpu_lanes, cpu_threads=cores, offload=runtime.offload
                ),
                deadline_s=settings.deadline_s,
                breaker=CircuitBreaker(clock=clock),
                on_fallback=self.metrics.fallback,
            )
        if wrap_predictor is not None:
            predictor = wrap_predictor(predictor)
        self.batcher = InferenceBatcher(
            predictor,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            bulk_max_batch=max(1, settings.cpu_lanes),
            observer=self.metrics,
        )
        self.prosody: ProsodyPool | InProcessProsody = (
            ProsodyPool(runtime, settings.prosody_workers, settings.prosody_timeout_s)
            if isinstance(runtime, EventletRuntime)  # Praat holds the GIL: other processes
            else InProcessProsody(runtime)
        )
        self.analyser = WindowAnalyser(
            self.batcher,
            self.prosody.measure,
            inference_timeout_s=settings.inference_timeout_s,
            on_prosody_failure=lambda reason: self.metrics.prosody_failures.labels(reason).inc(),
        )
        self.store = Store(
            settings.db,
            runtime=runtime,
            node=settings.node or f"{socket.gethostname()}:{settings.port}",
            on_error=lambda kind: self.metrics.store_errors.labels(kind).inc(),
        )
        self.store.start()
        self.registry = SessionRegistry(settings.max_sessions, clock=clock)
        self.ready = True
        self.metrics.ready.set(1)
        if model.device.startswith("cuda"):
            self.metrics.enable_gpu()
        self.close_interrupted()

    @classmethod
    def load(
        cls,
        settings: Settings,
        runtime: ThreadRuntime,
        *,
        wrap_predictor: WrapPredictor | None = None,
    ) -> Service:
        started = time.perf_counter()
        threads = settings.cpu_threads or None
        model = load_model(
            settings.model,
            device=settings.device,
            dtype="fp32",
            hub=settings.hub,
            threads=threads,
            trusted=settings.trust_checkpoint,
        )
        serving, fallback = model, None
        if model.device.startswith("cuda"):
            dtype = "fp16" if settings.dtype == "auto" else settings.dtype
            serving = model.converted(dtype)
            if settings.cpu_fallback:
                fallback = model.converted("fp32", device="cpu")
        elif settings.dtype not in ("auto", "fp32"):
            serving = model.converted(settings.dtype)
        serving.predict(np.zeros((1, 32000), np.float32))  # one-off kernel setup: not a client's
        log.info(
            "model ready",
            extra={
                **serving.describe(),
                "fallback": bool(fallback),
                "load_s": round(time.perf_counter() - started, 1),
            },
        )
        if serving.random_weights:
            log.warning(
                "RANDOM-WEIGHT model: results are noise, not emotions (made by random-model)"
            )
        return cls(settings, runtime, serving, fallback=fallback, wrap_predictor=wrap_predictor)

    def measure(self, samples: np.ndarray, narrowband: bool) -> Prosody:
        return self.prosody.measure(samples, narrowband)

    def close_interrupted(self) -> int:
        """Sessions this node left open when it was killed: closed as ``interrupted``, with a
        summary built from their stored results."""
        closed = 0
        for session_id in self.store.open_sessions_of_this_node():
            stored = self.store.get_session(session_id)
            if stored is None:
                continue
            summary = wire.summary_of_stored(stored, "interrupted")
            self.store.close_session(session_id, summary, ended_at=time.time())
            closed += 1
        if closed:
            self.store.flush()
            log.warning("closed sessions a previous run left open", extra={"sessions": closed})
        return closed

    def describe_store(self) -> dict[str, Any]:
        return {
            "backend": self.store.backend,
            "url": redacted(self.store.url),
            "degraded": self.store.degraded,
        }

    def close(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        self.batcher.close()
        self.store.close()
        self.prosody.close()
