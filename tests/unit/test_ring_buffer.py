from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from engine.ring_buffer import RingBuffer

pytestmark = pytest.mark.unit


def test_reads_across_the_seam_in_order():
    ring = RingBuffer(10)
    ring.write(np.arange(8, dtype=np.float32))
    ring.write(np.arange(8, 14, dtype=np.float32))  # wraps: positions 8..13
    assert (ring.start, ring.end) == (4, 14)
    np.testing.assert_array_equal(ring.read(4, 14), np.arange(4, 14))
    np.testing.assert_array_equal(ring.read(9, 12), [9, 10, 11])


def test_evicted_and_future_positions_are_refused():
    ring = RingBuffer(10)
    ring.write(np.arange(25, dtype=np.float32))
    with pytest.raises(IndexError, match=r"holds \[15, 25\)"):
        ring.read(14, 20)
    with pytest.raises(IndexError):
        ring.read(20, 26)


def test_a_write_larger_than_capacity_keeps_the_newest():
    ring = RingBuffer(5)
    ring.write(np.arange(3, dtype=np.float32))
    ring.write(np.arange(3, 20, dtype=np.float32))
    assert ring.end == 20
    np.testing.assert_array_equal(ring.read(15, 20), np.arange(15, 20))


def test_memory_stays_flat_over_a_long_stream():
    ring = RingBuffer(16000 * 10)
    chunk = np.ones(1600, dtype=np.float32)
    tracemalloc.start()
    for _ in range(600):  # the first minute fills the buffer
        ring.write(chunk)
    filled, _ = tracemalloc.get_traced_memory()
    for _ in range(36000 - 600):  # the rest of an hour in 100 ms chunks
        ring.write(chunk)
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert after - filled < 4096
    assert ring.end == 36000 * 1600
    assert ring.read(ring.end - 100, ring.end).sum() == 100
