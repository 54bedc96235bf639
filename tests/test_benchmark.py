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


def test_cpu_samples_go_to_the_innermost_project_frame() -> None:
    from benchmarks.cpu import breakdown, category

    def stack(*files: str) -> list[str]:
        return [f"fn ({name}:1)" for name in files]

    engine = ("threading.py", "prefect/task_engine.py", "flows/running/tasks.py")
    assert category(stack(*engine, "blocks/base.py", "httpx/_client.py")) == "provider HTTP"
    assert category(stack(*engine, "blocks/base.py", "flows/paying/slots.py", "prefect/client/base.py")) == "limits"
    assert category(stack(*engine, "flows/paying/ledger.py", "botocore/endpoint.py")) == "ledger"
    assert category(stack(*engine, "flows/paying/ledger.py", "flows/storage.py", "botocore/endpoint.py")) == "ledger"
    assert category(stack(*engine, "flows/storage.py", "botocore/endpoint.py")) == "archive (S3)"
    assert category(stack(*engine, "boto3/s3/transfer.py")) == "archive (S3)"
    assert category(stack("prefect/task_engine.py", "prefect/blocks/core.py")) == "Prefect"  # not our blocks/
    assert category(stack("flows/pipeline.py", "prefect/futures.py")) == "Prefect"
    assert category(stack(*engine, "flows/imaging/review.py", "onnxruntime/session.py")) == "review"
    assert category(stack("threading.py", "json/encoder.py")) == "other"
    raw = ("thread (1): MainThread;fn (flows/pipeline.py:1);fn (prefect/futures.py:2) 3\n"
           "thread (2): worker;fn (flows/paying/ledger.py:1) 1\n")
    assert breakdown(raw) == {"Prefect": 0.75, "ledger": 0.25}


def test_benchmark_smoke(sandbox_blocks, tmp_path: Path) -> None:
    """A few items through the flow and the asyncio baseline on their own sandbox, against
    the session's Prefect API (Blocks and limits of their own name, so nothing is shared)."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_LOGGING_LEVEL": "WARNING"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--sizes", "6", "--baseline-sizes", "6",
                          "--tams-only", "4", "--latency", "0.3", "--poll-interval", "0.3",
                          "--api-url", env["PREFECT_API_URL"],
                          "--out", str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    runs = {(r["workload"], r["way"]): r for r in report["runs"]}
    assert set(runs) == {("mixed", "flow polling"), ("mixed", "flow callbacks"), ("mixed", "flow long-poll"),
                         ("mixed", "baseline"), ("tams-only", "flow polling"), ("tams-only", "flow callbacks")}
    for (workload, way), run in runs.items():
        items = 6 if workload == "mixed" else 4
        assert run["status"] == "complete" and run["images"] == items and run["violations_total"] == 0
        assert sum(c["submits"] for c in run["provider_counts"].values()) == items  # one paid job an item
        assert run["wall_s"] > 0 and run["cpu_s_per_image"] > 0 and run["peak_rss_mb"] > 50
        assert sum(run["cpu_s_per_image_parts"].values()) == pytest.approx(run["cpu_s_per_image"], rel=0.05)
    assert runs[("mixed", "flow polling")]["vs_baseline"] > 0
    # A trusted callback ends the job: no status request on TAMS or 触站AI; the long poll holds one.
    assert runs[("tams-only", "flow callbacks")]["polls_per_job"] == {"tams": 0.0}
    assert runs[("mixed", "flow callbacks")]["polls_per_job"]["chuzhan"] == 0.0
    assert runs[("mixed", "flow long-poll")]["polls_per_job"]["chuzhan"] == 1.0
    assert "| mixed 6 (" in (tmp_path / "latest.md").read_text()


def test_the_end_of_a_run_alone(tmp_path: Path) -> None:
    """`benchmarks.endpeak`, small: the end of a run on its own sandbox and Prefect server, each
    item confirmed against the real listing, each step's memory printed."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path), PREFECT_LOGGING_LEVEL="WARNING")
    out = subprocess.run([sys.executable, "-m", "benchmarks.endpeak", "30"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = [line.split("  resident")[0].strip() for line in out.stdout.splitlines() if "  resident " in line]
    assert steps == ["outcomes held, as at the end", "listed, confirmed, manifest made", "manifest written",
                     "hashes written", "gallery pages sent", "summary table sent"], out.stdout
