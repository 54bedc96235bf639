"""The job ledger: the life of every paid step, persisted in S3 beside the outputs.

One JSON record per item and paid step at `<manifest dir>/_jobs/<item>.json` (generate) and
`<item>.refine-<n>.json` (a separate paid upscale of image n, e.g. Tencent RefineImage). A
retried task or a rerun reads it before anything is paid, and `move()` is the only way a
record changes state:

    state       meaning                                          may move to
    (none)      never tried, or its record was lost              sending, archived (rebuilt from
                                                                 the archive's sidecars)
    sending     written inside the job slot right before the     submitted, refused, unknown,
                request; found later, the process died while it   done, archived (when every
                may have been on the wire                         write between was lost)
    refused     the provider definitively created nothing (a     sending
                refusal, a connection never made, our limiter),
                or refused after the paid work was done (a
                failed review: counted in charged_before)
    unknown     the request may have reached the provider        sending (only where the
                (timeout after sending, answer cut off, an        provider dedupes), submitted,
                ambiguous error answer); never sent blindly       refused (a person or the
                again                                             provider says: not sent),
                                                                  done or archived (its answer's
                                                                  images found kept or archived
                                                                  under its request)
    submitted   the provider's job id is known                   submitted, done, failed,
                                                                 archived, unknown
    failed      the job ran and ended failed (not charged, or     sending (a new attempt; what
                charged at submit: 触站AI)                        it took moves to charged_before)
    done        results safe: kept in S3 when the provider        done, archived
                cannot give them again (synchronous answers)
    archived    the item's images and sidecars are in S3          archived (archived again after
                                                                 an object was lost: its job is
                                                                 fetched again, never paid again)

A record of another request (the spec changed what is paid for) is replaced by a new one, which
keeps what the old one counted in its date's spend (`charged_before`, `flows.paying.spent.carried`).
A record of another provider (the item moved to another provider: its credits are another unit)
is first set aside under a name of its own, `<record>@<its request id>.json` (`@` is in no item
id), where it goes on counting in its own provider's spend.
Writes are retried with backoff; `LedgerUnavailable` says they still failed.

Every write is conditional on what this ledger last read (`If-Match` on the record's ETag, or
`If-None-Match: *` for a new one): if another run moved the record meanwhile, the write fails
with `LedgerConflict` instead of overwriting it, so a second writer stops before it sends. The
run claim (`flows.paying.claim`) keeps two runs of a date apart; this holds even if it did not. Where
an S3 server does not implement conditional writes (HTTP 501), writes fall back to plain ones
with a warning.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable
from datetime import date, datetime, timezone
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field, field_validator

from flows.storage import (PreconditionFailed, archive_bucket, list_objects, put_conditionally, read_bytes,
                           read_json, read_object, write_bytes, write_json)
from flows.paying import faults, stalled
from flows.specs.spec import PER_IMAGE_SUFFIX, ArchiveSettings

PER_IMAGE = re.compile(PER_IMAGE_SUFFIX + r"\.json$")  # `<item>.refine-<n>.json`
ASIDE = "@"  # a record set aside when the item moved to another provider: `<record>@<request id>.json`
WRITE_ATTEMPTS = 6  # about 15 s of backoff in all: an S3 blip must not lose a paid job id


class State(StrEnum):
    SENDING = "sending"
    REFUSED = "refused"
    UNKNOWN = "unknown"
    SUBMITTED = "submitted"
    FAILED = "failed"
    DONE = "done"
    ARCHIVED = "archived"


class Step(StrEnum):
    GENERATE = "generate"
    REFINE = "refine"


TRANSITIONS: dict[State | None, frozenset[State]] = {
    None: frozenset({State.SENDING, State.ARCHIVED}),
    State.SENDING: frozenset({State.SUBMITTED, State.REFUSED, State.UNKNOWN, State.DONE, State.ARCHIVED}),
    State.REFUSED: frozenset({State.SENDING}),
    State.UNKNOWN: frozenset({State.SENDING, State.SUBMITTED, State.REFUSED, State.DONE, State.ARCHIVED}),
    State.SUBMITTED: frozenset({State.SUBMITTED, State.DONE, State.FAILED, State.ARCHIVED, State.UNKNOWN}),
    State.FAILED: frozenset({State.SENDING}),
    State.DONE: frozenset({State.DONE, State.ARCHIVED}),
    State.ARCHIVED: frozenset({State.ARCHIVED}),
}


def _named(name: str) -> tuple[str, int | None]:
    """The item and image number (None: the item's own record) a record's file name says."""
    image = PER_IMAGE.search(name)
    return PER_IMAGE.sub("", name).removesuffix(".json"), int(image.group(1)) if image else None


class BadTransition(RuntimeError):
    """A record was asked to move where the table does not allow (a bug, never a provider fault)."""


class LedgerUnavailable(RuntimeError):
    """The ledger could not be written after every retry (S3 unreachable)."""


class LedgerConflict(RuntimeError):
    """Another run changed the record since this one read it; nothing is sent on its behalf."""


class JobRecord(BaseModel):
    """One paid step of one item, as the ledger keeps it."""

    item_id: str
    step: Step = Step.GENERATE
    index: int | None = Field(None, description="The image a per-image step (refine) is for.")
    base_request_id: str = Field(description="The step's request id before attempt numbers.")
    request_id: str = Field(description="The id sent (`<base>-<n>` from the second attempt on).")
    attempt: int = 1
    provider: str
    block: str
    state: State
    job_id: str | None = None
    charged: float | None = Field(None, description="What the provider said it charged at submit, where it says so.")
    estimate: float | None = Field(None, description="What the attempt was estimated to cost when it was sent.")
    charged_before: float = Field(0.0, description="What this step's earlier attempts that failed took at submit "
                                  "(maybe given back: no refund is reported, so it counts), the estimate of each call "
                                  "refused after its paid work was done (a failed review: maybe charged), and what a "
                                  "record of another request it replaced counted (the spec changed the item).")
    reason: str | None = Field(None, description="Why it was refused, unknown or failed.")
    rejected: bool = Field(False, description="Failed on the provider's content rules (`ContentRejected`): the "
                           "same request is not sent again; a changed prompt, seed or options is a new one.")
    results: list[str] = Field(default_factory=list, description="S3 keys of results kept in the ledger.")
    answer_urls: list[str] = Field(default_factory=list, description=(
        "The result URLs a synchronous call answered with (Tencent ImageToImage; they live an hour): its images "
        "are downloaded again from them after a failed download or a lost archive. Capabilities: never logged."))
    archived: dict[str, Any] | None = None
    flow_run_id: str | None = None
    updated_at: datetime | None = None

    @field_validator("state", mode="before")
    @classmethod
    def _legacy(cls, value: Any) -> Any:
        return "sending" if value == "submitting" else value  # records written before the state machine


def move(record: JobRecord | None, to: State, **changes: Any) -> JobRecord:
    """The record in state `to`, with `changes`; refuses a move the table does not allow.
    A first record needs `changes` with its identity (item_id, request ids, provider, block)."""
    here = record.state if record is not None else None
    if to not in TRANSITIONS[here]:
        raise BadTransition(f"ledger: {here} -> {to} is not allowed"
                            + (f" ({record.item_id}, {record.step})" if record else ""))
    from prefect.runtime import flow_run

    stamp = {"state": to, "updated_at": datetime.now(timezone.utc),
             "flow_run_id": str(flow_run.id) if flow_run.id else None}
    if record is None:
        return JobRecord(**{**changes, **stamp})
    if here is State.FAILED:  # a new attempt: what the failed one took stays counted, apart from its own charge
        changes = {"charged_before": record.charged_before + (record.charged or 0.0), "charged": None, **changes}
    return record.model_copy(update={**changes, **stamp})


def with_backoff(call: Any, what: str, attempts: int = WRITE_ATTEMPTS) -> Any:
    """Call, retrying any exception with exponential backoff; `LedgerUnavailable` at the end.
    Meanwhile the call is `stalled.waiting_on`: a progress line tells a long wait."""
    with stalled.waiting_on(what):
        for attempt in range(attempts):
            try:
                return call()
            except LedgerConflict:
                raise
            except Exception as exc:  # noqa: BLE001 - S3 and network faults alike
                if attempt + 1 >= attempts:
                    raise LedgerUnavailable(f"{what}: {type(exc).__name__} after {attempts} attempts") from None
                time.sleep(min(8.0, 0.5 * 2**attempt) * random.uniform(0.8, 1.2))
    raise AssertionError("unreachable")


def _body(record: JobRecord) -> bytes:
    """A record as the ledger stores it (the same bytes for the same record: a write that landed
    is recognised by them)."""
    return json.dumps(record.model_dump(mode="json"), indent=2, sort_keys=True).encode()


class JobLedger:
    """Ledger records of one pipeline run date."""

    def __init__(self, archive: ArchiveSettings, pipeline: str, run_date: date) -> None:
        self.bucket = archive_bucket(archive.bucket, archive.credentials)
        self.prefix = archive.ledger_prefix(pipeline, run_date)
        self._etags: dict[str, str | None] = {}  # key -> ETag last read or written (None: absent)
        self._unanswered: dict[str, list[bytes]] = {}  # key -> bodies of writes that failed: may have landed

    def key(self, item_id: str, step: Step = Step.GENERATE, index: int | None = None) -> str:
        suffix = "" if step is Step.GENERATE else f".{step.value}-{index}"
        return f"{self.prefix}{item_id}{suffix}.json"

    def _read(self, key: str) -> tuple[bytes, str] | None:
        return read_object(self.bucket, key)

    def get(self, item_id: str, step: Step = Step.GENERATE, index: int | None = None) -> JobRecord | None:
        key = self.key(item_id, step, index)
        found = with_backoff(lambda: self._read(key), "ledger read")
        self._etags[key] = found[1] if found else None
        return JobRecord.model_validate_json(found[0]) if found else None

    def _record_names(self) -> list[str]:
        """Names (under the prefix) of every record, from one listing."""
        names = (obj["Key"][len(self.prefix):] for obj in list_objects(self.bucket, self.prefix))
        return sorted(n for n in names if n.endswith(".json") and "/" not in n and not n.startswith("_"))

    def recorded(self) -> set[str]:
        """The items that have a generate record, from one listing instead of a read per item."""
        return {n.removesuffix(".json") for n in self._record_names() if not PER_IMAGE.search(n) and ASIDE not in n}

    def set_aside(self, record: JobRecord) -> None:
        """Keep `record`, about to be replaced by a record of another provider's request, under a
        name of its own (once: it may have been set aside by an earlier try of the step), where
        what it counted stays counted in its provider's spend (`flows.paying.spent`)."""
        key = f"{self.key(record.item_id, record.step, record.index).removesuffix('.json')}{ASIDE}{record.request_id}.json"
        body = _body(record)

        def put() -> None:
            try:
                put_conditionally(self.bucket, key, body, if_match=None)
            except PreconditionFailed:
                pass  # set aside already

        with_backoff(put, f"ledger write {key}")

    def records(self, only: Callable[[str, int | None], bool] | None = None) -> list[JobRecord]:
        """Every record of the run date, per-image steps included (for `imagegen ledger show`);
        with `only`, those it says yes to by item and image number (None: the item's own
        record); the others are not read."""
        return [JobRecord.model_validate_json(found[0]) for n in self._record_names()
                if only is None or only(*_named(n))
                if (found := with_backoff(lambda n=n: self._read(self.prefix + n), "ledger read")) is not None]

    def put(self, record: JobRecord) -> JobRecord:
        """Write `record` if nobody changed it since this ledger read it (`LedgerConflict`
        otherwise), retried with backoff (`LedgerUnavailable` when S3 stays away)."""
        key = self.key(record.item_id, record.step, record.index)
        faults.at(f"write-{record.state.value}", record.item_id, record.step.value)
        body = _body(record)
        try:
            self._etags[key] = with_backoff(lambda: self._put_if_unchanged(key, body), f"ledger write {key}")
        except LedgerUnavailable:
            self._unanswered.setdefault(key, []).append(body)  # S3 may have written it, its answer lost
            raise
        self._unanswered.pop(key, None)
        return record

    def _put_if_unchanged(self, key: str, body: bytes) -> str:
        """Write over the ETag this ledger last saw. Found changed, the object may be this
        ledger's own: this very write, or an earlier one that failed after S3 had carried it out
        (its answer lost; `put` keeps their bodies). Anything else is another run's change."""
        try:
            return put_conditionally(self.bucket, key, body, if_match=self._etags.get(key))
        except PreconditionFailed:
            now = self._read(key)
            if now is not None and now[0] == body:  # this write landed after all
                return now[1]
            if now is None or now[0] not in self._unanswered.get(key, ()):
                raise LedgerConflict(f"{key} was changed by another run since this one read it") from None
        self._unanswered[key].remove(now[0])  # an earlier write of ours landed: write over it, conditionally
        self._etags[key] = now[1]
        return self._put_if_unchanged(key, body)

    def move(self, record: JobRecord | None, to: State, **changes: Any) -> JobRecord:
        """`move()` the record and write it."""
        return self.put(move(record, to, **changes))

    def keep_results(self, record: JobRecord, images: list[bytes]) -> list[str]:
        """Store results the provider cannot give again; return their keys."""
        keys = []
        for n, data in enumerate(images, start=1):
            key = f"{self.prefix}{record.item_id}/{record.request_id}-{record.step.value}-{n}.png"
            with_backoff(lambda k=key, d=data: write_bytes(self.bucket, k, d), f"ledger result {key}")
            keys.append(key)
        return keys

    def unnamed_results(self, record: JobRecord) -> list[str]:
        """The results `keep_results` kept for `record`'s request, found by their keys (one
        listing): there when the process stopped between keeping them and writing the record
        that names them."""
        prefix = f"{self.prefix}{record.item_id}/{record.request_id}-{record.step.value}-"
        found = [o["Key"] for o in list_objects(self.bucket, prefix) if o["Key"].endswith(".png")]
        return sorted(found, key=lambda key: int(key[len(prefix):].removesuffix(".png") or 0))

    def read_results(self, record: JobRecord) -> list[bytes]:
        return [with_backoff(lambda k=key: read_bytes(self.bucket, k), f"ledger result {key}")
                for key in record.results]

    # --- the run claim's note: who holds the date (for the message a waiting run logs) --------------
    def claim_note_key(self) -> str:
        return f"{self.prefix}_run.json"

    def write_claim_note(self, note: dict[str, Any]) -> None:
        with_backoff(lambda: write_json(self.bucket, self.claim_note_key(), note), "run claim note")

    def read_claim_note(self) -> dict[str, Any] | None:
        try:
            return read_json(self.bucket, self.claim_note_key())
        except Exception:  # noqa: BLE001 - only used for a log line
            return None
