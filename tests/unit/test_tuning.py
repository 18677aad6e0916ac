"""Choosing dtype, batch and lanes by measuring: the tuner's logic with scripted models on an
injected clock (no test depends on this CPU's speed), and once on the real tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from engine.model import Prediction
from engine.tuning import Choice, ChoiceCache, tune, tuning_windows
from tests import LABELS

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """A model whose every call costs ``per_window`` (+ ``per_batch``) seconds of the fake clock
    and whose probabilities are fp32's plus ``drift``."""

    def __init__(self, clock: Clock, per_window: float, drift: float = 0.0, per_batch: float = 0.0):
        self.clock, self.per_window, self.drift, self.per_batch = (
            clock,
            per_window,
            drift,
            per_batch,
        )
        self.device = "cpu"
        self.calls = 0

    def predict(self, windows: np.ndarray, *, embeddings: bool = False) -> Prediction:
        self.calls += 1
        self.clock.now += self.per_batch + self.per_window * windows.shape[0]
        probs = np.full((windows.shape[0], len(LABELS)), 1 / len(LABELS), np.float32)
        probs[:, 0] += self.drift
        return Prediction(probs)


def scripted(clock: Clock, **models: Scripted):
    return lambda dtype: models[dtype]


def test_the_fastest_dtype_within_the_drift_limit_wins():
    clock = Clock()
    models = {
        "fp32": Scripted(clock, 0.30),
        "bf16": Scripted(clock, 0.07, drift=0.0009),  # an AVX512-BF16 machine
        "fp16": Scripted(clock, 0.05, drift=0.02),  # faster, but too far from fp32
        "int8": Scripted(clock, 0.10, drift=0.005),
    }
    choice = tune(scripted(clock, **models), device="cpu", lanes=(1,), clock=clock)
    assert choice.dtype == "bf16" and choice.drift == pytest.approx(0.0009, abs=1e-6)
    rejected = {c["dtype"]: c["rejected"] for c in choice.candidates if "rejected" in c}
    assert rejected["fp16"].startswith("drift")


def test_a_dtype_this_cpu_only_emulates_is_dropped_after_one_warm_up_batch():
    clock = Clock()
    emulated = Scripted(clock, 2.5)  # bf16 without hardware support: 8x fp32
    models = {"fp32": Scripted(clock, 0.30), "bf16": emulated, "int8": Scripted(clock, 0.2)}
    choice = tune(
        scripted(clock, **models),
        device="cpu",
        dtypes=("fp32", "bf16", "int8"),
        lanes=(1,),
        clock=clock,
    )
    assert choice.dtype == "int8"
    assert emulated.calls == 1  # the warm-up batch, and no more
    assert {
        "dtype": "bf16",
        "ms_per_window": pytest.approx(2500),
        "rejected": "slow",
    } in choice.candidates


def test_the_largest_batch_within_the_latency_budget_is_kept_when_it_is_faster():
    clock = Clock()
    model = Scripted(clock, 0.1, per_batch=0.1)  # batching amortises a fixed cost
    choice = tune(
        scripted(clock, fp32=model),
        device="cpu",
        dtypes=("fp32",),
        lanes=(1,),
        batches=(1, 2, 4, 8, 16),
        batch_budget_s=0.75,
        clock=clock,
    )
    assert choice.max_batch == 4  # 8 windows take 0.9 s a batch: over the budget
    assert any(c.get("batch") == 8 and "rejected" in c for c in choice.candidates)
    assert not any(c.get("batch") == 16 for c in choice.candidates)  # not even tried


def test_the_choice_is_cached_per_key_and_survives_a_restart(tmp_path):
    cache = ChoiceCache(tmp_path / "tuning.json")
    choice = Choice("int8", 2, 2, 195.0, 5.1, 0.0035, measured_s=40.0)
    cache.put("machine-a", choice)
    again = ChoiceCache(tmp_path / "tuning.json").get("machine-a")
    assert again is not None and again.from_cache and again.measured_s == 0.0
    assert (again.dtype, again.max_batch, again.lanes) == ("int8", 2, 2)
    assert cache.get("machine-b") is None
    (tmp_path / "tuning.json").write_text("{not json")
    assert cache.get("machine-a") is None  # a broken cache means: measure again


def test_the_real_model_is_tuned_within_the_drift_limit(tiny_model):
    choice = tune(
        lambda d: tiny_model if d == "fp32" else tiny_model.converted(d),
        device="cpu",
        windows=tuning_windows(4),
    )
    assert choice.dtype in ("fp32", "bf16", "fp16", "int8") and choice.drift <= 0.01
    assert choice.max_batch >= 1 and choice.lanes in (1, 2) and choice.windows_per_s > 0
    assert {c["dtype"] for c in choice.candidates} >= {"fp32", "int8"}
