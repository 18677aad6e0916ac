"""How the server's work runs: the one place that knows about eventlet.

``voxaffect serve`` monkey-patches eventlet first thing, builds an :class:`EventletRuntime` and
passes it to everything that runs work. From then on ``threading`` and ``queue`` are green: they
cooperate on the event loop (the hub), so code written against the standard library — the engine's
batcher, the session runners — works unchanged. What must not run on the hub goes through the
runtime: ``offload`` runs a blocking call (decoding, VAD, the model) on a native thread and waits
for it cooperatively; openSMILE runs in worker processes, which can be killed if it hangs
(prosody_pool.py).

Tests and scripts that do not patch use a :class:`ThreadRuntime`: plain threads and plain calls.
Nothing in the server detects which one it has; it uses what it is given.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any


class ThreadRuntime:
    """No event loop: blocking calls run in place, concurrent work on native threads."""

    async_mode = "threading"  # Flask-SocketIO's mode
    cooperative = False  # True when one OS thread runs every connection (eventlet)

    def offload(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def spawn(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> threading.Thread:
        thread = threading.Thread(target=fn, args=args, kwargs=kwargs, daemon=True)
        thread.start()
        return thread

    def sleep(self, seconds: float) -> None:
        threading.Event().wait(seconds)

    def native(self, name: str) -> ModuleType:
        """The standard module ``name`` as the OS provides it (``threading``, ``queue``)."""
        return importlib.import_module(name)

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """No event loop to interrupt a blocking read: what the block does must bound itself
        (socket timeouts). Only the EventletRuntime enforces a total."""
        yield

    def write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def install(self) -> None:
        """Nothing to adjust without eventlet."""


class EventletRuntime(ThreadRuntime):
    """Greenthreads on eventlet's hub; blocking calls on eventlet's pool of native threads."""

    async_mode = "eventlet"
    cooperative = True

    def __init__(self) -> None:
        import eventlet.patcher

        if not eventlet.patcher.is_monkey_patched("thread"):
            raise RuntimeError("call eventlet.monkey_patch() before building an EventletRuntime")

    def offload(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from eventlet import tpool

        return tpool.execute(fn, *args, **kwargs)

    def spawn(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        import eventlet

        return eventlet.spawn(fn, *args, **kwargs)

    def sleep(self, seconds: float) -> None:
        import eventlet

        eventlet.sleep(seconds)

    def native(self, name: str) -> ModuleType:
        import eventlet.patcher

        return eventlet.patcher.original(name)

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """Raise TimeoutError in this greenthread if the block takes longer than ``seconds``."""
        import eventlet

        with eventlet.Timeout(seconds, TimeoutError(f"no answer within {seconds:g} s")):
            yield

    def write_all(self, fd: int, data: bytes) -> None:
        """Write to a pipe from a greenthread. eventlet's green ``os.write`` retries EPIPE
        forever, so a write to a dead child would never return: this writes with the unpatched
        call (a dead reader raises BrokenPipeError) and waits on the hub while the pipe is full."""
        from eventlet.hubs import trampoline

        write = self.native("os").write
        view = memoryview(data)
        while view:
            try:
                view = view[write(fd, view) :]
            except BlockingIOError:
                trampoline(fd, write=True)

    def install(self) -> None:
        """Adjust libraries for the hub (once, before the server starts)."""
        _native_locks_for_shared_libraries(self)
        _fast_websocket_unmasking()


def _native_locks_for_shared_libraries(runtime: EventletRuntime) -> None:
    """A library imported after monkey-patching gets green locks; a native (tpool) thread that
    meets one held by another native thread switches to a hub of its own and never wakes up.
    soundfile keeps one class-wide lock around every open (G.711 and wav decoding run on tpool
    threads, several at once): it must be a native lock."""
    import soundfile

    soundfile.SoundFile._sf_error_lock = runtime.native("threading").Lock()


def websocket_unmask(data: Any, mask: Any, length: int | None = None, offset: int = 0) -> bytes:
    """XOR ``data`` (from byte ``offset`` of a frame) with the 4-byte WebSocket ``mask``."""
    import numpy as np

    size = len(data) if length is None else length
    key, start = bytes(mask), offset % 4
    keys = (key[start:] + key[:start]) * (size // 4 + 1)  # np.roll and np.tile cost 4x this
    payload = np.frombuffer(data, dtype=np.uint8, count=size)
    return (payload ^ np.frombuffer(keys, dtype=np.uint8, count=size)).tobytes()


def _fast_websocket_unmasking() -> None:
    """eventlet's WebSocket (Engine.IO's transport under eventlet) unmasks every client frame one
    byte at a time in Python, on the hub: one 1 MB chunk held every other client for 400-475 ms
    (with numpy, about 1 ms)."""
    from eventlet.websocket import RFC6455WebSocket

    RFC6455WebSocket._apply_mask = staticmethod(websocket_unmask)


Runtime = ThreadRuntime  # the interface; EventletRuntime is the one `voxaffect serve` uses
