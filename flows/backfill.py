"""The `backfill` flow: run a pipeline for every date of a range, each date its own flow run.

Prefect has no backfill of its own. This one reads each date's run manifest in S3 first and
skips the dates already complete, re-runs the missing and partly failed ones, refuses up front
when the estimated credits of the whole range exceed a provider's cap, holds its own parallelism cap,
and ends with a table artifact per date. Each date runs through `run_deployment` when the
`run-pipeline` deployment exists, so the runs spread over every worker of the pool; as a
subflow of this run otherwise.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.exceptions import TerminationSignal
from prefect.futures import PrefectFuture
from prefect.states import Failed

from blocks.errors import BlockMissing
from flows.models import ItemPlan
from flows.storage import archive_bucket, read_json
from flows.paying import detach, paidcalls
from flows.paying.spent import Earlier, earlier_spend
from flows.pipeline import STOPPING_PATIENCE, estimate_plans, pipeline_name, plan_items, reusable, run_pipeline
from flows.running import oneline
from flows.running.tasks import ledger_of
from flows.running.progress import RunProgress, credits_text, each_in_its_unit, final_state
from flows.running.report import artifact_key
from flows.specs.spec import (PIPELINES_DIR, PipelineSpec, RunOverrides, SpecError, cap_mistake, load_spec,
                              resolve_spec_path)

DEPLOYMENT = "run-pipeline/run-pipeline"


FAIL_FAST = 2
"""Dates failed for one reason before running any item, with none done: the backfill stops
starting dates (every date would meet the same refusal)."""


class BackfillRefused(RuntimeError):
    """Nothing was run: the range's estimated credits exceed the cap, or an argument is off."""


class BackfillFailed(RuntimeError):
    """Some dates failed; `rows` is the per-date table (date, status, state, reason)."""

    def __init__(self, message: str, rows: list[dict[str, Any]]) -> None:
        super().__init__(message, rows)
        self.rows = rows

    def __str__(self) -> str:
        return str(self.args[0])


MAX_DATES = 3660  # ten years of days: a range past it is most likely a typo (`--end 2206-01-01`)


def dates_between(start: date, end: date) -> list[date]:
    """Every date from `start` to `end`, both included (`BackfillRefused` when `end` is earlier,
    or the range holds more than `MAX_DATES` dates: 0001-01-01 to 9999-12-31 was taken silently,
    and priced for minutes before anything was said)."""
    if end < start:
        raise BackfillRefused(f"the end {end} is before the start {start}: give an end on or after the start")
    if (days := (end - start).days + 1) > MAX_DATES:
        raise BackfillRefused(f"{start} to {end} is {days:,} dates, more than a backfill takes ({MAX_DATES:,}): "
                              "check the range, or split it into backfills of ten years or less")
    return [start + timedelta(days=n) for n in range(days)]


def manifest_status(spec: PipelineSpec, run_date: date) -> dict[str, Any] | None:
    """The run manifest of one date, if any run of it wrote one."""
    return read_json(archive_bucket(spec.archive.bucket, spec.archive.credentials),
                     spec.archive.manifest_key(spec.name, run_date))


def complete(spec: PipelineSpec, run_date: date, manifest: dict[str, Any] | None) -> bool:
    """Whether the date's last run archived every item the spec now lists, as it now reads (a
    complete manifest of a spec since given items, or edited, leaves the date to run again)."""
    if not manifest or manifest.get("status") != "complete":
        return False
    made = {(str(i.get("item")), str(i.get("request_id"))) for i in manifest.get("items") or [] if isinstance(i, dict)}
    return all((plan.item_id, plan.request.request_id) in made for plan in plan_items(spec, "", run_date, ""))


def estimate_dates(spec: PipelineSpec, dates: list[date]) -> tuple[dict[date, dict[str, float]],
                                                                    dict[date, dict[str, float]]]:
    """Credits each date would cost, per provider (items already archived on a date, and jobs
    paid for to be collected, cost nothing), and what its earlier runs spent, per provider, as
    its run counts them (`flows.paying.spent`)."""
    out, earlier, cache = {}, {}, {}
    for run_date in dates:
        plans = plan_items(spec, "", run_date, "")
        paid, spent = paid_before(plans)
        per_provider, _ = estimate_plans([p for p in plans if p.item_id not in paid], cache)
        out[run_date] = {provider: float(credits) for provider, credits in per_provider.items()}
        earlier[run_date] = dict(spent.spent)
    return out, earlier


def paid_before(plans: list[ItemPlan]) -> tuple[set[str], Earlier]:
    """The items of one date's `plans` its run does not pay for (archived by an earlier run, or
    paid for and to be collected), and what the date's earlier runs spent."""
    reused = reusable(plans)
    spent = earlier_spend(ledger_of(plans[0]), plans, reused) if plans else Earlier()
    return set(reused) | spent.paid, spent


class Pool:
    """The backfill's `max_credits`, one cap per provider in that provider's own unit, held on
    what the dates' runs were charged. Each date's run is started with a cap of its own per
    provider (`allot`): what is left of that provider's cap after the dates running and the
    estimates of the dates still waiting, and never above the spec's own cap. A date that was
    charged more than its estimate takes from that slack, and from then on every estimate of
    that provider is scaled by the highest charge/quote ratio seen; a date whose (scaled)
    estimate no longer fits is not started. Until each capped provider has charged a date, one
    date runs at a time (`parallel`): dates started together would each pay a call at a price
    none of them has seen. So the dates together are never charged more than a provider's cap,
    save what one paid call's answer takes past its date's cap before the higher price was
    seen (one a date running at once, once the price has been seen and rises again)."""

    def __init__(self, caps: dict[str, float], estimates: dict[date, dict[str, float]], spec_caps: dict[str, float],
                 one_number: bool = False, earlier: dict[date, dict[str, float]] | None = None) -> None:
        self.caps, self.estimates, self.spec_caps = caps, estimates, spec_caps
        self.earlier = earlier or {}  # per date, what its earlier runs spent (`estimate_dates`): its run counts them
        self.charged = dict.fromkeys(caps, 0.0)
        self.allotted: dict[date, dict[str, float]] = {}
        self.ratio = dict.fromkeys(caps, 1.0)  # per provider, the highest charge/estimate seen in a date's run
        self.quoted = {p for by in estimates.values() for p, c in by.items() if c > 0 and p in caps}
        self.priced: set[str] = set()  # capped providers a date's run was charged by: their price is seen
        self.label = {p: f"max_credits {c:g}" if one_number else f"max_credits {p}={c:g}" for p, c in caps.items()}

    def parallel(self, max_parallel: int) -> int:
        """How many dates may run at once now: one until every capped provider the dates are
        quoted for has charged a date, then `max_parallel`."""
        return max_parallel if self.quoted <= self.priced else 1

    def allot(self, run_date: date, waiting: list[date]) -> dict[str, float] | None:
        """This date's cap per provider; None (no cap from the pool) without a backfill cap.
        `PoolSpent` when what is left of a provider's cap does not cover its estimate. Every
        capped provider gets a cap, those this date is not quoted for too (an item priced at
        nothing may still pay): what is left of it, or `NO_ROOM` when nothing is."""
        if not self.caps:
            return None
        mine = self.estimates.get(run_date, {})
        left = {p: self._left(p, waiting) for p in self.caps}
        for provider, room in left.items():
            need = self.ratio[provider] * mine.get(provider, 0.0)
            if need > 0 and room + 1e-9 < need:
                raise PoolSpent(self._spent(provider, room, need))
        self.allotted[run_date] = {p: room for p, room in left.items() if room > 0}
        # A date's run holds its cap on the date's spend, earlier runs' included: what they were
        # charged is added to its share of the backfill's (a partly done date was refused).
        before = self.earlier.get(run_date, {})
        return {p: max(NO_ROOM, round(min(max(room, 0.0) + before.get(p, 0.0), self.spec_caps.get(p, float("inf"))), 4))
                for p, room in left.items()}

    def _left(self, provider: str, waiting: list[date]) -> float:
        later = self.ratio[provider] * sum(self.estimates.get(d, {}).get(provider, 0.0) for d in waiting)
        running = sum(a.get(provider, 0.0) for a in self.allotted.values())
        return self.caps[provider] - self.charged[provider] - running - later

    def _spent(self, provider: str, left: float, need: float) -> str:
        return (f"not started: the backfill's {self.label[provider]} leaves {max(0.0, left):g} credits for this "
                f"date, estimated at {need:g}" + (f" ({self.ratio[provider]:g}x the quote, as {provider} charged)"
                                                  if self.ratio[provider] > 1 else "")
                + f"; {self.charged[provider]:g} charged so far")

    def settle(self, run_date: date, row: dict[str, Any]) -> None:
        """The date's run is over: what its manifest says each provider charged counts (with no
        manifest of that run, its whole allotment: what it spent is not known), each provider's
        estimates are scaled from then on by the highest charge/quote ratio its run saw, and
        its allotment is free."""
        allotted = self.allotted.pop(run_date, {})
        spent = row.get("by_provider") or {}
        for provider in self.caps:
            mine = spent.get(provider, {})
            self.charged[provider] += float(mine.get("credits") or 0.0) if row.get("ran_items") \
                else allotted.get(provider, 0.0)
            self.ratio[provider] = max(self.ratio[provider], float(mine.get("ratio") or 1.0))
            if mine.get("credits"):
                self.priced.add(provider)


NO_ROOM = 0.0001
"""A date's cap for a provider the backfill has nothing left of (a run's cap is above 0): no
paid call of it fits."""


def provider_caps(max_credits: float | dict[str, float] | None, used: list[str]) -> dict[str, float]:
    """The backfill's cap per provider the spec uses, read as the spec's own `run.max_credits`
    is (`cap_mistake`): `BackfillRefused` for one number where it uses several providers (a sum
    of different units caps nothing) or for a cap written under a name no item uses."""
    if max_credits is None:
        return {}
    if (mistake := cap_mistake(max_credits, used, _cli_form)) is not None:
        raise BackfillRefused(f"max_credits {max_credits:g} is one number, but {mistake}"
                              if not isinstance(max_credits, dict) else f"max_credits {mistake}")
    if not isinstance(max_credits, dict):
        return {p: float(max_credits) for p in used}
    return {p: float(c) for p, c in max_credits.items() if p in used}


def _cli_form(providers: list[str]) -> str:
    return (f"--max-credits {','.join(f'{p}=100' for p in providers)} "
            f"(as a flow parameter: {json.dumps(dict.fromkeys(providers, 100))})")


def range_totals(estimates: dict[date, dict[str, float]]) -> dict[str, float]:
    """The dates' estimates added up per provider, each in its own unit."""
    total: dict[str, float] = {}
    for by in estimates.values():
        for provider, credits in by.items():
            total[provider] = total.get(provider, 0.0) + credits
    return {p: round(c, 4) for p, c in total.items()}


def over_caps(caps: dict[str, float], estimates: dict[date, dict[str, float]], one_number: bool) -> str | None:
    """Why the range's estimate is over a provider's cap, or None."""
    total = range_totals(estimates)
    over = [p for p, cap in caps.items() if total.get(p, 0.0) > cap]
    if not over:
        return None
    if one_number:
        return f"estimated at {total[over[0]]} credits, above the cap of {caps[over[0]]}"
    return "estimated above their caps: " + ", ".join(f"{p} {total[p]:g} (cap {caps[p]:g})" for p in over)


class PoolSpent(RuntimeError):
    """The backfill's cap, held on charges, cannot cover the next date's estimate."""


def _deployment_id(name: str) -> str | None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    if "/" not in name:
        raise BackfillRefused(f"--deployment {name!r} names no deployment: give it as <flow>/<deployment>, such as "
                              f"{DEPLOYMENT} (`prefect deployment ls` lists them)")
    with get_client(sync_client=True) as client:
        try:
            return str(client.read_deployment_by_name(name).id)
        except ObjectNotFound:
            return None


def workers_read(path: Path, logger: Any) -> None:
    """The dates run on workers, each in a clone of the repository: a warning for a spec they
    may not read (outside `pipelines/`: only a folder of their `IMAGEGEN_SPEC_ROOTS`, which may
    not be this machine's), and for one with changes git has not committed (the workers run the
    committed one)."""
    import subprocess

    from flows.specs import confine

    if not confine.inside(path, confine.spec_roots(PIPELINES_DIR)):
        logger.warning("%s is outside pipelines/ (and this machine's %s): the workers that run the dates read it "
                       "only from a folder of their %s, else each date fails SpecRefused; then move it into "
                       "pipelines/ (committed and pushed), or run the dates here with --local", path,
                       confine.SPEC_ROOTS, confine.SPEC_ROOTS)
        return
    try:
        changed = subprocess.run(["git", "status", "--porcelain", "--", str(path.resolve())], capture_output=True,
                                 text=True, cwd=PIPELINES_DIR.parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return  # no git here: nothing to compare with
    if changed:
        logger.warning("%s has changes not committed: the workers run the spec as committed in their clone, not "
                       "this one (items added here are not made, and the dates count as done); commit and push it, "
                       "or run the dates here with --local", path.name)


@task(task_run_name="run-{run_date}")
def run_date_task(spec: str, run_date: date, deployment_id: str | None, key: str, name: str,
                  local_spec: str, cap: dict[str, float] | None = None) -> dict[str, Any]:
    """Run one date: through the deployment (any worker) or as a subflow, named
    `<pipeline>-<date>`; report its manifest (read with `local_spec`, the spec's path here),
    and why it failed. Asked to stop (Ctrl-C, SIGHUP) before its run is made: not started."""
    if (stopping := paidcalls.stop_requested()) is not None:  # the task was submitted just before
        return unrun_row(run_date, "stopped", "not started", f"not started: {stopping}")
    if deployment_id is not None:
        from prefect.deployments import run_deployment

        parameters: dict[str, Any] = {"spec": spec, "run_date": run_date.isoformat()}
        if cap:
            parameters["overrides"] = {"max_credits": cap}
        flow_run = run_deployment(deployment_id, parameters=parameters, idempotency_key=key, timeout=0,
                                  flow_run_name=f"{name}-{run_date}", tags=["backfill"])
        run_id, state = str(flow_run.id), await_date_run(flow_run)
        if state is not None and state.is_cancelled() and state.message == NOT_STARTED:
            return unrun_row(run_date, "stopped", "Cancelled", f"not started: {paidcalls.stop_requested()}", run_id)
    else:
        state = run_pipeline(spec=spec, run_date=run_date, overrides=RunOverrides(max_credits=cap) if cap else None,
                             return_state=True)  # named <pipeline>-<date>
        run_id = str(state.state_details.flow_run_id)
    current = manifest_status(load_spec(local_spec), run_date)
    manifest = own_manifest(current, run_id)
    done = bool(manifest) and manifest.get("status") == "complete"
    replaced = manifest is None and state is not None and state.is_completed() and bool(current) and \
        current.get("status") == "complete"  # a later run of the date (another backfill's) wrote over it
    items = (manifest or {}).get("items", [])
    spent = spend_by_provider(manifest or {})
    return {"date": run_date.isoformat(), "status": "done" if done or replaced else "failed",
            "credits": "?" if replaced else credits_column(spent, manifest or {}), "flow_run_id": run_id,
            "paid_items": sum(1 for i in items if not i.get("reused") and i.get("credits")), "items": len(items),
            "state": state.name if state else "unknown",
            "reason": "" if done else (f"its manifest is now run {current.get('flow_run_id')}'s, a later run of the "
                                       "date; what this run was charged is not known here" if replaced else
                                       failure_reason(state, manifest)), "ran_items": manifest is not None,
            "by_provider": spent}


NOT_STARTED = "the backfill was stopped before a worker started this date's run"
WORKER_PATIENCE = 60.0  # seconds a date's run waits for a worker before the log asks whether one runs
DATE_POLL = 2.0


def await_date_run(flow_run: Any) -> Any:
    """The final state of a date's run made through the deployment. While it waits for a worker
    (Scheduled), a stop of the backfill (Ctrl-C, SIGHUP) cancels it: left, it would start and pay
    whenever a worker came, after the person stopped the backfill. One still waiting after
    `WORKER_PATIENCE` s is said once, naming the work pool a worker must poll."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    started, told = time.monotonic(), False
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run.id)
            state = run.state
            if state is not None and state.is_final():
                return state
            waiting = state is None or state.is_scheduled()
            if waiting and paidcalls.stop_requested() is not None:
                client.set_flow_run_state(run.id, Cancelled(message=NOT_STARTED))
                continue  # read again: a worker may have taken it meanwhile, which then runs to its end
            if waiting and not told and time.monotonic() - started > WORKER_PATIENCE:
                told = True
                get_run_logger().warning(
                    "%s has waited %.0f s for a worker: is one polling work pool %r? (`prefect worker start --pool "
                    "%s`; a Ctrl-C here cancels the dates no worker has started)", run.name,
                    time.monotonic() - started, run.work_pool_name, run.work_pool_name)
            time.sleep(DATE_POLL)


def own_manifest(manifest: dict[str, Any] | None, run_id: str) -> dict[str, Any] | None:
    """The date's manifest if the run `run_id` wrote it; None for an earlier run's (this run,
    killed or crashed, wrote none: what it spent is not known, and its whole cap counts)."""
    return manifest if manifest is not None and manifest.get("flow_run_id") == run_id else None


def credits_column(spent: dict[str, dict[str, float]], manifest: dict[str, Any]) -> float | str:
    """A date's credits for its row: the number where one provider charged, else each provider's
    in its own unit (`tams 12, tencent 2`): TAMS credits and Tencent calls do not add up."""
    charged = {p: s["credits"] for p, s in spent.items() if s["credits"]}
    if len(charged) > 1:
        return each_in_its_unit(charged)
    return manifest.get("totals", {}).get("credits_this_run", 0.0)


def spend_by_provider(manifest: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per provider, what a date's run was charged or may have been (its `spend`: charged +
    reserved) and the highest charge/quote ratio it saw; without `spend`, its items' credits."""
    out: dict[str, dict[str, float]] = {}
    for provider, spent in (manifest.get("spend") or {}).items():
        spent = spent or {}
        out[str(provider)] = {"credits": round((spent.get("charged") or 0.0) + (spent.get("reserved") or 0.0), 4),
                              "ratio": float(spent.get("ratio") or 1.0)}
    if "spend" not in manifest:
        for item in manifest.get("items") or []:
            if not item.get("reused") and item.get("credits"):
                mine = out.setdefault(str(item.get("provider") or "?"), {"credits": 0.0, "ratio": 1.0})
                mine["credits"] = round(mine["credits"] + float(item["credits"]), 4)
    return out


def failure_reason(state: Any, manifest: dict[str, Any] | None) -> str:
    """One line: the failed items of a date's manifest, else the run's own final message."""
    if manifest:
        failed = [f"{i['item']}: {i['error'].get('error', '')}" for i in manifest.get("items", []) if i.get("error")]
        if failed:
            return f"{len(failed)} item(s) failed: " + "; ".join(failed)[:300]
    message = (getattr(state, "message", None) or "").strip()
    return (message or f"the run ended {getattr(state, 'name', 'without a state')}")[:300]


def portable_spec(path: Path, deployed: bool) -> str:
    """The spec as a date's run reads it. A deployment's run starts on any worker, in a clone
    of its own: a spec of this checkout is named by its path inside the checkout, which every
    clone has (an absolute path names only this clone's copy and is refused there). A spec
    elsewhere (a folder of `IMAGEGEN_SPEC_ROOTS`, shared by the workers) keeps its path."""
    root = PIPELINES_DIR.parent.resolve()
    resolved = path.resolve()
    if deployed and resolved.is_relative_to(root):
        return resolved.relative_to(root).as_posix()
    return str(resolved)


def check_arguments(max_parallel: int, max_credits: float | dict[str, float] | None) -> None:
    """`BackfillRefused` for a parallelism below 1 (it would wait for ever), a cap that is not
    a finite number of credits, 0 or more (`nan` would switch it off), or one naming no provider."""
    from blocks import registry

    if max_parallel < 1:
        raise BackfillRefused(f"max_parallel is {max_parallel}: give 1 or more dates at once")
    caps = list(max_credits.items()) if isinstance(max_credits, dict) else [(None, max_credits)] \
        if max_credits is not None else []
    known = registry.entry_point_names()
    for provider, cap in caps:
        what = f"max_credits is {cap}" if provider is None else f"max_credits {provider}={cap}"
        if provider is not None and provider not in known:
            raise BackfillRefused(f"{what}: {provider!r} is no provider; name one of {', '.join(known)}")
        if not (isinstance(cap, int | float) and math.isfinite(cap) and cap >= 0):
            raise BackfillRefused(f"{what}: give a finite number of credits, 0 or more")


def unrun_row(run_date: date, status: str, state: str, reason: str, flow_run_id: str | None = None) -> dict[str, Any]:
    """The row of a date no run of this backfill paid for: skipped, not started, or whose task failed."""
    return {"date": run_date.isoformat(), "status": status, "credits": 0.0, "flow_run_id": flow_run_id,
            "paid_items": 0, "items": 0, "state": state, "reason": reason, "ran_items": False}


def backfill_name() -> str:
    """A backfill's run in the UI: `<pipeline>-backfill-<start>-to-<end>` (a random name was all
    its runs list showed of it, beside its dates' `<pipeline>-<date>`)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    return f"{pipeline_name('backfill')}-backfill-{params.get('start')}-to-{params.get('end')}"


TERMINATED = ("told to stop (SIGTERM or a cancel): no date starts from now; a date running in this process starts no "
              "more paid calls and collects the jobs already paid for, then the backfill ends. Run the same backfill "
              "again to finish: complete dates are skipped, and nothing is paid twice")


@flow(name="backfill", log_prints=True, flow_run_name=backfill_name)
def backfill(spec: str, start: date, end: date, max_parallel: int = 2,
             max_credits: float | dict[str, float] | None = None,
             deployment: str | None = DEPLOYMENT) -> list[dict[str, Any]]:
    """Run `spec` for every date from `start` to `end`, skipping dates already complete. Ends
    Failed (`BackfillFailed`, with the per-date table) when any date failed, or when refused
    (`BackfillRefused`, a bad spec): said in one line, no traceback.

    Args:
        spec: A pipeline name from `pipelines/` (e.g. `demo`); from a deployment, a path only
            under `IMAGEGEN_SPEC_ROOTS`.
        start: The first date to run.
        end: The last date to run (included).
        max_parallel: Dates running at once.
        max_credits: The cap on what the dates are charged, and on their estimate up front: one
            number where the spec uses one provider, else one per provider in its own unit
            (`{"tams": 500, "tencent": 50}`; Tencent counts billable calls).
        deployment: Run each date through this deployment when it exists; as a subflow otherwise.
    """
    try:
        return _backfill(spec, start, end, max_parallel, max_credits, deployment)
    except TerminationSignal:  # SIGTERM (`kill`, a service manager), or cancelled from the UI
        paidcalls.request_stop("the backfill was told to stop (SIGTERM or a cancel)")
        logger = get_run_logger()
        logger.warning(TERMINATED)
        with detach.sigterm_held(STOPPING_PATIENCE):  # the dates' calls on the wire: answered, recorded
            if left := paidcalls.wait_all_recorded(STOPPING_PATIENCE):
                logger.error("%d paid call(s) still unrecorded after %.0f s: the next run of their date finds them "
                             "`sending` and leaves them for a person (`imagegen ledger show`)", left, STOPPING_PATIENCE)
        raise
    except (BackfillFailed, BackfillRefused, SpecError, BlockMissing) as exc:
        get_run_logger().error("%s: %s", type(exc).__name__, exc)
        return Failed(message=f"{type(exc).__name__}: {exc}"[:1000], data=oneline.told(exc))  # type: ignore[return-value]


def _backfill(spec: str, start: date, end: date, max_parallel: int, max_credits: float | dict[str, float] | None,
              deployment: str | None) -> list[dict[str, Any]]:
    from prefect.runtime import deployment as this_deployment  # `deployment` is the parameter

    logger = get_run_logger()
    check_arguments(max_parallel, max_credits)
    path = resolve_spec_path(spec, confined=this_deployment.id is not None)
    parsed = load_spec(path)
    caps, one_number = provider_caps(max_credits, parsed.providers_used()), not isinstance(max_credits, dict)
    if caps and (free := [p for p in parsed.providers_used() if p not in caps]):
        logger.warning("backfill %s: max_credits names no cap for %s: only the spec's run.max_credits, if any, "
                       "holds what the dates pay it", parsed.name, ", ".join(free))
    dates = dates_between(start, end)
    rows: dict[date, dict[str, Any]] = {}
    for run_date in dates:
        manifest = manifest_status(parsed, run_date)
        if complete(parsed, run_date, manifest):
            rows[run_date] = unrun_row(run_date, "skipped", "already complete", "", manifest.get("flow_run_id"))
    todo = [d for d in dates if d not in rows]
    logger.info("backfill %s %s..%s: %d date(s) to run, %d already complete%s", parsed.name, start, end, len(todo),
                len(rows), "; estimating their credits" if todo else "")
    estimates, earlier = estimate_dates(parsed, todo) if todo else ({}, {})
    if (over := over_caps(caps, estimates, one_number)) is not None:
        raise BackfillRefused(f"{len(todo)} date(s) to run are {over}; nothing was run")
    deployment_id = _deployment_id(deployment) if deployment else None
    if deployment_id is None and deployment and deployment != DEPLOYMENT:  # named on purpose: not run elsewhere
        raise BackfillRefused(f"no deployment {deployment!r} on the Prefect server (`prefect deployment ls` lists "
                              "them, as <flow>/<deployment>); name one of them, or run the dates here with --local")
    if deployment_id is not None:
        workers_read(path, logger)
    logger.info("backfill %s %s..%s: %d date(s) to run, %d already complete, estimated %s, via %s",
                parsed.name, start, end, len(todo), len(rows), credits_text(range_totals(estimates)),
                f"deployment {deployment}" if deployment_id else "subflows")
    rows.update(run_dates(Dates(parsed.name, portable_spec(path, deployment_id is not None), str(path.resolve()),
                                todo, start, end, Pool(caps, estimates, parsed.budget(), one_number, earlier)),
                          deployment_id, max_parallel, logger))
    return finish(parsed.name, start, end, [rows[d] for d in dates])


@dataclass(frozen=True)
class Dates:
    """The dates one backfill runs, and what each date's run is given."""

    name: str
    spec: str
    local_spec: str
    todo: list[date]
    start: date
    end: date
    pool: Pool


def run_dates(dates: Dates, deployment_id: str | None, max_parallel: int, logger: Any) -> dict[date, dict[str, Any]]:
    """Run the dates, at most `max_parallel` at once; stop starting new ones once `FAIL_FAST`
    dates failed for one reason before doing anything (a refused spec, a missing Block: every
    date would meet it) and none succeeded."""
    from prefect.runtime import flow_run

    progress = create_progress_artifact(0.0, key=f"{artifact_key(dates.name)}-backfill-progress",
                                        description=f"Backfill of {dates.name} {dates.start}..{dates.end}")
    tracker = RunProgress(f"backfill {dates.name} {dates.start}..{dates.end}", len(dates.todo), log=logger.info,
                          unit="dates")
    running: dict[date, PrefectFuture] = {}
    rows: dict[date, dict[str, Any]] = {}
    waiting, stop_reason = list(dates.todo), None
    while waiting or running:
        if waiting and (stopping := paidcalls.stop_requested()) is not None:  # Ctrl-C, SIGHUP
            logger.warning("backfill %s: %s: %d date(s) not started", dates.name, stopping, len(waiting))
            rows.update((d, unrun_row(d, "stopped", "not started", f"not started: {stopping}")) for d in waiting)
            waiting = []
        if waiting and stop_reason is None and len(running) < dates.pool.parallel(max_parallel):
            run_date = waiting.pop(0)
            try:
                cap = dates.pool.allot(run_date, waiting)
            except PoolSpent as exc:
                logger.error("backfill %s: %s: %s", dates.name, run_date, exc)
                rows[run_date] = unrun_row(run_date, "failed", "not started", str(exc))
                continue
            key = f"backfill:{flow_run.id}:{dates.name}:{run_date.isoformat()}"
            running[run_date] = run_date_task.submit(dates.spec, run_date, deployment_id, key, dates.name,
                                                     dates.local_spec, cap)
            tracker.update(submitted=1)
            continue
        if stop_reason is not None and not running:
            break
        for run_date in [d for d, f in running.items() if f.wrapped_future.done()]:
            rows[run_date] = date_row(run_date, running.pop(run_date), tracker)
            dates.pool.settle(run_date, rows[run_date])
            update_progress_artifact(progress, 100.0 * len(rows) / max(1, len(dates.todo)))
        stop_reason = stop_reason or same_failure(rows.values())
        time.sleep(0.1)
    if stop_reason is not None and waiting:
        logger.error("backfill %s: stopped starting dates: %d date(s) failed before running any item, all with: "
                     "%s; fix that and run the backfill again (%d date(s) not started)", dates.name, FAIL_FAST,
                     stop_reason, len(waiting))
        for run_date in waiting:
            rows[run_date] = unrun_row(run_date, "failed", "not started",
                                       f"not started: earlier dates failed with: {stop_reason}")
    tracker.finish()
    return rows


_PATHS = re.compile(r"/[^\s:,;()'\"]+")


def same_failure(rows: Any) -> str | None:
    """The reason `FAIL_FAST` dates failed before running any item, while none succeeded."""
    rows = list(rows)
    if any(r["status"] == "done" for r in rows):
        return None
    reasons = Counter(_PATHS.sub("<path>", r["reason"]) for r in rows if r["status"] == "failed"
                      and not r.get("ran_items"))  # one refusal names each worker's own clone
    reason, count = next(iter(reasons.most_common(1)), ("", 0))
    return reason if count >= FAIL_FAST else None


def date_row(run_date: date, future: PrefectFuture, tracker: RunProgress) -> dict[str, Any]:
    """A finished date's row (a date whose task itself failed gets one too), counted."""
    result = final_state(future).result(raise_on_failure=False)
    row = result if isinstance(result, dict) else unrun_row(run_date, "failed", "Failed",
                                                            f"{type(result).__name__}: {result}"[:300])
    for provider, spent in (row.get("by_provider") or {}).items():  # before the count: its line shows them
        if spent.get("credits"):
            tracker.charged(provider, float(spent["credits"]))
    tracker.update(done=int(row["status"] == "done"), failed=int(row["status"] != "done"))
    return row


def finish(name: str, start: date, end: date, table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table artifact; `BackfillFailed` (the run ends Failed) when any date failed."""
    table = [{k: v for k, v in row.items() if k not in ("ran_items", "by_provider")} for row in table]
    counts = {s: sum(r["status"] == s for r in table) for s in ("done", "skipped", "failed", "stopped")}
    create_table_artifact(table, key=f"{artifact_key(name)}-backfill",
                          description=f"Backfill of **{name}** {start}..{end}: {counts['done']} done, "
                                      f"{counts['skipped']} skipped, {counts['failed']} failed"
                                      + (f", {counts['stopped']} not started (stopped)" if counts["stopped"] else ""))
    if counts["failed"] or counts["stopped"]:
        reasons = Counter(r["reason"] for r in table if r["status"] == "failed")
        failed = (f"{counts['failed']} of {len(table)} date(s) failed; most often: {reasons.most_common(1)[0][0]}"
                  if counts["failed"] else "")
        why = next((r["reason"].removeprefix("not started: ") for r in table if r["status"] == "stopped"), "")
        stopped = f"{counts['stopped']} date(s) not started: {why}" if counts["stopped"] else ""
        raise BackfillFailed("; ".join(part for part in (failed, stopped) if part), table)
    return table
