from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ServerProcess

TOKEN = "test-token-123"
STRICT_ARGS = (
    "--max-sessions=3",
    "--max-chunk-bytes=32000",
    "--max-realtime-factor=2",
    "--idle-timeout-s=3",
    "--resume-ttl-s=2",
    "--max-upload-mb=0.5",
    "--cors-origins=http://allowed.example",
    "--telephony-tracks=customer,agent",
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
        env={"VOXAFFECT_API_TOKENS": f"{TOKEN},second-token"},
    ).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def slow_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """24 s windows: each one keeps the model and prosody busy long enough to measure the hub."""
    proc = ServerProcess(
        tiny_model_dir,
        tmp_path_factory.mktemp("slow"),
        "--window-s",
        "24",
        "--hop-s",
        "24",
        "--buffer-s",
        "50",
    ).start()
    yield proc
    proc.stop()
