"""Contact-center platforms against the real server, each with a client that follows the
platform's published protocol: Genesys AudioHook (scripted open → opened → audio → ping → pause →
resume → close → closed, with signed upgrades), signed Twilio streams (signatures from Twilio's
own library), jambonz ``listen`` and Asterisk AudioSocket byte by byte."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websocket
from twilio.request_validator import RequestValidator

from tests.support.calls import (
    at_8k,
    l16,
    mulaw,
    party_audio,
    stored_call,
    twilio_messages,
    ws_url,
)
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
    stereo_l16,
    stereo_mulaw,
)
from tests.support.speech import silence

pytestmark = pytest.mark.protocol

TOKEN = "providers-token-0123456789"
TWILIO_TOKEN = "0123456789abcdef0123456789abcdef"
PUBLIC_HOST = "voice.example.com"


@pytest.fixture(scope="module")
def providers(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    audiosocket_port = free_port()
    proc = ServerProcess(
        tiny_model_dir,
        tmp_path_factory.mktemp("providers"),
        "--telephony-tracks=customer,agent",
        f"--audiosocket-port={audiosocket_port}",
        "--hash-caller-ids",
        "--trusted-proxies=127.0.0.1",
        f"--allowed-hosts={PUBLIC_HOST}",
        env={
            "VOXAFFECT_API_TOKENS": f"{TOKEN},{AUDIOHOOK_KEY}",
            "VOXAFFECT_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
            "VOXAFFECT_AUDIOHOOK_CLIENT_SECRET": AUDIOHOOK_SECRET,
            "VOXAFFECT_CALLER_ID_KEY": "caller-id-key-0123456789",
        },
    )
    proc.audiosocket_port = audiosocket_port  # type: ignore[attr-defined]
    proc.start()
    yield proc
    proc.stop()


def count(server: ServerProcess, protocol: str, kind: str) -> float:
    return server.metric("voxaffect_telephony_events_total", protocol=protocol, kind=kind)


# --- Genesys AudioHook -------------------------------------------------------------------------


def test_an_audiohook_session_runs_open_to_closed_as_the_protocol_says(providers):
    customer, agent = party_audio()
    audio = stereo_mulaw(customer, agent)
    half = 8000 * 2  # the first second; then a pause, as long in real time as it claims
    conversation = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"
    hook = AudioHookClient(providers)
    hook.send("open", open_parameters(conversation, events=True))
    opened = hook.expect("opened")
    # stereo PCMU first, the offered entry as it was offered
    assert opened["parameters"]["media"] == [
        {"type": "audio", "format": "PCMU", "channels": ["external", "internal"], "rate": 8000}
    ]
    assert opened["seq"] == 1 and opened["clientseq"] == 1 and opened["id"] == hook.id
    hook.audio(audio[:half])
    hook.send("ping", {})
    pong = hook.expect("pong")
    assert pong["clientseq"] == hook.seq
    hook.send("paused", {})
    time.sleep(4.0)  # a secure pause: Genesys sends no audio, then says what it discarded
    hook.send("resumed", {"start": f"PT{hook.position_s:.2f}S", "discarded": "PT3S"})
    hook.position_s += 3.0
    hook.audio(audio[half:])
    hook.send("close", {"reason": "end"})
    closed = hook.expect("closed")
    # `closed` comes once the summary is committed: it is in the store already
    status, stored = providers.get(f"/api/sessions/{hook.id}", token=TOKEN)
    assert status == 200 and stored["summary"]["reason"] == "call ended"
    hook.close()
    seqs = [m["seq"] for m in hook.received]
    assert seqs == list(range(1, len(seqs) + 1)) and closed["parameters"] == {}
    # each party is a track; the pause is silence in the timeline, not lost time
    tracks = stored["summary"]["tracks"]
    assert set(tracks) == {"customer", "agent"}
    assert tracks["customer"]["duration_s"] == pytest.approx(len(audio) / 2 / 8000 + 3.0, abs=0.1)
    assert {f["track"] for f in stored["frames"]} <= {"customer", "agent"} and stored["frames"]
    meta = stored["meta"]
    assert meta["protocol"] == "audiohook" and meta["conversation_id"] == conversation
    assert meta["participant"]["ani"].startswith("hmac:")  # caller numbers are pseudonymised
    assert meta["participant"]["aniName"] == "John Doe" and meta["events"] is True
    # results went back as events, marked as random weights
    events = [m for m in hook.received if m["type"] == "event"]
    assert events, "customConfig asked for results as events"
    entity = events[0]["parameters"]["entities"][0]
    assert entity["type"] == "voxaffect.emotion" and entity["data"]["random_weights"] is True
    assert count(providers, "audiohook", "gap_filled") >= 1


def test_audiohook_events_are_off_unless_custom_config_asks_and_mono_and_l16_are_taken(providers):
    customer, _ = party_audio()
    offer = [
        {"type": "audio", "format": "opus", "channels": ["external", "internal"], "rate": 48000},
        {"type": "audio", "format": "L16", "channels": ["external"], "rate": 8000},
    ]
    hook = AudioHookClient(providers)
    hook.send("open", open_parameters("c-2", offer=offer))
    assert hook.expect("opened")["parameters"]["media"] == [offer[1]]
    hook.audio(l16(at_8k(customer)), channels=2)  # L16 mono: 2 bytes a sample
    hook.send("close", {"reason": "end"})
    hook.expect("closed")
    hook.close()
    assert not [m for m in hook.received if m["type"] == "event"]
    stored = stored_call(providers, hook.id, TOKEN)
    assert {f["track"] for f in stored["frames"]} == {"customer"}


def test_a_claimed_discard_longer_than_the_time_that_passed_fills_only_that_time(providers):
    hook = AudioHookClient(providers)
    hook.send("open", open_parameters("c-3"))
    hook.expect("opened")
    hook.audio(stereo_mulaw(silence(1.0), silence(1.0)))
    hook.send("discarded", {"start": "PT1S", "discarded": "PT36000S"})  # ten hours, it says
    hook.send("close", {"reason": "end"})
    hook.expect("closed")
    hook.close()
    summary = stored_call(providers, hook.id, TOKEN)["summary"]
    assert summary["tracks"]["customer"]["duration_s"] < 10


@pytest.mark.parametrize(
    ("breach", "info"),
    [
        ("seq_gap", "seq 5 after 1"),
        ("audio_before_open", "audio while the session is connecting"),
        ("unknown", "message type"),
    ],
)
def test_an_audiohook_protocol_violation_is_answered_with_disconnect_and_counted(
    providers, breach, info
):
    kind = {
        "seq_gap": "seq_gap",
        "audio_before_open": "audio_out_of_turn",
        "unknown": "unknown_message",
    }
    before = count(providers, "audiohook", kind[breach])
    hook = AudioHookClient(providers)
    if breach == "audio_before_open":
        hook.ws.send_binary(b"\xff" * 320)
    else:
        hook.send("open", open_parameters("c-4"))
        hook.expect("opened")
        if breach == "seq_gap":
            hook.send("ping", {}, seq=5)
        else:
            hook.send("dance", {})
    disconnect = hook.expect("disconnect")
    assert (
        disconnect["parameters"]["reason"] == "error" and info in disconnect["parameters"]["info"]
    )
    wait_for(lambda: count(providers, "audiohook", kind[breach]) > before, 10, "the count")
    hook.close()


def test_an_unsigned_wrongly_signed_or_replayed_audiohook_upgrade_is_refused(providers):
    url = providers.url.replace("http://", "ws://") + "/telephony/audiohook"

    def status(**kw) -> int:
        headers = audiohook_headers(providers, "5f2a9d7e-0000-4000-8000-000000000001", **kw)
        try:
            websocket.create_connection(
                url, header=[f"{k}: {v}" for k, v in headers.items()], timeout=10
            ).close()
        except websocket.WebSocketBadStatusException as exc:
            return exc.status_code
        return 101

    before = count(providers, "audiohook", "bad_signature")
    assert status(signed=False) == 401
    assert status(secret_b64="d3JvbmcgY2xpZW50IHNlY3JldA==") == 401
    assert status(created=int(time.time()) - 3600) == 401
    assert status(nonce="once-only-nonce-1") == 101
    assert status(nonce="once-only-nonce-1") == 401  # replayed
    assert count(providers, "audiohook", "bad_signature") - before == 4


# --- Twilio, signed ----------------------------------------------------------------------------


def test_a_twilio_stream_signed_by_twilios_library_is_taken_and_any_other_refused(providers):
    customer, _ = party_audio()
    messages = twilio_messages("CAsigned", {"inbound": mulaw(at_8k(customer))})
    # Behind a TLS-terminating proxy: Twilio signed the public wss URL
    public = f"wss://{PUBLIC_HOST}/telephony/twilio"
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(public, {})
    proxied = ["X-Forwarded-Proto: https", f"X-Forwarded-Host: {PUBLIC_HOST}"]
    ws = websocket.create_connection(
        ws_url(providers, "/telephony/twilio"),
        header=[*proxied, f"X-Twilio-Signature: {signature}"],
        timeout=30,
    )
    for m in messages:
        ws.send(m)
    ws.close()
    assert stored_call(providers, "CAsigned", TOKEN)["frames"]

    before = count(providers, "twilio", "bad_signature")
    direct = RequestValidator(TWILIO_TOKEN).compute_signature(
        ws_url(providers, "/telephony/twilio"), {}
    )
    for headers in (
        proxied,  # no signature
        [*proxied, f"X-Twilio-Signature: {direct}"],  # signed for another URL
        [f"X-Twilio-Signature: {signature}"],  # the proxy's URL, but not through it
        [
            *proxied,
            "X-Twilio-Signature: " + RequestValidator("f" * 32).compute_signature(public, {}),
        ],
        [*proxied, f"Authorization: Bearer {TOKEN}"],  # a token does not replace the signature
    ):
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            websocket.create_connection(
                ws_url(providers, "/telephony/twilio"), header=headers, timeout=10
            )
        assert info.value.status_code == 401
    assert count(providers, "twilio", "bad_signature") - before == 5


# --- jambonz -----------------------------------------------------------------------------------


def jambonz_metadata(call_sid: str, mix: str, rate: int) -> str:
    """The first text frame as jambonz sends it: the call's attributes, sampleRate, mixType."""
    return json.dumps(
        {
            "callSid": call_sid,
            "direction": "inbound",
            "from": "+15083084809",
            "to": "+15083728363",
            "callId": "fc5f8190-718a-123b-e6ba-023fd61c5256",
            "sipStatus": 200,
            "callStatus": "in-progress",
            "accountSid": "4bfe85c1-96bb-4af7-ac83-68fe7ebd562d",
            "applicationSid": "0e0681b5-d1a9-4e1a-8d3a-f0c6c6b5e3a4",
            "sampleRate": rate,
            "mixType": mix,
            "metadata": {"queue": "billing"},
        }
    )


def test_jambonz_listen_stereo_with_its_subprotocol_basic_auth_and_dtmf(providers):
    customer, agent = party_audio()
    pcm = stereo_l16(customer, agent)  # 16 kHz stereo
    ws = websocket.create_connection(
        ws_url(providers, "/telephony/jambonz"),
        subprotocols=["audio.jambonz.org"],
        header=[f"Authorization: Basic {base64.b64encode(f'jambonz:{TOKEN}'.encode()).decode()}"],
        timeout=30,
    )
    assert ws.getsubprotocol() == "audio.jambonz.org"
    ws.send(jambonz_metadata("jz-call-1", "stereo", 16000))
    for i in range(0, len(pcm), 1280):  # 20 ms of both channels a frame, 4x real time
        ws.send_binary(pcm[i : i + 1280])
        time.sleep(0.005)
        if i == 64000:
            ws.send(json.dumps({"event": "dtmf", "dtmf": "5", "duration": "160"}))
    ws.close()
    call = stored_call(providers, "jz-call-1", TOKEN)
    by_track = {t: [f for f in call["frames"] if f["track"] == t] for t in ("customer", "agent")}
    assert by_track["customer"] and by_track["agent"]
    assert not any(f.get("narrowband") for f in call["frames"])  # 16 kHz is wideband
    assert call["source"] == "jambonz" and call["meta"]["mix"] == "stereo"
    assert call["meta"]["metadata"]["from"].startswith("hmac:")
    assert call["meta"]["metadata"]["metadata"] == {"queue": "billing"}
    assert count(providers, "jambonz", "dtmf") >= 1
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(
            ws_url(providers, "/telephony/jambonz"), subprotocols=["audio.jambonz.org"], timeout=10
        )
    assert info.value.status_code == 401


# --- Asterisk AudioSocket ----------------------------------------------------------------------


def test_asterisk_audiosocket_frames_make_a_call_keyed_by_its_uuid(providers):
    customer, _ = party_audio()
    call = AsteriskCall(providers.audiosocket_port)
    call.slin(l16(at_8k(customer)), pace_s=0.01)  # 0x10: slin 8 kHz, 20 ms frames at 2x
    call.sock.sendall(audiosocket_frame(0x03, b"7"))  # a DTMF digit
    assert call.hangup() == b""  # the server says nothing back to a hangup
    stored = stored_call(providers, str(call.uuid), TOKEN)
    assert stored["source"] == "audiosocket" and stored["frames"]
    assert all(f["narrowband"] for f in stored["frames"])
    assert stored["summary"]["tracks"]["customer"]["duration_s"] == pytest.approx(
        customer.size / 16000, abs=0.05
    )

    wide = AsteriskCall(providers.audiosocket_port)
    wide.slin(l16(customer), kind=0x12, rate=16000, pace_s=0.01)  # 0x12: 16 kHz (newer)
    wide.hangup()
    assert not any(
        f.get("narrowband") for f in stored_call(providers, str(wide.uuid), TOKEN)["frames"]
    )


def test_audiosocket_at_96_khz_or_without_a_uuid_is_refused_with_a_hangup(providers):
    before = count(providers, "audiosocket", "unsupported_rate")
    fast = AsteriskCall(providers.audiosocket_port)
    fast.sock.sendall(audiosocket_frame(0x17, b"\x00" * 3840))
    assert fast.read_until_closed() == audiosocket_frame(0x00)  # hung up
    assert count(providers, "audiosocket", "unsupported_rate") == before + 1
    bare = socket.create_connection(("127.0.0.1", providers.audiosocket_port), timeout=10)
    bare.sendall(audiosocket_frame(0x10, b"\x00" * 320))
    bare.settimeout(10)
    assert bare.recv(16) == audiosocket_frame(0x00)
    bare.close()
    assert count(providers, "audiosocket", "audio_before_uuid") >= 1
