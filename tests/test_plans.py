"""A run's plans kept packed (`flows.models.Plans`): each reads back as the plan it was, a
change is kept where it is assigned back (the estimates), and they hold a tenth of the memory
of the plans as objects."""

from __future__ import annotations

import gc
import tracemalloc
from datetime import date
from pathlib import Path

import pytest

from flows.pipeline import _plans, estimate_plans, plan_items
from flows.specs.spec import load_spec

PIPELINES = Path(__file__).parent.parent / "pipelines"
DAY = date(2026, 7, 1)


def many(tmp_path: Path, items: int) -> Path:
    path = tmp_path / "many.yaml"
    path.write_text("version: 1\nname: many\nprovider: tams\nblocks: {tams: sandbox}\n"
                    "archive: {bucket: many-images, credentials: sandbox}\nitems:\n"
                    + "".join(f"  - {{id: item-{n:05d}, prompt: product shot {n}}}\n" for n in range(items)))
    return path


@pytest.mark.parametrize("spec", ["demo.yaml", "catalogue-demo.yaml", "tencent-demo.yaml", "chuzhan-demo.yaml"])
def test_each_plan_reads_back_as_it_was_made(spec: str) -> None:
    parsed = load_spec(PIPELINES / spec)
    made = list(_plans(parsed, "sha", DAY, "/tmp/w", spec))
    packed = plan_items(parsed, "sha", DAY, "/tmp/w", spec)
    assert len(packed) == len(made) > 0
    for mine, theirs in zip(packed, made, strict=True):
        assert mine.model_dump() == theirs.model_dump()
        assert mine.request.request_id == theirs.request.request_id
    assert packed[-1] == made[-1] and packed[1:] == made[1:] and packed == made


def test_a_change_is_kept_where_it_is_assigned_back(tmp_path: Path) -> None:
    plans = plan_items(load_spec(many(tmp_path, 4)), "sha", DAY, "/tmp/w")
    view = plans.where(lambda p: p.item_id != "item-00000")
    read = view[0]
    read.refine_credits = 7.0
    assert plans[1].refine_credits == 0.0  # a plan read is a copy
    view[0] = read
    assert [p.refine_credits for p in plans] == [0.0, 7.0, 0.0, 0.0]
    assert [p.item_id for p in view] == ["item-00001", "item-00002", "item-00003"]


@pytest.mark.parametrize("spec", ["tencent-demo.yaml", "chuzhan-demo.yaml"])  # priced by published formulas
def test_estimates_stay_with_the_plans(spec: str) -> None:
    plans = plan_items(load_spec(PIPELINES / spec), "sha", DAY, "/tmp/w")
    todo = plans.where(lambda p: True)
    per_provider, rejected = estimate_plans(todo, offline={p.provider: "offline" for p in plans})
    assert not rejected and per_provider
    assert all(p.estimate is not None for p in plans)
    assert sum(p.estimate.credits + p.refine_credits for p in plans) == pytest.approx(sum(per_provider.values()))


def test_a_plan_of_another_run_cannot_join(tmp_path: Path) -> None:
    spec = load_spec(many(tmp_path, 2))
    plans = plan_items(spec, "sha", DAY, "/tmp/w")
    other = next(_plans(spec, "sha", date(2026, 7, 2), "/tmp/w", ""))
    with pytest.raises(ValueError, match="item-00000: a plan of another run"):
        plans[0] = other


def test_packed_plans_hold_a_tenth_of_the_objects(tmp_path: Path) -> None:
    spec = load_spec(many(tmp_path, 1000))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        objects = list(_plans(spec, "sha", DAY, "/tmp/w", ""))
        gc.collect()
        as_objects = tracemalloc.get_traced_memory()[0] - before
        del objects
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        packed = plan_items(spec, "sha", DAY, "/tmp/w")
        gc.collect()
        as_packed = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(packed) == 1000
    assert as_packed * 10 < as_objects, (as_packed, as_objects)
