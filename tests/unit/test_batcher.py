from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from engine.batcher import CircuitBreaker, InferenceBatcher
from engine.model import Prediction

pytestmark = pytest.mark.unit


class FakeModel:
    """Echoes each window's first sample as its 'probability'; records how it was called."""

    def __init__(self, device: str = "cpu", delay_s: float = 0.0, error: Exception | None = None):
        self.device = device
        self.delay_s = delay_s
        self.error = error
        self.batches: list[int] = []
        self.threads: list[str] = []

    def predict(self, windows: np.ndarray, *, embeddings: bool = False) -> Prediction:
        self.threads.append(threading.current_thread().name)
        self.batches.append(windows.shape[0])
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        first = windows[:, 0]
        return Prediction(np.stack([first, 1 - first], axis=1))


class SlowPrimary:
    """A real model behind an injected delay or failure, standing in for a stuck or full GPU."""

    def __init__(self, model, delay_s: float = 0.0, error: Exception | None = None):
        self.model, self.delay_s, self.error, self.calls = model, delay_s, error, 0
        self.device = "cuda:0"

    def predict(self, windows, *, embeddings=False):
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return self.model.predict(windows, embeddings=embeddings)


def window(value: float, n: int = 400) -> np.ndarray:
    return np.full(n, value, dtype=np.float32)


def test_requests_are_batched_up_to_max_batch_in_order():
    model = FakeModel(delay_s=0.05)
    batcher = InferenceBatcher(model, max_batch=4, max_wait_ms=200)
    futures = [batcher.submit(window(i / 10)) for i in range(10)]
    results = [f.result(timeout=5) for f in futures]
    assert [round(float(r.probs[0]), 2) for r in results] == [i / 10 for i in range(10)]
    assert max(model.batches) == 4
    assert sum(model.batches) == 10
    batcher.close()


def test_a_partial_batch_runs_after_max_wait():
    model = FakeModel()
    batcher = InferenceBatcher(model, max_batch=8, max_wait_ms=50)
    started = time.perf_counter()
    result = batcher.submit(window(0.3)).result(timeout=5)
    waited = time.perf_counter() - started
    assert result.batch_size == 1
    assert 0.04 <= waited < 1.0
    batcher.close()


def test_the_model_runs_on_the_worker_thread():
    model = FakeModel()
    batcher = InferenceBatcher(model, max_wait_ms=1)
    batcher.submit(window(0.1)).result(timeout=5)
    assert model.threads == ["voxaffect-batcher"]
    batcher.close()


def test_windows_of_different_lengths_are_never_stacked_together():
    model = FakeModel(delay_s=0.05)
    batcher = InferenceBatcher(model, max_batch=8, max_wait_ms=100)
    futures = [batcher.submit(window(0.5, n=400 + 100 * (i % 2))) for i in range(6)]
    sizes = sorted(f.result(timeout=5).batch_size for f in futures)
    assert sizes == [3] * 6
    batcher.close()


def test_an_error_reaches_every_request_of_the_batch_and_the_worker_carries_on():
    model = FakeModel(error=RuntimeError("boom"), delay_s=0.02)
    batcher = InferenceBatcher(model, max_batch=4, max_wait_ms=100)
    failed = [batcher.submit(window(0.1)) for _ in range(3)]
    for f in failed:
        with pytest.raises(RuntimeError, match="boom"):
            f.result(timeout=5)
    model.error = None
    assert float(batcher.submit(window(0.7)).result(timeout=5).probs[0]) == pytest.approx(0.7)
    batcher.close()


def test_a_model_returning_the_wrong_count_fails_the_batch():
    class Short(FakeModel):
        def predict(self, windows, *, embeddings=False):
            return Prediction(np.zeros((windows.shape[0] - 1, 2), np.float32))

    batcher = InferenceBatcher(Short(), max_batch=4, max_wait_ms=100)
    futures = [batcher.submit(window(0.1)) for _ in range(2)]
    for f in futures:
        with pytest.raises(RuntimeError, match="1 results for 2 inputs"):
            f.result(timeout=5)
    batcher.close()


def test_close_finishes_what_was_queued_and_refuses_more():
    model = FakeModel(delay_s=0.05)
    batcher = InferenceBatcher(model, max_batch=1, max_wait_ms=0)
    futures = [batcher.submit(window(0.1)) for _ in range(3)]
    batcher.close()
    assert all(f.result(timeout=5).batch_size == 1 for f in futures)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(window(0.1)).result(timeout=1)


# --- fallback ------------------------------------------------------------------------------


def speech_windows(n: int = 2) -> np.ndarray:
    rng = np.random.default_rng(3)
    return (rng.standard_normal((n, 32000)) * 0.1).astype(np.float32)


def cpu_time(model, x) -> float:
    started = time.perf_counter()
    model.predict(x[None])
    return time.perf_counter() - started


def test_a_slow_primary_is_answered_by_the_cpu_within_deadline_plus_cpu_time(tiny_model):
    x = speech_windows(1)[0]
    cpu_s = cpu_time(tiny_model, x)
    primary = SlowPrimary(tiny_model, delay_s=3.0)
    batcher = InferenceBatcher(primary, tiny_model, deadline_s=0.3, max_wait_ms=1)
    started = time.perf_counter()
    result = batcher.submit(x).result(timeout=10)
    elapsed = time.perf_counter() - started
    assert result.device == "cpu"
    assert result.fallback_reason == "timeout"
    assert elapsed < 0.3 + cpu_s + 0.25
    np.testing.assert_allclose(result.probs, tiny_model.predict(x[None]).probs[0], atol=1e-6)
    batcher.close(timeout_s=0.1)


def test_cuda_oom_on_the_primary_falls_back_to_the_cpu(tiny_model):
    x = speech_windows(1)[0]
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    batcher = InferenceBatcher(
        SlowPrimary(tiny_model, error=oom), tiny_model, deadline_s=1.0, max_wait_ms=1
    )
    started = time.perf_counter()
    result = batcher.submit(x).result(timeout=10)
    assert (result.device, result.fallback_reason) == ("cpu", "oom")
    assert time.perf_counter() - started < 1.0 + cpu_time(tiny_model, x)
    batcher.close()


def test_a_healthy_primary_answers_itself(tiny_model):
    primary = SlowPrimary(tiny_model)
    batcher = InferenceBatcher(primary, tiny_model, deadline_s=5.0, max_wait_ms=1)
    result = batcher.submit(speech_windows(1)[0]).result(timeout=10)
    assert (result.device, result.fallback_reason) == ("cuda:0", None)
    batcher.close()


def test_repeated_failures_bypass_the_primary_then_probe_it_again(tiny_model):
    primary = SlowPrimary(tiny_model, error=torch.cuda.OutOfMemoryError("CUDA out of memory"))
    batcher = InferenceBatcher(
        primary, tiny_model, deadline_s=1.0, max_wait_ms=1, failure_threshold=2, cooldown_s=0.5
    )
    x = speech_windows(1)[0]
    reasons = [batcher.submit(x).result(timeout=10).fallback_reason for _ in range(4)]
    assert reasons == ["oom", "oom", "circuit_open", "circuit_open"]
    assert primary.calls == 2
    primary.error = None
    time.sleep(0.6)
    probe = batcher.submit(x).result(timeout=10)
    assert (probe.device, probe.fallback_reason) == ("cuda:0", None)
    assert batcher.breaker.state == "closed"
    batcher.close()


def test_circuit_breaker_states():
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=10.0, clock=lambda: now[0])
    breaker.failure()
    breaker.failure()
    assert breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 10.0
    assert breaker.state == "half_open" and breaker.allow()
    breaker.failure()  # the probe failed: a full cool-down again
    assert breaker.state == "open"
    now[0] = 20.0
    breaker.success()
    assert breaker.state == "closed" and breaker.failures == 0


def test_cpu_lanes_split_a_batch_and_keep_its_order():
    model = FakeModel(delay_s=0.05)
    batcher = InferenceBatcher(model, max_batch=4, max_wait_ms=100, lanes=2, cpu_threads=2)
    futures = [batcher.submit(window(i / 10)) for i in range(4)]
    assert [round(float(f.result(timeout=5).probs[0]), 2) for f in futures] == [0.0, 0.1, 0.2, 0.3]
    assert model.batches == [2, 2]
    assert len(set(model.threads)) == 2  # the two halves ran on different threads
    batcher.close()


def test_a_failing_lane_fails_the_whole_batch():
    model = FakeModel(error=RuntimeError("lane broke"))
    batcher = InferenceBatcher(model, max_batch=4, max_wait_ms=100, lanes=2)
    futures = [batcher.submit(window(0.1)) for _ in range(4)]
    for f in futures:
        with pytest.raises(RuntimeError, match="lane broke"):
            f.result(timeout=5)
    batcher.close()
