"""Calls at the telephony edge, without sockets: scripted media-server WebSockets, the real
session factory and store, a scripted window analysis and an injected clock."""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from simple_websocket import ConnectionClosed

from server.edges.telephony.base import SILENCE
from server.edges.telephony.calls import TelephonyEdge
from server.edges.telephony.twilio import Reorderer
from server.runtime import ThreadRuntime
from server.sessions.events import Ended, HandedOff, Result, Started
from server.sessions.factory import SessionFactory
from server.sessions.registry import SessionRegistry
from server.settings import Settings
from server.sinks.metrics import Metrics
from server.sinks.store import Store
from tests import LABELS
from tests.support.calls import at_8k, mulaw, twilio_messages
from tests.support.client import wait_for
from tests.support.fakes import WAIT_S, FakeAnalyse, Recorder
from tests.support.speech import speech

pytestmark = pytest.mark.unit


class ScriptedSocket:
    """A media server's WebSocket: the test feeds it frames; ``drop`` closes it without a word."""

    def __init__(self) -> None:
        self.frames: queue.Queue[str | bytes | None] = queue.Queue()
        self.closed_with: tuple[int, str] | None = None
        self.done = threading.Event()

    def send(self, *frames: str | bytes) -> None:
        for f in frames:
            self.frames.put(f)

    def drop(self) -> None:
        self.frames.put(None)

    def receive(self, timeout: float | None = None) -> str | bytes | None:
        try:
            frame = self.frames.get(timeout=timeout)
        except queue.Empty:
            return None
        if frame is None:
            raise ConnectionClosed(1006, "dropped")
        return frame

    def close(self, reason: int | None = None, message: str | None = None) -> None:
        self.closed_with = (reason or 1000, message or "")
        self.frames.put(None)  # as a real socket: receiving on a closed one raises


class HeldStart(Recorder):
    """Publishing a session's ``Started`` waits until the test releases it: the session is
    registered, and whoever opened it has not yet returned."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, event: object) -> None:
        if isinstance(event, Started):
            self.entered.set()
            assert self.release.wait(WAIT_S), "the test never released the start"
        super().__call__(event)


class World:
    def __init__(self, tmp: Path, events: Recorder | None = None) -> None:
        self.now = [1000.0]
        clock = lambda: self.now[0]  # noqa: E731
        self.settings = Settings(db=str(tmp / "calls.db"), call_rejoin_s=10.0)
        runtime = ThreadRuntime()
        self.registry = SessionRegistry(10, clock=clock)
        store = Store(self.settings.db, runtime=runtime)
        store.start()
        self.store = store
        self.events = events or Recorder()
        self.analyse = FakeAnalyse()
        self.metrics = Metrics(LABELS, CollectorRegistry())
        factory = SessionFactory(
            self.settings,
            registry=self.registry,
            store=store,
            analyser=self.analyse,  # type: ignore[arg-type]
            publish=self.events,
            runtime=runtime,
            model_info={"labels": list(LABELS), "random_weights": True},
            clock=clock,
        )
        self.edge = TelephonyEdge(
            self.settings,
            factory=factory,
            registry=self.registry,
            metrics=self.metrics,
            runtime=runtime,
            clock=clock,
        )

    def connect(self) -> ScriptedSocket:
        ws = ScriptedSocket()

        def run() -> None:
            self.edge.serve(ws, "twilio")
            ws.done.set()

        threading.Thread(target=run, daemon=True).start()
        return ws

    def count(self, kind: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "voxaffect_telephony_events_total", {"protocol": "twilio", "kind": kind}
        )
        return value or 0.0

    def wait_live(self, call_id: str):
        return wait_for(lambda: self.registry.get(call_id), WAIT_S, f"call {call_id} to open")


def call_audio(seconds: float) -> list[str]:
    """A Twilio conversation of ``seconds`` of caller speech: connected, start, media..., stop."""
    return twilio_messages("CAcall", {"inbound": mulaw(at_8k(speech()[: int(seconds * 16000)]))})


def test_a_new_connection_takes_the_call_over_and_the_old_ones_close_ends_nothing(tmp_path):
    world = World(tmp_path)
    first_msgs, second_msgs = call_audio(2.0), call_audio(3.0)
    first = world.connect()
    first.send(*first_msgs[:-2])  # start and 2 s of media; the connection then hangs
    runner = world.wait_live("CAcall")
    # all of it received before the takeover, which stops the first connection's reading
    wait_for(lambda: runner.session.audio_s == pytest.approx(2.0), WAIT_S, "the first 2 s")
    second = world.connect()
    second.send(*second_msgs[1:])  # start (same callSid), 3 s of media, dtmf, stop
    assert first.done.wait(WAIT_S) and second.done.wait(WAIT_S)
    assert first.closed_with == (1000, "another connection took this call over")
    ended = world.events.ended()
    assert ended.reason == "call ended" and world.count("takeover") == 1
    assert runner.session.connection is None
    track = ended.summary["tracks"]["customer"]
    assert track["duration_s"] == pytest.approx(5.0, abs=0.1)  # both connections' audio, once
    assert world.events.of(Result)


def test_a_dropped_call_waits_to_be_rejoined_then_ends_after_the_rejoin_time(tmp_path):
    world = World(tmp_path)
    msgs = call_audio(2.0)
    first = world.connect()
    first.send(*msgs[:-2])
    runner = world.wait_live("CAcall")
    first.drop()
    assert first.done.wait(WAIT_S)
    assert world.count("dropped") == 1 and not runner.session.ended
    assert runner.session.disconnected_at == 1000.0
    world.now[0] += 5.0  # within call_rejoin_s: the media server reconnects
    second = world.connect()
    second.send(msgs[1], *msgs[2:12])
    wait_for(lambda: runner.session.connection is not None, WAIT_S, "the rejoin")
    assert runner.session.disconnected_at is None
    second.drop()
    assert second.done.wait(WAIT_S)
    world.now[0] += 9.0
    assert world.registry.expired(resume_ttl_s=60, idle_timeout_s=300, call_rejoin_s=10) == []
    world.now[0] += 2.0
    expired = world.registry.expired(resume_ttl_s=60, idle_timeout_s=300, call_rejoin_s=10)
    assert expired == [(runner, "connection dropped")]
    runner.end("connection dropped")
    assert world.events.ended().reason == "connection dropped"
    assert world.count("takeover") == 1 and world.count("dropped") == 2
    assert json.loads(json.dumps(world.events.ended().summary))["results"] >= 1


def test_a_takeover_while_the_first_connection_is_still_opening_the_call_is_a_takeover(tmp_path):
    # The second start arrives after the session is registered and before the first connection's
    # open returns. The call must still belong to the second connection: the first one closes,
    # and the second one's stop ends the call.
    held = HeldStart()
    world = World(tmp_path, events=held)
    first_msgs, second_msgs = call_audio(2.0), call_audio(3.0)
    first = world.connect()
    first.send(*first_msgs[:-2])
    assert held.entered.wait(WAIT_S)
    second = world.connect()
    second.send(*second_msgs[1:])
    wait_for(lambda: world.count("takeover"), WAIT_S, "the takeover")
    held.release.set()
    assert first.done.wait(WAIT_S), "the first connection never learnt of the takeover"
    assert second.done.wait(WAIT_S)
    assert first.closed_with == (1000, "another connection took this call over")
    assert world.events.ended().reason == "call ended" and world.count("takeover") == 1


def test_reorderer_releases_in_chunk_order_and_fills_stale_gaps():
    r = Reorderer(3, clock=lambda: 0.0)
    faults = lambda: [f.kind for f in r.faults]  # noqa: E731
    assert r.push(2, b"b") == []
    assert r.push(1, b"a") == [b"a", b"b"]
    assert r.push(1, b"a") == [] and faults() == ["late_chunk"]  # duplicate
    assert r.push(5, b"e") == []
    assert r.push(6, b"f") == [SILENCE["mulaw"]]  # three later chunks are here: 3 is given up
    assert r.push(7, b"g") == [SILENCE["mulaw"], b"e", b"f", b"g"]  # and then 4
    assert r.filled == 2
    assert r.push(3, b"c") == [] and faults() == ["late_chunk"] * 2  # too late: filled


def test_a_chunk_far_ahead_is_a_fault_and_its_silence_is_bounded_by_real_time():
    now = [0.0]
    r = Reorderer(5, clock=lambda: now[0])
    assert r.push(1, b"a" * 160) == [b"a" * 160]
    now[0] = 0.1  # 100 ms later, a chunk a billion ahead
    out = r.push(1_000_000_001, b"b" * 160)
    assert [f.kind for f in r.faults] == ["chunk_gap"]
    assert out == [SILENCE["mulaw"] * 160 * 5, b"b" * 160]  # 5 chunks = the 100 ms that passed
    now[0] = 3600.0  # an hour of silence, then a jump: at most MAX_GAP_FILL_S of it
    out = r.push(2_000_000_000, b"c" * 160)
    assert len(out[0]) == 160 * 500 and out[1] == b"c" * 160
    assert r.push(2_000_000_001, b"d" * 160) == [b"d" * 160]  # in order again


def test_a_call_handed_off_by_one_node_continues_on_another_that_shares_the_store(tmp_path):
    """Two nodes on one store file. Node A hands a running call off (it drains): the media
    connection is closed with 1012, service restart. Node B continues the call when the media
    server connects again with its call id: one session, both connections' audio, in order."""
    node_a, node_b = World(tmp_path), World(tmp_path)  # the same calls.db
    first_msgs, second_msgs = call_audio(2.0), call_audio(3.0)
    first = node_a.connect()
    first.send(*first_msgs[:-2])  # start and 2 s of media
    runner = node_a.wait_live("CAcall")
    wait_for(lambda: runner.session.audio_s == pytest.approx(2.0), WAIT_S, "the first 2 s")
    runner.end("handed off", hand_off=True)
    handed = wait_for(lambda: node_a.events.of(HandedOff), WAIT_S, "the hand-off")[0]
    results_on_a = node_a.events.of(Result)  # the final window's too
    assert results_on_a and handed.state["seq"] == len(results_on_a)
    assert not node_a.events.of(Ended)
    node_a.store.hand_off("CAcall", handed.state, at=0.0, then=runner.session.connection.hand_off)
    assert node_a.store.flush() and first.done.wait(WAIT_S)
    assert first.closed_with == (1012, "this node is restarting; reconnect to continue the call")
    assert node_a.count("handed_off") == 1 and node_a.count("dropped") == 0
    second = node_b.connect()
    second.send(*second_msgs[1:])  # start (same callSid), 3 s of media, dtmf, stop
    assert second.done.wait(WAIT_S)
    assert node_b.count("continued") == 1
    ended = node_b.events.ended()
    assert ended.reason == "call ended" and ended.session.id == "CAcall"
    track = ended.summary["tracks"]["customer"]
    assert track["duration_s"] == pytest.approx(5.0, abs=0.1)  # where node A stopped, then on
    on_b = [e.result for e in node_b.events.of(Result)]
    assert on_b and on_b[0]["seq"] == len(results_on_a) + 1  # seq goes on
    assert on_b[0]["start_s"] >= 2.0
    assert ended.summary["results"] == track["windows"] == len(results_on_a) + len(on_b)
