from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import ARTIFACTS, TOKEN
from tests.support.client import Recorder
from tests.support.speech import silence, speech, to_pcm16

pytestmark = pytest.mark.e2e


def new_page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.on("console", lambda m: m.type == "error" and print("console:", m.text))
    return context, page


def test_the_microphone_page_streams_and_shows_results_charts_and_exports(browser, page_server):
    context, page = new_page(browser)
    page.goto(page_server.url)
    page.wait_for_selector("#connection[data-state=online]")
    assert page.is_visible("#random-warning")  # the random-weight model is announced
    before = page_server.metric("voxaffect_audio_received_seconds_total", source="socketio")
    page.click("#start")
    page.wait_for_function("window.voxaffect.state.results.length >= 4", timeout=60_000)
    # the microphone's audio reached the server, resampled, and it was speech
    received = (
        page_server.metric("voxaffect_audio_received_seconds_total", source="socketio") - before
    )
    assert received >= 4.0
    results = page.evaluate("window.voxaffect.state.results")
    assert all(r["speech_ratio"] >= 0.3 for r in results)
    fmt = page.evaluate("window.voxaffect.state.capture.format")
    assert fmt["outputRate"] == 16000 and fmt["inputRate"] in (44100, 48000, 16000)
    assert page.text_content("#emotion") in results[-1]["scores"]
    assert page.text_content("#stress-value") != "–"
    assert "derived from the emotion scores" in page.text_content("#derived-info")
    assert page.locator("#components .comp-row").count() >= 3
    assert page.evaluate("window.voxaffect.stressChart.points") == len(results)
    assert page.text_content("#speech") in ("speech", "silence")
    page.screenshot(path=str(ARTIFACTS / "live.png"), full_page=True)

    page.click("#stop")
    session_id = page.evaluate("window.voxaffect.state.sessionId")
    page.wait_for_function(
        "document.querySelector('#timeline-info').textContent.startsWith('Session ended')",
        timeout=30_000,
    )
    with page.expect_download() as info:
        page.click("#export-csv")
    exported = list(csv.DictReader(io.StringIO(Path(info.value.path()).read_text())))
    status, stored = page_server.get(f"/api/sessions/{session_id}")
    assert status == 200 and len(exported) == len(stored["frames"]) >= 4
    for row, frame in zip(exported, stored["frames"], strict=True):
        assert int(row["seq"]) == frame["seq"]
        assert float(row["start_s"]) == frame["start_s"] and row["emotion"] == frame["emotion"]
        assert float(row["stress_index"]) == frame["stress"]["index"]
    shown = {r["seq"] for r in page.evaluate("window.voxaffect.state.results")}
    assert shown == {f["seq"] for f in stored["frames"]}
    # every utterance the session stored is a band on the page
    assert stored["utterances"]
    assert page.evaluate("window.voxaffect.bands.count") == len(stored["utterances"])
    # Stopping is not an error: no audio may follow end_session (UNKNOWN_SESSION banner).
    assert page.locator("#errors .banner.error").all_text_contents() == []
    page.screenshot(path=str(ARTIFACTS / "live-ended.png"), full_page=True)
    context.close()


def test_a_file_can_be_analysed_from_the_page(browser, page_server, fake_mic_wav):
    context, page = new_page(browser)
    page.goto(page_server.url)
    page.set_input_files("#file", str(fake_mic_wav))
    page.wait_for_function(
        "window.voxaffect.state.fileTimeline && window.voxaffect.stressChart.points > 0",
        timeout=60_000,
    )
    assert "windows over" in page.text_content("#timeline-info")
    timeline = page.evaluate("window.voxaffect.state.fileTimeline")
    said = timeline["utterances"]
    assert said and page.evaluate("window.voxaffect.bands.count") == len(said)
    hover_band(page, "#bands", "window.voxaffect.bands", said[0])
    with page.expect_download() as info:
        page.click("#export-json")
    assert info.value.suggested_filename.endswith(".json")
    page.screenshot(path=str(ARTIFACTS / "file.png"), full_page=True)
    context.close()


def hover_band(page, canvas: str, bands: str, utterance: dict) -> None:
    """Hover the band drawn for ``utterance``: the tip shows its emotion, span and every score."""
    page.wait_for_function(f"{bands}.drawn.length === {bands}.count")
    x0, x1, y0, y1 = page.evaluate(
        f"""{bands}.drawn.find(d => d[4].utterance_seq === {utterance["utterance_seq"]}
            && (d[4].track || '') === '{utterance.get("track", "")}').slice(0, 4)"""
    )
    box = page.locator(canvas).bounding_box()
    page.mouse.move(box["x"] + (x0 + x1) / 2, box["y"] + (y0 + y1) / 2)
    tip = page.locator(canvas + " + .tip")
    tip.wait_for(state="visible")
    text = tip.text_content()
    assert text.startswith(f"{utterance['emotion']} {round(utterance['confidence'] * 100)}%")
    assert f"{utterance['start_s']:.1f}–{utterance['end_s']:.1f} s" in text
    assert "random-weight model" in text  # a random-weight test model is never shown bare
    assert tip.locator(".tip-row").count() == len(utterance["scores"])
    assert "derived from the emotion scores" in text


def test_errors_are_told_in_words(browser, page_server):
    context, page = new_page(browser)
    page.add_init_script(
        "navigator.mediaDevices.getUserMedia = () =>"
        " Promise.reject(new DOMException('denied', 'NotAllowedError'));"
    )
    page.goto(page_server.url)
    page.wait_for_selector("#connection[data-state=online]")
    page.click("#start")
    page.wait_for_selector("text=Microphone access was denied")
    context.close()
    context, page = new_page(browser)  # a microphone this time; then a message the server refuses
    page.goto(page_server.url)
    page.wait_for_selector("#connection[data-state=online]")
    page.click("#start")
    page.wait_for_function("window.voxaffectSocket && window.voxaffectSocket.connected")
    page.evaluate(
        "window.voxaffectSocket.emit('audio_stream', {session_id: 'nope', chunk: 'AAAA'})"
    )
    page.wait_for_selector("text=The server no longer knows this session")
    context.close()


def test_the_monitor_lists_live_sessions_and_shows_one(browser, token_server):
    streamer_ctx, streamer = new_page(browser)
    streamer.goto(f"{token_server.url}/?token={TOKEN}")
    streamer.wait_for_selector("#connection[data-state=online]")
    streamer.click("#start")
    streamer.wait_for_function("window.voxaffect.state.results.length >= 2", timeout=60_000)
    session_id = streamer.evaluate("window.voxaffect.state.sessionId")

    monitor_ctx, monitor = new_page(browser)
    monitor.goto(f"{token_server.url}/monitor")
    monitor.wait_for_selector("text=The monitor needs an API token")  # refused without a token
    monitor.fill("#token", TOKEN)
    monitor.dispatch_event("#token", "change")
    row = monitor.locator(f"tr[data-session='{session_id}']")
    row.wait_for(timeout=30_000)
    row.click()  # a locator finds the row again: the table re-renders as results arrive
    monitor.wait_for_function(
        "document.querySelector('#stress-value').textContent !== '–'", timeout=30_000
    )
    seen = int(monitor.text_content("#detail-info").split("window ")[1].split()[0])
    monitor.wait_for_function(
        f"document.querySelector('#detail-info').textContent.includes('window {seen + 1}')",
        timeout=30_000,
    )  # updating live
    assert "level" in (
        monitor.get_attribute(f"tr[data-session='{session_id}'] td:nth-child(6) span", "class")
        or ""
    )
    monitor.screenshot(path=str(ARTIFACTS / "monitor.png"), full_page=True)
    streamer.click("#stop")
    monitor.wait_for_selector(f"tr[data-session='{session_id}']", state="detached", timeout=30_000)
    streamer_ctx.close()
    monitor_ctx.close()


def test_an_alert_appears_on_the_monitor_makes_itself_noticed_and_opens_its_call(
    browser, token_server
):
    monitor_ctx, monitor = new_page(browser)
    monitor.goto(f"{token_server.url}/monitor?token={TOKEN}")
    monitor.wait_for_selector("#connection[data-state=online]")
    assert monitor.is_hidden("#alerts-card")
    caller = Recorder(token_server.url, token=TOKEN)
    sid = caller.start()["session_id"]
    caller.stream(sid, to_pcm16(np.concatenate([silence(0.3), speech()])), speed=2)
    item = monitor.locator(f"#alerts li[data-severity=critical]:has-text('{sid}')")
    item.wait_for(timeout=30_000)
    assert "any_speech" in item.text_content() and "for" in item.text_content()
    assert monitor.title().startswith("(")  # the tab says it
    assert "flash" in (monitor.get_attribute("#alerts-card", "class") or "")
    monitor.screenshot(path=str(ARTIFACTS / "monitor-alert.png"), full_page=True)
    item.click()
    monitor.wait_for_function(
        f"document.querySelector('#detail-id').textContent === '{sid}'", timeout=10_000
    )
    caller.end(sid)
    caller.close()
    item.wait_for(state="detached", timeout=30_000)  # resolved when the call ended
    monitor_ctx.close()


def test_a_dropped_connection_resumes_without_losing_the_timeline(
    browser, tiny_model_dir, tmp_path
):
    from tests.support.harness import ServerProcess

    server = ServerProcess(tiny_model_dir, tmp_path / "server").start()
    try:
        context, page = new_page(browser)
        page.goto(server.url)
        page.wait_for_selector("#connection[data-state=online]")
        page.click("#start")
        page.wait_for_function("window.voxaffect.state.results.length >= 2", timeout=60_000)
        page.evaluate("window.voxaffectSocket.io.engine.close()")  # the network drops
        page.wait_for_selector("#connection[data-state=warn]", timeout=10_000)
        page.wait_for_selector("#connection[data-state=online]", timeout=30_000)  # back
        count = page.evaluate("window.voxaffect.state.results.length")
        page.wait_for_function(
            f"window.voxaffect.state.results.length >= {count + 3}", timeout=60_000
        )
        seqs = page.evaluate("window.voxaffect.state.results.map(r => r.seq)")
        assert seqs == list(range(1, len(seqs) + 1)), "nothing lost, nothing twice"
        session_id = page.evaluate("window.voxaffect.state.sessionId")
        ids = page.evaluate("window.voxaffect.state.results.map(r => r.session_id)")
        assert set(ids) == {session_id}
        page.screenshot(path=str(ARTIFACTS / "live-resumed.png"), full_page=True)

        server.stop()  # the server goes away: the person is told
        page.wait_for_selector("#connection[data-state=error]", timeout=30_000)
        assert "unreachable" in page.text_content("#connection")
        context.close()
    finally:
        server.stop()


def test_the_monitor_shows_a_call_one_party_at_a_time(browser, tiny_model_dir, tmp_path):
    import threading

    from tests.support.calls import (
        at_8k,
        mulaw,
        party_audio,
        replay,
        twilio_messages,
        ws_url,
    )
    from tests.support.harness import ServerProcess

    server = ServerProcess(
        tiny_model_dir,
        tmp_path / "server",
        "--telephony-tracks=customer,agent",
        env={"VOXAFFECT_API_TOKENS": TOKEN},
    ).start()
    try:
        customer, agent = party_audio()
        tracks = {"inbound": mulaw(at_8k(customer)), "outbound": mulaw(at_8k(agent))}
        messages = twilio_messages("CAmonitor", tracks)
        url = ws_url(server, "/telephony/twilio", token=TOKEN)
        call = threading.Thread(target=replay, args=(url, messages), kwargs={"pace_s": 0.01})
        call.start()  # about real time: one 20 ms message per party every 20 ms

        context, monitor = new_page(browser)
        monitor.goto(f"{server.url}/monitor?token={TOKEN}")
        row = monitor.locator("tr[data-session='CAmonitor']")
        row.wait_for(timeout=30_000)
        row.click()
        monitor.wait_for_selector("#tracks button[data-track=agent]", timeout=60_000)
        assert monitor.is_visible("#tracks")
        assert monitor.get_attribute("#tracks [data-track=customer]", "aria-pressed") == "true"
        assert "customer" in monitor.text_content("#detail-info")

        def shown(party: str) -> None:
            monitor.wait_for_function(  # the charts hold that party's windows, and only them
                f"""window.monitor.stressChart.points ===
                    window.monitor.history.filter(r => r.track === '{party}').length""",
                timeout=10_000,
            )

        shown("customer")
        monitor.click("#tracks [data-track=agent]")
        assert monitor.get_attribute("#tracks [data-track=agent]", "aria-pressed") == "true"
        assert "agent" in monitor.text_content("#detail-info")
        shown("agent")
        parties = monitor.evaluate("window.monitor.history.map(r => r.track)")
        assert {"customer", "agent"} <= set(parties)
        # utterances: one lane per party; the call's dynamics so far, both parties
        monitor.wait_for_function(
            "window.monitor.bands && window.monitor.bands.lanes().length === 2", timeout=60_000
        )
        assert monitor.evaluate("window.monitor.bands.lanes()") == ["agent", "customer"]
        monitor.wait_for_selector("#dynamics [data-party=agent]", timeout=30_000)
        assert "turns" in monitor.text_content("#dynamics [data-party=customer]")
        assert "overtalk" in monitor.text_content("#dynamics")
        agent_said = monitor.evaluate(
            "window.monitor.bands.items.filter(u => u.track === 'agent')[0]"
        )
        hover_band(monitor, "#bands", "window.monitor.bands", agent_said)
        monitor.screenshot(path=str(ARTIFACTS / "monitor-call.png"), full_page=True)
        call.join()
        context.close()
    finally:
        server.stop()
