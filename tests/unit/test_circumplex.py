"""The derived valence and arousal: the published coordinates, weighted by probability."""

from __future__ import annotations

import pytest

from engine.circumplex import COORDINATES, project

LABELS = (
    "angry",
    "disgusted",
    "fearful",
    "happy",
    "neutral",
    "other",
    "sad",
    "surprised",
    "unknown",
)


def one_hot(label: str) -> dict[str, float]:
    return {k: float(k == label) for k in LABELS}


def test_a_certain_label_lands_on_its_published_point_mapped_to_minus_one_one():
    for label, (_, v, a) in COORDINATES.items():
        out = project(one_hot(label))
        assert out["valence"] == pytest.approx(2 * v - 1, abs=1e-4)
        assert out["arousal"] == pytest.approx(2 * a - 1, abs=1e-4)
        assert out["mapped"] == 1.0 and out["derived_from"] == "emotion scores"
    # the circle's order: joy pleasant and aroused, sadness unpleasant and calm, anger aroused
    happy, sad, angry = (project(one_hot(x)) for x in ("happy", "sad", "angry"))
    assert happy["valence"] > 0.5 and sad["valence"] < -0.5 and angry["valence"] < -0.5
    assert angry["arousal"] > 0.5 and sad["arousal"] < -0.3


def test_a_mixture_is_the_probability_weighted_mean_and_unplaced_labels_are_left_out():
    mix = {**one_hot("happy"), "happy": 0.25, "sad": 0.25, "other": 0.5}
    out = project(mix)
    _, hv, ha = COORDINATES["happy"]
    _, sv, sa = COORDINATES["sad"]
    assert out["mapped"] == 0.5  # other has no place on the circle: its share is said
    assert out["valence"] == pytest.approx((hv + sv) - 1, abs=1e-4)  # renormalised over 0.5
    assert out["arousal"] == pytest.approx((ha + sa) - 1, abs=1e-4)
    assert project({**one_hot("other"), "unknown": 0.0}) == {
        "valence": None,
        "arousal": None,
        "mapped": 0.0,
        "derived_from": "emotion scores",
    }
