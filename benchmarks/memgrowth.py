"""What the measured process keeps more of as a run goes on: opt-in, for finding memory growth.

With `IMAGEGEN_BENCH_TRACEMALLOC=DIR`, `benchmarks.measure` traces allocations (`FRAMES` frames; it
slows the run, so its times mean nothing then) and a thread snapshots them every `EVERY` s.
At the end, `DIR/memgrowth-<pid>.txt` lists the call sites whose live memory grew most between
the first snapshot and the last one taken while the run was still going. With
`IMAGEGEN_BENCH_CENSUS=DIR`, a cheaper `Census` counts live objects by type and reads where the
resident memory is (`memory_parts`: CPython's allocator, glibc's heaps, files) every minute.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import tracemalloc
from pathlib import Path

from flows.arenas import glibc_function

EVERY = 30.0  # seconds between snapshots
TOP = 25  # call sites reported
FRAMES = int(os.environ.get("IMAGEGEN_BENCH_TRACEMALLOC_FRAMES", "30"))  # frames kept of each allocation's stack


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
        by_line = self.last.compare_to(self.first, "lineno")
        lines.append(f"\nby the line that allocated (all lines: {sum(s.size_diff for s in by_line) / 1e6:+.1f} MB)")
        lines.extend(f"{s.size_diff / 1e6:+.2f} MB, {s.count_diff:+d} blocks  {s.traceback[0].filename}:"
                     f"{s.traceback[0].lineno}" for s in by_line[:TOP])
        self.out.write_text("\n".join(lines) + "\n")
        return self.out


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo() -> _MallInfo2 | None:
    """glibc's own account of its heaps (2.33 and later), or None elsewhere."""
    function = glibc_function("mallinfo2", [], _MallInfo2)
    return function() if function is not None else None


def _mappings() -> dict[str, int]:
    """Resident KiB by kind of mapping (`/proc/self/smaps`): the main heap, anonymous mappings
    (CPython's small-object arenas, thread heaps, large buffers, native libraries' pools) and
    files (code)."""
    kinds = {"heap": 0, "anon": 0, "files": 0}
    kind = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                name = fields[5] if len(fields) > 5 else ""
                kind = ("heap" if name == "[heap]" else "files" if name.startswith("/")
                        else "anon" if not name or name.startswith("[anon") else None)
            elif fields and fields[0] == "Rss:" and kind is not None:
                kinds[kind] += int(fields[1])
    return kinds


def _pymalloc() -> dict[str, int]:
    """CPython's small-object allocator: its 1 MiB arenas held, and the KiB in live blocks
    (`sys._debugmallocstats`, which writes to file descriptor 2: it is caught in a file for the
    moment and what else was written meanwhile is passed on); -1 each where it prints none
    (as while tracemalloc traces)."""
    import re
    import tempfile

    with tempfile.TemporaryFile() as caught:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(caught.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        text = caught.read().decode(errors="replace")
    arenas = re.search(r"# arenas allocated current\s*=\s*([\d,]+)", text)
    used = re.search(r"# bytes in allocated blocks\s*=\s*([\d,]+)", text)
    stats = re.compile(r"^(\s*[\d\s]+|.*=\s*[\d,]+|Small block.*|class .*|[-\s]+|arena map.*|\s*)$")
    others = [line for line in text.splitlines(keepends=True) if not stats.match(line.rstrip("\n"))]
    if others:
        sys.stderr.write("".join(others))
    return {"py_arenas": int(arenas[1].replace(",", "")) if arenas else -1,
            "py_used": int(used[1].replace(",", "")) // 1024 if used else -1}


def _rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def memory_parts() -> dict[str, int]:
    """Where the process's resident memory is, in KiB: by mapping (`_mappings`), CPython's
    small-object arenas (a count) and live blocks, and glibc's bytes in use and free inside its
    heaps and in its own large mappings."""
    parts = {"rss": _rss(), **_mappings(), **_pymalloc()}
    info = _mallinfo()
    if info is not None:
        parts.update(malloc_used=info.uordblks // 1024, malloc_free=info.fordblks // 1024,
                     malloc_mmapped=info.hblkhd // 1024)
    return parts


class Census:
    """Live objects the garbage collector tracks, counted by type every `every` s in a thread of
    its own (`IMAGEGEN_BENCH_CENSUS=DIR`): cheap beside tracing (a count takes a fraction of a
    second), and it names the kinds of object a run keeps more of. At the end,
    `DIR/census-<pid>.txt` lists the types whose count grew most from the first count to the
    last one taken while the run was still going, after a table of where resident memory was
    at each count (`memory_parts`): what grows that no object count shows."""

    def __init__(self, out_dir: Path, every: float = 60.0) -> None:
        self.out = out_dir / f"census-{os.getpid()}.txt"
        self.every = every
        self.counts: list[dict[str, int]] = []
        self.memory: list[dict[str, int]] = []
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
            self.memory.append(memory_parts())

    def stop(self) -> Path | None:
        """Write the report (when two counts were taken)."""
        self.done.set()
        self.thread.join()
        if len(self.counts) < 2:
            return None
        first, last = self.counts[0], self.counts[-1]
        grown = sorted(((last.get(k, 0) - first.get(k, 0), k) for k in set(first) | set(last)), reverse=True)
        columns = list(self.memory[0])
        lines = [f"where resident memory was (KiB; py_arenas a count), every {self.every:.0f} s",
                 "  ".join(f"{c:>14}" for c in columns)]
        lines += ["  ".join(f"{m.get(c, 0):>14}" for c in columns) for m in self.memory]
        lines += ["", f"{len(self.counts)} counts, {self.every:.0f} s apart; growth from the first to the last"]
        lines += [f"{diff:+8d}  {last.get(kind, 0):8d}  {kind}" for diff, kind in grown[:TOP * 2] if diff > 0]
        self.out.write_text("\n".join(lines) + "\n")
        return self.out
