"""The fault matrix: every moment of a paid step, stopped, on every provider; and the provider's
own faults at the moments they happen. Each cell is a real run in this process (real HTTP to the
emulators, the real S3 ledger, the real Prefect API) stopped at a fault point (`flows.paying.faults`),
then rerun until it completes, with a person settling what only a person can. It holds when the
emulators charged each image exactly once (per their own counts) and every item is archived.

The outcome of each cell is compared with the table in `docs/paying-once.md` ("The fault
matrix"), so the table says what was measured. A stop here ends the step where it is and unwinds
it, as a stopped process leaves its records; the real SIGKILL tests (`test_pay_once.py`,
`test_limits_and_faults.py`) stop whole processes, leases and all.
"""

from __future__ import annotations

import logging
import re
from datetime import date
from pathlib import Path

import pytest

from flows.paying import faults
from flows.cli import main as imagegen
from flows.paying.ledger import JobLedger, LedgerUnavailable, State, Step
from flows.specs.spec import load_spec
from tests.conftest import run_spec
from tests.test_limits_and_faults import manifest_of
from tests.test_pay_once import charges, emulators, image_to_image_spec, inject, spec_text, stats  # noqa: F401 - a fixture

pytestmark = pytest.mark.faults  # its own tier: `make faults`

ROOT = Path(__file__).parent.parent
DOC = ROOT / "docs" / "paying-once.md"
DAY = date(2026, 8, 1)
MAX_RERUNS = 3

STOPPED = ("slot", "sending", "answered", "polling", "generated", "archiving")
REFINE_STOPPED = ("sending", "answered", "polling")
SYNC_STOPPED = ("slot", "sending", "answered", "generated", "archiving")
COLUMNS = {"tams": "tams", "chuzhan": "chuzhan", "tencent": "tencent", "tencent RefineImage": "tencent",
           "tencent ImageToImage": "tencent", "tencent ImageToImage base64": "tencent"}

PROVIDER_FAULTS = {  # fault -> provider -> what the emulator is told (the next matching call)
    "5xx, nothing created": {
        "tams": {"kind": "http_500", "count": 1, "method": "POST", "path": "/v1/jobs", "exact": True},
        "chuzhan": {"kind": "error_before", "count": 1},
        "tencent": {"code": "InternalError", "count": 1, "action": "SubmitTextToImageJob"}},
    "refused (an account error)": {
        "tencent": {"code": "ResourceUnavailable.InArrears", "count": 1, "action": "SubmitTextToImageJob"}},
    "answer cut, job created": {
        "tams": {"kind": "drop", "count": 1, "method": "POST", "path": "/v1/jobs", "exact": True},
        "chuzhan": {"kind": "drop_after", "count": 1},
        "tencent": {"kind": "drop", "after": True, "count": 1, "action": "SubmitTextToImageJob"}},
    "5xx after the job was created": {  # (TAMS answers no error after creating a job)
        "chuzhan": {"kind": "error_after", "count": 1},
        "tencent": {"kind": "http_502", "after": True, "count": 1, "action": "SubmitTextToImageJob"}},
    "5xx while polling": {
        "tams": {"kind": "http_500", "count": 2, "method": "GET", "path": "/v1/jobs/"},
        "tencent": {"code": "InternalError", "count": 2, "action": "QueryTextToImageJob"}},
    # Answers later than the Block's `timeout` (IMPATIENT): the client stops waiting, the provider
    # goes on (TAMS creates the job once its answer's delay is over; the others before it).
    "timeout, job created": {
        "tams": {"kind": "slow", "delay": 4, "count": 1, "method": "POST", "path": "/v1/jobs", "exact": True},
        "chuzhan": {"kind": "slow", "delay": 4, "count": 1},
        "tencent": {"kind": "slow", "delay": 4, "after": True, "count": 1, "action": "SubmitTextToImageJob"}},
    "timeout while polling": {
        "tams": {"kind": "slow", "delay": 4, "count": 2, "method": "GET", "path": "/v1/jobs/"},
        "tencent": {"kind": "slow", "delay": 4, "after": True, "count": 2, "action": "QueryTextToImageJob"}},
}
IMPATIENT = 1.5  # the `timeout` of the Block the timeout faults run with (the sandbox's: 30-60 s)


def doc_table() -> dict[tuple[str, str, str], str]:
    """The matrix as `docs/paying-once.md` states it: (column, moment, fault) -> outcome."""
    text = DOC.read_text().split("## The fault matrix", 1)[1]
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {}
    for line in rows[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        fault, moment = cells[0], cells[1].strip("`")
        for column, outcome in zip(header[2:], cells[2:], strict=True):
            if outcome != "-":
                out[(column, moment, fault)] = outcome
    return out


def spec_for(column: str, name: str, n: int) -> str:
    if column.startswith("tencent ImageToImage"):  # a synchronous call: answered with a URL (an hour) or the image
        return image_to_image_spec(name, n, "base64" if column.endswith("base64") else "url", run=", max_parallel: 8")
    text = spec_text(COLUMNS[column], name, n, run=", max_parallel: 8")
    if column == "tencent RefineImage":
        text = text.replace("archive:", "upscale: {engine: provider, factor: 2}\narchive:")
    return text


def settle_as_a_person(provider: str, path: Path, name: str) -> list[str]:
    """Every item left `unknown` (or `sending`) resolved as a person would from the provider's
    console: with the job made for its prompt, or `--not-sent` where there is none (a paid
    upscale has no job to name: it is sent again)."""
    spec = load_spec(path)
    settled = []
    for record in JobLedger(spec.archive, spec.name, DAY).records():
        if record.state not in (State.UNKNOWN, State.SENDING):
            continue
        how = ["--not-sent"]
        if record.step is Step.GENERATE:
            prompt = f"item {record.item_id.removeprefix('i')} of {name}"
            made = stats_jobs(provider)
            job = next((j for j, v in made.items() if v["prompt"] == prompt), None)
            how = ["--job-id", job] if job else how
        extra = ["--step", "refine", "--index", str(record.index)] if record.step is Step.REFINE else []
        assert imagegen(["ledger", "resolve", str(path), record.item_id, "--run-date", DAY.isoformat(),
                         *extra, *how]) == 0
        settled.append(f"{record.item_id}/{record.step.value}")
    return settled


_EMULATORS = {}


def stats_jobs(provider: str) -> dict:
    found = stats(_EMULATORS["state"], provider)
    return found["tasks" if provider == "chuzhan" else "jobs"]


def rerun_until_done(tmp_path: Path, path: Path, name: str, provider: str) -> tuple[object, list[str]]:
    """Rerun the date (a person settling what the run leaves for one) until it completes."""
    settled: list[str] = []
    for _ in range(MAX_RERUNS):
        state = run_spec(tmp_path, path.read_text(), DAY, path=path)
        if state.is_completed():
            return state, settled
        settled += settle_as_a_person(provider, path, name)
    return state, settled


def decisions(text: str) -> dict[str, tuple[str, str]]:
    """The cell (ledger row, action) each item's step took when first rerun, from the log
    (`flows.paying.paystep`): `i1 generate` -> ("sending", "CONFIRM")."""
    found: dict[str, tuple[str, str]] = {}
    cell = r"(\S+ (?:generate|refine)): an earlier try .*?\[table: ledger (.+?), \w+ provider: (\w+)\]"
    for step, row, action in re.findall(cell, text):
        found.setdefault(step, (row, action))
    return found


RERUN_TAKES = {  # moment -> provider column -> the cell its step's rerun takes first (none: no record)
    "sending": {"dedupes": ("sending", "SEND_AGAIN"), "confirms": ("sending", "CONFIRM"),
                "neither": ("sending", "PERSON")},
    "answered": {"dedupes": ("sending", "SEND_AGAIN"), "confirms": ("sending", "CONFIRM"),
                 "neither": ("sending", "PERSON")},
    "polling": {c: ("submitted", "POLL") for c in ("dedupes", "confirms", "neither")},
    "generated": {c: ("submitted", "POLL") for c in ("dedupes", "confirms", "neither")},
    "archiving": {c: ("submitted", "POLL") for c in ("dedupes", "confirms", "neither")},
}
COLUMN_OF = {"tams": "dedupes", "chuzhan": "confirms", "tencent": "neither", "tencent RefineImage": "neither",
             "tencent ImageToImage": "neither", "tencent ImageToImage base64": "synchronous"}
RERUN_TAKES_URL = {"sending": ("sending", "PERSON"), "answered": ("sending", "PERSON"),  # an answer by URL:
                   "polling": ("submitted", "POLL"),  # downloaded again from it, then kept at once
                   "generated": ("done, kept", "READ_KEPT"), "archiving": ("done, kept", "READ_KEPT")}
RERUN_TAKES_SYNC = {"sending": ("sending", "PERSON"), "answered": ("sending", "PERSON"),  # no job id yet: `neither`
                    "generated": ("done, kept", "READ_KEPT"), "archiving": ("done, kept", "READ_KEPT")}


def outcome(settled: list[str], item: str, paid: int) -> str:
    if any(s.startswith(item + "/") for s in settled):
        return "person" if paid == 1 else f"person, paid {paid}x"
    return "held" if paid == 1 else f"PAID {paid}x"


@pytest.fixture()
def matrix(emulators, tmp_path, caplog):
    """Faults cleared around each test; task-run INFO lines (the paid step's decisions) logged."""
    logger = logging.getLogger("prefect.task_runs")
    level = logger.level
    logger.setLevel(logging.INFO)
    caplog.set_level(logging.INFO, logger="prefect.task_runs")
    _EMULATORS["state"] = emulators
    faults.clear()
    yield
    faults.clear()
    logger.setLevel(level)


@pytest.mark.parametrize("column", list(COLUMNS))
def test_a_step_stopped_at_any_moment_is_paid_once_on_the_rerun(matrix, emulators, tmp_path, caplog, column) -> None:
    """One item per moment, each stopped there; the reruns archive every item, the emulator
    charged each image once, and the items a person settled are those the table says."""
    provider, refine = COLUMNS[column], column.endswith("RefineImage")
    moments = REFINE_STOPPED if refine else SYNC_STOPPED if COLUMN_OF[column] == "synchronous" else STOPPED
    name = f"matrix-stop-{column.replace(' ', '-').lower()}"
    path = tmp_path / f"{name}.yaml"
    path.write_text(spec_for(column, name, len(moments)))
    refines_before = refine_charges(emulators) if refine else 0
    for k, moment in enumerate(moments):
        faults.install(moment, f"i{k}", faults.stop, step="refine" if refine else "generate")
    first = run_spec(tmp_path, path.read_text(), DAY, path=path)
    assert not first.is_completed(), "every item was stopped somewhere"
    errors = {i["item"]: i["error"]["error"] for i in manifest_of(first)["items"] if i.get("error")}
    assert set(errors) == {f"i{k}" for k in range(len(moments))} and set(errors.values()) == {"Stopped"}, errors
    state, settled = rerun_until_done(tmp_path, path, name, provider)
    assert state.is_completed(), manifest_of(state)
    paid = charges(emulators, provider, name)
    seen = {(column, moment, "stop"): outcome(settled, f"i{k}", paid.get(f"item {k} of {name}", 0))
            for k, moment in enumerate(moments)}
    if refine:  # a RefineImage answer lost with its process cannot be asked for again: a person sends it again
        refines = refine_charges(emulators) - refines_before
        assert refines == len(moments) + 1, f"RefineImage charged {refines} times for {len(moments)} images"
    took = decisions(caplog.text)
    print(column, seen, took)
    takes = RERUN_TAKES_SYNC if COLUMN_OF[column] == "synchronous" else RERUN_TAKES_URL \
        if column.endswith("ImageToImage") else {m: by.get(COLUMN_OF[column]) for m, by in RERUN_TAKES.items()}
    for k, moment in enumerate(moments):
        step = "refine" if refine else "generate"
        assert took.get(f"i{k} {step}") == takes.get(moment), (moment, took)
    expected = doc_table()
    assert seen == {key: expected.get(key) for key in seen}, (seen, settled)
    assert all(paid.get(f"item {k} of {name}") == 1 for k, m in enumerate(moments)
               if seen[(column, m, "stop")] == "held"), paid


def refine_charges(state) -> int:
    return sum(v["charges"] for v in stats(state, "tencent")["paid"].values() if v["label"].startswith("RefineImage"))


@pytest.mark.parametrize(("fault", "provider"), [(f, p) for f, by in PROVIDER_FAULTS.items() for p in by])
def test_a_provider_fault_is_paid_once_on_the_rerun(matrix, emulators, tmp_path, caplog, fault, provider) -> None:
    """The provider's own fault at its moment, on one item: the run (or its task's retries) and
    the reruns end with it archived and charged once."""
    name = f"matrix-{provider}-{re.sub(r'[^a-z0-9]+', '-', fault.lower()).strip('-')}"
    path = tmp_path / f"{name}.yaml"
    text = spec_for(provider, name, 1)
    if fault.startswith("timeout"):
        text = text.replace(f"{{{provider}: sandbox}}", f"{{{provider}: {impatient_block(emulators, provider)}}}")
    path.write_text(text)
    inject(emulators, provider, **PROVIDER_FAULTS[fault][provider])
    state, settled = rerun_until_done(tmp_path, path, name, provider)
    assert state.is_completed(), manifest_of(state)
    paid = charges(emulators, provider, name)
    moment = "polling" if "polling" in fault else "sending"
    got = outcome(settled, "i0", paid.get(f"item 0 of {name}", 0))
    assert got == doc_table().get((provider, moment, fault)), (got, decisions(caplog.text))
    assert paid == {f"item 0 of {name}": 1}


def impatient_block(emulators, provider: str) -> str:  # noqa: ANN001
    """The sandbox account's Block with a `timeout` of IMPATIENT seconds, saved; its name."""
    from deployments.limits import apply_limits

    block = emulators.block(provider)
    block.timeout = IMPATIENT
    block.save("impatient", overwrite=True)
    apply_limits({provider: ["sandbox", "impatient"]})
    return "impatient"


@pytest.mark.parametrize("answer", ["url", "base64"])
def test_a_synchronous_answer_whose_archived_image_is_lost_is_not_paid_again(matrix, emulators, tmp_path,
                                                                              answer) -> None:
    """Tencent ImageToImage answers once, with the image or a URL to it that lives an hour. When
    that image is gone from the archive after its run, the rerun downloads it again from the
    recorded URL; an image given as base64 cannot be fetched again, and is not paid for again on
    its own: the item fails `ArchivedImagesLost`, naming how to pay once more. The emulator
    charged once either way."""
    from tests.conftest import TEST_BUCKET, s3_client

    name = f"matrix-sync-lost-{answer}"
    path = tmp_path / f"{name}.yaml"
    path.write_text(spec_for("tencent ImageToImage" + (" base64" if answer == "base64" else ""), name, 1))
    assert run_spec(tmp_path, path.read_text(), DAY, path=path).is_completed()
    s3 = s3_client(emulators)
    s3.delete_object(Bucket=TEST_BUCKET, Key=f"{name}/{DAY}/i0-1.png")
    again = run_spec(tmp_path, path.read_text(), DAY, path=path)
    errors = {i["item"]: i["error"] for i in manifest_of(again)["items"] if i.get("error")}
    if answer == "url":
        assert again.is_completed() and not errors, errors
        assert s3.head_object(Bucket=TEST_BUCKET, Key=f"{name}/{DAY}/i0-1.png")["ContentLength"] > 0
    else:
        assert errors["i0"]["error"] == "ArchivedImagesLost" and "delete its ledger record" in errors["i0"]["message"], errors
    assert charges(emulators, "tencent", name) == {f"item 0 of {name}": 1}


S3_AWAY = {  # the write -> how many times in a row it fails: past every retry of its task in the first run
    "write-sending": 3, "write-submitted": 2, "put-image": 4, "write-archived": 4}


def s3_gone(moment: str) -> object:
    def fail() -> None:
        if moment == "put-image":
            raise ConnectionError("S3 unavailable (fault point)")
        raise LedgerUnavailable("S3 unavailable (fault point)")
    return fail


@pytest.mark.parametrize("provider", ["tams", "chuzhan", "tencent"])
def test_s3_away_at_each_write_is_paid_once(matrix, emulators, tmp_path, caplog, provider) -> None:
    """One item per write of a paid step, each failing as when S3 stays away past the ledger's
    retries (`LedgerUnavailable`) and past its task's retries: the `sending` record (nothing is
    sent), the `submitted` record and its rewrite at the step's end (the job goes on; its id is
    logged), the first archived image, the `archived` record (the images and sidecars are in
    the bucket). The first run and a rerun archive every item, each charged once."""
    name = f"matrix-s3-{provider}"
    path = tmp_path / f"{name}.yaml"
    path.write_text(spec_for(provider, name, len(S3_AWAY)))
    for k, (moment, times) in enumerate(S3_AWAY.items()):
        faults.install(moment, f"i{k}", s3_gone(moment), times=times)
    state, settled = rerun_until_done(tmp_path, path, name, provider)
    assert state.is_completed(), manifest_of(state)
    paid = charges(emulators, provider, name)
    seen = {(provider, moment, "S3 away"): outcome(settled, f"i{k}", paid.get(f"item {k} of {name}", 0))
            for k, moment in enumerate(S3_AWAY)}
    print(provider, seen)
    expected = doc_table()
    assert seen == {key: expected.get(key) for key in seen}, (seen, settled)
    assert paid == {f"item {k} of {name}": 1 for k in range(len(S3_AWAY))}, paid
    assert "stays unrecorded as" in caplog.text  # the submitted record's rewrite failed too: logged, with the job
