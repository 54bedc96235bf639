"""A run's progress as it goes: items started, done and failed, credits so far, elapsed and
remaining time, and what it waits for. The flow counts (from its task futures' callbacks, so
an item is counted when it finishes, in any order), logs a line on the run's log at most every
`LOG_EVERY` seconds and at the end, and tells every listener at once: `imagegen run` and
`imagegen backfill` draw it as a live line in the terminal (`terminal_line`)."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flows.paying import stalled

if TYPE_CHECKING:
    from prefect.futures import PrefectFuture
    from prefect.states import State as RunState
    from rich.console import Console

LOG_EVERY = 10.0  # seconds between two progress lines on the run's log

Listener = Callable[["RunProgress"], None]
_listeners: list[Listener] = []
_listeners_lock = threading.Lock()


@dataclass
class RunProgress:
    """The counts of one run (thread-safe: task callbacks update it from runner threads)."""

    label: str
    total: int
    log: Callable[[str], None] | None = None
    submitted: int = 0
    done: int = 0
    failed: int = 0
    credits: float = 0.0
    by_provider: dict[str, float] = field(default_factory=dict)  # credits, each provider in its own unit
    waiting: str | None = None
    reused: int = 0
    unit: str = "items"
    finished: bool = False
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _logged: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        if self.log is not None:  # a line every LOG_EVERY seconds even while nothing changes
            threading.Thread(target=_tick, args=(weakref.ref(self),), name="progress-tick", daemon=True).start()

    def update(self, **changes: Any) -> None:
        """Add to the counts (`done=1`, `credits=2.5`) or set `waiting`; tell the listeners."""
        with self._lock:
            for name, value in changes.items():
                setattr(self, name, value if name == "waiting" else getattr(self, name) + value)
            line = None  # made only when it is logged, not on every task's update
            if self.log is not None and time.monotonic() - self._logged >= LOG_EVERY:
                line, self._logged = self.line(), time.monotonic()
        if line is not None and self.log is not None:
            self.log(line)
        _tell(self)

    def charged(self, provider: str, credits: float) -> None:
        """Count `credits` of `provider`: a run of several providers shows each in its own unit."""
        with self._lock:
            self.by_provider[provider] = self.by_provider.get(provider, 0.0) + credits
        self.update(credits=credits)

    def finish(self) -> None:
        """The last line, on the log whatever the time since the one before."""
        self.finished = True
        if self.log is not None:
            self.log(self.line())
        _tell(self)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        finished = self.done + self.failed
        left = ""
        if self.waiting is None and 0 < finished < self.total:
            left = f", about {_clock(elapsed / finished * (self.total - finished))} left"
        waiting = (f"; waiting for {self.waiting}" if self.waiting else "") + stalled.hint()
        reused = f" ({self.reused} already archived)" if self.reused else ""
        return (f"{self.label}: {self.submitted}/{self.total} {self.unit} started{reused}, {self.done} done, "
                f"{self.failed} failed, {self._credits()}, {_clock(elapsed)} elapsed{left}{waiting}")

    def _credits(self) -> str:
        return credits_text(self.by_provider) if len(self.by_provider) > 1 else f"{self.credits:g} credits"

    @property
    def fraction(self) -> float:
        """Share of items finished; below 1 while anything, a person included, is awaited."""
        finished = (self.done + self.failed) / self.total if self.total else 1.0
        return min(finished, 0.99) if self.waiting else finished


def credits_text(per_provider: dict[str, float]) -> str:
    """Credits per provider as a person reads them: `5 credits` where one provider is counted,
    else `credits chuzhan 4, tams 1` (TAMS credits, 触站AI points and Tencent calls do not add up)."""
    if len(per_provider) <= 1:
        return f"{round(sum(per_provider.values()), 4):g} credits"
    return "credits " + each_in_its_unit(per_provider)


def each_in_its_unit(per_provider: dict[str, float]) -> str:
    """`chuzhan 4, tams 1`: each provider's credits, by name."""
    return ", ".join(f"{p} {round(c, 4):g}" for p, c in sorted(per_provider.items()))


def _tick(ref: weakref.ReferenceType[RunProgress]) -> None:
    """Update a run's progress every half `LOG_EVERY` until it finishes or is gone (a run that
    stopped on an error never calls `finish`)."""
    while True:
        time.sleep(LOG_EVERY / 2)
        progress = ref()
        if progress is None or progress.finished:
            return
        with contextlib.suppress(Exception):  # a progress line must never break the run
            progress.update()
        del progress


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def _tell(progress: RunProgress) -> None:
    with _listeners_lock:
        listeners = list(_listeners)
    for listener in listeners:
        with contextlib.suppress(Exception):  # a display must never break the run
            listener(progress)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call `listener` with every progress update of runs in this process while inside."""
    with _listeners_lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _listeners_lock:
            _listeners.remove(listener)


@contextlib.contextmanager
def terminal_line() -> Iterator[None]:
    """A live progress line at the bottom of the terminal (rich), when stderr is one; log lines
    print above it. Elsewhere (a pipe, CI) nothing is drawn: the run's log has the lines."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    shown: dict[int, RunProgress] = {}  # a backfill's line, and one per date running here

    class Lines:
        def __rich__(self) -> Text:  # drawn again at every refresh, so the clock moves between events
            return Text("\n".join(f"{p.fraction:4.0%} {p.line()}" for p in list(shown.values())), style="bold")

    live = Live(Lines(), console=_log_console() or Console(stderr=True), transient=True, redirect_stdout=True,
                redirect_stderr=True, refresh_per_second=2)

    def draw(progress: RunProgress) -> None:
        shown[id(progress)] = progress
        for key in [k for k, p in shown.items() if p.finished and len(shown) > 1]:
            del shown[key]

    with live, listening(draw):
        yield


def _log_console() -> Console | None:
    """The console Prefect's log records print through (its console handler on the root logger,
    made with the terminal's stream before the line is drawn): drawn on that same console, the
    line is cleared before each record and drawn again after it. On a console of its own, 5-6
    records a demo run were printed onto the end of the line and stayed there."""
    from rich.console import Console

    for handler in logging.getLogger().handlers:
        console = getattr(handler, "console", None)
        if isinstance(console, Console) and console.file in (sys.stderr, sys.__stderr__):
            return console
    return None


def count_when_done(chain: list[tuple[str, PrefectFuture]], progress: RunProgress, provider: str = "") -> None:
    """Count the item in `progress` as soon as its chain ends, in whatever order items end: failed
    at the first step that does not complete, done when the last one does; the credits (of
    `provider`) of its generate step when that completes, and of its paid upscale (Tencent
    RefineImage) when that does: the upscale's result counts the item's credits so far, so what
    it adds is what it counts above the generate step's."""
    counted = threading.Event()
    credited = [0.0]  # the item's credits counted so far
    lock = threading.Lock()

    def ended(step: str, last: bool, future: PrefectFuture) -> None:
        try:
            count(step, last, final_state(future))
        except Exception as exc:  # noqa: BLE001 - a count must never break the run
            logging.getLogger(__name__).debug("progress not counted for %s: %s", step, exc)

    def count(step: str, last: bool, state: RunState) -> None:
        if not state.is_completed():
            if not counted.is_set():
                counted.set()
                progress.update(failed=1)
            return
        if step in ("generate", "upscale"):
            so_far = getattr(result_of(state, raise_on_failure=False), "credits", 0.0) or 0.0
            with lock:
                added, credited[0] = max(0.0, so_far - credited[0]), max(so_far, credited[0])
            if added or step == "generate":
                progress.charged(provider, added)
        if last and not counted.is_set():
            counted.set()
            progress.update(done=1)

    for n, (step, future) in enumerate(chain):
        future.add_done_callback(lambda f, step=step, last=n == len(chain) - 1: ended(step, last, f))


def result_of(state: RunState, raise_on_failure: bool = True) -> Any:
    """`state.result()` without its round trip through Prefect's event-loop thread (about 0.5 ms
    of CPU a call, measured) where the result is in memory: a completed task's in this process.
    Anything else (a failure, a persisted result) goes the usual way."""
    from prefect._internal.result_records import ResultRecordMetadata
    from prefect.results import ResultRecord

    if state.is_completed():
        data = state.data
        if isinstance(data, ResultRecord):
            return data.result
        if data is not None and not isinstance(data, ResultRecordMetadata):
            return data
    return state.result(raise_on_failure=raise_on_failure)


def future_result(future: PrefectFuture) -> Any:
    """`future.result()`, through `result_of`."""
    return result_of(final_state(future))


def final_state(future: PrefectFuture) -> RunState:
    """A finished future's state with its result, in a done callback too (where `future.state`
    is not set yet and would be read from the API, without the result)."""
    from prefect.states import State

    wrapped = getattr(future, "wrapped_future", None)
    state = wrapped.result() if wrapped is not None else None
    return state if isinstance(state, State) else future.state
