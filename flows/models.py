"""The data one item carries between its tasks: its plan, its generated images, their review
and what was archived. A module of its own, so the tasks, the review and the paid step all
build on it without importing one another."""

from __future__ import annotations

import pickle
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Generic, Literal, TypeVar, overload

from prefect.utilities.annotations import opaque, quote
from pydantic import BaseModel, Field

from blocks.base import CreditEstimate, GenerationRequest
from flows.specs.spec import ArchiveSettings, ReviewSettings, UpscaleSettings

T = TypeVar("T")


@dataclass(frozen=True)
class Upstream(Generic[T]):
    """An earlier step's result (or its Prefect future) handed to the next task. Prefect treats a
    future inside it as it does a future argument: the task waits for it, an upstream failure
    stops the task, and the UI draws the dependency. But a future passed as an argument itself
    also makes Prefect read the upstream task run from the API as the task starts (one request
    per future per task run, three an item); inside this box it does not. `after(future)`
    boxes it `opaque`: Prefect waits for the future and hands over its result without walking
    into it (a result is ours, never holding futures)."""

    value: T

    @classmethod
    def after(cls, future: Any) -> Upstream[Any]:
        """The box for an upstream task's future (or None where there is none)."""
        return cls(None if future is None else opaque(future))


def plan_arg(plan: ItemPlan) -> Any:
    """An `ItemPlan` as a task argument: `quote`d, so Prefect hands it over as it is instead of
    walking every field of it for futures three times a task run (about 0.9 ms of CPU each
    task run, measured); a plan never holds one."""
    return quote(plan)


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


_SHARED = ("pipeline", "spec_sha256", "run_date", "upscale", "review", "archive", "work_dir", "http_timeout",
           "poll_interval", "job_timeout", "unknown_hold", "spec_file")  # one spec's, the same in each plan
_OWN = tuple(name for name in ItemPlan.model_fields if name not in _SHARED)
_REQUEST = tuple(GenerationRequest.model_fields)
_REQUEST_AT = _OWN.index("request")


class _Book:
    """The storage `Plans` views share: what every plan shares, once, and each plan's own
    fields as one pickled tuple (about 160 bytes, against some 3.4 KB as objects)."""

    __slots__ = ("shared", "packed")

    def __init__(self) -> None:
        self.shared: dict[str, Any] | None = None
        self.packed: list[bytes] = []

    def pack(self, plan: ItemPlan) -> bytes:
        shared = {name: getattr(plan, name) for name in _SHARED}
        if self.shared is None:
            self.shared = shared
        elif shared != self.shared:
            raise ValueError(f"{plan.item_id}: a plan of another run cannot join these plans")
        own = [getattr(plan, name) for name in _OWN]
        own[_REQUEST_AT] = tuple(getattr(plan.request, name) for name in _REQUEST)
        return pickle.dumps(tuple(own), protocol=pickle.HIGHEST_PROTOCOL)

    def unpack(self, packed: bytes) -> ItemPlan:
        """The plan again, built without validating: it was validated as it was made."""
        own = dict(zip(_OWN, pickle.loads(packed), strict=True))
        own["request"] = GenerationRequest.model_construct(**dict(zip(_REQUEST, own["request"], strict=True)))
        return ItemPlan.model_construct(**self.shared, **own)  # type: ignore[arg-type]


class Plans(Sequence[ItemPlan]):
    """A run's item plans, kept packed (`_Book`) and rebuilt each time one is read, so a run of
    5,000 items holds about 1 MB of plans, not 17. A plan read is a copy: a change to it is kept
    only by assigning it back (`plans[i] = plan`). `where` gives a view on the same storage, so a
    plan assigned back through it is what every view of the run reads."""

    __slots__ = ("_book", "_rows")

    def __init__(self, plans: Iterable[ItemPlan] = (), *, _book: _Book | None = None,
                 _rows: array | None = None) -> None:
        self._book = _book or _Book()
        self._rows = array("q") if _rows is None else _rows
        for plan in plans:
            self._rows.append(len(self._book.packed))
            self._book.packed.append(self._book.pack(plan))

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> ItemPlan: ...
    @overload
    def __getitem__(self, index: slice) -> Plans: ...
    def __getitem__(self, index: int | slice) -> ItemPlan | Plans:
        if isinstance(index, slice):
            return Plans(_book=self._book, _rows=self._rows[index])
        return self._book.unpack(self._book.packed[self._rows[index]])

    def __setitem__(self, index: int, plan: ItemPlan) -> None:
        self._book.packed[self._rows[index]] = self._book.pack(plan)

    def __iter__(self) -> Iterator[ItemPlan]:
        return (self._book.unpack(self._book.packed[row]) for row in self._rows)

    def __eq__(self, other: object) -> bool:
        """The same plans in the same order (as a list of them is equal to another)."""
        if not isinstance(other, Plans | list):
            return NotImplemented
        return len(self) == len(other) and all(mine == theirs for mine, theirs in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def where(self, keep: Callable[[ItemPlan], bool]) -> Plans:
        """The plans `keep` takes, in order: a view sharing this storage."""
        rows = array("q", (row for row, plan in zip(self._rows, self, strict=True) if keep(plan)))
        return Plans(_book=self._book, _rows=rows)


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
