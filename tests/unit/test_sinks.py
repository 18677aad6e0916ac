"""The sinks without a server: the store's writer on a scripted commit, the event bus and the
subscribers, with recording fakes; nothing here depends on timing but the one hand-on bound."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from engine.audio import AudioFormat
from engine.model import WindowAnswer
from server.runtime import ThreadRuntime
from server.sessions.events import Ended, EventBus, Result, Skipped
from server.sessions.session import Session
from server.sessions.wire import timeline_csv
from server.sinks.metrics import Metrics
from server.sinks.store import writer as store_writer
from server.sinks.store.writer import Store
from server.sinks.subscribers import MetricsRecorder, RoomPublisher, StoreRecorder
from tests import LABELS
from tests.support.client import wait_for

pytestmark = pytest.mark.unit
WAIT_S = 30


def result(seq: int) -> dict:
    return {"seq": seq, "start_s": 0.0, "end_s": 2.0, "emotion": "neutral", "stress": {"index": 1}}


def opened(tmp_path, **kwargs) -> Store:
    store = Store(str(tmp_path / "t.db"), runtime=ThreadRuntime(), **kwargs)
    store.start()
    store.claim("s1", source="socketio", started_at=1.0, config={}, model={}, meta={})
    return store


def test_each_write_is_handed_on_in_order_once_committed(tmp_path, monkeypatch):
    store = opened(tmp_path)
    gate = threading.Event()
    real = store._commit
    monkeypatch.setattr(store, "_commit", lambda writes: (gate.wait(WAIT_S), real(writes)))
    monkeypatch.setattr(store_writer, "HAND_ON_AFTER_S", 60.0)
    handed: list[int] = []
    for seq in (1, 2, 3):
        store.add_result("s1", result(seq), then=lambda s=seq: handed.append(s))
    time.sleep(0.05)  # (the writer has taken them: still, nothing is handed on uncommitted)
    assert handed == []
    gate.set()
    wait_for(lambda: handed == [1, 2, 3], WAIT_S, "the hand-on in order")
    store.close()


def test_an_unreachable_database_degrades_hands_on_anyway_and_retries(tmp_path, monkeypatch):
    store = opened(tmp_path)
    down = [True]
    real = store._commit
    errors: list[str] = []
    store._on_error = errors.append

    def commit(writes):
        if down[0]:
            raise sa.exc.OperationalError("INSERT", {}, Exception("connection refused"))
        real(writes)

    monkeypatch.setattr(store, "_commit", commit)
    handed: list[int] = []
    store.add_result("s1", result(1), then=lambda: handed.append(1))
    wait_for(lambda: handed == [1] and store.degraded, WAIT_S, "hand-on while degraded")
    assert "unreachable" in errors
    down[0] = False
    assert store.flush(WAIT_S) and not store.degraded  # retried and written
    assert [f["seq"] for f in store.get_session("s1")["frames"]] == [1]
    store.close()


def test_a_slow_commit_hands_results_on_within_the_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(store_writer, "HAND_ON_AFTER_S", 0.1)
    store = opened(tmp_path)
    gate = threading.Event()
    real = store._commit
    monkeypatch.setattr(store, "_commit", lambda writes: (gate.wait(WAIT_S), real(writes)))
    handed: list[int] = []
    store.add_result("s1", result(1), then=lambda: handed.append(1))
    wait_for(lambda: handed == [1], WAIT_S, "the hand-on of a slow commit")
    assert store.degraded
    gate.set()
    assert store.flush(WAIT_S) and not store.degraded
    store.close()


def test_the_buffer_of_unwritten_writes_is_bounded(tmp_path, monkeypatch):
    store = opened(tmp_path, buffer_max=5)
    errors: list[str] = []
    store._on_error = errors.append
    monkeypatch.setattr(
        store,
        "_commit",
        lambda writes: (_ for _ in ()).throw(sa.exc.OperationalError("I", {}, Exception("down"))),
    )
    for seq in range(1, 21):
        store.add_result("s1", result(seq))
    wait_for(lambda: store.dropped >= 15, WAIT_S, "the oldest dropped")
    assert errors.count("dropped") == store.dropped
    store._closed = True  # (close would wait for the dead database)


# --- the event bus -------------------------------------------------------------------------------


class Slow:
    name = "slow"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.got: list[object] = []

    def handle(self, event: object) -> None:
        assert self.gate.wait(WAIT_S)
        self.got.append(event)


class Quick:
    name = "quick"

    def __init__(self) -> None:
        self.got: list[object] = []

    def handle(self, event: object) -> None:
        self.got.append(event)


def session() -> Session:
    return Session(id="s1", source="socketio", format=AudioFormat())


def test_a_slow_subscriber_holds_back_no_other_and_loses_its_oldest_when_full():
    slow, quick, dropped = Slow(), Quick(), []
    bus = EventBus(ThreadRuntime(), [slow, quick], queue_size=3, on_drop=dropped.append)
    events = [Skipped(session(), None, "silence", i) for i in range(10)]
    for n, event in enumerate(events, 1):
        bus.publish(event)  # never blocks, though the slow one handles nothing meanwhile
        wait_for(lambda n=n: len(quick.got) == n, WAIT_S, "the quick subscriber")
    slow.gate.set()
    assert bus.close(WAIT_S)
    assert quick.got == events
    # the slow one was inside the first; of the rest it kept the newest, up to its queue
    kept = slow.got[1:]
    assert slow.got[0] == events[0] and 1 <= len(kept) <= 3 and kept == events[-len(kept) :]
    assert len(dropped) == 10 - len(slow.got) and set(dropped) == {"slow"}


# --- subscribers ---------------------------------------------------------------------------------


def frame_result(s: Session, seq: int) -> Result:
    from engine.pipeline import FrameResult
    from engine.prosody import Prosody
    from engine.stress import StressScorer

    scores = dict.fromkeys(LABELS, 1 / len(LABELS))
    stress = StressScorer().update(Prosody.unmeasured(), scores, 0.5, prosody_missing="error")
    frame = FrameResult(0.0, 2.0, "neutral", 0.2, scores, stress, 0.5, WindowAnswer(np.zeros(9)))
    return Result(s, None, {**result(seq), "session_id": s.id}, 0.0, frame)


def test_the_room_hears_a_result_after_the_store_commits_it_and_a_summary_closes_the_room(
    tmp_path,
):
    store = opened(tmp_path)
    emitted: list[tuple[str, dict, str]] = []
    closed: list[str] = []
    room = RoomPublisher(lambda name, data, to: emitted.append((name, data, to)), closed.append)
    recorder = StoreRecorder(store, room)
    s = session()
    recorder.handle(frame_result(s, 1))
    recorder.handle(Ended(s, "done", {"session_id": "s1", "results": 1}))
    wait_for(lambda: closed == ["session:s1"], WAIT_S, "the room closed")
    assert [(n, to) for n, _, to in emitted] == [
        ("emotion_result", "session:s1"),
        ("session_summary", "session:s1"),
    ]
    assert s.published_seq == 1
    stored = store.get_session("s1")
    assert [f["seq"] for f in stored["frames"]] == [1] and stored["summary"]["results"] == 1
    store.close()


def test_metrics_count_results_skips_and_sessions_by_their_vocabulary():
    metrics = Metrics(LABELS, registry=CollectorRegistry())
    recorder = MetricsRecorder(metrics, clock=lambda: 1.5)
    s = session()
    recorder.handle(frame_result(s, 1))
    recorder.handle(Skipped(s, None, "expired", 3))
    recorder.handle(Skipped(s, None, "silence", 2))
    r = metrics.registry
    assert r.get_sample_value("voxaffect_emotion_results_total", {"emotion": "neutral"}) == 1
    assert r.get_sample_value("voxaffect_windows_skipped_total", {"reason": "expired"}) == 3
    assert r.get_sample_value("voxaffect_windows_skipped_total", {"reason": "silence"}) == 2
    assert r.get_sample_value("voxaffect_end_to_end_seconds_sum") == 1.5


# --- the store and metrics, end to end -----------------------------------------------

TWO_LABELS = ("angry", "happy")


def full_result(seq: int) -> dict:  # (labels: angry, happy)
    return {
        "seq": seq,
        "start_s": seq - 1.0,
        "end_s": seq + 1.0,
        "emotion": "happy",
        "confidence": 0.6,
        "scores": {"angry": 0.4, "happy": 0.6},
        "speech_ratio": 1.0,
        "device": "cpu",
        "stress": {"index": 10.0 * seq, "level": "low", "confidence": 0.5},
        "circumplex": {"valence": 0.25, "arousal": 0.5, "mapped": 1.0},
    }


def test_store_round_trip_and_csv(tmp_path):
    store = Store(str(tmp_path / "t.db"), runtime=ThreadRuntime())
    assert store.start() == [1, 2, 3, 4, 5, 6, 7]
    assert store.claim(
        "s1",
        source="socketio",
        started_at=1.0,
        config={"window_s": 2.0},
        model={"labels": list(TWO_LABELS)},
        meta={},
    )
    assert not store.claim("s1", source="twilio", started_at=2.0, config={}, model={}, meta={}), (
        "an id is claimed once"
    )
    handed_on: list[int] = []
    for seq in (1, 2, 3):
        store.add_result("s1", full_result(seq), then=lambda seq=seq: handed_on.append(seq))
    store.add_result("s1", full_result(2))  # a duplicate write is ignored
    for track, useq, start in (("agent", 0, 4.0), (None, 0, 0.5), ("agent", 1, 9.0)):
        utterance = {
            **full_result(1),
            "utterance_seq": useq,
            "start_s": start,
            "end_s": start + 2.5,
            "speech_s": 2.5,
            "voiced_s": 1.9,
            "split": False,
        }
        del utterance["seq"], utterance["speech_ratio"]
        if track:
            utterance["track"] = track
        store.add_utterance("s1", utterance)
    store.add_utterance("s1", utterance)  # a duplicate write is ignored
    store.close_session("s1", {"results": 3}, ended_at=5.0)
    assert store.flush()
    assert handed_on == [1, 2, 3]
    stored = store.get_session("s1")
    assert [f["seq"] for f in stored["frames"]] == [1, 2, 3]
    assert stored["summary"] == {"results": 3} and stored["results"] == 3
    assert stored["source"] == "socketio"
    assert [f["seq"] for f in store.get_session("s1", since_seq=1)["frames"]] == [2, 3]
    assert store.get_session("nope") is None
    assert store.list_sessions()[0]["session_id"] == "s1"
    rows = timeline_csv(stored).splitlines()
    assert rows[0].endswith("angry,happy") and rows[2].startswith("2,,1.0,3.0,happy,0.6,20.0")
    # utterances in time order, whatever their track
    assert [(u.get("track"), u["start_s"]) for u in stored["utterances"]] == [
        (None, 0.5),
        ("agent", 4.0),
        ("agent", 9.0),
    ]
    rows = timeline_csv(stored, "utterances").splitlines()
    assert rows[0].startswith("utterance_seq,track,start_s,end_s,emotion") and len(rows) == 4
    assert rows[2].startswith("0,agent,4.0,6.5,happy,0.6,10.0,low,0.5,2.5,1.9,False,0.25,0.5,cpu,")
    assert store.delete_session("s1") and store.get_session("s1") is None
    store.close()
    assert Store(str(tmp_path / "t.db"), runtime=ThreadRuntime()).start() == []  # migrated


def test_purge_deletes_what_ended_before_the_date_and_leaves_the_rest(tmp_path):
    from server.cli import main

    db = str(tmp_path / "t.db")
    store = Store(db, runtime=ThreadRuntime())
    store.start()
    day = 86_400.0
    now = 100 * day
    sessions = {  # id: (started, ended)
        "old": (now - 40 * day, now - 40 * day + 60),
        "recent": (now - 2 * day, now - 2 * day + 60),
        "open-live": (now - 0.5 * day, None),  # its node runs it: never purged
        "open-dead": (now - 42 * day, None),
    }
    for sid, (started, ended) in sessions.items():
        store.claim(sid, source="socketio", started_at=started, config={}, model={}, meta={})
        store.add_result(sid, full_result(1))
        if ended is not None:
            store.close_session(sid, {"results": 1}, ended_at=ended)
    assert store.flush()
    assert store.purge(now - 30 * day - 0.5 * day) == 1  # ended ones only: "old"
    assert store.purge(now - 30 * day - 0.5 * day, abandoned=True) == 1  # retention: "open-dead"
    left = {s["session_id"] for s in store.list_sessions()}
    assert left == {"recent", "open-live"}
    store.close()
    assert main(["purge", "--before", "1970-04-10T00:00:00+00:00", "--db", db]) == 0  # day 99
    reopened = Store(db, runtime=ThreadRuntime())
    reopened.start()
    assert [s["session_id"] for s in reopened.list_sessions()] == ["open-live"]
    assert reopened.get_session("recent") is None
    reopened.close()
    assert main(["purge", "--before", "last tuesday", "--db", db]) == 2


def test_a_handoff_is_taken_once_by_token_hash_or_id_and_stale_ones_are_found(tmp_path):
    store = Store(str(tmp_path / "t.db"), runtime=ThreadRuntime(), node="a")
    store.start()
    row = {"started_at": 1.0, "config": {"sample_rate": 8000}, "model": {}, "meta": {}}
    assert store.claim("s1", source="socketio", reader_sha256="h1", **row)
    assert store.claim("c1", source="audiohook", **row)
    assert store.take_handoff(session_id="s1") is None  # running: nothing to take
    done: list[str] = []
    store.hand_off("s1", {"seq": 7}, at=100.0, then=lambda: done.append("s1"))
    store.hand_off("c1", {"seq": 2}, at=200.0, then=lambda: done.append("c1"))
    assert store.flush() and done == ["s1", "c1"]
    assert store.open_sessions_of_this_node() == []  # a restart of node a leaves them be
    assert store.stale_handoffs(150.0) == ["s1"]
    assert store.take_handoff(reader_sha256="other") is None
    assert store.take_handoff(session_id="c1", source="twilio") is None  # another protocol's
    assert store.take_handoff() is None  # neither key: never "any handoff"
    taken = store.take_handoff(reader_sha256="h1")
    assert taken is not None and taken["session_id"] == "s1" and taken["handoff"] == {"seq": 7}
    assert taken["config"] == {"sample_rate": 8000}
    assert store.take_handoff(reader_sha256="h1") is None  # once
    assert store.open_sessions_of_this_node() == ["s1"]  # this node's now
    assert store.take_handoff(session_id="c1", source="audiohook")["handoff"] == {"seq": 2}
    store.close_session("s1", {}, ended_at=300.0)
    store.hand_off("s1", {"seq": 8}, at=301.0, then=lambda: None)  # an ended one stays ended
    assert store.flush() and store.take_handoff(session_id="s1") is None
    store.close()
