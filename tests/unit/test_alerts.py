"""Alert rules (server/sinks/alerts.py) on scripted results; webhooks against a local receiver."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator

import pytest

from server.runtime import ThreadRuntime
from server.sinks.alerts import AlertEngine, RuleError, parse_rules
from server.sinks.webhooks import SIGNATURE_HEADER, WebhookSender
from tests import LABELS
from tests.support.client import wait_for
from tests.support.harness import Receiver, free_port

pytestmark = pytest.mark.unit


def rules(*specs: dict) -> list:
    return parse_rules({"rules": list(specs)}, LABELS)


def result(seq: int, stress: float, *, track: str | None = None, angry: float = 0.1) -> dict:
    """The seq-th window of a session: 2 s windows every second."""
    out = {
        "session_id": "s1",
        "seq": seq,
        "start_s": float(seq - 1),
        "end_s": float(seq + 1),
        "scores": {"angry": angry, "neutral": 1.0 - angry},
        "confidence": 0.5,
        "stress": {"index": stress, "prosodic_index": stress},
    }
    if track:
        out["track"] = track
    return out


def run(engine: AlertEngine, values: list[float], **kwargs) -> list[tuple[int, str, dict]]:
    """Feed a series of stress values; (seq, state, alert) for each alert change."""
    out = []
    for seq, value in enumerate(values, start=1):
        for alert in engine.on_result(result(seq, value, **kwargs)):
            out.append((seq, alert.state, alert.as_dict()))
    return out


HIGH = {"name": "high_stress", "when": "stress.index >= 50", "for_s": 3}


def test_a_held_value_fires_once_after_for_s_of_audio_and_resolves_when_it_clears():
    engine = AlertEngine(rules(HIGH), clock=lambda: 1000.0, new_id=lambda: "a1")
    changes = run(engine, [20, 20, 60, 70, 65, 62, 30, 30, 30, 30])
    assert [(seq, state) for seq, state, _ in changes] == [(4, "firing"), (9, "resolved")]
    fired = changes[0][2]
    # windows 3 and 4 held it: audio 2-5 s, three seconds
    assert fired["fired_audio_s"] == 5.0 and fired["seqs"] == [3, 4] and fired["held_s"] == 3.0
    assert fired["value"] == 70 and fired["severity"] == "warning" and fired["id"] == "a1"
    resolved = changes[1][2]
    assert resolved["peak"] == 70 and resolved["resolved_audio_s"] == 10.0
    assert (
        resolved["resolved_by"] == "cleared" and resolved["evidence"] == "stress.index 70 for 5 s"
    )
    assert "random_weights" not in resolved


def test_a_flapping_value_fires_once():
    engine = AlertEngine(rules({**HIGH, "for_s": 0}))
    changes = run(engine, [60, 48, 61, 30, 62, 47, 58, 30, 55, 49] * 3)
    assert [state for _, state, _ in changes] == ["firing"]


def test_a_value_that_never_holds_long_enough_never_fires():
    engine = AlertEngine(rules(HIGH))
    assert run(engine, [60, 20, 60, 20, 60, 20, 60, 20]) == []


def test_a_rise_rule_fires_on_the_rise_not_on_the_level():
    rise = {"name": "rising", "when": "stress.index rises by 30 within 10", "severity": "critical"}
    engine = AlertEngine(rules(rise))
    # high but steady: no rise; then 40 -> 75 within 10 s fires; 3 s at or below 55 resolve it
    changes = run(engine, [80] * 12 + [40] * 12 + [50, 62, 75, 76, 70, 55, 50, 50])
    assert [(seq, state) for seq, state, _ in changes] == [(27, "firing"), (32, "resolved")]
    assert changes[0][2]["severity"] == "critical"


def test_tracks_limit_a_rule_and_each_track_has_its_own_state():
    engine = AlertEngine(rules({**HIGH, "for_s": 0, "tracks": ["customer"]}))
    assert run(engine, [90, 90], track="agent") == []
    fired = run(engine, [90], track="customer")
    assert [(state, a["track"]) for _, state, a in fired] == [("firing", "customer")]


def test_an_ended_session_resolves_its_active_alerts():
    engine = AlertEngine(rules({**HIGH, "for_s": 0}))
    run(engine, [90, 91])
    (ended,) = engine.on_end("s1")
    assert ended.state == "resolved" and ended.resolved_by == "session ended"
    assert ended.resolved_audio_s == 3.0
    assert engine.on_end("s1") == []


def test_rules_reading_a_random_models_emotions_say_so_on_every_alert():
    angry = {"name": "angry", "when": "scores.angry >= 0.6", "for_s": 0}
    prosodic = {"name": "loud", "when": "stress.prosodic_index >= 50", "for_s": 0}
    engine = AlertEngine(rules(angry, prosodic), random_weights=True)
    fired = {a.rule: a.as_dict() for a in engine.on_result(result(1, 80, angry=0.9))}
    assert fired["angry"]["random_weights"] is True
    assert "random_weights" not in fired["loud"]  # prosody only: no model output in it


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"when": "stress.index >= 50"}, "rule 1: name"),
        ({"name": "x", "when": "stress.index => 50"}, "rule 1 (x): when: 'stress.index => 50'"),
        ({"name": "x", "when": "__import__('os') >= 1"}, "rule 1 (x): when:"),
        ({"name": "x", "when": "scores.angy >= 0.5"}, "no score 'angy'; the model's labels: angry"),
        ({"name": "x", "when": "stress.indx >= 50"}, "unknown field 'stress.indx'"),
        ({"name": "x", "when": "stress.index >= 50", "for_s": -1}, "rule 1 (x): for_s"),
        ({"name": "x", "when": "stress.index >= 50", "severity": "dire"}, "severity: 'dire'"),
        ({"name": "x", "when": "stress.index >= 50", "fro_s": 3}, "unknown field(s) ['fro_s']"),
        ({"name": "x", "when": "stress.index rises by 0 within 60"}, "must be positive"),
    ],
)
def test_a_bad_rule_is_refused_naming_the_rule_and_the_field(rule, message):
    with pytest.raises(RuleError) as err:
        parse_rules({"rules": [rule]}, LABELS)
    assert message in str(err.value)


def test_a_rule_name_used_twice_is_refused():
    with pytest.raises(RuleError, match="rule 2: name 'high_stress' is used twice"):
        rules(HIGH, HIGH)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


SECRET = "a-webhook-secret-of-some-length"


def test_a_webhook_is_signed_and_a_5xx_is_retried(receiver):
    receiver.statuses = [503, 500]
    failures: list[str] = []
    sender = WebhookSender(
        [receiver.url],
        secret=SECRET,
        runtime=ThreadRuntime(),
        on_failure=failures.append,
        backoff_s=0.01,
        allow_private=True,  # the receiver is on loopback
    )
    sender.submit("alert.firing", {"alert": {"id": "a1", "rule": "high_stress"}})
    wait_for(lambda: len(receiver.got) == 3, 10, "two retries and a delivery")
    sender.close()
    headers, body = receiver.got[-1]
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[SIGNATURE_HEADER], f"sha256={expected}")
    sent = json.loads(body)
    assert sent["event"] == "alert.firing" and sent["alert"]["id"] == "a1"
    assert abs(sent["sent_at"] - time.time()) < 60
    assert len({h["X-Voxaffect-Delivery"] for h, _ in receiver.got}) == 1  # one delivery, 3 tries
    assert failures == []


def test_with_the_receiver_down_deliveries_fail_counted_and_the_queue_stays_bounded():
    failures: list[str] = []
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens
    sender = WebhookSender(
        [dead],
        secret=SECRET,
        runtime=ThreadRuntime(),
        on_failure=failures.append,
        queue_size=3,
        retries=2,
        backoff_s=0.01,
        allow_private=True,
    )
    started = time.monotonic()
    for i in range(50):
        sender.submit("alert.firing", {"alert": {"id": str(i)}})
    assert time.monotonic() - started < 1.0  # submitting never waits for the network
    assert sender.pending() <= 3
    wait_for(lambda: failures.count("unreachable") >= 1, 20, "a counted failure")
    assert failures.count("queue_full") >= 50 - 3 - 1
    sender.close()
