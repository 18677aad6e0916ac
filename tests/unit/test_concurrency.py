"""Under eventlet: native threads never meet a green lock, and frames are unmasked fast."""

from __future__ import annotations

import textwrap

import pytest

from tests.support.harness import under_eventlet

pytestmark = pytest.mark.unit

SCRIPT = textwrap.dedent(
    """
    import eventlet
    eventlet.monkey_patch()
    from engine.audio import AudioFormat, decode_chunk
    from server.runtime import EventletRuntime
    runtime = EventletRuntime()
    runtime.install()
    fmt = AudioFormat("mulaw", 8000, 1)
    pool = eventlet.GreenPool(16)
    for _ in range(3000):
        pool.spawn(runtime.offload, decode_chunk, bytes(range(256)) * 4, fmt)
    pool.waitall()
    print("done")
    """
)


CONTENDED = textwrap.dedent(
    """
    import eventlet
    eventlet.monkey_patch()
    import sys
    import soundfile
    from eventlet.patcher import original
    from server.runtime import EventletRuntime
    runtime = EventletRuntime()
    if sys.argv[1] == "fixed":
        runtime.install()
    lock = soundfile.SoundFile._sf_error_lock
    native = original("threading")
    held, trying, release, acquired = (native.Event() for _ in range(4))
    def holder():
        with lock:
            held.set()
            release.wait()
    def contender():
        held.wait()
        trying.set()
        with lock:
            acquired.set()
    native.Thread(target=holder, daemon=True).start()
    native.Thread(target=contender, daemon=True).start()
    trying.wait()
    waiters = getattr(lock, "_waiters", None)
    while waiters is not None and not waiters:  # green: release once the contender waits
        original("time").sleep(0.001)
    release.set()
    print("acquired" if acquired.wait(float(sys.argv[2])) else "stuck")
    """
)

STORE_FLUSH = textwrap.dedent(
    """
    import eventlet
    eventlet.monkey_patch()
    import sys
    from server.runtime import EventletRuntime
    from server.sinks.store import Store
    store = Store(sys.argv[1], runtime=EventletRuntime())
    store.start()
    store.close_session("s", {}, ended_at=0.0)
    print("flushed" if store.flush(timeout_s=30.0) else "timed out")  # the defect: never
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
    assert under_eventlet(SCRIPT).stdout.strip() == "done"


@pytest.mark.parametrize(
    ("locks", "wait_s", "outcome"), [("green", 3, "stuck"), ("fixed", 60, "acquired")]
)
def test_a_native_thread_waiting_for_soundfiles_lock_wakes_only_if_it_is_native(
    locks, wait_s, outcome
):
    """The failure install() prevents, forced: one native thread holds soundfile's lock while
    another waits on it. A green lock's release never wakes the waiter (it hung the server);
    ``wait_s`` only bounds how long the test watches a waiter that will not wake."""
    out = under_eventlet(CONTENDED, locks, str(wait_s))
    assert out.stdout.strip() == outcome, out.stdout + out.stderr


def test_a_store_flushed_from_the_hub_lets_its_writer_run(tmp_path):
    """The writer is a greenthread: a flush that blocked the hub (at a restart's recovery, at
    shutdown) waited out its timeout with the write still queued."""
    out = under_eventlet(STORE_FLUSH, str(tmp_path / "t.db"))
    assert out.stdout.strip() == "flushed", out.stdout + out.stderr


def test_websocket_unmask_matches_eventlets_own_at_every_offset():
    out = under_eventlet(UNMASK)
    assert out.stdout.splitlines() == ["checked"], out.stdout + out.stderr
