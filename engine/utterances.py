"""Utterances: what a speaker said between two pauses, classified once as a whole clip.

The sliding windows are what a live chart needs; an utterance is what a reviewer asks about, and
what Emotion2Vec+ was trained on. The VAD's speech segments cut them: an utterance runs from
speech onset to the end of the VAD's hangover (``hangover_ms``, 300 ms by default), and a segment
longer than ``max_s`` is split into pieces of ``max_s`` (the last one shorter). A segment shorter
than ``min_s`` is a cough or a click, not an utterance, and is left out (a split's last piece is
kept, however short).

:class:`UtteranceCutter` keeps only the audio of the utterance in progress: at most ``max_s``
plus one fed part, however long the speaker talks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine import SAMPLE_RATE
from engine.ring_buffer import RingBuffer
from engine.vad import VadEvent


@dataclass(slots=True)
class Utterance:
    seq: int  # 0, 1, ... within its stream
    start: int  # samples from stream start
    end: int
    samples: np.ndarray  # mono float32, 16 kHz, [start, end)
    split: bool = False  # cut at max_s: the speaker had not paused

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.end / SAMPLE_RATE


class UtteranceCutter:
    def __init__(self, *, max_s: float = 30.0, min_s: float = 0.5, seq: int = 0) -> None:
        if not 1.0 <= max_s <= 60.0:
            raise ValueError(f"max_utterance_s must be within 1-60 s, got {max_s}")
        self.max_samples = int(max_s * SAMPLE_RATE)
        self.min_samples = int(min_s * SAMPLE_RATE)
        self.seq = seq  # the next utterance's number
        self._start: int | None = None  # where the utterance in progress began
        self._parts: list[np.ndarray] = []
        self._held = 0  # samples in _parts
        self._continued = False  # the utterance in progress follows a split

    @property
    def open(self) -> bool:
        return self._start is not None

    def feed(
        self, ring: RingBuffer, part_end: int, part: np.ndarray, events: list[VadEvent]
    ) -> list[Utterance]:
        """``part`` was just written to ``ring``, ending at ``part_end``; ``events`` are the VAD
        changes it caused, in order. Returns the utterances that closed."""
        out: list[Utterance] = []
        if self._start is not None:
            self._append(part)
        for event in events:
            if event.speech:
                self._start, self._continued = event.position, False
                self._parts, self._held = [], 0
                self._append(ring.read(event.position, part_end))
            elif self._start is not None:
                out += self._close(event.position)
            out += self._split()
        out += self._split()
        return out

    def finish(self, stream_end: int) -> list[Utterance]:
        """End of stream: the utterance in progress closes where the audio ends."""
        return self._close(stream_end) if self._start is not None else []

    def _append(self, samples: np.ndarray) -> None:
        self._parts.append(samples)
        self._held += samples.shape[0]

    def _split(self) -> list[Utterance]:
        out = []
        while self._start is not None and self._held >= self.max_samples:
            audio = np.concatenate(self._parts)
            out.append(self._make(self._start, audio[: self.max_samples], split=True))
            self._start += self.max_samples
            self._continued = True
            self._parts, self._held = [audio[self.max_samples :]], audio.shape[0] - self.max_samples
        return out

    def _close(self, end: int) -> list[Utterance]:
        assert self._start is not None
        start, length = self._start, end - self._start
        audio = np.concatenate(self._parts)[:length] if self._parts else np.zeros(0, np.float32)
        continued = self._continued
        self._start, self._parts, self._held, self._continued = None, [], 0, False
        if length <= 0 or (length < self.min_samples and not continued):
            return []
        return [self._make(start, audio)]

    def _make(self, start: int, audio: np.ndarray, *, split: bool = False) -> Utterance:
        utterance = Utterance(self.seq, start, start + audio.shape[0], audio, split)
        self.seq += 1
        return utterance
