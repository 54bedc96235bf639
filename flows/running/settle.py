"""Let go of a finished item's Prefect objects while the rest of the run goes on.

A run of thousands of items must not keep every item's task runs in memory until its end.
Four things kept them: the run's own futures (each holds its task run's final state and
result), a copy of each task run's final state per result in `FlowRunContext.run_results`
(Prefect's record for drawing dependencies of arguments it walks; this project's task
arguments are never walked: plans are quoted, upstream results boxed opaque), one cancel
event per task run in Prefect's thread-pool task runner, and the assets each task run passes
downstream (`FlowRunContext.task_run_assets`, an empty set each here). Together about 47 KB an
item, linear in the run's length (measured at 5,000 items).

What the manifest needs of an ended item, its outcome, is kept in one buffer (`Outcomes`).
"""

from __future__ import annotations

import io
import pickle
from array import array
from typing import Any

from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.results import ResultRecord
from prefect.utilities.collections import visit_collection


def forget(chain: list[tuple[str, PrefectFuture]]) -> None:
    """Drop what Prefect keeps for the finished task runs of `chain` for the flow run's life.

    Steps still running (after a failed step) are left alone: reading their state would ask
    the API, and what they keep is one failed item's worth."""
    context = FlowRunContext.get()
    if context is None:
        return
    cancel_events = getattr(context.task_runner, "_cancel_events", None)  # ThreadPoolTaskRunner's, in 3.8
    for _, future in chain:
        wrapped = getattr(future, "wrapped_future", None)
        if wrapped is None or not wrapped.done():
            continue
        if isinstance(cancel_events, dict):
            cancel_events.pop(future.task_run_id, None)
        context.task_run_assets.pop(future.task_run_id, None)  # read only by its downstream tasks: all ended
        future.wait(0)  # keeps the final state on the future: `state` then asks no API
        data = future.state.data
        _unlink(context.run_results, data.result if isinstance(data, ResultRecord) else data)  # as Prefect linked it


def _unlink(run_results: dict[int, tuple[Any, Any, Any]], result: Any) -> None:
    """Remove the entries Prefect made for `result` (itself and what it holds one level down,
    as `link_state_to_result` visits it), each only while it is still the entry for that object."""

    def drop(obj: Any) -> None:
        entry = run_results.get(id(obj))
        if entry is not None and (entry[2] is None or entry[2]() is obj):
            run_results.pop(id(obj), None)

    visit_collection(result, visit_fn=drop, max_depth=1)


class Outcomes:
    """Ended items' outcomes, held until the manifest as their pickles, one after another in one
    buffer.

    As objects, an archived item's record (its images' keys, digests, ETags and verdicts: about
    2 KB in some twenty small objects) is made among the short-lived objects of the item's own
    work, and CPython's small-object allocator keeps a 1 MiB arena while one object in it lives:
    a 5,000-item run's memory rose about 1 MB a minute to its end with 4,800 such records
    kept (`benchmarks/results/no-prefect-aws/`). Here each is about 750 bytes of one buffer,
    read back one at a time as its manifest entry is made (`get`)."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._at: dict[str, int] = {}  # item -> its place in `_ends`
        self._ends = array("Q")
        self._as_objects: dict[str, Any] = {}  # an outcome pickle could not write: kept as it is

    def keep(self, item: str, outcome: Any) -> None:
        try:
            self._buffer.write(pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception:  # noqa: BLE001 - never lose an outcome (items in flight were paid for)
            self._as_objects[item] = outcome
        self._at[item] = len(self._ends)
        self._ends.append(self._buffer.tell())

    def __len__(self) -> int:
        return len(self._at)

    def __contains__(self, item: object) -> bool:
        return item in self._at

    def get(self, item: str) -> Any:
        """The outcome kept for `item`, as it was kept, read back anew (KeyError: none kept)."""
        if item in self._as_objects:
            return self._as_objects[item]
        place = self._at[item]
        start = self._ends[place - 1] if place else 0
        with self._buffer.getbuffer() as view:
            return pickle.loads(view[start:self._ends[place]])
