"""Server pieces without sockets: settings, protocol parsing, sessions, metrics, store."""

from __future__ import annotations

import base64
import time

import pytest
from prometheus_client import CollectorRegistry

from engine.audio import AudioFormat
from engine.pipeline import PipelineConfig, StreamPipeline
from server.api import timeline_csv
from server.metrics import Metrics
from server.protocol import ProtocolError, chunk_seconds, parse_chunk, parse_start
from server.sessions import Session, SessionRegistry, Track
from server.settings import Settings, parse
from server.store import Store

pytestmark = pytest.mark.unit
LABELS = ("angry", "happy")


def test_settings_come_from_env_and_flags_win():
    env = {
        "VOXAFFECT_PORT": "6001",
        "VOXAFFECT_API_TOKENS": "tok-one, tok-two",
        "VOXAFFECT_CPU_FALLBACK": "no",
        "VOXAFFECT_WINDOW_S": "3",
        "VOXAFFECT_TELEPHONY_TRACKS": "customer,agent",
    }
    s = parse(["--port", "7000", "--hop-s", "0.5"], env)
    assert (s.port, s.api_tokens, s.cpu_fallback, s.window_s, s.hop_s) == (
        7000,
        ("tok-one", "tok-two"),
        False,
        3.0,
        0.5,
    )
    assert s.telephony_tracks == ("customer", "agent")
    assert s.pipeline_config().window_s == 3.0
    assert "tok-one" not in str(s.public()) and s.public()["api_tokens"] == 2


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


def make_session(sid: str = "s1", owner: str | None = "sid-a") -> Session:
    pipe = StreamPipeline(PipelineConfig(), labels=LABELS)
    return Session(
        id=sid,
        source="socketio",
        format=AudioFormat(),
        tracks={None: Track(None, pipe)},
        owner=owner,
    )


def test_registry_ownership_limits_and_resume_tokens():
    reg = SessionRegistry(max_sessions=2)
    a = make_session("a")
    reg.add(a)
    reg.add(make_session("b", owner="sid-b"))
    with pytest.raises(ProtocolError) as info:
        reg.add(make_session("c"))
    assert info.value.code == "SESSION_LIMIT"
    with pytest.raises(ProtocolError) as info:
        reg.add(make_session("a"))
    assert info.value.code == "UNAUTHORIZED"
    assert reg.owned("a", "sid-a") is a
    with pytest.raises(ProtocolError) as info:
        reg.owned("a", "sid-b")
    assert info.value.code == "UNAUTHORIZED"
    with pytest.raises(ProtocolError) as info:
        reg.owned("zzz", "sid-a")
    assert info.value.code == "UNKNOWN_SESSION"
    assert reg.by_token(a.token) is a and reg.by_token("nope") is None
    assert reg.detach("sid-a") == [a] and a.owner is None


def test_expiry_and_idle():
    reg = SessionRegistry(10)
    gone, idle = make_session("gone"), make_session("idle")
    reg.add(gone)
    reg.add(idle)
    reg.detach("sid-a")
    idle.owner, idle.disconnected_at = "sid-x", None
    gone.disconnected_at = time.monotonic() - 100
    idle.last_audio = time.monotonic() - 1000
    assert {(s.id, r) for s, r in reg.expired(resume_ttl_s=60, idle_timeout_s=300)} == {
        ("gone", "not resumed"),
        ("idle", "idle"),
    }


def test_rate_allowance():
    s = make_session()
    assert s.allow_audio(5.0, max_realtime_factor=2.0)  # the burst
    assert not s.allow_audio(1.0, max_realtime_factor=2.0)
    s.started -= 1.0  # a second later: two more seconds are allowed
    assert s.allow_audio(1.9, max_realtime_factor=2.0)


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
    store = Store(tmp_path / "t.db", flush_s=0.05)
    store.open_session(
        "s1", source="socketio", config={"window_s": 2.0}, model={"labels": list(LABELS)}
    )
    for seq in (1, 2, 3):
        store.add_result("s1", seq, result(seq))
    store.add_result("s1", 2, result(2))  # a duplicate write is ignored
    store.close_session("s1", {"results": 3})
    assert store.flush()
    stored = store.get_session("s1")
    assert [f["seq"] for f in stored["frames"]] == [1, 2, 3]
    assert stored["summary"] == {"results": 3} and stored["results"] == 3
    assert [f["seq"] for f in store.get_session("s1", since_seq=1)["frames"]] == [2, 3]
    assert store.get_session("nope") is None
    assert store.list_sessions()[0]["session_id"] == "s1"
    rows = timeline_csv(stored).splitlines()
    assert rows[0].endswith("angry,happy") and rows[2].startswith("2,,1.0,3.0,happy,0.6,20.0")
    store.close()


def test_the_readme_documents_every_setting():
    import dataclasses
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [
        f.name
        for f in dataclasses.fields(Settings)
        if f"`VOXAFFECT_{f.name.upper()}`" not in readme
    ]
    assert missing == []


def test_reorderer_releases_in_chunk_order_and_fills_stale_gaps():
    from server.telephony import MULAW_SILENCE, Reorderer

    r = Reorderer(window=3)
    assert r.push(2, b"b") == []
    assert r.push(1, b"a") == [b"a", b"b"]
    assert r.push(1, b"a") == [] and r.late == 1  # duplicate
    assert r.push(5, b"e") == []
    assert r.push(6, b"f") == [MULAW_SILENCE]  # three later chunks are here: 3 is given up
    assert r.push(7, b"g") == [MULAW_SILENCE, b"e", b"f", b"g"]  # and then 4
    assert r.filled == 2
    assert r.push(3, b"c") == [] and r.late == 2  # too late: its place was filled
