"""Prometheus metrics, all prefixed ``voxaffect_``, on a registry of their own.

Counters end in ``_total`` and durations in ``_seconds``; no label carries a session id. Known
label values are created up front so dashboards show zeros rather than gaps. GPU gauges exist only
when a CUDA device does (absent, not zero, without one).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from engine.fallback import REASONS as FALLBACK_REASONS
from server.edges.listener import REFUSALS
from server.edges.protocol import ERROR_CODES
from server.sessions.events import SKIP_REASONS

disable_created_metrics()  # *_created series only clutter the exposition

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Load:
    """How busy the model is: capacity and live demand in windows a second."""

    capacity: float
    demand: float
    lanes: int
    margin: float

    @property
    def saturated(self) -> bool:
        return self.demand > self.capacity * (1.0 + self.margin)

    @property
    def headroom(self) -> float:
        """Share of the capacity not in demand (negative past saturation)."""
        return 1.0 - self.demand / self.capacity if self.capacity > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "capacity_windows_per_s": round(self.capacity, 2),
            "demand_windows_per_s": round(self.demand, 2),
            "headroom": round(self.headroom, 3),
            "saturated": self.saturated,
        }


PROSODY_FAILURES = ("timeout", "died", "error")
STORE_ERRORS = ("unreachable", "slow", "rejected", "dropped")
WEBHOOK_FAILURES = ("queue_full", "unreachable", "status", "forbidden", "error")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class Metrics:
    def __init__(self, labels: tuple[str, ...] = (), registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if registry is None and PROCESS_COLLECTOR is not None:
            ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes
        p = "voxaffect_"
        self.inference_seconds = Histogram(
            p + "inference_seconds",
            "Model time per batch",
            ["device"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            p + "end_to_end_seconds",
            "Audio received to result emitted, per window",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inferences = Counter(
            p + "inferences", "Windows inferred", ["device", "outcome"], registry=r
        )
        self.batch_size = Histogram(
            p + "batch_size", "Windows per forward pass", buckets=(1, 2, 4, 8, 16, 32), registry=r
        )
        self.queue_depth = Gauge(
            p + "queue_depth", "Windows and utterances waiting for the model", registry=r
        )
        self.hub_lag_seconds = Histogram(
            p + "hub_lag_seconds",
            "How late the event loop woke a 50 ms timer: every client waits this long",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.fallbacks = Counter(
            p + "fallbacks", "Batches recomputed on the CPU", ["reason"], registry=r
        )
        self.windows_skipped = Counter(
            p + "windows_skipped", "Due windows not analysed", ["reason"], registry=r
        )
        self.audio_seconds = Counter(
            p + "audio_received_seconds", "Seconds of audio received", ["source"], registry=r
        )
        self.active_sessions = Gauge(p + "active_sessions", "Open sessions", ["source"], registry=r)
        self.connections = Gauge(p + "connections", "Connected clients", ["transport"], registry=r)
        self.messages_dropped = Counter(
            p + "messages_dropped",
            "Messages dropped unread: more than max_messages_per_s (by transport), or audio "
            "for a session being handed off to another node (handoff)",
            ["transport"],
            registry=r,
        )
        self.connections_refused = Counter(
            p + "connections_refused",
            "Connections refused or closed before a request reached the application, by why",
            ["reason"],
            registry=r,
        )
        self.errors = Counter(p + "errors", "Errors reported to clients", ["code"], registry=r)
        self.utterances = Counter(
            p + "utterances",
            "Utterances by outcome: analysed, or dropped unanalysed: late (no idle model time "
            "within utterance_delay_s), backlog (a track's queue full), ended (still out when "
            "the summary stopped waiting), failed",
            ["outcome"],
            registry=r,
        )
        self.utterance_delay_seconds = Histogram(
            p + "utterance_delay_seconds",
            "From the arrival of an utterance's last audio to its result",
            buckets=(0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0),
            registry=r,
        )
        self.emotion_results = Counter(
            p + "emotion_results", "Results by top emotion", ["emotion"], registry=r
        )
        self.stress_index = Histogram(
            p + "stress_index",
            "Stress index of each result",
            buckets=(10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 100),
            registry=r,
        )
        self.telephony_events = Counter(
            p + "telephony_events", "Telephony stream messages", ["protocol", "kind"], registry=r
        )
        self.prosody_failures = Counter(
            p + "prosody_failures",
            "Windows analysed without prosody, by why (the worker was replaced)",
            ["reason"],
            registry=r,
        )
        self.store_errors = Counter(
            p + "store_errors", "Failed store writes, by kind", ["kind"], registry=r
        )
        self.store_degraded = Gauge(
            p + "store_degraded", "1 while the store is unreachable and writes wait", registry=r
        )
        self.events_dropped = Counter(
            p + "events_dropped",
            "Session events a subscriber lost because it fell behind",
            ["subscriber"],
            registry=r,
        )
        self.alerts = Counter(
            p + "alerts", "Alerts fired, by rule and severity", ["rule", "severity"], registry=r
        )
        self.webhook_failures = Counter(
            p + "webhook_failures",
            "Alert webhook deliveries lost, by why (after every retry)",
            ["reason"],
            registry=r,
        )
        self.scoped_tokens_minted = Counter(
            p + "scoped_tokens_minted",
            "Short-lived tokens minted by POST /api/tokens, by scope",
            ["scope"],
            registry=r,
        )
        self.scoped_tokens_refused = Counter(
            p + "scoped_tokens_refused",
            "Short-lived tokens refused: expired, bad_signature, malformed, reused or scope",
            ["reason"],
            registry=r,
        )
        self.handoffs = Counter(
            p + "session_handoffs",
            "Sessions a draining node handed off (handed_off), continued here from another "
            "node (continued), and handed off but never continued (abandoned)",
            ["event"],
            registry=r,
        )
        self.talk_seconds = Counter(
            p + "talk_seconds",
            "Speech time of ended sessions, by source and party (the VAD's segments)",
            ["source", "party"],
            registry=r,
        )
        self.overtalk_seconds = Counter(
            p + "overtalk_seconds",
            "Time two or more parties of an ended call spoke at once",
            ["source"],
            registry=r,
        )
        self.interruptions = Counter(
            p + "interruptions",
            "Interruptions in ended calls: a party started while another spoke, who gave way",
            ["source", "party"],
            registry=r,
        )
        self.capacity = Gauge(
            p + "capacity_windows_per_second",
            "Live windows a second the model can analyse here, as its batches take now "
            "(measured at start, corrected while serving)",
            registry=r,
        )
        self.demand = Gauge(
            p + "demand_windows_per_second",
            "Live windows that came due a second, over the last 10 s",
            registry=r,
        )
        self.saturated = Gauge(
            p + "saturated",
            "1 while demand exceeds capacity by more than the saturation margin",
            registry=r,
        )
        self.model_utilization = Gauge(
            p + "model_utilization_ratio",
            "Share of the last 10 s the model's lanes were busy",
            registry=r,
        )
        self._busy: deque[tuple[float, float]] = deque()  # (batch end, seconds), last 10 s
        self.ready = Gauge(p + "ready", "1 when the model is loaded and serving", registry=r)
        self.model_info = Info(p + "model", "The loaded model", registry=r)
        self.gpu_utilization: Gauge | None = None
        self.gpu_memory_used: Gauge | None = None
        self.gpu_memory_total: Gauge | None = None

        for device in ("cpu", "cuda"):
            self.inference_seconds.labels(device)
            for outcome in ("ok", "fallback", "error"):
                self.inferences.labels(device, outcome)
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(reason)
        for reason in SKIP_REASONS:
            self.windows_skipped.labels(reason)
        for reason in PROSODY_FAILURES:
            self.prosody_failures.labels(reason)
        for kind in STORE_ERRORS:
            self.store_errors.labels(kind)
        for reason in WEBHOOK_FAILURES:
            self.webhook_failures.labels(reason)
        for name in ("room", "monitor", "metrics", "store", "alerts"):
            self.events_dropped.labels(name)
        for code in ERROR_CODES:
            self.errors.labels(code)
        for label in labels:
            self.emotion_results.labels(label)
        for source in ("socketio", "twilio", "audiofork"):
            self.audio_seconds.labels(source)
            self.active_sessions.labels(source)
        for transport in ("socketio", "telephony"):
            self.connections.labels(transport)
        for reason in REFUSALS:
            self.connections_refused.labels(reason)
        for transport in ("socketio", "telephony"):
            self.messages_dropped.labels(transport)

    def watch_rules(self, rules: list[tuple[str, str]]) -> None:
        """Every configured (rule, severity) from zero, so a quiet rule shows as 0, not absent."""
        for rule, severity in rules:
            self.alerts.labels(rule, severity)

    def enable_gpu(self) -> None:
        r = self.registry
        self.gpu_utilization = Gauge(
            "voxaffect_gpu_utilization_ratio", "GPU busy share (NVML)", ["gpu"], registry=r
        )
        self.gpu_memory_used = Gauge(
            "voxaffect_gpu_memory_used_bytes", "GPU memory in use", ["gpu"], registry=r
        )
        self.gpu_memory_total = Gauge(
            "voxaffect_gpu_memory_total_bytes", "GPU memory size", ["gpu"], registry=r
        )

    def sample_gpu(self) -> None:
        """Read every GPU's utilisation and memory (NVML, else torch's CUDA API)."""
        if self.gpu_utilization is None:
            return
        import torch

        for i in range(torch.cuda.device_count()):
            gpu = str(i)
            with contextlib.suppress(Exception):  # no NVML: utilisation unknown, memory still read
                self.gpu_utilization.labels(gpu).set(torch.cuda.utilization(i) / 100.0)
            free, total = torch.cuda.mem_get_info(i)
            assert self.gpu_memory_used is not None and self.gpu_memory_total is not None
            self.gpu_memory_used.labels(gpu).set(total - free)
            self.gpu_memory_total.labels(gpu).set(total)

    # --- engine.batcher.BatchObserver ---------------------------------------------------------

    def batch_done(self, device: str, size: int, seconds: float, outcome: str) -> None:
        self._busy.append((time.monotonic(), seconds))
        kind = "cuda" if device.startswith("cuda") else "cpu"
        if outcome != "error":
            self.inference_seconds.labels(kind).observe(seconds)
            self.batch_size.observe(size)
        self.inferences.labels(kind, outcome).inc(size)

    def fallback(self, reason: str) -> None:
        self.fallbacks.labels(reason).inc()

    def queue_changed(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def record_dynamics(self, source: str, dynamics: dict[str, Any]) -> None:
        """An ended session's conversation measures (engine/dynamics.py)."""
        for party, measures in dynamics["parties"].items():
            self.talk_seconds.labels(source, party).inc(measures["talk_s"])
            self.interruptions.labels(source, party).inc(measures["interruptions"])
        self.overtalk_seconds.labels(source).inc(dynamics["overtalk_s"])

    def sample_load(self, load: Load, window_s: float = 10.0) -> None:
        """Capacity, demand and the lanes' busy share over the last ``window_s`` (read at each
        scrape)."""
        now = time.monotonic()
        while self._busy and self._busy[0][0] < now - window_s:
            self._busy.popleft()
        busy = sum(min(seconds, end - (now - window_s)) for end, seconds in self._busy)
        self.model_utilization.set(round(min(1.0, busy / window_s / load.lanes), 4))
        self.capacity.set(round(load.capacity, 3))
        self.demand.set(round(load.demand, 3))
        self.saturated.set(int(load.saturated))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def describe_model(self, info: dict[str, Any]) -> None:
        self.model_info.info({k: str(v) for k, v in info.items() if k != "labels"})
