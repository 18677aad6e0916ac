"""The contact-center routes attacked beside a healthy call (see conftest.py): bad and replayed
signatures, a seq gap, oversized frames, garbage on the AudioSocket port. Each attack is refused
and counted; the healthy stream gets every result it gets on an idle server, /healthz never
stalls, and the server's memory stays put."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import websocket
from twilio.request_validator import RequestValidator

from tests.hostile.conftest import Healthy, rss_mb, stall_limit_ms, stream_once
from tests.support.calls import stored_call, ws_url
from tests.support.client import wait_for
from tests.support.harness import ServerProcess, free_port
from tests.support.providers import (
    AUDIOHOOK_KEY,
    AUDIOHOOK_SECRET,
    AsteriskCall,
    AudioHookClient,
    audiohook_headers,
    audiosocket_frame,
    open_parameters,
)

pytestmark = pytest.mark.hostile

TOKEN = "provider-attacks-token-0123"
TWILIO_TOKEN = "fedcba9876543210fedcba9876543210"


@pytest.fixture(scope="module")
def guarded(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    port = free_port()
    proc = ServerProcess(
        tiny_model_dir,
        tmp_path_factory.mktemp("provider-attacks"),
        f"--audiosocket-port={port}",
        env={
            "VOXAFFECT_API_TOKENS": f"{TOKEN},{AUDIOHOOK_KEY}",
            "VOXAFFECT_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
            "VOXAFFECT_AUDIOHOOK_CLIENT_SECRET": AUDIOHOOK_SECRET,
        },
    )
    proc.audiosocket_port = port  # type: ignore[attr-defined]
    yield proc.start()
    proc.stop()


@pytest.fixture(scope="module")
def healthy_call(guarded: ServerProcess, healthy_audio: bytes) -> Iterator[Callable[[], Healthy]]:
    results, _, _ = stream_once(guarded.url, healthy_audio, speed=4.0, token=TOKEN)
    reference = [(r["start_s"], r["end_s"]) for r in results]
    stall = stall_limit_ms(guarded, healthy_audio, reference, token=TOKEN)
    yield lambda: Healthy(guarded, healthy_audio, reference, token=TOKEN, stall_ms=stall)


def count(server: ServerProcess, protocol: str, kind: str) -> float:
    return server.metric("voxaffect_telephony_events_total", protocol=protocol, kind=kind)


def refused_upgrade(url: str, headers: dict[str, str] | list[str], **kw) -> int:
    header = headers if isinstance(headers, list) else [f"{k}: {v}" for k, v in headers.items()]
    try:
        websocket.create_connection(url, header=header, timeout=10, **kw).close()
    except websocket.WebSocketBadStatusException as exc:
        return exc.status_code
    return 101


def test_bad_and_replayed_signatures_are_refused_beside_a_healthy_call(guarded, healthy_call):
    hook_url = guarded.url.replace("http://", "ws://") + "/telephony/audiohook"
    twilio_url = ws_url(guarded, "/telephony/twilio")
    before = {p: count(guarded, p, "bad_signature") for p in ("audiohook", "twilio")}
    sid = "6a1b2c3d-0000-4000-8000-00000000beef"
    with healthy_call():
        for _ in range(20):  # a flood of forged upgrades
            forged = audiohook_headers(guarded, sid, secret_b64="Zm9yZ2VkIHNlY3JldA==")
            assert refused_upgrade(hook_url, forged) == 401
        replayed = audiohook_headers(guarded, sid, nonce="the-same-nonce-every-time")
        assert refused_upgrade(hook_url, replayed) == 101
        for _ in range(5):
            assert refused_upgrade(hook_url, replayed) == 401
        bad = RequestValidator("0" * 32).compute_signature(twilio_url, {})
        for _ in range(20):
            assert refused_upgrade(twilio_url, [f"X-Twilio-Signature: {bad}"]) == 401
    assert count(guarded, "audiohook", "bad_signature") - before["audiohook"] == 25
    assert count(guarded, "twilio", "bad_signature") - before["twilio"] == 20


def test_audiohook_seq_gaps_and_oversized_frames_disconnect_only_their_session(
    guarded, healthy_call
):
    before_rss = rss_mb(guarded.proc.pid)
    before = {k: count(guarded, "audiohook", k) for k in ("seq_gap", "oversized")}
    with healthy_call():
        for attack in ("seq_gap", "big_frame", "huge_frame", "huge_text"):
            hook = AudioHookClient(guarded)
            hook.send("open", open_parameters("attack"))
            hook.expect("opened")
            try:
                if attack == "seq_gap":
                    hook.send("ping", {}, seq=10**12)
                elif attack == "big_frame":
                    hook.ws.send_binary(b"\xff" * 100_000)  # beyond the frame limit
                elif attack == "huge_frame":
                    hook.ws.send_binary(b"\xff" * (8 << 20))  # closed before it is buffered
                else:
                    hook.ws.send("x" * 70_000)
                if attack != "huge_frame":
                    assert hook.expect("disconnect")["parameters"]["reason"] == "error"
            except (BrokenPipeError, ConnectionResetError, websocket.WebSocketException):
                pass  # the server closed it
            finally:
                hook.ws.shutdown()
        wait_for(
            lambda: count(guarded, "audiohook", "oversized") >= before["oversized"] + 3,
            10,
            "the oversized faults",
        )
    assert count(guarded, "audiohook", "seq_gap") == before["seq_gap"] + 1
    assert rss_mb(guarded.proc.pid) - before_rss < 200


def test_jambonz_oversized_frames_and_garbage_are_dropped_and_counted(guarded, healthy_call):
    before = count(guarded, "jambonz", "oversized")
    with healthy_call():
        ws = websocket.create_connection(
            ws_url(guarded, "/telephony/jambonz", token=TOKEN),
            subprotocols=["audio.jambonz.org"],
            timeout=30,
        )
        ws.send('{"callSid": "jz-attack", "sampleRate": 8000, "mixType": "mono"}')
        for _ in range(5):
            ws.send_binary(b"\x00" * 100_000)
            ws.send("not json at all")
        ws.send_binary(b"\x00" * 3200)
        ws.close()
        wait_for(lambda: count(guarded, "jambonz", "oversized") >= before + 5, 10, "the faults")
    call = stored_call(guarded, "jz-attack", TOKEN)  # the good frame, and only it, was taken
    assert call["summary"]["audio_received_s"] == pytest.approx(0.2)
    assert count(guarded, "jambonz", "text_frame") >= 5


def test_garbage_and_stalls_on_the_audiosocket_port_cost_the_server_nothing(guarded, healthy_call):
    port = guarded.audiosocket_port
    before = count(guarded, "audiosocket", "no_start")
    with healthy_call():
        for _ in range(10):  # random bytes: a type and a length, then whatever
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(os.urandom(4096))
            sock.close()
        # a UUID, then nothing: closed once no call started within auth_timeout_s
        idle = AsteriskCall(port)
        # a frame that claims 65,535 bytes and never sends them: held, bounded, then cut
        stalled = socket.create_connection(("127.0.0.1", port), timeout=30)
        stalled.sendall(audiosocket_frame(0x01, os.urandom(16)) + b"\x10\xff\xff" + b"\x00" * 10)
        time.sleep(0.5)
    assert idle.read_until_closed(timeout_s=20) == audiosocket_frame(0x00)
    stalled.settimeout(20)
    assert stalled.recv(16) == audiosocket_frame(0x00)
    stalled.close()
    assert count(guarded, "audiosocket", "no_start") >= before + 2
    assert guarded.get("/healthz")[0] == 200
