"""A test hook around the server's model, switched by files the test writes.

``voxaffect serve`` wraps its predictor with ``wrap`` when ``VOXAFFECT_TEST_WRAP_PREDICTOR`` is
``tests.support.gates:wrap`` (see server/cli.py); ``VOXAFFECT_TEST_GATE`` names a directory:

- ``hold`` exists: every batch waits until the test removes it (a result is held back for
  exactly as long as the test wants, however fast this machine is); each batch that starts
  waiting adds its window count to ``entered``, so the test knows what the model holds;
- ``slow_s`` holds a number: every batch runs the real model again and again for that many
  seconds (busy on native threads, as a large model on a slow CPU would be).

The batcher's worker runs ``predict`` in a greenthread, so waiting here yields to the hub.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

GATE_ENV = "VOXAFFECT_TEST_GATE"


class Gate:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def hold(self) -> None:
        (self.dir / "hold").touch()

    def release(self) -> None:
        (self.dir / "hold").unlink(missing_ok=True)

    def slow(self, seconds: float) -> None:
        (self.dir / "slow_s").write_text(str(seconds))

    def reset(self) -> None:
        self.release()
        (self.dir / "slow_s").unlink(missing_ok=True)
        (self.dir / "entered").unlink(missing_ok=True)

    def entered(self) -> int:
        """Windows of the batches that have waited at the hold since the last reset."""
        path = self.dir / "entered"
        return int(path.read_text() or 0) if path.exists() else 0


class GatedPredictor:
    def __init__(self, inner: Any, directory: Path) -> None:
        self.inner = inner
        self.device = inner.device
        self.dir = directory

    def predict(self, windows: np.ndarray, *, embeddings: bool = False) -> Any:
        if (self.dir / "hold").exists():
            entered = self.dir / "entered"
            count = int(entered.read_text() or 0) if entered.exists() else 0
            entered.write_text(str(count + windows.shape[0]))
        while (self.dir / "hold").exists():
            time.sleep(0.01)  # green under eventlet: the hub carries on
        slow = self.dir / "slow_s"
        until = time.monotonic() + (float(slow.read_text()) if slow.exists() else 0.0)
        prediction = self.inner.predict(windows, embeddings=embeddings)
        while time.monotonic() < until:
            prediction = self.inner.predict(windows, embeddings=embeddings)
        return prediction


def wrap(predictor: Any) -> GatedPredictor:
    return GatedPredictor(predictor, Path(os.environ[GATE_ENV]))
