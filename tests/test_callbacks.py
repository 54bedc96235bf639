"""Callbacks: capability URLs, and the receiver (`imagegen callbacks serve`, its own process)
between the 触站AI and TAMS emulators (which call back as documented, with faults) and runs
on the Prefect test server. What the emulators counted is the witness: charges per image,
status requests per job, callbacks delivered; the receiver's counters say what it refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import httpx
import pytest

from flows.callbacks import Forged, JobRef, capability_url, read_capability
from sandbox import launcher
from tests.conftest import TEST_BUCKET, chuzhan_stats, run_spec, s3_client, tams_stats
from tests.servers import wait_healthy

ROOT = Path(__file__).resolve().parent.parent
REF = JobRef(provider="chuzhan", block="b", request_id="r1", bucket="x", credentials="c", ledger_prefix="p/",
             record_key="p/one.json")


def test_a_capability_url_verifies_only_with_its_key_and_unaltered() -> None:
    url = capability_url("https://hooks.example.com/cb/", REF, b"k" * 32)
    token = url.rsplit("/", 1)[1]
    assert url.startswith("https://hooks.example.com/cb/v1/heard/")
    assert read_capability(token, b"k" * 32) == REF
    with pytest.raises(Forged):
        read_capability(token, b"other key" * 4)
    with pytest.raises(Forged):
        read_capability(token[:-1] + ("A" if token[-1] != "A" else "B"), b"k" * 32)
    other = capability_url("https://hooks.example.com/cb", JobRef(**{**REF.__dict__, "request_id": "r2"}), b"k" * 32)
    body, sig = token.split("."), other.rsplit("/", 1)[1].split(".")[1]
    with pytest.raises(Forged):  # another job's signature on this job's reference
        read_capability(f"{body[0]}.{sig}", b"k" * 32)


def test_a_loopback_callback_is_taken_only_for_a_loopback_endpoint() -> None:
    from blocks.chuzhan import ChuzhanProvider

    assert ChuzhanProvider(api_token="t", endpoint="http://127.0.0.1:8702", callback="http://127.0.0.1:8710").callback
    with pytest.raises(ValueError, match="public http"):
        ChuzhanProvider(api_token="t", callback="http://127.0.0.1:8710")


# --- on real processes -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def receiver(sandbox_blocks):
    """`imagegen callbacks serve` on a free port, for the test server; Blocks named `cb` that call back to it."""
    from prefect.settings import PREFECT_API_URL

    port = launcher.free_port()
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    log_path = Path(os.environ["PREFECT_HOME"]) / "receiver.log"
    log = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "callbacks", "serve", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, log_path, timeout=60)
    from deployments.limits import apply_limits

    for provider, field in (("chuzhan", "callback"), ("tams", "notify_url")):
        block = sandbox_blocks.block(provider)
        setattr(block, field, url)
        block.callback_fallback_seconds = 4.0
        block.save("cb", overwrite=True)
        httpx.post(f"{sandbox_blocks.url(provider)}/_sandbox/config", json={"callback_step": 0.3})
        block.trust_callbacks = True
        block.save("cb-trust", overwrite=True)
    apply_limits({"chuzhan": ["cb", "cb-trust"], "tams": ["cb", "cb-trust"]})
    yield url
    proc.terminate()
    proc.wait(10)
    log.close()
    for provider in ("chuzhan", "tams"):
        httpx.delete(f"{sandbox_blocks.url(provider)}/_sandbox/faults")


def spec(name: str, provider: str, n: int, *, options: str = "{}", block: str = "cb") -> str:
    items = "".join(f"  - {{id: i{k}, prompt: {name} lamp {k}, count: 1}}\n" for k in range(n))
    return f"""\
version: 1
name: {name}
provider: {provider}
blocks: {{{provider}: {block}}}
generate: {{width: 512, height: 512, steps: 20, model: "1", options: {options}}}
archive: {{bucket: {TEST_BUCKET}, credentials: sandbox}}
run: {{poll_interval: 0.2, job_timeout: 90, max_parallel: 4, unknown_hold: 1}}
items:
{items}"""


def stats_of(provider: str, state) -> dict:  # noqa: ANN001 - a SandboxState
    return chuzhan_stats(state) if provider == "chuzhan" else tams_stats(state)


def charges(stats: dict, name: str) -> list[int]:
    """Charges per paid request whose prompt is of the spec `name` (the emulator's own count)."""
    return sorted(p["charges"] for p in stats["paid"].values() if p["label"].startswith(f"{name} lamp"))


def request_ids(name: str, state, run_date: date) -> list[str]:  # noqa: ANN001
    """The request ids the ledger recorded for the spec's items."""
    s3 = s3_client(state)
    listed = s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix=f"{name}/{run_date}/_jobs/")
    keys = [o["Key"] for o in listed.get("Contents", [])
            if o["Key"].count("/") == 3 and o["Key"].endswith(".json") and not o["Key"].rsplit("/", 1)[1].startswith("_")]
    return [json.loads(s3.get_object(Bucket=TEST_BUCKET, Key=k)["Body"].read())["request_id"] for k in keys]


def archived(name: str, state, run_date: date) -> list[str]:  # noqa: ANN001
    listed = s3_client(state).list_objects_v2(Bucket=TEST_BUCKET, Prefix=f"{name}/{run_date}/")
    return sorted(o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith(".png"))


@pytest.mark.parametrize("provider", ["chuzhan", "tams"])
def test_jobs_end_by_callback_with_one_confirming_poll_each(receiver, sandbox_blocks, tmp_path, provider) -> None:
    """Each job is woken by its callback (the Prefect event reached this process) and polled
    once to confirm it; every image is paid once."""
    from flows import wakeup

    before, heard = stats_of(provider, sandbox_blocks), httpx.get(f"{receiver}/v1/stats").json()
    state = run_spec(tmp_path, spec(f"cb-{provider}", provider, 4), date(2026, 5, 1))
    # Each job's wait was ended by its callback, not left to the 4 s fallback.
    ids = request_ids(f"cb-{provider}", sandbox_blocks, date(2026, 5, 1))
    assert len(ids) == 4 and set(ids) <= set(wakeup.listener().woken)
    after, now = stats_of(provider, sandbox_blocks), httpx.get(f"{receiver}/v1/stats").json()
    assert state.is_completed(), state
    assert len(archived(f"cb-{provider}", sandbox_blocks, date(2026, 5, 1))) == 4
    assert charges(after, f"cb-{provider}") == [1] * 4
    assert after["polls"] - before["polls"] == 4  # polling every 0.2 s over a 0.6 s job would be 3 a job
    assert after["callbacks"].get("delivered", 0) - before["callbacks"].get("delivered", 0) == 4
    assert now.get("heard", 0) - heard.get("heard", 0) == 4


@pytest.mark.parametrize("provider", ["chuzhan", "tams"])
def test_a_block_that_trusts_callbacks_asks_for_no_status(receiver, sandbox_blocks, tmp_path, provider) -> None:
    """With `trust_callbacks`, a verified callback naming the job is its end: no status request
    at all (TAMS: one request a job instead of two against its 5 a second), paid once."""
    before = stats_of(provider, sandbox_blocks)
    state = run_spec(tmp_path, spec(f"cbt-{provider}", provider, 4, block="cb-trust"), date(2026, 5, 4))
    after = stats_of(provider, sandbox_blocks)
    assert state.is_completed(), state
    assert len(archived(f"cbt-{provider}", sandbox_blocks, date(2026, 5, 4))) == 4
    assert charges(after, f"cbt-{provider}") == [1] * 4
    assert after["polls"] == before["polls"]


def test_forged_duplicated_late_and_lost_callbacks(receiver, sandbox_blocks, tmp_path) -> None:
    """触站AI: a forged callback (altered URL, another job's body) is refused; a duplicate is
    recognised; a late one still wakes its job; a lost one leaves it to the fallback poll."""
    cz = sandbox_blocks.url("chuzhan")
    for kind in ("callback_duplicate", "callback_forged", "callback_late", "callback_lost"):
        httpx.post(f"{cz}/_sandbox/faults", json={"kind": kind, "delay": 2}).raise_for_status()
    before, heard = chuzhan_stats(sandbox_blocks), httpx.get(f"{receiver}/v1/stats").json()
    state = run_spec(tmp_path, spec("cb-faults", "chuzhan", 5), date(2026, 5, 2))
    after, now = chuzhan_stats(sandbox_blocks), httpx.get(f"{receiver}/v1/stats").json()

    def grew(key: str) -> int:
        return now.get(key, 0) - heard.get(key, 0)

    assert state.is_completed(), state
    assert len(archived("cb-faults", sandbox_blocks, date(2026, 5, 2))) == 5
    assert charges(after, "cb-faults") == [1] * 5
    assert grew("forged") >= 1  # the altered URL: 404
    assert grew("nonce_mismatch") + grew("wrong_job") >= 1  # another job's body on a real URL: 409
    assert grew("duplicates") >= 1
    assert grew("heard") == 4  # the lost one never came
    # The lost callback's job was polled after the fallback (4 s), the others once each.
    assert 5 <= after["polls"] - before["polls"] <= 6


def test_a_lost_submit_answer_is_settled_by_the_callback(receiver, sandbox_blocks, tmp_path) -> None:
    """触站AI charges at submit and does not dedupe: a draw whose answer is cut is `unknown`, and
    is never sent again blindly. Its callback (our capability URL, our nonce) names the task,
    so the run resumes it and archives its image, charged once."""
    cz = sandbox_blocks.url("chuzhan")
    httpx.post(f"{cz}/_sandbox/faults", json={"kind": "drop_after"}).raise_for_status()
    before = chuzhan_stats(sandbox_blocks)
    state = run_spec(tmp_path, spec("cb-unknown", "chuzhan", 2), date(2026, 5, 3))
    after = chuzhan_stats(sandbox_blocks)
    assert state.is_completed(), state
    assert after["injected_faults"] - before.get("injected_faults", 0) == 1
    assert charges(after, "cb-unknown") == [1] * 2
    assert len(archived("cb-unknown", sandbox_blocks, date(2026, 5, 3))) == 2


def test_the_receiver_refuses_what_it_cannot_verify_and_asks_again_when_it_cannot_record(
        receiver, sandbox_blocks) -> None:
    """Straight to the receiver process: an altered URL is 404; a real URL with a body that
    names no job is 400; a real URL whose ledger cannot be written (its credentials Block does
    not exist) is 503, so the provider's retries send it again."""
    from flows.callbacks import cached_key

    key = cached_key()
    good = JobRef(provider="chuzhan", block="cb", request_id="0" * 32, bucket=TEST_BUCKET, credentials="sandbox",
                  ledger_prefix="cb-direct/2026-05-09/_jobs/", record_key="cb-direct/2026-05-09/_jobs/x.json")
    url = capability_url(receiver, good, key)
    body = {"taskId": "f" * 32, "nonce": "0" * 32, "state": "success"}
    assert httpx.post(url[:-2] + "zz", json=body).status_code == 404
    assert httpx.post(url, json={"state": "success"}).status_code == 400
    assert httpx.post(url, json={**body, "nonce": "1" * 32}).status_code == 409
    missing = capability_url(receiver, JobRef(**{**good.__dict__, "credentials": "no-such-block"}), key)
    assert httpx.post(missing, json=body).status_code == 503
    first, again = httpx.post(url, json=body), httpx.post(url, json=body)
    assert (first.status_code, first.json()["duplicate"]) == (200, False)
    assert (again.status_code, again.json()["duplicate"]) == (200, True)
    note = s3_client(sandbox_blocks).get_object(
        Bucket=TEST_BUCKET, Key=f"cb-direct/2026-05-09/_jobs/_heard/{'0' * 32}/{'f' * 32}-success.json")
    assert b'"job_id": "' + b"f" * 32 in note["Body"].read()

