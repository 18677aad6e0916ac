"""Under eventlet: native threads never meet a green lock, and frames are unmasked fast."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from eventlet.websocket import RFC6455WebSocket

from server.runtime import websocket_unmask
from tests.harness import ROOT

pytestmark = pytest.mark.unit

SCRIPT = textwrap.dedent(
    """
    import warnings
    warnings.filterwarnings("ignore")
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


def run(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_concurrent_g711_decoding_on_native_threads_completes():
    assert run("fixed").stdout.strip() == "done"


def test_without_native_locks_it_deadlocks():
    """The failure the fix prevents (it hangs; a short timeout catches it)."""
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(
            [sys.executable, "-c", SCRIPT, "green"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=8,
        )


def test_websocket_unmask_matches_eventlets_own_at_every_offset():
    rng = np.random.default_rng(0)
    for size in (0, 1, 3, 4, 5, 127, 32768):
        data = rng.integers(0, 256, size + 6, dtype=np.uint8).tobytes()
        mask = tuple(int(b) for b in rng.integers(0, 256, 4))
        for offset in range(6):
            for length in (None, size):
                expected = RFC6455WebSocket._apply_mask(data, mask, length, offset)
                assert websocket_unmask(data, mask, length, offset) == expected
