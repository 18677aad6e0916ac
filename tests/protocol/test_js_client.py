"""The JavaScript client (clients/js) against the real server: Node's own test runner runs its
tests (connect, results, reconnect and resume, short-lived tokens, errors), and TypeScript checks
the README's quick starts against its types."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.harness import ROOT, ServerProcess
from tests.support.speech import silence, speech, to_pcm16

pytestmark = pytest.mark.protocol

JS = ROOT / "clients/js"
TOKEN = "js-client-supervisor-token-01"


def need_node() -> None:
    if shutil.which("node") is None or not (JS / "node_modules").is_dir():
        pytest.skip("run `make node` (Node.js 18+ and npm) for the JavaScript client's tests")


@pytest.fixture(scope="module")
def js_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tiny_model_dir,
        tmp_path_factory.mktemp("js"),
        env={"VOXAFFECT_API_TOKENS": TOKEN, "VOXAFFECT_TOKEN_SIGNING_KEY": "k" * 40},
    ).start()
    yield proc
    proc.stop()


def test_the_js_client_passes_its_tests_against_the_server(js_server, tmp_path):
    need_node()
    pcm = tmp_path / "speech.pcm"
    pcm.write_bytes(to_pcm16(np.concatenate([speech(), silence(0.4), speech(pitch=60)])))
    env = {
        **os.environ,
        "VOXAFFECT_URL": js_server.url,
        "VOXAFFECT_TOKEN": TOKEN,
        "VOXAFFECT_PCM": str(pcm),
    }
    run = subprocess.run(
        ["node", "--test", "--test-concurrency=1", "test/"],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "# pass 5" in run.stdout and "# fail 0" in run.stdout


def test_the_readme_quick_starts_type_check_against_the_package_types():
    need_node()
    tsc = JS / "node_modules/.bin/tsc"
    run = subprocess.run(
        [str(tsc), "-p", "example"], cwd=JS, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
