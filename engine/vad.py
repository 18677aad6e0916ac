"""Voice activity gate: webrtcvad frames, confirmed by voicing, smoothed with onset and hangover.

webrtcvad alone marks stationary noise (white, pink, fan hum) as speech at every aggressiveness,
so a frame counts as speech only when webrtcvad says so *and* the frame is periodic in the voice
pitch range (normalised autocorrelation peak, corrected for the analysis window, at a lag of
2.5-16.7 ms). Speech starts after ``onset_ms`` of such frames and ends ``hangover_ms`` after the
last one, which carries the gate over unvoiced consonants and short pauses.

Per-frame decisions are kept in a bounded ring indexed by absolute frame number, so any span of
the stream that the audio ring buffer still holds can be asked for its speech ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import webrtcvad

from engine import SAMPLE_RATE

FRAME_MS_CHOICES = (10, 20, 30)
_ANALYSIS_SAMPLES = 480  # 30 ms: two periods of a 66 Hz voice; shorter frames look back
_FFT = 1024
_MIN_LAG = SAMPLE_RATE // 400
_MAX_LAG = SAMPLE_RATE // 60
_VOICING_THRESHOLD = 0.6
_ENERGY_FLOOR_DBFS = -55.0


@dataclass(slots=True)
class VadEvent:
    """A change of the smoothed speech state at ``position`` (samples from stream start)."""

    speech: bool
    position: int

    @property
    def at_s(self) -> float:
        return self.position / SAMPLE_RATE


def _window_autocorrelation() -> np.ndarray:
    window = np.hanning(_ANALYSIS_SAMPLES)
    ac = np.fft.irfft(np.abs(np.fft.rfft(window, _FFT)) ** 2, _FFT)[:_ANALYSIS_SAMPLES]
    return np.maximum(ac / ac[0], 1e-3)


_HANN = np.hanning(_ANALYSIS_SAMPLES)
_WINDOW_AC = _window_autocorrelation()


def voicing(frames: np.ndarray) -> np.ndarray:
    """Periodicity (0..~1) of each row of ``frames`` (n, 480); 0 where the peak is at a bound."""
    frames = frames - frames.mean(axis=1, keepdims=True)
    spectrum = np.fft.rfft(frames * _HANN, _FFT)
    ac = np.fft.irfft(np.abs(spectrum) ** 2, _FFT)[:, :_ANALYSIS_SAMPLES]
    ac = ac / np.maximum(ac[:, :1], 1e-12) / _WINDOW_AC
    band = ac[:, _MIN_LAG : _MAX_LAG + 1]
    lag = band.argmax(axis=1)
    interior = (lag > 0) & (lag < band.shape[1] - 1)  # monotone decay (coloured noise) is not pitch
    return np.where(interior, band.max(axis=1), 0.0)


class VadGate:
    def __init__(
        self,
        *,
        frame_ms: int = 30,
        aggressiveness: int = 2,
        onset_ms: int = 60,
        hangover_ms: int = 300,
        capacity_s: float = 60.0,
        start_frame: int = 0,
    ) -> None:
        if frame_ms not in FRAME_MS_CHOICES:
            raise ValueError(f"frame_ms must be one of {FRAME_MS_CHOICES}, got {frame_ms}")
        if not 0 <= aggressiveness <= 3:
            raise ValueError(f"aggressiveness must be 0-3, got {aggressiveness}")
        self.frame_samples = SAMPLE_RATE * frame_ms // 1000
        self._vad = webrtcvad.Vad(aggressiveness)
        self._onset_frames = max(1, round(onset_ms / frame_ms))
        self._hangover_frames = max(0, round(hangover_ms / frame_ms))
        self._capacity = max(1, int(capacity_s * SAMPLE_RATE) // self.frame_samples)
        self._flags = np.zeros(self._capacity, dtype=np.uint8)
        self._history = np.zeros(_ANALYSIS_SAMPLES, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        self.frames = start_frame  # frames decided so far (a continued stream: from its start)
        self.in_speech = False
        self.speech_frames = 0  # smoothed speech frames since the stream started
        self._run = 0  # consecutive voiced speech frames while not in speech
        self._since_voiced = 0

    def process(self, samples: np.ndarray) -> list[VadEvent]:
        """Consume 16 kHz float32 samples; return the state changes they caused."""
        if self._pending.size:
            samples = np.concatenate((self._pending, samples))
        n = samples.shape[0] // self.frame_samples
        self._pending = samples[n * self.frame_samples :].copy()
        if n == 0:
            return []
        frames = samples[: n * self.frame_samples].reshape(n, self.frame_samples)
        context = np.concatenate((self._history, samples[: n * self.frame_samples]))
        self._history = context[-_ANALYSIS_SAMPLES:].copy()
        rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
        loud = 20 * np.log10(np.maximum(rms, 1e-10)) > _ENERGY_FLOOR_DBFS
        # periodicity of the loud frames only: a quiet frame is not speech whatever its pitch
        voiced = np.zeros(n, dtype=bool)
        (candidates,) = np.nonzero(loud)
        if candidates.size:
            ends = _ANALYSIS_SAMPLES + self.frame_samples * (candidates + 1)
            analysis = np.stack([context[e - _ANALYSIS_SAMPLES : e] for e in ends])
            voiced[candidates] = voicing(analysis) > _VOICING_THRESHOLD
        pcm = (np.clip(frames, -1.0, 1.0) * 32767).astype("<i2")
        events: list[VadEvent] = []
        for i in range(n):
            is_speech = bool(
                loud[i] and voiced[i] and self._vad.is_speech(pcm[i].tobytes(), SAMPLE_RATE)
            )
            event = self._step(is_speech)
            if event is not None:
                events.append(event)
        return events

    def _step(self, is_speech: bool) -> VadEvent | None:
        index = self.frames
        self.frames += 1
        event = None
        if self.in_speech:
            self._since_voiced = 0 if is_speech else self._since_voiced + 1
            if self._since_voiced > self._hangover_frames:
                self.in_speech = False
                event = VadEvent(False, index * self.frame_samples)
        else:
            self._run = self._run + 1 if is_speech else 0
            if self._run >= self._onset_frames:
                self.in_speech = True
                self._since_voiced = 0
                first = index - self._run + 1
                for j in range(max(first, self.frames - self._capacity), index):
                    self._flags[j % self._capacity] = 1  # the onset frames were speech too
                self.speech_frames += index - first
                event = VadEvent(True, first * self.frame_samples)
        self._flags[index % self._capacity] = int(self.in_speech)
        self.speech_frames += int(self.in_speech)
        return event

    def speech_ratio(self, start: int, end: int) -> float:
        """Fraction of decided frames within samples [start, end) that are speech."""
        first = -(-start // self.frame_samples)
        last = min(end // self.frame_samples, self.frames)
        first = max(first, self.frames - self._capacity)
        if last <= first:
            return 0.0
        idx = np.arange(first, last) % self._capacity
        return float(self._flags[idx].mean())

    def has_speech(self, start: int, end: int) -> bool:
        return self.speech_ratio(start, end) > 0.0
