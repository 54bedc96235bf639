"""Callbacks: capability URLs, and the receiver (`imagegen callbacks serve`, its own process)
between the 触站AI and TAMS emulators (which call back as documented, with faults) and runs
on the Prefect test server. What the emulators counted is the witness: charges per image,
status requests per job, callbacks delivered; the receiver's counters say what it refused."""

from __future__ import annotations

import json
import math
import os
import select
import socket
import subprocess
import sys
import threading
import time
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from flows.paying.callbacks import Forged, JobRef, capability_url, read_capability
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


def test_a_callbacks_results_are_taken_only_from_declared_hosts() -> None:
    """A trusted callback's result URLs must be on the Block's declared domains or its own
    endpoint's origin (the sandbox's emulator); never another private address or port."""
    from blocks.chuzhan import ChuzhanProvider
    from blocks.tams import TamsProvider

    sandboxed = ChuzhanProvider(api_token="t", endpoint="http://127.0.0.1:8702")
    assert sandboxed.result_url_declared("http://127.0.0.1:8702/_results/ab/0.png?sig=1")
    for url in ("http://127.0.0.1:8703/x.png", "http://localhost:8702/x.png", "http://10.1.2.3/x.png",
                "https://evil.example/x.png", "file:///etc/passwd"):
        assert not sandboxed.result_url_declared(url), url
    real = ChuzhanProvider(api_token="t")
    assert real.result_url_declared("https://img.huashi6.com/a.png")
    assert not real.result_url_declared("https://huashi6.com.evil.example/a.png")
    assert not real.result_url_declared("http://192.168.1.5/a.png")
    tams = TamsProvider(app_id="a", api_token="t", result_hosts=["cdn.example.net"])
    assert tams.result_url_declared("https://eu.cdn.example.net/a.png")
    assert not tams.result_url_declared("https://example.net/a.png")


def test_a_status_names_its_request_only_by_our_nonce_and_prompt() -> None:
    """The one ground for adopting a task a callback names: the provider's status of it names our
    nonce and prompt. The documented 触站AI detail names neither, so nothing is adopted on it."""
    from blocks.base import GenerationRequest
    from blocks.chuzhan import ChuzhanProvider, nonce

    request = GenerationRequest(request_id="a" * 32, prompt="a lamp", seed=1, width=512, height=512)
    ours = {"state": "running", "nonce": nonce(request.request_id), "prompt": "a lamp"}
    assert ChuzhanProvider.status_names(ours, request)
    assert not ChuzhanProvider.status_names({**ours, "nonce": "b" * 32}, request)
    assert not ChuzhanProvider.status_names({**ours, "prompt": "another lamp"}, request)
    assert not ChuzhanProvider.status_names({"state": "success", "images": []}, request)  # as documented


def test_a_loopback_callback_is_taken_only_for_a_loopback_endpoint() -> None:
    from blocks.chuzhan import ChuzhanProvider

    assert ChuzhanProvider(api_token="t", endpoint="http://127.0.0.1:8702", callback="http://127.0.0.1:8710").callback
    with pytest.raises(ValueError, match="public http"):
        ChuzhanProvider(api_token="t", callback="http://127.0.0.1:8710")


# --- on real processes -------------------------------------------------------------------------

class ReceiverUrl(str):
    """The receiver's base URL, with its process id (for its memory)."""

    pid: int


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
    url = ReceiverUrl(f"http://127.0.0.1:{port}")
    url.pid = proc.pid
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
    for provider, field in (("chuzhan", "callback"), ("tams", "notify_url")):
        patient = sandbox_blocks.block(provider)  # polls only after 60 s: what ends its wait early is a callback
        setattr(patient, field, url)
        patient.callback_fallback_seconds = 60.0
        patient.save("cb-patient", overwrite=True)
    apply_limits({"chuzhan": ["cb", "cb-trust", "cb-patient"], "tams": ["cb", "cb-trust", "cb-patient"]})
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
    from flows.paying import wakeup

    before, heard = stats_of(provider, sandbox_blocks), httpx.get(f"{receiver}/v1/stats").json()
    state = run_spec(tmp_path, spec(f"cb-{provider}", provider, 4, block="cb-patient"), date(2026, 5, 1))
    # Each job's wait was ended by its callback, not left to the fallback (60 s on this Block, so
    # a callback slowed by a loaded machine still comes first).
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




def imagegen(*args: str) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_LOGGING_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def task_of(state, prompt: str) -> str:  # noqa: ANN001 - a SandboxState
    """The 触站AI task drawn for `prompt`, as a person finds it in the provider console."""
    return next(sign for sign, task in chuzhan_stats(state)["tasks"].items() if task["prompt"] == prompt)


def heard_job_ids(state, name: str, run_date: date) -> set[str]:  # noqa: ANN001
    s3 = s3_client(state)
    listed = s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix=f"{name}/{run_date}/_jobs/_heard/")
    return {json.loads(s3.get_object(Bucket=TEST_BUCKET, Key=o["Key"])["Body"].read()).get("job_id")
            for o in listed.get("Contents", [])}


def test_a_forged_callback_never_adopts_another_task(receiver, sandbox_blocks, tmp_path) -> None:
    """触站AI, a draw whose answer was cut (`unknown`): a forger with the job's URL and nonce names
    another pipeline's task. Neither it nor any task a callback names is adopted unless the
    provider's status names this request; 触站AI's (as documented, and the emulator's) does not,
    so the item stays `unknown` until a person names its task, and the rerun archives that task's
    image, charged once. The other pipeline's task is never archived as this item."""
    cz, day = sandbox_blocks.url("chuzhan"), date(2026, 5, 3)
    assert run_spec(tmp_path, spec("cb-other", "chuzhan", 1), day).is_completed()
    other = task_of(sandbox_blocks, "cb-other lamp 0")
    httpx.post(f"{cz}/_sandbox/faults", json={"kind": "drop_after"}).raise_for_status()
    httpx.post(f"{cz}/_sandbox/faults", json={"kind": "callback_forged_task", "task_id": other}).raise_for_status()
    path = tmp_path / "adopt.yaml"
    first = run_spec(tmp_path, spec("cb-adopt", "chuzhan", 1), day, path=path)
    ours = task_of(sandbox_blocks, "cb-adopt lamp 0")
    assert first.is_failed() and archived("cb-adopt", sandbox_blocks, day) == []
    assert {other, ours} <= heard_job_ids(sandbox_blocks, "cb-adopt", day)  # both heard: hints, not facts
    assert chuzhan_stats(sandbox_blocks)["callbacks"].get("callback_forged_task", 0) >= 1
    submits = chuzhan_stats(sandbox_blocks)["submits"]
    settled = imagegen("ledger", "resolve", str(path), "i0", "--run-date", day.isoformat(), "--job-id", ours)
    assert settled.returncode == 0, settled.stderr
    assert run_spec(tmp_path, path.read_text(), day, path=path).is_completed()
    after = chuzhan_stats(sandbox_blocks)
    assert after["submits"] == submits
    assert charges(after, "cb-adopt") == [1] and charges(after, "cb-other") == [1]
    s3 = s3_client(sandbox_blocks)
    mine, theirs = (s3.get_object(Bucket=TEST_BUCKET, Key=archived(n, sandbox_blocks, day)[0])["Body"].read()
                    for n in ("cb-adopt", "cb-other"))
    assert mine != theirs


class Forger:
    """The forger's own image server, counting what it is asked for."""

    def __init__(self) -> None:
        self.hits = 0
        forger = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                forger.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                self.wfile.write((ROOT / "pipelines" / "assets").joinpath(
                    sorted(p.name for p in (ROOT / "pipelines" / "assets").iterdir())[0]).read_bytes())

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/forged.png"


@pytest.mark.parametrize("provider", ["chuzhan", "tams"])
def test_a_trusting_block_fetches_no_forged_image_and_takes_no_forged_failure(receiver, sandbox_blocks, tmp_path,
                                                                              provider) -> None:
    """A Block that trusts callbacks: a forged `success` naming the job with its image on the
    forger's server is never fetched (not a host the Block declares): a poll looks instead; a
    forged `fail` for a running job only makes it look. Both jobs end as they really do,
    archived and charged once."""
    forger = Forger()
    url = sandbox_blocks.url(provider)
    for kind in ("callback_forged_success", "callback_forged_fail"):
        httpx.post(f"{url}/_sandbox/faults", json={"kind": kind, "url": forger.url}).raise_for_status()
    name, day = f"cb-forge-{provider}", date(2026, 5, 5)
    before = stats_of(provider, sandbox_blocks)
    state = run_spec(tmp_path, spec(name, provider, 2, block="cb-trust"), day)
    after = stats_of(provider, sandbox_blocks)
    forger.server.shutdown()
    assert state.is_completed(), state
    assert forger.hits == 0
    assert len(archived(name, sandbox_blocks, day)) == 2
    assert charges(after, name) == [1, 1]
    sent = after["callbacks"]
    assert sent.get("forged_answered_200", 0) - before["callbacks"].get("forged_answered_200", 0) == 2
    assert after["polls"] - before["polls"] <= 4  # each job looked at most twice (the forged wake, the real one)


def test_forged_events_cost_no_status_request(receiver, sandbox_blocks, tmp_path) -> None:
    """20 `imagegen.callback.heard` events posted straight to the Prefect API for a waiting TAMS
    job (half naming another job, half its own): those naming another job never wake it, and
    those naming its own are passed over, as the receiver recorded no such callback. The job's
    own callback, when it ends, wakes it: one status request in all, for an 8 s job (the Block
polls on its own only after 60 s)."""
    from prefect.client.orchestration import get_client

    from flows.paying.callbacks import announce

    tams, day = sandbox_blocks.url("tams"), date(2026, 5, 6)
    httpx.post(f"{tams}/_sandbox/config", json={"latency": 8}).raise_for_status()
    try:
        before, outcome = tams_stats(sandbox_blocks), {}
        run = threading.Thread(target=lambda: outcome.update(state=run_spec(tmp_path, spec("cb-flood", "tams", 1,
                                                                                 block="cb-patient"), day)))
        started = time.monotonic()
        run.start()
        while not (new := set(tams_stats(sandbox_blocks)["jobs"]) - set(before["jobs"])):
            assert time.monotonic() - started < 60
            time.sleep(0.1)
        job_id = new.pop()
        ref = JobRef(**{**REF.__dict__, "provider": "tams",
                        "request_id": tams_stats(sandbox_blocks)["jobs"][job_id]["requestId"]})
        with get_client(sync_client=True) as client:
            for k in range(20):
                announce(ref, job_id if k % 2 else "9" * 18, "SUCCESS", client)
                time.sleep(0.05)
        run.join(120)
        took = time.monotonic() - started
    finally:
        httpx.post(f"{tams}/_sandbox/config", json={"latency": 0.6})
    after = tams_stats(sandbox_blocks)
    assert outcome["state"].is_completed(), outcome["state"]
    assert charges(after, "cb-flood") == [1]
    polls = after["polls"] - before["polls"]
    assert polls == 1 and took < 50, (polls, took)


def test_an_unreadable_tams_body_wakes_its_job(receiver, sandbox_blocks, tmp_path) -> None:
    """TAMS's notification body is not documented: one in a shape the Block does not read is
    still a reason to look. It wakes its job (one poll, no 4 s fallback wait), is counted and
    logged, and kept in the ledger as an `unreadable` note for whoever fixes the Block."""
    from flows.paying import wakeup

    tams, day = sandbox_blocks.url("tams"), date(2026, 5, 7)
    for _ in range(2):
        httpx.post(f"{tams}/_sandbox/faults", json={"kind": "callback_reshaped"}).raise_for_status()
    before, heard = tams_stats(sandbox_blocks), httpx.get(f"{receiver}/v1/stats").json()
    state = run_spec(tmp_path, spec("cb-reshaped", "tams", 2), day)
    after, now = tams_stats(sandbox_blocks), httpx.get(f"{receiver}/v1/stats").json()
    assert state.is_completed(), state
    assert len(archived("cb-reshaped", sandbox_blocks, day)) == 2 and charges(after, "cb-reshaped") == [1, 1]
    ids = request_ids("cb-reshaped", sandbox_blocks, day)
    assert set(ids) <= set(wakeup.listener().woken)
    assert after["polls"] - before["polls"] == 2  # woken once each, looked once each
    assert now.get("unreadable", 0) - heard.get("unreadable", 0) == 2
    s3 = s3_client(sandbox_blocks)
    for rid in ids:
        listed = s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix=f"cb-reshaped/{day}/_jobs/_heard/{rid}/none-unreadable-")
        note = json.loads(s3.get_object(Bucket=TEST_BUCKET, Key=listed["Contents"][0]["Key"])["Body"].read())
        assert '"job.finished"' in note["raw"]


def direct_url(receiver: str, request_id: str = "0" * 32) -> str:
    from flows.paying.callbacks import cached_key

    good = JobRef(provider="chuzhan", block="cb", request_id=request_id, bucket=TEST_BUCKET, credentials="sandbox",
                  ledger_prefix="cb-direct/2026-05-09/_jobs/", record_key="cb-direct/2026-05-09/_jobs/x.json")
    return capability_url(receiver, good, cached_key())


def test_the_receiver_refuses_what_it_cannot_verify_and_asks_again_when_it_cannot_record(
        receiver, sandbox_blocks) -> None:
    """Straight to the receiver process: an altered URL is 404; a real URL with a body that
    names no job is kept as unreadable and wakes its job (200); another job's nonce is 409; a
    real URL whose ledger cannot be written (its credentials Block does not exist) is 503, so the
    provider's retries send it again; a forged body naming the job never shadows the real one."""
    from flows.paying.callbacks import cached_key

    url = direct_url(receiver)
    body = {"taskId": "f" * 32, "nonce": "0" * 32, "state": "success"}
    assert httpx.post(url[:-2] + "zz", json=body).status_code == 404
    unreadable = httpx.post(url, json={"state": "success"})
    assert (unreadable.status_code, unreadable.json()) == (200, {"ok": True, "unreadable": True})
    assert httpx.post(url, json={**body, "nonce": "1" * 32}).status_code == 409
    good = read_capability(url.rsplit("/", 1)[1], cached_key())
    missing = capability_url(receiver, JobRef(**{**good.__dict__, "credentials": "no-such-block"}), cached_key())
    assert httpx.post(missing, json=body).status_code == 503
    first, again = httpx.post(url, json=body), httpx.post(url, json=body)
    assert (first.status_code, first.json()["duplicate"]) == (200, False)
    assert (again.status_code, again.json()["duplicate"]) == (200, True)
    forged = httpx.post(url, json={**body, "imgUrl": "http://198.51.100.7/x.png"})
    assert (forged.status_code, forged.json()["duplicate"]) == (200, False)  # its own note, beside the real one
    listed = s3_client(sandbox_blocks).list_objects_v2(Bucket=TEST_BUCKET,
                                                       Prefix=f"cb-direct/2026-05-09/_jobs/_heard/{'0' * 32}/")
    keys = [o["Key"].rsplit("/", 1)[1] for o in listed["Contents"]]
    assert sum(k.startswith(f"{'f' * 32}-success-") for k in keys) == 2
    assert sum(k.startswith("none-unreadable-") for k in keys) == 1


def rss(pid: int) -> int:
    """A process's resident memory in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def stream(sock: socket.socket, chunk: bytes, limit: int, seconds: float = 20.0) -> tuple[int, bytes]:
    """Send `chunk` again and again (at most `limit` bytes) until the server answers or cuts the
    connection; the bytes it took and its answer."""
    sent, answer, deadline = 0, b"", time.monotonic() + seconds
    sock.setblocking(False)
    while sent < limit and time.monotonic() < deadline:
        readable, writable, _ = select.select([sock], [sock], [], 1.0)
        try:
            if readable:
                answer = sock.recv(65536)
                break
            if writable:
                sent += sock.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            break
    return sent, answer


def test_an_oversized_body_is_refused_before_it_is_read(receiver, sandbox_blocks) -> None:
    """256 MiB declared: answered 413 from the Content-Length alone, the sender having put no
    more than the sockets' buffers hold; 256 MiB chunked (no length): cut once past 1 MiB. The
    receiver's memory does not grow by the body."""
    path = urlparse(direct_url(receiver, "1" * 32)).path
    port, big, chunk = urlparse(receiver).port, 256 << 20, b"x" * 65536
    grown_from = rss(receiver.pid)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: hooks\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {big}\r\n\r\n".encode())
        sent, answer = stream(sock, chunk, big)
    assert sent < 32 << 20, sent
    assert answer == b"" or answer.startswith(b"HTTP/1.1 413"), answer[:100]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: hooks\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        sent, answer = stream(sock, b"10000\r\n" + chunk + b"\r\n", big)
    assert sent < 32 << 20, sent
    assert answer == b"" or answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert rss(receiver.pid) - grown_from < 16 << 20
    assert httpx.get(f"{receiver}/health").status_code == 200


def test_slow_connections_are_cut_within_their_deadlines(receiver, sandbox_blocks) -> None:
    """100 connections trickling their headers and 100 their body at a byte a second: each is
    cut within its deadline (headers 10 s, body 10 s more), and the receiver answers meanwhile."""
    from flows.paying.callbacks import BODY_TIMEOUT, HEADER_TIMEOUT

    path = urlparse(direct_url(receiver, "2" * 32)).path
    port = urlparse(receiver).port
    head = f"POST {path} HTTP/1.1\r\nHost: hooks\r\n".encode()
    opened: dict[socket.socket, tuple[str, float]] = {}
    for kind in ("headers", "body"):
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(head + (b"Content-Length: 1000\r\n\r\n{" if kind == "body" else b"X-Slow: "))
            sock.setblocking(False)
            opened[sock] = (kind, time.monotonic())
    cut: dict[str, list[float]] = {"headers": [], "body": []}
    answered = False
    while opened and time.monotonic() - min(t for _, t in opened.values()) < 30:
        for sock in [s for s in select.select(list(opened), [], [], 1.0)[0]]:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                kind, since = opened.pop(sock)
                cut[kind].append(time.monotonic() - since)
                sock.close()
        for sock in list(opened):
            try:
                sock.send(b"a")
            except (BrokenPipeError, ConnectionResetError, BlockingIOError):
                pass
        if not answered:
            answered = httpx.get(f"{receiver}/health", timeout=5).status_code == 200
    for sock in opened:
        sock.close()
    assert not opened, f"{len(opened)} slow connections never cut"
    assert answered
    assert max(cut["headers"]) < HEADER_TIMEOUT + 3, cut["headers"]
    assert max(cut["body"]) < BODY_TIMEOUT + 3, cut["body"]
