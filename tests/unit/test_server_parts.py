"""Server pieces without sockets: settings, protocol parsing, sessions, metrics, store."""

from __future__ import annotations

import base64

import pytest
from prometheus_client import CollectorRegistry

from engine.audio import AudioFormat
from server.metrics import Metrics
from server.protocol import ProtocolError, chunk_seconds, parse_chunk, parse_start, valid_id
from server.runtime import ThreadRuntime
from server.sessions import Session, SessionRegistry
from server.settings import Settings, parse
from server.store import Store
from server.wire import timeline_csv

pytestmark = pytest.mark.unit
LABELS = ("angry", "happy")


def test_settings_come_from_env_and_flags_win():
    env = {
        "VOXAFFECT_PORT": "6001",
        "VOXAFFECT_API_TOKENS": "token-one-0123456, token-two-0123456",
        "VOXAFFECT_CPU_FALLBACK": "no",
        "VOXAFFECT_WINDOW_S": "3",
        "VOXAFFECT_TELEPHONY_TRACKS": "customer,agent",
    }
    s = parse(["--port", "7000", "--hop-s", "0.5"], env)
    assert (s.port, s.api_tokens, s.cpu_fallback, s.window_s, s.hop_s) == (
        7000,
        ("token-one-0123456", "token-two-0123456"),
        False,
        3.0,
        0.5,
    )
    assert s.telephony_tracks == ("customer", "agent")
    assert s.pipeline_config().window_s == 3.0
    assert "token-one" not in str(s.public()) and s.public()["api_tokens"] == 2


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"VOXAFFECT_PORT": "eighty"}, "port must be a int"),
        ({"VOXAFFECT_PORT": "0"}, "port"),
        ({"VOXAFFECT_HOP_S": "5"}, "hop_s"),
        ({"VOXAFFECT_TELEPHONY_TRACKS": "boss"}, "boss"),
        ({"VOXAFFECT_CPU_FALLBACK": "maybe"}, "cpu_fallback"),
    ],
)
def test_bad_settings_fail_at_start_naming_the_value(env, match):
    with pytest.raises(ValueError, match=match):
        parse([], env)


def test_default_settings_are_valid():
    assert Settings().auth_required is False


def test_start_session_parsing():
    start = parse_start({"sample_rate": 8000, "encoding": "mulaw", "since_seq": 4})
    assert start.format == AudioFormat("mulaw", 8000, 1) and start.since_seq == 4
    assert parse_start(None).format == AudioFormat()
    with pytest.raises(ProtocolError) as info:
        parse_start({"encoding": "flac"})
    assert info.value.code == "UNSUPPORTED_ENCODING"


def test_chunk_parsing_accepts_base64_and_bytes_and_limits_size():
    assert parse_chunk(
        {"session_id": "s1", "chunk": base64.b64encode(b"\x01\x02").decode()}, 10
    ) == ("s1", b"\x01\x02")
    assert parse_chunk({"session_id": "s1", "chunk": b"\x01\x02"}, 10) == ("s1", b"\x01\x02")
    for chunk in (b"\x00" * 11, base64.b64encode(b"\x00" * 11).decode()):
        with pytest.raises(ProtocolError) as info:
            parse_chunk({"session_id": "s1", "chunk": chunk}, 10)
        assert info.value.code == "PAYLOAD_TOO_LARGE" and info.value.session_id == "s1"


def test_chunk_seconds():
    assert chunk_seconds(b"\x00" * 3200, AudioFormat()) == pytest.approx(0.1)
    assert chunk_seconds(b"\x00" * 160, AudioFormat("mulaw", 8000)) == pytest.approx(0.02)


class Runner:
    """What the registry holds of a session runner."""

    def __init__(self, session: Session) -> None:
        self.session = session


def make(sid: str = "s1", owner: str | None = "sid-a", source: str = "socketio") -> Runner:
    return Runner(Session(id=sid, source=source, format=AudioFormat(), owner=owner))


def add(reg: SessionRegistry, runner: Runner) -> Runner:
    reg.reserve(runner.session.id)
    reg.add(runner)  # type: ignore[arg-type]
    return runner


def test_registry_ownership_limits_and_resume_tokens():
    reg = SessionRegistry(max_sessions=2)
    a = add(reg, make("a"))
    add(reg, make("b", owner="sid-b"))
    with pytest.raises(ProtocolError) as info:
        reg.reserve("c")
    assert info.value.code == "SESSION_LIMIT"
    with pytest.raises(ProtocolError) as info:
        reg.reserve("a")
    assert info.value.code == "SESSION_EXISTS"
    assert reg.owned("a", "sid-a") is a
    with pytest.raises(ProtocolError) as info:
        reg.owned("a", "sid-b")
    assert info.value.code == "UNAUTHORIZED"
    with pytest.raises(ProtocolError) as info:
        reg.owned("zzz", "sid-a")
    assert info.value.code == "UNKNOWN_SESSION"
    assert reg.by_token(a.session.token) is a and reg.by_token("nope") is None
    assert reg.detach("sid-a") == [a] and a.session.owner is None


def test_an_ended_sessions_id_is_never_given_out_again():
    reg = SessionRegistry(max_sessions=5)
    a = add(reg, make("a"))
    reg.remove(a)  # type: ignore[arg-type]
    assert reg.get("a") is None
    with pytest.raises(ProtocolError) as info:
        reg.reserve("a")
    assert info.value.code == "SESSION_EXISTS"
    reg.reserve("b")
    reg.release("b")  # opening b failed: the id is free again
    reg.reserve("b")


def test_expiry_and_idle_follow_the_injected_clock():
    now = [1000.0]
    reg = SessionRegistry(10, clock=lambda: now[0])
    gone, idle, call = make("gone"), make("idle", owner="sid-x"), make("call", source="twilio")
    for r in (gone, idle, call):
        r.session.started = r.session.last_audio = now[0]
        add(reg, r)
    reg.detach("sid-a")
    call.session.disconnected_at = now[0]
    now[0] += 30.0
    assert reg.expired(resume_ttl_s=60, idle_timeout_s=300, call_rejoin_s=10) == [
        (call, "connection dropped")
    ]
    now[0] += 40.0
    idle.session.last_audio = now[0] - 301
    assert {
        (r.session.id, why)
        for r, why in reg.expired(resume_ttl_s=60, idle_timeout_s=300, call_rejoin_s=10)
    } == {("gone", "not resumed"), ("idle", "idle"), ("call", "connection dropped")}


def test_rate_allowance():
    s = Session(id="s", source="socketio", format=AudioFormat(), started=0.0)
    assert s.allow_audio(5.0, factor=2.0, burst_s=5.0, now=0.0)  # the burst
    assert not s.allow_audio(1.0, factor=2.0, burst_s=5.0, now=0.0)
    assert s.allow_audio(1.9, factor=2.0, burst_s=5.0, now=1.0)  # a second later: two more


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("CA0123456789abcdef", True),
        ("a.b:c-d_e", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ('quote"id', False),
        ("crlf\r\nid", False),
        ("slash/id", False),
        ("trailing\n", False),
        (12, False),
        (None, False),
    ],
)
def test_one_rule_for_every_session_id(value, ok):
    assert valid_id(value) is ok


def test_metrics_on_a_fresh_registry():
    registry = CollectorRegistry()
    m = Metrics(LABELS, registry)
    m.batch_done("cuda:0", 4, 0.2, "ok")
    m.batch_done("cpu", 2, 0.5, "fallback")
    m.fallback("timeout")
    m.queue_changed(3)
    m.errors.labels("RATE_LIMITED").inc()
    get = registry.get_sample_value
    assert get("voxaffect_inferences_total", {"device": "cuda", "outcome": "ok"}) == 4
    assert get("voxaffect_inferences_total", {"device": "cpu", "outcome": "fallback"}) == 2
    assert get("voxaffect_fallbacks_total", {"reason": "timeout"}) == 1
    assert get("voxaffect_fallbacks_total", {"reason": "oom"}) == 0  # known labels start at 0
    assert get("voxaffect_queue_depth") == 3
    assert get("voxaffect_batch_size_count") == 2
    assert get("voxaffect_inference_seconds_sum", {"device": "cuda"}) == pytest.approx(0.2)
    assert get("voxaffect_errors_total", {"code": "RATE_LIMITED"}) == 1
    assert get("voxaffect_emotion_results_total", {"emotion": "happy"}) == 0
    assert get("voxaffect_gpu_utilization_ratio", {"gpu": "0"}) is None  # absent without a GPU
    assert b"_created" not in m.render()


def result(seq: int) -> dict:
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
    }


def test_store_round_trip_and_csv(tmp_path):
    store = Store(str(tmp_path / "t.db"), runtime=ThreadRuntime())
    assert store.start() == [1, 2, 3, 4]
    assert store.claim(
        "s1",
        source="socketio",
        started_at=1.0,
        config={"window_s": 2.0},
        model={"labels": list(LABELS)},
        meta={},
    )
    assert not store.claim("s1", source="twilio", started_at=2.0, config={}, model={}, meta={}), (
        "an id is claimed once"
    )
    handed_on: list[int] = []
    for seq in (1, 2, 3):
        store.add_result("s1", result(seq), then=lambda seq=seq: handed_on.append(seq))
    store.add_result("s1", result(2))  # a duplicate write is ignored
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
        store.add_result(sid, result(1))
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


def test_the_readme_settings_table_is_the_one_settings_make():
    from pathlib import Path

    from server.settings import markdown_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_table() in readme, "regenerate it with: python -m server.settings README.md"


def test_reorderer_releases_in_chunk_order_and_fills_stale_gaps():
    from server.telephony import MULAW_SILENCE, Reorderer

    faults: list[str] = []
    r = Reorderer(3, lambda kind, detail: faults.append(kind), clock=lambda: 0.0)
    assert r.push(2, b"b") == []
    assert r.push(1, b"a") == [b"a", b"b"]
    assert r.push(1, b"a") == [] and faults == ["late_chunk"]  # duplicate
    assert r.push(5, b"e") == []
    assert r.push(6, b"f") == [MULAW_SILENCE]  # three later chunks are here: 3 is given up
    assert r.push(7, b"g") == [MULAW_SILENCE, b"e", b"f", b"g"]  # and then 4
    assert r.filled == 2
    assert r.push(3, b"c") == [] and faults == ["late_chunk"] * 2  # too late: filled


def test_a_chunk_far_ahead_is_a_fault_and_its_silence_is_bounded_by_real_time():
    from server.telephony import MULAW_SILENCE, Reorderer

    now = [0.0]
    faults: list[str] = []
    r = Reorderer(5, lambda kind, detail: faults.append(kind), clock=lambda: now[0])
    assert r.push(1, b"a" * 160) == [b"a" * 160]
    now[0] = 0.1  # 100 ms later, a chunk a billion ahead
    out = r.push(1_000_000_001, b"b" * 160)
    assert faults == ["chunk_gap"]
    assert out == [MULAW_SILENCE * 160 * 5, b"b" * 160]  # 5 chunks = the 100 ms that passed
    now[0] = 3600.0  # an hour of silence, then a jump: at most MAX_GAP_FILL_S of it
    out = r.push(2_000_000_000, b"c" * 160)
    assert len(out[0]) == 160 * 500 and out[1] == b"c" * 160
    assert r.push(2_000_000_001, b"d" * 160) == [b"d" * 160]  # in order again
