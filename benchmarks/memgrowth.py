"""What the measured process keeps more of as a run goes on: opt-in, for finding memory growth.

With `IMAGEGEN_BENCH_TRACEMALLOC=DIR`, `benchmarks.measure` traces allocations (`FRAMES` frames; it
slows the run, so its times mean nothing then) and a thread snapshots them every `EVERY` s.
At the end, `DIR/memgrowth-<pid>.txt` lists the call sites whose live memory grew most between
the first snapshot and the last one taken while the run was still going.
"""

from __future__ import annotations

import os
import threading
import tracemalloc
from pathlib import Path

EVERY = 30.0  # seconds between snapshots
TOP = 25  # call sites reported
FRAMES = 30  # frames kept of each allocation's stack


class Growth:
    """Snapshots of live allocations, the first and the latest, taken in a thread of their own."""

    def __init__(self, out_dir: Path, every: float = EVERY) -> None:
        self.out = out_dir / f"memgrowth-{os.getpid()}.txt"
        self.every = every
        self.first: tracemalloc.Snapshot | None = None
        self.last: tracemalloc.Snapshot | None = None
        self.done = threading.Event()
        tracemalloc.start(FRAMES)
        self.thread = threading.Thread(target=self._run, name="memgrowth", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(self.every):
            snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            if self.first is None:
                self.first = snapshot
            else:
                self.last = snapshot

    def stop(self) -> Path | None:
        """Write the report (when two snapshots were taken) and stop tracing."""
        self.done.set()
        self.thread.join()
        tracemalloc.stop()
        if self.first is None or self.last is None:
            return None
        lines = []
        for stat in self.last.compare_to(self.first, "traceback")[:TOP]:
            lines.append(f"{stat.size_diff / 1e6:+.1f} MB, {stat.count_diff:+d} blocks")
            lines.extend(f"    {frame.filename}:{frame.lineno}" for frame in reversed(stat.traceback))
        self.out.write_text("\n".join(lines) + "\n")
        return self.out
