"""Prosody measured in worker processes.

Praat (parselmouth) holds the GIL while it runs — 130 ms for a 12 s window here — and under
eventlet every greenthread shares the hub's one OS thread, so a Praat call on a native thread
would still stall every client. Worker processes have GILs of their own. Each worker reads
length-prefixed pickled requests on stdin and answers on stdout; under eventlet those pipes are
green, so a greenthread waiting for an answer yields to the rest of the server.
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

log = logging.getLogger(__name__)
_HEADER = struct.Struct("<I")


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


def _write(stream: Any, obj: Any) -> None:
    stream.write(_frame(obj))
    stream.flush()


def _send(fd: int, obj: Any) -> None:
    """Write a request to a worker's pipe from a greenthread.

    eventlet's green ``os.write`` retries EPIPE forever, so a write to a worker that died would
    never return: this writes with the unpatched call (a dead worker raises BrokenPipeError)
    and waits on the hub only while the pipe is full.
    """
    from eventlet.hubs import trampoline
    from eventlet.patcher import original

    write = original("os").write
    view = memoryview(_frame(obj))
    while view:
        try:
            view = view[write(fd, view) :]
        except BlockingIOError:
            trampoline(fd, write=True)


class _Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.prosody_pool"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def measure(self, samples: np.ndarray, narrowband: bool) -> Prosody:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        _send(self.proc.stdin.fileno(), (samples, narrowband))
        ok, value = _read(self.proc.stdout)
        if not ok:
            raise RuntimeError(f"prosody failed: {value}")
        return value

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class ProsodyPool:
    def __init__(self, workers: int = 1) -> None:
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        silence = np.zeros(16000, dtype=np.float32)
        for _ in range(workers):
            worker = _Worker()
            worker.measure(silence, False)  # Praat's first call pays for its setup: not a client
            self._all.append(worker)
            self._idle.put(worker)

    def measure(self, samples: np.ndarray, narrowband: bool = False) -> Prosody:
        worker = self._idle.get()
        try:
            return worker.measure(samples, narrowband)
        except (EOFError, OSError, pickle.PickleError):
            log.exception("prosody worker died; starting another")
            worker.close()
            self._all.remove(worker)
            worker = _Worker()
            self._all.append(worker)
            raise
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        for worker in self._all:
            worker.close()


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
