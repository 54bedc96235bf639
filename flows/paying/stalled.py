"""The ledger's and the archive's S3 calls still waiting for an answer, so a run's progress line
can say when S3 has gone quiet: a frozen S3 server answers nothing, each call then waits out its read timeout
and backoff (minutes in all), and the line would otherwise only count the same items again."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator

STALL_SECONDS = 20.0  # a ledger or archive call this old is told on the progress line

_calls: dict[int, tuple[str, float]] = {}
_held: dict[int, str] = {}  # answers only this process holds, being written (see `holding`)
_lock = threading.Lock()
_ids = itertools.count()


@contextlib.contextmanager
def waiting_on(what: str) -> Iterator[None]:
    """Mark the block as a call to S3 (`what`: "ledger write ...", "archive write ...") until it
    returns or fails."""
    key = next(_ids)
    with _lock:
        _calls[key] = (what, time.monotonic())
    try:
        yield
    finally:
        with _lock:
            _calls.pop(key, None)


@contextlib.contextmanager
def holding(what: str) -> Iterator[None]:
    """`waiting_on(what)` for the write of a paid answer only this process holds: a process
    left meanwhile loses it (`held` names it)."""
    key = next(_ids)
    with _lock:
        _held[key] = what
    try:
        with waiting_on(what):
            yield
    finally:
        with _lock:
            _held.pop(key, None)


def held() -> list[str]:
    """What `holding` blocks are writing now."""
    with _lock:
        return sorted(_held.values())


def longest(after: float | None = None) -> tuple[str, float] | None:
    """The call waiting longest and its seconds, when that is `after` (`STALL_SECONDS`) or more."""
    after = STALL_SECONDS if after is None else after
    with _lock:
        oldest = min(_calls.values(), key=lambda call: call[1], default=None)
    if oldest is None or (waited := time.monotonic() - oldest[1]) < after:
        return None
    return oldest[0], waited


def hint() -> str:
    """What the progress line adds while S3 is quiet ("" otherwise)."""
    if (found := longest()) is None:
        return ""
    call = " ".join(found[0].split()[:2])  # "ledger write", without the key
    article = "an" if call[:1] in "aeiou" else "a"  # "an archive write"
    return f"; S3 has not answered {article} {call} for {found[1]:.0f} s, still trying (is the S3 server up?)"
