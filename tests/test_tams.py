"""TAMS: the signer against a fixed key and request, error mapping (respx), and the client
against the real emulator process over loopback HTTP."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from blocks.base import GenerationRequest
from blocks.errors import AccountStop, BadRequest, JobFailed, TransientError
from blocks.tams import GRPC_ERRORS, TamsProvider, TamsSigner, map_error
from tests.conftest import DATA, tams_stats

PRIVATE = (DATA / "tams_test_private_key.pem").read_text()
BODY = '{"requestId":"demo-1","stages":[{"type":"DIFFUSION","diffusion":{"prompts":[{"text":"一只猫, a cat"}]}}]}'
# Computed independently with: openssl dgst -sha256 -sign tams_test_private_key.pem <string to sign> | base64
EXPECTED_SIGNATURE = "YrIaXkoA1Qof8KkDPJTfluNS7iC5kPkJOimFi3bQj3T/9Q5znDmR20K0WmHN9xe/cWpXcG0R256kDV8NVcV+tCAzXXXvdPS/MNukrpiSyGlEDMulXY6qAwjgVcQCybMEjXVKdlESzCFVNit/yDAL026urJifBZeoBB3WtkxcrIWRLwXsQQCxHyJB2MmNf+31a/N9ATYJr4S9wMC28KZ6O57bCkWqJdM7klUeSg+5UihZvyIBPRGtyM3QgGAzScR7G6y4ceGSkB9SAB8ax1NEGy6I2LQZKagy7g5LQ1Wufg0CE6PK4i568dfxTCXmIG1ErDgssJkSHfl2pC0sJmZw0A=="


def request(**overrides) -> GenerationRequest:
    fields = dict(request_id="r-1", prompt="a cat", seed=7, width=512, height=512, steps=20, sampler="Euler a")
    return GenerationRequest(**{**fields, **overrides})


def test_signer_matches_openssl_vector() -> None:
    signer = TamsSigner("app-1", SecretStr(PRIVATE), clock=lambda: 1700000000, nonce=lambda: "5f2b1c0e9d8a4f7b")
    req = httpx.Request("POST", "https://ap-east-1.tensorart.cloud/v1/jobs", content=BODY.encode())
    signed = next(signer.auth_flow(req))
    assert signed.headers["Authorization"] == (
        "TAMS-SHA256-RSA app_id=app-1,nonce_str=5f2b1c0e9d8a4f7b,timestamp=1700000000,"
        f"signature={EXPECTED_SIGNATURE}")


def test_signer_signs_path_with_query_and_empty_body() -> None:
    key = serialization.load_pem_public_key((DATA / "tams_test_public_key.pem").read_bytes())
    signer = TamsSigner("app-1", SecretStr(PRIVATE), clock=lambda: 1700000001, nonce=lambda: "n")
    signed = next(signer.auth_flow(httpx.Request("GET", "https://x.test/v1/jobs/42?a=1&b=2")))
    signature = signed.headers["Authorization"].rsplit("signature=", 1)[1]
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    key.verify(base64.b64decode(signature), b"GET\n/v1/jobs/42?a=1&b=2\n1700000001\nn\n",
               padding.PKCS1v15(), hashes.SHA256())


def test_short_keys_are_refused() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    with pytest.raises(AccountStop, match="2048"):
        TamsSigner("a", SecretStr(small))


@pytest.mark.parametrize(("status", "body", "kind"), [
    (429, {"code": 8, "message": "rate limit"}, TransientError),
    (503, None, TransientError),
    (500, {"code": 13, "message": "internal"}, TransientError),
    (401, {"code": 16, "message": "unauthorized"}, AccountStop),
    (403, {"code": 7, "message": "insufficient credits"}, AccountStop),
    (400, {"code": 9, "message": "insufficient credits: balance 0"}, AccountStop),
    (400, {"code": 3, "message": "diffusion.sampler: required"}, BadRequest),
    (404, {"code": 5, "message": "job not found"}, BadRequest),
])
def test_error_mapping(status: int, body: dict | None, kind: type) -> None:
    assert type(map_error(status, body)) is kind


def test_every_grpc_code_is_mapped() -> None:
    assert set(GRPC_ERRORS) == set(range(1, 17))


@respx.mock
def test_retry_after_is_honoured_then_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    # `time.sleep` is one function for the whole process: count only this thread's waits (a
    # background thread left by an earlier test, sleeping 1 s at a time, landed in the list first).
    caller, real_sleep = threading.get_ident(), time.sleep
    monkeypatch.setattr("blocks.tams.time.sleep",
                        lambda s: slept.append(s) if threading.get_ident() == caller else real_sleep(s))
    route = respx.post("https://tams.test/v1/jobs/credits").mock(side_effect=[
        httpx.Response(429, json={"code": 8, "message": "slow down"}, headers={"Retry-After": "3"}),
        httpx.Response(200, json={"credits": 1.5}),
    ])
    provider = TamsProvider(app_id="a", private_key=PRIVATE, endpoint="https://tams.test")
    assert provider.estimate(request()).credits == 1.5
    assert route.call_count == 2 and slept and slept[0] >= 3


@respx.mock
def test_bad_request_is_not_retried() -> None:
    route = respx.post("https://tams.test/v1/jobs").mock(
        return_value=httpx.Response(400, json={"code": 3, "message": "bad size"}))
    provider = TamsProvider(app_id="a", private_key=PRIVATE, endpoint="https://tams.test")
    with pytest.raises(BadRequest, match="bad size"):
        provider.submit(request())
    assert route.call_count == 1


@respx.mock
def test_body_sent_is_the_body_signed() -> None:
    route = respx.post("https://tams.test/v1/jobs").mock(return_value=httpx.Response(200, json={"job": {"id": "9"}}))
    provider = TamsProvider(app_id="a", private_key=PRIVATE, endpoint="https://tams.test")
    assert provider.submit(request(prompt="猫 🐈")) == "9"
    sent = route.calls[0].request
    body = json.loads(sent.content)
    assert body["requestId"] == "r-1" and body["stages"][1]["diffusion"]["prompts"] == [{"text": "猫 🐈"}]
    assert "猫".encode() in sent.content  # UTF-8 on the wire, exactly what was signed


@pytest.mark.parametrize(("overrides", "field"), [
    ({"width": 500}, "generate.width"), ({"height": 2048}, "generate.height"), ({"steps": 5}, "generate.steps"),
    ({"sampler": "Nope"}, "generate.sampler"), ({"count": 5}, "items.count"), ({"cfg_scale": 40}, "generate.cfg_scale"),
    ({"width": 1024, "height": 1024, "upscale_factor": 2}, "upscale.factor"),
])
def test_validation_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(BadRequest, match=field.replace(".", r"\.")):
        TamsProvider.validate(request(**overrides))



@pytest.mark.parametrize(("width", "said"), [
    (100000, "100000 is not a multiple of 64 and is above 1536; give a multiple of 64 up to 1536, such as 1536"),
    (2048, "2048 is above 1536; give a multiple of 64 up to 1536, such as 1536"),
    (500, "500 is not a multiple of 64; give a multiple of 64 up to 1536, such as 512"),
])
def test_a_side_tams_refuses_says_all_that_is_wrong_and_a_side_it_takes(width: int, said: str) -> None:
    """A huge width was "not a multiple of 64" alone: fixed that way, it was refused again."""
    with pytest.raises(BadRequest) as refused:
        TamsProvider.validate(request(width=width, height=512))
    assert str(refused.value).endswith(f"generate.width: {said}"), str(refused.value)

# --- against the emulator process ------------------------------------------------------------

def sandbox_provider(sandbox, **overrides) -> TamsProvider:
    fields = dict(app_id=sandbox.account('tams')['app_id'], private_key=sandbox.secret('tams', 'private_key'), endpoint=sandbox.url('tams'))
    return TamsProvider(**{**fields, **overrides})


def test_emulator_rejects_a_wrong_signature(sandbox) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    before = tams_stats(sandbox)["auth_failures"]
    with pytest.raises(AccountStop, match="401"):
        sandbox_provider(sandbox, private_key=other).estimate(request())
    with pytest.raises(AccountStop, match="401"):
        sandbox_provider(sandbox, app_id="not-my-app").estimate(request())
    assert tams_stats(sandbox)["auth_failures"] == before + 2


def test_emulator_rejects_a_tampered_body(sandbox) -> None:
    signer = TamsSigner(sandbox.account('tams')['app_id'], SecretStr(sandbox.secret('tams', 'private_key')))
    header = signer.sign("POST", "/v1/jobs/credits", '{"stages":[]}')
    answer = httpx.post(f"{sandbox.url('tams')}/v1/jobs/credits", content=b'{"stages":[{}]}',
                        headers={"Authorization": header, "Content-Type": "application/json"})
    assert answer.status_code == 401 and answer.json()["code"] == 16


def test_job_with_upload_and_upscale_runs_and_is_charged_once(sandbox) -> None:
    from sandbox.images import render_png

    provider = sandbox_provider(sandbox)
    ref = provider.upload(render_png("init", 1, 512, 512), "image/png")
    req = request(request_id="tams-test-upscale", input_ref=ref, upscale_factor=2, count=2)
    before = tams_stats(sandbox)
    result = provider.run_job(req, poll_interval=0.2, timeout=30)
    again = provider.run_job(req, poll_interval=0.2, timeout=30)  # same requestId: same job, no new charge
    after = tams_stats(sandbox)
    assert again.job_id == result.job_id and len(result.images) == 2
    from io import BytesIO

    from PIL import Image
    assert Image.open(BytesIO(result.images[0])).size == (1024, 1024)
    assert after["submits"] - before["submits"] == 1
    assert after["charges"] - before["charges"] == 1
    assert after["charged_credits"] - before["charged_credits"] == pytest.approx(result.credits)


def test_a_job_after_the_first_is_polled_once_when_the_first_took_longer_than_an_interval(sandbox,
                                                                                         monkeypatch) -> None:
    """Every TAMS call counts against its 5 a second: the second job is first asked about after the
    time the first took to end (0.6 s jobs, polled every 0.2 s), so one status request finds it ended."""
    from blocks import first_poll

    monkeypatch.setattr(first_poll, "_timers", {})
    provider = sandbox_provider(sandbox)
    before = tams_stats(sandbox)["polls"]
    first = provider.run_job(request(request_id="tams-first-poll-1"), poll_interval=0.2, timeout=30)
    second = provider.run_job(request(request_id="tams-first-poll-2"), poll_interval=0.2, timeout=30)
    # The first was seen ended more than an interval after its submit (3 status requests on a quiet
    # machine; fewer when one met TAMS's 5-a-second limit, which these 0.2 s polls and a submit can
    # reach, and was retried a second later); the second, first asked about after that long,
    # needed exactly one.
    [timer] = first_poll._timers.values()
    assert timer.wait(0.2) > 0.2 and first.polls >= 1 and second.polls == 1, (first.polls, second.polls)
    assert tams_stats(sandbox)["polls"] - before == first.polls + second.polls


def test_failed_job_is_not_charged(sandbox) -> None:
    provider = sandbox_provider(sandbox)
    before = tams_stats(sandbox)
    with pytest.raises(JobFailed, match="FAILED"):
        provider.run_job(request(request_id="tams-test-fail", prompt="a cat [[fail]]"), poll_interval=0.2, timeout=30)
    after = tams_stats(sandbox)
    assert after["charges"] == before["charges"] and after["failed_jobs"] == before["failed_jobs"] + 1


def test_upload_put_requires_the_granted_headers(sandbox) -> None:
    provider = sandbox_provider(sandbox)
    grant = provider._call("POST", "/v1/resource/image", {"expireSec": 3600, "term": 1})
    assert httpx.put(grant["putUrl"], content=b"x").status_code == 403


def test_result_urls_refuse_tampering_and_expiry() -> None:
    from urllib.parse import parse_qsl, urlsplit

    from sandbox.urls import SignedUrls

    def params(url: str) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(url).query))

    urls = SignedUrls(60, "Expires", "Signature")
    url, _ = urls.sign("http://127.0.0.1:1/", "/_results/7/0.png")
    assert urls.check("/_results/7/0.png", params(url)) is None
    assert urls.check("/_results/7/1.png", params(url)) == "signature"
    assert urls.check("/_results/7/0.png", {**params(url), "Expires": "9999999999"}) == "signature"
    stale = SignedUrls(-1)
    old, _ = stale.sign("http://h", "/x.png")
    assert stale.check("/x.png", params(old)) == "expired"


def test_a_status_request_held_back_on_our_side_does_not_teach_a_long_job(sandbox, monkeypatch) -> None:
    """A Prefect server that stalled for a minute held every status request's rate slot: each job
    then seemed to take a minute, and every later job waited that long before it was first asked
    about. What the last status request waited on this side beyond one interval is not the job's."""
    import contextlib
    import time

    from blocks import first_poll

    class Stalled:
        """Within the job, the request after the submit (the first status request) waits 3 s
        for its slot, as on a stalled server (every TAMS call takes a slot of one action)."""

        def __init__(self) -> None:
            self.in_job: int | None = None

        @contextlib.contextmanager
        def request(self, action: str):  # noqa: ANN202
            if self.in_job is not None:
                self.in_job += 1
                if self.in_job == 2:
                    time.sleep(3.0)
            yield

        @contextlib.contextmanager
        def job(self, action: str):  # noqa: ANN202
            self.in_job = 0
            yield

    monkeypatch.setattr(first_poll, "_timers", {})
    provider = sandbox_provider(sandbox)
    provider.use_limiter(Stalled())
    provider.run_job(request(request_id="tams-stalled-poll-1"), poll_interval=0.2, timeout=30)
    [timer] = first_poll._timers.values()
    assert timer.wait(0.2) < 2.0, timer.wait(0.2)  # the 0.6 s job, not the 3 s it waited to be asked
