"""Pay once, on every provider: refusals, ambiguous answers, kills and two runs of one date.

Every assertion about money is on what the emulators charged (`paid`: charges per request,
summed per image by its prompt), never on our own ledger alone. TAMS dedupes request ids for
us; 触站AI and Tencent do not, so these are the tests that would catch a double charge.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import httpx
import pytest

from deployments.limits import limits_in_use
from flows.paying.ledger import JobLedger, LedgerConflict, LedgerUnavailable, State, move
from flows.specs.spec import ArchiveSettings
from flows.specs.spec import load_spec
from tests.conftest import TEST_BUCKET, run_spec, s3_client
from tests.test_limits_and_faults import cli_env, manifest_of

ROOT = Path(__file__).parent.parent
PROVIDERS = ("tams", "chuzhan", "tencent")
GENERATE = {"tams": '{width: 512, height: 512, steps: 20, sampler: "Euler a"}',
            "chuzhan": "{width: 512, height: 512}",
            "tencent": "{width: 1024, height: 1024, options: {LogoAdd: 0}}"}


def spec_text(provider: str, name: str, n: int, run: str = "") -> str:
    items = "".join(f"  - {{id: i{k}, prompt: 'item {k} of {name}'}}\n" for k in range(n))
    return f"""\
version: 1
name: {name}
provider: {provider}
blocks: {{{provider}: sandbox}}
generate: {GENERATE[provider]}
archive: {{bucket: {TEST_BUCKET}, credentials: sandbox}}
run: {{poll_interval: 0.2, job_timeout: 60, unknown_hold: 1{run}{'' if 'max_parallel' in run else ', max_parallel: 4'}}}
items:
{items}"""


def url(state, provider: str) -> str:
    return {"tams": state.url('tams'), "chuzhan": state.url('chuzhan'), "tencent": state.url('tencent')}[provider]


def stats(state, provider: str) -> dict:
    return httpx.get(f"{url(state, provider)}/_sandbox/stats").json()


def charges(state, provider: str, name: str) -> dict[str, int]:
    """What the emulator charged for each image of spec `name`, summed over every request."""
    out: dict[str, int] = {}
    for entry in stats(state, provider)["paid"].values():
        if entry["label"].endswith(f" of {name}"):
            out[entry["label"]] = out.get(entry["label"], 0) + entry["charges"]
    return {label: n for label, n in out.items() if n}


def once_each(name: str, n: int) -> dict[str, int]:
    return {f"item {k} of {name}": 1 for k in range(n)}


def inject(state, provider: str, **fault) -> None:
    httpx.post(f"{url(state, provider)}/_sandbox/faults", json=fault).raise_for_status()


def configure(state, provider: str, **settings) -> None:
    httpx.post(f"{url(state, provider)}/_sandbox/config", json=settings).raise_for_status()


@pytest.fixture()
def emulators(sandbox_blocks):
    """The sandbox, with every emulator's faults, latency and balance restored after each test."""
    yield sandbox_blocks
    for provider in PROVIDERS:
        httpx.delete(f"{url(sandbox_blocks, provider)}/_sandbox/faults")
        configure(sandbox_blocks, provider, latency=0.6, **({} if provider == "tencent" else {"balance": 100000}))


def ledger_states(path: Path, run_date: date) -> dict[str, str]:
    spec = load_spec(path)
    return {r.item_id: r.state.value for r in JobLedger(spec.archive, spec.name, run_date).records()}


def write_spec(tmp_path: Path, text: str, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def imagegen(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          env=env or cli_env(), cwd=ROOT, timeout=300)


# --- a refused submit: nothing was created, so the rerun sends it and pays once -----------------------

def refuse_next_submit(state, provider: str) -> None:
    if provider == "tencent":  # an account error code answers the submit: no job, no charge
        inject(state, provider, code="ResourceUnavailable.InArrears", count=1, action="SubmitTextToImageJob")
    else:  # an empty balance
        configure(state, provider, balance=0)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_refused_submit_is_sent_again_by_the_rerun_and_paid_once(emulators, tmp_path, provider) -> None:
    name, day = f"refused-{provider}", date(2026, 7, 1)
    path = write_spec(tmp_path, spec_text(provider, name, 3, ", max_parallel: 1"), name)
    refuse_next_submit(emulators, provider)
    first = run_spec(tmp_path, path.read_text(), day, path=path)
    manifest = manifest_of(first)
    assert first.is_failed() and manifest["totals"]["images"] == 0
    assert manifest["items"][0]["error"]["error"] == "AccountStop"
    assert charges(emulators, provider, name) == {}
    assert ledger_states(path, day) == {"i0": "refused"}  # the others were never sent: no record at all
    httpx.delete(f"{url(emulators, provider)}/_sandbox/faults")
    if provider != "tencent":
        configure(emulators, provider, balance=100000)
    again = run_spec(tmp_path, path.read_text(), day, path=path)
    assert again.is_completed(), [i.get("error") for i in manifest_of(again)["items"]]
    assert charges(emulators, provider, name) == once_each(name, 3)
    assert set(ledger_states(path, day).values()) == {"archived"}


# --- a job the provider does not know --------------------------------------------------------------------

UNKNOWN_JOB = {"tams": "700000000000000999", "chuzhan": "0" * 32, "tencent": "00000000-0000-4000-8000-000000000000"}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_paid_job_the_provider_does_not_know_is_told_and_never_paid_again_on_its_own(emulators, tmp_path,
                                                                                      provider) -> None:
    """A `submitted` record naming a job its provider does not know (the Block's account changed, the
    provider dropped the job, a person resolved the item with a mistyped id; the sandbox restarted
    empty did it too) failed every run `BadRequest: ... job not found`, with no way out: `ledger
    resolve` refused a submitted record. Now the item says what happened and the two ways out, its
    record stays `submitted`, nothing is sent; after `resolve --not-sent` the next run pays once."""
    from flows.paying.ledger import Step
    from flows.pipeline import plan_items

    name, day = f"gone-{provider}", date(2026, 7, 9)
    path = write_spec(tmp_path, spec_text(provider, name, 1), name)
    [plan] = plan_items(load_spec(path), "", day, str(tmp_path), str(path))
    ledger = JobLedger(load_spec(path).archive, name, day)
    rid = plan.request.request_id
    record = ledger.move(None, State.SENDING, item_id="i0", step=Step.GENERATE, base_request_id=rid, request_id=rid,
                         attempt=1, provider=provider, block=plan.block)
    ledger.move(record, State.SUBMITTED, job_id=UNKNOWN_JOB[provider])
    submits = stats(emulators, provider)["submits"]
    first = run_spec(tmp_path, path.read_text(), day, path=path)
    error = manifest_of(first)["items"][0]["error"]
    assert first.is_failed() and error["error"] == "JobGone", error
    assert f"does not know job {UNKNOWN_JOB[provider]}, which this item paid for" in error["message"], error
    assert f"imagegen ledger resolve {path} i0 --run-date {day} --not-sent" in error["message"], error
    assert ledger_states(path, day) == {"i0": "submitted"}
    assert stats(emulators, provider)["submits"] == submits and charges(emulators, provider, name) == {}
    # Another id is not put over the paid job's without saying so (a refine's help once led here).
    mistyped = imagegen("ledger", "resolve", str(path), "i0", "--run-date", day.isoformat(), "--job-id", "12345")
    assert mistyped.returncode == 1 and f"is submitted as job {UNKNOWN_JOB[provider]}, paid for" in mistyped.stderr
    assert "--replace-job" in mistyped.stderr and ledger_states(path, day) == {"i0": "submitted"}
    settled = imagegen("ledger", "resolve", str(path), "i0", "--run-date", day.isoformat(), "--not-sent")
    assert settled.returncode == 0, settled.stderr
    again = run_spec(tmp_path, path.read_text(), day, path=path)
    assert again.is_completed(), [i.get("error") for i in manifest_of(again)["items"]]
    assert charges(emulators, provider, name) == once_each(name, 1)


# --- an ambiguous answer after the job was created -----------------------------------------------------

AMBIGUOUS = {
    "tams": {"kind": "drop", "count": 1, "method": "POST", "path": "/v1/jobs", "exact": True},  # created, cut off
    "chuzhan": {"kind": "error_after", "count": 1},  # created and charged, then code 500
    "tencent": {"code": "InternalError", "after": True, "count": 1, "action": "SubmitTextToImageJob"},
}


def job_of(state, provider: str, prompt: str) -> str:
    """The job the provider created for `prompt`, as a person finds it in the provider console."""
    found = stats(state, provider)["tasks" if provider == "chuzhan" else "jobs"]
    return next(job_id for job_id, job in found.items() if job["prompt"] == prompt)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_an_ambiguous_answer_after_the_job_was_created_is_never_paid_twice(emulators, tmp_path, provider) -> None:
    name, day = f"ambiguous-{provider}", date(2026, 7, 2)
    path = write_spec(tmp_path, spec_text(provider, name, 3, ", max_parallel: 1"), name)
    inject(emulators, provider, **AMBIGUOUS[provider])
    first = run_spec(tmp_path, path.read_text(), day, path=path)
    if provider == "tams":  # asked again with the same request id: the provider returns the job it made
        assert first.is_completed(), manifest_of(first)
        assert charges(emulators, provider, name) == once_each(name, 3)
        assert stats(emulators, provider)["duplicate_submits"] >= 1
        return
    manifest = manifest_of(first)
    assert first.is_failed() and manifest["totals"]["images"] == 2
    error = manifest["items"][0]["error"]
    assert error["error"] == "SubmitUnknown" and "imagegen ledger resolve" in error["message"]
    assert ledger_states(path, day)["i0"] == "unknown"
    assert charges(emulators, provider, name) == once_each(name, 3)  # the provider made and charged it once
    # A rerun does not send it blindly again.
    submits = stats(emulators, provider)["submits"]
    second = run_spec(tmp_path, path.read_text(), day, path=path)
    assert second.is_failed() and stats(emulators, provider)["submits"] == submits
    # A person finds the job in the console and records it; the next run polls it and archives.
    job_id = job_of(emulators, provider, f"item 0 of {name}")
    # Not another item's job (its image would be archived as both), nor what is no job id.
    theirs = job_of(emulators, provider, f"item 1 of {name}")
    for wrong, said in ((theirs, f"job {theirs} is item i1's"), ("../../_sandbox/stats?x=", "is not a job id")):
        refused = imagegen("ledger", "resolve", str(path), "i0", "--run-date", day.isoformat(), "--job-id", wrong)
        assert refused.returncode == 1 and said in refused.stderr, refused.stderr
    assert ledger_states(path, day)["i0"] == "unknown"
    settled = imagegen("ledger", "resolve", str(path), "i0", "--run-date", day.isoformat(), "--job-id", job_id)
    assert settled.returncode == 0, settled.stderr
    third = run_spec(tmp_path, path.read_text(), day, path=path)
    assert third.is_completed(), manifest_of(third)
    assert stats(emulators, provider)["submits"] == submits
    assert charges(emulators, provider, name) == once_each(name, 3)
    assert manifest_of(third)["items"][0]["job_id"] == job_id


def test_resolve_waits_for_the_date_s_run_to_end(emulators, tmp_path) -> None:
    """A record resolved while the run that wrote it still goes (a second terminal, a detached
    run) was moved under it: the run's own next write then failed, and the job it paid for was
    sent again by the next run. Now `resolve` is refused while the date's last run to take its
    claim has written no manifest, naming that run, unless the person says it was killed; and
    while a run holds the date's claim on the Prefect server it is refused even then (the
    person's word was taken on trust)."""
    from flows.paying.claim import claim_name
    from flows.paying.slots import hold

    name, day = "resolve-live-chuzhan", date(2026, 7, 4)
    path = write_spec(tmp_path, spec_text("chuzhan", name, 1), name)
    inject(emulators, "chuzhan", kind="error_before", count=1)
    assert run_spec(tmp_path, path.read_text(), day, path=path).is_failed()
    spec = load_spec(path)
    JobLedger(spec.archive, name, day).write_claim_note({"flow_run_id": "0f0f-live", "flow_run_name": "brave-otter",
                                                         "started_at": "2026-07-04T10:00:00+00:00"})
    args = ("ledger", "resolve", str(path), "i0", "--run-date", day.isoformat(), "--not-sent")
    refused = imagegen(*args)
    assert refused.returncode == 1 and "flow run brave-otter (0f0f-live)" in refused.stderr, refused.stderr
    assert "wrote no manifest" in refused.stderr and "add --run-ended" in refused.stderr
    assert "Traceback" not in refused.stderr
    with hold(claim_name(name, day), 60):  # the run is alive after all
        refused = imagegen(*args, "--run-ended")
    assert refused.returncode == 1 and "flow run brave-otter (0f0f-live)" in refused.stderr, refused.stderr
    assert "holds the claim of resolve-live-chuzhan for 2026-07-04" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert ledger_states(path, day) == {"i0": "unknown"}
    settled = imagegen(*args, "--run-ended")
    assert settled.returncode == 0 and ledger_states(path, day) == {"i0": "refused"}, settled.stderr


def test_a_paid_job_resolved_not_sent_keeps_counting_against_the_cap(emulators, tmp_path) -> None:
    """触站AI made and charged r1's task, then answered code 500 (unknown); a person named a
    mistyped job, the next run said JobGone, and the person said not sent, as JobGone's message
    offers. The record went to `refused` counting nothing, so under a cap of 6 the next run paid
    4 more for it: 8. Now the paid job's count stays in the record, and that run is refused."""
    name, day = "not-sent-paid-chuzhan", date(2026, 7, 5)
    path = write_spec(tmp_path, spec_text("chuzhan", name, 1, run=", max_credits: {chuzhan: 6}"), name)
    before = stats(emulators, "chuzhan")
    inject(emulators, "chuzhan", kind="error_after", count=1)
    assert run_spec(tmp_path, path.read_text(), day, path=path).is_failed()
    where = ("ledger", "resolve", str(path), "i0", "--run-date", day.isoformat())
    assert imagegen(*where, "--job-id", "0123456789abcdef0123456789abcdef").returncode == 0
    gone = run_spec(tmp_path, path.read_text(), day, path=path)
    assert manifest_of(gone)["items"][0]["error"]["error"] == "JobGone"
    settled = imagegen(*where, "--not-sent")
    assert settled.returncode == 0 and "stays counted against run.max_credits" in settled.stdout, settled.stderr
    again = run_spec(tmp_path, path.read_text(), day, path=path)
    after = stats(emulators, "chuzhan")
    assert after["charges"] - before["charges"] == 1, (before["charges"], after["charges"])
    assert "4 of them charged by earlier runs of this date" in str(again.result(raise_on_failure=False))


def test_a_person_can_say_not_sent_and_the_next_run_submits_it(emulators, tmp_path) -> None:
    """触站AI answered code 500 before creating anything; the person checks the console, finds
    nothing, says so, and the next run pays for the image once."""
    name, day = "not-sent-chuzhan", date(2026, 7, 3)
    path = write_spec(tmp_path, spec_text("chuzhan", name, 1), name)
    inject(emulators, "chuzhan", kind="error_before", count=1)
    assert run_spec(tmp_path, path.read_text(), day, path=path).is_failed()
    assert charges(emulators, "chuzhan", name) == {}
    shown = imagegen("ledger", "show", str(path), "--run-date", day.isoformat())
    assert shown.returncode == 0 and "unknown" in shown.stdout and "i0" in shown.stdout
    assert shown.stdout.split()[:2] == ["item", "provider"] and "chuzhan" in shown.stdout.splitlines()[-1].split()[:2]
    settled = imagegen("ledger", "resolve", str(path), "i0", "--run-date", day.isoformat(), "--not-sent")
    assert settled.returncode == 0, settled.stderr
    assert run_spec(tmp_path, path.read_text(), day, path=path).is_completed()
    assert charges(emulators, "chuzhan", name) == once_each(name, 1)


# --- two runs of one date at once -------------------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
def test_two_runs_of_one_date_at_once_pay_once_and_agree_with_the_bucket(emulators, tmp_path, provider) -> None:
    name, day = f"twice-{provider}", date(2026, 7, 4)
    path = write_spec(tmp_path, spec_text(provider, name, 4), name)
    runs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path), "--run-date", day.isoformat()],
                             env=cli_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    # Whether the two overlapped (one waiting for the other's claim) or, on a busy machine, ran
    # one after the other, what matters is the same: each image charged once, by the emulator's count.
    waited = any("another run of" in out and "waiting for it to finish" in out for out in outputs)
    print(f"two runs of {name}: {'one waited for the other' if waited else 'one after the other'}")
    assert charges(emulators, provider, name) == once_each(name, 4)
    listed = s3_client(emulators).list_objects_v2(Bucket=TEST_BUCKET, Prefix=f"{name}/{day}/")["Contents"]
    images = sorted(o["Key"] for o in listed if o["Key"].endswith(".png") and "/_jobs/" not in o["Key"])
    assert images == [f"{name}/{day}/i{k}-1.png" for k in range(4)]
    body = s3_client(emulators).get_object(Bucket=TEST_BUCKET, Key=f"{name}/{day}/manifest.json")["Body"].read()
    manifest = json.loads(body)
    assert manifest["status"] == "complete" and manifest["totals"]["images"] == 4


# --- a killed run -------------------------------------------------------------------------------------

def wait_for(check, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def archived_one(path: Path, day: date) -> bool:
    return "archived" in ledger_states(path, day).values()


def settle_unknown_as_a_person_would(state, provider: str, path: Path, day: date, name: str) -> list[str]:
    """Resolve every `unknown` item with the job the emulator made for its prompt (as a person
    finds it in the console), or `--not-sent` when there is none; returns the items settled."""
    settled = []
    spec = load_spec(path)
    for record in JobLedger(spec.archive, spec.name, day).records():
        if record.state is not State.UNKNOWN:
            continue
        prompt = f"item {record.item_id.removeprefix('i')} of {name}"
        found = stats(state, provider)["tasks" if provider == "chuzhan" else "jobs"]
        job = next((j for j, v in found.items() if v["prompt"] == prompt), None)
        how = ["--job-id", job] if job else ["--not-sent"]
        assert imagegen("ledger", "resolve", str(path), record.item_id, "--run-date", day.isoformat(),
                        *how).returncode == 0
        settled.append(record.item_id)
    return settled


# Two real SIGKILLs (leases and all); every moment on every provider is in the fault matrix
# (`test_fault_matrix.py`), in-process. Tencent after a submit: its single text job slot.
@pytest.mark.parametrize(("provider", "moment"), [("tencent", "after a submit"), ("chuzhan", "archiving")])
def test_a_killed_run_frees_its_slots_and_the_rerun_pays_once(emulators, tmp_path, provider, moment) -> None:
    """Killed right after a submit was answered (the others waiting for the provider's job
    slots: 触站AI 2 in flight, Tencent 1) or while items are being archived: the rerun gets the
    dead run's slots (and its claim on the date) back within one lease period, though the
    Prefect API has no repossessor running, resumes submitted jobs by id, reuses archived items
    and submits the rest, without a person. Only a kill between a submit and its answer may
    leave that one item `unknown` on 触站AI or Tencent; it is settled as a person would. (TAMS
    killed mid-polling: test_limits_and_faults.)"""
    name, day = f"killed-{provider}-{moment.split()[0]}", date(2026, 7, 5)
    path = write_spec(tmp_path, spec_text(provider, name, 3), name)
    configure(emulators, provider, latency=8 if moment == "after a submit" else 2)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path), "--run-date", day.isoformat()],
                            env=cli_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ready = (lambda: "submitted" in ledger_states(path, day).values()) if moment == "after a submit" else \
        (lambda: archived_one(path, day))
    try:
        wait_for(lambda: proc.poll() is None and ready(), moment)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    configure(emulators, provider, latency=0.6)
    started = time.monotonic()
    again = run_spec(tmp_path, path.read_text(), day, path=path)
    waited = time.monotonic() - started
    settled: list[str] = []
    if not again.is_completed() and provider != "tams":
        errors = {i["item"]: i["error"]["error"] for i in manifest_of(again)["items"] if i.get("error")}
        assert set(errors.values()) == {"SubmitUnknown"} and len(errors) == 1, errors
        settled = settle_unknown_as_a_person_would(emulators, provider, path, day, name)
        again = run_spec(tmp_path, path.read_text(), day, path=path)
    assert again.is_completed(), [i.get("error") for i in manifest_of(again)["items"]]
    assert charges(emulators, provider, name) == once_each(name, 3)
    # The dead run's leases (60 s, Prefect's minimum, renewed every 20 s) expire and are reclaimed
    # by the waiting rerun: within one lease period of the kill, plus the run itself.
    assert waited < 100, f"the rerun waited {waited:.0f}s for the dead run's slots"
    print(f"{provider} killed {moment}: the rerun took {waited:.0f}s, charges {charges(emulators, provider, name)}, "
          f"settled by hand: {settled or 'none'}")
    # A lease the dead run renewed last may outlive the rerun by a few seconds: it frees itself
    # within one lease period of the kill, and nothing else may still hold the lanes.
    def lanes_free() -> bool:
        return all(r["active_slots"] == 0 for r in limits_in_use() if f":{provider}:sandbox:jobs:" in str(r["name"]))

    wait_for(lanes_free, "the dead run's last lease", timeout=max(5.0, 90 - (time.monotonic() - started)))


def test_ledger_writes_are_conditional_so_a_second_writer_stops_before_sending(sandbox_blocks) -> None:
    """Two writers that read the same record: the first move wins, the second gets
    LedgerConflict (SeaweedFS honours If-None-Match and If-Match) and sends nothing."""
    archive = ArchiveSettings(bucket=TEST_BUCKET, credentials="sandbox")
    one, two = (JobLedger(archive, "conditional", date(2026, 7, 6)) for _ in range(2))
    identity = {"item_id": "x", "base_request_id": "r", "request_id": "r", "provider": "chuzhan", "block": "sandbox"}
    assert one.get("x") is None and two.get("x") is None
    first = one.move(None, State.SENDING, **identity)
    with pytest.raises(LedgerConflict):
        two.move(None, State.SENDING, **identity)
    seen = two.get("x")  # read again: the table decides from what is there
    assert seen is not None and seen.state is State.SENDING
    two.move(seen, State.UNKNOWN, reason="the run stopped while sending it")
    with pytest.raises(LedgerConflict):  # the first writer's view is stale now
        one.move(first, State.SUBMITTED, job_id="j-1")
    assert one.get("x").state is State.UNKNOWN



def test_a_ledger_write_carried_out_with_its_answer_lost_is_not_taken_for_another_run(s3_cut) -> None:
    """S3 carries out the `submitted` write but its answer is lost, every try (the ledger gives
    up: LedgerUnavailable, the job id logged). The step's next write, once S3 answers again,
    finds the object changed since its last known ETag: by this ledger's own write, not by
    another run. It used to raise LedgerConflict at the end of the step, throwing away the images
    in hand; a change by another run still does."""
    archive = ArchiveSettings(bucket=TEST_BUCKET, credentials="s3-cut")
    ledger, witness = JobLedger(archive, "deaf", date(2026, 7, 8)), JobLedger(archive, "deaf", date(2026, 7, 8))
    identity = {"item_id": "x", "base_request_id": "r", "request_id": "r", "provider": "tams", "block": "sandbox"}
    sending = ledger.move(None, State.SENDING, **identity)
    s3_cut.deafen()
    try:
        with pytest.raises(LedgerUnavailable):
            ledger.move(sending, State.SUBMITTED, job_id="j-1")
    finally:
        s3_cut.restore()
    submitted = witness.get("x")
    assert submitted is not None and submitted.state is State.SUBMITTED  # carried out, its answer lost
    done = ledger.move(move(sending, State.SUBMITTED, job_id="j-1"), State.DONE, job_id="j-1", results=["k"])
    assert witness.get("x") == done
    witness.move(witness.get("x"), State.ARCHIVED, archived={"by": "another run"})  # a real change
    with pytest.raises(LedgerConflict):
        ledger.move(done, State.ARCHIVED, archived={"by": "this run"})


# --- S3 goes away right after a paid submit --------------------------------------------------------

@pytest.fixture(scope="module")
def s3_cut(sandbox_blocks):
    """An AwsCredentials Block `s3-cut` reaching SeaweedFS through a proxy the test can cut,
    with botocore's own retries off so our ledger's backoff is what is measured."""
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    from tests.netcut import CuttableProxy

    proxy = CuttableProxy(int(sandbox_blocks.s3_url.rsplit(":", 1)[1]))
    AwsCredentials(aws_access_key_id=sandbox_blocks.s3_access_key, aws_secret_access_key=sandbox_blocks.s3_secret_key,
                   region_name="us-east-1", aws_client_parameters=AwsClientParameters(
                       endpoint_url=proxy.url, config={"retries": {"max_attempts": 1}, "connect_timeout": 1,
                                                       "read_timeout": 3})).save("s3-cut", overwrite=True)
    yield proxy
    proxy.close()


SLOW_ANSWER = {  # the submit is carried out, and its answer comes 4 s later
    "tams": {"kind": "slow", "count": 1, "method": "POST", "path": "/v1/jobs", "exact": True, "delay": 4},
    "chuzhan": {"kind": "slow", "count": 1, "delay": 4},
    "tencent": {"kind": "slow", "count": 1, "action": "SubmitTextToImageJob", "delay": 4},
}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_s3_gone_right_after_a_paid_submit_loses_no_job(emulators, s3_cut, tmp_path, provider, caplog) -> None:
    """S3 goes away while the provider is answering a submit, and stays away longer than the
    ledger's write retries: the job id is logged, the job is polled to its end meanwhile, and
    it is recorded and archived once S3 is back. One charge, one image."""
    name, day = f"s3-cut-{provider}", date(2026, 7, 7)
    text = spec_text(provider, name, 1).replace("credentials: sandbox}", "credentials: s3-cut}")
    before = stats(emulators, provider)
    inject(emulators, provider, **SLOW_ANSWER[provider])

    def submit_arrived() -> bool:
        now = stats(emulators, provider)
        if provider == "tams":  # the estimate, then the submit, which waits before it is handled
            return now["requests"] - before["requests"] >= 2
        return now["submits"] > before["submits"]

    seen: dict[str, float] = {}

    def cut_s3_while_the_answer_is_on_its_way() -> None:
        wait_for(submit_arrived, "the submit")
        s3_cut.cut()
        seen["cut"] = time.monotonic()
        # Away until the write after the submit has spent all its retries (about 15 s; longer on
        # a loaded machine, whose attempts may each wait out the client's timeouts), at most 90 s.
        deadline = seen["cut"] + 90
        while "ledger write failed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.2)
        seen["restored"] = time.monotonic()
        s3_cut.restore()

    cutter = threading.Thread(target=cut_s3_while_the_answer_is_on_its_way)
    cutter.start()
    started = time.monotonic()
    state = run_spec(tmp_path, text, day)
    cutter.join()
    assert state.is_completed(), manifest_of(state)
    assert charges(emulators, provider, name) == once_each(name, 1)
    job_id = manifest_of(state)["items"][0]["job_id"]
    after = stats(emulators, provider)
    assert "ledger write failed" in caplog.text and f"job {job_id}" in caplog.text, (
        f"{ {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], int)} } started {started:.1f} "
        f"cut {seen.get('cut', 0):.1f} restored {seen.get('restored', 0):.1f}; log: {caplog.text[-2000:]}")
    spec = load_spec(write_spec(tmp_path, text, name))
    (record,) = JobLedger(spec.archive, spec.name, day).records()
    assert record.state is State.ARCHIVED and record.job_id == job_id



@pytest.mark.parametrize("provider", ["chuzhan", "tencent"])
def test_a_sending_write_carried_out_with_its_answer_lost_is_not_left_for_a_person(emulators, s3_cut, tmp_path,
                                                                                   provider) -> None:
    """S3 carries out the `sending` write but every answer is lost, so the step stops before
    sending (nothing sent unrecorded) and Prefect retries it. The retry found `sending` and, on
    a provider that neither dedupes nor is confirmed by a callback here, stopped the item for a
    person, though this very process knew the call was never made. Now the retry marks it not
    sent and pays once."""
    from flows.paying import faults

    name, day = f"deaf-sending-{provider}", date(2026, 7, 9)
    text = spec_text(provider, name, 1).replace("credentials: sandbox}", "credentials: s3-cut}")
    faults.install("write-sending", "i0", s3_cut.deafen)  # the first try's `sending` lands, its answers do not
    faults.install("slot", "i0", s3_cut.restore, times=2)  # S3 answers again when the step starts over
    try:
        state = run_spec(tmp_path, text, day)
    finally:
        faults.clear()
        s3_cut.restore()
    assert state.is_completed(), manifest_of(state)
    assert charges(emulators, provider, name) == once_each(name, 1)
    spec = load_spec(write_spec(tmp_path, text, name))
    (record,) = JobLedger(spec.archive, spec.name, day).records()
    assert record.state is State.ARCHIVED


def test_s3_gone_while_a_synchronous_call_answers_loses_no_image(emulators, s3_cut, tmp_path, caplog) -> None:
    """Tencent ImageToImage answered with the image itself (base64: given once) while S3 was
    away, and S3 stayed away past the ledger's retries of its writes. The answer lives only in
    the process, so the end of the step keeps writing it (the image kept first) until S3 is
    back, where it used to log it and go on: the archive's retries ran out, the run's work dir
    went with the image, and the rerun found the call `sending`, for a person who paid again."""
    name, day = "s3-cut-i2i", date(2026, 7, 11)
    text = image_to_image_spec(name, 1, "base64").replace("credentials: sandbox}", "credentials: s3-cut}")
    before = stats(emulators, "tencent")
    inject(emulators, "tencent", kind="slow", count=1, action="ImageToImage", delay=4)
    seen: dict[str, float] = {}

    def cut_s3_while_the_answer_is_on_its_way() -> None:
        wait_for(lambda: stats(emulators, "tencent")["by_action"].get("ImageToImage", 0)
                 > before["by_action"].get("ImageToImage", 0), "the ImageToImage call")
        s3_cut.cut()
        seen["cut"] = time.monotonic()
        # Away until the end of the step holds the answer (every write before it ran out of
        # retries), and 20 s more; at most 150 s, past where the run used to give the image up.
        deadline, held = seen["cut"] + 150, None
        while time.monotonic() < min(deadline, held or deadline):
            if held is None and "held in this process only" in caplog.text:
                held = time.monotonic() + 20
            time.sleep(0.2)
        seen["restored"] = time.monotonic()
        s3_cut.restore()

    cutter = threading.Thread(target=cut_s3_while_the_answer_is_on_its_way)
    cutter.start()
    try:
        state = run_spec(tmp_path, text, day)
    finally:
        cutter.join()
        s3_cut.restore()
    assert state.is_completed(), (manifest_of(state), seen)
    assert charges(emulators, "tencent", name) == once_each(name, 1)
    assert seen["restored"] - seen["cut"] > 40, seen  # longer than the ledger's retries of one write
    spec = load_spec(write_spec(tmp_path, text, name))
    (record,) = JobLedger(spec.archive, spec.name, day).records()
    assert record.state is State.ARCHIVED
    assert run_spec(tmp_path, text, day).is_completed()  # the rerun reads it all back, paying nothing
    assert charges(emulators, "tencent", name) == once_each(name, 1)


# --- the provider's separate paid upscale --------------------------------------------------------------

def through_result_503(emulators, tmp_path: Path, text: str, day: date, action: str) -> tuple:  # noqa: ANN001
    """The spec run with `action`'s result downloads answering 503 six times (past the retries of
    one download): its final state, the Tencent emulator's stats before and after. It completed."""
    before = stats(emulators, "tencent")
    inject(emulators, "tencent", kind="result_503", count=6, action=action)
    state = run_spec(tmp_path, text, day)
    after = stats(emulators, "tencent")
    assert state.is_completed(), manifest_of(state)
    assert after["injected_faults"] - before["injected_faults"] == 6
    return state, before, after


def test_a_failed_refine_download_retries_the_download_not_the_paid_call(emulators, tmp_path, caplog) -> None:
    """Tencent RefineImage is a paid call of its own with its own ledger record: when its
    result cannot be downloaded (the URL answers 503 past every retry), the retried task
    downloads again from the recorded URL, and a rerun reads everything back; it pays once.
    The URL (a capability for an hour) is kept apart from the record's job id, which log lines
    and `ledger show` print: it was the job id."""
    name, day = "refine-tencent", date(2026, 7, 8)
    text = spec_text("tencent", name, 2).replace("archive:", "upscale: {engine: provider, factor: 2}\narchive:")
    state, before, after = through_result_503(emulators, tmp_path, text, day, "RefineImage")
    refines = [r for r in JobLedger(load_spec(write_spec(tmp_path, text, name)).archive, name, day).records()
               if r.step.value == "refine"]
    assert len(refines) == 2 and not any("sig=" in (r.job_id or "") for r in refines), refines
    assert "sig=" not in caplog.text and "sig=" not in json.dumps(manifest_of(state))
    refined = {k: v["charges"] for k, v in after["paid"].items()
               if v["label"].startswith("RefineImage") and k not in before["paid"]}
    assert len(refined) == 2 and set(refined.values()) == {1}, refined
    assert charges(emulators, "tencent", name) == once_each(name, 2)
    assert after["by_action"]["RefineImage"] - before["by_action"].get("RefineImage", 0) == 2
    assert run_spec(tmp_path, text, day).is_completed()  # the rerun reuses all: no call at all
    assert stats(emulators, "tencent")["requests"] == after["requests"]
    listed = s3_client(emulators).list_objects_v2(Bucket=TEST_BUCKET, Prefix=f"{name}/{day}/_jobs/")["Contents"]
    assert not [o["Key"] for o in listed if o["Key"].endswith(".png")], "kept results are deleted once archived"
    # The upscales' records are archived too, naming no deleted copy: an archived image lost
    # later is made again from the job and the upscale's URL, paying nothing (its record, left
    # `done` with the deleted keys, was read back and failed as if S3 were away).
    refines = [r for r in JobLedger(load_spec(write_spec(tmp_path, text, name)).archive, name, day).records()
               if r.step.value == "refine"]
    assert [(r.state, r.results) for r in refines] == [(State.ARCHIVED, [])] * 2, refines
    uri = manifest_of(state)["items"][0]["objects"][0]["s3_uri"]
    s3_client(emulators).delete_object(Bucket=TEST_BUCKET, Key=uri.split(f"{TEST_BUCKET}/", 1)[1])
    again = run_spec(tmp_path, text, day)
    assert again.is_completed(), [i.get("error") for i in manifest_of(again)["items"]]
    assert charges(emulators, "tencent", name) == once_each(name, 2)
    assert stats(emulators, "tencent")["by_action"]["RefineImage"] == after["by_action"]["RefineImage"]


def image_to_image_spec(name: str, n: int, answer: str | None = None, run: str = "") -> str:
    """A Tencent spec whose items start from an image: each is one synchronous ImageToImage call,
    answered with a result URL (`RspImgType: url`, the default) or the image (`base64`)."""
    asset = ROOT / "pipelines" / "assets" / "sneaker-sketch.png"
    answered = f", RspImgType: {answer}" if answer else ""
    text = spec_text("tencent", name, n, run).replace(
        "options: {LogoAdd: 0}", f'options: {{LogoAdd: 0, Resolution: "768:1024"{answered}}}')
    return text.replace("'}\n", f"', input_image: {asset}}}\n")


def test_a_failed_image_to_image_download_retries_the_download_not_the_paid_call(emulators, tmp_path, caplog) -> None:
    """Tencent ImageToImage answers with a result URL that lives an hour: it is recorded before
    the download, so when the URL answers 503 past every retry of the download, the retried task
    downloads again from the recorded URL. Nothing waits for a person; each call is paid once."""
    name, day = "i2i-download-tencent", date(2026, 7, 9)
    text = image_to_image_spec(name, 2)
    state, before, after = through_result_503(emulators, tmp_path, text, day, "ImageToImage")
    assert charges(emulators, "tencent", name) == once_each(name, 2)
    assert after["by_action"]["ImageToImage"] - before["by_action"].get("ImageToImage", 0) == 2
    # The result URLs are capabilities: recorded in the ledger, never in the manifest (nor the log).
    assert "sig=" not in json.dumps(manifest_of(state)) and "sig=" not in caplog.text
    assert run_spec(tmp_path, text, day).is_completed()  # the rerun reuses all: no call at all
    assert stats(emulators, "tencent")["requests"] == after["requests"]


def test_a_run_that_stops_on_an_error_keeps_its_claim_until_its_sent_calls_are_recorded(emulators, tmp_path) -> None:  # noqa: F811
    """The run's own thread fails (here at a fault point where it reads i0's outcome; a Prefect
    API error past its retries, say) while i1's ImageToImage answer is on its way. The run kept
    its tasks running but let its date's claim go at once: a second run let in found i1 still
    `sending` and left it for a person, whose `--not-sent` paid again. Now the claim is held
    until i1's answer is recorded, and the next run reads it back: each image charged once."""
    from flows.paying import faults, paidcalls
    from flows.paying.claim import claim_name
    from flows.paying.slots import api_client
    from prefect.runtime import flow_run

    name, day = "stops-with-calls-sent", date(2026, 7, 23)
    path = tmp_path / f"{name}.yaml"
    text = image_to_image_spec(name, 2, run=", max_parallel: 2")
    seen: dict[str, bool] = {}

    def claim_free() -> bool:
        return api_client().read_global_concurrency_limit_by_name(claim_name(name, day)).active_slots == 0

    def run_body_fails() -> None:
        raise RuntimeError("the Prefect API answered 503 past the client's retries")

    def answered_while_the_run_stops() -> None:  # i1's answer is in, not yet recorded
        run, deadline = flow_run.id, time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                paidcalls.check(run)
            except paidcalls.RunStopping:
                break  # the run's body has failed
            time.sleep(0.1)
        seen["run stopped"] = time.monotonic() < deadline
        seen["claim let go"] = wait_until(claim_free, 10.0)

    faults.install("slot", "i1", lambda: time.sleep(0.5))  # i0's call goes first
    faults.install("outcome", "i0", run_body_fails)
    faults.install("answered", "i1", answered_while_the_run_stops)
    try:
        first = run_spec(tmp_path, text, day, path=path)
    finally:
        faults.clear()
    assert first.is_failed() and seen == {"run stopped": True, "claim let go": False}, seen
    assert JobLedger(load_spec(path).archive, name, day).get("i1").state in (State.DONE, State.ARCHIVED)
    assert run_spec(tmp_path, text, day, path=path).is_completed()
    assert charges(emulators, "tencent", name) == once_each(name, 2)


def wait_until(check, seconds: float) -> bool:  # noqa: ANN001
    """True as soon as `check()` is, False if it never is in `seconds`."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def stopped_at(moment: str, tmp_path: Path, path: Path, day: date) -> tuple[JobLedger, object]:
    """The spec at `path` run with item i0's generate step stopped at `moment` (it does not
    complete): the date's ledger and i0's record."""
    from flows.paying import faults
    from flows.paying.ledger import Step

    faults.install(moment, "i0", faults.stop)
    try:
        assert not run_spec(tmp_path, path.read_text(), day, path=path).is_completed()
    finally:
        faults.clear()
    ledger = JobLedger(load_spec(path).archive, path.stem, day)
    return ledger, ledger.get("i0", Step.GENERATE)


def test_an_answer_kept_before_its_record_said_so_is_read_back_not_lost(emulators, tmp_path) -> None:
    """ImageToImage answered with the image itself (base64: given once), the image kept in S3,
    and the run stopped before the record saying `done` was written (it says `sending`). The
    rerun finds the kept image by its key and archives it, paying nothing; it used to stop the
    item for a person, who paid again."""
    from flows.paying.ledger import Step

    name, day = "i2i-kept-tencent", date(2026, 7, 12)
    path = write_spec(tmp_path, image_to_image_spec(name, 1, "base64"), name)
    ledger, record = stopped_at("write-done", tmp_path, path, day)
    assert record.state is State.SENDING and ledger.unnamed_results(record), record
    calls = stats(emulators, "tencent")["by_action"]["ImageToImage"]
    again = run_spec(tmp_path, path.read_text(), day, path=path)
    assert again.is_completed(), [i.get("error") for i in manifest_of(again)["items"]]
    assert stats(emulators, "tencent")["by_action"]["ImageToImage"] == calls
    assert charges(emulators, "tencent", name) == once_each(name, 1)
    archived = ledger.get("i0", Step.GENERATE)
    assert archived.state is State.ARCHIVED and archived.job_id, archived  # a record naming no job reads as none


def taken_over_while_answered(tmp_path: Path, path: Path, day: date, stop_at: str | None) -> None:
    """Run the spec at `path` with i0's `sending` record moved to `unknown` while its answer
    comes in, as a second run of the date does on finding it (`left_sending`), then stopped at
    `stop_at` (None: left to end)."""
    from flows.paying import faults

    ledger = JobLedger(load_spec(path).archive, path.stem, day)

    def another_run_takes_it() -> None:
        record = ledger.get("i0")
        assert record is not None and record.state is State.SENDING, record
        ledger.move(record, State.UNKNOWN, reason="SubmitUnknown: the run stopped while sending it")

    faults.install("answered", "i0", another_run_takes_it)
    if stop_at is not None:
        faults.install(stop_at, "i0", faults.stop)
    try:
        run_spec(tmp_path, path.read_text(), day, path=path)
    finally:
        faults.clear()


@pytest.mark.parametrize("stop_at", ["generated", "write-archived", None])
def test_an_answer_another_run_took_for_lost_is_read_back_not_paid_again(emulators, tmp_path, stop_at) -> None:  # noqa: F811
    """Another run found i0 `sending` and moved it to `unknown` while its ImageToImage answer
    (the image itself) came in: this run kept the image (`generated`: and stopped there) or
    archived it (None; `write-archived`: and stopped before recording that), its own record
    writes refused (archived: `BadTransition`). The record stayed `unknown`; each rerun
    stopped the item for a person, and `ledger resolve --not-sent`, the advice for a call with
    no job to look up, paid again. Now a person is refused that while the answer's images are
    kept, and the rerun reads them back (or adopts the archived ones): charged once, no call."""
    name, day = f"i2i-taken-{stop_at or 'archived'}", date(2026, 7, 24)  # the archived images: sidecars
    path = write_spec(tmp_path, image_to_image_spec(name, 1, "base64"), name)
    taken_over_while_answered(tmp_path, path, day, stop_at)
    ledger = JobLedger(load_spec(path).archive, name, day)  # archived: what archived it records it, unknown or not
    assert ledger.get("i0").state is (State.UNKNOWN if stop_at else State.ARCHIVED)
    if stop_at == "generated":
        settled = imagegen("ledger", "resolve", str(path), "i0", "--run-date", day.isoformat(), "--not-sent",
                           "--run-ended")
        assert settled.returncode == 1 and "was sent and answered" in settled.stderr, settled.stderr
        assert "Traceback" not in settled.stderr and ledger.get("i0").state is State.UNKNOWN
    calls = stats(emulators, "tencent")["by_action"]["ImageToImage"]
    again = run_spec(tmp_path, path.read_text(), day, path=path)
    assert again.is_completed(), [i.get("error") for i in manifest_of(again)["items"]]
    assert stats(emulators, "tencent")["by_action"]["ImageToImage"] == calls
    assert charges(emulators, "tencent", name) == once_each(name, 1)
    archived = ledger.get("i0")
    assert archived.state is State.ARCHIVED and archived.job_id, archived


def test_an_image_to_image_answer_past_its_hour_says_how_to_pay_once_more(emulators, tmp_path) -> None:
    """A run stopped after ImageToImage answered (its URL recorded, not yet downloaded), rerun
    once the URL no longer gives the image (past its hour; here its signature no longer holds):
    the item fails `AnswerGone` naming `ledger resolve --not-sent`, nothing is sent on its own;
    run as printed, the next run pays for it once more, as the person chose."""
    name, day = "i2i-expired-tencent", date(2026, 7, 10)
    path = write_spec(tmp_path, image_to_image_spec(name, 1), name)
    ledger, record = stopped_at("polling", tmp_path, path, day)
    assert record.state is State.SUBMITTED and record.job_id.startswith("answer:"), record
    [answer] = record.answer_urls
    assert answer.startswith(url(emulators, "tencent")), record
    ledger.move(record, State.SUBMITTED, answer_urls=[answer.split("?")[0] + "?expires=1&sig=" + "0" * 64])
    calls = stats(emulators, "tencent")["by_action"]["ImageToImage"]
    again = run_spec(tmp_path, path.read_text(), day, path=path)
    error = manifest_of(again)["items"][0]["error"]
    assert error["error"] == "AnswerGone", error
    assert f"imagegen ledger resolve {path} i0 --run-date {day} --not-sent" in error["message"], error
    assert stats(emulators, "tencent")["by_action"]["ImageToImage"] == calls
    assert charges(emulators, "tencent", name) == once_each(name, 1)
    settled = imagegen("ledger", "resolve", str(path), "i0", "--run-date", day.isoformat(), "--not-sent")
    assert settled.returncode == 0, settled.stderr
    assert run_spec(tmp_path, path.read_text(), day, path=path).is_completed()
    assert charges(emulators, "tencent", name) == {f"item 0 of {name}": 2}


def test_on_the_embedded_server_a_killed_run_never_blocks_the_lane_for_good(emulators, tmp_path) -> None:
    """The case measured in the issue: `imagegen run` with no PREFECT_API_URL (its own
    temporary server on SQLite in PREFECT_HOME) killed while holding Tencent's single text job
    slot. Its server dies with it; the next run on that home gets the lane back (the leases
    were on disk, and the next run frees the expired ones) and completes, paying once."""
    home = tmp_path / "home"
    env = embedded_env(emulators, home)
    name, day = "embedded-killed-tencent", date(2026, 7, 9)
    path = write_spec(tmp_path, spec_text("tencent", name, 2), name)
    configure(emulators, "tencent", latency=8)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path), "--run-date", day.isoformat()],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is None and "submitted" in ledger_states(path, day).values(), "a submitted job")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert list((home / "concurrency_leases").glob("*.json")), "the leases were not kept on disk"
    configure(emulators, "tencent", latency=0.6)
    started = time.monotonic()
    again = imagegen("run", str(path), "--run-date", day.isoformat(), env=env)
    waited = time.monotonic() - started
    assert again.returncode == 0, again.stdout + again.stderr
    assert charges(emulators, "tencent", name) == once_each(name, 2)
    print(f"embedded server, kill and rerun: the rerun took {waited:.0f}s")


def embedded_env(emulators, home: Path) -> dict[str, str]:  # noqa: ANN001
    """The environment of an `imagegen` command on its own temporary server in `home`, with the
    sandbox's Blocks and limits registered there."""
    home.mkdir()
    drop = ("PREFECT_API_URL", "IMAGEGEN_RECLAIM_LEASES", "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE")
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "PREFECT_HOME": str(home),
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    registered = imagegen("sandbox", "register", "--state-dir", emulators.state_dir, env=env)
    assert registered.returncode == 0, registered.stderr
    return env


def test_the_temporary_server_killed_mid_run_is_started_again_and_the_run_completes(emulators, tmp_path) -> None:
    """`imagegen run` on its temporary server, the server killed (`kill -9`, as the kernel short
    of memory does) while a paid job runs: it is started again on its port and database, the run
    goes on and completes, paying once. It used to hang, every Prefect call refused."""
    env = embedded_env(emulators, tmp_path / "home")
    name, day = "embedded-server-killed", date(2026, 7, 12)
    path = write_spec(tmp_path, spec_text("tencent", name, 3, ", max_parallel: 1"), name)
    configure(emulators, "tencent", latency=4)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path), "--run-date", day.isoformat()],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is None and "submitted" in ledger_states(path, day).values(), "a submitted job")
        [server] = [pid for pid in children(proc.pid) if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(server, signal.SIGKILL)
        out = proc.communicate(timeout=300)[0]
    finally:
        configure(emulators, "tencent", latency=0.6)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert "the temporary Prefect server stopped (exit -9); starting it again" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert charges(emulators, "tencent", name) == once_each(name, 3)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


# --- a record left `sending` by a process that died mid-send ------------------------------------------

def leave_sending(path: Path, day: date, *, reached_provider: bool) -> str:
    """What a process killed right after recording `sending` leaves behind: the record, and,
    when its request was on the wire, the job the provider created for it."""
    from flows.paying.ledger import move
    from flows.pipeline import plan_items
    from flows.running.tasks import provider_for

    spec = load_spec(path)
    plan = plan_items(spec, "", day, "")[0]
    if reached_provider:
        provider_for(plan.provider, plan.block).submit(plan.request)
    record = move(None, State.SENDING, item_id=plan.item_id, base_request_id=plan.request.request_id,
                  request_id=plan.request.request_id, provider=plan.provider, block=plan.block)
    JobLedger(spec.archive, spec.name, day).put(record)
    return plan.item_id


@pytest.mark.parametrize("reached_provider", [True, False], ids=["on-the-wire", "before-the-wire"])
def test_tams_sends_an_item_left_sending_again_under_its_id_and_pays_once(emulators, tmp_path,
                                                                          reached_provider) -> None:
    """TAMS dedupes request ids: the rerun sends it again under the same id, and the provider
    answers with the job it made the first time (no `sending -> sending`, no stranded item)."""
    name, day = f"sending-tams-{int(reached_provider)}", date(2026, 7, 11)
    path = write_spec(tmp_path, spec_text("tams", name, 2), name)
    leave_sending(path, day, reached_provider=reached_provider)
    assert run_spec(tmp_path, path.read_text(), day, path=path).is_completed()
    assert charges(emulators, "tams", name) == once_each(name, 2)
    assert set(ledger_states(path, day).values()) == {"archived"}


@pytest.mark.parametrize("provider", ["chuzhan", "tencent"])
def test_an_item_left_sending_where_the_provider_cannot_be_asked_waits_for_a_person(emulators, tmp_path,
                                                                                    provider) -> None:
    """触站AI and Tencent do not dedupe and cannot be asked by our id: the item is `unknown`,
    never sent blindly again; the other item is paid once and archived."""
    name, day = f"sending-{provider}", date(2026, 7, 12)
    path = write_spec(tmp_path, spec_text(provider, name, 2), name)
    item = leave_sending(path, day, reached_provider=True)
    assert run_spec(tmp_path, path.read_text(), day, path=path).is_failed()
    assert charges(emulators, provider, name) == once_each(name, 2)  # the first submit, and the other item
    assert ledger_states(path, day)[item] == "unknown"


def test_a_paid_job_of_an_edited_item_is_not_dropped_without_a_word(emulators, tmp_path, caplog) -> None:
    """The item's job was paid for, then its prompt was edited before it archived: the next run
    pays for it as it now reads (a new request), and says that the earlier job is not collected
    (its record was replaced without a line in the log)."""
    from flows.paying import faults

    name, day = "edited-after-paying", date(2026, 7, 11)
    path = write_spec(tmp_path, spec_text("tams", name, 1), name)
    faults.install("polling", "i0", faults.stop)
    try:
        assert run_spec(tmp_path, path.read_text(), day, path=path).is_failed()
    finally:
        faults.clear()
    spec = load_spec(path)
    [record] = JobLedger(spec.archive, spec.name, day).records()
    assert record.state is State.SUBMITTED and record.job_id, record
    path.write_text(path.read_text().replace(f"'item 0 of {name}'", f"'item 0 of {name}, studio light'"))
    with caplog.at_level("WARNING"):
        assert run_spec(tmp_path, path.read_text(), day, path=path).is_completed()
    assert "i0: its request changed (prompt, seed, size or options) since request" in caplog.text
    assert f"was paid for (job {record.job_id}), not archived; that job's image is not collected" in caplog.text


def test_an_item_moved_to_another_provider_with_its_job_paid_is_told_not_paid_again(emulators, tmp_path) -> None:
    """i0 paid for on TAMS (the run stopped before its image was collected), then moved to 触站AI
    with the same request (the same Block name and prompt: its id does not say the provider).
    The rerun asked 触站AI for TAMS's job, which it did not know (JobGone, naming the wrong
    provider). Now it asks nothing of 触站AI and says how on: put back on TAMS, the job is
    collected, paid once."""
    from flows.paying import faults

    name, day = "moved-paid-tams", date(2026, 7, 11)

    def text(provider: str) -> str:
        return (f"version: 1\nname: {name}\nprovider: {provider}\nblocks: {{tams: sandbox, chuzhan: sandbox}}\n"
                f"generate: {{width: 512, height: 512}}\narchive: {{bucket: {TEST_BUCKET}, credentials: sandbox}}\n"
                f"run: {{poll_interval: 0.2, job_timeout: 60}}\nitems:\n  - {{id: i0, prompt: 'item 0 of {name}'}}\n")

    faults.install("polling", "i0", faults.stop)
    try:
        assert not run_spec(tmp_path, text("tams"), day).is_completed()
    finally:
        faults.clear()
    asked = stats(emulators, "chuzhan")
    moved = run_spec(tmp_path, text("chuzhan"), day)
    now = stats(emulators, "chuzhan")  # its price asked (the estimate), nothing of the job
    assert not moved.is_completed() and (now["submits"], now["polls"]) == (asked["submits"], asked["polls"])
    error = manifest_of(moved)["items"][0]["error"]
    assert error["error"] == "ProviderMoved" and "put the item back on tams" in error["message"], error
    back = run_spec(tmp_path, text("tams"), day)
    assert back.is_completed(), manifest_of(back)
    assert charges(emulators, "tams", name) == once_each(name, 1) and not charges(emulators, "chuzhan", name)
