from __future__ import annotations

import math

import numpy as np
import pytest

from engine.pipeline import PipelineConfig, analyze
from engine.prosody import Prosody, measure
from engine.stress import FEATURES, StressScorer, level_of
from tests.speech import silence, speech

pytestmark = pytest.mark.unit

NEUTRAL = {"neutral": 0.9, "happy": 0.1}
CALM = {"pitch": 40, "speed": 150, "amplitude": 60}
STRESSED = {"pitch": 80, "speed": 230, "amplitude": 180}


def prosody(**overrides: float) -> Prosody:
    base = dict(
        f0_median_st=0.0,
        f0_range_st=3.0,
        loudness_dbfs=-20.0,
        speech_rate_syl_s=4.0,
        spectral_balance_db=-6.0,
        jitter_pct=1.0,
        shimmer_pct=10.0,
        voiced_fraction=0.6,
    )
    base.update(overrides)
    return Prosody(**base)


def calibrated(n: int = 5, **kwargs) -> StressScorer:
    scorer = StressScorer(baseline_windows=n, **kwargs)
    rng = np.random.default_rng(0)
    for _ in range(n):
        scorer.update(
            prosody(f0_median_st=rng.normal(0, 0.5), loudness_dbfs=-20 + rng.normal(0, 1)),
            NEUTRAL,
            1.0,
        )
    return scorer


def test_espeak_prosody_moves_with_pitch_speed_and_loudness():
    calm = measure(speech(**CALM)[:32000])
    stressed = measure(speech(**STRESSED)[:32000])
    assert stressed.f0_median_st > calm.f0_median_st + 4  # -p 40 -> 80 is several semitones
    assert stressed.loudness_dbfs > calm.loudness_dbfs + 4
    assert stressed.speech_rate_syl_s > calm.speech_rate_syl_s


def test_silence_has_no_prosody():
    p = measure(silence(2.0))
    assert p.voiced_fraction == 0.0
    assert math.isnan(p.f0_median_st) and math.isnan(p.loudness_dbfs)


def test_a_calm_voice_at_its_baseline_scores_low():
    result = calibrated().update(prosody(), NEUTRAL, 1.0)
    assert result.level == "low"
    assert result.index < 25
    assert not result.calibrating


def test_higher_louder_faster_scores_high_and_the_components_say_why():
    scorer = calibrated(smoothing=1.0)
    result = scorer.update(
        prosody(f0_median_st=4.0, loudness_dbfs=-12.0, speech_rate_syl_s=6.0), NEUTRAL, 1.0
    )
    assert result.index >= 50
    top = sorted((c for c in result.components.values() if "z" in c), key=lambda c: -c["points"])
    assert {c for c, v in result.components.items() if v.get("points", 0) > 5} >= {
        "f0_median_st",
        "loudness_dbfs",
        "speech_rate_syl_s",
    }
    assert all(c["z"] > 0 for c in top[:3])
    total = sum(c["points"] for c in result.components.values())
    assert total == pytest.approx(result.raw_index, abs=0.5)


def test_high_arousal_negative_emotion_adds_points():
    base = calibrated(smoothing=1.0).update(prosody(), NEUTRAL, 1.0)
    angry = calibrated(smoothing=1.0).update(prosody(), {"angry": 0.8, "fearful": 0.2}, 1.0)
    assert angry.components["emotion_arousal"]["value"] == pytest.approx(1.0)
    assert angry.index == pytest.approx(base.index + 30, abs=0.2)


def test_smoothing_carries_over_windows():
    scorer = calibrated(smoothing=0.5)
    first = scorer.update(
        prosody(f0_median_st=6, loudness_dbfs=-10, speech_rate_syl_s=7), NEUTRAL, 1.0
    )
    second = scorer.update(prosody(), NEUTRAL, 1.0)
    assert second.raw_index < first.raw_index
    assert second.index == pytest.approx(0.5 * second.raw_index + 0.5 * first.index, abs=0.1)


def test_confidence_is_lower_while_calibrating_for_little_speech_and_narrowband():
    full = calibrated().update(prosody(), NEUTRAL, 1.0).confidence
    early = StressScorer().update(prosody(), NEUTRAL, 1.0)
    assert early.calibrating and early.confidence < full
    assert calibrated().update(prosody(voiced_fraction=0.1), NEUTRAL, 0.3).confidence < full
    assert calibrated(narrowband=True).update(prosody(), NEUTRAL, 1.0).confidence == pytest.approx(
        full * 0.75, abs=0.01
    )


def test_levels_and_weights():
    assert [level_of(x) for x in (0, 24.9, 25, 60, 75, 100)] == [
        "low",
        "low",
        "moderate",
        "elevated",
        "high",
        "high",
    ]
    assert sum(w for w, _, _ in FEATURES.values()) == pytest.approx(1.0)
    assert FEATURES["jitter_pct"][0] < FEATURES["f0_median_st"][0]


def test_espeak_stressed_speech_after_a_calm_baseline_scores_clearly_higher(tiny_model):
    calm = speech(**CALM)  # the same sentence in both parts
    stressed = speech(**STRESSED)
    pause = silence(0.4)
    audio = np.concatenate([calm, pause, calm, pause, stressed, pause, stressed])
    timeline = analyze(audio, tiny_model, PipelineConfig(baseline_windows=5))
    frames = timeline["frames"]
    stressed_from = (2 * (calm.size + pause.size)) / 16000
    calm_idx = [f["stress"]["index"] for f in frames if f["end_s"] <= stressed_from]
    hot = [f for f in frames if f["start_s"] >= stressed_from + 1.0]
    assert len(calm_idx) >= 6 and len(hot) >= 3
    assert np.mean([f["stress"]["index"] for f in hot]) > np.mean(calm_idx) + 25
    for f in hot:
        comps = f["stress"]["components"]
        assert comps["f0_median_st"]["z"] > 1.5
        assert comps["loudness_dbfs"]["z"] > 1.5
        top = max(comps, key=lambda k: comps[k]["points"])
        assert top in {"f0_median_st", "loudness_dbfs", "speech_rate_syl_s"}
