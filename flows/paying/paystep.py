"""The owner of every paid step: what a first try, a retry or a rerun does, decided by one table.

Before anything is paid, `decide()` reads the step's ledger record (`flows.paying.ledger`) and what the
provider can do (`Caps`), and `TABLE` answers with one `Do`. The generate task and the paid
upscale (`flows.running.tasks`) call `generate_result()` and `refined()`, which carry the answer out. No
other code reads a ledger state to choose what to pay for. `docs/paying-once.md` shows the
table, and `tests/test_paystep.py` names each cell and the test that walks it.
"""

from __future__ import annotations

import hashlib
from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn


from prefect import get_run_logger
from prefect.runtime import flow_run

from flows.storage import read_json
from blocks.base import (CreditEstimate, GenerationRequest, ImageProvider, JobResult, JobState, JobStatus, NoJournal,
                         Waker)
from blocks.errors import (BadRequest, ChargedRejection, ContentRejected, JobFailed, ProviderError, ResultExpired,
                           SubmitUnknown)
from flows.paying import paidcalls, wakeup
from flows.paying.archived import ArchivedImagesLost
from flows.paying.callbacks import JobRef, cached_key, capability_url, heard_notes
from flows.paying.journal import ItemJournal, flush_or_log
from flows.paying.ledger import JobLedger, JobRecord, State, Step
from flows.paying.budget import for_run
from flows.paying.spent import replaced

if TYPE_CHECKING:
    from flows.models import ItemPlan


UNPRICED = CreditEstimate(credits=0.0, source="formula")  # an item the run did not price counts 0, as sent


class Caps(NamedTuple):
    """What a provider's paid call allows, as far as paying once goes."""

    dedupes: bool = False  # the same request id returns the job it made (TAMS `requestId`)
    confirms: bool = False  # its status of a job names our request: a job a callback names can be confirmed
    synchronous: bool = False  # the answer is the images, given once (Tencent ImageToImage)

    @property
    def column(self) -> str:
        """The table's column for these capabilities."""
        if self.synchronous:
            return "synchronous"
        return "dedupes" if self.dedupes else "confirms" if self.confirms else "neither"


COLUMNS = ("dedupes", "confirms", "neither", "synchronous")
ROWS = ("none", "refused", "failed", "failed, rejected", "sending", "unknown", "submitted", "done, kept", "done", "archived")


class Do(Enum):
    """What the step does."""

    SEND = "send it"
    SEND_AGAIN = "send again under the same request id (the provider returns the job it made)"
    NEW_ATTEMPT = "send a new attempt `<id>-<n>` (what a failed job took at submit stays counted)"
    POLL = "resume the job by its id: poll, then download"
    READ_KEPT = "read the kept results back; nothing is sent"
    CONFIRM = "adopt the job a callback names once the provider's status confirms it; else stop for a person"
    PERSON = "stop the item for a person (`imagegen ledger resolve`); nothing is sent"
    LOST = "stop: the answer cannot be given again and its images are gone (`ArchivedImagesLost`)"
    REJECTED = "stop: the provider rejected this request's content; nothing is sent (`ContentRejected`)"


_UNKNOWN = {"dedupes": Do.SEND_AGAIN, "confirms": Do.CONFIRM, "neither": Do.PERSON, "synchronous": Do.PERSON}


def _column(column: str) -> dict[str, Do]:
    resume = Do.LOST if column == "synchronous" else Do.POLL
    return {"none": Do.SEND, "refused": Do.SEND, "failed": Do.NEW_ATTEMPT, "failed, rejected": Do.REJECTED,
            "sending": _UNKNOWN[column],
            "unknown": _UNKNOWN[column], "submitted": resume, "done, kept": Do.READ_KEPT, "done": resume,
            "archived": resume}


TABLE: dict[tuple[str, str], Do] = {(row, column): do for column in COLUMNS for row, do in _column(column).items()}
"""(ledger row, provider column) -> what the step does. A record found `sending` is first moved to
`unknown` (the process that sent it died, or stopped, before the answer was recorded)."""


def row_of(record: JobRecord | None) -> str:
    """The table's row for a step's ledger record."""
    if record is None:
        return "none"
    if record.state is State.DONE:
        return "done, kept" if record.results else "done"
    if record.state is State.FAILED and record.rejected:
        return "failed, rejected"
    if record.state in (State.SUBMITTED, State.DONE, State.ARCHIVED) and not record.job_id:
        return "none"  # a record that names no job has nothing to resume (written by hand)
    return record.state.value


def caps_of(provider: ImageProvider, job_id: str | None = None, step: Step = Step.GENERATE) -> Caps:
    """The capabilities of `provider`'s paid call of `step` (of the job `job_id`, when known)."""
    if step is Step.REFINE:
        return Caps()  # Tencent RefineImage: no idempotency key, a result URL to download again
    return Caps(dedupes=provider.idempotent_submit,
                confirms=type(provider).status_names.__func__ is not ImageProvider.status_names.__func__,
                synchronous=job_id is not None and not provider.can_fetch_again(job_id))


def decide(record: JobRecord | None, caps: Caps) -> Do:
    return TABLE[(row_of(record), caps.column)]


def current(record: JobRecord | None, base_request_id: str) -> JobRecord | None:
    """The record if it is of this request; a record of another request does not count."""
    return record if record is not None and record.base_request_id == base_request_id else None


def replacing(ledger: JobLedger, found: JobRecord | None, base: str, plan: ItemPlan,
              estimate: float) -> dict[str, float]:
    """Where the step's record `found` is of another request than `base`, what it counted in the
    date's spend, for the new record to keep (`charged_before`): replaced, it is still spent. A
    record of another provider is set aside instead, counting in its own (another unit)."""
    if found is not None and found.base_request_id != base and found.provider != plan.provider:
        ledger.set_aside(found)  # before the new record replaces it: nothing is sent if this fails
    budget = for_run(flow_run.id)
    extra = replaced(found, base, plan.provider, estimate, budget.ratio(plan.provider) if budget else 1.0)
    return {"charged_before": extra} if extra else {}


def _log_decision(plan: ItemPlan, step: Step, record: JobRecord | None, caps: Caps, do: Do) -> None:
    if record is not None:
        row = row_of(record)
        get_run_logger().info("%s %s: an earlier try is in the ledger (%s), so: %s [table: ledger %s, %s provider: "
                              "%s]", plan.item_id, step.value, row, do.value, row, caps.column, do.name)


def unknown_help(plan: ItemPlan, record: JobRecord) -> str:
    """What a person does about an `unknown` record: the command that settles it."""
    where = f"{plan.spec_file or '<spec>'} {plan.item_id} --run-date {plan.run_date}"
    said = (f"{plan.item_id}: the {record.step.value} request {record.request_id} may have reached {plan.provider} "
            f"({record.reason or 'the run stopped while sending it'}), and {plan.provider} cannot be asked for it, "
            "so it is not sent again. ")
    if record.step is Step.REFINE:  # no job to name: its result URL was never seen
        return said + (f"If the provider console shows no such call was charged, run `imagegen ledger resolve {where} "
                       f"--step refine --index {record.index} --not-sent` and the next run sends it again; else leave "
                       "it (the image archives without that upscale only if you change the spec)")
    return said + ("Look for it in the provider console (prompt and seed are in the ledger), then run "
                   f"`imagegen ledger resolve {where} --job-id <id>` if it exists, or `--not-sent` if it does not; the "
                   "next run resumes or submits it")


def for_a_person(plan: ItemPlan, journal: ItemJournal, cause: BaseException | None = None) -> NoReturn:
    """Stop the step as `unknown`, with the command that settles it (the one place this is said)."""
    raise SubmitUnknown(unknown_help(plan, journal.record), provider=plan.provider,  # type: ignore[arg-type]
                        code="SubmitUnknown") from cause


def left_sending(plan: ItemPlan, journal: ItemJournal) -> None:
    """A record found `sending`: the process sending it stopped before the answer was recorded.
    It becomes `unknown`, unless this run lost its claim (the sender may be the run holding it)."""
    paidcalls.ensure_claim(flow_run.id)
    journal.unknown(SubmitUnknown("the run stopped while sending it", provider=plan.provider))


def rejected_before(plan: ItemPlan, record: JobRecord) -> ContentRejected:
    """A request the provider rejected on content in an earlier run of this date: sent again, it
    would be rejected again and, where a job is charged at submit (触站AI), paid again."""
    return ContentRejected(
        f"{plan.item_id}: {plan.provider} rejected this request's content in an earlier run of {plan.run_date} "
        f"({record.reason}); it is not sent again: change its prompt, seed or options (a new request) to try again",
        provider=plan.provider, code="rejected-before")


def kept_unnamed(plan: ItemPlan, ledger: JobLedger, journal: ItemJournal) -> JobResult | None:
    """A synchronous call answered and its images kept in S3, the process stopped before its
    record said `done` (it still says `sending` or `submitted`, or `unknown`: a run that found
    it `sending` while its answer was on the way): the images are read back, nothing is paid
    again. None where they are not all there (then a person decides, as before)."""
    record = journal.record
    if record is None or record.state not in (State.SENDING, State.SUBMITTED, State.UNKNOWN):
        return None
    keys = ledger.unnamed_results(record)
    if not keys or len(keys) != plan.request.count:
        return None
    journal.found_kept(keys)
    get_run_logger().warning("%s: its answer's images were kept in S3 before its record said so (the run stopped "
                             "there); read back, nothing is paid again", plan.item_id)
    return read_kept(plan, ledger, journal.record)  # type: ignore[arg-type]


def read_kept(plan: ItemPlan, ledger: JobLedger, record: JobRecord) -> JobResult:
    """The call's results kept in the ledger, read back under the record's job id: nothing is sent."""
    priced = plan.estimate or UNPRICED
    return JobResult(job_id=record.job_id or "", images=ledger.read_results(record), credits=priced.credits,
                     credits_source=priced.source, polls=0)


def lost_answer(plan: ItemPlan, ledger: JobLedger, record: JobRecord) -> Exception:
    """Why a synchronous call's job is not resumed: an archived item's images are gone, or the
    answer was never recorded."""
    if record.state is not State.ARCHIVED:
        return SubmitUnknown(unknown_help(plan, record), provider=plan.provider, code="SubmitUnknown")
    return ArchivedImagesLost(
        f"{plan.item_id}: its archived images are gone from the bucket, and {plan.provider} cannot give the "
        f"answer of {record.job_id} again (a synchronous call), so it is not paid for again on its own. To pay for "
        f"it once more, delete its ledger record s3://{ledger.bucket.bucket_name}/{ledger.key(plan.item_id)} and "
        "run the date again")


def answered_again(plan: ItemPlan, provider: ImageProvider, ledger: JobLedger, journal: ItemJournal,
                   record: JobRecord) -> JobResult:
    """A synchronous call that answered with result URLs, resumed: its images downloaded again
    from them (nothing is sent: no slot), kept in S3; `AnswerGone` once they expired."""
    if not record.answer_urls:  # written by hand (`ledger resolve --job-id`): nothing to download
        raise lost_answer(plan, ledger, record)
    status = JobStatus(job_id=record.job_id or "", state=JobState.SUCCEEDED, provider_status="sync",
                       result_urls=record.answer_urls)
    keeps = journal if record.state is not State.ARCHIVED else NoJournal()  # an archived item's are archived again
    try:
        return provider.answered(status, plan.estimate or UNPRICED, keeps)
    except ResultExpired as exc:
        raise answer_gone(plan, ledger, record, exc) from None
    finally:
        flush_or_log(journal)


class AnswerGone(BadRequest):
    """A synchronous call's result URL no longer gives its images (it lives an hour) and the
    provider cannot give them again: its record stays (paid for); the message names what a
    person does."""


def answer_gone(plan: ItemPlan, ledger: JobLedger, record: JobRecord, refusal: BadRequest) -> Exception:
    """Why a synchronous call answered with a result URL is not resumed: the URL no longer gives
    its images (it lives an hour), and the provider cannot give them again."""
    if record.state is State.ARCHIVED:
        return lost_answer(plan, ledger, record)
    where = f"{plan.spec_file or '<spec>'} {plan.item_id} --run-date {plan.run_date}"
    return AnswerGone(
        f"{plan.item_id}: the result URL {plan.provider} answered with no longer gives its image ({refusal.message}), "
        f"and {plan.provider} cannot give it again, so it is not paid for again on its own. To pay for it once "
        f"more, run `imagegen ledger resolve {where} --not-sent`; the next run sends it again",
        provider=plan.provider, code="AnswerGone")


# --- generate ------------------------------------------------------------------------------------------

def generate_journal(plan: ItemPlan, ledger: JobLedger, input_ref: str | None) -> tuple[ItemJournal, GenerationRequest]:
    """The generate step's journal over its current record, and the request this attempt sends."""
    base = plan.request.request_id
    found = ledger.get(plan.item_id)
    record = current(found, base)
    if record is not None and record.provider != plan.provider:
        record = moved_from(plan, ledger, record)
    if record is None and found is not None and found.state in (State.SENDING, State.UNKNOWN, State.SUBMITTED,
                                                                  State.DONE):
        get_run_logger().warning(
            "%s: its request changed (prompt, seed, size or options) since request %s was %s%s, not archived; that "
            "job's image is not collected, and the item is paid for again as it now reads", plan.item_id,
            found.request_id, "sent" if found.state in (State.SENDING, State.UNKNOWN) else "paid for",
            f" (job {found.job_id})" if found.job_id else "")
    attempt = 1 if record is None else record.attempt + (record.state is State.FAILED)
    rid = base if attempt == 1 else f"{base}-{attempt}"
    request = plan.request.model_copy(update={"input_ref": input_ref, "request_id": rid})
    identity = {"item_id": plan.item_id, "step": Step.GENERATE, "base_request_id": base, "request_id": rid,
                "attempt": attempt, "provider": plan.provider, "block": plan.block,
                **replacing(ledger, found, base, plan, plan.estimate.credits if plan.estimate else 0.0)}
    return ItemJournal(ledger, record, identity, cost=plan.estimate.credits if plan.estimate else 0.0), request


class ProviderMoved(BadRequest):
    """The item's request was sent to another provider than the spec now names (the same Block
    name and request: its id does not say the provider), and that call may have been paid for or
    its images are still to be collected: nothing is asked of the new provider about the old
    one's job, nor paid again on its own."""


def moved_from(plan: ItemPlan, ledger: JobLedger, record: JobRecord) -> JobRecord | None:
    """The current record of an item the spec moved to another provider: one whose call may be
    paid for stops the step (`ProviderMoved`, naming both ways on); one that paid for nothing
    to collect (refused, failed) is set aside, counting in its own provider, and the item
    starts afresh on the new one (None)."""
    if record.state in (State.SENDING, State.UNKNOWN, State.SUBMITTED, State.DONE, State.ARCHIVED):
        job = f"job {record.job_id}" if record.job_id else "its answer never seen"
        raise ProviderMoved(
            f"{plan.item_id}: its request {record.request_id} was sent to {record.provider} ({job}, "
            f"{record.state.value}), and the spec now puts it on {plan.provider}. To collect that job without paying "
            f"again, put the item back on {record.provider} and run again; to pay for it on {plan.provider} instead, "
            f"change its prompt, seed or options (a new request; what {record.provider} took stays counted)",
            provider=plan.provider, code="ProviderMoved")
    if record.state in (State.REFUSED, State.FAILED):
        ledger.set_aside(record)
        return None
    return record


def generate_result(plan: ItemPlan, provider: ImageProvider, ledger: JobLedger, input_ref: str | None) -> tuple[
        JobResult, ItemJournal, GenerationRequest]:
    """The generate step, as the table says: the job's result, its journal and the request sent."""
    journal, request = generate_journal(plan, ledger, input_ref)
    journal.settle_unsent()
    record = journal.record
    caps = caps_of(provider, record.job_id if record else None)
    do = decide(record, caps)
    _log_decision(plan, Step.GENERATE, record, caps, do)
    if do is Do.READ_KEPT:
        return read_kept(plan, ledger, record), journal, request  # type: ignore[arg-type]
    if do in (Do.LOST, Do.PERSON) and (kept := kept_unnamed(plan, ledger, journal)) is not None:
        return kept, journal, request
    if do is Do.LOST:
        raise lost_answer(plan, ledger, record)  # type: ignore[arg-type]
    if do is Do.REJECTED:
        raise rejected_before(plan, record)  # type: ignore[arg-type]
    if record is not None and record.state is State.SENDING:
        left_sending(plan, journal)
    if do is Do.POLL and provider.answered_at_submit(record.job_id or ""):  # type: ignore[union-attr]
        return answered_again(plan, provider, ledger, journal, record), journal, request  # type: ignore[arg-type]
    job_id = record.job_id if do is Do.POLL else None  # type: ignore[union-attr]
    if do is Do.CONFIRM:
        job_id = settled_by_callback(plan, ledger, journal, provider, request) or for_a_person(plan, journal)
    elif do is Do.PERSON:
        for_a_person(plan, journal)
    return _run_job(plan, provider, ledger, journal, request, job_id), journal, request


def _run_job(plan: ItemPlan, provider: ImageProvider, ledger: JobLedger, journal: ItemJournal,
             request: GenerationRequest, job_id: str | None) -> JobResult:
    """Send (or resume) the job and wait for its end; an answer lost on the way is settled once,
    through callbacks where the provider confirms jobs, else left for a person."""
    request, waker = with_callback(plan, provider, ledger, request)
    run = dict(poll_interval=plan.poll_interval, timeout=plan.job_timeout, estimate=plan.estimate,
               journal=journal, unknown_hold=plan.unknown_hold, waker=waker)
    try:
        try:
            with paidcalls.collecting(job_id is not None):  # paid for: a stop does not end its slot's wait
                result = provider.run_job(request, job_id=job_id, **run)
        except SubmitUnknown as exc:
            if journal.record is None or journal.record.state is not State.UNKNOWN:
                raise
            if provider.idempotent_submit:  # asked twice under one id: the next run asks again, paying once
                raise SubmitUnknown(f"{plan.item_id}: {plan.provider} left request {request.request_id} unanswered "
                                    "twice; the next run asks again under the same request id", provider=plan.provider,
                                    code="SubmitUnknown") from exc
            if not caps_of(provider).confirms:
                for_a_person(plan, journal, exc)
            if waker is not None:  # the job's callback names it, where the submit's answer was lost
                waker.wait(provider.callback_fallback)
            job_id = settled_by_callback(plan, ledger, journal, provider, request) or for_a_person(plan, journal, exc)
            with paidcalls.collecting():
                result = provider.run_job(request, job_id=job_id, **run)
        except BadRequest as exc:
            if job_id is None or isinstance(exc, JobFailed) or not unknown_job(provider, job_id):
                raise
            raise job_gone(plan, job_id, exc) from None
        journal.settle(result.credits if result.credits_source == "charged" else None)
        return result
    except (JobFailed, ContentRejected) as exc:
        if journal.record is not None and journal.record.state is State.SUBMITTED:  # the job ran and failed
            journal.failed(exc.message, maybe_charged=getattr(exc, "charge", None) == "maybe",
                           rejected=isinstance(exc, ContentRejected) and not isinstance(exc, ChargedRejection))
        raise
    finally:
        flush_or_log(journal)


class JobGone(BadRequest):
    """The provider refuses to tell a job this item paid for: its record stays `submitted` (nothing
    is paid again on its own); the message names what a person does."""


def job_gone(plan: ItemPlan, job_id: str, refusal: BadRequest) -> JobGone:
    where = f"{plan.spec_file or '<spec>'} {plan.item_id} --run-date {plan.run_date}"
    return JobGone(f"{plan.item_id}: {plan.provider} does not know job {job_id}, which this item paid for "
                   f"({refusal.message}). If the Block's account is not the one that submitted it, restore that "
                   f"account and run again; if {plan.provider} no longer has the job, `imagegen ledger resolve "
                   f"{where} --not-sent` lets the next run send it again (paying again)",
                   provider=plan.provider, code="JobGone")


def unknown_job(provider: ImageProvider, job_id: str) -> bool:
    """Whether the provider refuses to tell `job_id`'s status (a job it does not know), asked
    once more after a resumed job's call was refused; a fault of another kind is no answer."""
    try:
        provider.poll(job_id)
    except BadRequest as exc:
        return not isinstance(exc, (JobFailed, SubmitUnknown))
    except ProviderError:
        return False
    return False


def with_callback(plan: ItemPlan, provider: ImageProvider, ledger: JobLedger,
                  request: GenerationRequest) -> tuple[GenerationRequest, Waker | None]:
    """The request with its own callback URL, and what wakes its wait, where the account's
    Block names a receiver (`flows.paying.callbacks`); unchanged and None otherwise. Where the Prefect
    event stream cannot be reached, the job still sends its callback URL (the receiver records
    it) and is polled as without one."""
    base = provider.callback_base
    if not base:
        return request, None
    ref = JobRef(provider=plan.provider, block=plan.block, request_id=request.request_id, bucket=plan.archive.bucket,
                 credentials=plan.archive.credentials, ledger_prefix=ledger.prefix, record_key=ledger.key(plan.item_id))
    request = request.model_copy(update={"callback_url": capability_url(base, ref, cached_key())})
    listener = wakeup.listener()
    if not listener.ready():
        get_run_logger().warning("%s: the Prefect event stream did not answer in %.0f s; the job is polled, not "
                                 "woken by its callback", plan.item_id, wakeup.CONNECT_TIMEOUT)
        return request, None
    def read_note(job_id: str, state: str, digest: str) -> dict[str, Any] | None:
        try:
            return read_json(ledger.bucket, ref.heard_key(job_id, state, digest))
        except Exception:  # noqa: BLE001 - S3 away: the wake-up is not confirmed; the job is polled as without one
            return None

    return request, listener.waker(request.request_id, read_note)


ADOPT_CANDIDATES = 5
"""Jobs named by callbacks that are looked up for one lost submit (each costs a status request)."""


def settled_by_callback(plan: ItemPlan, ledger: JobLedger, journal: ItemJournal, provider: ImageProvider,
                        request: GenerationRequest) -> str | None:
    """An `unknown` submit settled through its callbacks. A callback naming a job is a hint
    where to look, never the answer (whoever holds the URL can name any job): a job is adopted
    only when the provider's own status of it names this request (`ImageProvider.owns_job`),
    and only if exactly one does. The record then becomes `submitted` with it; else None."""
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


# --- the provider's separate paid upscale ---------------------------------------------------------------

def refine_url(record: JobRecord) -> str:
    """The result URL a paid upscale answered with: among its record's `answer_urls`, or its job
    id in records written before the URL was kept apart from it."""
    return (record.answer_urls or [record.job_id or ""])[0]


def refined(plan: ItemPlan, provider: ImageProvider, ledger: JobLedger, request_id: str, index: int,
            data: bytes) -> tuple[bytes, float]:
    """Image `index` through the provider's paid upscaler, as the table says: a call already
    answered is downloaded again or read back, never paid twice. With it, what the record it
    replaced counted (`charged_before`: the item's credits include it)."""
    base = hashlib.sha256(f"{request_id}:refine:{index}".encode()).hexdigest()[:32]
    found = ledger.get(plan.item_id, Step.REFINE, index)
    record, cost = current(found, base), plan.refine_credits / max(1, plan.request.count)
    journal = ItemJournal(ledger, record, {"item_id": plan.item_id, "step": Step.REFINE, "index": index,
                                           "base_request_id": base, "request_id": base, "attempt": 1,
                                           "provider": plan.provider, "block": plan.block,
                                           **replacing(ledger, found, base, plan, cost)}, cost=cost)
    journal.settle_unsent()
    record = journal.record
    caps = caps_of(provider, step=Step.REFINE)
    do = decide(record, caps)
    _log_decision(plan, Step.REFINE, record, caps, do)
    before = journal.identity.get("charged_before", record.charged_before if record is not None else 0.0)
    if do is Do.READ_KEPT:
        return ledger.read_results(record)[0], before  # type: ignore[arg-type]
    if do is Do.PERSON:
        if record is not None and record.state is State.SENDING:
            left_sending(plan, journal)
        for_a_person(plan, journal)
    resume = refine_url(record) if do is Do.POLL else None  # type: ignore[arg-type]
    keeps = NoJournal() if record is not None and record.state is State.ARCHIVED else journal  # archived again
    try:
        return provider.refine(data, keeps, result_url=resume,  # type: ignore[call-arg]
                               unknown_hold=plan.unknown_hold), before
    except SubmitUnknown as exc:
        if journal.record is None or journal.record.state is not State.UNKNOWN:
            raise
        for_a_person(plan, journal, exc)
    finally:
        flush_or_log(journal)
