"""The benchmark: the project's flow against the provider ceiling and a plain asyncio script.

    python -m benchmarks.run                      # or `make bench`
    python -m benchmarks.run --sizes 12 --baseline-sizes 12 --latency 0.5   # a quick one

Starts the sandbox (emulators with a fixed job latency and the published limits, SeaweedFS)
and, unless `--api-url` names one, a `prefect server start` on SQLite in a temp dir; saves the
sandbox Blocks and applies `deployments/limits.yaml` there. Then, for each size, runs the
workload of `benchmarks/workload.py` through `run-pipeline` and through `benchmarks/baseline.py`,
each in its own process, and reads the emulators' own counters before and after. Writes
`results/latest.json` and `results/latest.md` (under `--out`) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from benchmarks.measure import MARK
from deployments.postgres import Cluster, binaries
from benchmarks.workload import PROVIDERS, Workload, polls_needed
from sandbox import launcher
from sandbox.accounts import emulator, emulators

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BUCKET = "imagegen-bench"
BLOCK = "bench"  # Blocks and limits of their own, so a shared Prefect API's `sandbox` ones stay as they are


def start_server(home: Path, database_url: str | None = None) -> tuple[subprocess.Popen, str]:
    """`prefect server start` with its database in `home` (SQLite) or at `database_url`;
    returns the process and its API URL."""
    port = launcher.free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           **({"PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url} if database_url else {}),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    log = (home / "server.log").open("ab")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return proc, api
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"prefect server did not start; see {home / 'server.log'}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def emulator_counts(state: launcher.SandboxState) -> dict[str, dict[str, int]]:
    """Submits, polls and limit violations, as each emulator counted them (its `bench_counts`)."""
    return {p: emulator(p).bench_counts(httpx.get(f"{state.url(p)}/_sandbox/stats", timeout=30).json())
            for p in PROVIDERS}


def run_side(mode: str, spec: Path, env: dict[str, str], state_dir: Path, log: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.measure", mode, str(spec)]
    if mode == "baseline":
        cmd += ["--sandbox-state", str(state_dir)]
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=out, text=True, timeout=3600)
    out_lines = proc.stdout.splitlines()
    with log.open("a") as out:
        out.write(proc.stdout)
    result = next((json.loads(line[len(MARK):]) for line in reversed(out_lines) if line.startswith(MARK)), None)
    if result is None:
        raise RuntimeError(f"{mode} run of {spec.name} ended {proc.returncode} without a result; see {log}")
    result["process_wall_s"] = round(time.monotonic() - started, 2)
    return result


def summarize(workload: Workload, result: dict[str, Any], before: dict, after: dict) -> dict[str, Any]:
    counts = {p: {k: after[p][k] - before[p][k] for k in after[p]} for p in PROVIDERS}
    polls = {p: round(c["polls"] / c["submits"], 2) for p, c in counts.items() if c["submits"]}
    ceiling = workload.ceiling()
    at_polls = workload.ceiling(polls)
    images = result.get("images") or 0
    return {
        **result, "items": workload.items, "split": workload.split,
        "ceiling_s": ceiling["overall"], "ceiling_per_provider_s": ceiling,
        "fraction_of_ceiling": round(ceiling["overall"] / result["wall_s"], 3),
        "ceiling_at_measured_polls_s": at_polls["overall"],
        "fraction_of_ceiling_at_measured_polls": round(at_polls["overall"] / result["wall_s"], 3),
        "polls_per_job": polls, "violations": {p: c["violations"] for p, c in counts.items()},
        "violations_total": sum(c["violations"] for c in counts.values()), "provider_counts": counts,
        "cpu_s_per_image": round(result["cpu_s"] / images, 4) if images else None,
    }


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"Latency {cfg['latency']} s a job, poll interval {cfg['poll_interval']} s, "
        f"max_parallel {cfg['max_parallel']}, moderation {'on' if cfg['moderation'] else 'off'}; "
        f"Prefect API: {cfg['prefect_api']}; {cfg['machine']}.",
        "",
        f"| items ({'/'.join(PROVIDERS)}) | way | wall s | ceiling s | of ceiling | polls/job "
        "| violations | CPU s/image | peak RSS MB | vs baseline | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        split = "/".join(str(run["split"][p]) for p in PROVIDERS)
        polls = "/".join(str(run["polls_per_job"].get(p, "-")) for p in PROVIDERS)
        ratio = f"{run['vs_baseline']:.2f}x" if run.get("vs_baseline") else ""
        result = f"{run['status']}, {run.get('images')} images" + (f", {run['failed']} failed" if run.get("failed") else "")
        lines.append(
            f"| {run['items']} ({split}) | {run['mode']} | {run['wall_s']} | {run['ceiling_s']} "
            f"| {run['fraction_of_ceiling']:.0%} | {polls} | {run['violations_total']} | {run['cpu_s_per_image']} "
            f"| {run['peak_rss_mb']} | {ratio} | {result} |")
    lines += ["", "Ceiling: the published limits' bound, `max over providers of N_p x max((1+p)/R, L/C)` with "
              f"p = {report['polls_needed']} poll(s) a job; 'of ceiling' = ceiling / wall. "
              "Violations: requests the emulators refused over a limit."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1000], help="items per run of the flow")
    parser.add_argument("--baseline-sizes", type=int, nargs="*", default=[300],
                        help="sizes also run through the asyncio baseline")
    parser.add_argument("--latency", type=float, default=2.0, help="seconds every emulated job takes")
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--max-parallel", type=int, default=64, help="items in flight (both ways)")
    parser.add_argument("--no-moderation", action="store_true", help="review without the open_nsfw model")
    parser.add_argument("--database", choices=["auto", "postgres", "sqlite"], default="auto",
                        help="the database of the Prefect server it starts: postgres is a throwaway cluster "
                             "of Debian's postgresql; auto takes it when installed, else SQLite")
    parser.add_argument("--api-url", help="use this Prefect API instead of starting a server")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, specs) for inspection")
    args = parser.parse_args(argv)
    if args.database == "auto":
        args.database = "postgres" if binaries() is not None else "sqlite"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the sandbox and server on kill

    work = Path(tempfile.mkdtemp(prefix="imagegen-bench-"))
    state_dir, home = work / "sandbox", work / "prefect"
    home.mkdir()
    work.chmod(0o755)  # the PostgreSQL server runs as its own user
    server, cluster = None, None
    print(f"benchmark work dir {work}", flush=True)
    try:
        state = launcher.up(state_dir, ports={name: launcher.free_port() for name in emulators()},
                            s3_port=launcher.free_port(), latency=args.latency, buckets=(BUCKET,))
        if args.api_url:
            api = args.api_url
        else:
            if args.database == "postgres":
                cluster = Cluster(work / "postgres")
            server, api = start_server(home, cluster.start() if cluster else None)
        env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
        subprocess.run([str(BIN / "imagegen"), "sandbox", "register", "--state-dir", str(state_dir), "--block-name",
                        BLOCK], env=env, cwd=ROOT, check=True, capture_output=True)

        runs = []
        for size in args.sizes:
            workload = Workload.build(size, args.latency, args.poll_interval)
            modes = ["flow"] + (["baseline"] if size in args.baseline_sizes else [])
            for mode in modes:
                spec = workload.write_spec(work / f"bench-{mode}-{size}.yaml", f"bench-{mode}-{size}", BUCKET,
                                           BLOCK, args.max_parallel, not args.no_moderation)
                print(f"{mode}: {size} items {workload.split} ...", flush=True)
                before = emulator_counts(state)
                result = run_side(mode, spec, env, state_dir, work / f"{mode}-{size}.log")
                runs.append(summarize(workload, result, before, emulator_counts(state)))
                print(f"  {result['wall_s']} s wall, {result['status']}", flush=True)
            by_mode = {r["mode"]: r for r in runs if r["items"] == size}
            if "baseline" in by_mode:
                by_mode["flow"]["vs_baseline"] = round(by_mode["flow"]["wall_s"] / by_mode["baseline"]["wall_s"], 3)

        report = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": {"latency": args.latency, "poll_interval": args.poll_interval, "max_parallel": args.max_parallel,
                       "moderation": not args.no_moderation,
                       "prefect_api": "given" if args.api_url else f"prefect server start ({args.database})",
                       "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}"},
            "polls_needed": polls_needed(args.latency, args.poll_interval), "runs": runs,
        }
        table = markdown(report)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "latest.json").write_text(json.dumps(report, indent=2))
        (args.out / "latest.md").write_text(table + "\n")
        print("\n" + table)
        return 0 if all(r["status"] == "complete" for r in runs) else 1
    finally:
        if server is not None:
            stop(server)
        if cluster is not None:
            cluster.stop()
        launcher.down(state_dir)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
