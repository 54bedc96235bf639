"""The paid step's table (`flows.paying.paystep`): each cell by name, against the table in
`docs/paying-once.md`; and, for each cell, the integration test that walks it for real (or why
none does)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from flows.paying.ledger import JobRecord, State
from flows.paying.paystep import COLUMNS, ROWS, TABLE, Caps, Do, decide, row_of

ROOT = Path(__file__).parent.parent
DOC = ROOT / "docs" / "paying-once.md"
CAPS = {"dedupes": Caps(dedupes=True), "confirms": Caps(confirms=True), "neither": Caps(),
        "synchronous": Caps(synchronous=True)}

# (row, column) -> the tests that reach this cell against the emulators. The fault matrix asserts
# the cell its reruns take, from the paid step's log line.
MATRIX = "tests/test_fault_matrix.py::test_a_step_stopped_at_any_moment_is_paid_once_on_the_rerun"
WALKED_BY: dict[tuple[str, str], list[str]] = {
    **{("none", c): ["tests/test_archive_last_word.py::test_a_lost_ledger_pays_nothing_again"] for c in COLUMNS},
    **{("refused", c): ["tests/test_pay_once.py::test_a_refused_submit_is_sent_again_by_the_rerun_and_paid_once"]
       for c in ("dedupes", "confirms", "neither")},
    **{("failed", c): ["tests/test_limits_and_faults.py::test_failed_job_is_recorded_and_retried_only_on_rerun"]
       for c in ("dedupes",)},
    **{(row, c): [MATRIX] for row in ("sending", "submitted") for c in ("dedupes", "confirms", "neither")},
    ("failed, rejected", "confirms"): ["tests/test_chuzhan.py::test_a_task_whose_every_image_failed_the_audit_is_paid_once"],
    ("unknown", "dedupes"): ["tests/test_pay_once.py::test_tams_sends_an_item_left_sending_again_under_its_id_and_pays_once"],
    ("unknown", "confirms"): ["tests/test_callbacks.py::test_a_forged_callback_never_adopts_another_task"],
    ("unknown", "neither"): ["tests/test_pay_once.py::test_a_person_can_say_not_sent_and_the_next_run_submits_it"],
    **{("done, kept", c): ["tests/test_review.py::test_human_approval_pauses_and_resumes_with_decisions"]
       for c in ("dedupes",)},
    ("done, kept", "synchronous"): [MATRIX],
    ("archived", "synchronous"): [
        "tests/test_fault_matrix.py::test_a_synchronous_answer_whose_archived_image_is_lost_is_not_paid_again"],
    **{("archived", c): ["tests/test_archive_last_word.py::test_an_image_lost_from_the_archive_is_fetched_again_not_paid_again"]
       for c in ("dedupes", "confirms", "neither")},
}


def documented() -> dict[tuple[str, str], str]:
    text = DOC.read_text().split("## What a retry or a rerun does", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    header = [c.strip() for c in rows[0].strip("|").split("|")][1:]
    out = {}
    for line in rows[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out.update({(cells[0].strip("`"), column): action for column, action in zip(header, cells[1:], strict=True)})
    return out


def record_for(row: str) -> JobRecord | None:
    if row == "none":
        return None
    state = State.DONE if row.startswith("done") else State(row.split(",")[0])
    return JobRecord(item_id="p1", base_request_id="r", request_id="r", provider="x", block="b", state=state,
                     job_id="job-1", results=["k"] if row == "done, kept" else [], rejected=row == "failed, rejected")


@pytest.mark.parametrize(("row", "column"), [(r, c) for r in ROWS for c in COLUMNS], ids=lambda v: v)
def test_each_cell_decides_what_the_document_says(row: str, column: str) -> None:
    record = record_for(row)
    assert row_of(record) == row
    assert decide(record, CAPS[column]).name == documented()[(row, column)]


def test_the_document_has_every_cell_and_every_action() -> None:
    assert {cell: do.name for cell, do in TABLE.items()} == documented()
    assert set(Do) == set(TABLE.values())


def test_a_record_naming_no_job_has_nothing_to_resume() -> None:
    record = record_for("submitted").model_copy(update={"job_id": None})  # type: ignore[union-attr]
    assert decide(record, Caps()) is Do.SEND


def test_the_tests_named_for_a_cell_exist() -> None:
    """Every test `WALKED_BY` names is a test function in its file; the cells no test walks
    against the emulators are listed here, so the gap is said, not hidden."""
    for cell, names in WALKED_BY.items():
        assert cell in TABLE, cell
        for name in names:
            path, function = name.split("::")
            tree = ast.parse((ROOT / path).read_text())
            assert function in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, name
    unwalked = sorted(set(TABLE) - set(WALKED_BY))
    assert unwalked == UNWALKED, unwalked


UNWALKED = sorted([
    ("failed", "confirms"), ("failed", "neither"), ("failed", "synchronous"),
    ("failed, rejected", "dedupes"), ("failed, rejected", "neither"), ("failed, rejected", "synchronous"),
    ("done, kept", "confirms"), ("done, kept", "neither"),
    ("done", "dedupes"), ("done", "confirms"), ("done", "neither"), ("done", "synchronous"),
    ("refused", "synchronous"), ("sending", "synchronous"), ("unknown", "synchronous"),
    ("submitted", "synchronous"),
])
