from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gates import GATE_ENV, Gate
from tests.support.harness import ServerProcess

TOKEN = "test-token-1234567"
STRICT_ARGS = (
    "--max-sessions=3",
    "--max-chunk-bytes=32000",
    "--max-realtime-factor=2",
    "--idle-timeout-s=3",
    "--resume-ttl-s=2",
    "--max-upload-mb=0.5",
    "--cors-origins=http://allowed.example",
    "--telephony-tracks=customer,agent",
    "--prosody-timeout-s=2",
)


@pytest.fixture(scope="session")
def server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The server with default settings (no tokens)."""
    proc = ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("server")).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def strict_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Tokens, small limits and short timeouts."""
    proc = ServerProcess(
        tiny_model_dir,
        tmp_path_factory.mktemp("strict"),
        *STRICT_ARGS,
        env={"VOXAFFECT_API_TOKENS": f"{TOKEN},second-token-7654321"},
    ).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def gated_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, Gate]]:
    """Its model waits while the test holds the gate, or stays busy as long as the test asks
    (tests/support/gates.py): results come when the test decides, not when this CPU is done."""
    work = tmp_path_factory.mktemp("gated")
    gate = Gate(work / "gate")
    proc = ServerProcess(
        tiny_model_dir,
        work,
        env={"VOXAFFECT_TEST_WRAP_PREDICTOR": "tests.support.gates:wrap", GATE_ENV: str(gate.dir)},
    ).start()
    yield proc, gate
    proc.stop()


@pytest.fixture
def gated(gated_server: tuple[ServerProcess, Gate]) -> Iterator[tuple[ServerProcess, Gate]]:
    gated_server[1].reset()
    yield gated_server
    gated_server[1].reset()
