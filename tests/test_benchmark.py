"""The benchmark: its ceiling arithmetic, and a small run of the real thing (both ways)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.workload import Workload, polls_needed

ROOT = Path(__file__).parent.parent


def test_ceiling_is_the_tightest_published_bound() -> None:
    assert polls_needed(2.0, 1.0) == 2 and polls_needed(2.0, 0.7) == 3 and polls_needed(0.5, 1.0) == 1
    w = Workload.build(300, latency=2.0, poll_interval=1.0)
    # TAMS: (1 submit + 2 polls) / 5 req/s; 触站AI: 2 s / 2 in flight; Tencent text: 2 s / 1 in flight
    assert w.per_job == {"tams": 0.6, "chuzhan": 1.0, "tencent": 2.0}
    assert w.split == {"tams": 158, "chuzhan": 95, "tencent": 47} and sum(w.split.values()) == 300
    assert w.ceiling()["overall"] == 95.0
    assert w.ceiling({"tams": 4.0})["tams"] == pytest.approx(158 * 5 / 5)  # measured polls raise TAMS's bound
    assert sorted(w.order()) == sorted(p for p, n in w.split.items() for _ in range(n))


def test_benchmark_smoke(sandbox_blocks, tmp_path: Path) -> None:
    """A few items through the flow and the asyncio baseline on their own sandbox, against
    the session's Prefect API (Blocks and limits of their own name, so nothing is shared)."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_LOGGING_LEVEL": "WARNING"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--sizes", "6", "--baseline-sizes", "6",
                          "--latency", "0.3", "--poll-interval", "0.3", "--api-url", env["PREFECT_API_URL"],
                          "--out", str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    runs = {r["mode"]: r for r in report["runs"]}
    assert set(runs) == {"flow", "baseline"}
    for run in runs.values():
        assert run["status"] == "complete" and run["images"] == 6 and run["violations_total"] == 0
        assert sum(c["submits"] for c in run["provider_counts"].values()) == 6  # one paid job an item
        assert run["wall_s"] > 0 and run["cpu_s_per_image"] > 0 and run["peak_rss_mb"] > 50
    assert runs["flow"]["vs_baseline"] > 0
    assert "| 6 (" in (tmp_path / "latest.md").read_text()
