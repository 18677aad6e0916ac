"""The stress index: eGeMAPS prosody, a robust per-speaker baseline, the fitted weights and the
calibrated levels. Synthetic measures test the scorer's logic; espeak-ng speech tests direction."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from engine.pipeline import PipelineConfig, analyze
from engine.prosody import MEASURES, Prosody, measure
from engine.stress import StressModel, StressScorer, default_model, level_of
from tests.support.speech import silence, speech

pytestmark = pytest.mark.unit

NEUTRAL = {"neutral": 0.9, "happy": 0.1}
CALM = {"pitch": 40, "speed": 150, "amplitude": 60}
STRESSED = {"pitch": 80, "speed": 230, "amplitude": 180}


def calm_voice(rng: np.random.Generator | None = None, **overrides: float) -> Prosody:
    """A lower voice's calm window, with a little natural variation."""
    rng = rng or np.random.default_rng(0)
    model = default_model()
    values = {name: centre for name, (centre, _) in model.prior["lower"].items()}
    for name, (_, spread) in model.prior["lower"].items():
        values[name] += 0.3 * spread * rng.standard_normal()
    values.update(overrides)
    return Prosody(**values, voiced_fraction=0.7)


def calibrated(n: int = 8, **kwargs) -> StressScorer:
    scorer = StressScorer(**kwargs)
    rng = np.random.default_rng(1)
    for _ in range(n):
        scorer.update(calm_voice(rng), NEUTRAL, 1.0)
    return scorer


def aroused(by: float = 3.0) -> Prosody:
    """Every measure the index uses moved ``by`` spreads the way high arousal moves it."""
    model = default_model()
    base = calm_voice()
    changes = {}
    for name, weight in model.weights.items():
        if weight:
            spread = model.prior["lower"][name][1]
            changes[name] = getattr(base, name) + math.copysign(by * spread, weight)
    return dataclasses.replace(base, **changes)


def test_the_shipped_model_is_fitted_and_says_on_what():
    model = default_model()
    assert model.about["fitted_on"] and 0.85 < model.about["cv_auc"] <= 1.0
    assert set(model.weights) == set(MEASURES) and any(model.weights.values())
    assert model.scale > 0
    assert model.offset + model.scale * model.intercept == pytest.approx(15, abs=0.5)


def test_espeak_prosody_moves_with_pitch_speed_and_loudness():
    calm = measure(speech(**CALM)[:32000])
    stressed = measure(speech(**STRESSED)[:32000])
    assert stressed.f0_mean_st > calm.f0_mean_st + 4  # -p 40 -> 80 is several semitones
    assert stressed.loudness_phon > calm.loudness_phon + 6  # -a 60 -> 180: three times louder
    assert stressed.peaks_per_s > calm.peaks_per_s


def test_the_trimmed_reused_opensmile_instance_gives_what_full_egemaps_gives():
    """measure() keeps one openSMILE instance per thread, reset between calls, running
    prosody.conf (eGeMAPS v02 cut down to the measures read). Every functional it reads must
    equal what a new instance of the full eGeMAPS v02 set returns through opensmile's own
    process_signal. (Out of range samples are clipped first; process_signal wraps them around
    in int16.)"""
    import opensmile

    from engine.prosody import _COLUMNS, _extractor

    smile = opensmile.Smile(
        feature_set=opensmile.FeatureSet.eGeMAPSv02,
        feature_level=opensmile.FeatureLevel.Functionals,
    )
    loud = speech(**STRESSED)
    assert np.abs(loud).max() > 1.0  # resampling overshoots a full-scale voice
    other = speech("Another sentence, lower and slower.", pitch=15, speed=120)
    noise = np.random.default_rng(3).normal(0.0, 0.1, 32000).astype(np.float32)
    voices = [speech(**CALM), loud, silence(1.0), speech(**CALM)[:3000], other, noise]
    extractor = _extractor()
    read = [extractor.columns[column] for column in _COLUMNS]
    for signal in voices + voices[::-1]:  # each after a different predecessor
        expected = smile.process_signal(np.clip(signal, -1.0, 32767 / 32768), 16000).iloc[0]
        got = extractor(signal)[read]
        np.testing.assert_array_equal(got, expected[_COLUMNS].to_numpy(dtype=np.float64))


def test_silence_and_noise_have_no_prosody():
    assert not measure(silence(2.0)).measured
    p = measure(silence(2.0))
    assert p.voiced_fraction == 0.0 and math.isnan(p.f0_mean_st)


def test_a_calm_voice_at_its_baseline_scores_low_and_explains_nothing_away():
    result = calibrated().update(calm_voice(np.random.default_rng(9)), NEUTRAL, 1.0)
    assert result.level == "low" and result.index < 25
    assert not result.calibrating
    total = result.base + sum(c["points"] for c in result.components.values())
    assert min(100.0, max(0.0, total)) == pytest.approx(result.raw_index, abs=0.6)  # they add up


def test_an_aroused_voice_scores_high_and_the_components_say_why():
    scorer = calibrated(smoothing=1.0)
    result = scorer.update(aroused(3.0), NEUTRAL, 1.0)
    assert result.level == "high" and result.index >= 75
    movers = sorted((c for c in result.components.values() if "z" in c), key=lambda c: -c["points"])
    assert movers and all(c["points"] > 0 for c in movers[:3])
    assert result.prosodic_index >= 75


def test_loudness_counts_either_way_from_the_speakers_own_and_says_so():
    model = default_model()
    assert "loudness_phon" in model.either_way and model.weights["loudness_phon"] > 0
    spread = model.prior["lower"]["loudness_phon"][1]
    base = calm_voice()
    usual = calibrated(smoothing=1.0).update(base, NEUTRAL, 1.0)
    results = {
        way: calibrated(smoothing=1.0).update(
            dataclasses.replace(base, loudness_phon=base.loudness_phon + way * 3 * spread),
            NEUTRAL,
            1.0,
        )
        for way in (1, -1)
    }
    for way, result in results.items():  # raised or held back: the same departure
        component = result.components["loudness_phon"]
        assert component["either_way"] and math.copysign(1, component["z"]) == way
        departure = abs(component["z"]) - math.sqrt(2 / math.pi)  # beyond ordinary variation
        assert model.departure("loudness_phon", component["z"]) == pytest.approx(departure)
        assert component["points"] == pytest.approx(
            model.scale * model.weights["loudness_phon"] * departure, abs=0.2
        )
        assert result.prosodic_index > usual.prosodic_index + 10
    assert results[1].raw_index == pytest.approx(results[-1].raw_index, abs=3)
    assert "either_way" not in results[1].components["f0_mean_st"]  # higher pitch only


def test_a_loudness_with_no_reference_yet_counts_for_nothing():
    first = StressScorer(smoothing=1.0).update(calm_voice(), NEUTRAL, 1.0)
    assert first.calibrating and first.components["loudness_phon"]["points"] == 0.0
    second = StressScorer(smoothing=1.0)
    second.update(calm_voice(), NEUTRAL, 1.0)
    loud = dataclasses.replace(calm_voice(), loudness_phon=calm_voice().loudness_phon + 10)
    assert second.update(loud, NEUTRAL, 1.0).components["loudness_phon"]["points"] > 0


def test_the_emotion_term_counts_only_above_the_speakers_usual():
    usual = calibrated(smoothing=1.0).update(calm_voice(), {"angry": 0.1}, 1.0)
    angry = calibrated(smoothing=1.0).update(calm_voice(), {"angry": 0.9, "fearful": 0.1}, 1.0)
    component = angry.components["emotion_arousal"]
    assert component["value"] == pytest.approx(1.0) and component["baseline"] < 0.2
    assert angry.raw_index - usual.raw_index == pytest.approx(
        30 * (1.0 - 0.1), abs=1.0
    )  # the documented prior: +30 points per unit of mass above the usual
    assert angry.prosodic_index == usual.prosodic_index


def test_joy_in_the_emotion_model_takes_points_away_above_the_speakers_usual():
    voice = aroused(1.0)  # high enough that taking points away is not clipped at 0
    usual = calibrated(smoothing=1.0).update(voice, {"happy": 0.1}, 1.0)
    joyful = calibrated(smoothing=1.0).update(voice, {"happy": 0.9}, 1.0)
    component = joyful.components["emotion_valence"]
    assert component["value"] == pytest.approx(0.9) and component["baseline"] == pytest.approx(0.1)
    assert joyful.raw_index - usual.raw_index == pytest.approx(
        -30 * (0.9 - 0.1), abs=1.0
    )  # the documented prior: -30 points per unit of happy mass above the usual
    assert joyful.prosodic_index == usual.prosodic_index  # an emotion term, not prosody


def test_a_wider_pitch_range_at_the_same_arousal_reads_as_joy_and_says_so():
    model = default_model()
    assert model.valence_weight > 0 and model.valence_weights["f0_range_st"] < 0
    spread = model.prior["lower"]["f0_range_st"][1]
    voice = aroused(1.0)  # elevated, not clipped at 100
    singing = dataclasses.replace(voice, f0_range_st=voice.f0_range_st + 3 * spread)
    strained = calibrated(smoothing=1.0).update(voice, NEUTRAL, 1.0)
    joyful = calibrated(smoothing=1.0).update(singing, NEUTRAL, 1.0)
    assert joyful.prosodic_index < strained.prosodic_index - 5
    valence = joyful.components["prosodic_valence"]
    assert (
        valence["measures"]["f0_range_st"]
        > strained.components["prosodic_valence"]["measures"]["f0_range_st"]
    )
    expected = sum(valence["weights"][k] * z for k, z in valence["measures"].items())
    assert valence["value"] == pytest.approx(expected, abs=0.02)
    assert valence["points"] == pytest.approx(
        model.scale * model.valence_weight * valence["value"], abs=0.2
    )
    total = joyful.base + sum(c["points"] for c in joyful.components.values())
    assert min(100.0, max(0.0, total)) == pytest.approx(joyful.raw_index, abs=0.6)


def test_the_baseline_learns_calm_speech_and_not_elevated_speech():
    scorer = calibrated(n=4)
    learned = scorer.baseline.windows
    scorer.update(aroused(3.0), NEUTRAL, 1.0)
    assert scorer.baseline.windows == learned  # an elevated window is not a reference
    scorer.update(calm_voice(np.random.default_rng(5)), NEUTRAL, 1.0)
    assert scorer.baseline.windows == learned + 1  # calm speech keeps refining it


def test_one_loud_word_at_the_start_does_not_set_the_baseline():
    scorer = StressScorer(smoothing=1.0)
    scorer.update(aroused(4.0), NEUTRAL, 1.0)  # warm-up: learned whatever it scores
    rng = np.random.default_rng(3)
    for _ in range(6):
        scorer.update(calm_voice(rng), NEUTRAL, 1.0)
    assert scorer.update(calm_voice(rng), NEUTRAL, 1.0).index < 25  # the median kept it out
    assert scorer.update(aroused(3.0), NEUTRAL, 1.0).index >= 75


def test_a_first_window_is_scored_against_the_population_prior():
    first = StressScorer().update(calm_voice(), NEUTRAL, 1.0)
    assert first.calibrating and first.baseline["windows"] == 0 and first.index < 50
    loud = StressScorer(smoothing=1.0).update(aroused(4.0), NEUTRAL, 1.0)
    assert loud.index > first.index + 25


def test_smoothing_carries_over_windows():
    scorer = calibrated(smoothing=0.5)
    first = scorer.update(aroused(3.0), NEUTRAL, 1.0)
    second = scorer.update(calm_voice(), NEUTRAL, 1.0)
    assert second.index == pytest.approx(0.5 * second.raw_index + 0.5 * first.index, abs=0.1)


def test_confidence_grows_with_the_baseline_and_drops_for_little_speech_narrowband_and_no_prosody():
    full = calibrated().update(calm_voice(), NEUTRAL, 1.0).confidence
    early = StressScorer().update(calm_voice(), NEUTRAL, 1.0)
    assert early.calibrating and early.confidence < full
    little = dataclasses.replace(calm_voice(), voiced_fraction=0.1)
    assert calibrated().update(little, NEUTRAL, 0.3).confidence < full
    assert calibrated(narrowband=True).update(
        calm_voice(), NEUTRAL, 1.0
    ).confidence == pytest.approx(full * 0.75, abs=0.01)
    missing = calibrated().update(Prosody.unmeasured(), NEUTRAL, 1.0, prosody_missing="timeout")
    assert missing.confidence < full and missing.components["prosody"]["reason"] == "timeout"


def test_levels():
    assert [level_of(x) for x in (0, 24.9, 25, 60, 75, 100)] == [
        "low",
        "low",
        "moderate",
        "elevated",
        "high",
        "high",
    ]


def test_a_stress_model_loads_from_its_json(tmp_path):
    import json

    from engine.stress import MODEL_FILE

    data = json.loads(MODEL_FILE.read_text())
    data["weights"] = dict.fromkeys(data["weights"], 0.0)
    data["valence"]["weight"] = 0.0
    (tmp_path / "m.json").write_text(json.dumps(data))
    flat = StressModel.load(tmp_path / "m.json")
    result = StressScorer(model=flat).update(aroused(3.0), NEUTRAL, 1.0)
    assert sorted(result.components) == ["emotion_arousal", "emotion_valence"]
    del data["valence"], data["emotion"]["joy"]  # a model file written before valence
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = StressScorer(model=StressModel.load(tmp_path / "old.json"))
    assert sorted(old.update(aroused(3.0), NEUTRAL, 1.0).components) == ["emotion_arousal"]


def test_espeak_stressed_speech_after_a_calm_baseline_scores_clearly_higher(tiny_model):
    calm = speech(**CALM)  # the same sentence in both parts
    stressed = speech(**STRESSED)
    pause = silence(0.4)
    audio = np.concatenate([calm, pause, calm, pause, stressed, pause, stressed])
    timeline = analyze(audio, tiny_model, PipelineConfig())
    frames = timeline["frames"]
    stressed_from = (2 * (calm.size + pause.size)) / 16000
    calm_idx = [f["stress"]["index"] for f in frames if f["end_s"] <= stressed_from]
    hot = [f for f in frames if f["start_s"] >= stressed_from + 1.0]
    assert len(calm_idx) >= 6 and len(hot) >= 3
    assert np.mean([f["stress"]["index"] for f in hot]) > np.mean(calm_idx) + 25
    assert np.mean([f["stress"]["prosodic_index"] for f in hot]) >= 50
    for f in hot:
        comps = f["stress"]["components"]
        assert comps["f0_mean_st"]["z"] > 1.5  # espeak's -p: the pitch carries it
        top = max((k for k in comps if "z" in comps[k]), key=lambda k: comps[k]["points"])
        assert top == "f0_mean_st"
        loud = comps["loudness_phon"]  # weighed against the speaker's own level, either way
        assert loud["either_way"] and loud["z"] > 0 and loud["points"] > 0  # -a 180 against 60
