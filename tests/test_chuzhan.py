"""触站AI: the published credit formula, caps refused before any call, envelope errors (respx),
and pipelines against the emulator process: estimate equals charge, hires fix and upscale land
in S3 at the right size, a content rejection is recorded and not retried, in-flight cap held."""

from __future__ import annotations

from datetime import date
from io import BytesIO
from pathlib import Path

import httpx
import pytest
import respx
from PIL import Image

from blocks.base import GenerationRequest
from blocks.chuzhan import (ChuzhanProvider, TaskFailed, check_caps, credit_readings, credits_for, map_error,
                            output_size)
from blocks.errors import AccountStop, BadRequest, ContentRejected, SubmitUnknown, TransientError
from flows.running.report import PipelineIncomplete
from flows.specs.spec import load_spec
from tests.conftest import TEST_BUCKET, chuzhan_stats, run_spec, s3_client

ASSET = Path(__file__).parent.parent / "pipelines" / "assets" / "sneaker-sketch.png"


@pytest.mark.parametrize(("params", "credits"), [
    # The provider page's worked examples.
    ({"width": 768, "height": 1024, "steps": 20}, 12),
    ({"width": 512, "height": 512, "hrScale": 2, "hrSteps": 20}, 20),
    ({"width": 512, "height": 512, "upscale": 2}, 6),
    # Defaults: steps 20, hrSteps 20.
    ({"width": 768, "height": 1024}, 12),
    ({"width": 512, "height": 512, "hrScale": 2}, 20),
    # Clamps: base sides below 512 count as 512 (1.0 credit unclamped, 4.0 clamped) ...
    ({"width": 256, "height": 256, "steps": 20}, 4),
    # ... upscale sides below 256 count as 256 (4.456 unclamped -> 4; 4.747 clamped -> 5).
    ({"width": 200, "height": 200, "upscale": 3}, 5),
    # Upscale is priced on the hires-fixed size: 4.0003 + 16.0013 + 7.9692 = 27.97 (22 if not).
    ({"width": 512, "height": 512, "hrScale": 2, "upscale": 2}, 28),
    # Flat extras.
    ({"width": 768, "height": 1024, "controlnet": {"units": [{"type": "canny"}, {"type": "depth"}]}}, 16),
    ({"width": 768, "height": 1024, "imgOptions": {"removeBackground": True}}, 14),
    ({"width": 768, "height": 1024, "imgOptions": {"redrawBackground": True}}, 14),
    ({"width": 768, "height": 1024, "imgOptions": {"facePreservation": True}}, 14),
    ({"width": 768, "height": 1024, "imgOptions": {"genderDetect": True}}, 13),
    ({"width": 768, "height": 1024, "faceFix": True}, 14),
    # Several images: single-image credits x 0.9 x n, rounded half up; whether the single image
    # is rounded first the page does not say, so the larger of the two readings is estimated.
    ({"width": 768, "height": 1024, "batchSize": 3}, 32),   # 12 x 2.7 = 32.4; 12.00095 x 2.7 = 32.40
    ({"width": 768, "height": 1024, "batchSize": 2}, 22),   # 12 x 1.8 = 21.6; 12.00095 x 1.8 = 21.60
    # 4.498 -> 4, x 5.4 = 21.6 -> 22 if rounded first; 4.498 x 5.4 = 24.29 -> 24 if not: 24.
    ({"width": 128, "height": 128, "upscale": 2, "batchSize": 6}, 24),
    # 11.2509 -> 11, x 5.4 = 59.4 -> 59 if rounded first; 11.2509 x 5.4 = 60.75 -> 61 if not: 61.
    ({"width": 768, "height": 768, "steps": 25, "batchSize": 6}, 61),
    # Numbers as numeric strings, as the page's own examples send them.
    ({"width": "768", "height": "1024", "steps": "20"}, 12),
])
def test_credit_formula(params: dict, credits: int) -> None:
    assert credits_for(params) == credits


@pytest.mark.parametrize(("params", "credits"), [
    ({"width": 768, "height": 1024, "steps": 20}, 12),        # the page's three worked examples
    ({"width": 512, "height": 512, "hrScale": 2, "hrSteps": 20}, 20),
    ({"width": 512, "height": 512, "upscale": 2}, 6),
])
def test_the_emulator_prices_from_the_page_itself(params: dict, credits: int) -> None:
    """The emulator's formula is its own (sandbox/chuzhan.py imports nothing of the client):
    it passes the published examples, and where client and emulator both compute a price,
    two independent readings of the page agree: for one image exactly, for several the client
    estimates the larger of the emulator's two rounding orders (never less than either)."""
    from sandbox.chuzhan import ROUNDINGS, price

    assert price(params)[0] == credits
    grid = [{"width": w, "height": h, "steps": st, "batchSize": n, **extra}
            for w, h in ((512, 512), (768, 1024), (128, 128), (1024, 640)) for st in (10, 20, 33) for n in (1, 3, 6)
            for extra in ({}, {"upscale": 2}, {"hrScale": 1.5, "hrSteps": 30}, {"faceFix": True},
                          {"controlnet": {"units": [{"type": "canny"}]}, "imgOptions": {"genderDetect": True}})]
    assert [max(price(g, r)[0] for r in ROUNDINGS) for g in grid] == [credits_for(g) for g in grid]
    assert all(price(g, "image_first")[0] == price(g, "total")[0] for g in grid if g["batchSize"] == 1)


def test_where_several_images_are_rounded_is_the_pages_ambiguity() -> None:
    """issue 26: 768x768, 25 steps, 6 images is 59 if one image's 11.2509 is rounded before
    x0.9 x 6 and 61 if not. The emulator can charge either way; the client estimates 61."""
    from sandbox.chuzhan import price

    params = {"width": 768, "height": 768, "steps": 25, "batchSize": 6}
    assert (price(params, "image_first")[0], price(params, "total")[0]) == (59, 61)
    assert credit_readings(params) == {"image_first": 59, "total": 61} and credits_for(params) == 61
    estimate = ChuzhanProvider.estimate_offline(request(width=768, height=768, steps=25, count=6))
    assert estimate.credits == 61 and "59 if so, 61 if not" in estimate.note


def test_final_size() -> None:
    assert output_size({"width": 512, "height": 768, "hrScale": 2, "upscale": 2}) == (2048, 3072)


@pytest.mark.parametrize(("params", "field"), [
    ({"width": 4096}, "generate.width"), ({"height": 32}, "generate.height"), ({"steps": 60}, "generate.steps"),
    ({"hrScale": 4}, "generate.options.hrScale"), ({"hrSteps": 51}, "generate.options.hrSteps"),
    ({"width": 1536, "height": 1536, "hrScale": 2}, "generate.options.hrScale"),      # area 9.4M > 4.19M
    ({"width": 2048, "height": 512, "hrScale": 1.5}, "generate.options.hrScale"),     # a side 3072 > 2048
    ({"upscale": 4}, "upscale.factor"), ({"upscale": 1.5}, "upscale.factor"),         # a whole number, not cut ({"batchSize": 7}, "items.count"),
    ({"controlnet": {"units": [{}, {}, {}, {}]}}, "generate.options.controlnet.units"),
    ({"imgOptions": {"removeBackground": True}}, "generate.options.imgOptions.removeBackground"),
    ({"cfgScale": 31}, "generate.cfg_scale"), ({"denoisingStrength": 0.5}, "generate.denoising_strength"),
    ({"callback": "http://127.0.0.1:9000/cb"}, "callback"), ({"nonce": "x" * 33}, "nonce"),
    ({"prompt": "  "}, "items.prompt"),
])
def test_caps_name_the_field(params: dict, field: str) -> None:
    with pytest.raises(BadRequest, match=field.replace(".", r"\.")):
        check_caps({"prompt": "a cat", "width": 512, "height": 512, **params})


@pytest.mark.parametrize(("code", "msg", "kind"), [
    (400, "参数错误", BadRequest), (401, "无效的 Auth-Token", AccountStop), (402, "积分余额不足", AccountStop),
    (403, "词条中涉及敏感词，请调整后再生成图片", ContentRejected), (429, "任务数已达上限", TransientError),
    (500, "内部错误", TransientError), (999, "词条中涉及敏感词", ContentRejected), (998, "余额不足", AccountStop),
])
def test_envelope_errors(code: int, msg: str, kind: type) -> None:
    assert type(map_error(code, msg)) is kind


def request(**overrides) -> GenerationRequest:
    return GenerationRequest(**{"request_id": "c" * 40, "prompt": "a cat", "seed": 3, "width": 512, "height": 512,
                                **overrides})


@respx.mock
def test_a_submit_whose_answer_is_lost_is_never_repeated() -> None:
    route = respx.post("https://cz.test/v1/draw").mock(side_effect=httpx.ReadTimeout("slow"))
    provider = ChuzhanProvider(api_token="t0k", endpoint="https://cz.test")
    with pytest.raises(SubmitUnknown, match="may have been charged"):
        provider.submit(request())
    assert route.call_count == 1
    sent = route.calls[0].request
    assert sent.headers["Auth-Token"] == "t0k" and b'"nonce":"cccccccccccccccccccccccccccccccc"' in sent.content
    assert sent.headers["Authorization"] == "Bearer t0k"  # the token both ways (docs/providers/chuzhan.md)


@respx.mock
def test_estimate_falls_back_to_the_formula_offline() -> None:
    respx.post("https://cz.test/v1/draw").mock(side_effect=httpx.ConnectError("down"))
    provider = ChuzhanProvider(api_token="t", endpoint="https://cz.test", max_attempts=1)
    estimate = provider.estimate(request(width=768, height=1024))
    assert (estimate.credits, estimate.source) == (12, "formula")


@respx.mock
@pytest.mark.parametrize("data, error, said", [
    ({"paintingSign": "task-9", "used": 12, "balance": 88}, AccountStop, "does not honour predictConsume"),
    ({"balance": 88}, BadRequest, "without a readable estimateUsed"),
])
def test_a_price_answer_that_drew_a_task_stops_asking(data: dict, error: type, said: str) -> None:
    """`predictConsume` is documented to price without drawing. An answer naming a task or a
    charge means the service drew and charged: it was read as a price (or a `KeyError`), and
    every item priced so drew again."""
    route = respx.post("https://cz.test/v1/draw").mock(return_value=httpx.Response(
        200, json={"success": True, "code": 0, "data": data}))
    provider = ChuzhanProvider(api_token="t", endpoint="https://cz.test")
    with pytest.raises(error, match=said):
        provider.estimate(request())
    assert route.call_count == 1


def test_secret_is_not_in_errors_or_repr() -> None:
    provider = ChuzhanProvider(api_token="very-secret-token", endpoint="http://127.0.0.1:9")
    assert "very-secret-token" not in repr(provider) and "very-secret-token" not in str(provider.model_dump())


# --- against the emulator ----------------------------------------------------------------------

def spec_text(name: str, items: str, *, options: str = "{}", upscale: str = "", size: int = 512) -> str:
    return f"""\
version: 1
name: {name}
provider: chuzhan
blocks: {{chuzhan: sandbox}}
generate: {{width: {size}, height: {size}, steps: 20, model: "1", options: {options}}}
{upscale}
archive: {{bucket: {TEST_BUCKET}, credentials: sandbox}}
run: {{poll_interval: 0.2, job_timeout: 60, max_parallel: 5}}
items:
{items}"""


@pytest.fixture()
def chuzhan(sandbox_blocks):
    yield sandbox_blocks
    httpx.post(f"{sandbox_blocks.url('chuzhan')}/_sandbox/config", json={"latency": 0.6, "balance": 100000})


def manifest_of(state) -> dict:
    outcome = state.result(raise_on_failure=False)
    return outcome.manifest if isinstance(outcome, PipelineIncomplete) else outcome


def test_hires_fix_and_upscale_land_in_s3_and_estimate_equals_charge(chuzhan, tmp_path) -> None:
    items = "  - {id: one, prompt: a castle, count: 1}\n  - {id: two, prompt: a lake, count: 2}\n"
    text = spec_text("cz-hires", items, options="{hrScale: 2, hrSteps: 20}",
                     upscale="upscale: {engine: provider, factor: 2}")
    before = chuzhan_stats(chuzhan)
    state = run_spec(tmp_path, text, date(2026, 3, 1))
    after = chuzhan_stats(chuzhan)
    manifest = manifest_of(state)
    assert state.is_completed(), manifest
    charged = after["charged_credits"] - before["charged_credits"]
    # one: 28; two: 28 x 0.9 x 2 = 50.4 -> 50
    assert charged == manifest["totals"]["credits"] == manifest["estimated_credits"] == 78
    assert after["submits"] - before["submits"] == 2 and after["estimates"] - before["estimates"] == 2
    s3 = s3_client(chuzhan)
    body = s3.get_object(Bucket=TEST_BUCKET, Key="cz-hires/2026-03-01/two-2.png")["Body"].read()
    assert Image.open(BytesIO(body)).size == (2048, 2048)


def test_mixed_run_estimate_equals_charge(chuzhan, tmp_path) -> None:
    items = (f"  - {{id: sketch, prompt: render it, input_image: {ASSET}}}\n"
             "  - {id: plain, prompt: a bird, count: 3}\n  - {id: small, prompt: a fish, seed: 5}\n")
    text = spec_text("cz-mixed", items, options="{imgOptions: {genderDetect: true}}", size=768)
    before = chuzhan_stats(chuzhan)
    state = run_spec(tmp_path, text, date(2026, 3, 2))
    after = chuzhan_stats(chuzhan)
    manifest = manifest_of(state)
    assert state.is_completed(), manifest
    # 768x768: 9.0 + 1 = 10 a task; x0.9x3 = 27 for the three-image item.
    assert after["charged_credits"] - before["charged_credits"] == manifest["totals"]["credits"] == 47


def test_cap_is_refused_before_any_request(chuzhan, tmp_path) -> None:
    text = spec_text("cz-cap", "  - {id: a, prompt: a cat}\n", options="{hrScale: 2}", size=1536)
    before = chuzhan_stats(chuzhan)
    state = run_spec(tmp_path, text, date(2026, 3, 3))
    assert state.is_failed() and "drawing area" in str(state.result(raise_on_failure=False))
    assert chuzhan_stats(chuzhan)["requests"] == before["requests"]


def test_content_rejection_is_recorded_not_retried_and_others_complete(chuzhan, tmp_path) -> None:
    items = ("  - {id: fine, prompt: a garden}\n  - {id: banned, prompt: \"a [[nsfw]] thing\"}\n"
             "  - {id: also-fine, prompt: a river}\n")
    before = chuzhan_stats(chuzhan)
    state = run_spec(tmp_path, spec_text("cz-reject", items), date(2026, 3, 4))
    after = chuzhan_stats(chuzhan)
    manifest = manifest_of(state)
    banned = next(i for i in manifest["items"] if i["item"] == "banned")
    assert banned["error"]["error"] == "ContentRejected" and "敏感词" in banned["error"]["message"]
    # Priced once per shape (the first, fine item), then one refused submit: never retried.
    assert after["sensitive_rejections"] - before["sensitive_rejections"] == 1
    assert manifest["totals"]["images"] == 2 and after["submits"] - before["submits"] == 2


def test_content_rejection_while_pricing_is_recorded_and_others_complete(chuzhan, tmp_path) -> None:
    items = "  - {id: banned, prompt: \"a [[nsfw]] thing\"}\n  - {id: fine, prompt: a garden}\n"
    before = chuzhan_stats(chuzhan)
    state = run_spec(tmp_path, spec_text("cz-reject-estimate", items), date(2026, 3, 8))
    after = chuzhan_stats(chuzhan)
    manifest = manifest_of(state)
    banned = next(i for i in manifest["items"] if i["item"] == "banned")
    assert banned["error"]["step"] == "estimate" and banned["error"]["error"] == "ContentRejected"
    assert manifest["totals"]["images"] == 1 and after["submits"] - before["submits"] == 1
    assert after["sensitive_rejections"] - before["sensitive_rejections"] == 1


def test_provider_audit_failure_is_a_content_rejection(chuzhan, tmp_path) -> None:
    state = run_spec(tmp_path, spec_text("cz-audit", "  - {id: a, prompt: \"x [[audit]]\"}\n"), date(2026, 3, 5))
    error = manifest_of(state)["items"][0]["error"]
    assert error["error"] == "AuditFailed" and "audit" in error["message"]  # a ContentRejected


def paid_for(state, prompt_part: str) -> int:  # noqa: ANN001
    """How many times the emulator charged for requests whose prompt has `prompt_part`, over every run."""
    return sum(entry["charges"] for entry in chuzhan_stats(state)["paid"].values() if prompt_part in entry["label"])


def test_a_task_whose_every_image_failed_the_audit_is_paid_once(chuzhan, tmp_path) -> None:
    """Every image of the task failed 触站AI's audit: the item ends `AuditFailed` (a `ContentRejected`). Its
    record said `failed`, whose row sends a new attempt, so each rerun of the date paid for the
    same prompt and seed again (three runs, three charges). Now it is `failed, rejected`: the
    reruns say why and send nothing."""
    prompt = "audited thrice [[audit]]"
    path, day = tmp_path / "cz-audit-rerun.yaml", date(2026, 3, 6)
    text = spec_text("cz-audit-rerun", f'  - {{id: a, prompt: "{prompt}"}}\n')
    errors = [manifest_of(run_spec(tmp_path, text, day, path=path))["items"][0]["error"] for _ in range(3)]
    assert paid_for(chuzhan, prompt) == 1
    assert [e["error"] for e in errors] == ["AuditFailed", "ContentRejected", "ContentRejected"], errors
    assert all("rejected this request's content in an earlier run" in e["message"] for e in errors[1:]), errors
    assert "change its prompt, seed or options" in errors[1]["message"]


def test_a_failed_task_whose_charge_was_never_seen_still_counts_against_the_cap(chuzhan, tmp_path) -> None:
    """A task created and charged whose submit answer was lost (code 500 after charging), named
    by a person (`ledger resolve --job-id`), then failed: its record said `failed` with no charge,
    so the date's spend counted it 0 where it had counted its estimate, and the next attempt fit
    the cap again: charged 8 under a cap of 6. Now it counts as maybe charged; the next run is
    refused `BudgetExceeded` before any call, and the emulator charged once (4 credits)."""
    from flows.cli import main as imagegen
    from flows.paying.ledger import JobLedger, State
    from tests.test_pay_once import configure, inject

    name, day = "cz-failed-unseen", date(2026, 3, 7)
    path = tmp_path / f"{name}.yaml"
    text = spec_text(name, '  - {id: i0, prompt: "[[fail]] a task that fails"}\n').replace(
        "max_parallel: 5}", "max_parallel: 1, max_credits: 6, unknown_hold: 1}")
    configure(chuzhan, "chuzhan", refund_failed=False)  # what the client assumes: what was taken stays taken
    try:
        inject(chuzhan, "chuzhan", kind="error_after", count=1)  # created and charged, answered code 500
        first = manifest_of(run_spec(tmp_path, text, day, path=path))
        assert first["items"][0]["error"]["error"] == "SubmitUnknown", first["items"][0]
        [task] = [t for t, v in chuzhan_stats(chuzhan)["tasks"].items() if "a task that fails" in str(v)]
        assert imagegen(["ledger", "resolve", str(path), "i0", "--run-date", day.isoformat(), "--job-id", task,
                         "--run-ended"]) == 0
        second = manifest_of(run_spec(tmp_path, text, day, path=path))
        assert second["items"][0]["error"]["error"] == "TaskFailed", second["items"][0]
        record = JobLedger(load_spec(path).archive, name, day).get("i0")
        assert record.state is State.FAILED and record.charged_before > 0, record
        third = run_spec(tmp_path, text, day, path=path)
        assert third.is_failed() and "BudgetExceeded" in third.message and "4 of them charged by earlier runs" in \
            third.message, third.message
        assert paid_for(chuzhan, "a task that fails") == 1  # one task, 4 credits
    finally:
        configure(chuzhan, "chuzhan", refund_failed=True)


@pytest.mark.parametrize(("body", "rejected", "state"), [
    # A callback or detail with no images[]: the top-level audit is the single image's.
    ({"state": "success", "imgUrl": "https://x/1.png", "audit": 2}, {1: "a person should confirm"}, "succeeded"),
    ({"state": "success", "imgUrl": "https://x/1.png", "audit": 3}, {1: "shown privately"}, "succeeded"),
    ({"state": "success", "imgUrl": "https://x/1.png", "audit": 0}, {}, "failed"),
    # images[] without audits of their own (as Midjourney answers): the top-level one applies.
    ({"state": "success", "images": [{"imageUrl": "https://x/1.png"}], "audit": 0}, {}, "failed"),
    # An image's own audit wins over the top-level one.
    ({"state": "success", "images": [{"imageUrl": "https://x/1.png", "audit": 1}], "audit": 0}, {}, "succeeded"),
    # Paid images held for a person are kept, even when every other image failed.
    ({"state": "success", "images": [{"imageUrl": "https://x/1.png", "audit": 0},
                                     {"imageUrl": "https://x/2.png", "audit": 2}]},
     {1: "failed the provider's audit", 2: "a person should confirm"}, "succeeded"),
])
def test_the_audit_is_read_per_image_else_from_the_top(body: dict, rejected: dict, state: str) -> None:
    """chuzhan.md (task detail, callbacks): `audit` per image in `images[]`, and at the top for the
    single image; the same fields come in a callback. 1 passed [A]; 2 and 3 are assumed to ask for
    a person, so those paid images are kept and flagged, never failed or dropped."""
    status = ChuzhanProvider.model_construct().read_status("t", {"taskId": "t", **body})
    assert status.state.value == state
    assert set(status.rejected) == set(rejected)
    assert all(rejected[n] in why for n, why in status.rejected.items())


def test_images_the_audit_holds_for_a_person_are_kept_flagged(chuzhan, tmp_path) -> None:
    """The emulator's audits 2 and 3 (one image each): the paid images are downloaded and archived
    under quarantine with the provider's word, not rejected as content and not dropped."""
    items = "  - {id: confirm, prompt: \"x [[audit2]]\"}\n  - {id: private, prompt: \"x [[audit3]]\"}\n"
    manifest = manifest_of(run_spec(tmp_path, spec_text("cz-audit-person", items), date(2026, 3, 11)))
    confirm, private = manifest["items"]
    for item, word in ((confirm, "a person should confirm"), (private, "shown privately")):
        assert not item.get("error"), item
        (obj,) = item["objects"]
        assert obj["s3_uri"].startswith("s3://imagegen-test/cz-audit-person/quarantine/") and word in obj["reasons"][0]


def test_images_that_fail_the_providers_audit_are_archived_as_rejected(chuzhan, tmp_path) -> None:
    """One task, two images, the first failing 触站AI's own audit: that one is quarantined with
    the provider's reason, the other approved; the task is not retried (it was paid once)."""
    before = chuzhan_stats(chuzhan)
    text = spec_text("cz-audit-part", "  - {id: a, prompt: \"x [[audit1]]\", count: 2}\n")
    state = run_spec(tmp_path, text, date(2026, 3, 9))
    after = chuzhan_stats(chuzhan)
    manifest = manifest_of(state)
    assert state.is_completed(), manifest
    first, second = manifest["items"][0]["objects"]
    assert first["verdict"] == "rejected" and "failed the provider's audit" in first["reasons"][0]
    assert first["s3_uri"].startswith("s3://imagegen-test/cz-audit-part/quarantine/")
    assert second["verdict"] == "approved"
    assert after["submits"] - before["submits"] == 1


def test_the_manifest_records_what_the_provider_said_it_charged(chuzhan, tmp_path) -> None:
    """Credits come from the submit's `used` (the provider says what it charged); a task that
    failed after being charged at submit counts as maybe charged: no refund is documented or reported."""
    items = "  - {id: ok, prompt: a garden}\n  - {id: bad, prompt: \"x [[fail]]\"}\n"
    before = chuzhan_stats(chuzhan)
    state = run_spec(tmp_path, spec_text("cz-charged", items), date(2026, 3, 10))
    after = chuzhan_stats(chuzhan)
    manifest = manifest_of(state)
    ok, bad = manifest["items"]
    assert ok["credits_source"] == "charged" and ok["credits"] == 4  # 512x512, 20 steps
    assert bad["error"]["step"] == "generate" and bad["credits"] == 4
    assert bad["charge"].startswith("maybe charged: taken at submit")
    assert after["charges"] - before["charges"] == 2  # what the emulator took at submit
    assert manifest["totals"]["credits"] == 8 == manifest["totals"]["credits_this_run"]
    assert manifest["spend"]["chuzhan"]["reserved"] == 0 and manifest["spend"]["chuzhan"]["charged"] == 8


def test_the_nonce_keeps_the_attempt_within_32_characters() -> None:
    from blocks.chuzhan import nonce

    base = "0123456789abcdef0123456789abcdef"
    assert nonce(base) == base
    assert nonce(base + "-2") == base[:30] + "-2" and len(nonce(base + "-2")) == 32
    assert nonce(base + "-12") == base[:29] + "-12"
    assert len({nonce(f"{base}-{n}") for n in range(2, 40)}) == 38  # every attempt its own nonce


def test_in_flight_cap_is_held_by_prefect(chuzhan, tmp_path) -> None:
    httpx.post(f"{chuzhan.url('chuzhan')}/_sandbox/config", json={"latency": 1.0})
    items = "".join(f"  - {{id: n{i}, prompt: item {i}}}\n" for i in range(5))
    before = chuzhan_stats(chuzhan)
    state = run_spec(tmp_path, spec_text("cz-cap-flight", items), date(2026, 3, 6))
    after = chuzhan_stats(chuzhan)
    assert state.is_completed()
    assert after["peak_in_flight"] <= after["task_limit"] == 2
    assert after["limit_rejections"] == before["limit_rejections"]


def test_empty_balance_is_an_account_stop(chuzhan, tmp_path) -> None:
    httpx.post(f"{chuzhan.url('chuzhan')}/_sandbox/config", json={"balance": 1})
    before = chuzhan_stats(chuzhan)
    state = run_spec(tmp_path, spec_text("cz-broke", "  - {id: a, prompt: a cat}\n"), date(2026, 3, 7))
    error = manifest_of(state)["items"][0]["error"]
    assert error["error"] == "AccountStop" and "积分余额不足" in error["message"]
    assert chuzhan_stats(chuzhan)["charges"] == before["charges"]


def test_balance_is_read_from_the_account(chuzhan) -> None:
    provider = ChuzhanProvider(api_token=chuzhan.secret('chuzhan', 'token'), endpoint=chuzhan.url('chuzhan'))
    assert provider.balance() == chuzhan_stats(chuzhan)["balance"] > 0
    with pytest.raises(AccountStop, match="Auth-Token"):
        ChuzhanProvider(api_token="wrong", endpoint=chuzhan.url('chuzhan')).balance()


def _polls(state) -> tuple[int, int]:
    seen = httpx.get(f"{state.url('chuzhan')}/_sandbox/stats").json()
    return seen["polls"], seen["held_polls"]


@pytest.mark.parametrize(("long_poll", "hold_max"), [(False, 60.0), (True, 60.0), (True, 0.5), (True, 0.0)])
def test_a_long_poll_asks_once_a_job_and_again_when_let_go(chuzhan, long_poll, hold_max, monkeypatch) -> None:
    """`long_poll` (waitUtilEnd): the emulator holds the status request until the task ends, so a
    2 s job costs one status request where polling every 0.3 s costs several; a provider that
    lets go early (after 0.5 s here) is asked again until the task ends, and one that answers at
    once (hold_max 0) is asked at most once a `long_poll_floor_seconds` (1 s), not every 0.2 s."""
    from blocks import first_poll

    monkeypatch.setattr(first_poll, "_timers", {})  # polling: the first job polls every interval (no learned wait)
    httpx.post(f"{chuzhan.url('chuzhan')}/_sandbox/config", json={"latency": 2.0, "hold_max": hold_max})
    try:
        block = chuzhan.block("chuzhan").model_copy(update={"long_poll": long_poll})
        before = _polls(chuzhan)
        result = block.run_job(request(request_id=f"long-poll-{long_poll}-{hold_max}".ljust(40, "x"),
                                       prompt=f"a lighthouse {long_poll} {hold_max}"), poll_interval=0.3, timeout=60)
        polls, held = (now - then for now, then in zip(_polls(chuzhan), before))
    finally:
        httpx.post(f"{chuzhan.url('chuzhan')}/_sandbox/config", json={"hold_max": 60.0})
    assert result.images and result.polls == polls
    print(f"long_poll={long_poll} hold_max={hold_max}: {polls} status request(s) for a 2 s job")
    if not long_poll:
        assert held == 0 and polls >= 3
    elif hold_max >= 2:
        assert polls == held == 1
    elif hold_max > 0:
        assert 2 <= polls == held <= 6
    else:
        assert 2 <= polls == held <= 4  # asked at 0, 1 and 2 s (a 0.2 s pause would make it about 10)


def test_status_requests_have_a_rate_limit_the_client_takes() -> None:
    """chuzhan.md "Limits": no request rate is published, so limits.yaml holds an assumed, modest
    one for status requests, under the very action name the client's status requests take."""
    from flows.paying.limits import LIMITS_FILE, load_limits

    assert load_limits().providers["chuzhan"].rate == {"v1.task.detail": 2}
    assert "ASSUMED" in next(line for line in LIMITS_FILE.read_text().splitlines() if "v1.task.detail" in line)
    block = ChuzhanProvider.model_construct()
    for long_poll in (False, True):
        assert block.model_copy(update={"long_poll": long_poll}).poll_call("t").action == "v1.task.detail"


@pytest.mark.parametrize("headers", [
    {"Auth-Token": "{token}"}, {"Authorization": "Bearer {token}"},
    {"Auth-Token": "{token}", "Authorization": "Bearer {token}"},
])
def test_the_emulator_takes_the_token_either_way(chuzhan, headers: dict) -> None:
    """chuzhan.md "Authentication": clients send `Auth-Token`, the document's page renders
    `Authorization: Bearer`; the emulator takes either, and a wrong one of the two is refused."""
    token = chuzhan.secret("chuzhan", "token")
    url = f"{chuzhan.url('chuzhan')}/v1/customer/detail"
    sent = {k: v.format(token=token) for k, v in headers.items()}
    assert httpx.post(url, json={}, headers=sent).json()["code"] == 0
    for name in sent:
        wrong = {**sent, name: sent[name].replace(token, "not-the-token")}
        assert httpx.post(url, json={}, headers=wrong).json()["code"] == 401


@pytest.mark.parametrize("refund", [True, False])
def test_a_failed_task_is_maybe_charged_whatever_the_provider_did(chuzhan, refund: bool) -> None:
    """chuzhan.md: credits are taken at submit; a refund on failure is not documented and the
    failed task's answer says nothing of it. The emulator refunds or keeps the credits; the
    client says "maybe" either way, with what the submit took."""
    httpx.post(f"{chuzhan.url('chuzhan')}/_sandbox/config", json={"refund_failed": refund})
    try:
        block = chuzhan.block("chuzhan")
        before = chuzhan_stats(chuzhan)
        with pytest.raises(TaskFailed) as caught:
            block.run_job(request(request_id=f"refund-{refund}".ljust(40, "x"), prompt=f"x [[fail]] {refund}"),
                          poll_interval=0.2, timeout=30)
        after = chuzhan_stats(chuzhan)
    finally:
        httpx.post(f"{chuzhan.url('chuzhan')}/_sandbox/config", json={"refund_failed": True})
    assert caught.value.charge == "maybe" and caught.value.used == 4  # 512x512, 20 steps
    assert after["refunds"] - before["refunds"] == (1 if refund else 0)
    assert after["balance"] - before["balance"] == (0 if refund else -4)


def test_a_failed_attempt_keeps_counting_after_a_new_one(chuzhan, tmp_path) -> None:
    """A task that failed took its credits at submit, and the emulator keeps them (no refund is
    documented). Rerun, the item is sent again as a new attempt; the first attempt's charge stays
    in the date's spend, so a third run of a date capped at 10 does not pay a third 4."""
    httpx.post(f"{chuzhan.url('chuzhan')}/_sandbox/config", json={"refund_failed": False})
    text = spec_text("cz-failed-twice", "  - {id: bad, prompt: \"x [[fail]] twice\"}\n").replace(
        "max_parallel: 5}", "max_parallel: 5, max_credits: 10}")
    try:
        before = chuzhan_stats(chuzhan)
        first, second = (manifest_of(run_spec(tmp_path, text, date(2026, 3, 12))) for _ in range(2))
        third = run_spec(tmp_path, text, date(2026, 3, 12)).result(raise_on_failure=False)
        after = chuzhan_stats(chuzhan)
    finally:
        httpx.post(f"{chuzhan.url('chuzhan')}/_sandbox/config", json={"refund_failed": True})
    assert after["charges"] - before["charges"] == 2 and before["balance"] - after["balance"] == 8
    assert [m["items"][0]["credits"] for m in (first, second)] == [4, 8]  # what the item took, its attempts together
    assert type(third).__name__ == "BudgetExceeded" and "8 of them charged by earlier runs" in str(third)
