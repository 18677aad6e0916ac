"""The batcher, CPU lanes and the GPU fallback, with scripted fakes: no test waits on this CPU's
speed. A gated fake holds the worker inside a batch while the test queues more, so what the
next batches hold is decided by the test, not by timing."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from engine.batcher import BatcherClosed, InferenceBatcher
from engine.fallback import CircuitBreaker, FallbackPredictor
from engine.lanes import Lanes
from engine.model import Prediction

pytestmark = pytest.mark.unit
WAIT_S = 30  # a generous bound for results that arrive as soon as the test lets them


class FakeModel:
    """Echoes each window's first sample as its 'probability'; records how it was called.
    With ``hold`` set, every call waits until the test sets ``release``."""

    def __init__(self, device: str = "cpu", error: Exception | None = None, hold: bool = False):
        self.device = device
        self.error = error
        self.hold = hold
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list[float]] = []
        self.threads: list[str] = []

    def predict(self, windows: np.ndarray, *, embeddings: bool = False) -> Prediction:
        self.threads.append(threading.current_thread().name)
        self.batches.append([round(float(v), 3) for v in windows[:, 0]])
        self.entered.set()
        if self.hold:
            assert self.release.wait(WAIT_S), "the test never released the model"
        if self.error is not None:
            raise self.error
        first = windows[:, 0]
        return Prediction(np.stack([first, 1 - first], axis=1), device=self.device)


def window(value: float, n: int = 400) -> np.ndarray:
    return np.full(n, value, dtype=np.float32)


def held(model: FakeModel, batcher: InferenceBatcher, value: float = 9.0):
    """Submit one request and wait until the worker is inside the model with it."""
    future = batcher.submit(window(value))
    assert model.entered.wait(WAIT_S)
    return future


def test_requests_are_batched_up_to_max_batch_in_order():
    model = FakeModel(hold=True)
    batcher = InferenceBatcher(model, max_batch=4, max_wait_ms=0)
    first = held(model, batcher)
    futures = [batcher.submit(window(i / 10)) for i in range(9)]
    model.release.set()
    results = [f.result(timeout=WAIT_S) for f in futures]
    assert first.result(timeout=WAIT_S).batch_size == 1
    assert [round(float(r.probs[0]), 2) for r in results] == [i / 10 for i in range(9)]
    assert [len(b) for b in model.batches] == [1, 4, 4, 1]
    batcher.close()


def test_a_partial_batch_runs_after_max_wait():
    model = FakeModel()
    batcher = InferenceBatcher(model, max_batch=8, max_wait_ms=50)
    started = time.perf_counter()
    result = batcher.submit(window(0.3)).result(timeout=WAIT_S)
    assert result.batch_size == 1
    assert time.perf_counter() - started >= 0.05  # it waited for company, then ran alone
    batcher.close()


def test_the_model_runs_on_the_worker_thread():
    model = FakeModel()
    batcher = InferenceBatcher(model, max_wait_ms=1)
    batcher.submit(window(0.1)).result(timeout=WAIT_S)
    assert model.threads == ["voxaffect-batcher"]
    batcher.close()


def test_windows_of_different_lengths_are_never_stacked_together():
    model = FakeModel(hold=True)
    batcher = InferenceBatcher(model, max_batch=8, max_wait_ms=0)
    held(model, batcher)
    futures = [batcher.submit(window(0.5, n=400 + 100 * (i % 2))) for i in range(6)]
    model.release.set()
    sizes = sorted(f.result(timeout=WAIT_S).batch_size for f in futures)
    assert sizes == [3] * 6
    batcher.close()


def test_an_error_reaches_every_request_of_the_batch_and_the_worker_carries_on():
    model = FakeModel(error=RuntimeError("boom"), hold=True)
    batcher = InferenceBatcher(model, max_batch=4, max_wait_ms=0)
    first = held(model, batcher)
    failed = [batcher.submit(window(0.1)) for _ in range(3)]
    model.release.set()
    for f in [first, *failed]:
        with pytest.raises(RuntimeError, match="boom"):
            f.result(timeout=WAIT_S)
    model.error = None
    result = batcher.submit(window(0.7)).result(timeout=WAIT_S)
    assert float(result.probs[0]) == pytest.approx(0.7)
    batcher.close()


def test_a_model_returning_the_wrong_count_fails_the_batch():
    class Short(FakeModel):
        def predict(self, windows, *, embeddings=False):
            return Prediction(np.zeros((windows.shape[0] - 1, 2), np.float32))

    model = Short(hold=True)
    batcher = InferenceBatcher(model, max_batch=4, max_wait_ms=0)
    futures = [batcher.submit(window(0.1)) for _ in range(2)]
    for f in futures:
        with pytest.raises(RuntimeError, match=r"\d results for \d inputs"):
            f.result(timeout=WAIT_S)
    batcher.close()


def test_close_finishes_what_was_queued_and_refuses_more():
    model = FakeModel(hold=True)
    batcher = InferenceBatcher(model, max_batch=1, max_wait_ms=0)
    futures = [held(model, batcher)] + [batcher.submit(window(0.1)) for _ in range(2)]
    closer = threading.Thread(target=batcher.close, kwargs={"timeout_s": WAIT_S})
    closer.start()
    model.release.set()
    closer.join()
    assert all(f.result(timeout=WAIT_S).batch_size == 1 for f in futures)
    with pytest.raises(BatcherClosed):
        batcher.submit(window(0.1)).result(timeout=WAIT_S)


def test_live_windows_go_before_bulk_ones_and_bulk_batches_stay_small():
    model = FakeModel(hold=True)
    batcher = InferenceBatcher(model, max_batch=8, max_wait_ms=0, bulk_max_batch=2)
    held(model, batcher)
    bulk = [batcher.submit(window(0.1 * (i + 1)), priority="bulk") for i in range(5)]
    live = batcher.submit(window(0.9))
    model.release.set()
    for f in [live, *bulk]:
        f.result(timeout=WAIT_S)
    assert model.batches[1] == [0.9]  # the live window, though it came last
    assert model.batches[2:] == [[0.1, 0.2], [0.3, 0.4], [0.5]]
    batcher.close()


def test_a_request_its_caller_gave_up_on_is_not_computed():
    model = FakeModel(hold=True)
    batcher = InferenceBatcher(model, max_batch=8, max_wait_ms=0)
    held(model, batcher)
    dropped, kept = batcher.submit(window(0.2)), batcher.submit(window(0.3))
    assert dropped.cancel()
    model.release.set()
    kept.result(timeout=WAIT_S)
    assert model.batches[1] == [0.3]
    batcher.close()


# --- lanes ---------------------------------------------------------------------------------


def test_cpu_lanes_split_a_batch_and_keep_its_order():
    model = FakeModel()
    lanes = Lanes(model, lanes=2, cpu_threads=2)
    prediction = lanes.predict(np.stack([window(i / 10) for i in range(4)]))
    assert [round(float(p), 2) for p in prediction.probs[:, 0]] == [0.0, 0.1, 0.2, 0.3]
    assert sorted(model.batches) == [[0.0, 0.1], [0.2, 0.3]]
    assert len(set(model.threads)) == 2  # the two halves ran on different threads


def test_a_failing_lane_fails_the_whole_batch():
    lanes = Lanes(FakeModel(error=RuntimeError("lane broke")), lanes=2)
    with pytest.raises(RuntimeError, match="lane broke"):
        lanes.predict(np.stack([window(0.1)] * 4))


def test_lanes_run_the_model_through_offload():
    calls = []

    def offload(fn, *args, **kwargs):
        calls.append(threading.current_thread().name)
        return fn(*args, **kwargs)

    Lanes(FakeModel(), lanes=1, offload=offload).predict(np.stack([window(0.1)]))
    assert len(calls) == 1


# --- GPU fallback --------------------------------------------------------------------------


class Primary:
    """A real model behind a scripted failure or a hold, standing in for a stuck or full GPU."""

    def __init__(self, model, *, error: Exception | None = None, hold: bool = False):
        self.model, self.error, self.hold = model, error, hold
        self.release = threading.Event()
        self.finished = threading.Event()
        self.calls = 0
        self.device = "cuda:0"

    def predict(self, windows, *, embeddings=False):
        self.calls += 1
        try:
            if self.hold:
                assert self.release.wait(WAIT_S)
            if self.error is not None:
                raise self.error
            return self.model.predict(windows, embeddings=embeddings)
        finally:
            self.finished.set()


def speech_windows(n: int = 1) -> np.ndarray:
    rng = np.random.default_rng(3)
    return (rng.standard_normal((n, 32000)) * 0.1).astype(np.float32)


def test_a_stuck_primary_is_answered_by_the_cpu_after_the_deadline(tiny_model):
    x = speech_windows()
    primary = Primary(tiny_model, hold=True)
    reasons: list[str] = []
    predictor = FallbackPredictor(primary, tiny_model, deadline_s=0.2, on_fallback=reasons.append)
    prediction = predictor.predict(x)
    assert (prediction.device, prediction.fallback_reason) == ("cpu", "timeout")
    assert not primary.finished.is_set()  # answered while the primary was still stuck
    np.testing.assert_allclose(prediction.probs, tiny_model.predict(x).probs, atol=1e-6)
    # while the timed-out call still holds the primary, batches go straight to the CPU
    assert predictor.predict(x).fallback_reason == "busy"
    assert reasons == ["timeout", "busy"] and primary.calls == 1
    primary.release.set()


def test_cuda_oom_on_the_primary_falls_back_to_the_cpu(tiny_model):
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    predictor = FallbackPredictor(Primary(tiny_model, error=oom), tiny_model, deadline_s=WAIT_S)
    prediction = predictor.predict(speech_windows())
    assert (prediction.device, prediction.fallback_reason) == ("cpu", "oom")


def test_a_healthy_primary_answers_itself(tiny_model):
    predictor = FallbackPredictor(Primary(tiny_model), tiny_model, deadline_s=WAIT_S)
    prediction = predictor.predict(speech_windows())
    assert (prediction.device, prediction.fallback_reason) == ("cuda:0", None)


def test_repeated_failures_bypass_the_primary_then_probe_it_again(tiny_model):
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=30.0, clock=lambda: now[0])
    primary = Primary(tiny_model, error=torch.cuda.OutOfMemoryError("CUDA out of memory"))
    predictor = FallbackPredictor(primary, tiny_model, deadline_s=WAIT_S, breaker=breaker)
    x = speech_windows()
    reasons = [predictor.predict(x).fallback_reason for _ in range(4)]
    assert reasons == ["oom", "oom", "circuit_open", "circuit_open"]
    assert primary.calls == 2
    primary.error = None
    now[0] = 30.0  # the cool-down has passed: the next batch probes the primary
    probe = predictor.predict(x)
    assert (probe.device, probe.fallback_reason) == ("cuda:0", None)
    assert breaker.state == "closed"


def test_the_batcher_reports_where_each_window_was_computed(tiny_model):
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory")
    predictor = FallbackPredictor(Primary(tiny_model, error=oom), tiny_model, deadline_s=WAIT_S)
    batcher = InferenceBatcher(predictor, max_wait_ms=0)
    result = batcher.submit(speech_windows()[0]).result(timeout=WAIT_S)
    assert (result.device, result.fallback_reason) == ("cpu", "oom")
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
