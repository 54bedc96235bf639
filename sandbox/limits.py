"""Limit bookkeeping for the emulators: sliding request windows and in-flight counters that
also record how often a client went over, so tests can read the emulator's own counts."""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque


class SlidingWindow:
    """At most `limit` requests in any `window` seconds, per key; rejected calls are counted, and
    the last few kept with the requests they met (`refusals`), to tell what crowded them."""

    def __init__(self, limit: int, window: float = 1.0) -> None:
        self.limit, self.window = limit, window
        self._hits: dict[str, deque[tuple[float, str]]] = defaultdict(deque)
        self._lock = threading.Lock()
        self.rejected = 0
        self.peak = 0  # most requests accepted in one window
        self.refusals: deque[dict[str, object]] = deque(maxlen=5)

    def allow(self, key: str, what: str = "") -> bool:
        """Count request `what` of `key` now, unless its window is full."""
        now = time.monotonic()
        with self._lock:
            hits = self._hits[key]
            while hits and now - hits[0][0] >= self.window:
                hits.popleft()
            if len(hits) >= self.limit:
                self.rejected += 1
                self.refusals.append({"refused": what, "ms_before": [[round((now - at) * 1000, 1), seen]
                                                                     for at, seen in hits]})
                return False
            hits.append((now, what))
            self.peak = max(self.peak, len(hits))
            return True

    def retry_after(self, key: str) -> float:
        with self._lock:
            hits = self._hits[key]
            return max(0.0, self.window - (time.monotonic() - hits[0][0])) if hits else 0.0
