"""Prosody of one analysis window: the acoustic measures the stress index is built from.

Pitch, intensity, jitter and shimmer come from Praat (praat-parselmouth); the spectrum from numpy.
Measures that a window cannot support (too little voicing, say) are NaN, and the stress scorer
leaves them out. Units are in the names.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import parselmouth
from parselmouth.praat import call
from scipy.signal import find_peaks

from engine import SAMPLE_RATE

PITCH_FLOOR_HZ = 75.0
PITCH_CEILING_HZ = 500.0
_MIN_VOICED_FRAMES = 5
_SILENCE_BELOW_MAX_DB = 25.0  # intensity frames this far below the window's peak are pauses
_NUCLEUS_PROMINENCE_DB = 2.0


@dataclass(slots=True)
class Prosody:
    f0_median_st: float  # semitones re 100 Hz
    f0_range_st: float  # 10th to 90th percentile, semitones
    loudness_dbfs: float  # RMS level of the voiced frames
    speech_rate_syl_s: float  # syllable nuclei per second of speaking time
    spectral_balance_db: float  # energy above 1 kHz relative to 50 Hz-1 kHz (−alpha ratio)
    jitter_pct: float  # local jitter, percent
    shimmer_pct: float  # local shimmer, percent
    voiced_fraction: float

    @classmethod
    def unmeasured(cls, voiced_fraction: float = 0.0) -> Prosody:
        """No measure at all: the stress scorer then leaves prosody out."""
        nan = math.nan
        return cls(nan, nan, nan, nan, nan, nan, nan, voiced_fraction)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _semitones(hz: np.ndarray) -> np.ndarray:
    return 12.0 * np.log2(hz / 100.0)


def _spectral_balance(samples: np.ndarray, voiced_times: np.ndarray, high_hz: float) -> float:
    """10·log10(E[1 kHz, high_hz] / E[50 Hz, 1 kHz]) over 32 ms frames at the voiced times."""
    n = 512
    centers = (voiced_times * SAMPLE_RATE).astype(int)
    centers = centers[(centers >= n // 2) & (centers + n // 2 <= samples.shape[0])]
    if centers.size == 0:
        return math.nan
    frames = np.stack([samples[c - n // 2 : c + n // 2] for c in centers]) * np.hanning(n)
    power = (np.abs(np.fft.rfft(frames, axis=1)) ** 2).sum(axis=0)
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    low = power[(freqs >= 50) & (freqs < 1000)].sum()
    high = power[(freqs >= 1000) & (freqs < high_hz)].sum()
    if low <= 0 or high <= 0:
        return math.nan
    return float(10.0 * np.log10(high / low))


def measure(samples: np.ndarray, *, narrowband: bool = False) -> Prosody:
    """Measure a mono 16 kHz window. ``narrowband`` (8 kHz source) caps the high band at 3.4 kHz."""
    sound = parselmouth.Sound(samples.astype(np.float64), sampling_frequency=SAMPLE_RATE)
    duration = samples.shape[0] / SAMPLE_RATE
    pitch = sound.to_pitch_ac(
        time_step=0.01, pitch_floor=PITCH_FLOOR_HZ, pitch_ceiling=PITCH_CEILING_HZ
    )
    f0 = pitch.selected_array["frequency"]
    times = pitch.xs()
    voiced = f0 > 0
    voiced_fraction = float(voiced.mean()) if f0.size else 0.0
    if voiced.sum() < _MIN_VOICED_FRAMES:
        return Prosody.unmeasured(voiced_fraction)

    st = _semitones(f0[voiced])
    f0_median = float(np.median(st))
    p10, p90 = np.percentile(st, [10, 90])

    # Loudness: RMS over 25 ms frames centred on the voiced pitch frames.
    half = int(0.0125 * SAMPLE_RATE)
    centers = (times[voiced] * SAMPLE_RATE).astype(int)
    energies = [
        float(np.mean(samples[max(0, c - half) : c + half].astype(np.float64) ** 2))
        for c in centers
    ]
    loudness = 10.0 * math.log10(max(float(np.mean(energies)), 1e-12))

    # Speech rate (after de Jong & Wempe 2009): intensity peaks that stand out from their
    # surroundings and fall on voiced frames are syllable nuclei.
    intensity = sound.to_intensity(minimum_pitch=PITCH_FLOOR_HZ, time_step=0.01)
    level = intensity.values[0]
    itimes = intensity.xs()
    speaking = level > level.max() - _SILENCE_BELOW_MAX_DB
    peaks, _ = find_peaks(level, prominence=_NUCLEUS_PROMINENCE_DB)
    peaks = [p for p in peaks if speaking[p] and pitch.get_value_at_time(itimes[p]) > 0]
    speaking_s = max(float(speaking.mean()) * duration, 0.1)
    rate = len(peaks) / speaking_s

    balance = _spectral_balance(samples, times[voiced], 3400.0 if narrowband else 5000.0)

    points = call(sound, "To PointProcess (periodic, cc)", PITCH_FLOOR_HZ, PITCH_CEILING_HZ)
    jitter = call(points, "Get jitter (local)", 0, 0, 0.0001, 0.02, 1.3)
    shimmer = call([sound, points], "Get shimmer (local)", 0, 0, 0.0001, 0.02, 1.3, 1.6)

    def pct(value: float) -> float:  # Praat returns NaN when undefined
        return float(value) * 100.0 if value == value else math.nan

    return Prosody(
        f0_median_st=f0_median,
        f0_range_st=float(p90 - p10),
        loudness_dbfs=loudness,
        speech_rate_syl_s=rate,
        spectral_balance_db=balance,
        jitter_pct=pct(jitter),
        shimmer_pct=pct(shimmer),
        voiced_fraction=voiced_fraction,
    )
