"""The registry of live sessions: ownership, limits, resume tokens, ids never reused, expiry."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from engine.audio import AudioFormat
from server.edges.protocol import ProtocolError
from server.sessions.registry import SessionRegistry
from server.sessions.session import Session
from server.sinks.metrics import Metrics

pytestmark = pytest.mark.unit
LABELS = ("angry", "happy")


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
