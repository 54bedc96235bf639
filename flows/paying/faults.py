"""Fault points: the named moments of a paid step at which a test stops it.

A run installs nothing, and `at()` costs one dictionary lookup. The fault matrix
(`tests/test_fault_matrix.py`) installs an action for one moment of one item's step, and reruns
the date; `IMAGEGEN_STOP_AT=<moment>[:<item>]` makes a real process kill itself there (SIGKILL,
no cleanup), for the tests that stop a whole process; `IMAGEGEN_PAUSE_AT=<moment>:<item>,...`
makes it wait there while a marker file in `IMAGEGEN_PAUSE_DIR` exists, for the tests that take
a server away at that moment.

The moments, in the order a paid step meets them (`MOMENTS`):

- `slot`: the step starts; nothing is recorded or sent yet.
- `sending`: its record says `sending`; the request is not on the wire yet.
- `answered`: the provider answered (a job id, or a synchronous call's images); nothing recorded.
- `polling`: the record says `submitted`; the job is running.
- `generated`: the job's images are in the work directory; the archive step has not started.
- `archiving`: the first image is written to the archive; its sidecar is not.

One moment is the run's own, in the flow's thread: `outcome`, the run has read an item's
outcome (at the end of its chain) and goes on to the next (`RUN_MOMENTS`).

And the ledger's writes, where S3 may be away (`write-<state>`: the record about to be written
as `sending`, `submitted`, `done`, `archived`, ...), and the archive's first image (`put-image`).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

MOMENTS = ("slot", "sending", "answered", "polling", "generated", "archiving")
RUN_MOMENTS = ("outcome",)
WRITES = ("write-sending", "write-submitted", "write-done", "write-archived", "put-image")

_installed: dict[tuple[str, str, str], list[Callable[[], None]]] = {}


class Stopped(Exception):  # noqa: N818 - what happened, not an error of ours
    """A fault point's stop: the step ends here, with whatever it recorded so far. Never retried."""


def install(moment: str, item_id: str, action: Callable[[], None], step: str = "generate", times: int = 1) -> None:
    """Run `action` the next `times` times `item_id`'s `step` reaches `moment`."""
    if moment not in MOMENTS + RUN_MOMENTS + WRITES:
        raise ValueError(f"unknown fault moment {moment!r}; one of {', '.join(MOMENTS + RUN_MOMENTS + WRITES)}")
    _installed[(moment, item_id, step)] = [action] * times


def clear() -> None:
    _installed.clear()


def stop() -> None:
    """The action that stops the step where it is."""
    raise Stopped("stopped by a fault point")


def at(moment: str, item_id: str, step: str = "generate") -> None:
    """A fault point: run what is installed for this moment, item and step, if anything."""
    actions = _installed.get((moment, item_id, step))
    if actions:
        actions.pop()()
    names = (moment, f"{moment}:{item_id}", f"{step}:{moment}:{item_id}")
    wanted = os.environ.get("IMAGEGEN_STOP_AT")
    if wanted and wanted in names:
        os.kill(os.getpid(), signal.SIGKILL)
    paused = os.environ.get("IMAGEGEN_PAUSE_AT")
    if paused and set(paused.split(",")) & set(names[1:]):
        _pause(Path(os.environ["IMAGEGEN_PAUSE_DIR"]) / f"{moment}-{item_id}")


def _pause(marker: Path, most: float = 600.0) -> None:
    """Create `marker` and wait while it exists (the test does what it tests meanwhile, then
    removes it), at most `most` seconds."""
    marker.touch()
    deadline = time.monotonic() + most
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
