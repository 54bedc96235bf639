"""A step's result reaches the next task in an `Upstream` box (`flows.models`): Prefect still
records the dependency (the arrow in the UI), but no longer reads the upstream task run from
the API as the task starts, which it does for a future passed as an argument itself."""

from __future__ import annotations

import concurrent.futures
import uuid
from types import SimpleNamespace

from prefect.futures import PrefectConcurrentFuture
from prefect.tasks import _infer_parent_task_runs
from prefect.utilities.engine import collect_task_run_inputs_sync

from flows.models import Upstream


class CountedFuture(PrefectConcurrentFuture):
    """A pending future that counts reads of its state (each one a request to the Prefect API)."""

    reads = 0

    @property
    def state(self):  # type: ignore[override]
        CountedFuture.reads += 1
        raise AssertionError("read from the API")


def test_a_boxed_future_is_a_dependency_but_its_task_run_is_not_read() -> None:
    future = CountedFuture(uuid.uuid4(), concurrent.futures.Future())
    assert {i.id for i in collect_task_run_inputs_sync(Upstream(future))} == {future.task_run_id}
    flow_run = SimpleNamespace(flow_run=SimpleNamespace(id=uuid.uuid4()))
    assert _infer_parent_task_runs(flow_run_context=flow_run, task_run_context=None,
                                   parameters={"made": Upstream(future)}) == []
    assert CountedFuture.reads == 0
    try:  # the same future passed bare is read (what the box avoids)
        _infer_parent_task_runs(flow_run_context=flow_run, task_run_context=None, parameters={"made": future})
    except AssertionError:
        pass
    assert CountedFuture.reads == 1
