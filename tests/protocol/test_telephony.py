from __future__ import annotations

import base64
import json
import threading

import numpy as np
import pytest
import websocket

from tests.protocol.conftest import TOKEN
from tests.support.calls import (
    AGENT,
    CUSTOMER,
    at_8k,
    l16,
    mulaw,
    party_audio,
    replay,
    stored_call,
    twilio_messages,
    ws_url,
)
from tests.support.client import Recorder, wait_for
from tests.support.speech import speech

pytestmark = pytest.mark.protocol


def test_twilio_call_is_analysed_customer_only_by_default_in_chunk_order(server):
    customer, agent = party_audio()
    tracks = {"inbound": mulaw(at_8k(customer)), "outbound": mulaw(at_8k(agent))}
    replay(ws_url(server, "/telephony/twilio"), twilio_messages("CAorder", tracks))
    replay(
        ws_url(server, "/telephony/twilio"),
        twilio_messages("CAshuffled", tracks, shuffle=True, duplicate=True),
    )
    ordered, shuffled = stored_call(server, "CAorder"), stored_call(server, "CAshuffled")
    frames = ordered["frames"]
    assert frames and {f["track"] for f in frames} == {"customer"}  # the agent is not analysed
    assert all(f["narrowband"] for f in frames)
    assert ordered["meta"]["analysed"] == ["customer"] and ordered["meta"]["parties"] == [
        "customer",
        "agent",
    ]
    assert ordered["meta"]["custom"] == {"queue": "billing"} and ordered["source"] == "twilio"
    assert ordered["summary"]["tracks"]["customer"]["narrowband"] is True
    # out-of-order and duplicated frames give the same timeline as ordered ones
    assert [(f["start_s"], f["end_s"]) for f in shuffled["frames"]] == [
        (f["start_s"], f["end_s"]) for f in frames
    ]
    for a, b in zip(shuffled["frames"], frames, strict=True):
        assert max(abs(a["scores"][k] - b["scores"][k]) for k in a["scores"]) < 1e-6
    assert server.metric("voxaffect_telephony_events_total", protocol="twilio", kind="dtmf") >= 2
    assert (
        server.metric("voxaffect_audio_received_seconds_total", source="twilio")
        > 2 * customer.size / 16000
    )


def test_narrowband_lowers_the_stress_confidence(server):
    # Both in real time, as calls, side by side: confidence grows with the windows the baseline
    # learned, and faster than real time a busy CPU supersedes windows, in one stream more than
    # in the other.
    customer, _ = party_audio()
    call_audio = twilio_messages("CAnarrow", {"inbound": mulaw(at_8k(customer))})
    narrowband = threading.Thread(
        target=replay,
        args=(ws_url(server, "/telephony/twilio"), call_audio),
        kwargs={"pace_s": 0.02},
    )
    narrowband.start()
    client = Recorder(server.url)
    sid = client.start()["session_id"]
    client.stream(sid, l16(customer), speed=1)
    client.end(sid)
    narrowband.join(60)
    call = stored_call(server, "CAnarrow")
    wide = client.of("emotion_result")
    client.close()

    # compared at the same baseline size: how many windows each baseline learned depends on
    # how each window scored, and the two channels score a little differently
    def best(frames: list[dict]) -> dict[int, float]:
        out: dict[int, float] = {}
        for f in frames:
            n = f["stress"]["baseline"]["windows"]
            out[n] = max(out.get(n, 0.0), f["stress"]["confidence"])
        return out

    narrow, wideband = best(call["frames"]), best(wide)
    both = sorted(set(narrow) & set(wideband))
    assert both, (sorted(narrow), sorted(wideband))
    for n in both:
        assert narrow[n] <= 0.75 * wideband[n] + 0.01, n


def test_both_parties_go_to_the_call_room_store_and_metrics_when_agent_analysis_is_on(
    strict_server,
):
    monitor = Recorder(strict_server.url, token=TOKEN)
    monitor.call("subscribe", {"session_id": "CAboth"})
    customer, agent = party_audio()
    tracks = {"inbound": mulaw(at_8k(customer)), "outbound": mulaw(at_8k(agent))}
    replay(
        ws_url(strict_server, "/telephony/twilio", token=TOKEN), twilio_messages("CAboth", tracks)
    )
    call = stored_call(strict_server, "CAboth", TOKEN)
    assert {f["track"] for f in call["frames"]} == {"customer", "agent"}
    assert [f["seq"] for f in call["frames"]] == list(range(1, len(call["frames"]) + 1))
    live = wait_for(
        lambda: (
            len(monitor.of("emotion_result")) >= len(call["frames"])
            and monitor.of("emotion_result")
        ),
        30,
        "live results in the call's room",
    )
    assert {r["seq"] for r in live} == {f["seq"] for f in call["frames"]}
    assert set(call["summary"]["tracks"]) == {"customer", "agent"}
    # the parties take turns (party_audio): each talks about as long as its speech, and the
    # agent's answer starts after the customer's end, so there is next to no overtalk
    dynamics = call["summary"]["dynamics"]
    for party, voice in (("customer", CUSTOMER), ("agent", AGENT)):
        spoken = speech(**voice).size / 16000
        assert 0.6 * spoken < dynamics["parties"][party]["talk_s"] < spoken + 1.0, party
    assert dynamics["overtalk_s"] < 0.5 and dynamics["parties"]["agent"]["interruptions"] == 0
    assert strict_server.metric("voxaffect_talk_seconds_total", source="twilio", party="agent") > 0
    monitor.close()


def test_audiofork_stereo_is_split_per_party(server, strict_server):
    customer, agent = party_audio()
    stereo = np.stack([at_8k(customer), at_8k(agent)], axis=1).reshape(-1)
    pcm = l16(stereo)
    meta = json.dumps({"call_id": "fs-call-1", "caller": "+15550100", "callee": "agent-7"})
    frames = [meta] + [pcm[i : i + 641] for i in range(0, len(pcm), 641)]  # odd sizes split samples
    replay(ws_url(server, "/telephony/audiofork", mix="stereo", rate="8000"), frames, pace_s=0.01)
    call = stored_call(server, "fs-call-1")
    assert call["frames"] and {f["track"] for f in call["frames"]} == {"customer"}
    assert call["meta"]["mix"] == "stereo" and call["meta"]["metadata"]["callee"] == "agent-7"

    meta = json.dumps({"call_id": "fs-call-2", "mix": "stereo", "sample_rate": 8000})
    frames = [meta] + [pcm[i : i + 640] for i in range(0, len(pcm), 640)]
    replay(ws_url(strict_server, "/telephony/audiofork", token=TOKEN), frames, pace_s=0.01)
    both = stored_call(strict_server, "fs-call-2", TOKEN)
    by_track = {t: [f for f in both["frames"] if f["track"] == t] for t in ("customer", "agent")}
    assert by_track["customer"] and by_track["agent"]
    # the parties speak at different times: each track's windows follow its own channel
    customer_speech_end = 0.3 + speech(**CUSTOMER).size / 16000
    assert min(f["start_s"] for f in by_track["agent"]) > customer_speech_end - 1.0
    assert max(f["start_s"] for f in by_track["customer"]) < customer_speech_end


def test_audiofork_16k_mono_is_wideband(server):
    customer, _ = party_audio()
    frames = [json.dumps({"uuid": "fs-mono-16k"})] + [
        l16(customer)[i : i + 640] for i in range(0, customer.size * 2, 640)
    ]
    replay(ws_url(server, "/telephony/audiofork", rate="16000"), frames, pace_s=0.005)
    call = stored_call(server, "fs-mono-16k")
    assert call["frames"] and not any(f.get("narrowband") for f in call["frames"])


def test_telephony_faults_are_counted_and_never_hurt_another_call(server):
    def count(kind: str, protocol: str = "twilio") -> float:
        return server.metric("voxaffect_telephony_events_total", protocol=protocol, kind=kind)

    kinds = (
        "bad_json",
        "unknown_event",
        "media_before_start",
        "bad_payload",
        "binary_frame",
        "stop_without_media",
        "dropped",
    )
    before = {k: count(k) for k in kinds}
    customer, _ = party_audio()
    good = threading.Thread(
        target=replay,
        args=(
            ws_url(server, "/telephony/twilio"),
            twilio_messages("CAgood", {"inbound": mulaw(at_8k(customer))}),
        ),
    )
    good.start()
    url = ws_url(server, "/telephony/twilio")
    media = {
        "event": "media",
        "media": {
            "track": "inbound",
            "chunk": "1",
            "timestamp": "0",
            "payload": base64.b64encode(b"\xff" * 160).decode(),
        },
    }
    replay(
        url,
        [
            "{not json",
            json.dumps({"event": "hangup"}),
            json.dumps(media),
            b"\x00\x01",
            json.dumps({"event": "stop"}),
        ],
    )
    bad = twilio_messages("CAbad", {"inbound": mulaw(at_8k(customer))})[:40]
    bad.insert(10, json.dumps({**media, "media": {**media["media"], "payload": ""}}))
    bad.insert(
        11,
        json.dumps(
            {
                **media,
                "media": {**media["media"], "payload": base64.b64encode(b"\xff" * 9000).decode()},
            }
        ),
    )
    replay(url, bad)  # closes without stop: a dropped connection
    good.join()
    for k in kinds:
        wait_for(lambda k=k: count(k) > before[k], 10, f"a counted {k} fault")
    assert stored_call(server, "CAgood")["frames"], "the good call was analysed all along"
    assert stored_call(server, "CAbad")["summary"]["reason"] == "connection dropped"
    assert server.get("/healthz")[0] == 200


def test_telephony_paths_need_the_token_when_tokens_are_set(strict_server):
    for path in ("/telephony/twilio", "/telephony/audiofork"):
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            websocket.create_connection(ws_url(strict_server, path, token="wrong"), timeout=10)
        assert info.value.status_code == 401
        ws = websocket.create_connection(
            ws_url(strict_server, path), header=[f"Authorization: Bearer {TOKEN}"], timeout=10
        )
        ws.close()
    with pytest.raises(websocket.WebSocketBadStatusException):  # no token at all
        websocket.create_connection(ws_url(strict_server, "/telephony/audiofork"), timeout=10)


def test_twilio_may_send_its_token_as_a_stream_parameter(strict_server):
    customer, _ = party_audio()
    msgs = twilio_messages("CAparam", {"inbound": mulaw(at_8k(customer))})
    start = json.loads(msgs[1])
    start["start"]["customParameters"]["token"] = TOKEN
    msgs[1] = json.dumps(start)
    replay(ws_url(strict_server, "/telephony/twilio"), msgs)
    call = stored_call(strict_server, "CAparam", TOKEN)
    assert call["frames"] and "token" not in call["meta"]["custom"]  # never stored

    def refused() -> float:
        return strict_server.metric(
            "voxaffect_telephony_events_total", protocol="twilio", kind="unauthorized"
        )

    before = refused()
    msgs = twilio_messages("CAnotoken", {"inbound": mulaw(at_8k(customer))})[:30]
    replay(ws_url(strict_server, "/telephony/twilio"), msgs)
    wait_for(lambda: refused() > before, 10, "an unauthorized start")
    assert strict_server.get("/api/sessions/CAnotoken", token=TOKEN)[0] == 404
