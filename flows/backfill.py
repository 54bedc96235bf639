"""The `backfill` flow: run a pipeline for every date of a range, each date its own flow run.

Prefect has no backfill of its own. This one reads each date's run manifest in S3 first and
skips the dates already complete, re-runs the missing and partly failed ones, refuses up front
when the estimated credits of the whole range exceed the cap, holds its own parallelism cap,
and ends with a table artifact per date. Each date runs through `run_deployment` when the
`run-pipeline` deployment exists, so the runs spread over every worker of the pool; as a
subflow of this run otherwise.
"""

from __future__ import annotations

import time
from datetime import date, timedelta
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import PrefectFuture

from blocks.archive import archive_bucket, read_json
from flows.progress import RunProgress, final_state
from flows.spec import PipelineSpec, load_spec, resolve_spec_path

DEPLOYMENT = "run-pipeline/run-pipeline"


class BackfillRefused(RuntimeError):
    """The range's estimated credits exceed the backfill's cap; nothing was run."""


def dates_between(start: date, end: date) -> list[date]:
    if end < start:
        raise ValueError(f"end {end} is before start {start}")
    return [start + timedelta(days=n) for n in range((end - start).days + 1)]


def manifest_status(spec: PipelineSpec, run_date: date) -> dict[str, Any] | None:
    """The run manifest of one date, if any run of it wrote one."""
    return read_json(archive_bucket(spec.archive.bucket, spec.archive.credentials),
                     spec.archive.manifest_key(spec.name, run_date))


def estimate_range(spec: PipelineSpec, dates: list[date]) -> float:
    """Credits the dates would cost (items already archived on a date cost nothing)."""
    from flows.pipeline import archived_before, estimate_plans, plan_items

    total, cache = 0.0, {}
    for run_date in dates:
        plans = [p for p in plan_items(spec, "", run_date, "") if archived_before(p) is None]
        per_provider, _ = estimate_plans(plans, cache)
        total += sum(per_provider.values())
    return round(total, 4)


def _deployment_id(name: str) -> str | None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return str(client.read_deployment_by_name(name).id)
        except ObjectNotFound:
            return None


@task(task_run_name="run-{run_date}")
def run_date_task(spec: str, run_date: date, deployment_id: str | None, key: str, name: str) -> dict[str, Any]:
    """Run one date: through the deployment (any worker) or as a subflow, named
    `<pipeline>-<date>`; report its manifest."""
    if deployment_id is not None:
        from prefect.deployments import run_deployment

        flow_run = run_deployment(deployment_id, parameters={"spec": spec, "run_date": run_date.isoformat()},
                                  idempotency_key=key, flow_run_name=f"{name}-{run_date}", tags=["backfill"])
        run_id, state_name = str(flow_run.id), flow_run.state.name if flow_run.state else "unknown"
    else:
        from flows.pipeline import run_pipeline

        state = run_pipeline(spec=spec, run_date=run_date, return_state=True)  # named <pipeline>-<date>
        run_id, state_name = str(state.state_details.flow_run_id), state.name
    manifest = manifest_status(load_spec(spec), run_date) or {}
    return {"date": run_date.isoformat(), "status": "done" if manifest.get("status") == "complete" else "failed",
            "credits": manifest.get("totals", {}).get("credits_this_run", 0.0), "flow_run_id": run_id,
            "state": state_name}


@flow(name="backfill", log_prints=True)
def backfill(spec: str, start: date, end: date, max_parallel: int = 2, max_credits: float | None = None,
             deployment: str | None = DEPLOYMENT) -> list[dict[str, Any]]:
    """Run `spec` for every date from `start` to `end`, skipping dates already complete."""
    from prefect.runtime import deployment as this_deployment  # `deployment` is the parameter
    from prefect.runtime import flow_run

    logger = get_run_logger()
    spec_path = str(resolve_spec_path(spec, confined=this_deployment.id is not None))
    parsed = load_spec(spec_path)
    name = parsed.name
    dates = dates_between(start, end)
    rows: dict[date, dict[str, Any]] = {}
    todo = []
    for run_date in dates:
        manifest = manifest_status(parsed, run_date)
        if manifest and manifest.get("status") == "complete":
            rows[run_date] = {"date": run_date.isoformat(), "status": "skipped", "credits": 0.0,
                              "flow_run_id": manifest.get("flow_run_id"), "state": "already complete"}
        else:
            todo.append(run_date)
    logger.info("backfill %s %s..%s: %d date(s) to run, %d already complete; estimating their credits",
                name, start, end, len(todo), len(dates) - len(todo))
    estimated = estimate_range(parsed, todo) if todo else 0.0
    if max_credits is not None and estimated > max_credits:
        raise BackfillRefused(f"{len(todo)} date(s) to run are estimated at {estimated} credits, above the cap "
                              f"of {max_credits}; nothing was run")
    deployment_id = _deployment_id(deployment) if deployment else None
    logger.info("backfill %s %s..%s: %d date(s) to run, %d already complete, estimated %s credits, via %s",
                name, start, end, len(todo), len(dates) - len(todo), estimated,
                f"deployment {deployment}" if deployment_id else "subflows")
    progress = create_progress_artifact(0.0, key=f"{_key(name)}-backfill-progress",
                                        description=f"Backfill of {name} {start}..{end}")
    tracker = RunProgress(f"backfill {name} {start}..{end}", len(todo), log=logger.info, unit="dates")
    running: dict[date, PrefectFuture] = {}
    finished = 0
    for run_date in todo:
        while sum(not f.wrapped_future.done() for f in running.values()) >= max_parallel:
            time.sleep(0.1)
        key = f"backfill:{flow_run.id}:{name}:{run_date.isoformat()}"
        running[run_date] = run_date_task.submit(spec_path, run_date, deployment_id, key, name)
        tracker.update(submitted=1)
        running[run_date].add_done_callback(lambda f: _count_date(f, tracker))
    for run_date, future in running.items():
        future.wait()
        result = future.result(raise_on_failure=False)
        rows[run_date] = result if isinstance(result, dict) else {
            "date": run_date.isoformat(), "status": "failed", "credits": 0.0, "flow_run_id": None,
            "state": f"{type(result).__name__}: {result}"[:200]}
        finished += 1
        update_progress_artifact(progress, 100.0 * finished / max(1, len(todo)))
    tracker.finish()
    table = [rows[d] for d in dates]
    create_table_artifact(table, key=f"{_key(name)}-backfill",
                          description=f"Backfill of **{name}** {start}..{end}: "
                                      f"{sum(r['status'] == 'done' for r in table)} done, "
                                      f"{sum(r['status'] == 'skipped' for r in table)} skipped, "
                                      f"{sum(r['status'] == 'failed' for r in table)} failed")
    return table


def _count_date(future: PrefectFuture, tracker: RunProgress) -> None:
    """Count a date in the backfill's progress as soon as its run ends."""
    try:
        result = final_state(future).result(raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001 - a count must never break the backfill
        result = exc
    ok = isinstance(result, dict) and result.get("status") == "done"
    tracker.update(done=int(ok), failed=int(not ok),
                   credits=float(result.get("credits") or 0.0) if isinstance(result, dict) else 0.0)


def _key(name: str) -> str:
    from flows.report import artifact_key

    return artifact_key(name)
