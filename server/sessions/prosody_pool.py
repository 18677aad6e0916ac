"""Prosody measured in worker processes, each call with a time limit.

Measuring is CPU work in native code (openSMILE, ~45 ms for a 2 s window here) beside the model;
worker processes keep it off the event loop's OS thread and its GIL entirely, and a worker that
hangs in native code can be killed, which a thread cannot. Each worker reads
length-prefixed pickled requests on stdin and answers on stdout; the pipes are green, so a
greenthread waiting for an answer yields to the rest of the server.

A worker that does not answer within ``timeout_s`` (hung, stopped) or whose pipe breaks (died) is
killed and replaced in the background, and the window goes on without prosody
(:class:`ProsodyUnavailable`); so does a window that finds no free worker within ``timeout_s``.
"""

from __future__ import annotations

import logging
import pickle
import queue
import struct
import subprocess
import sys
from typing import Any

import numpy as np

from engine.prosody import Prosody, measure
from server.runtime import EventletRuntime

log = logging.getLogger(__name__)
_HEADER = struct.Struct("<I")
_STARTUP_S = 120.0  # a new worker's interpreter start and openSMILE's first call
_VOICED = (0.1 * np.sin(2 * np.pi * 150 * np.arange(16000) / 16000)).astype(np.float32)


# here, not beside the analyser that catches it: a worker imports this module, and the
# analyser's imports (the batcher, torch) would cost each worker 1.8 s and its memory
class ProsodyUnavailable(Exception):
    """Prosody could not be measured for a window; ``reason``: timeout, died or error."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _read(stream: Any) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the prosody worker closed its pipe")
    (size,) = _HEADER.unpack(header)
    body = stream.read(size)
    if len(body) < size:
        raise EOFError("the prosody worker closed its pipe mid-message")
    return pickle.loads(body)


def _frame(obj: Any) -> bytes:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


class _WorkerFailed(Exception):
    """The worker answered, with an error from openSMILE: the worker itself is fine."""


class _Worker:
    def __init__(self, runtime: EventletRuntime) -> None:
        self.runtime = runtime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.sessions.prosody_pool"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def measure(self, samples: np.ndarray, narrowband: bool) -> Prosody:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.runtime.write_all(self.proc.stdin.fileno(), _frame((samples, narrowband)))
        ok, value = _read(self.proc.stdout)
        if not ok:
            raise _WorkerFailed(value)
        return value

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL also ends a stopped process
        self.proc.wait()


class ProsodyPool:
    def __init__(self, runtime: EventletRuntime, workers: int = 1, timeout_s: float = 5.0) -> None:
        self._runtime = runtime
        self.timeout_s = timeout_s
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._closed = False
        for _ in range(workers):
            self._idle.put(self._start())

    def _start(self) -> _Worker:
        worker = _Worker(self._runtime)
        self._all.add(worker)
        with self._runtime.deadline(_STARTUP_S):
            worker.measure(_VOICED, False)  # openSMILE's first call pays its setup: not a client's
        return worker

    def measure(self, samples: np.ndarray, narrowband: bool = False) -> Prosody:
        try:
            worker = self._idle.get(timeout=self.timeout_s)
        except queue.Empty:
            raise ProsodyUnavailable("timeout", "no prosody worker was free") from None
        try:
            with self._runtime.deadline(self.timeout_s):
                prosody = worker.measure(samples, narrowband)
        except _WorkerFailed as exc:
            self._idle.put(worker)
            raise ProsodyUnavailable("error", str(exc)) from None
        except TimeoutError:
            self._replace(worker, f"no answer within {self.timeout_s:g} s")
            raise ProsodyUnavailable("timeout") from None
        except (EOFError, OSError, pickle.PickleError) as exc:
            self._replace(worker, f"it died ({exc!r})")
            raise ProsodyUnavailable("died") from None
        self._idle.put(worker)
        return prosody

    def _replace(self, worker: _Worker, why: str) -> None:
        log.warning("prosody worker replaced: %s", why, extra={"pid": worker.pid})
        self._all.discard(worker)
        self._runtime.spawn(self._restart, worker)

    def _restart(self, old: _Worker) -> None:
        old.close()
        if self._closed:
            return
        try:
            self._idle.put(self._start())
        except Exception:
            log.exception("starting a prosody worker failed; retrying")
            self._runtime.sleep(1.0)
            self._runtime.spawn(self._restart, old)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._all]

    def close(self) -> None:
        self._closed = True
        for worker in list(self._all):
            worker.close()


class InProcessProsody:
    """Prosody on a native thread of this process (no event loop to protect: tests, scripts)."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime

    def measure(self, samples: np.ndarray, narrowband: bool = False) -> Prosody:
        return self._runtime.offload(measure, samples, narrowband=narrowband)

    def close(self) -> None:
        pass


def _write(stream: Any, obj: Any) -> None:
    stream.write(_frame(obj))
    stream.flush()


def _serve() -> None:
    """The worker process: answer requests until stdin closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            samples, narrowband = _read(stdin)
        except EOFError:
            return
        try:
            _write(stdout, (True, measure(samples, narrowband=narrowband)))
        except Exception as exc:  # reported to the caller, the worker carries on
            _write(stdout, (False, repr(exc)))


if __name__ == "__main__":
    _serve()
