"""Call dynamics on scripted two-party calls with known overlaps, silences and interruptions."""

from __future__ import annotations

import pytest

from engine.dynamics import SpeechLog, call_dynamics

pytestmark = pytest.mark.unit


def test_a_scripted_call_gives_the_known_talk_overtalk_silence_and_interruptions():
    # customer 0-4, agent cuts in at 3.5 (customer stops at 4.0: gave way within 1 s);
    # silence 6-9; customer 9-12 while the agent speaks 10-11 (the customer goes on: no
    # interruption); agent 13-15; the call lasts 20 s (5 s of silence at the end)
    segments = {
        "customer": [(0.0, 4.0), (9.0, 12.0)],
        "agent": [(3.5, 6.0), (10.0, 11.0), (13.0, 15.0)],
    }
    d = call_dynamics(segments, 20.0)
    assert d["parties"]["customer"] == {
        "talk_s": 7.0,
        "talk_ratio": 0.35,
        "turns": 2,
        "interruptions": 0,
    }
    assert d["parties"]["agent"]["talk_s"] == 5.5 and d["parties"]["agent"]["turns"] == 3
    assert d["parties"]["agent"]["interruptions"] == 1  # 3.5: the customer stopped at 4.0
    assert d["overtalk_s"] == 1.5 and d["overtalk_count"] == 2  # 3.5-4.0 and 10-11
    assert d["longest_silence_s"] == 5.0  # 15-20 beats 6-9
    assert d["duration_s"] == 20.0


def test_silence_at_the_start_counts_and_one_speaker_has_no_overtalk():
    d = call_dynamics({"speaker": [(6.0, 8.0), (8.5, 9.0)]}, 10.0)
    assert d["longest_silence_s"] == 6.0 and d["overtalk_s"] == 0 and d["overtalk_count"] == 0
    assert d["parties"]["speaker"]["turns"] == 2 and d["parties"]["speaker"]["interruptions"] == 0
    assert call_dynamics({"speaker": []}, 3.0)["longest_silence_s"] == 3.0


def test_a_speech_log_builds_segments_from_vad_changes_and_closes_at_the_end():
    log = SpeechLog()
    for speech, at in [(True, 0.5), (True, 0.7), (False, 2.0), (True, 3.0)]:
        log.change(speech, at)
    log.close(4.5)
    assert log.segments == [(0.5, 2.0), (3.0, 4.5)]
