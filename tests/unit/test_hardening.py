"""Hardening round 3, the defects that need no running server: each test shows what was wrong
(redaction, settings that turned checks off, caller numbers kept in clear, forged log lines,
spoofed client addresses, message floods, purges of open sessions, decompression bombs, tiny
chunks piling up, webhooks that follow redirects or reach private hosts, Host and upgrade
checks)."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import soundfile as sf
from flask import Flask
from werkzeug.test import Client

from engine.audio import AudioFormat, AudioFormatError, file_blocks
from engine.pipeline import PipelineConfig, StreamPipeline
from server.edges.auth import allowed, client_address, host_allowed, request_token, token_role
from server.edges.edge_guard import EdgeGuard
from server.edges.protocol import FLOOD_FACTOR, MessageRate
from server.edges.telephony.calls import is_phone_number, pseudonymise
from server.logs import TextFormatter, Throttle
from server.runtime import ThreadRuntime
from server.sessions.runner import INBOX_ITEM_BYTES, InboxFull, SessionRunner, Track
from server.sessions.session import Session
from server.settings import Settings, parse
from server.sinks.store import Store, redacted
from server.sinks.webhooks import WebhookSender
from tests import LABELS
from tests.support.client import wait_for
from tests.support.fakes import FakeAnalyse, Recorder
from tests.support.harness import Receiver

pytestmark = pytest.mark.unit

SUPERVISOR = "supervisor-token-0123456789"
INGEST = "ingest-token-0123456789ab"


# --- 2: the database password -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:s3cret@db.example/voxaffect",
        "postgresql+psycopg://db.example/voxaffect?user=u&password=s3cret",
        "postgresql+psycopg://u@db.example/voxaffect?sslpassword=s3cret&sslmode=require",
    ],
)
def test_a_database_url_never_shows_its_password_in_any_form(url):
    shown = redacted(url)
    assert "s3cret" not in shown and "***" in shown
    assert "db.example" in shown  # still says where


# --- 14: settings that would silently turn a protection off -----------------------------------


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"VOXAFFECT_API_TOKENS": ","}, "holds no value"),
        ({"VOXAFFECT_API_TOKENS": " "}, "holds no value"),
        ({"VOXAFFECT_INGEST_TOKENS": ",,"}, "holds no value"),
        ({"VOXAFFECT_API_TOKENS": "short"}, "at least 16"),
        ({"VOXAFFECT_RETENTION_DAYS": "-1"}, "retention_days"),
        ({"VOXAFFECT_RETENTION_DAYS": "nan"}, "finite"),
        ({"VOXAFFECT_LATENCY_BUDGET_S": "inf"}, "finite"),
        ({"VOXAFFECT_TRUSTED_PROXIES": "not-an-address"}, "trusted_proxies"),
        ({"VOXAFFECT_SATURATION_POLICY": "queue"}, "saturation_policy"),
    ],
)
def test_settings_refuse_what_would_turn_a_check_off_and_name_it(env, says):
    with pytest.raises(ValueError, match=says):
        parse([], env)


def test_an_empty_token_setting_means_no_tokens():
    assert not parse([], {"VOXAFFECT_API_TOKENS": ""}).auth_required


# --- 9: roles -----------------------------------------------------------------------------------


def test_an_ingest_token_streams_and_only_a_supervisor_token_reads():
    s = Settings(api_tokens=(SUPERVISOR,), ingest_tokens=(INGEST,))
    assert token_role(s, SUPERVISOR) == "supervisor" and token_role(s, INGEST) == "ingest"
    assert allowed(s, INGEST, "ingest") and not allowed(s, INGEST, "supervisor")
    assert allowed(s, SUPERVISOR, "supervisor") and allowed(s, SUPERVISOR, "ingest")
    for not_a_token in (None, "", 123, [SUPERVISOR], {"t": SUPERVISOR}, True):
        assert token_role(s, not_a_token) is None  # no AttributeError: simply no token


def test_the_bearer_scheme_is_read_in_any_case():
    app = Flask(__name__)
    for header in (f"Bearer {INGEST}", f"bearer {INGEST}", f"BEARER  {INGEST}"):
        with app.test_request_context(headers={"Authorization": header}):
            from flask import request

            assert request_token(request) == INGEST


# --- 11: who the client is --------------------------------------------------------------------


def test_forwarded_addresses_are_believed_only_from_trusted_proxies():
    spoofed = {"REMOTE_ADDR": "203.0.113.9", "HTTP_X_FORWARDED_FOR": "evil remote=10.0.0.1"}
    assert client_address(Settings(), spoofed) == "203.0.113.9"
    behind = Settings(trusted_proxies=("10.0.0.0/8",))
    chain = {"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "1.1.1.1, 198.51.100.7, 10.0.0.3"}
    assert client_address(behind, chain) == "198.51.100.7"  # right-most that is not a proxy
    junk = {"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "not an address"}
    assert client_address(behind, junk) == "10.0.0.2"


def test_a_log_line_cannot_be_forged_by_a_value_a_client_chose():
    formatter = TextFormatter("%(message)s")
    record = logging.makeLogRecord(
        {"msg": "session deleted", "remote": "evil remote=10.0.0.1", "token": "ab12"}
    )
    line = formatter.format(record)
    assert line == 'session deleted remote="evil remote=10.0.0.1" token=ab12'
    record = logging.makeLogRecord({"msg": "x", "remote": "a\nFAKE level=ERROR"})
    assert "\n" not in formatter.format(record)


# --- 15: a flood of warnings ------------------------------------------------------------------


def test_repeated_warnings_are_written_once_per_interval_and_say_how_many_were_left_out():
    now = [0.0]
    throttle = Throttle(clock=lambda: now[0])
    try:
        raise ValueError("bad packet")
    except ValueError:
        import sys

        exc_info = sys.exc_info()

    def warn() -> logging.LogRecord:
        return logging.makeLogRecord(
            {
                "name": "engineio.server",
                "msg": "message async handler error",
                "levelno": logging.ERROR,
                "exc_info": exc_info,
            }
        )

    first = warn()
    assert throttle.filter(first) and first.exc_info is None  # a client's bad bytes: no trace
    assert [throttle.filter(warn()) for _ in range(1000)] == [False] * 1000
    now[0] = 10.0
    later = warn()
    assert throttle.filter(later) and later.left_out == 1000


# --- 3: messages per connection -----------------------------------------------------------------


def test_a_connection_may_send_its_rate_is_told_once_a_second_and_a_flood_is_cut():
    now = [0.0]
    rate = MessageRate(100, clock=lambda: now[0])
    assert [rate.take() for _ in range(200)] == ["ok"] * 200  # twice the rate at once
    assert rate.take() == "tell"
    assert {rate.take() for _ in range(10)} == {"drop"}
    now[0] = 0.5
    verdicts = [rate.take() for _ in range(int(FLOOD_FACTOR * 100) + 60)]
    assert verdicts.count("ok") == 50 and verdicts[-1] == "cut"


def test_tiny_chunks_join_and_count_a_cost_each_so_memory_stays_bounded():
    fmt = AudioFormat()
    runner = SessionRunner(
        Session(id="s1", source="socketio", format=fmt),
        {None: Track(None, StreamPipeline(PipelineConfig(), fmt, labels=LABELS))},
        analyse=FakeAnalyse(),
        publish=Recorder(),
        runtime=ThreadRuntime(),
        inbox_max_bytes=64_000,
    )  # not running: everything stays in the inbox
    for _ in range(5000):
        runner.push(None, b"\x00\x00")  # 2-byte chunks join into one piece
    assert len(runner._inbox) == 1 and len(runner._inbox[0].data) == 10_000
    odd = 0
    with pytest.raises(InboxFull):
        for _ in range(100_000):
            runner.push(None, b"\x00")  # not whole frames: each its own item, each costed
            odd += 1
    assert odd <= 64_000 // (1 + INBOX_ITEM_BYTES)


# --- 12: caller numbers -----------------------------------------------------------------------


def test_phone_numbers_are_pseudonymised_wherever_they_are_in_the_metadata():
    key = b"a-caller-id-key-0123456789"
    meta = {
        "caller_id_number": "+1 (555) 010-0100",
        "callerNumber": "15550100100",
        "custom": {"customer_phone": "tel:+15550100100", "numbers": ["+44 20 7946 0000", 4420794]},
        "sip": "sip:+15550100100@pbx.example",
        "queue": "billing",
        "date": "2026-12-01",
        "call_sid": "CA0123456789abcdef",
    }
    hidden = pseudonymise(meta, key)
    flat = repr(hidden)
    for number in ("555", "7946", "4420794"):
        assert number not in flat
    assert hidden["queue"] == "billing" and hidden["date"] == "2026-12-01"
    assert hidden["call_sid"] == "CA0123456789abcdef"
    # one number, one pseudonym, however it was written
    assert hidden["callerNumber"] == hidden["custom"]["customer_phone"] == hidden["sip"]
    assert not is_phone_number(True) and not is_phone_number("12-34")


# --- 6: purge and orphans -----------------------------------------------------------------------


def test_purge_never_removes_an_open_session_and_no_result_outlives_its_session(tmp_path):
    store = Store(str(tmp_path / "t.db"), runtime=ThreadRuntime())
    store.start()
    row = {"source": "socketio", "config": {}, "model": {}, "meta": {}}
    store.claim("running", started_at=1.0, **row)
    assert store.purge(before=1e12) == 0  # --before far ahead: an open session stays
    store.claim("gone", started_at=1.0, **row)
    store.close_session("gone", {"results": 0}, ended_at=2.0)
    assert store.flush()
    assert store.delete_session("gone")
    result = {"seq": 1, "start_s": 0.0, "end_s": 2.0, "emotion": "neutral", "stress": {"index": 1}}
    store.add_result("gone", result)  # a late write for the deleted session: refused
    assert store.flush()
    import sqlite3

    with sqlite3.connect(tmp_path / "t.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0
    store.close()


# --- 4: decompression bombs -----------------------------------------------------------------------


def _flac(seconds: float, rate: int = 16000, channels: int = 1) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros((int(seconds * rate), channels), np.int16), rate, format="FLAC")
    return out.getvalue()


def test_a_long_file_is_refused_from_its_header_before_anything_is_decoded():
    bomb = _flac(7200.0)  # two hours of silence, a few hundred kB
    assert len(bomb) < 2_000_000
    with pytest.raises(AudioFormatError, match="7200 s of audio; at most 3600"):
        file_blocks(bomb, max_seconds=3600)


def test_a_file_is_decoded_in_blocks_and_its_errors_show_no_object_addresses():
    info, blocks = file_blocks(_flac(25.0, rate=48000, channels=2), max_seconds=60)
    sizes = [len(b) for b in blocks]
    assert info.sample_rate == 48000 and info.channels == 2
    assert max(sizes) <= 10 * 16000 + 100 and abs(sum(sizes) - 25 * 16000) < 100
    with pytest.raises(AudioFormatError) as err:
        file_blocks(b"not audio at all" * 100)
    assert "0x" not in str(err.value) and "object at" not in str(err.value)


# --- 13: webhooks -------------------------------------------------------------------------------


def test_a_webhook_redirect_is_not_followed():
    target = Receiver()
    redirect = Receiver(statuses=[302], headers={"Location": target.url})
    failures: list[str] = []
    sender = WebhookSender(
        [redirect.url],
        secret="a-webhook-secret-of-some-length",
        runtime=ThreadRuntime(),
        on_failure=failures.append,
        allow_private=True,
    )
    sender.submit("alert.firing", {"alert": {"id": "a1"}})
    wait_for(lambda: failures, 10, "a counted failure")
    assert failures == ["status"] and len(redirect.got) == 1 and target.got == []
    sender.close()
    target.close()
    redirect.close()


def test_a_webhook_to_a_private_address_is_refused_unless_allowed():
    receiver = Receiver()
    failures: list[str] = []
    sender = WebhookSender(
        [receiver.url],
        secret="a-webhook-secret-of-some-length",
        runtime=ThreadRuntime(),
        on_failure=failures.append,
    )
    sender.submit("alert.firing", {"alert": {"id": "a1"}})
    wait_for(lambda: failures, 10, "a counted failure")
    assert failures == ["forbidden"] and receiver.got == []
    sender.close()
    receiver.close()


# --- 10 and 16: Host and upgrades -----------------------------------------------------------------


def _guarded(settings: Settings) -> tuple[Client, list[str]]:
    refused: list[str] = []

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return Client(EdgeGuard(app, settings, refused.append)), refused


def test_a_rebound_host_name_is_refused_before_anything_answers():
    client, refused = _guarded(Settings(host="127.0.0.1"))
    assert client.get("/api/sessions", headers={"Host": "127.0.0.1:5000"}).status_code == 200
    assert client.get("/", headers={"Host": "localhost:5000"}).status_code == 200
    r = client.get("/api/sessions", headers={"Host": "rebind.attacker.example:5000"})
    assert r.status_code == 421 and r.json["error"]["code"] == "INVALID_MESSAGE"
    assert refused == ["host"]
    allowed_client, _ = _guarded(Settings(host="127.0.0.1", allowed_hosts=("voice.example",)))
    assert allowed_client.get("/", headers={"Host": "voice.example"}).status_code == 200
    assert host_allowed(Settings(host="0.0.0.0"), {"HTTP_HOST": "anything.example"})
    assert not host_allowed(
        Settings(host="0.0.0.0", allowed_hosts=("voice.example",)), {"HTTP_HOST": "x.example"}
    )


def test_a_malformed_websocket_upgrade_gets_a_json_error_not_a_traceback():
    client, refused = _guarded(Settings())
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Host": "127.0.0.1"}
    r = client.get("/telephony/twilio", headers=upgrade)
    assert r.status_code == 400 and "Sec-WebSocket-Key" in r.json["error"]["message"]
    r = client.get(
        "/socket.io/", headers={**upgrade, "Sec-WebSocket-Key": "x", "Sec-WebSocket-Version": "8"}
    )
    assert r.status_code == 426 and r.headers["Sec-WebSocket-Version"] == "13"
    assert refused == ["bad_upgrade", "bad_upgrade"]
