from __future__ import annotations

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
