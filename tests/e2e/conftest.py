from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.harness import ROOT, ServerProcess
from tests.support.speech import espeak_wav

ARTIFACTS = ROOT / "artifacts" / "e2e"
TOKEN = "e2e-token-0123456789"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="session")
def fake_mic_wav() -> Path:
    """16-bit PCM speech for Chromium's fake microphone (24-bit, FLAC and OGG play as silence)."""
    return espeak_wav(pitch=55, speed=150, amplitude=120)


@pytest.fixture(scope="session")
def browser(fake_mic_wav: Path, tmp_path_factory: pytest.TempPathFactory):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,  # Debian's chromium: never a browser download
            headless=True,
            args=[
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={fake_mic_wav}",
                "--autoplay-policy=no-user-gesture-required",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def page_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("e2e")).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def token_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("e2e-token")
    # a rule that holds for any speech: every session with speech raises one alert
    (work / "rules.yml").write_text(
        "rules:\n  - name: any_speech\n    when: speech_ratio >= 0.3\n    severity: critical\n"
    )
    proc = ServerProcess(
        tiny_model_dir,
        work,
        f"--alert-rules={work / 'rules.yml'}",
        env={"VOXAFFECT_API_TOKENS": TOKEN},
    ).start()
    yield proc
    proc.stop()
