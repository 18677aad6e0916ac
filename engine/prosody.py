"""Prosody of one analysis window: the field's standard acoustic parameters for arousal.

The measures are eGeMAPS v02 functionals (Eyben et al. 2016, the paralinguistics community's
minimal parameter set), computed by openSMILE through the ``opensmile`` package with
``prosody.conf``: eGeMAPS v02's own components and settings for these measures only, which gives
the same numbers at half the cost (no formants, MFCCs or spectral flux). F0 in semitones
(mean and range), loudness (its level in phon, and its range relative to its mean), alpha ratio,
Hammarberg index and spectral slopes over voiced frames, HNR, jitter, shimmer, and the rate of
loudness peaks and voiced segments.
A window without enough voicing has no prosody (every measure NaN) and the stress scorer leaves
it out. Units are in the names and in ``MEASURES``.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from engine import SAMPLE_RATE

MIN_VOICED_FRACTION = 0.08  # less voicing than this in a window: no prosody for it

# field -> (eGeMAPS functional, unit, what it is, normative). A normative measure means the same
# across microphones, gains and telephone lines, so a population norm is a fair first reference
# for it; the others (levels and spectral balance) are compared with the speaker's own only.
MEASURES: dict[str, tuple[str, str, str, bool]] = {
    "f0_mean_st": ("F0semitoneFrom27.5Hz_sma3nz_amean", "semitones re 27.5 Hz", "pitch", True),
    "f0_range_st": ("F0semitoneFrom27.5Hz_sma3nz_pctlrange0-2", "semitones", "pitch range", True),
    "loudness_phon": ("loudness_sma3_amean", "phon", "loudness level", False),
    "loudness_range_rel": ("loudness_sma3_pctlrange0-2", "ratio", "loudness range / mean", True),
    "alpha_ratio_db": ("alphaRatioV_sma3nz_amean", "dB", "energy above 1 kHz vs below", False),
    "hammarberg_db": ("hammarbergIndexV_sma3nz_amean", "dB", "Hammarberg index", False),
    "slope_0_500": ("slopeV0-500_sma3nz_amean", "dB/Hz", "spectral slope 0-500 Hz", False),
    "slope_500_1500": ("slopeV500-1500_sma3nz_amean", "dB/Hz", "slope 0.5-1.5 kHz", False),
    "hnr_db": ("HNRdBACF_sma3nz_amean", "dB", "harmonics-to-noise ratio", False),
    "jitter": ("jitterLocal_sma3nz_amean", "ratio", "jitter", True),
    "shimmer_db": ("shimmerLocaldB_sma3nz_amean", "dB", "shimmer", True),
    "peaks_per_s": ("loudnessPeaksPerSec", "1/s", "loudness peaks (syllable rate)", True),
    "voiced_per_s": ("VoicedSegmentsPerSec", "1/s", "voiced segments per second", True),
}


def _phon(sone: float) -> float:
    """Loudness level: 40 phon at 1 sone, +10 phon per doubling (a gain adds a constant)."""
    return 40.0 + 10.0 * math.log2(max(sone, 1e-4))


@dataclass(slots=True)
class Prosody:
    f0_mean_st: float
    f0_range_st: float
    loudness_phon: float
    loudness_range_rel: float
    alpha_ratio_db: float
    hammarberg_db: float
    slope_0_500: float
    slope_500_1500: float
    hnr_db: float
    jitter: float
    shimmer_db: float
    peaks_per_s: float
    voiced_per_s: float
    voiced_fraction: float

    @classmethod
    def unmeasured(cls, voiced_fraction: float = 0.0) -> Prosody:
        """No measure at all: the stress scorer then leaves prosody out."""
        return cls(**dict.fromkeys(MEASURES, math.nan), voiced_fraction=voiced_fraction)

    @property
    def measured(self) -> bool:
        return math.isfinite(self.f0_mean_st)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def vector(self) -> np.ndarray:
        return np.array([getattr(self, name) for name in MEASURES], dtype=np.float64)


assert [f.name for f in fields(Prosody)][:-1] == list(MEASURES), "Prosody and MEASURES differ"
_COLUMNS = [column for column, *_ in MEASURES.values()] + ["MeanVoicedSegmentLengthSec"]

CONFIG = Path(__file__).with_name("prosody.conf")
_local = threading.local()  # an openSMILE extractor per thread: it keeps state between calls


class Extractor:
    """``prosody.conf``'s eGeMAPS v02 functionals of one signal per call, from one openSMILE
    instance that is set up once and reset between calls. ``opensmile.Smile.process_signal``
    builds a new instance for every call: that set-up was half of a 2 s window's cost here
    (bench.prosody). The results are the same as full eGeMAPS v02 through ``process_signal``
    (a unit test compares them)."""

    def __init__(self, feature_set: Any = None) -> None:
        """``feature_set``: prosody.conf unless given (bench.prosody times the full set)."""
        import opensmile
        from opensmile.core.config import config
        from opensmile.core.lib import OpenSMILE

        smile = opensmile.Smile(feature_set=feature_set or str(CONFIG), feature_level="func")
        self.columns = {name: i for i, name in enumerate(smile.feature_names)}
        # What process_signal gives a new instance (opensmile 2.5-2.6, Smile._extract).
        options = smile._options()
        options["source"] = os.path.join(smile.default_config_root, config.EXTERNAL_INPUT_CONFIG)
        options["sampleRate"] = SAMPLE_RATE
        options["nBits"] = 16
        self._source = config.EXTERNAL_SOURCE_COMPONENT
        self._sink = config.EXTERNAL_OUTPUT_COMPONENT
        self._smile = OpenSMILE()
        self._smile.initialize(
            config_file=smile.config_path, options=options, loglevel=smile.loglevel
        )
        self._rows: list[np.ndarray] = []
        self._listen()

    def _listen(self) -> None:
        """Register the sink's callback: needed after every reset. The wrapper keeps every
        callback it was given alive; only the newest is still registered, so drop the others."""
        self._smile.external_sink_set_callback_ex(self._sink, self._collect)
        del self._smile._callbacks[:-1]

    def _collect(self, data: np.ndarray, _meta: Any) -> None:
        self._rows.append(np.array(data, dtype=np.float64).ravel())

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """The functionals of a 16 kHz float signal, in ``columns`` order (NaN: none came)."""
        self._rows.clear()
        pcm = (np.clip(samples, -1.0, 32767 / 32768) * 32768).astype(np.int16)
        try:
            if not self._smile.external_audio_source_write_data(self._source, pcm.tobytes()):
                raise RuntimeError(f"openSMILE took less than the {pcm.size} samples given")
            self._smile.external_audio_source_set_eoi(self._source)
            self._smile.run()
        finally:
            self._smile.reset()
            self._listen()
        return self._rows[0] if self._rows else np.full(len(self.columns), np.nan)


def _extractor() -> Extractor:
    extractor = getattr(_local, "extractor", None)
    if extractor is None:
        extractor = _local.extractor = Extractor()
    return extractor


def measure(samples: np.ndarray, *, narrowband: bool = False) -> Prosody:
    """Measure a mono 16 kHz window. (``narrowband``: the audio came at 8 kHz; the measures are
    the same, compared with the same speaker's baseline over the same channel.)"""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.size < SAMPLE_RATE // 4 or not np.any(samples):
        return Prosody.unmeasured()
    extractor = _extractor()
    try:
        row = extractor(samples)
    except Exception:
        _local.extractor = None  # its state is unknown now: the next call builds a new one
        raise
    values = {column: row[extractor.columns[column]] for column in _COLUMNS}
    voiced = float(values["VoicedSegmentsPerSec"] * values["MeanVoicedSegmentLengthSec"])
    voiced = min(1.0, max(0.0, voiced)) if math.isfinite(voiced) else 0.0
    if voiced < MIN_VOICED_FRACTION or not values["F0semitoneFrom27.5Hz_sma3nz_amean"] > 0:
        return Prosody.unmeasured(voiced)
    measured = {name: float(values[column]) for name, (column, *_) in MEASURES.items()}
    sone = measured["loudness_phon"]
    measured["loudness_phon"] = _phon(sone)
    measured["loudness_range_rel"] = measured["loudness_range_rel"] / max(sone, 1e-4)
    return Prosody(**measured, voiced_fraction=voiced)
