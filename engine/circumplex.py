"""Valence and arousal derived from the emotion scores: a projection, not a dimensional model.

Each label with a coordinate is placed on Russell's circumplex at a fixed, published point: the
NRC Valence, Arousal, and Dominance Lexicon's rating of the emotion's own word (Mohammad, 2018,
"Obtaining Reliable Human Ratings of Valence, Arousal, and Dominance for 20,000 English Words",
ACL; version 1.0 of the lexicon). The entry taken is the emotion's noun (``anger``, ``fear``...),
since a label names an emotion category; the lexicon rates some adjectives oddly for that use
(``fearful``: arousal 0.48, where ``fear`` is 0.84). Ratings run 0-1 and are mapped to -1..1.

A result's ``valence`` and ``arousal`` are the probability-weighted mean of those points over the
labels that have one, and ``mapped`` is the probability on those labels: ``other`` and
``unknown`` have no place on the circle, so their share is left out and said. The values inherit
everything the categorical model gets wrong, and with random weights they are noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# label: (NRC VAD entry, its valence, its arousal), as the lexicon gives them (0-1)
COORDINATES: dict[str, tuple[str, float, float]] = {
    "angry": ("anger", 0.167, 0.865),
    "disgusted": ("disgust", 0.052, 0.775),
    "fearful": ("fear", 0.073, 0.840),
    "happy": ("happiness", 0.960, 0.732),
    "neutral": ("neutral", 0.469, 0.184),
    "sad": ("sadness", 0.052, 0.288),
    "surprised": ("surprise", 0.875, 0.875),
}
DERIVED_FROM = "emotion scores"  # on every result: a projection, not a dimensional model


def project(scores: Mapping[str, float]) -> dict[str, Any]:
    """``{valence, arousal, mapped, derived_from}`` of one score distribution (valence and
    arousal in -1..1, None when no label with a coordinate has any probability)."""
    mapped = sum(p for label, p in scores.items() if label in COORDINATES)
    if mapped <= 0:
        return {"valence": None, "arousal": None, "mapped": 0.0, "derived_from": DERIVED_FROM}
    valence = arousal = 0.0
    for label, p in scores.items():
        if label in COORDINATES:
            _, v, a = COORDINATES[label]
            valence += p * v
            arousal += p * a
    return {
        "valence": round(2 * valence / mapped - 1, 4),
        "arousal": round(2 * arousal / mapped - 1, 4),
        "mapped": round(mapped, 4),
        "derived_from": DERIVED_FROM,
    }
