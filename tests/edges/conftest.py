"""The in-process tier: ``create_app`` with the thread runtime, the tiny model and a model the
test holds, driven by Flask-SocketIO's ``socketio.test_client`` and Flask's test client (as flack
and Flask-SocketIO's own tests do). Ordering, replay, auth and error codes are decided by the
test, with no subprocess, no port and no eventlet."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.app import App, create_app
from server.runtime import ThreadRuntime
from server.service import Service
from server.settings import Settings

SUPERVISOR = "edges-supervisor-token-0123"
INGEST = "edges-ingest-token-01234567"
WAIT_S = 30


class HeldModel:
    """The model behind a gate: while ``held``, every batch waits for ``release``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.device = inner.device
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def predict(self, windows: np.ndarray, *, embeddings: bool = False) -> Any:
        self.entered.release()
        assert self.gate.wait(WAIT_S), "the test never released the model"
        return self.inner.predict(windows, embeddings=embeddings)


class Edge:
    def __init__(self, app: App, held: HeldModel) -> None:
        self.app, self.held = app, held
        self.http = app.flask.test_client()

    def client(self, token: str | None = SUPERVISOR) -> Any:
        return self.app.socketio.test_client(
            self.app.flask, auth={"token": token} if token else None
        )


@pytest.fixture(scope="module")
def edge(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    work = tmp_path_factory.mktemp("edges")
    settings = Settings(
        model=str(tiny_model_dir),
        dtype="fp32",
        max_batch="1",
        cpu_lanes="1",
        db=str(work / "edges.db"),
        tuning_cache=str(work / "tuning.json"),
        api_tokens=(SUPERVISOR,),
        ingest_tokens=(INGEST,),
        results_kept=4,
        max_realtime_factor=100.0,
        rate_burst_s=60.0,
        retention_days=0,
    )
    runtime = ThreadRuntime()
    holder: list[HeldModel] = []

    def wrap(predictor: Any) -> HeldModel:
        holder.append(HeldModel(predictor))
        return holder[0]

    service = Service.load(settings, runtime, wrap_predictor=wrap)
    app = create_app(settings, service, runtime)
    yield Edge(app, holder[0])
    holder[0].release()
    app.end_all("tests done")
    app.bus.close()
    service.close()
