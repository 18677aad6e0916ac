"""Where the server's blocking work runs, so the eventlet hub never waits on it.

The entry point monkey-patches eventlet; from then on ``threading`` and ``queue`` are green.
CPU-bound calls (decoding, VAD, prosody, the model through the batcher) go through ``offload``,
which runs them on eventlet's pool of native threads (``tpool``). The store's writer needs a
native thread, queue and lock of its own: ``native("threading")`` and ``native("queue")`` give
the unpatched modules. Without eventlet (tests, scripts) all of this is plain calls and threads.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any


def eventlet_active() -> bool:
    try:
        import eventlet.patcher
    except ImportError:
        return False
    return bool(eventlet.patcher.is_monkey_patched("thread"))


def offload(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on a native thread and wait for it without blocking the hub."""
    if eventlet_active():
        from eventlet import tpool

        return tpool.execute(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def native_locks_for_shared_libraries() -> None:
    """Give native locks to libraries that native threads share.

    A library imported after monkey-patching gets green locks; a native (tpool) thread that
    meets one held by another native thread switches to a hub of its own and never wakes up.
    soundfile keeps one class-wide lock around every open (G.711 and wav decoding run on tpool
    threads, several at once): it must be a native lock.
    """
    if not eventlet_active():
        return
    import soundfile

    soundfile.SoundFile._sf_error_lock = native("threading").Lock()


def websocket_unmask(data: Any, mask: Any, length: int | None = None, offset: int = 0) -> bytes:
    """XOR ``data`` (from byte ``offset`` of a frame) with the 4-byte WebSocket ``mask``."""
    import numpy as np

    size = len(data) if length is None else length
    key = np.roll(np.frombuffer(bytes(mask), dtype=np.uint8), -(offset % 4))
    payload = np.frombuffer(data, dtype=np.uint8, count=size)
    return (payload ^ np.tile(key, -(-size // 4))[:size]).tobytes()


def fast_websocket_unmasking() -> None:
    """Unmask Socket.IO's WebSocket frames with numpy.

    eventlet's WebSocket (Engine.IO's transport under eventlet) unmasks every client frame one
    byte at a time in Python, on the hub: 9-16 ms for a 32 KB chunk here, and one 1 MB chunk
    held every other client for 400-475 ms (now about 1 ms).
    """
    if not eventlet_active():
        return
    from eventlet.websocket import RFC6455WebSocket

    RFC6455WebSocket._apply_mask = staticmethod(websocket_unmask)


def native(name: str) -> ModuleType:
    """The unpatched standard module ``name`` (``threading``, ``queue``, ``time``)."""
    if eventlet_active():
        import eventlet.patcher

        return eventlet.patcher.original(name)
    return importlib.import_module(name)
