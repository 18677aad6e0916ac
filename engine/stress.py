"""An explainable, per-speaker stress index (0-100) from prosody and the emotion distribution.

Each prosodic measure is turned into a z-score against the same session's first
``baseline_windows`` windows of speech (the speaker's own calm reference), signed so that a
higher value means more arousal, clipped to ±3 and averaged with fixed weights. That arousal
score (70 %) and the emotion distribution's high-arousal negative mass — angry, fearful, half of
disgusted — (30 %) make the raw index; an exponential moving average smooths it across windows.
Every result carries each component's value, baseline, z-score, weight and the points it added.

It is not a cortisol level, a diagnosis or a lie detector, and values are not comparable across
speakers: it says how far this voice has moved from its own start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.prosody import Prosody

# name -> (weight, smallest standard deviation trusted, unit). Jitter and shimmer are noisy on
# short windows and get little weight.
FEATURES: dict[str, tuple[float, float, str]] = {
    "f0_median_st": (0.25, 1.0, "semitones re 100 Hz"),
    "f0_range_st": (0.10, 1.0, "semitones"),
    "loudness_dbfs": (0.20, 2.0, "dB"),
    "speech_rate_syl_s": (0.20, 0.5, "syllables/s"),
    "spectral_balance_db": (0.15, 1.5, "dB"),
    "jitter_pct": (0.05, 0.3, "%"),
    "shimmer_pct": (0.05, 2.0, "%"),
}
EMOTION_AROUSAL_WEIGHTS = {"angry": 1.0, "fearful": 1.0, "disgusted": 0.5}
PROSODY_SHARE = 0.7
EMOTION_SHARE = 0.3
Z_CLIP = 3.0
Z_FULL_SCALE = 2.0  # a weighted mean z of +2 fills the prosody share
LEVELS = ((25.0, "low"), (50.0, "moderate"), (75.0, "elevated"), (math.inf, "high"))
NARROWBAND_CONFIDENCE = 0.75


def level_of(index: float) -> str:
    return next(name for bound, name in LEVELS if index < bound)


@dataclass(slots=True)
class StressResult:
    index: float  # smoothed, 0-100
    raw_index: float  # this window alone
    level: str
    confidence: float  # 0-1
    calibrating: bool  # the speaker's baseline is still being collected
    components: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "raw_index": self.raw_index,
            "level": self.level,
            "confidence": self.confidence,
            "calibrating": self.calibrating,
            "components": self.components,
        }


def _finite(x: float) -> bool:
    return x is not None and math.isfinite(x)


class StressScorer:
    """Per-session state: the baseline and the smoothed index. One scorer per speaker/track."""

    def __init__(
        self, *, baseline_windows: int = 5, smoothing: float = 0.5, narrowband: bool = False
    ) -> None:
        if baseline_windows < 1:
            raise ValueError("baseline_windows must be at least 1")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError("smoothing must be in (0, 1]")
        self.baseline_windows = baseline_windows
        self.smoothing = smoothing
        self.narrowband = narrowband
        self._baseline: dict[str, list[float]] = {name: [] for name in FEATURES}
        self._baseline_count = 0
        self._smoothed: float | None = None

    @property
    def calibrating(self) -> bool:
        return self._baseline_count < self.baseline_windows

    def _learn(self, prosody: Prosody) -> None:
        if (
            not self.calibrating
            or prosody.voiced_fraction <= 0
            or not _finite(prosody.f0_median_st)
        ):
            return
        self._baseline_count += 1
        for name in FEATURES:
            value = getattr(prosody, name)
            if _finite(value):
                self._baseline[name].append(value)

    def _baseline_stats(self, name: str) -> tuple[float, float] | None:
        values = self._baseline[name]
        if len(values) < 2:
            return None
        floor = FEATURES[name][1]
        return float(np.mean(values)), max(float(np.std(values, ddof=1)), floor)

    def update(
        self,
        prosody: Prosody,
        scores: dict[str, float],
        speech_ratio: float,
        *,
        prosody_missing: str | None = None,
    ) -> StressResult:
        self._learn(prosody)
        components: dict[str, dict[str, Any]] = {}
        weighted = 0.0
        available = 0.0
        for name, (weight, _, unit) in FEATURES.items():
            value = getattr(prosody, name)
            stats = self._baseline_stats(name)
            if not _finite(value) or stats is None:
                continue
            mean, sd = stats
            z = float(np.clip((value - mean) / sd, -Z_CLIP, Z_CLIP))
            weighted += weight * z
            available += weight
            components[name] = {
                "value": round(value, 3),
                "baseline": round(mean, 3),
                "unit": unit,
                "z": round(z, 2),
                "weight": weight,
            }
        total_weight = sum(w for w, _, _ in FEATURES.values())
        prosody_points = 0.0
        if available > 0:
            scale = 100.0 * PROSODY_SHARE / (available * Z_FULL_SCALE)
            for comp in components.values():
                comp["points"] = round(comp["weight"] * comp["z"] * scale, 1)
            prosody_points = float(np.clip(weighted * scale, 0.0, 100.0 * PROSODY_SHARE))
        mass = sum(scores.get(label, 0.0) * w for label, w in EMOTION_AROUSAL_WEIGHTS.items())
        mass = float(np.clip(mass, 0.0, 1.0))
        emotion_points = 100.0 * EMOTION_SHARE * mass
        components["emotion_arousal"] = {
            "value": round(mass, 3),
            "unit": "probability",
            "labels": dict(EMOTION_AROUSAL_WEIGHTS),
            "weight": EMOTION_SHARE,
            "points": round(emotion_points, 1),
        }
        if prosody_missing is not None:
            components["prosody"] = {"available": False, "reason": prosody_missing, "points": 0.0}
        raw = float(np.clip(prosody_points + emotion_points, 0.0, 100.0))
        if self._smoothed is None:
            self._smoothed = raw
        else:
            self._smoothed = self.smoothing * raw + (1.0 - self.smoothing) * self._smoothed

        baseline_part = min(1.0, self._baseline_count / self.baseline_windows)
        speech_part = min(1.0, speech_ratio / 0.6) * min(1.0, prosody.voiced_fraction / 0.4)
        confidence = (
            (0.3 + 0.7 * baseline_part)
            * (0.5 + 0.5 * speech_part)
            * (0.5 + 0.5 * available / total_weight)
        )
        if self.narrowband:
            confidence *= NARROWBAND_CONFIDENCE
        index = round(self._smoothed, 1)
        return StressResult(
            index=index,
            raw_index=round(raw, 1),
            level=level_of(index),
            confidence=round(confidence, 2),
            calibrating=self.calibrating,
            components=components,
        )
