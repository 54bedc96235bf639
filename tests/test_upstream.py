"""A step's result reaches the next task in an `Upstream` box (`flows.models`): Prefect still
records the dependency (the arrow in the UI), but no longer reads the upstream task run from
the API as the task starts, which it does for a future passed as an argument itself. Boxed with
`Upstream.after`, the result is handed over without Prefect walking into it, and a plan passed
through `plan_arg` is not walked at all (CPU a task run, not calls)."""

from __future__ import annotations

import concurrent.futures
import uuid
from dataclasses import dataclass
from types import SimpleNamespace

from prefect import task
from prefect.futures import PrefectConcurrentFuture
from prefect.states import Completed
from prefect.task_engine import SyncTaskRunEngine
from prefect.tasks import _infer_parent_task_runs
from prefect.utilities.engine import collect_task_run_inputs_sync

from flows.models import Upstream, plan_arg


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


@dataclass
class Walked:
    """A result or plan Prefect must not walk: walked, the finished future inside it would be a
    dependency and be replaced by its result."""

    inside: list


def _finished(value: object) -> PrefectConcurrentFuture:
    done: concurrent.futures.Future = concurrent.futures.Future()
    done.set_result(Completed(data=value))
    return PrefectConcurrentFuture(uuid.uuid4(), done)


@task
def _step(plan: object, made: object) -> None:
    """Never run: only its engine's parameter resolution is used."""


def test_after_hands_over_the_result_unwalked_and_stays_a_dependency() -> None:
    inner = _finished("inner")
    result = Walked([inner])
    upstream = _finished(result)
    assert {i.id for i in collect_task_run_inputs_sync(Upstream.after(upstream))} == {upstream.task_run_id}
    engine = SyncTaskRunEngine(task=_step, parameters={"plan": 1, "made": Upstream.after(upstream)})
    engine._resolve_parameters()  # what the engine does as the task starts
    assert engine.parameters["made"].value is result and result.inside == [inner]  # not walked
    assert Upstream.after(None) == Upstream(None)


def test_a_plan_argument_reaches_the_task_as_it_is_unwalked() -> None:
    inner = _finished("inner")
    plan = Walked([inner])
    assert collect_task_run_inputs_sync(plan_arg(plan)) == set()  # nothing inside it is a dependency
    engine = SyncTaskRunEngine(task=_step, parameters={"plan": plan_arg(plan), "made": Upstream(None)})
    engine._resolve_parameters()
    assert engine.parameters["plan"] is plan and plan.inside == [inner]
