"""Run one side of the benchmark in this process and report what it cost this process.

    python -m benchmarks.measure flow SPEC [--run-date D]
    python -m benchmarks.measure baseline SPEC --sandbox-state DIR [--run-date D]

The last line printed is `BENCH_RESULT {json}`: wall seconds of the run (imports excluded),
CPU seconds (user + system, all threads) spent in it, the peak RSS of the process, and where
the CPU went (`cpu_parts`, shares of py-spy samples, see `benchmarks.cpu`).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from datetime import date
from typing import Any

MARK = "BENCH_RESULT "


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sys() -> float:
    """The kernel's share of `_cpu()` (thread switches, sockets)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def run_flow(spec: str, run_date: date) -> dict[str, Any]:
    from flows.pipeline import run_pipeline
    from flows.running.report import PipelineIncomplete

    state = run_pipeline(spec=spec, run_date=run_date, return_state=True)
    outcome = state.result(raise_on_failure=False)
    manifest = outcome.manifest if isinstance(outcome, PipelineIncomplete) else outcome
    if not isinstance(manifest, dict):
        return {"status": "crashed", "error": repr(outcome)[:500]}
    totals = manifest["totals"]
    return {"status": manifest["status"], "images": totals["images"], "failed": totals["failed_items"],
            "errors": [i["error"] for i in manifest.get("items", []) if i.get("error")][:5]}


def main(argv: list[str]) -> None:
    mode, spec, rest = argv[0], argv[1], argv[2:]
    run_date = date.fromisoformat(rest[rest.index("--run-date") + 1]) if "--run-date" in rest else date(2026, 1, 1)
    if mode == "flow":
        import flows.pipeline  # noqa: F401 - imports before the clock starts, as for the baseline
    else:
        import benchmarks.baseline  # noqa: F401
    import os
    import tempfile
    from pathlib import Path

    from benchmarks.cpu import Sampler

    sampler = Sampler(Path(tempfile.gettempdir()) / f"imagegen-bench-{os.getpid()}.raw")
    traced = os.environ.get("IMAGEGEN_BENCH_TRACEMALLOC")  # see benchmarks.memgrowth
    if traced:
        from benchmarks.memgrowth import Growth

        growth = Growth(Path(traced))
    counted = os.environ.get("IMAGEGEN_BENCH_CENSUS")  # see benchmarks.memgrowth.Census
    if counted:
        from benchmarks.memgrowth import Census

        census = Census(Path(counted))
    cpu0, sys0, wall0 = _cpu(), _sys(), time.monotonic()
    if mode == "flow":
        outcome = run_flow(spec, run_date)
    else:
        from benchmarks.baseline import main as baseline

        outcome = baseline([spec, *rest])
        outcome["status"] = "complete" if not outcome["failed"] else "incomplete"
    wall, cpu, kernel = time.monotonic() - wall0, _cpu() - cpu0, _sys() - sys0
    # The run's own peak: reading the profile below takes memory in proportion to the run's length.
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if traced:
        print(f"memory growth: {growth.stop()}", file=sys.stderr)
    if counted:
        print(f"object census: {census.stop()}", file=sys.stderr)
    parts = sampler.stop()
    keep = os.environ.get("IMAGEGEN_BENCH_KEEP_PROFILE")  # `benchmarks.run --keep`: for a flame graph
    if keep and sampler.out.exists():
        sampler.out.replace(Path(keep) / f"{mode}-{os.getpid()}.pyspy.raw")
    sampler.out.unlink(missing_ok=True)
    print(MARK + json.dumps({"mode": mode, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                             "cpu_sys_s": round(kernel, 2), "peak_rss_mb": round(peak_mb, 1), "cpu_parts": parts,
                             **outcome}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
