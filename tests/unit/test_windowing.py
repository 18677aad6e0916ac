from __future__ import annotations

import pytest

from engine.windowing import WindowScheduler

pytestmark = pytest.mark.unit
SR = 16000


class FakeVad:
    """Speech exactly within the given spans (in seconds)."""

    def __init__(self, *spans: tuple[float, float]) -> None:
        self.spans = [(int(a * SR), int(b * SR)) for a, b in spans]

    def _speech(self, start: int, end: int) -> int:
        return sum(max(0, min(end, b) - max(start, a)) for a, b in self.spans)

    def speech_ratio(self, start: int, end: int) -> float:
        return self._speech(start, end) / max(1, end - start)

    def has_speech(self, start: int, end: int) -> bool:
        return self._speech(start, end) > 0


def spans(plans):
    return [(p.start / SR, p.end / SR) for p in plans]


def test_windows_every_hop_of_one_length_once_due():
    sched = WindowScheduler(window_s=2.0, hop_s=1.0)
    vad = FakeVad((0, 10))
    assert sched.due(int(1.9 * SR), vad).windows == []
    assert spans(sched.due(int(4.5 * SR), vad).windows) == [(0, 2), (1, 3), (2, 4)]
    assert spans(sched.due(int(5.0 * SR), vad).windows) == [(3, 5)]
    assert {p.end - p.start for p in sched.due(10 * SR, vad).windows} == {2 * SR}


def test_windows_without_enough_speech_are_skipped_and_counted():
    sched = WindowScheduler(window_s=2.0, hop_s=1.0, min_speech_ratio=0.5)
    vad = FakeVad((3.0, 6.0))
    due = sched.due(8 * SR, vad)
    assert spans(due.windows) == [(2, 4), (3, 5), (4, 6), (5, 7)]
    assert due.skipped_silence == 3  # (0,2), (1,3), (6,8)
    assert [round(p.speech_ratio, 2) for p in due.windows] == [0.5, 1.0, 1.0, 0.5]


def test_final_window_covers_the_tail_when_speech_is_uncovered():
    sched = WindowScheduler(window_s=2.0, hop_s=1.0)
    vad = FakeVad((0, 5.5))
    end = int(5.5 * SR)
    assert spans(sched.due(end, vad).windows)[-1] == (3, 5)
    final = sched.finish(end, vad)
    assert final is not None and final.final
    assert spans([final]) == [(3.5, 5.5)]
    assert final.end - final.start == 2 * SR


def test_no_final_window_when_the_tail_is_silent_or_covered():
    sched = WindowScheduler(window_s=2.0, hop_s=1.0)
    vad = FakeVad((0, 4.9))
    sched.due(int(5.5 * SR), vad)
    assert sched.finish(int(5.5 * SR), vad) is None
    sched = WindowScheduler(window_s=2.0, hop_s=1.0)
    vad = FakeVad((0, 6))
    sched.due(6 * SR, vad)
    assert sched.finish(6 * SR, vad) is None


def test_a_stream_shorter_than_a_window_gets_one_short_window():
    sched = WindowScheduler(window_s=2.0, hop_s=1.0)
    vad = FakeVad((0.2, 1.2))
    assert sched.due(int(1.4 * SR), vad).windows == []
    final = sched.finish(int(1.4 * SR), vad)
    assert spans([final]) == [(0, 1.4)]


@pytest.mark.parametrize("kwargs", [{"window_s": 0}, {"hop_s": -1}, {"min_speech_ratio": 1.5}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        WindowScheduler(**kwargs)
