"""Places where client and emulator once agreed with each other but not with the providers'
documents. Each test names its source: `docs/providers/<provider>.md` (this project's
account of each provider, every fact marked confirmed or assumed, with its source)."""

from __future__ import annotations

import base64
import time
from datetime import date, datetime, timedelta, timezone
from email.utils import format_datetime
from io import BytesIO
from pathlib import Path

import httpx
import pytest
import respx
from PIL import Image

from blocks.base import MAX_RETRY_AFTER, GenerationRequest, retry_after_seconds, with_retries
from blocks.errors import AccountStop, BadRequest, ContentRejected, TransientError
from blocks.tams import TamsProvider
from blocks.tencent import TencentAiArtProvider, check_image, map_error
from flows.imaging.images import mime_of
from tests.conftest import TEST_BUCKET, run_spec, tams_stats, tencent_stats

ASSET = Path(__file__).parent.parent / "pipelines" / "assets" / "sneaker-sketch.png"


def mpo_bytes(size: tuple[int, int] = (320, 240)) -> bytes:
    """A two-picture MPO, as a phone camera writes it (a JPEG with a second image after it)."""
    first, second = Image.new("RGB", size, (200, 40, 40)), Image.new("RGB", size, (40, 40, 200))
    out = BytesIO()
    first.save(out, format="MPO", save_all=True, append_images=[second])
    return out.getvalue()


def tencent_request(**overrides) -> GenerationRequest:
    fields = {"request_id": "f" * 32, "prompt": "a fox", "seed": 9, "width": 1024, "height": 1024,
              "options": {"LogoAdd": 0}}
    return GenerationRequest(**{**fields, **overrides})


def tencent_client(state) -> TencentAiArtProvider:
    return TencentAiArtProvider(secret_id=state.account('tencent')['secret_id'], secret_key=state.secret('tencent', 'secret_key'),
                                endpoint=state.url('tencent'))


@pytest.fixture()
def tencent(sandbox_blocks):
    yield sandbox_blocks
    httpx.delete(f"{sandbox_blocks.url('tencent')}/_sandbox/faults")


# --- retries: Retry-After and deadlines ---------------------------------------------------------------

def test_retry_after_in_both_forms_and_capped() -> None:
    """RFC 9110 section 10.2.3: Retry-After is delay-seconds or an HTTP-date. tams.md
    "Limits and money" (429/8 is retried with back-off). A wait longer than MAX_RETRY_AFTER is a
    transient failure at once, not a sleeping worker."""
    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 28 <= retry_after_seconds(httpx.Response(429, headers={"Retry-After": soon})) <= 30
    assert retry_after_seconds(httpx.Response(429, headers={"Retry-After": "7"})) == 7
    assert retry_after_seconds(httpx.Response(429, headers={"Retry-After": "soon"})) is None
    calls = []

    def asks_for_an_hour() -> None:
        calls.append(1)
        raise TransientError("busy", provider="p", retry_after=3600)

    started = time.monotonic()
    with pytest.raises(TransientError, match="more than 60 s"):
        with_retries(asks_for_an_hour, 5)
    assert calls == [1] and time.monotonic() - started < 1 and MAX_RETRY_AFTER == 60


def test_a_call_gives_up_at_its_deadline() -> None:
    calls = []

    def always_busy() -> None:
        calls.append(1)
        raise TransientError("busy", provider="p", retry_after=0.4)

    started = time.monotonic()
    with pytest.raises(TransientError, match="deadline"):
        with_retries(always_busy, 50, deadline=1.0)
    assert time.monotonic() - started < 1.5 and 2 <= len(calls) <= 4


@respx.mock
def test_an_http_date_retry_after_reaches_the_tams_client() -> None:
    """The client reads the header it is given (tams.md "Limits and money": 429/8 is retried)."""
    later = format_datetime(datetime.now(timezone.utc) + timedelta(minutes=10), usegmt=True)
    route = respx.post("https://tams.test/v1/jobs/credits").mock(return_value=httpx.Response(
        429, headers={"Retry-After": later}, json={"code": 8, "message": "rate limit"}))
    provider = TamsProvider(app_id="a", api_token="t", endpoint="https://tams.test")
    with pytest.raises(TransientError, match="more than 60 s"):
        provider._call("POST", "/v1/jobs/credits", {"stages": []})
    assert route.call_count == 1


# --- TAMS: simple (Bearer) authentication -------------------------------------------------------------

def test_tams_block_takes_exactly_one_credential() -> None:
    """tams.md "Talking to it": two modes, bearer token and RSA signature; support both."""
    with pytest.raises(ValueError, match="exactly one"):
        TamsProvider(app_id="a", endpoint="https://x")
    with pytest.raises(ValueError, match="exactly one"):
        TamsProvider(app_id="a", private_key="k", api_token="t", endpoint="https://x")


def test_tams_bearer_token_runs_a_spec_and_a_wrong_token_stops_after_one_request(sandbox_blocks, tmp_path) -> None:
    """tams.md "Talking to it": `Authorization: Bearer <token>`, what the official
    ComfyUI nodes send for every call; a bad credential is HTTP 401 (not retried)."""
    from deployments.limits import apply_limits

    state = sandbox_blocks
    TamsProvider(app_id=state.account('tams')['app_id'], api_token=state.secret('tams', 'token'), endpoint=state.url('tams')).save(
        "sandbox-token", overwrite=True)
    apply_limits({"tams": ["sandbox-token"]})
    before = tams_stats(state)
    text = f"""\
version: 1
name: tams-bearer
provider: tams
blocks: {{tams: sandbox-token}}
generate: {{width: 512, height: 512, steps: 20, sampler: "Euler a"}}
archive: {{bucket: {TEST_BUCKET}, credentials: sandbox}}
run: {{poll_interval: 0.2, job_timeout: 60}}
items:
  - {{id: a, prompt: a lighthouse}}
"""
    assert run_spec(tmp_path, text, date(2026, 11, 3)).is_completed()
    after = tams_stats(state)
    assert after["charges"] - before["charges"] == 1 and after["auth_failures"] == before["auth_failures"]
    wrong = TamsProvider(app_id=state.account('tams')['app_id'], api_token="not-the-token", endpoint=state.url('tams'))
    with pytest.raises(AccountStop):
        wrong.poll("123")
    assert tams_stats(state)["requests"] - after["requests"] == 1


# --- images: MPO --------------------------------------------------------------------------------------

def test_an_mpo_photo_is_a_jpeg_for_the_client_and_the_emulator(tencent) -> None:
    """tencent.md "Actions used": jpg/jpeg/png/bmp/tiff/webp. Many phone cameras write
    MPO (CIPA DC-007), a JPEG whose first picture is an ordinary JPEG stream; Pillow names it MPO."""
    data = mpo_bytes()
    assert Image.open(BytesIO(data)).format == "MPO"
    assert mime_of(data) == "image/jpeg"
    check_image(data)
    provider = tencent_client(tencent)
    req = tencent_request(has_input=True, input_ref=provider.upload(data, "image/jpeg"),
                          options={"LogoAdd": 0, "Resolution": "768:768"})
    result = provider.run_job(req, poll_interval=0.1, timeout=30)
    assert Image.open(BytesIO(result.images[0])).size == (768, 768)


# --- Tencent ------------------------------------------------------------------------------------------

def test_generate_image_failed_is_not_tried_again_unless_the_block_opts_in(tencent) -> None:
    """tencent-aiart.md "Error codes": `FailedOperation.GenerateImageFailed`, "retry once or twice";
    "Pricing": billing on success only is an assumption. So by default the item is rejected at the
    first such answer, and with `review_failure_retries` each failed call is told to the journal
    as maybe charged (before the next is reserved and sent). The emulator's `after` fault makes
    the image and charges it, then answers the code: every charge it took for a failed call is
    one the client counted."""
    from pydantic import ValidationError

    from blocks.base import NoJournal
    from blocks.tencent import ReviewFailed

    class Heard(NoJournal):
        def __init__(self) -> None:
            self.said: list[str] = []

        def sending(self) -> None:
            self.said.append("sending")

        def charged_refusal(self, error: BaseException) -> None:
            self.said.append("charged refusal")

    provider = tencent_client(tencent)
    req = tencent_request(has_input=True, input_ref=provider.upload(ASSET.read_bytes(), "image/png"),
                          options={"LogoAdd": 0, "Resolution": "768:768"})
    fault = {"code": "FailedOperation.GenerateImageFailed", "action": "ImageToImage", "after": True}
    faults = f"{tencent.url('tencent')}/_sandbox/faults"

    def calls_and_charges() -> tuple[int, int]:
        stats = tencent_stats(tencent)
        return stats["by_action"].get("ImageToImage", 0), stats["charges"]

    httpx.post(faults, json={**fault, "count": 1})
    before = calls_and_charges()
    with pytest.raises(ReviewFailed, match="failed the review.*1 call, maybe charged") as caught:
        provider.run_job(req, poll_interval=0.1, timeout=30)  # the emulator's text, the document's
    after = calls_and_charges()
    assert caught.value.calls == 1 == after[0] - before[0] == after[1] - before[1]
    assert isinstance(caught.value, ContentRejected) and caught.value.charge == "maybe"

    retrying = provider.model_copy(update={"review_failure_retries": 2})
    httpx.post(faults, json={**fault, "count": 2})
    heard = Heard()
    result = retrying.run_job(req.model_copy(update={"request_id": "g" * 32}), poll_interval=0.1, timeout=30,
                              journal=heard)
    again = calls_and_charges()
    assert result.images and heard.said == ["sending", "charged refusal"] * 2 + ["sending"]
    assert again[0] - after[0] == 3 and again[1] - after[1] == 3

    httpx.post(faults, json={**fault, "count": 3})
    heard = Heard()
    with pytest.raises(ReviewFailed, match="3 calls, each maybe charged") as caught:
        retrying.run_job(req.model_copy(update={"request_id": "h" * 32}), poll_interval=0.1, timeout=30,
                         journal=heard)
    assert caught.value.calls == 3 == calls_and_charges()[1] - again[1] == heard.said.count("charged refusal")
    # A text-to-image submit refused so is not made again (that would be a new job), and a paid
    # upscale (RefineImage) refused so is maybe charged too.
    for action, call in (("SubmitTextToImageJob", lambda journal: retrying.run_job(
            tencent_request(), poll_interval=0.1, timeout=30, journal=journal)),
                         ("RefineImage", lambda journal: retrying.refine(ASSET.read_bytes(), journal))):
        httpx.post(faults, json={**fault, "action": action, "count": 2})
        heard, calls = Heard(), tencent_stats(tencent)["by_action"].get(action, 0)
        with pytest.raises(ReviewFailed):
            call(heard)
        httpx.delete(faults)
        assert tencent_stats(tencent)["by_action"][action] - calls == 1, action
        assert heard.said == ["sending", "charged refusal"], (action, heard.said)
    with pytest.raises(ValidationError):  # the document says once or twice
        TencentAiArtProvider(secret_id="i", secret_key="k", review_failure_retries=3)


def test_image_to_image_over_2000x2000_is_refused_before_any_call(tencent) -> None:
    """tencent.md "Errors and retries": `FailedOperation.ImageResolutionExceed` (> 2000x2000),
    read as the area (assumed: the page also says `origin` scales a long side over 2000 down)."""
    out = BytesIO()
    Image.new("RGB", (2100, 2000), (90, 90, 90)).save(out, format="PNG")
    big = out.getvalue()
    provider = tencent_client(tencent)
    before = tencent_stats(tencent)
    with pytest.raises(BadRequest, match="over 2000x2000"):
        provider.upload(big, "image/png")
    assert tencent_stats(tencent)["requests"] == before["requests"]
    check_image(big, "upscale input")  # RefineImage has no such rule
    with pytest.raises(BadRequest, match="ImageResolutionExceed"):  # the emulator knows the rule too
        provider.call("ImageToImage", {"InputImage": base64.b64encode(big).decode(), "LogoAdd": 0})


def test_result_config_is_sent_as_given(tencent) -> None:
    """tencent.md "Actions used": `ResultConfig` `{Resolution}`; options are sent as
    given, so a ResultConfig in `generate.options` is the one the provider gets."""
    provider = tencent_client(tencent)
    options = {"LogoAdd": 0, "ResultConfig": {"Resolution": "1024:768"}}
    req = tencent_request(has_input=True, input_ref=provider.upload(ASSET.read_bytes(), "image/png"), options=options)
    TencentAiArtProvider.validate(req)
    assert TencentAiArtProvider.output_size(req) == (1024, 768)
    result = provider.run_job(req, poll_interval=0.1, timeout=30)
    assert Image.open(BytesIO(result.images[0])).size == (1024, 768)


@pytest.mark.parametrize(("options", "field", "why"), [
    ({"LogoAdd": 0, "Colour": "red"}, "generate.options.Colour", "neither ImageToImage nor SubmitTextToImageJob"),
    ({"LogoAdd": 1, "LogoParam": {"LogoRect": {"X": 1}}}, "generate.options.LogoParam", "LogoUrl or LogoImage"),
    ({"LogoAdd": 1, "LogoParam": {"LogoUrl": "https://x/l.png", "LogoRect": {"X": -1}}}, "generate.options.LogoParam",
     "non-negative integers"),
    ({"LogoAdd": 0, "EnhanceImage": 2}, "generate.options.EnhanceImage", "0 or 1"),
    ({"LogoAdd": 0, "ResultConfig": {"Resolution": "768:768"}, "Resolution": "768:768"},
     "generate.options.ResultConfig", "not both"),
])
def test_tencent_options_are_checked_not_dropped(options: dict, field: str, why: str) -> None:
    """tencent.md "Actions used" (LogoParam `{LogoUrl, LogoImage,
    LogoRect{X,Y,Width,Height}}`, EnhanceImage 0/1): an option the provider does not know is an
    error, never silently left out of the request."""
    with pytest.raises(BadRequest, match=why) as caught:
        TencentAiArtProvider.validate(tencent_request(has_input=True, options=options))
    assert caught.value.message.startswith(field)


def test_the_emulator_refuses_unknown_parameters_and_bad_logos(tencent) -> None:
    """tencent.md "Errors and retries": `UnknownParameter`, `InvalidParameterValue.LogoParamErr`."""
    provider = tencent_client(tencent)
    with pytest.raises(BadRequest, match="Colour"):
        provider.call("SubmitTextToImageJob", {"Prompt": "a fox", "Colour": "red", "LogoAdd": 0})
    with pytest.raises(BadRequest, match="LogoParam"):
        provider.call("SubmitTextToImageJob", {"Prompt": "a fox", "LogoAdd": 1, "LogoParam": {"LogoRect": {}}})


def test_an_unknown_option_is_refused_at_its_line(tmp_path, capsys) -> None:
    """The same rule through `imagegen validate`: the error stands at the option's own line."""
    from flows.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text(f"""\
version: 1
name: tc-unknown-option
provider: tencent
blocks: {{tencent: sandbox}}
generate:
  width: 1024
  height: 1024
  options:
    LogoAdd: 0
    Colour: red
archive: {{bucket: {TEST_BUCKET}, credentials: sandbox}}
items:
  - {{id: a, prompt: a fox}}
""")
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:10:5: items[0] (a): tencent would refuse it: generate.options.Colour" in err


@pytest.mark.parametrize(("code", "kind"), [
    ("AuthFailure.SomethingNew", AccountStop), ("OperationDenied.SomethingNew", ContentRejected),
    ("OperationDenied.TextIllegalDetected", ContentRejected), ("OperationDenied.ImageIllegalDetected", ContentRejected),
    ("InvalidParameterValue.SomethingNew", BadRequest),
])
def test_unknown_codes_fall_back_on_their_family(code: str, kind: type) -> None:
    """tencent-aiart.md "Error codes": the auth group is "not retryable: fix credentials, clock,
    CAM", so a new AuthFailure code stops the account; the document's only OperationDenied codes
    are content moderation, so a new one rejects its item, never the whole account."""
    assert type(map_error(code, "m")) is kind


# --- 触站AI ---------------------------------------------------------------------------------------

def chuzhan_request(**overrides) -> GenerationRequest:
    fields = {"request_id": "c" * 32, "prompt": "a kite", "seed": 5, "width": 512, "height": 512, "model": "1"}
    return GenerationRequest(**{**fields, **overrides})


def test_chuzhan_upscale_is_a_whole_number_and_hrscale_is_priced_as_sent(sandbox_blocks) -> None:
    """chuzhan.md "Drawing tasks": `upscale` int (<= 3), `hrScale` a number 1..3; the credit page
    prices w*h*r^2 for hires. Nothing is truncated: 1.5 is priced as 1.5 (the emulator's own
    `predictConsume` answer agrees), and a fractional upscale is refused, not cut to 1."""
    from blocks.chuzhan import ChuzhanProvider, check_caps, credits_for

    with pytest.raises(BadRequest, match="whole number"):
        check_caps({"prompt": "a", "upscale": 1.5})
    provider = ChuzhanProvider(api_token=sandbox_blocks.secret('chuzhan', 'token'), endpoint=sandbox_blocks.url('chuzhan'))
    req = chuzhan_request(options={"hrScale": 1.5, "hrSteps": 20})
    offline = ChuzhanProvider.estimate_offline(req).credits
    assert offline == credits_for({**ChuzhanProvider.draw_params(req)}) and offline != credits_for(
        {**ChuzhanProvider.draw_params(req), "hrScale": 1})
    assert provider.estimate(req).credits == offline
    assert ChuzhanProvider.output_size(req) == (768, 768)


def test_chuzhan_hrscale_with_an_input_image_is_a_note_not_an_error(sandbox_blocks) -> None:
    """chuzhan.md "Drawing tasks": `hrScale` is "text-to-image only": on image-to-image it has no
    effect, so the spec is accepted with a note, and priced and sized as without it (as the
    emulator charges)."""
    from blocks.chuzhan import ChuzhanProvider

    provider = ChuzhanProvider(api_token=sandbox_blocks.secret('chuzhan', 'token'), endpoint=sandbox_blocks.url('chuzhan'))
    ref = provider.upload(ASSET.read_bytes(), "image/png")
    req = chuzhan_request(has_input=True, input_ref=ref, options={"hrScale": 2})
    ChuzhanProvider.validate(req)
    assert ChuzhanProvider.notes(req) and "no effect" in ChuzhanProvider.notes(req)[0]
    plain = chuzhan_request(has_input=True, input_ref=ref)
    assert ChuzhanProvider.estimate_offline(req).credits == ChuzhanProvider.estimate_offline(plain).credits
    result = provider.run_job(req, poll_interval=0.1, timeout=30)
    assert Image.open(BytesIO(result.images[0])).size == (512, 512)
    assert result.credits == ChuzhanProvider.estimate_offline(plain).credits


def test_chuzhan_callback_is_checked_when_the_block_is_made() -> None:
    """chuzhan.md "Drawing tasks": the provider rejects localhost/LAN callback URLs, so a Block with
    one is refused before it can make any call."""
    from blocks.chuzhan import ChuzhanProvider

    for url in ("http://127.0.0.1:9000/cb", "http://192.168.1.4/cb", "ftp://example.com/cb", "http://localhost/cb"):
        with pytest.raises(ValueError, match="public http"):
            ChuzhanProvider(api_token="t", callback=url)
    assert ChuzhanProvider(api_token="t", callback="https://hooks.example.com/cz").callback


def test_chuzhan_multi_image_estimates_say_what_they_assume() -> None:
    """chuzhan.md "Credits": the examples cannot tell where x0.9 sits relative to
    rounding; an offline estimate for several images says which order it assumed."""
    from blocks.chuzhan import ChuzhanProvider

    assert ChuzhanProvider.estimate_offline(chuzhan_request()).note is None
    assert "assumed" in ChuzhanProvider.estimate_offline(chuzhan_request(count=3)).note


def test_tencent_region_can_be_set_per_action(tencent) -> None:
    """tencent.md "Talking to it": ImageToImage is served in ap-singapore (the emulator refuses
    it elsewhere with `UnsupportedRegion`), while text-to-image may be served in another region:
    the Block's `action_regions` sends each action to its own region (X-TC-Region is not signed)."""
    fields = dict(secret_id=tencent.account('tencent')['secret_id'], secret_key=tencent.secret('tencent', 'secret_key'),
                  endpoint=tencent.url('tencent'), region="ap-guangzhou")
    elsewhere = TencentAiArtProvider(**fields)
    payload = {"InputImage": base64.b64encode(ASSET.read_bytes()).decode(), "LogoAdd": 0, "Prompt": "a shoe"}
    with pytest.raises(BadRequest, match="UnsupportedRegion|ap-singapore"):
        elsewhere.call("ImageToImage", payload)
    both = TencentAiArtProvider(**fields, action_regions={"ImageToImage": "ap-singapore"})
    assert both.call("ImageToImage", payload)["ResultImage"]
    assert both.call("SubmitTextToImageJob", {"Prompt": "a fox", "LogoAdd": 0})["JobId"]
