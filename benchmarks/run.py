"""The benchmark: the project's flow against the provider ceiling and a plain asyncio script.

    python -m benchmarks.run                      # or `make bench`
    python -m benchmarks.run --sizes 12 --baseline-sizes 12 --latency 0.5   # a quick one

Starts the sandbox (emulators with a fixed job latency and the published limits, SeaweedFS)
and, unless `--api-url` names one, a `prefect server start` on PostgreSQL (else SQLite) in a
temp dir, and `imagegen callbacks serve` for it; saves the sandbox Blocks, a variant per mode
and their limits there. Then runs, each in its own process, reading the emulators' own counters
before and after:

- for each size, the mixed workload of `benchmarks/workload.py` through `run-pipeline` in each
  mode (polling; callbacks, with Blocks that trust a verified callback; 触站AI's long poll) and
  through `benchmarks/baseline.py`;
- a TAMS-only workload, polling and with callbacks (its 5 requests a second are the bound);
- the mixed workload, polling, on a second server on SQLite (the embedded default's database).

Writes `results/latest.json` and `results/latest.md` (under `--out`) and prints the tables.
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
from flows.arenas import without_thread_caches
from deployments.postgres import Cluster, binaries
from deployments.processes import answers, spawn, stop, wait_until
from flows import SERVER_TUNING
from benchmarks.workload import PROVIDERS, Workload, polls_needed
from sandbox import launcher
from sandbox.accounts import emulator

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
           "PREFECT_LOGGING_LEVEL": "WARNING", **SERVER_TUNING}
    proc = spawn([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                 home / "server.log", env=env)
    wait_until(answers(f"{api}/health"), proc.pid, home / "server.log", what="the Prefect server", timeout=180)
    return proc, api


def emulator_counts(state: launcher.SandboxState) -> dict[str, dict[str, int]]:
    """Submits, polls and limit violations, as each emulator counted them (its `bench_counts`)."""
    return {p: emulator(p).bench_counts(httpx.get(f"{state.url(p)}/_sandbox/stats", timeout=30).json())
            for p in PROVIDERS}


# Block variants per mode: field changes per provider (the receiver's URL filled in at run time).
MODES: dict[str, dict[str, dict[str, Any]]] = {
    "polling": {},
    "callbacks": {"chuzhan": {"callback": "{receiver}", "trust_callbacks": True},
                  "tams": {"notify_url": "{receiver}", "trust_callbacks": True}},
    "long-poll": {"chuzhan": {"long_poll": True}},
}
MODE_POLLS = {"callbacks": {"chuzhan": 0.0, "tams": 0.0}, "long-poll": {"chuzhan": 1.0}}


def block_name(mode: str) -> str:
    return BLOCK if mode == "polling" else f"{BLOCK}-{mode}"


def save_variants(api: str, receiver: str) -> None:
    """Save each mode's Blocks (copies of the sandbox's with its fields changed) and limits."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from blocks import registry
    from deployments.limits import apply_limits

    with temporary_settings(updates={PREFECT_API_URL: api}):
        for mode, changes in MODES.items():
            if mode == "polling":
                continue
            for provider in PROVIDERS:
                block = registry.provider(provider).load(BLOCK)
                for name, value in changes.get(provider, {}).items():
                    setattr(block, name, value.format(receiver=receiver) if isinstance(value, str) else value)
                block.save(block_name(mode), overwrite=True)
        apply_limits({p: [block_name(m) for m in MODES if m != "polling"] for p in PROVIDERS})


def start_receiver(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """`imagegen callbacks serve` for the benchmark's Prefect API; returns it and its URL."""
    port = launcher.free_port()
    proc = spawn([str(BIN / "imagegen"), "callbacks", "serve", "--port", str(port)], log, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_until(answers(f"{url}/health"), proc.pid, log, what="the callback receiver", timeout=60)
    return proc, url


def run_side(mode: str, spec: Path, env: dict[str, str], state_dir: Path, log: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.measure", mode, str(spec)]
    if mode == "baseline":
        cmd += ["--sandbox-state", str(state_dir)]
    else:  # started as `imagegen run` starts a run (`flows.arenas.restart_without_thread_caches`)
        env = without_thread_caches(env) or env
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


def summarize(workload: Workload, result: dict[str, Any], before: dict, after: dict, *, way: str,
              label: str, database: str) -> dict[str, Any]:
    counts = {p: {k: after[p][k] - before[p][k] for k in after[p]} for p in PROVIDERS}
    polls = {p: round(c["polls"] / c["submits"], 2) for p, c in counts.items() if c["submits"]}
    mode = way.removeprefix("flow ")
    ceiling = workload.ceiling(MODE_POLLS.get(mode))
    polling_ceiling = workload.ceiling()
    at_polls = workload.ceiling(polls)
    images = result.get("images") or 0
    per_image = round(result["cpu_s"] / images, 4) if images else None
    return {
        **result, "way": way, "workload": label, "database": database, "items": workload.items,
        "split": workload.split, "ceiling_s": ceiling["overall"], "ceiling_per_provider_s": ceiling,
        "polling_ceiling_s": polling_ceiling["overall"],
        "vs_polling_ceiling": round(polling_ceiling["overall"] / result["wall_s"], 3),
        "fraction_of_ceiling": round(ceiling["overall"] / result["wall_s"], 3),
        "ceiling_at_measured_polls_s": at_polls["overall"],
        "fraction_of_ceiling_at_measured_polls": round(at_polls["overall"] / result["wall_s"], 3),
        "polls_per_job": polls, "violations": {p: c["violations"] for p, c in counts.items()},
        "violations_total": sum(c["violations"] for c in counts.values()), "provider_counts": counts,
        "cpu_s_per_image": per_image,
        "cpu_s_per_image_parts": {k: round(v * per_image, 4) for k, v in (result.get("cpu_parts") or {}).items()}
        if per_image else {},
    }


PARTS = ("Prefect", "limits", "ledger", "review", "archive (S3)", "provider HTTP", "other")


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"Latency {cfg['latency']} s a job, poll interval {cfg['poll_interval']} s, "
        f"max_parallel {cfg['max_parallel']}, moderation {'on' if cfg['moderation'] else 'off'}; "
        f"Prefect API: {cfg['prefect_api']}; {cfg['machine']}; "
        f"{cfg.get('background_load', 0)} busy-loop process(es) beside each run.",
        "",
        f"| workload ({'/'.join(PROVIDERS)}) | way | database | wall s | ceiling s | of ceiling | of polling ceiling "
        "| polls/job | violations | CPU s/image | peak RSS MB | vs baseline | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        split = "/".join(str(run["split"][p]) for p in PROVIDERS)
        polls = "/".join(str(run["polls_per_job"].get(p, "-")) for p in PROVIDERS)
        ratio = f"{run['vs_baseline']:.2f}x" if run.get("vs_baseline") else ""
        result = f"{run['status']}, {run.get('images')} images" + (f", {run['failed']} failed" if run.get("failed") else "")
        lines.append(
            f"| {run['workload']} {run['items']} ({split}) | {run['way']} | {run['database']} | {run['wall_s']} "
            f"| {run['ceiling_s']} | {run['fraction_of_ceiling']:.0%} | {run['vs_polling_ceiling']:.0%} | {polls} "
            f"| {run['violations_total']} | {run['cpu_s_per_image']} | {run['peak_rss_mb']} | {ratio} | {result} |")
    lines += ["", "Ceiling: the published limits' bound for the way measured, `max over providers of N_p x "
              f"max((1+p)/R, L/C)` with p polls a job ({report['polls_needed']} when polling every interval from "
              "the submit, 0 where a trusted callback ends the job, 1 held request for the long poll); 'of ceiling' "
              "= ceiling / wall; 'of polling ceiling' = the polling ceiling / wall (above 100%: fewer status "
              "requests than polling every interval needs: TAMS's and 触站AI's first poll waits as long as recent "
              "jobs took, or callbacks end the jobs). "
              "Violations: requests the emulators refused over a limit.", "",
              "CPU seconds per image, by where py-spy found the thread holding the GIL (`benchmarks/cpu.py`):",
              "", "| workload | way | database | " + " | ".join(PARTS) + " |", "|---|---|---|" + "---|" * len(PARTS)]
    for run in report["runs"]:
        parts = run.get("cpu_s_per_image_parts") or {}
        if parts:
            lines.append(f"| {run['workload']} {run['items']} | {run['way']} | {run['database']} | "
                         + " | ".join(str(parts.get(p, 0.0)) for p in PARTS) + " |")
    return "\n".join(lines)


def background_load(n: int) -> list[subprocess.Popen]:
    """N processes that keep a core busy each, until killed: the other work of a busy machine."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[300],
                        help="items of the mixed workload per run (none: skip it)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                        help="ways the flow runs the mixed workload")
    parser.add_argument("--tams-only", type=int, default=200, metavar="N",
                        help="items of the TAMS-only workload, polling and with callbacks (0: not run)")
    parser.add_argument("--sqlite-size", type=int, default=300, metavar="N",
                        help="items of the mixed workload polling on a SQLite server too (0: not run)")
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
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, specs, py-spy samples) for inspection")
    parser.add_argument("--background-load", type=int, default=0, metavar="N",
                        help="N busy-loop processes beside every measured run, as on a busy worker machine")
    args = parser.parse_args(argv)
    if args.database == "auto":
        args.database = "postgres" if binaries() is not None else "sqlite"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the sandbox and server on kill

    work = Path(tempfile.mkdtemp(prefix="imagegen-bench-"))
    state_dir, home = work / "sandbox", work / "prefect"
    home.mkdir()
    work.chmod(0o755)  # the PostgreSQL server runs as its own user
    server, cluster, receiver = None, None, None
    began = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - began:4.0f} s] {text}", flush=True)

    say(f"benchmark work dir {work}")
    try:
        state = launcher.up_on_free_ports(state_dir, latency=args.latency, buckets=(BUCKET,))
        if args.api_url:
            api = args.api_url
        else:
            if args.database == "postgres":
                cluster = Cluster(work / "postgres")
            server, api = start_server(home, cluster.start() if cluster else None)
        env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
               **({"IMAGEGEN_BENCH_KEEP_PROFILE": str(work)} if args.keep else {}),
               # Prefect's default level, as `imagegen run` has: the flow's INFO records cost CPU too
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO"}
        subprocess.run([str(BIN / "imagegen"), "sandbox", "register", "--state-dir", str(state_dir), "--block-name",
                        BLOCK], env=env, cwd=ROOT, check=True, capture_output=True)

        say("sandbox and Prefect server up, Blocks saved")
        receiver, receiver_url = start_receiver(env, work / "receiver.log")
        save_variants(api, receiver_url)
        database = "given" if args.api_url else args.database
        runs: list[dict[str, Any]] = []
        load = background_load(args.background_load)
        if load:
            say(f"{len(load)} busy-loop process(es) running beside every run")

        def measure(workload: Workload, side: str, mode: str, label: str, run_env: dict[str, str],
                    on: str) -> dict[str, Any]:
            name = f"bench-{label}-{side}-{mode}-{on}-{workload.items}"
            spec = workload.write_spec(work / f"{name}.yaml", name, BUCKET, block_name(mode), args.max_parallel,
                                       not args.no_moderation, credentials=BLOCK)
            way = "baseline" if side == "baseline" else f"flow {mode}"
            say(f"{way} ({on}): {label} {workload.items} items {workload.split} ...")
            before = emulator_counts(state)
            result = run_side(side, spec, run_env, state_dir, work / f"{name}.log")
            run = summarize(workload, result, before, emulator_counts(state), way=way, label=label, database=on)
            runs.append(run)
            say(f"  {result['wall_s']} s wall, {result['status']}")
            return run

        for size in args.sizes:
            workload = Workload.build(size, args.latency, args.poll_interval)
            flow = {mode: measure(workload, "flow", mode, "mixed", env, database) for mode in args.modes}
            if size in args.baseline_sizes:
                base = measure(workload, "baseline", "polling", "mixed", env, database)
                for run in flow.values():
                    run["vs_baseline"] = round(run["wall_s"] / base["wall_s"], 3)
        if args.tams_only:
            tams = Workload.build(args.tams_only, args.latency, args.poll_interval, providers=("tams",))
            for mode in ("polling", "callbacks"):
                measure(tams, "flow", mode, "tams-only", env, database)
        if args.sqlite_size and not args.api_url and args.database == "postgres":
            (work / "prefect-sqlite").mkdir()
            lite, lite_api = start_server(work / "prefect-sqlite")
            say("SQLite Prefect server up")
            try:
                lite_env = {**env, "PREFECT_HOME": str(work / "prefect-sqlite"), "PREFECT_API_URL": lite_api}
                subprocess.run([str(BIN / "imagegen"), "sandbox", "register", "--state-dir", str(state_dir),
                                "--block-name", BLOCK], env=lite_env, cwd=ROOT, check=True, capture_output=True)
                measure(Workload.build(args.sqlite_size, args.latency, args.poll_interval), "flow", "polling", "mixed",
                        lite_env, "sqlite")
            finally:
                stop(lite.pid, grace=20)

        report = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": {"latency": args.latency, "poll_interval": args.poll_interval, "max_parallel": args.max_parallel,
                       "moderation": not args.no_moderation, "background_load": args.background_load,
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
        for busy in locals().get("load") or []:
            busy.kill()
        if receiver is not None:
            stop(receiver.pid, grace=20)
        if server is not None:
            stop(server.pid, grace=20)
        if cluster is not None:
            cluster.stop()
        launcher.down(state_dir)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
