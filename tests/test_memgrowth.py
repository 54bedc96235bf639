"""The benchmark's memory-growth report names the code that kept memory during the run."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.memgrowth import Growth

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
