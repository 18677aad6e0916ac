"""Under eventlet: native threads never meet a green lock, and frames are unmasked fast."""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from tests.harness import under_eventlet

pytestmark = pytest.mark.unit

SCRIPT = textwrap.dedent(
    """
    import eventlet
    eventlet.monkey_patch()
    import sys
    from engine.audio import AudioFormat, decode_chunk
    from server.runtime import EventletRuntime
    runtime = EventletRuntime()
    if sys.argv[1] == "fixed":
        runtime.install()
    fmt = AudioFormat("mulaw", 8000, 1)
    pool = eventlet.GreenPool(16)
    for _ in range(3000):
        pool.spawn(runtime.offload, decode_chunk, bytes(range(256)) * 4, fmt)
    pool.waitall()
    print("done")
    """
)


STORE_FLUSH = textwrap.dedent(
    """
    import eventlet
    eventlet.monkey_patch()
    import sys
    from server.runtime import EventletRuntime
    from server.store import Store
    store = Store(sys.argv[1], runtime=EventletRuntime())
    store.start()
    store.close_session("s", {}, ended_at=0.0)
    print("flushed" if store.flush(timeout_s=3.0) else "timed out")
    """
)

UNMASK = textwrap.dedent(
    """
    import numpy as np
    from eventlet.websocket import RFC6455WebSocket
    from server.runtime import websocket_unmask
    rng = np.random.default_rng(0)
    for size in (0, 1, 3, 4, 5, 127, 32768):
        data = rng.integers(0, 256, size + 6, dtype=np.uint8).tobytes()
        mask = tuple(int(b) for b in rng.integers(0, 256, 4))
        for offset in range(6):
            for length in (None, size):
                expected = RFC6455WebSocket._apply_mask(data, mask, length, offset)
                if websocket_unmask(data, mask, length, offset) != expected:
                    print("differs", size, offset, length)
    print("checked")
    """
)


def test_concurrent_g711_decoding_on_native_threads_completes():
    assert under_eventlet(SCRIPT, "fixed").stdout.strip() == "done"


def test_without_native_locks_it_deadlocks():
    """The failure the fix prevents (it hangs; a short timeout catches it)."""
    with pytest.raises(subprocess.TimeoutExpired):
        under_eventlet(SCRIPT, "green", timeout=8)


def test_a_store_flushed_from_the_hub_lets_its_writer_run(tmp_path):
    """The writer is a greenthread: a flush that blocked the hub (at a restart's recovery, at
    shutdown) waited out its timeout with the write still queued."""
    out = under_eventlet(STORE_FLUSH, str(tmp_path / "t.db"))
    assert out.stdout.strip() == "flushed", out.stdout + out.stderr


def test_websocket_unmask_matches_eventlets_own_at_every_offset():
    out = under_eventlet(UNMASK)
    assert out.stdout.splitlines() == ["checked"], out.stdout + out.stderr
