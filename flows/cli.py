"""`imagegen`: validate and run pipeline specs, and start or stop the local sandbox."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import Any
from datetime import date, datetime, timezone
from pathlib import Path

from flows.specs.spec import PipelineSpec, SpecError, load_spec, resolve_spec_path

DEFAULT_SERVER_DIR = Path(".prefect-server")
SHOWN_IDS = 5  # item ids `imagegen validate` shows (a catalogue's are made from its rows)


def cmd_validate(args: argparse.Namespace) -> int:
    """Check each spec, including every provider's offline rules; print all problems."""
    from flows.pipeline import plan_items, preflight

    status = 0
    for name in args.specs:
        path = resolve_spec_path(name)
        try:
            spec = load_spec(path)
            notes = preflight(plan_items(spec, "", utc_today(), ""), path)
        except SpecError as exc:
            print(exc, file=sys.stderr)
            status = 1
            continue
        images = sum(item.count for item in spec.items)
        print(f"OK {path}: pipeline {spec.name!r}, {len(spec.items)} item(s), {images} image(s)")
        print(f"  items: {first_ids(spec)}")
        for note in notes:
            print(f"note: {note}")
    return status


def utc_today() -> date:
    """The run date a run given none takes (`flows.pipeline`): today in UTC, not in this machine's zone."""
    return datetime.now(timezone.utc).date()


def _refused_before_start(args: argparse.Namespace) -> str | None:
    """Why a run or backfill cannot start, checked before Prefect starts (else None): an
    `IMAGEGEN_LEASE_SECONDS` that cannot be used, a backfill's end before its start."""
    from flows.backfill import BackfillRefused, dates_between
    from flows.paying.limits import LEASE_SECONDS
    from flows.paying.slots import LeaseSettingInvalid, configured_lease

    try:
        configured_lease(LEASE_SECONDS)
        if args.command == "backfill":
            dates_between(args.start, args.end)
    except (LeaseSettingInvalid, BackfillRefused) as exc:
        return str(exc)
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from blocks.errors import BlockMissing
    from flows.paying.detach import INTERRUPTED, interrupted, stop_on_interrupt
    from flows.pipeline import plan_items, preflight, run_pipeline, saved_blocks
    from flows.running.progress import terminal_line
    from flows.running.report import PipelineIncomplete, credits_of, format_table, summary_rows

    try:  # refuse a bad spec, provider rules included, before starting Prefect at all
        path = resolve_spec_path(args.spec)
        spec = load_spec(path)
        plans = plan_items(spec, "", args.run_date or utc_today(), "")
        for note in preflight(plans, path):
            print(f"note: {note}", file=sys.stderr)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 1
    shield_server(args)
    try:
        saved_blocks(spec, plans)
    except BlockMissing as exc:
        print(f"run not started: {exc}", file=sys.stderr)
        return 1
    from flows.paying.owner import name_taken

    if not args.take_over_name and (taken := name_taken(spec, path)) is not None:
        print(f"run not started: {taken}", file=sys.stderr)
        return 1
    with terminal_line(), stop_on_interrupt():
        state = run_pipeline(spec=args.spec, run_date=args.run_date, take_over_name=args.take_over_name,
                             return_state=True)
    outcome = state.result(raise_on_failure=False)
    manifest = outcome.manifest if isinstance(outcome, PipelineIncomplete) else outcome
    if not isinstance(manifest, dict):
        from flows.cli_errors import explain

        print(f"run failed: {explain(outcome) if isinstance(outcome, BaseException) else outcome}", file=sys.stderr)
    else:
        print(format_table(summary_rows(manifest)))
        totals = manifest["totals"]
        print(f"\n{manifest['status']}: {totals['images']} image(s) archived ({totals['approved']} approved, "
              f"{totals['rejected']} rejected), {totals['failed_items']} failed item(s), "
              f"{credits_of(manifest)}; manifest {manifest.get('manifest_uri')}")
    complete = isinstance(manifest, dict) and manifest["status"] == "complete"
    if interrupted():
        print(INTERRUPTED_DONE if complete else INTERRUPTED_RUN, file=sys.stderr)
        return 0 if complete else INTERRUPTED
    return 0 if complete else 1


INTERRUPTED_RUN = ("interrupted (Ctrl-C): items not done were stopped before paying; run the same command again to "
                   "finish them (nothing is paid twice)")
INTERRUPTED_DONE = "Ctrl-C came after every item was paid for: the run completed"


def cmd_estimate(args: argparse.Namespace) -> int:
    """Credits (and money where published) per provider and in total, before any paid call: of
    the items a run of the date would pay for (not those an earlier run archived or paid)."""
    from flows.pipeline import estimate_plans, plan_items, preflight

    path = resolve_spec_path(args.spec)
    run_date = args.run_date or utc_today()
    try:
        spec = load_spec(path)
        plans = plan_items(spec, "", run_date, "")
        notes = preflight(plans, path)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 1
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if (refusal := _run_refusal(spec, path)) is not None:
        print(f"note: a run would not start: {refusal}. Priced as a run with --take-over-name would pay",
              file=sys.stderr)
    paid, spent = _paid_before(plans, run_date)
    if paid:
        print(f"{len(paid)} of {len(plans)} item(s) archived or paid for by an earlier run of {run_date}: not paid "
              "again, not priced")
        plans = [plan for plan in plans if plan.item_id not in paid]
        if not plans:
            print(f"nothing to pay: a run of {run_date} sends no paid call")
            return 0
    offline: dict[str, str] = {}
    _, rejected = estimate_plans(plans, offline=offline)
    for item, error in rejected.items():
        print(f"{item}: refused by the provider while pricing: {error['message']}", file=sys.stderr)
    unpriced = sorted({plan.provider for plan in plans if plan.estimate is None and plan.item_id not in rejected})
    for provider, why in sorted(offline.items()):
        how = ("it publishes no formula, so its items are not priced" if provider in unpriced else
               "priced by its published formula instead")
        print(f"{provider}: could not ask the provider ({why}); {how}", file=sys.stderr)
    rows = _priced_rows(plans)
    over = _print_rows(rows, spec.budget(), spent)
    return 1 if over or unpriced else 0


def _run_refusal(spec: PipelineSpec, path: Path) -> str | None:
    """Why `imagegen run` would refuse this spec's `name:` (another spec file's, or its ledgers
    moved), or None; None too where the archive cannot be read (`_paid_before` says so)."""
    from flows.paying.owner import name_taken

    try:
        return name_taken(spec, path)
    except Exception:  # noqa: BLE001 - unreadable archive: told once, by _paid_before
        return None


def _priced_rows(plans: list) -> dict[str, dict]:  # noqa: ANN001 - ItemPlans
    """Per provider: its priced items, credits (with a separate paid upscale), money, the
    estimates' sources and notes."""
    rows: dict[str, dict] = {}
    for plan in plans:
        est = plan.estimate
        if est is None:
            continue
        row = rows.setdefault(plan.provider, {"items": 0, "credits": 0.0, "money": 0.0, "currency": est.currency,
                                              "sources": set()})
        row["items"] += 1
        row["credits"] += est.credits + plan.refine_credits
        row["money"] += est.money or 0.0
        row["sources"].add(est.source)
        if est.note:
            row.setdefault("notes", set()).add(est.note)
    return rows


def _print_rows(rows: dict[str, dict], budget: dict[str, float], spent: dict[str, float] | None) -> bool:
    """Print each provider's row, and the total where there is one provider; True when a
    provider's cap is passed (by its estimate and what earlier runs of the date spent)."""
    from blocks import PROVIDERS

    over = False
    for provider, row in sorted(rows.items()):
        money = f", {row['money']:.4f} {row['currency']}" if row["currency"] else ""
        passed, verdict = _against_cap(budget.get(provider), row["credits"], _of(spent, provider))
        over, row["verdict"] = over or passed, verdict  # the total's line says it again
        print(f"{provider}: {row['items']} item(s), {row['credits']:.2f} {PROVIDERS[provider].credit_unit}{money} "
              f"(from the provider's {'/'.join(sorted(row['sources']))} estimate{'; ' + verdict if verdict else ''})")
        for note in sorted(row.get("notes", ())):
            print(f"  note: {note}")
    if len(rows) == 1:
        (provider, row), = rows.items()
        verdict = row["verdict"]
        print(f"total: {row['credits']:.2f} {PROVIDERS[provider].credit_unit}" + (f" ({verdict})" if verdict else ""))
    elif rows:
        print("no total: each provider counts in its own unit")
    return over


def _of(spent: dict[str, float] | None, provider: str) -> float | None:
    return None if spent is None else spent.get(provider, 0.0)


def _against_cap(cap: float | None, credits: float, before: float | None) -> tuple[bool, str]:
    """Whether `credits` to pay, after `before` spent by earlier runs of the date (None: not
    known), pass `cap` (as the run counts them), and the words for it ("" with no cap)."""
    if cap is None:
        return False, ""
    over = credits + (before or 0.0) > cap
    if before is None:
        return over, (f"run.max_credits {cap}: {'OVER' if over else 'within'} for these items alone; what earlier runs "
                      "of this date spent, which the run counts too, is not known")
    earlier = f", {before:.2f} of it spent by earlier runs of this date" if before else ""
    return over, f"run.max_credits {cap}{earlier}: {'OVER' if over else 'within'}"


def _paid_before(plans: list, run_date: date) -> tuple[set[str], dict[str, float] | None]:  # noqa: ANN001
    """The items of `plans` a run of `run_date` would not pay for, and what earlier runs of the
    date spent per provider, which the run's cap counts too (`flows.backfill.paid_before`); no
    item and None, said so, where the archive or the ledger cannot be read."""
    from flows.backfill import paid_before
    from flows.cli_errors import storage_fix

    try:
        paid, earlier = paid_before(plans)
    except Exception as exc:  # noqa: BLE001 - pricing goes on without what the archive would say
        why = storage_fix(exc) or f"{type(exc).__name__}: {exc}"
        print(f"note: what earlier runs of {run_date} archived is not known ({why}); every item is priced",
              file=sys.stderr)
        return set(), None
    return paid, {provider: credits for provider, credits in earlier.spent.items() if credits}


def first_ids(spec: PipelineSpec) -> str:
    """The spec's first `SHOWN_IDS` item ids, `, ...` after them where it has more."""
    ids = [spec.item_id(n) for n in range(min(len(spec.items), SHOWN_IDS))]
    return ", ".join(ids) + (", ..." if len(spec.items) > SHOWN_IDS else "")


def _no_such_item(spec: PipelineSpec, item: str) -> str | None:
    """Why `item` is none of the spec's items (with the nearest id), else None."""
    ids = [spec.item_id(n) for n in range(len(spec.items))]
    if item in ids:
        return None
    near = difflib.get_close_matches(item, ids, n=1)
    return f"{spec.name} has no item {item!r}" + (f": did you mean {near[0]!r}?" if near else
                                                  f"; its items: {first_ids(spec)}")


def cmd_ledger(args: argparse.Namespace) -> int:
    """Show a run date's ledger, or settle an item whose submit may have reached the provider."""
    from flows.paying.ledger import JobLedger, State, Step
    from flows.paying.spent import carried
    from flows.running.report import format_table

    try:
        spec = load_spec(resolve_spec_path(args.spec))
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.action == "resolve" and args.item is not None and (unknown := _no_such_item(spec, args.item)):
        print(unknown, file=sys.stderr)  # before S3 is asked: `../../x` waited out six tries, then blamed S3
        return 1
    ledger = JobLedger(spec.archive, spec.name, args.run_date)
    if args.action == "show":
        rows = [{"item": r.item_id, "provider": r.provider,  # an item moved to another keeps its first's record too
                 "step": r.step.value + (f" #{r.index}" if r.index else ""), "state": r.state.value,
                 "attempt": r.attempt, "request_id": r.request_id, "job_id": r.job_id or "-",
                 "reason": (r.reason or "")[:100]} for r in ledger.records()]
        print(format_table(rows) if rows else f"no ledger records for {spec.name} on {args.run_date}")
        return 0
    if args.item is None or (args.job_id is None) == (not args.not_sent):
        print("resolve needs ITEM and exactly one of --job-id J or --not-sent", file=sys.stderr)
        return 2
    step = Step(args.step)
    record = ledger.get(args.item, step, args.index if step is Step.REFINE else None)
    if record is None or record.state not in (State.UNKNOWN, State.SENDING, State.SUBMITTED):
        state = record.state.value if record else "no record"
        print(f"{args.item} ({step.value}) is {state}: only an unknown, interrupted sending or submitted record "
              "is resolved by hand", file=sys.stderr)
        return 1
    if args.job_id is not None and step is Step.REFINE:
        print("a paid upscale has no job id to resume; resolve it with --not-sent, or leave it", file=sys.stderr)
        return 2
    if args.job_id is not None and (refused := _not_this_items_job(ledger, args, record)) is not None:
        print(refused, file=sys.stderr)  # before the record is moved
        return 1
    if args.not_sent and (kept := ledger.unnamed_results(record)):
        print(f"{args.item} ({step.value}) was sent and answered: {len(kept)} image(s) of its answer are kept in S3 "
              f"under its request {record.request_id} (first: {kept[0]}). Not marked not sent (the next run would pay "
              "again); run the date again, which reads them back", file=sys.stderr)
        return 1
    if _claim_held(spec, args.run_date):
        print(_claim_refusal(spec, ledger, args), file=sys.stderr)
        return 1
    if not args.run_ended and (going := _run_going(spec, ledger, args)) is not None:
        print(going, file=sys.stderr)
        return 1
    paid = {"charged_before": carried(record, record.estimate or 0.0)} if record.state is State.SUBMITTED else {}
    if record.state in (State.SENDING, State.SUBMITTED):  # a job paid for stays counted in the date's spend
        record = ledger.move(record, State.UNKNOWN, reason="the run stopped while sending it" if record.state is
                             State.SENDING else f"a person: {record.provider} does not know job {record.job_id}")
    if args.not_sent:
        ledger.move(record, State.REFUSED, reason="resolved by a person: the provider has no such job", **paid)
        kept = f" (job {record.job_id}, paid for, stays counted against run.max_credits)" if paid else ""
        print(f"{args.item}: marked not sent; the next run submits it{kept}")
    else:
        ledger.move(record, State.SUBMITTED, job_id=args.job_id, reason="resolved by a person: job found")
        print(f"{args.item}: job {args.job_id} recorded; the next run polls it and archives its images")
    return 0


def _claim_held(spec: PipelineSpec, run_date: date) -> bool:
    """Whether a run of `spec` holds `run_date`'s claim (`flows.paying.claim`) on the Prefect
    server now, expired leases freed first where this process frees them: held, a run is alive
    and may be paying. Free says less: the live run may use another server, or hold answers to
    calls sent before it lost its claim. False when it cannot tell (no such claim on this
    server, no answer): the manifest check decides then."""
    from flows.paying.claim import claim_name
    from flows.paying.slots import api_client, reclaim_expired

    try:
        reclaim_expired(force=True)
        limit = api_client().read_global_concurrency_limit_by_name(claim_name(spec.name, run_date))
    except Exception:  # noqa: BLE001 - no such claim, no answer, or one this cannot read
        return False
    return limit.active_slots > 0


def _claim_refusal(spec: PipelineSpec, ledger: Any, args: argparse.Namespace) -> str:
    """Why `resolve` waits, `--run-ended` or not: a run holds the date's claim right now."""
    from flows.paying.claim import claim_name
    from flows.paying.limits import LEASE_SECONDS
    from flows.paying.slots import configured_lease

    note = ledger.read_claim_note() or {}
    who = (f"flow run {note.get('flow_run_name') or '?'} ({note['flow_run_id']}), started "
           f"{note.get('started_at') or '?'}, " if note.get("flow_run_id") else "a run ")
    name = claim_name(spec.name, args.run_date)
    return (f"{who}holds the claim of {spec.name} for {args.run_date} on the Prefect server: it is running and may "
            f"still be paying for {args.item}, and a record resolved under it can be paid again. Resolve once it has "
            f"ended (a killed run's claim frees itself within {configured_lease(LEASE_SECONDS):.0f} s of its last "
            f"renewal). If `imagegen limits show --leases <the server's PREFECT_HOME>/concurrency_leases` says {name} "
            f"is held by no live lease, `imagegen limits reset {name}` frees it")


def _run_going(spec: PipelineSpec, ledger: Any, args: argparse.Namespace) -> str | None:
    """Why resolving now could pay twice: the date's last run to take its claim wrote no manifest
    yet (it is still running, and may be paying for the item, or it was killed). None when that
    run ended, or no run ever took the claim."""
    from flows.storage import archive_bucket, read_json

    note = ledger.read_claim_note() or {}
    if not note.get("flow_run_id"):
        return None
    manifest = read_json(archive_bucket(spec.archive.bucket, spec.archive.credentials),
                         spec.archive.manifest_key(spec.name, args.run_date))
    if isinstance(manifest, dict) and manifest.get("flow_run_id") == note["flow_run_id"]:
        return None
    return (f"flow run {note.get('flow_run_name') or '?'} ({note['flow_run_id']}) of {spec.name} for {args.run_date}, "
            f"started {note.get('started_at') or '?'}, wrote no manifest: while it runs it may still be paying for "
            f"{args.item}, and a record resolved under it can be paid again. Resolve once it has ended; if it has "
            "(killed, or it lost its claim or could not write its manifest: its log says), add --run-ended")


JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")  # the providers' ids: digits (TAMS, Tencent), hex (触站AI)


def _not_this_items_job(ledger: Any, args: argparse.Namespace, found: Any) -> str | None:
    """Why `--job-id` is not recorded for the item, or None: an id that is no provider's, a job
    another item's record names (its image would be archived twice, this item's paid job never),
    or a paid job of this record (`found`, submitted) replaced without `--replace-job`."""
    from flows.paying.ledger import State

    if not JOB_ID.fullmatch(args.job_id):
        return (f"--job-id {args.job_id!r} is not a job id (letters, digits, '-' and '_', at most 128); copy it "
                "from the provider console")
    owner = next((r for r in ledger.records() if r.job_id == args.job_id and r.item_id != args.item), None)
    if owner is not None:
        return (f"job {args.job_id} is item {owner.item_id}'s ({owner.step.value}, {owner.state.value}): recorded for "
                f"{args.item} too, one image would be archived as both and {args.item}'s own job never; find "
                f"{args.item}'s job by its prompt and seed (`imagegen ledger show`)")
    if found.state is State.SUBMITTED and found.job_id and found.job_id != args.job_id and not args.replace_job:
        return (f"{args.item}'s record is submitted as job {found.job_id}, paid for: the next run polls it. To record "
                f"{args.job_id} instead (the provider does not know {found.job_id}: a mistyped id), add --replace-job")
    return None


def account_mistake(pair: str) -> str | None:
    """Why `--account PROVIDER=BLOCK` names no account limits can be applied for (else None):
    it created nothing for an unknown provider, and `imagegen:tams::rate:api` for a missing Block."""
    from blocks import PROVIDERS

    provider, equals, block = pair.partition("=")
    if provider not in PROVIDERS:
        return f"no provider {provider!r} (one of {', '.join(sorted(PROVIDERS))}); give PROVIDER=BLOCK, such as tams=prod"
    if not equals or not re.fullmatch(r"[a-z0-9-]+", block):
        return ("give PROVIDER=BLOCK, the name of a saved Block (lowercase letters, digits and dashes), such as "
                f"{provider}=prod")
    return None


def cmd_limits(args: argparse.Namespace) -> int:
    from deployments.limits import apply_limits, reset_limit
    from deployments.limits import limits_in_use

    if args.action == "reset":
        if not args.name:
            print("reset needs the limit's NAME (see `imagegen limits show`)", file=sys.stderr)
            return 2
        if not args.yes:
            if not sys.stdin.isatty():
                print(f"reset asks before it frees the slots of {args.name}, and no terminal answers here: add --yes "
                      "once you know no run holds one", file=sys.stderr)
                return 2
            answer = input(f"free every slot of {args.name}? Only do this when no run holds one (a killed run on a "
                           "server without durable leases); a live job would then run beside a new one. [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing changed")
                return 1
        from prefect.exceptions import ObjectNotFound

        try:
            print(f"{args.name}: {reset_limit(args.name)} slot(s) freed")
        except ObjectNotFound:
            print(f"no limit named {args.name} on the Prefect server (`imagegen limits show` lists them)",
                  file=sys.stderr)
            return 1
        return 0

    if args.action == "apply":
        accounts = None
        if args.account:
            accounts = {}
            for pair in args.account:
                if (wrong := account_mistake(pair)) is not None:
                    print(f"imagegen limits apply: --account {pair}: {wrong}", file=sys.stderr)
                    return 2
                provider, _, block = pair.partition("=")
                accounts.setdefault(provider, []).append(block)
        for name, (limit, decay) in apply_limits(accounts).items():
            print(f"applied {name}: " + (f"rate {decay}/s" if decay else f"{limit} in flight"))
        return 0
    leases = Path(args.leases) if args.leases else local_lease_storage()
    if args.leases and not leases.is_dir():
        print(f"--leases {args.leases}: no such folder; give the server's PREFECT_HOME/concurrency_leases",
              file=sys.stderr)
        return 2
    rows = limits_in_use(leases)
    for row in rows:
        kind = f"rate {row['slot_decay_per_second']}/s" if row["slot_decay_per_second"] else f"limit {row['limit']}"
        orphans = (f", {row['unleased']} held by no live lease (free: imagegen limits reset {row['name']})"
                   if row.get("unleased") else "")
        print(f"{row['name']}: {kind}, active slots {row['active_slots']}{orphans}"
              + ("" if row["active"] else " (inactive)"))
    if leases is None:
        print("(leases not readable here: --leases <the server's PREFECT_HOME>/concurrency_leases shows "
              "which slots no live lease holds)")
    return 0


def local_lease_storage() -> Path | None:
    """The lease folder of the server this command talks to, where it is on this machine: the
    temporary server's (in this Prefect home, where every temporary server of it keeps its
    leases) or the `imagegen server up` server's this shell points at; else None."""
    from prefect.settings import get_current_settings

    from deployments import server

    if not get_current_settings().api.url:  # set in the environment or in a Prefect profile
        return get_current_settings().home / "concurrency_leases"
    state = server.ServerState.load(DEFAULT_SERVER_DIR)
    if state is None or get_current_settings().api.url not in (state.api_url, state.local_url):
        return None
    return state.home / "concurrency_leases"


def credit_caps(text: str) -> float | dict[str, float]:
    """`--max-credits`: one number, or one per provider (`tams=500,tencent=50`)."""
    how = "give a number (500) or one per provider (tams=500,tencent=50)"
    try:
        if "=" not in text:
            return float(text)
        caps: dict[str, float] = {}
        for part in text.split(","):
            provider, _, cap = (piece.strip() for piece in part.partition("="))
            if not provider or provider in caps:
                why = f"{provider} named twice" if provider else f"{part.strip() or 'an empty part'} names no provider"
                raise argparse.ArgumentTypeError(f"{text!r}: {why}; {how}")
            caps[provider] = float(cap)
        return caps
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {how}") from None


def cmd_backfill(args: argparse.Namespace) -> int:
    """Run a spec for every date of a range; dates already complete are skipped."""
    from blocks.errors import BlockMissing
    from flows.backfill import BackfillFailed, BackfillRefused, backfill, check_arguments, provider_caps
    from flows.pipeline import plan_items, saved_blocks
    from flows.paying.detach import INTERRUPTED, interrupted, stop_on_interrupt
    from flows.running.progress import terminal_line
    from flows.running.report import format_table

    try:
        check_arguments(args.max_parallel, args.max_credits)
        spec = load_spec(args.spec)
        provider_caps(args.max_credits, spec.providers_used())
    except (SpecError, BackfillRefused) as exc:
        print(exc, file=sys.stderr)
        return 1
    shield_server(args)
    try:
        saved_blocks(spec, plan_items(spec, "", args.start, ""))  # what every date needs, before any starts
    except BlockMissing as exc:
        print(f"backfill not started: {exc}", file=sys.stderr)
        return 1
    with terminal_line(), stop_on_interrupt():
        state = backfill(spec=args.spec, start=args.start, end=args.end, max_parallel=args.max_parallel,
                         max_credits=args.max_credits, deployment=None if args.local else args.deployment,
                         return_state=True)
    rows = state.result(raise_on_failure=False)
    status = 0
    if isinstance(rows, BackfillFailed):
        print(format_table(rows.rows))
        print(f"\nbackfill failed: {rows}", file=sys.stderr)
        status = 1
    elif isinstance(rows, (BackfillRefused, SpecError)):
        print(f"backfill not started: {rows}", file=sys.stderr)
        status = 1
    elif isinstance(rows, BaseException):
        print(f"backfill failed: {type(rows).__name__}: {rows}", file=sys.stderr)
        status = 1
    else:
        print(format_table(rows))
    if interrupted():
        print("interrupted (Ctrl-C): dates not done were stopped before paying; run the same backfill again to finish "
              "them (dates done are skipped, nothing is paid twice)", file=sys.stderr)
        return INTERRUPTED
    return status


def cmd_setup_server(args: argparse.Namespace) -> int:
    from deployments.setup import SetupRefused, setup_server

    try:
        for line in setup_server(args.pool, repository=args.repository, branch=args.branch):
            print(line)
    except SetupRefused as exc:
        print(f"setup-server: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    """A local Prefect server for bulk runs: durable leases, PostgreSQL where installed."""
    from deployments import server

    root = Path(args.dir)
    if args.action == "down":
        print("server stopped (its data is kept)" if server.down(root) else f"no server state in {root}")
        return 0
    if args.action == "status":
        state = server.ServerState.load(root)
        alive = server.running(state)
        print(f"server {'running' if alive else 'stopped'}" + (f" on {state.database}: export PREFECT_API_URL="
                                                               f"{state.api_url}" if state and alive else ""))
        return 0 if alive else 1
    try:
        state = server.up(root, port=args.port, database=args.database, host=args.host)
    except (server.ServerError, RuntimeError) as exc:
        print(f"server not started: {exc}", file=sys.stderr)
        return 1
    print(f"Prefect server up on {state.database}, leases on disk in {state.home}; use it with:\n"
          f"export PREFECT_API_URL={state.api_url}\nIts UI: {state.api_url.removesuffix('/api')}")
    import os

    if args.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        print(f"warning: it listens on {args.host} without PREFECT_SERVER_API_AUTH_STRING: anyone who reaches the port "
              "can read its Blocks (provider keys) and start runs; set that (user:password) before `server up`, or "
              "keep it behind a firewall", file=sys.stderr)
    return 0


def cmd_callbacks(args: argparse.Namespace) -> int:
    """Receive provider callbacks (see `flows.paying.callbacks`) for the Prefect server in PREFECT_API_URL."""
    import os

    from flows.paying.callbacks import serve

    if not os.environ.get("PREFECT_API_URL"):
        print("callbacks not served: set PREFECT_API_URL to the Prefect server the workers use (a run's own "
              "temporary server cannot be reached from here; `imagegen server up` starts a lasting one)",
              file=sys.stderr)
        return 1
    print(f"receiving callbacks on http://{args.host}:{args.port}/v1/heard/...; put its public URL in the provider "
          "Blocks (触站AI `callback`, TAMS `notify_url`)", flush=True)
    serve(args.host, args.port)
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from sandbox import launcher

    state_dir = Path(args.state_dir)
    nothing = (f"no sandbox state in {state_dir.resolve()} (a sandbox keeps it in the folder it was started from, "
               "`.sandbox`: run this there, or give that folder as --state-dir)")
    try:
        if args.action == "down":
            print("sandbox stopped" if launcher.down(state_dir) else nothing)
            return 0
        if args.action == "status":
            state = launcher.running(state_dir)
            where = ", ".join(f"{name} {state.url(name)}" for name in state.providers) if state else ""
            print(f"sandbox running: {where}, S3 {state.s3_url}" if state else
                  "sandbox stopped" if launcher.SandboxState.load(state_dir) else f"sandbox stopped: {nothing}")
            return 0 if state else 1
        if args.action == "register":
            state = launcher.SandboxState.load(state_dir)
            if state is None:
                print(f"{nothing}; or start one: `imagegen sandbox up`", file=sys.stderr)
                return 1
            print(f"registered Blocks: {', '.join(launcher.register_blocks(state, args.block_name))}")
            _apply_sandbox_limits(state, args.block_name)
            return 0
        return _sandbox_up(args, state_dir)
    except launcher.SandboxError as exc:
        print(f"sandbox {args.action}: {exc}", file=sys.stderr)
        return 1


def _sandbox_up(args: argparse.Namespace, state_dir: Path) -> int:
    """Start the sandbox, or reuse the one running in `state_dir` (its ports and keys, which
    Blocks saved earlier name, stay as they are); then save its Blocks and limits here."""
    from sandbox import launcher

    state = launcher.running(state_dir)
    if state is not None:
        print(f"sandbox already running (its ports and keys kept; `imagegen sandbox down` first for a new one): "
              f"{', '.join(f'{name} emulator {state.url(name)}' for name in state.providers)}, S3 {state.s3_url}")
    else:
        options = {"latency": args.latency, "buckets": tuple(args.bucket or launcher.DEFAULT_BUCKETS)}
        if args.free_ports:
            state = launcher.up_on_free_ports(state_dir, fixed=dict(args.port or []), **options)
        else:
            state = launcher.up(state_dir, ports=dict(args.port or []), s3_port=args.s3_port, **options)
        print(f"sandbox up: {', '.join(f'{name} emulator {state.url(name)}' for name in state.providers)}, "
              f"S3 (SeaweedFS) {state.s3_url}, buckets {', '.join(state.buckets)}")
    if not args.no_register:
        try:
            names = launcher.register_blocks(state)
        except Exception:
            launcher.down(state_dir)
            raise
        print(f"registered Blocks: {', '.join(names)}")
        _apply_sandbox_limits(state, launcher.BLOCK_NAME)
    return 0


def port_number(text: str) -> int:
    """A TCP port, 1-65535 (an argparse type)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def provider_port(text: str) -> tuple[str, int]:
    """`PROVIDER=PORT` for a sandbox emulator (an argparse type)."""
    from sandbox.accounts import emulators

    provider, sep, port = text.partition("=")
    if not sep or provider not in emulators():
        raise argparse.ArgumentTypeError(f"{text!r}: give PROVIDER=PORT with PROVIDER one of {', '.join(emulators())}")
    return provider, port_number(port)


def _apply_sandbox_limits(state, block_name: str) -> None:  # noqa: ANN001 - a SandboxState
    from deployments.limits import apply_limits

    applied = apply_limits({provider: [block_name] for provider in state.providers})
    print(f"applied provider limits: {', '.join(applied)}")


def _version() -> str:
    """The installed distribution's version ("unknown" where the project is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imagegen-pipelines")
    except PackageNotFoundError:
        return "unknown"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagegen", description=__doc__)
    p.add_argument("--version", action="version", version=f"imagegen-pipelines {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_spec_commands, _date_commands, _service_commands):
        add(sub)
    return p


def _command_parser(top: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of `imagegen COMMAND`."""
    for action in top._actions:  # noqa: SLF001 - argparse keeps its subparsers there, and only there
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return action.choices[command]
    return top


def _spec_commands(sub: Any) -> None:
    """validate, run, estimate: what a spec is and does."""
    v = sub.add_parser("validate", help="check spec files; exit 1 on any error")
    v.add_argument("specs", nargs="+", metavar="SPEC")
    v.set_defaults(func=cmd_validate)
    r = sub.add_parser("run", help="run a pipeline spec now")
    r.add_argument("spec", metavar="SPEC", help="a path, or a name in pipelines/")
    r.add_argument("--run-date", type=day, default=None, metavar="YYYY-MM-DD")
    r.add_argument("--take-over-name", action="store_true",
                   help="this spec replaces another spec file that archived under the same name")
    r.set_defaults(func=cmd_run)
    e = sub.add_parser("estimate", help="print the credits a spec will cost, per provider")
    e.add_argument("spec", metavar="SPEC")
    e.add_argument("--run-date", type=day, default=None, metavar="YYYY-MM-DD")
    e.set_defaults(func=cmd_estimate)


def day(text: str) -> date:
    """A date argument: `YYYY-MM-DD`, told in one line where it is not a date."""
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        why = f" ({exc})" if "must be in" in str(exc) or "out of range" in str(exc) else ""
        raise argparse.ArgumentTypeError(f"{text!r} is not a date{why}; give it as YYYY-MM-DD, such as "
                                         "2026-03-01") from None


def _date_commands(sub: Any) -> None:
    """ledger, limits, backfill: a run date's records, the limits, ranges of dates."""
    led = sub.add_parser("ledger", help="a run date's job ledger: show it, or settle an unknown item")
    led.add_argument("action", choices=["show", "resolve"])
    led.add_argument("spec", metavar="SPEC")
    led.add_argument("item", nargs="?", metavar="ITEM", help="resolve: the item id")
    led.add_argument("--run-date", type=day, required=True, metavar="YYYY-MM-DD")
    how = led.add_mutually_exclusive_group()
    how.add_argument("--job-id", metavar="J", help="resolve: the provider job the submit created")
    how.add_argument("--not-sent", action="store_true", help="resolve: the provider has no job for it")
    led.add_argument("--replace-job", action="store_true",
                     help="resolve --job-id: replace the job a submitted record names (a mistyped id)")
    led.add_argument("--step", choices=["generate", "refine"], default="generate")
    led.add_argument("--index", type=int, default=1, help="resolve --step refine: the image number")
    led.add_argument("--run-ended", action="store_true",
                     help="resolve: the date's last run ended without a manifest (killed, claim lost); without it, "
                          "resolve is refused while that run may still be paying. A run holding the date's claim "
                          "on the Prefect server is waited for all the same")
    led.set_defaults(func=cmd_ledger)
    lim = sub.add_parser("limits", help="provider limits on the Prefect server")
    lim.add_argument("action", choices=["apply", "show", "reset"])
    lim.add_argument("name", nargs="?", metavar="NAME", help="reset: the limit whose slots to free")
    lim.add_argument("--yes", action="store_true", help="reset: do not ask")
    lim.add_argument("--leases", metavar="DIR", help="show: the server's filesystem lease storage (default: that of "
                     "`imagegen server up` when PREFECT_API_URL points at it)")
    lim.add_argument("--account", action="append", metavar="PROVIDER=BLOCK",
                     help="apply for these accounts instead of those in deployments/limits.yaml")
    lim.set_defaults(func=cmd_limits)
    b = sub.add_parser("backfill", help="run a spec for every date of a range, skipping complete dates")
    b.add_argument("spec", metavar="SPEC")
    b.add_argument("--start", type=day, required=True, metavar="YYYY-MM-DD")
    b.add_argument("--end", type=day, required=True, metavar="YYYY-MM-DD")
    b.add_argument("--max-parallel", type=int, default=2, metavar="N", help="dates running at once")
    b.add_argument("--max-credits", type=credit_caps, default=None, metavar="C|PROVIDER=C,...",
                   help="the cap on the range, on its estimate and on what its dates are charged: one number "
                        "for a one-provider spec, else one per provider in its own unit (tams=500,tencent=50)")
    b.add_argument("--deployment", default="run-pipeline/run-pipeline",
                   help="run each date through this deployment when it exists (default %(default)s)")
    b.add_argument("--local", action="store_true", help="run each date as a subflow here, even if deployed")
    b.set_defaults(func=cmd_backfill)


def _service_commands(sub: Any) -> None:
    """setup-server, server, callbacks, sandbox: the processes around the runs."""
    ss = sub.add_parser("setup-server", help="create the work pool, apply provider limits and name the repository workers clone")
    ss.add_argument("--pool", default="imagegen-process")
    ss.add_argument("--repository", help="the git URL workers clone the flows from "
                    "(default: this checkout's origin, else the checkout; kept when already set)")
    ss.add_argument("--branch", help="the branch they clone (default: this checkout's)")
    ss.set_defaults(func=cmd_setup_server)
    srv = sub.add_parser("server", help="a local Prefect server for bulk runs (durable leases, PostgreSQL)")
    srv.add_argument("action", choices=["up", "down", "status"])
    srv.add_argument("--dir", default=str(DEFAULT_SERVER_DIR), help="where its state, home, log and database live")
    srv.add_argument("--port", type=port_number, default=4200)
    srv.add_argument("--host", default="127.0.0.1", help="where it listens (0.0.0.0: for workers on other machines; then "
                     "set PREFECT_SERVER_API_AUTH_STRING=user:password here and PREFECT_API_AUTH_STRING on them)")
    srv.add_argument("--database", choices=["auto", "postgres", "sqlite"], default="auto",
                     help="auto: PostgreSQL when Debian's postgresql is installed, else SQLite")
    srv.set_defaults(func=cmd_server)
    cb = sub.add_parser("callbacks", help="receive provider callbacks and wake the tasks waiting on them")
    cb.add_argument("action", choices=["serve"])
    cb.add_argument("--host", default="127.0.0.1", help="where it listens (behind your ingress; default %(default)s)")
    cb.add_argument("--port", type=port_number, default=8710)
    cb.set_defaults(func=cmd_callbacks)
    s = sub.add_parser("sandbox", help="local provider emulators and S3 server")
    s.add_argument("action", choices=["up", "down", "status", "register"],
                   help="register: save the Blocks and limits of a running sandbox on the current Prefect API")
    s.add_argument("--state-dir", default=".sandbox")
    s.add_argument("--block-name", default="sandbox", help="name of the Blocks `register` saves (and their limits)")
    s.add_argument("--port", action="append", metavar="PROVIDER=PORT", type=provider_port,
                   help="an emulator's port (repeatable; default: its emulator's DEFAULT_PORT, see README)")
    s.add_argument("--s3-port", type=port_number, default=8333)
    s.add_argument("--free-ports", action="store_true", help="run every emulator and S3 on free ports")
    s.add_argument("--latency", type=float, default=2.0, help="seconds an emulated job takes")
    s.add_argument("--bucket", action="append", help="bucket to create (repeatable)")
    s.add_argument("--no-register", action="store_true", help="do not save Prefect Blocks")
    s.set_defaults(func=cmd_sandbox)


NEEDS_PREFECT = {"run", "estimate", "ledger", "limits", "backfill", "setup-server", "sandbox:up", "sandbox:register"}
"""Commands that talk to a Prefect API (Blocks, limits, runs); the others start no server."""


def command_key(args: argparse.Namespace) -> str:
    """The command as `NEEDS_PREFECT` names it (`run`, `sandbox:up`)."""
    return args.command + (f":{args.action}" if args.command == "sandbox" else "")


def temporary_server_note(args: argparse.Namespace) -> str | None:
    """What to say before a command starts Prefect's temporary server (no `PREFECT_API_URL`):
    that it starts, and on a new `PREFECT_HOME` that its database is being created first."""
    if command_key(args) not in NEEDS_PREFECT or getattr(args, "no_register", False):
        return None
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:  # the user's server (a profile or PREFECT_API_URL), or a test harness's
        return None
    url = settings.server.database.connection_url.get_secret_value() if settings.server.database.connection_url else ""
    database = Path(url.split(":///", 1)[1]) if url.startswith("sqlite") and ":///" in url else None
    if database is not None and not database.exists():
        return (f"starting a temporary Prefect server; first run: creating its database in {database.parent} "
                "(up to a minute; set PREFECT_API_URL to use a lasting server)")
    return "starting a temporary Prefect server (set PREFECT_API_URL to use a lasting one)"


def wrong_api(args: argparse.Namespace) -> str | None:
    """Where the command talks to the user's Prefect API and that address answers as something
    else (`flows.cli_errors.not_a_prefect_api`), why; else None."""
    if command_key(args) not in NEEDS_PREFECT:
        return None
    from prefect.settings import get_current_settings

    from flows.cli_errors import not_a_prefect_api

    url = get_current_settings().api.url
    return not_a_prefect_api(url) if url else None


SPEC_FIRST = ("run", "backfill")
"""Commands that read their spec before anything of Prefect (a refused spec answers at once)."""


def shield_server(args: argparse.Namespace) -> None:
    """Where the command will start Prefect's temporary server, make it the one out of the
    terminal's Ctrl-C (`flows.tempserver`), saying `temporary_server_note` once it starts."""
    if (note := temporary_server_note(args)) is not None:
        from flows import tempserver

        tempserver.register(note)


def _ctrl_c_inside(exc: BaseException) -> bool:
    """True when `exc` stands for a Ctrl-C that struck inside a library: in its cause or context,
    or in the text of a pydantic serialisation error (pydantic's Rust core keeps only the text:
    `PydanticSerializationError: Error calling function ...: KeyboardInterrupt`)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, KeyboardInterrupt) or (type(seen).__name__ == "PydanticSerializationError"
                                                   and "KeyboardInterrupt:" in str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    from blocks.errors import BlockMissing

    top = parser()
    args, unknown = top.parse_known_args(argv)
    if unknown:  # told with the command's own usage, not the list of commands
        _command_parser(top, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:  # a Ctrl-C while the command loads what it needs is "interrupted" too, not a traceback
        if args.command in ("run", "backfill") and (refused := _refused_before_start(args)) is not None:
            print(f"{args.command} not started: {refused}", file=sys.stderr)  # before any server starts
            return 1
        if (wrong := wrong_api(args)) is not None:
            print(f"imagegen {args.command}: {wrong}", file=sys.stderr)
            return 1
        if args.command not in SPEC_FIRST:
            shield_server(args)
        return args.func(args)
    except BlockMissing as exc:  # one line naming the Block and how to save it, not a traceback
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a person gets one line naming the fix, never a traceback
        import os

        if _ctrl_c_inside(exc):
            print("interrupted", file=sys.stderr)
            return 130

        from flows.cli_errors import DEBUG, explain

        if os.environ.get(DEBUG):
            raise
        print(f"imagegen {args.command}: {explain(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())


def console() -> None:
    """Console-script entry point. A run (`run`, `backfill`) first starts again without glibc's
    per-thread caches (`flows.arenas`): its task threads would keep memory for the run's length."""
    if sys.argv[1:2] in (["run"], ["backfill"]):
        from flows.arenas import restart_without_thread_caches

        restart_without_thread_caches()
    sys.exit(main())
