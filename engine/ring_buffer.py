"""A preallocated, bounded ring of float32 samples addressed by absolute stream position.

Position 0 is the first sample the stream ever wrote (or ``start``, for a stream continued from
another process); ``end`` is one past the last. Only the most
recent ``capacity`` samples can be read back, so memory stays flat however long the stream runs.
"""

from __future__ import annotations

import numpy as np


class RingBuffer:
    def __init__(self, capacity: int, start: int = 0) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._data = np.zeros(capacity, dtype=np.float32)
        self._first = start
        self.end = start

    @property
    def start(self) -> int:
        """Oldest position still held."""
        return max(self._first, self.end - self.capacity)

    def write(self, samples: np.ndarray) -> None:
        n = int(samples.shape[0])
        if n == 0:
            return
        if n >= self.capacity:
            # Only the newest `capacity` samples survive; store them as if written in order.
            samples = samples[-self.capacity :]
            self.end += n - self.capacity
            n = self.capacity
        offset = self.end % self.capacity
        first = min(n, self.capacity - offset)
        self._data[offset : offset + first] = samples[:first]
        if first < n:
            self._data[: n - first] = samples[first:]
        self.end += n

    def read(self, start: int, end: int) -> np.ndarray:
        """Copy of samples [start, end); raises IndexError if any are gone or not yet written."""
        if not self.start <= start <= end <= self.end:
            raise IndexError(
                f"samples [{start}, {end}) are not held; "
                f"the buffer holds [{self.start}, {self.end})"
            )
        n = end - start
        offset = start % self.capacity
        first = min(n, self.capacity - offset)
        if first == n:
            return self._data[offset : offset + n].copy()
        return np.concatenate((self._data[offset:], self._data[: n - first]))
