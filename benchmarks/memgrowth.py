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


class Census:
    """Live objects the garbage collector tracks, counted by type every `every` s in a thread of
    its own (`IMAGEGEN_BENCH_CENSUS=DIR`): cheap beside tracing (a count takes a fraction of a
    second), and it names the kinds of object a run keeps more of. At the end,
    `DIR/census-<pid>.txt` lists the types whose count grew most from the first count to the
    last one taken while the run was still going."""

    def __init__(self, out_dir: Path, every: float = 60.0) -> None:
        self.out = out_dir / f"census-{os.getpid()}.txt"
        self.every = every
        self.counts: list[dict[str, int]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="census", daemon=True)
        self.thread.start()

    @staticmethod
    def count() -> dict[str, int]:
        import gc
        from collections import Counter

        kinds = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
        return dict(kinds)

    def _run(self) -> None:
        while not self.done.wait(self.every):
            self.counts.append(self.count())

    def stop(self) -> Path | None:
        """Write the report (when two counts were taken)."""
        self.done.set()
        self.thread.join()
        if len(self.counts) < 2:
            return None
        first, last = self.counts[0], self.counts[-1]
        grown = sorted(((last.get(k, 0) - first.get(k, 0), k) for k in set(first) | set(last)), reverse=True)
        lines = [f"{len(self.counts)} counts, {self.every:.0f} s apart; growth from the first to the last"]
        lines += [f"{diff:+8d}  {last.get(kind, 0):8d}  {kind}" for diff, kind in grown[:TOP * 2] if diff > 0]
        self.out.write_text("\n".join(lines) + "\n")
        return self.out
