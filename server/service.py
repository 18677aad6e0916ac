"""The running service's parts, built once before the port opens: the model behind its batcher,
prosody, window analysis, metrics, the store and the registry of live sessions.

The model loads (and is warmed up) here, so a server that accepts connections can analyse. On a
GPU, a CPU copy is loaded as the fallback for batches that miss their deadline or run out of GPU
memory. The network edge (server/app.py) is built on top of a Service.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import SAMPLE_RATE
from engine.batcher import InferenceBatcher
from engine.fallback import CircuitBreaker, FallbackPredictor
from engine.lanes import Lane, Predictor
from engine.model import EmotionModel, load_model, traced_batch_sizes
from engine.prosody import Prosody
from engine.tuning import (
    SERVING_LOAD_SHARE,
    Choice,
    ChoiceCache,
    fingerprint,
    machine_key,
    tune,
)
from server.runtime import EventletRuntime, ThreadRuntime
from server.sessions import wire
from server.sessions.analysis import WindowAnalyser
from server.sessions.prosody_pool import InProcessProsody, ProsodyPool
from server.sessions.registry import SessionRegistry
from server.settings import Settings
from server.sinks.metrics import Load, Metrics
from server.sinks.store import Store, redacted

log = logging.getLogger(__name__)
# How long a restarted node waits for the sessions its previous run left open to be committed as
# interrupted before it says it is ready (a busy database or CPU can take seconds)
RECOVERY_FLUSH_S = 30.0
# What a result takes from the model's answer to its client (prosody is measured meanwhile;
# then scoring, the store's commit and the emit): the batcher keeps it out of the latency budget.
DELIVERY_S = 0.1

WrapPredictor = Callable[[Predictor], Predictor]


class Service:
    def __init__(
        self,
        settings: Settings,
        runtime: ThreadRuntime,
        model: EmotionModel,
        choice: Choice,
        *,
        fallback: EmotionModel | None = None,
        wrap_predictor: WrapPredictor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.clock = clock
        self.choice = choice
        self.model_info: dict[str, Any] = {
            **model.describe(),
            "max_batch": choice.max_batch,
            "lanes": choice.lanes,
            "tuning": choice.describe(),
        }
        self.metrics = Metrics(tuple(self.model_info["labels"]))
        self.metrics.describe_model(self.model_info)
        cores = settings.cpu_threads or os.cpu_count() or 1
        predictor: Predictor = Lane(
            model, threads=max(1, cores // choice.lanes), offload=runtime.offload
        )
        if fallback is not None:
            predictor = FallbackPredictor(
                predictor,
                Lane(fallback, threads=cores, offload=runtime.offload),
                deadline_s=settings.deadline_s,
                breaker=CircuitBreaker(clock=clock),
                on_fallback=self.metrics.fallback,
            )
        if wrap_predictor is not None:
            predictor = wrap_predictor(predictor)
        self.batcher = InferenceBatcher(
            predictor,
            max_batch=choice.max_batch,
            max_wait_ms=settings.max_wait_ms,
            bulk_max_batch=1,
            lanes=choice.lanes,
            # a window takes (wall time per window with every lane busy) x lanes in its lane
            # (as set by hand, unmeasured: a guess the first batches correct)
            seconds_per_window=choice.ms_per_window / 1000 * choice.lanes or 0.1,
            slack_s=DELIVERY_S,
            observer=self.metrics,
            clock=clock,
        )
        self.prosody: ProsodyPool | InProcessProsody = (
            ProsodyPool(runtime, settings.prosody_workers, settings.prosody_timeout_s)
            if isinstance(runtime, EventletRuntime)  # openSMILE, killable in a process
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
            node=settings.node_name,
            buffer_max=settings.store_buffer_writes,
            on_error=lambda kind: self.metrics.store_errors.labels(kind).inc(),
        )
        self.store.start()
        self.registry = SessionRegistry(settings.max_sessions, clock=clock)
        self.ready = True
        self.draining = False  # SIGTERM: new sessions go elsewhere, running ones carry on
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
        threads = settings.cpu_threads or os.cpu_count() or 1
        model = load_model(
            settings.model,
            device=settings.device,
            hub=settings.hub,
            threads=threads,
            trusted=settings.trust_checkpoint,
        )
        choice = choose(settings, model, threads, runtime)
        serving = model if choice.dtype == "fp32" else model.converted(choice.dtype)
        fallback = None
        if model.device.startswith("cuda") and settings.cpu_fallback:
            fallback = model.converted("fp32", device="cpu")
        window = round(settings.window_s * SAMPLE_RATE)
        batches = traced_batch_sizes(choice.max_batch)
        traced = serving.trace(batches, window)  # with torch threads as one lane will have them
        if fallback is not None:
            fallback.trace(batches, window)
        serving.predict(np.zeros((1, window), np.float32))  # one-off kernel setup: not a client's
        log.info(
            "model ready",
            extra={
                **serving.describe(),
                "max_batch": choice.max_batch,
                "lanes": choice.lanes,
                "windows_per_s": round(choice.windows_per_s, 2),
                "tuned": "cache" if choice.from_cache else f"{choice.measured_s:.1f} s",
                "fallback": bool(fallback),
                "traced": [size for size, _ in traced],
                "load_s": round(time.perf_counter() - started, 1),
            },
        )
        if serving.random_weights:
            log.warning(
                "RANDOM-WEIGHT model: results are noise, not emotions (made by random-model)"
            )
        return cls(
            settings, runtime, serving, choice, fallback=fallback, wrap_predictor=wrap_predictor
        )

    def current_load(self) -> Load:
        """Capacity and live demand now (windows a second): saturated past the margin."""
        return Load(
            capacity=self.batcher.capacity_windows_per_s,
            demand=self.batcher.demand_windows_per_s(),
            lanes=self.batcher.lanes,
            margin=self.settings.saturation_margin,
        )

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
        if closed:  # committed before the node says it is ready: readers see them closed
            committed = self.store.flush(timeout_s=RECOVERY_FLUSH_S)
            log.warning(
                "closed sessions a previous run left open",
                extra={"sessions": closed, "committed": committed},
            )
        return closed

    def close_abandoned_handoffs(self, older_than_s: float) -> int:
        """Sessions a draining node handed off that no node continued within ``older_than_s``:
        closed with the summary they had when handed off (blocking)."""
        closed = 0
        for session_id in self.store.stale_handoffs(time.time() - older_than_s):
            row = self.store.take_handoff(session_id=session_id)
            if row is None:  # another node continued (or closed) it meanwhile
                continue
            summary = row["handoff"].get("summary") or {"session_id": session_id}
            self.store.close_session(session_id, summary, ended_at=time.time())
            self.metrics.handoffs.labels("abandoned").inc()
            closed += 1
        if closed:
            log.warning("closed handed-off sessions nobody continued", extra={"sessions": closed})
        return closed

    def describe_store(self) -> dict[str, Any]:
        return {
            "backend": self.store.backend,
            "url": redacted(self.store.url),
            "degraded": self.store.degraded,
        }

    def drain(self) -> None:
        """Stop taking new sessions and analyses (DRAINING); the running ones carry on."""
        self.draining = True
        self.metrics.ready.set(0)

    def close(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        self.batcher.close()
        self.store.close()
        self.prosody.close()


def choose(settings: Settings, model: EmotionModel, threads: int, runtime: ThreadRuntime) -> Choice:
    """dtype, max batch and CPU lanes: as set, or measured on this device (engine/tuning.py)
    and cached per machine, torch version and checkpoint."""
    dtype = None if settings.dtype == "auto" else settings.dtype
    max_batch = None if settings.max_batch == "auto" else int(settings.max_batch)
    lanes = None if settings.cpu_lanes == "auto" else int(settings.cpu_lanes)
    if model.device.startswith("cuda"):
        lanes = 1
    if dtype is not None and max_batch is not None and lanes is not None:
        return Choice(dtype, max_batch, lanes, 0.0, 0.0, 0.0)  # as set: nothing to measure
    fixed = {"dtype": dtype, "max_batch": max_batch, "lanes": lanes}
    key = json.dumps(
        {
            "machine": machine_key(model.device, threads),
            "torch": torch.__version__,
            "checkpoint": fingerprint(model.checkpoint) if model.checkpoint else model.source,
            "fixed": fixed,
        },
        sort_keys=True,
    )
    cache = ChoiceCache(Path(settings.tuning_cache).expanduser())
    if not settings.retune:
        cached = cache.get(key)
        if cached is not None:
            log.info("tuning from the cache", extra=cached.describe())
            return cached
    log.info("measuring dtype, batch size and lanes on this device (cached afterwards)")

    def convert(dtype: str) -> EmotionModel:
        return model if dtype == "fp32" else model.converted(dtype)

    choice = tune(
        convert,
        device=model.device,
        dtypes=(dtype,) if dtype else None,
        batches=(max_batch,) if max_batch else (1, 2, 4, 8),
        lanes=(lanes,) if lanes else tuple(sorted({1, threads})),
        cpu_threads=threads,
        batch_budget_s=min(settings.deadline_s, settings.latency_budget_s / 2),
        background_share=SERVING_LOAD_SHARE,
        offload=runtime.offload,
    )
    log.info("tuned", extra={**choice.describe(), "candidates": len(choice.candidates)})
    for row in choice.candidates:
        log.debug("tuning candidate", extra=row)
    cache.put(key, choice)
    return choice
