"""Decide which fixed-length windows of a stream go to the model.

Windows start every ``hop_s`` (at 0, hop, 2·hop, ...) and span ``window_s``; one is due once the
stream has reached its end. A due window is analysed only if enough of it is speech
(``min_speech_ratio``), otherwise it is skipped as silence. At the end of the stream one final
window covers the last ``window_s`` of audio if speech after the last analysed window was not yet
covered. Every window has the same length — a stream shorter than one window is the only
exception — so windows from all sessions stack into exact batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine import SAMPLE_RATE
from engine.vad import VadGate


@dataclass(slots=True)
class Window:
    """A span [start, end) of the stream in samples, the share of it that is speech, and (once
    the pipeline has read them from the ring buffer) its samples."""

    start: int
    end: int
    speech_ratio: float
    final: bool = False
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.end / SAMPLE_RATE


@dataclass(slots=True)
class Due:
    """What became due since the last call: windows to analyse, and how many were silence."""

    windows: list[Window]
    skipped_silence: int = 0


class WindowScheduler:
    def __init__(
        self,
        *,
        window_s: float = 2.0,
        hop_s: float = 1.0,
        min_speech_ratio: float = 0.3,
        start: int = 0,
    ) -> None:
        if window_s <= 0 or hop_s <= 0:
            raise ValueError(f"window_s and hop_s must be positive, got {window_s}, {hop_s}")
        if not 0.0 <= min_speech_ratio <= 1.0:
            raise ValueError(f"min_speech_ratio must be within 0-1, got {min_speech_ratio}")
        self.window_samples = round(window_s * SAMPLE_RATE)
        self.hop_samples = round(hop_s * SAMPLE_RATE)
        self.min_speech_ratio = min_speech_ratio
        self._first = start
        self._next_start = start  # a continued stream's first window starts where it resumed
        self.covered_until = start  # end of the last window sent to the model

    def due(self, stream_end: int, vad: VadGate) -> Due:
        """Windows that end at or before ``stream_end`` and have not been considered yet."""
        due = Due([])
        while self._next_start + self.window_samples <= stream_end:
            start, end = self._next_start, self._next_start + self.window_samples
            self._next_start += self.hop_samples
            ratio = vad.speech_ratio(start, end)
            if ratio >= self.min_speech_ratio and ratio > 0.0:
                due.windows.append(Window(start, end, ratio))
                self.covered_until = end
            else:
                due.skipped_silence += 1
        return due

    def finish(self, stream_end: int, vad: VadGate) -> Window | None:
        """The final window at end of stream, if speech after the last window is uncovered."""
        if stream_end <= self.covered_until or not vad.has_speech(self.covered_until, stream_end):
            return None
        start = max(self._first, stream_end - self.window_samples)
        ratio = vad.speech_ratio(start, stream_end)
        if ratio < self.min_speech_ratio:
            return None
        self.covered_until = stream_end
        return Window(start, stream_end, ratio, final=True)
