"""An explainable, per-speaker stress index (0-100): how far this voice has moved towards high
arousal from its own calm reference.

1. A window's prosody — eGeMAPS measures, engine/prosody.py — becomes robust z-scores against the
   speaker's baseline: the median and MAD of the same measures over the session's speech that did
   not score elevated (the baseline keeps learning, up to ``BASELINE_MAX`` windows). Its first
   ``warmup`` (baseline_windows) windows of speech are learned whatever they score, so a speaker
   whose ordinary voice is far from the average still gets a baseline; the median keeps one loud
   word out of it. While the baseline is short it is blended with a population prior chosen by the
   voice's pitch (a lower or a higher voice), worth ``PRIOR_WINDOWS`` windows.
2. A logistic regression fitted on speaker-normalised measures (bench/stress.py: acted English
   and Polish speech, leave-one-speaker-out; the numbers are in stress_model.json) weighs the
   z-scores. Their sum
   with its intercept is the prosodic log-odds that the voice is in a high-arousal state.
   Loudness counts either way (``either_way``: its weight is on |z| beyond the ordinary, see
   ``StressModel.departure``): vocal effort that leaves the speaker's own, raised as in anger or
   held back as in much acted fear, both mark strain.
3. Valence, so that joy is not read as stress, where the voice allows it:
   - prosodic valence: a second regression on the same z-scores (fitted on angry+fearful against
     happy, bench/stress.py) gives log-odds of strain over joy; the index takes
     ``valence_weight`` of it (0.75: the trade-off against calm speech, measured leave one
     speaker out, is in BENCHMARKS.md);
   - emotion valence: the emotion model's happy mass above the speaker's usual takes log-odds
     away with a documented prior weight.
   The emotion model's high-arousal negative mass (angry + fearful + ½ disgusted), above the same
   speaker's usual mass, adds log-odds with a documented prior weight. Neither emotion weight can
   be fitted here: the development model is random.
4. index = clip(offset + scale × log-odds, 0, 100), smoothed across windows. The two numbers are
   calibrated so that levels mean the same for everyone: a voice exactly at its own baseline
   scores 15 ("low"), and only 3 % of calm speech, of speakers the fit had not seen, reaches 50
   ("elevated"). Every component's ``points`` are its exact part of the sum:
   base + Σ points = raw_index (before clipping).

It is not a cortisol level, a diagnosis or a lie detector, and values are not comparable across
speakers' absolute voices: it says how far this voice has moved from its own reference.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.prosody import MEASURES, Prosody

MODEL_FILE = Path(__file__).with_name("stress_model.json")
LEVELS = ((25.0, "low"), (50.0, "moderate"), (75.0, "elevated"), (math.inf, "high"))
ELEVATED = 50.0
MAD_TO_SD = 1.4826
BASELINE_WARMUP = 3
BASELINE_MAX = 120
PRIOR_WINDOWS = 3.0  # the population prior's worth for a measure's centre, in windows
SPREAD_PRIOR_WINDOWS = 10.0  # and for its spread, which few windows estimate poorly
EMOTION_REFERENCE = 0.1  # high-arousal negative mass assumed for calm speech before a baseline
JOY_REFERENCE = 0.1  # and joy mass
NARROWBAND_CONFIDENCE = 0.75
NO_PROSODY_CONFIDENCE = 0.5
# The mean |z| of a voice's ordinary variation about its own median (a normal's mean absolute
# deviation in SDs): what a measure that counts either way adds for a voice at its usual.
ORDINARY_DEPARTURE = math.sqrt(2.0 / math.pi)


def level_of(index: float) -> str:
    return next(name for bound, name in LEVELS if index < bound)


@dataclass(frozen=True)
class StressModel:
    """The fitted numbers (stress_model.json) and the documented priors."""

    weights: dict[str, float]  # per measure, on the robust z-score
    intercept: float
    z_clip: float
    spread_floor: dict[str, float]  # the smallest spread trusted, per measure (its unit)
    voice_split_st: float  # f0_mean_st below this: the lower-voice prior
    prior: dict[str, dict[str, tuple[float, float]]]  # voice -> measure -> (centre, spread)
    emotion_labels: dict[str, float]
    emotion_weight: float  # log-odds per unit of high-arousal negative mass above baseline
    offset: float  # index = offset + scale x log-odds
    scale: float
    # prosodic valence: per measure, on the same z, log-odds of strain (angry/fearful) over joy
    valence_weights: dict[str, float] = field(default_factory=dict)
    valence_weight: float = 0.0  # the share of those log-odds the index takes
    # measures whose departure from the speaker's own counts either way: their weight is on |z|
    either_way: frozenset[str] = frozenset()
    joy_labels: dict[str, float] = field(default_factory=dict)
    joy_weight: float = 0.0  # log-odds per unit of joy mass above baseline (a negative number)
    about: dict[str, Any] = field(default_factory=dict)

    def departure(self, name: str, z: float) -> float:
        """What a measure's z-score counts for, per unit of its weight: ``z``, or for a measure
        that counts either way, how much further than usual it is from the speaker's own (|z|
        less the ordinary |z|, so a voice at its usual adds nothing on average)."""
        return abs(z) - ORDINARY_DEPARTURE if name in self.either_way else z

    @classmethod
    def load(cls, path: Path = MODEL_FILE) -> StressModel:
        data = json.loads(path.read_text())
        valence, joy = data.get("valence", {}), data["emotion"].get("joy", {})
        return cls(
            weights={k: float(v) for k, v in data["weights"].items()},
            intercept=float(data["intercept"]),
            z_clip=float(data["z_clip"]),
            spread_floor={k: float(v) for k, v in data["spread_floor"].items()},
            voice_split_st=float(data["voice_split_st"]),
            prior={
                voice: {k: (float(c), float(s)) for k, (c, s) in measures.items()}
                for voice, measures in data["prior"].items()
            },
            emotion_labels={k: float(v) for k, v in data["emotion"]["labels"].items()},
            emotion_weight=float(data["emotion"]["weight"]),
            valence_weights={k: float(v) for k, v in valence.get("weights", {}).items()},
            valence_weight=float(valence.get("weight", 0.0)),
            either_way=frozenset(data.get("either_way", ())),
            joy_labels={k: float(v) for k, v in joy.get("labels", {}).items()},
            joy_weight=float(joy.get("weight", 0.0)),
            offset=float(data["index"]["offset"]),
            scale=float(data["index"]["scale"]),
            about=data.get("about", {}),
        )


@dataclass(slots=True)
class StressResult:
    index: float  # smoothed, 0-100
    raw_index: float  # this window alone
    prosodic_index: float  # this window, prosody only (no emotion term)
    level: str
    confidence: float  # 0-1
    calibrating: bool  # the speaker's baseline is still short
    base: float  # the index at the speaker's baseline; base + Σ points = raw_index (unclipped)
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "raw_index": self.raw_index,
            "prosodic_index": self.prosodic_index,
            "level": self.level,
            "confidence": self.confidence,
            "calibrating": self.calibrating,
            "base": self.base,
            "components": self.components,
            "baseline": self.baseline,
        }


class Baseline:
    """A speaker's reference: robust centre and spread of each measure over calm speech."""

    def __init__(self, model: StressModel, warmup: int = BASELINE_WARMUP) -> None:
        self.model = model
        self.warmup = warmup
        self._values = {name: deque[float](maxlen=BASELINE_MAX) for name in model.weights}
        self._masses = deque[float](maxlen=BASELINE_MAX)
        self._joy = deque[float](maxlen=BASELINE_MAX)
        self.windows = 0  # windows learned

    def departure(self, name: str, z: float) -> float:
        """What ``name``'s z-score counts for against this baseline (``StressModel.departure``),
        or nothing while it has no reference: a normative measure always has one (the population
        prior), one that depends on the channel only once this speaker gave it; until then it is
        compared with itself."""
        known = MEASURES[name][3] or bool(self._values[name])
        return self.model.departure(name, z) if known else 0.0

    def voice(self, prosody: Prosody) -> str:
        f0 = self._values.get("f0_mean_st")
        pitch = float(np.median(f0)) if f0 else prosody.f0_mean_st
        return "lower" if pitch < self.model.voice_split_st else "higher"

    def learn(self, prosody: Prosody, mass: float, joy: float = 0.0) -> None:
        self.windows += 1
        self._masses.append(mass)
        self._joy.append(joy)
        for name, values in self._values.items():
            value = getattr(prosody, name)
            if math.isfinite(value):
                values.append(value)

    def state(self) -> dict[str, Any]:
        return {
            "windows": self.windows,
            "masses": list(self._masses),
            "joy": list(self._joy),
            "values": {name: list(values) for name, values in self._values.items()},
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.windows = int(state["windows"])
        self._masses.extend(float(m) for m in state["masses"][-BASELINE_MAX:])
        self._joy.extend(float(m) for m in state.get("joy", [])[-BASELINE_MAX:])
        for name, values in state["values"].items():
            if name in self._values:  # a measure this model no longer uses is left out
                self._values[name].extend(float(v) for v in values[-BASELINE_MAX:])

    def mass(self) -> float:
        """The speaker's usual high-arousal negative mass (the emotion model's, on calm speech)."""
        return _usual(self._masses, EMOTION_REFERENCE)

    def joy(self) -> float:
        """The speaker's usual joy mass (the emotion model's, on calm speech)."""
        return _usual(self._joy, JOY_REFERENCE)

    def centre_spread(self, name: str, voice: str, value: float) -> tuple[float, float]:
        """The reference for ``name``: the speaker's median and MAD, blended with the population
        prior while the baseline is short. A measure that depends on the microphone or the line
        (MEASURES: not normative) takes no prior centre: before the speaker has a baseline it
        is compared with itself (``value``), never with other people's recordings."""
        prior_centre, prior_spread = self.model.prior[voice][name]
        normative = MEASURES[name][3]
        values = self._values[name]
        n = len(values)
        if n:
            arr = np.fromiter(values, dtype=np.float64)
            median = float(np.median(arr))
            mad = float(np.median(np.abs(arr - median))) * MAD_TO_SD if n >= 3 else prior_spread
        else:
            median, mad = (prior_centre if normative else value), prior_spread
        k, ks = (PRIOR_WINDOWS if normative else 0.0), SPREAD_PRIOR_WINDOWS
        centre = (n * median + k * prior_centre) / (n + k) if n + k else median
        spread = (n * mad + ks * prior_spread) / (n + ks)
        return centre, max(spread, self.model.spread_floor[name])


def _usual(masses: deque[float], reference: float) -> float:
    n, k = len(masses), PRIOR_WINDOWS
    median = float(np.median(masses)) if n else reference
    return (n * median + k * reference) / (n + k)


def _mass(scores: dict[str, float], labels: dict[str, float]) -> float:
    mass = float(sum(scores.get(k, 0.0) * w for k, w in labels.items()))
    return min(1.0, max(0.0, mass)) if math.isfinite(mass) else 0.0


class StressScorer:
    """Per-track state: the speaker's baseline and the smoothed index."""

    def __init__(
        self,
        *,
        model: StressModel | None = None,
        warmup: int = BASELINE_WARMUP,
        smoothing: float = 0.7,
        narrowband: bool = False,
    ) -> None:
        if warmup < 1:
            raise ValueError("warmup (baseline_windows) must be at least 1")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError("smoothing must be in (0, 1]")
        self.model = model or default_model()
        self.smoothing = smoothing
        self.narrowband = narrowband
        self.baseline = Baseline(self.model, warmup)
        self._smoothed: float | None = None

    @property
    def calibrating(self) -> bool:
        return self.baseline.windows < self.baseline.warmup

    def state(self) -> dict[str, Any]:
        """The speaker's baseline and the smoothed index, as JSON values."""
        return {"baseline": self.baseline.state(), "smoothed": self._smoothed}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`: the baseline is not learnt again."""
        self.baseline.restore(state["baseline"])
        smoothed = state.get("smoothed")
        self._smoothed = None if smoothed is None else float(smoothed)

    def update(
        self,
        prosody: Prosody,
        scores: dict[str, float],
        speech_ratio: float,
        *,
        prosody_missing: str | None = None,
    ) -> StressResult:
        """The next window: scored against the baseline, then learnt into it if calm, and
        smoothed with the windows before it."""
        return self._score(prosody, scores, speech_ratio, prosody_missing, learn=True)

    def assess(
        self,
        prosody: Prosody,
        scores: dict[str, float],
        speech_ratio: float,
        *,
        prosody_missing: str | None = None,
    ) -> StressResult:
        """A stretch of this speaker's audio as a whole (an utterance): scored against the same
        baseline, without learning it or smoothing (``index`` is ``raw_index``)."""
        return self._score(prosody, scores, speech_ratio, prosody_missing, learn=False)

    def _score(
        self,
        prosody: Prosody,
        scores: dict[str, float],
        speech_ratio: float,
        prosody_missing: str | None,
        *,
        learn: bool,
    ) -> StressResult:
        m = self.model
        components: dict[str, dict[str, Any]] = {}
        log_odds = m.intercept
        measured = prosody.measured
        voice = self.baseline.voice(prosody) if measured else "higher"
        valence: dict[str, float] = {}
        valence_log_odds = 0.0
        if measured:
            for name, weight in m.weights.items():
                value = getattr(prosody, name)
                valence_weight = m.valence_weights.get(name, 0.0) if m.valence_weight else 0.0
                if (weight == 0.0 and valence_weight == 0.0) or not math.isfinite(value):
                    continue  # a measure the fitted index does not use, or did not get
                centre, spread = self.baseline.centre_spread(name, voice, value)
                z = float(np.clip((value - centre) / spread, -m.z_clip, m.z_clip))
                if valence_weight:
                    valence[name] = round(z, 2)
                    valence_log_odds += valence_weight * z
                if weight == 0.0:
                    continue
                departure = self.baseline.departure(name, z)
                log_odds += weight * departure
                components[name] = {
                    "value": round(value, 4),
                    "baseline": round(centre, 4),
                    "spread": round(spread, 4),
                    "unit": MEASURES[name][1],
                    "z": round(z, 2),
                    "weight": weight,
                    "points": round(m.scale * weight * departure, 1),
                }
                if name in m.either_way:
                    components[name]["either_way"] = True  # points from its departure
            if valence:
                log_odds += m.valence_weight * valence_log_odds
                components["prosodic_valence"] = {
                    "value": round(valence_log_odds, 3),
                    "unit": "log-odds, strain over joy",
                    "measures": valence,  # their z-scores
                    "weights": {k: m.valence_weights[k] for k in valence},
                    "weight": m.valence_weight,
                    "points": round(m.scale * m.valence_weight * valence_log_odds, 1),
                }
        elif prosody_missing is not None:
            components["prosody"] = {"available": False, "reason": prosody_missing, "points": 0.0}
        prosodic = m.offset + m.scale * log_odds
        mass = _mass(scores, m.emotion_labels)
        usual = self.baseline.mass()
        emotion_points = m.scale * m.emotion_weight * (mass - usual)
        components["emotion_arousal"] = {
            "value": round(mass, 3),
            "baseline": round(usual, 3),
            "unit": "probability",
            "labels": dict(m.emotion_labels),
            "weight": m.emotion_weight,
            "points": round(emotion_points, 1),
        }
        joy = _mass(scores, m.joy_labels)
        if m.joy_labels:
            usual_joy = self.baseline.joy()
            joy_points = m.scale * m.joy_weight * (joy - usual_joy)
            emotion_points += joy_points
            components["emotion_valence"] = {
                "value": round(joy, 3),
                "baseline": round(usual_joy, 3),
                "unit": "probability",
                "labels": dict(m.joy_labels),
                "weight": m.joy_weight,
                "points": round(joy_points, 1),
            }
        raw = float(np.clip(prosodic + emotion_points, 0.0, 100.0))
        compared_with = self.baseline.windows
        if not learn:
            index = round(raw, 1)
        else:
            if measured and (self.calibrating or prosodic < ELEVATED):
                self.baseline.learn(prosody, mass, joy)  # after scoring: never its own reference
            if self._smoothed is None:
                self._smoothed = raw
            else:
                self._smoothed = self.smoothing * raw + (1.0 - self.smoothing) * self._smoothed
            index = round(self._smoothed, 1)
        return StressResult(
            index=index,
            raw_index=round(raw, 1),
            prosodic_index=round(float(np.clip(prosodic, 0.0, 100.0)), 1),
            level=level_of(index),
            confidence=self._confidence(prosody, speech_ratio, measured, compared_with),
            calibrating=self.calibrating,
            base=round(m.offset + m.scale * m.intercept, 1),
            components=components,
            baseline={"windows": compared_with, "voice": voice},
        )

    def _confidence(
        self, prosody: Prosody, speech_ratio: float, measured: bool, compared_with: int
    ) -> float:
        """How far to trust this window's index: the baseline it was scored against (not the
        one it then joined), its speech and voicing, the channel."""
        n = compared_with
        baseline_part = n / (n + PRIOR_WINDOWS)
        speech_part = min(1.0, speech_ratio / 0.6) * min(1.0, prosody.voiced_fraction / 0.3)
        confidence = (0.3 + 0.7 * baseline_part) * (0.5 + 0.5 * speech_part)
        if not measured:
            confidence *= NO_PROSODY_CONFIDENCE
        if self.narrowband:
            confidence *= NARROWBAND_CONFIDENCE
        return round(confidence, 2)


_DEFAULT: StressModel | None = None


def default_model() -> StressModel:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = StressModel.load()
    return _DEFAULT
