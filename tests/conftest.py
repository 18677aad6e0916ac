from __future__ import annotations

import sys
from pathlib import Path

import pytest

from engine.checkpoint import write_random_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight emotion2vec checkpoint of the real architecture, a few small layers."""
    return write_random_checkpoint(tmp_path_factory.mktemp("model") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    from engine.model import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="fp32", threads=2)


EVENTLET_REFUSED = (
    "eventlet was imported into the test process: socketserver-based receivers here then stop "
    "answering some requests. Run eventlet code with tests.support.harness.under_eventlet."
)


def pytest_collection_finish(session: pytest.Session) -> None:
    if "eventlet" in sys.modules:
        raise pytest.UsageError(EVENTLET_REFUSED)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    if "eventlet" in sys.modules:
        pytest.fail(f"{item.nodeid}: {EVENTLET_REFUSED}")
