"""The benchmark's memory-growth report names the code that kept memory during the run."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from benchmarks.memgrowth import Census, Growth, memory_parts

KEPT: list[bytes] = []


def keep_a_lot() -> None:
    KEPT.extend(bytes(1000) + bytes([n % 256]) for n in range(10_000))  # about 10 MB, kept


def test_the_report_names_where_memory_grew(tmp_path: Path) -> None:
    growth = Growth(tmp_path, every=0.05)
    time.sleep(0.2)  # the first snapshot, before the growth
    keep_a_lot()
    time.sleep(0.3)  # a later one, after it
    report = growth.stop()
    KEPT.clear()
    assert report is not None
    lines = report.read_text().splitlines()
    end = next((n for n, line in enumerate(lines[1:], 1) if not line.startswith(" ")), len(lines))
    head, frames = lines[0], lines[1:end]  # the call site that grew most, and its stack
    assert head.startswith("+") and float(head.split()[0]) >= 8, head  # MB
    assert any(line.strip().startswith(f"{__file__}:") for line in frames), frames


def test_no_report_without_two_snapshots(tmp_path: Path) -> None:
    assert Growth(tmp_path, every=60).stop() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self and glibc's mallinfo2")
def test_memory_parts_tell_python_objects_from_the_c_heap() -> None:
    before = memory_parts()
    small = [str(n) * 3 for n in range(100_000)]  # about 6 MB of small objects: CPython's allocator
    large = [bytes(2000) + bytes([n % 256]) for n in range(2_000)]  # about 4 MB of large ones: glibc's heap
    after = memory_parts()
    del small, large
    assert after["py_used"] - before["py_used"] >= 4_000, (before, after)  # KiB
    # A worker that ran other tests may hold freed room in its arenas, so their count need not rise;
    # it must still hold the live blocks (an arena is 1 MiB since CPython 3.10).
    assert after["py_arenas"] * 1024 >= after["py_used"] > 0, after
    assert after["malloc_used"] - before["malloc_used"] >= 3_000
    assert after["rss"] >= after["heap"] + after["anon"] > 0


def test_the_census_reports_where_memory_was(tmp_path: Path) -> None:
    census = Census(tmp_path, every=0.05)
    deadline = time.monotonic() + 60  # a count walks every object: long in a test worker's big heap
    while len(census.memory) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    report = census.stop()
    assert report is not None
    lines = report.read_text().splitlines()
    assert lines[1].split()[:2] == ["rss", "heap"] and all(int(v) >= 0 for v in lines[2].split()), lines[:3]
