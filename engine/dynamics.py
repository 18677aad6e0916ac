"""How a conversation went, from each party's speech segments (the VAD gate's, per track).

For the parties of one call, over the call's ``duration_s``:

- ``talk_s`` / ``talk_ratio``: a party's speech time, and its share of the call;
- ``turns``: a party's speech segments (speech start to speech end, the gate's hangover bridging
  short pauses);
- ``overtalk_s`` / ``overtalk_count``: time with two or more parties speaking at once, and how
  many such spans;
- ``longest_silence_s``: the longest span with nobody speaking (the call's start and end
  included);
- ``interruptions``: a party starts speaking while another speaks, and the other stops within
  ``interruption_s`` of that start (the other gave way); counted for the party who started.

Only the parties that were analysed have speech segments (customer only by default).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

INTERRUPTION_S = 1.0
MAX_SEGMENTS = 100_000  # per track: a day of speech; beyond, the oldest are dropped


class SpeechLog:
    """One track's speech segments, from its VAD state changes."""

    def __init__(self) -> None:
        self.segments: list[tuple[float, float]] = []
        self._open: float | None = None

    def change(self, speech: bool, at_s: float) -> None:
        if speech and self._open is None:
            self._open = at_s
        elif not speech and self._open is not None:
            self._add(self._open, at_s)
            self._open = None

    def close(self, end_s: float) -> None:
        """The track ended at ``end_s``: a segment still open ends there."""
        if self._open is not None:
            self._add(self._open, max(end_s, self._open))
            self._open = None

    def _add(self, start: float, end: float) -> None:
        if end > start:
            self.segments.append((start, end))
            if len(self.segments) > MAX_SEGMENTS:
                del self.segments[: len(self.segments) - MAX_SEGMENTS]


def call_dynamics(
    segments: Mapping[str, Sequence[tuple[float, float]]],
    duration_s: float,
    interruption_s: float = INTERRUPTION_S,
) -> dict[str, Any]:
    """The measures above, rounded to milliseconds."""
    duration_s = max(duration_s, max((e for s in segments.values() for _, e in s), default=0.0))
    parties: dict[str, dict[str, Any]] = {}
    for party, spans in segments.items():
        talk = sum(e - s for s, e in spans)
        parties[party] = {
            "talk_s": round(talk, 3),
            "talk_ratio": round(talk / duration_s, 4) if duration_s > 0 else 0.0,
            "turns": len(spans),
            "interruptions": 0,
        }
    # a sweep over every start and end: how many speak at each moment
    edges = sorted(
        [(s, 1, p) for p, spans in segments.items() for s, _ in spans]
        + [(e, -1, p) for p, spans in segments.items() for _, e in spans],
        key=lambda edge: (edge[0], edge[1]),  # an end before a start at the same instant
    )
    speaking = 0
    overtalk_s, overtalk_count = 0.0, 0
    longest_silence, silent_since = 0.0, 0.0
    last = 0.0
    for at, step, _ in edges:
        if speaking >= 2:
            overtalk_s += at - last
        if speaking == 0:
            longest_silence = max(longest_silence, at - silent_since)
        if step > 0 and speaking == 1:
            overtalk_count += 1
        speaking += step
        if speaking == 0:
            silent_since = at
        last = at
    if speaking == 0:
        longest_silence = max(longest_silence, duration_s - silent_since)
    # a track's segments are in order and never overlap: the only one of another party that can
    # be under way at ``start`` is its last one to begin before it
    starts = {p: [s for s, _ in spans] for p, spans in segments.items()}
    for party, spans in segments.items():
        for start, _ in spans:
            for other, other_spans in segments.items():
                i = bisect.bisect_left(starts[other], start) - 1
                if (
                    other != party
                    and i >= 0
                    and start < other_spans[i][1] <= start + interruption_s
                ):
                    parties[party]["interruptions"] += 1
                    break
    return {
        "duration_s": round(duration_s, 3),
        "parties": parties,
        "overtalk_s": round(overtalk_s, 3),
        "overtalk_count": overtalk_count,
        "longest_silence_s": round(longest_silence, 3),
        "interruption_s": interruption_s,
    }
