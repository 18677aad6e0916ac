"""Fixtures the unit tests share."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def funasr_generate(tiny_model_dir):
    """FunASR's own per-clip path, the reference the engine must reproduce."""
    from engine.funasr_compat import import_funasr, quiet_funasr

    import_funasr()
    from funasr import AutoModel

    with quiet_funasr():
        auto = AutoModel(
            model=str(tiny_model_dir),
            device="cpu",
            ncpu=2,
            disable_update=True,
            disable_log=True,
            log_level="ERROR",
        )

    def generate(window: np.ndarray) -> tuple[list[str], np.ndarray]:
        with quiet_funasr():
            res = auto.generate(
                window, granularity="utterance", extract_embedding=False, disable_pbar=True
            )[0]
        return res["labels"], np.array(res["scores"])

    return generate
