"""Tencent AI Art: the TC3 signer against the official SDK and the published vector, the error
map complete against the SDK's list, validation before any call, and the client and pipelines
against the emulator process."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from datetime import date, datetime, timezone
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from blocks.base import GenerationRequest
from blocks.errors import AccountStop, BadRequest, ContentRejected, SubmitUnknown, TransientError
from blocks.tencent import (ERROR_CODES, REFINE_MAX_BASE64, ReviewFailed, TC3Signer, TencentAiArtProvider,
                            canonical_request, check_image, map_error, string_to_sign, tc3_signature)
from flows.running.report import PipelineIncomplete
from tests.conftest import TEST_BUCKET, run_logs, run_spec, s3_client, tencent_stats

ASSET = Path(__file__).parent.parent / "pipelines" / "assets" / "sneaker-sketch.png"


def test_published_signature_vector() -> None:
    """The signature document's CVM example, byte for byte."""
    body = b'{"Limit": 1, "Filters": [{"Values": ["\\u672a\\u547d\\u540d"], "Name": "instance-name"}]}'
    headers = {"content-type": "application/json; charset=utf-8", "host": "cvm.tencentcloudapi.com"}
    canonical = canonical_request("POST", "/", "", headers, ["content-type", "host"], body)
    assert hashlib.sha256(body).hexdigest() == "35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064"
    assert hashlib.sha256(canonical.encode()).hexdigest() == \
        "5ffe6a04c0664d6b969fab9a13bdab201d63ee709638e2749d62a09ca18d7031"
    sts = string_to_sign(1551113065, "2019-02-25/cvm/tc3_request", canonical)
    assert tc3_signature("Gu5t9xGARNpq86cd98joQYCN3EXAMPLE", "2019-02-25", sts, service="cvm") == \
        "72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"


def test_the_emulator_checks_signatures_with_its_own_code() -> None:
    """The emulator verifies TC3 with code of its own (it imports nothing of the client), and
    that code reproduces the published vector too."""
    from sandbox.tencent import tc3_expected

    body = b'{"Limit": 1, "Filters": [{"Values": ["\\u672a\\u547d\\u540d"], "Name": "instance-name"}]}'
    headers = {"content-type": "application/json; charset=utf-8", "host": "cvm.tencentcloudapi.com"}
    assert tc3_expected("Gu5t9xGARNpq86cd98joQYCN3EXAMPLE", method="POST", path="/", query="", headers=headers,
                        signed=["content-type", "host"], body=body, timestamp=1551113065, date="2019-02-25",
                        service="cvm") == "72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"


@pytest.mark.parametrize("payload", [
    {"Prompt": "a red fox"},
    {"Prompt": "雨中的江南小镇，水墨风格", "Resolution": "1024:1024", "LogoAdd": 0},
    {"Prompt": "émoji 🦊 and ümlauts", "Styles": ["201"], "ResultConfig": {"Resolution": "origin"}},
    {},
])
def test_signer_matches_the_official_sdk(payload: dict) -> None:
    from tencentcloud.common.sign import Sign

    secret_key, timestamp = "AKsecretKEYexample123", 1767225600 + 3600 * 23 + 59 * 60  # 23:59 UTC, a date edge
    body = json.dumps(payload).encode()  # the SDK's serialisation
    signer = TC3Signer(SecretStr("AKIDexample"), SecretStr(secret_key), "ap-singapore", clock=lambda: timestamp)
    request = httpx.Request("POST", "https://aiart.tencentcloudapi.com/", content=body,
                            headers={"Content-Type": "application/json", "X-TC-Action": "ImageToImage"})
    signed = next(signer.auth_flow(request))
    # The canonical request, written out from the documentation, independently of our code.
    date_utc = datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d")
    canonical = ("POST\n/\n\ncontent-type:application/json\nhost:aiart.tencentcloudapi.com\n\n"
                 "content-type;host\n" + hashlib.sha256(body).hexdigest())
    sts = (f"TC3-HMAC-SHA256\n{timestamp}\n{date_utc}/aiart/tc3_request\n"
           + hashlib.sha256(canonical.encode()).hexdigest())
    expected = Sign.sign_tc3(secret_key, date_utc, "aiart", sts)
    assert signed.headers["Authorization"] == (
        f"TC3-HMAC-SHA256 Credential=AKIDexample/{date_utc}/aiart/tc3_request, "
        f"SignedHeaders=content-type;host, Signature={expected}")
    assert signed.headers["X-TC-Timestamp"] == str(timestamp) and signed.headers["X-TC-Version"] == "2022-12-29"
    assert signed.headers["X-TC-Region"] == "ap-singapore"


def test_every_sdk_error_code_is_mapped() -> None:
    from tencentcloud.aiart.v20221229 import errorcodes

    sdk_codes = {v for k, v in vars(errorcodes).items() if k.isupper() and isinstance(v, str)}
    assert len(sdk_codes) >= 30
    assert sdk_codes - set(ERROR_CODES) == set()


@pytest.mark.parametrize(("code", "kind"), [
    ("RequestLimitExceeded.JobNumExceed", TransientError), ("FailedOperation.InnerError", TransientError),
    ("OperationDenied.ImageIllegalDetected", ContentRejected), ("FailedOperation.GenerateImageFailed", ReviewFailed),
    ("OperationDenied.SomethingNew", ContentRejected), ("AuthFailure.SomethingNew", AccountStop),
    ("ResourceUnavailable.LowBalance", AccountStop), ("ResourceUnavailable.InArrears", AccountStop),
    ("ResourceUnavailable.StopUsing", AccountStop), ("InvalidParameterValue.StyleConflict", BadRequest),
    ("InvalidParameterValue.SomethingNew", BadRequest), ("AuthFailure.SignatureFailure", AccountStop),
])
def test_error_taxonomy(code: str, kind: type) -> None:
    assert type(map_error(code, "m")) is kind


def request(**overrides) -> GenerationRequest:
    fields = {"request_id": "t" * 32, "prompt": "a fox", "seed": 9, "width": 1024, "height": 1024,
              "options": {"LogoAdd": 0}}
    return GenerationRequest(**{**fields, **overrides})


@pytest.mark.parametrize(("overrides", "field"), [
    ({"options": {}}, "generate.options.LogoAdd"),
    ({"prompt": "x" * 257, "has_input": True}, "items.prompt"),
    ({"prompt": "x" * 1025}, "items.prompt"),
    ({"negative_prompt": "x" * 257}, "items.negative_prompt"),
    ({"has_input": True, "denoising_strength": 0.0001, "options": {"LogoAdd": 1, "Strength": 0}},
     "generate.denoising_strength"),
    ({"has_input": True, "options": {"LogoAdd": 1, "RestoreFace": 7}}, "generate.options.RestoreFace"),
    ({"has_input": True, "options": {"LogoAdd": 1, "Resolution": "1024:1024"}}, "generate.options.Resolution"),
    ({"has_input": True, "options": {"LogoAdd": 1, "Styles": ["104", "201"]}}, "generate.options.Styles"),
    ({"width": 2048, "height": 2048}, "generate.width/height"),
    ({"count": 2}, "items.count"),
])
def test_validation_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(BadRequest, match=field.replace(".", r"\.").replace("/", "/")):
        TencentAiArtProvider.validate(request(**overrides))


@pytest.mark.parametrize(("size", "why"), [((40, 400), "between 50 and 5000"), ((400, 5001), "between 50 and 5000")])
def test_input_image_rules_before_any_call(size: tuple[int, int], why: str) -> None:
    out = BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(out, format="PNG")
    provider = TencentAiArtProvider(secret_id="i", secret_key="k", endpoint="http://127.0.0.1:9")
    with pytest.raises(BadRequest, match=why):
        provider.upload(out.getvalue(), "image/png")


def test_gif_is_refused() -> None:
    out = BytesIO()
    Image.new("RGB", (100, 100)).save(out, format="GIF")
    with pytest.raises(BadRequest, match="format GIF"):
        TencentAiArtProvider(secret_id="i", secret_key="k").upload(out.getvalue(), "image/gif")


def padded_png(raw_size: int) -> bytes:
    """A readable 64x64 PNG with filler after its end, `raw_size` bytes in all (base64: 4/3 of it)."""
    out = BytesIO()
    Image.new("RGB", (64, 64), (10, 120, 30)).save(out, format="PNG")
    return out.getvalue() + b"\0" * (raw_size - len(out.getvalue()))


def test_input_size_limits_are_the_pages_read_strictly() -> None:
    """tencent-aiart.md: ImageToImage "base64 < 8 MB", RefineImage "base64 < 6 MB". Read as the
    base64 text in decimal megabytes, the strictest reading: 6,000,000 base64 bytes (an image of
    4,500,000) is refused for RefineImage, 5,999,996 is not; ImageToImage takes both."""
    assert REFINE_MAX_BASE64 == 6_000_000
    at_limit, under = padded_png(4_500_000), padded_png(4_499_997)
    assert len(base64.b64encode(at_limit)) == 6_000_000 and len(base64.b64encode(under)) == 5_999_996
    with pytest.raises(BadRequest, match="under 6,000,000"):
        check_image(at_limit, "upscale input", max_base64=REFINE_MAX_BASE64)
    check_image(under, "upscale input", max_base64=REFINE_MAX_BASE64)
    check_image(at_limit)  # ImageToImage: under 8 MB
    with pytest.raises(BadRequest, match="under 8,000,000"):
        check_image(padded_png(6_000_000))


# --- against the emulator ----------------------------------------------------------------------

@pytest.fixture()
def tencent(sandbox_blocks):
    yield sandbox_blocks
    httpx.delete(f"{sandbox_blocks.url('tencent')}/_sandbox/faults")


def client(state, **overrides) -> TencentAiArtProvider:
    fields = dict(secret_id=state.account('tencent')['secret_id'], secret_key=state.secret('tencent', 'secret_key'), endpoint=state.url('tencent'))
    return TencentAiArtProvider(**{**fields, **overrides})


def test_wrong_secret_and_unknown_id_are_refused(tencent) -> None:
    before = tencent_stats(tencent)
    with pytest.raises(AccountStop, match="AuthFailure.SignatureFailure"):
        client(tencent, secret_key="wrong").poll("123")
    with pytest.raises(AccountStop, match="AuthFailure.SecretIdNotFound"):
        client(tencent, secret_id="AKIDnobody").poll("123")
    assert tencent_stats(tencent)["auth_failures"] - before["auth_failures"] == 2


def test_image_to_image_with_base64_and_with_url(tencent) -> None:
    provider = client(tencent)
    ref = provider.upload(ASSET.read_bytes(), "image/png")
    req = request(has_input=True, options={"LogoAdd": 1, "Resolution": "768:1024"})
    by_b64 = provider.run_job(req.model_copy(update={"input_ref": ref}), poll_interval=0.1, timeout=30)
    assert Image.open(BytesIO(by_b64.images[0])).size == (768, 1024)
    s3 = s3_client(tencent)
    s3.put_object(Bucket=TEST_BUCKET, Key="inputs/sketch.png", Body=ASSET.read_bytes())
    from botocore.config import Config

    import boto3
    url = boto3.client("s3", endpoint_url=tencent.s3_url, aws_access_key_id=tencent.s3_access_key,
                       aws_secret_access_key=tencent.s3_secret_key, region_name="us-east-1",
                       config=Config(signature_version="s3v4")).generate_presigned_url(
        "get_object", Params={"Bucket": TEST_BUCKET, "Key": "inputs/sketch.png"}, ExpiresIn=600)
    by_url = provider.run_job(req.model_copy(update={"input_ref": url, "request_id": "u" * 32}),
                              poll_interval=0.1, timeout=30)
    assert Image.open(BytesIO(by_url.images[0])).size == (768, 1024)


def test_async_job_succeeds_and_a_failing_one_is_rejected(tencent) -> None:
    provider = client(tencent)
    result = provider.run_job(request(), poll_interval=0.1, timeout=30)
    assert Image.open(BytesIO(result.images[0])).size == (1024, 1024) and result.polls >= 2
    with pytest.raises(ContentRejected, match="GenerateImageFailed"):
        provider.run_job(request(prompt="a fox [[fail]]"), poll_interval=0.1, timeout=30)


def test_refusals_are_retried_but_an_ambiguous_submit_answer_is_not(tencent) -> None:
    httpx.post(f"{tencent.url('tencent')}/_sandbox/faults",
               json={"code": "RequestLimitExceeded", "count": 2, "action": "SubmitTextToImageJob"})
    httpx.post(f"{tencent.url('tencent')}/_sandbox/faults",
               json={"code": "FailedOperation.InnerError", "count": 2, "action": "QueryTextToImageJob"})
    before = tencent_stats(tencent)
    client(tencent).run_job(request(), poll_interval=0.1, timeout=30)
    after = tencent_stats(tencent)
    assert after["injected_faults"] - before["injected_faults"] == 4 and after["submits"] - before["submits"] == 1
    # InternalError (or ConsoleServerError, grouped with InnerError) on a paid submit does not say
    # whether the job exists: never sent again.
    for n, code in enumerate(("InternalError", "FailedOperation.ConsoleServerError"), start=1):
        httpx.post(f"{tencent.url('tencent')}/_sandbox/faults",
                   json={"code": code, "count": 1, "action": "SubmitTextToImageJob"})
        with pytest.raises(SubmitUnknown, match="does not say whether the job was created"):
            client(tencent).run_job(request(), poll_interval=0.1, timeout=30)
        assert tencent_stats(tencent)["requests"] - after["requests"] == n


def test_the_emulator_tells_what_a_refused_job_met(tencent) -> None:
    """A second text-to-image job sent while one runs is refused JobNumExceed, and the emulator's
    stats name both (a limit check that fails shows them): the refused prompt, the running one.
    A job that had ended does not run again when the latency is raised (it used to, read against
    the new latency, and took the slot: a test that raised it refused its own first job)."""
    url = tencent.url("tencent")
    provider = client(tencent, max_attempts=1)
    provider.run_job(request(prompt="a finished fox"), poll_interval=0.1, timeout=30)
    httpx.post(f"{url}/_sandbox/config", json={"latency": 30}).raise_for_status()
    try:
        provider.call("SubmitTextToImageJob", {"Prompt": "a running fox", "Resolution": "1024:1024"},
                      safe_to_repeat=False)
        with pytest.raises(TransientError, match="JobNumExceed"):
            provider.call("SubmitTextToImageJob", {"Prompt": "a refused fox", "Resolution": "1024:1024"},
                          safe_to_repeat=False)
    finally:
        httpx.post(f"{url}/_sandbox/config", json={"latency": 0.6}).raise_for_status()
    last = tencent_stats(tencent)["job_refusals"][-1]
    assert last["refused"] == "SubmitTextToImageJob 'a refused fox'", last
    assert [job.split(" (")[0] for job in last["running"]] == ["'a running fox'"], last


def test_the_emulator_holds_the_same_refine_limit(tencent) -> None:
    """The emulator's own reading of "base64 < 6 MB" (sandbox/tencent.py imports nothing of the
    client) refuses the same 6,000,000 bytes and takes 5,999,996; the client refuses the first
    before any request, so nothing it sends can be refused for its size under any reading."""
    provider = client(tencent)
    at_limit, under = padded_png(4_500_000), padded_png(4_499_997)
    with pytest.raises(BadRequest, match="ImageSizeExceed"):
        provider.call("RefineImage", {"InputImage": base64.b64encode(at_limit).decode(), "RspImgType": "url"})
    assert provider.call("RefineImage", {"InputImage": base64.b64encode(under).decode(), "RspImgType": "url"})
    before = tencent_stats(tencent)["requests"]
    with pytest.raises(BadRequest, match="under 6,000,000"):
        provider.refine(at_limit)
    assert tencent_stats(tencent)["requests"] == before


def test_an_unknown_operation_denied_code_rejects_the_item_not_the_account(tencent, tmp_path) -> None:
    """tencent-aiart.md lists two OperationDenied codes, both content moderation: a new code of the
    family rejects its item, and the run goes on with the next (no account stop)."""
    httpx.post(f"{tencent.url('tencent')}/_sandbox/faults",
               json={"code": "OperationDenied.SomethingNew", "count": 1, "action": "SubmitTextToImageJob"})
    items = "".join(f"  - {{id: n{i}, prompt: item {i}}}\n" for i in range(2))
    state = run_spec(tmp_path, spec_text("tc-denied", items, ", max_parallel: 1"), date(2026, 4, 5))
    manifest = state.result(raise_on_failure=False).manifest
    first, second = manifest["items"]
    assert first["error"]["error"] == "ContentRejected" and "OperationDenied.SomethingNew" in first["error"]["message"]
    assert not second.get("error") and second["objects"]


def spec_text(name: str, items: str, extra: str = "") -> str:
    return f"""\
version: 1
name: {name}
provider: tencent
blocks: {{tencent: sandbox}}
generate: {{width: 1024, height: 1024, options: {{LogoAdd: 0, Resolution: "768:1024"}}}}
upscale: {{engine: provider, factor: 2}}
archive: {{bucket: {TEST_BUCKET}, credentials: sandbox}}
run: {{poll_interval: 0.2, job_timeout: 60{extra}{'' if 'max_parallel' in extra else ', max_parallel: 4'}}}
items:
{items}"""


def test_pipeline_text_and_image_jobs_with_refine_land_in_s3_within_limits(tencent, tmp_path, flow_logs_at_info) -> None:
    items = (f"  - {{id: fox, prompt: a red fox in snow}}\n  - {{id: owl, prompt: an owl at night}}\n"
             f"  - {{id: sketch, prompt: render this sneaker, input_image: {ASSET}}}\n")
    before = tencent_stats(tencent)
    state = run_spec(tmp_path, spec_text("tc-e2e", items), date(2026, 4, 1))
    after = tencent_stats(tencent)
    assert state.is_completed(), state.result(raise_on_failure=False)
    s3 = s3_client(tencent)
    sizes = {key: Image.open(BytesIO(s3.get_object(Bucket=TEST_BUCKET, Key=f"tc-e2e/2026-04-01/{key}-1.png")
                                     ["Body"].read())).size for key in ("fox", "owl", "sketch")}
    assert sizes == {"fox": (2048, 2048), "owl": (2048, 2048), "sketch": (1536, 2048)}
    # 3 generations + 3 RefineImage upscales, each one charge, all in the estimate and the manifest;
    # never over the published limits.
    manifest = state.result()
    assert after["charges"] - before["charges"] == 6 == manifest["totals"]["credits"] == manifest["estimated_credits"]
    # The progress line a person watches counts the paid upscales too (it showed 3 credits).
    lines = [line for line in run_logs(state, "3/3 items started, 3 done") if "items started" in line]
    assert "3/3 items started, 3 done, 0 failed, 6 credits" in lines[-1], lines[-3:]
    assert after["job_num_exceeded"] == before["job_num_exceeded"]
    assert after["rate_limited"] == before["rate_limited"]
    assert after["peak_in_flight"].get("SubmitTextToImageJob", 0) <= 1
    assert after["peak_in_flight"].get("RefineImage", 0) <= 1


def test_a_paid_item_that_did_not_archive_counts_and_the_rerun_counts_only_what_it_paid(tencent, tmp_path) -> None:
    """The generation is paid, its paid upscale refused: the manifest counts the paid job (it said
    0 credits) and `credits_this_run` what this run's calls cost; the rerun collects the kept
    generation without paying again and pays the upscale: its `credits_this_run` is 1 (it was 2,
    counting the job another run paid for)."""
    day = date(2026, 4, 6)
    httpx.post(f"{tencent.url('tencent')}/_sandbox/faults",
               json={"code": "InvalidParameterValue.ParameterValueError", "count": 1, "action": "RefineImage"})
    before = tencent_stats(tencent)
    first = run_spec(tmp_path, spec_text("tc-paid-left", "  - {id: fox, prompt: a red fox in snow}\n"), day)
    outcome = first.result(raise_on_failure=False)
    assert isinstance(outcome, PipelineIncomplete), outcome
    [fox] = outcome.manifest["items"]
    assert fox["error"]["step"] == "upscale" and fox["credits"] == 1.0, fox
    assert fox["charge"].startswith("paid for, not archived"), fox
    assert outcome.manifest["totals"]["credits_this_run"] == 1.0 == tencent_stats(tencent)["charges"] - before["charges"]

    again = run_spec(tmp_path, spec_text("tc-paid-left", "  - {id: fox, prompt: a red fox in snow}\n"), day)
    assert again.is_completed(), again.result(raise_on_failure=False)
    assert tencent_stats(tencent)["charges"] - before["charges"] == 2  # the generation once, the upscale once
    totals = again.result()["totals"]
    assert (totals["credits"], totals["credits_this_run"]) == (2.0, 1.0), totals


def test_content_rejection_is_recorded_not_retried(tencent, tmp_path) -> None:
    items = "  - {id: ok, prompt: a calm lake}\n  - {id: bad, prompt: \"a [[nsfw]] scene\"}\n"
    before = tencent_stats(tencent)
    state = run_spec(tmp_path, spec_text("tc-reject", items), date(2026, 4, 2))
    after = tencent_stats(tencent)
    outcome = state.result(raise_on_failure=False)
    assert isinstance(outcome, PipelineIncomplete)
    bad = next(i for i in outcome.manifest["items"] if i["item"] == "bad")
    assert bad["error"]["error"] == "ContentRejected" and "TextIllegalDetected" in bad["error"]["message"]
    assert after["content_rejections"] - before["content_rejections"] == 1  # one call, no retry
    assert outcome.manifest["totals"]["images"] == 1


def test_a_job_that_failed_its_review_counts_as_maybe_charged(tencent, tmp_path) -> None:
    """A job that ends "4" with `FailedOperation.GenerateImageFailed`: its image was made, then
    refused by the review. Tencent bills "per successful call", and whether the job's successful
    submit was one is not said, so it counts as maybe charged, as a failed ImageToImage call
    does: the manifest records it failed, once, with its estimate as maybe charged (`charge`
    says why), and the run's budget keeps it. The emulator charged it nothing: the good item's
    generation and upscale are all it took, and the manifest counts one more."""
    items = "  - {id: ok, prompt: a calm lake}\n  - {id: doomed, prompt: \"a fox [[fail]]\"}\n"
    before = tencent_stats(tencent)
    state = run_spec(tmp_path, spec_text("tc-failed", items, ", max_credits: {tencent: 10}"), date(2026, 4, 7))
    charged = tencent_stats(tencent)["charges"] - before["charges"]
    outcome = state.result(raise_on_failure=False)
    assert isinstance(outcome, PipelineIncomplete), outcome
    manifest = outcome.manifest
    doomed = next(i for i in manifest["items"] if i["item"] == "doomed")
    assert doomed["error"]["step"] == "generate" and doomed["error"]["error"] == "ReviewFailed", doomed
    message = doomed["error"]["message"]
    assert message.count("GenerateImageFailed") == 1 and "failed: 处理失败" in message, message
    assert doomed["credits"] == 1 and doomed["charge"].startswith("maybe charged: "), doomed
    assert charged == 2  # the good item's generation and its RefineImage upscale
    assert manifest["totals"]["credits"] == manifest["totals"]["credits_this_run"] == charged + 1
    assert manifest["spend"]["tencent"]["reserved"] == 0, manifest["spend"]
    assert manifest["spend"]["tencent"]["charged"] == charged + 1, manifest["spend"]


def test_a_job_that_failed_with_a_server_error_is_recorded_failed_and_tried_anew(tencent, tmp_path) -> None:
    """A job that ends "4" with a code that, as an answer's error, means something else
    (`FailedOperation.ServerError`: transient; an account's code: stop) is still a job that
    failed: recorded failed, charged nothing (Tencent bills successful calls), its reservation
    settled, and the rerun sends a new job. It used to stay `submitted`: every rerun polled the
    dead job and failed the same way, the date's spend counting it as paid."""
    items = "  - {id: ok, prompt: a calm lake}\n  - {id: doomed, prompt: \"a fox [[fail:FailedOperation.ServerError]]\"}\n"
    text = spec_text("tc-server-failed", items, ", max_credits: {tencent: 10}")
    day, before = date(2026, 4, 8), tencent_stats(tencent)
    outcome = run_spec(tmp_path, text, day).result(raise_on_failure=False)
    assert isinstance(outcome, PipelineIncomplete), outcome
    doomed = next(i for i in outcome.manifest["items"] if i["item"] == "doomed")
    assert doomed["error"]["error"] == "JobFailed" and "FailedOperation.ServerError" in doomed["error"]["message"], doomed
    assert doomed["credits"] == 0, doomed
    first = tencent_stats(tencent)
    charged = first["charges"] - before["charges"]
    assert charged == 2  # the good item's generation and its upscale; the failed job nothing
    assert outcome.manifest["spend"]["tencent"] == {**outcome.manifest["spend"]["tencent"], "charged": 2, "reserved": 0}

    again = run_spec(tmp_path, text, day).result(raise_on_failure=False)
    [redone] = [i for i in again.manifest["items"] if i["item"] == "doomed"]
    assert redone["error"]["error"] == "JobFailed", redone
    assert tencent_stats(tencent)["submits"] - first["submits"] == 1  # a new job, not the dead one polled
    assert tencent_stats(tencent)["charges"] == first["charges"]
    assert again.manifest["spend"]["tencent"]["earlier_runs"] == 2, again.manifest["spend"]


def test_validation_errors_make_no_call(tencent, tmp_path) -> None:
    text = spec_text("tc-invalid", "  - {id: a, prompt: a cat}\n").replace("LogoAdd: 0, ", "")
    before = tencent_stats(tencent)
    state = run_spec(tmp_path, text, date(2026, 4, 3))
    assert state.is_failed() and "generate.options.LogoAdd" in str(state.result(raise_on_failure=False))
    assert tencent_stats(tencent)["requests"] == before["requests"]


def test_low_balance_stops_the_run(tencent, tmp_path) -> None:
    httpx.post(f"{tencent.url('tencent')}/_sandbox/faults",
               json={"code": "ResourceUnavailable.LowBalance", "count": 1, "action": "SubmitTextToImageJob"})
    items = "".join(f"  - {{id: n{i}, prompt: item {i}}}\n" for i in range(3))
    state = run_spec(tmp_path, spec_text("tc-broke", items, ", max_parallel: 1"), date(2026, 4, 4))
    manifest = state.result(raise_on_failure=False).manifest
    errors = [i.get("error") or {} for i in manifest["items"]]
    assert errors[0]["error"] == "AccountStop" and "LowBalance" in errors[0]["message"]
    assert any(e.get("error") == "RunStopped" for e in errors[1:])


def test_a_refine_whose_answer_was_not_seen_keeps_its_slot(tencent) -> None:
    """RefineImage runs one at a time (tencent-aiart.md "Concurrency": RefineImage 1). A call that
    timed out may still be running there; its slot was let go at once, and the next image's call,
    sent while it ran, was refused `JobNumExceed`. Now the slot stays held `unknown_hold` seconds."""
    import threading

    from flows.running.tasks import limiter_for

    slow, quick = client(tencent, timeout=1.0), client(tencent)
    for provider in (slow, quick):
        provider.use_limiter(limiter_for("tencent", "sandbox"))
    httpx.post(f"{tencent.url('tencent')}/_sandbox/faults",
               json={"kind": "busy", "action": "RefineImage", "delay": 3.0, "count": 1})
    before, outcome = tencent_stats(tencent), []

    def first() -> None:
        try:
            slow.refine(padded_png(2_000), unknown_hold=4.0)
        except SubmitUnknown as exc:
            outcome.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.monotonic() + 60
    while tencent_stats(tencent)["by_action"].get("RefineImage", 0) == before["by_action"].get("RefineImage", 0):
        assert time.monotonic() < deadline, "the first RefineImage was never sent"
        time.sleep(0.05)  # the first call is at the emulator: the second waits for its slot
    assert quick.refine(padded_png(3_000))
    thread.join()
    after = tencent_stats(tencent)
    assert len(outcome) == 1, outcome
    assert after["job_num_exceeded"] == before["job_num_exceeded"]
    assert after["peak_in_flight"]["RefineImage"] == 1
