"""Review and upscale steps on real images: the moderation model, blank and duplicate checks,
human approval through a Prefect pause resumed programmatically, local upscaling, and caps."""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import date
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from flows.running.report import PipelineIncomplete
from flows.imaging.review import REVIEW_EXTRA, MissingDependency, distance, nsfw_score, require
from tests.conftest import TEST_BUCKET, latest_artifacts, run_logs, run_spec, s3_client, tams_stats

ASSET = Path(__file__).parent.parent / "pipelines" / "assets" / "sneaker-sketch.png"


def spec_text(name: str, items: str, review: str = "", upscale: str = "", archive: str = "") -> str:
    return f"""\
version: 1
name: {name}
provider: tams
blocks: {{tams: sandbox}}
generate: {{width: 512, height: 512, steps: 20, sampler: "Euler a"}}
{upscale}
review: {{min_stddev: 3.0{review}}}
archive: {{bucket: {TEST_BUCKET}, credentials: sandbox{archive}}}
run: {{poll_interval: 0.2, job_timeout: 60}}
items:
{items}"""


def manifest_of(state) -> dict:
    outcome = state.result(raise_on_failure=False)
    return outcome.manifest if isinstance(outcome, PipelineIncomplete) else outcome


def sidecar(key: str, s3) -> dict:
    return json.loads(s3.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read())


def keys(s3, prefix: str) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix=prefix).get("Contents", [])}


def test_moderation_model_scores_a_real_image() -> None:
    score = nsfw_score(ASSET.read_bytes())
    assert 0.0 <= score < 0.2  # a line drawing of a sneaker


def test_reviews_that_start_together_load_the_moderation_model_once(monkeypatch) -> None:
    import threading

    from flows.imaging import review

    monkeypatch.setattr(review, "_classifiers", [])  # as in a fresh process
    start, models = threading.Barrier(8), []

    def first_review() -> None:
        start.wait()
        models.append(review._classifier())

    threads = [threading.Thread(target=first_review) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(models) == 8 and len({id(model) for model in models}) == 1  # one load, not one a thread


def test_no_more_moderation_runs_at_once_than_cores(monkeypatch) -> None:
    import threading

    from flows.imaging import review

    model, lock, inside, most = review._classifier(), threading.Lock(), [0], [0]

    class Counted:  # the real model, counting how many of its runs overlap
        def classify(self, image):  # noqa: ANN001, ANN202
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            try:
                return model.classify(image)
            finally:
                with lock:
                    inside[0] -= 1

    monkeypatch.setattr(review, "_classifiers", [Counted()])
    data, scores = ASSET.read_bytes(), []
    threads = [threading.Thread(target=lambda: scores.append(nsfw_score(data))) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(scores) == 12 and len(set(scores)) == 1
    assert 1 <= most[0] <= review.INFERENCES  # without the bound, 12 threads overlap far more than the cores


def test_missing_optional_dependency_names_the_install_command() -> None:
    with pytest.raises(MissingDependency) as caught:
        require("imagegen_no_such_module", REVIEW_EXTRA)
    assert str(caught.value) == ("imagegen_no_such_module is not installed; run: "
                                 "pip install 'imagegen-pipelines[review]'")


def test_moderation_score_lands_in_the_sidecar_and_a_forced_flag_quarantines(sandbox_blocks, tmp_path) -> None:
    items = "  - {id: calm, prompt: a calm lake, seed: 1}\n"
    state = run_spec(tmp_path, spec_text("mod-pass", items, review=", moderation: {threshold: 0.8}"), date(2026, 5, 1))
    assert state.is_completed()
    s3 = s3_client(sandbox_blocks)
    check = sidecar("mod-pass/2026-05-01/calm-1.json", s3)["review"]["checks"]["moderation"]
    assert check["threshold"] == 0.8 and 0 <= check["value"] < 0.8
    # A threshold below any score forces the flagged path: the image goes to quarantine.
    state = run_spec(tmp_path, spec_text("mod-flag", items, review=", moderation: {threshold: 0.000001}"),
                     date(2026, 5, 1))
    assert state.is_completed()
    flagged = sidecar("mod-flag/quarantine/2026-05-01/calm-1.json", s3)
    assert flagged["verdict"] == "rejected" and "moderation: NSFW score" in flagged["review"]["reasons"][0]
    assert "mod-flag/2026-05-01/calm-1.png" not in keys(s3, "mod-flag/")


def test_blank_image_and_duplicate_are_caught(sandbox_blocks, tmp_path) -> None:
    items = ("  - {id: first, prompt: a red kite, seed: 5}\n  - {id: again, prompt: a red kite, seed: 5}\n"
             "  - {id: empty, prompt: \"nothing [[blank]]\", seed: 6}\n  - {id: other, prompt: a blue boat, seed: 7}\n")
    state = run_spec(tmp_path, spec_text("dupes", items, review=", duplicates: {max_distance: 4}"), date(2026, 5, 2))
    assert state.is_completed()
    verdicts = {i["item"]: i["objects"][0] for i in manifest_of(state)["items"]}
    assert verdicts["first"]["verdict"] == "approved" and verdicts["other"]["verdict"] == "approved"
    assert verdicts["again"]["verdict"] == "rejected" and "duplicate of first#1" in verdicts["again"]["reasons"][0]
    assert verdicts["empty"]["verdict"] == "rejected" and "blank or near-uniform" in verdicts["empty"]["reasons"][0]
    s3 = s3_client(sandbox_blocks)
    dup = sidecar("dupes/quarantine/2026-05-02/again-1.json", s3)["review"]["checks"]["duplicate"]
    assert dup == {"value": 0, "threshold": 4, "nearest": "first#1"}
    assert keys(s3, "dupes/2026-05-02/") >= {"dupes/2026-05-02/first-1.png", "dupes/2026-05-02/other-1.png"}
    # Against the archive: the same image on another date is a duplicate of the archived one.
    state = run_spec(tmp_path, spec_text("dupes", "  - {id: first, prompt: a red kite, seed: 5}\n",
                                         review=", duplicates: {max_distance: 4, against_archive: true}"),
                     date(2026, 5, 3))
    obj = manifest_of(state)["items"][0]["objects"][0]
    assert obj["verdict"] == "rejected" and "dupes/2026-05-02:first#1" in obj["reasons"][0]


def test_human_approval_pauses_and_resumes_with_decisions(sandbox_blocks, tmp_path, flow_logs_at_info) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    items = (f"  - {{id: keep, prompt: a lighthouse, seed: 1, input_image: {ASSET}}}\n"
             "  - {id: drop, prompt: a windmill, seed: 2}\n")
    text = spec_text("human", items, review=", human: {timeout_seconds: 120, poll_interval: 0.5}")
    result: list = []
    worker = threading.Thread(target=lambda: result.append(run_spec(tmp_path, text, date(2026, 5, 4))))
    worker.start()
    paused = None
    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while paused is None and time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            paused = runs[0] if runs else None
            time.sleep(0.3)
    assert paused is not None, "the run never paused for a person"
    s3 = s3_client(sandbox_blocks)
    assert keys(s3, "human/_review/2026-05-04/") == {f"human/_review/2026-05-04/{name}" for name in (
        "keep-1.png", "drop-1.png", "keep-1.thumb.png", "drop-1.thumb.png",  # copies and their thumbnails
        "keep-1.input.thumb.png")}  # and the input image `keep` was made from
    thumb = s3.get_object(Bucket=TEST_BUCKET, Key="human/_review/2026-05-04/keep-1.thumb.png")["Body"].read()
    assert max(Image.open(BytesIO(thumb)).size) == 192
    source = s3.get_object(Bucket=TEST_BUCKET, Key="human/_review/2026-05-04/keep-1.input.thumb.png")["Body"].read()
    assert max(Image.open(BytesIO(source)).size) == 96
    # The form the UI draws, as stored for this pause: each field holds its own image and prompt.
    fields = stored_form(paused)["properties"]
    assert [f["title"] for f in fields.values()] == ["keep #1", "drop #1"]
    assert "keep-1.thumb.png" in fields["image_1"]["description"] and "keep-1.input.thumb.png" in \
        fields["image_1"]["description"] and "a lighthouse" in fields["image_1"]["description"]
    assert "drop-1.thumb.png" in fields["image_2"]["description"] and "keep-1" not in fields["image_2"]["description"]
    with get_client(sync_client=True) as client:
        latest = latest_artifacts("human-progress", "human-to-review")
        # While a person decides the run is not done: its progress stays below 100%.
        assert latest["human-progress"].data < 100
    waiting = latest["human-to-review"].data
    assert "**image_1**: keep #1" in waiting and 'alt="keep #1"' in waiting and "X-Amz-Signature" in waiting
    resume_flow_run(paused.id, run_input={"image_1": "approve", "image_2": "reject"})
    worker.join(timeout=120)
    state = result[0]
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:
        latest = latest_artifacts("human-progress", "human-to-review")
    # After the decision the review artifact shows it, and no link to the staged copies, now gone.
    decided = latest["human-to-review"].data
    assert "decided by a person" in decided and "| reject |" in decided and "X-Amz-Signature" not in decided
    assert latest["human-progress"].data == 100
    lines = run_logs(state, "resumed: a person approved")
    assert any("paused for a person: 2 image(s)" in line for line in lines)
    assert any("resumed: a person approved keep#1 and rejected drop#1" in line for line in lines)
    assert "human/2026-05-04/keep-1.png" in keys(s3, "human/")
    assert "human/quarantine/2026-05-04/drop-1.png" in keys(s3, "human/quarantine/")
    assert "human/2026-05-04/drop-1.png" not in keys(s3, "human/")
    assert keys(s3, "human/_review/") == set()  # staged copies removed
    decision = sidecar("human/quarantine/2026-05-04/drop-1.json", s3)["review"]["checks"]["human"]
    assert decision == {"value": "reject", "threshold": None, "by": "person"}


def test_human_timeout_applies_the_default(sandbox_blocks, tmp_path) -> None:
    text = spec_text("human-timeout", "  - {id: lone, prompt: a tower, seed: 3}\n",
                     review=", human: {timeout_seconds: 1, poll_interval: 0.5, default: reject}",
                     archive=", quarantine: drop")
    state = run_spec(tmp_path, text, date(2026, 5, 5))
    assert state.is_completed()
    obj = manifest_of(state)["items"][0]["objects"][0]
    assert obj["verdict"] == "rejected" and obj.get("dropped") and "default reject" in obj["reasons"][0]
    stored = keys(s3_client(sandbox_blocks), "human-timeout/")  # dropped: neither image nor sidecar
    assert stored == {"human-timeout/2026-05-05/manifest.json", "human-timeout/2026-05-05/_jobs/lone.json",
                      "human-timeout/2026-05-05/_jobs/_run.json",  # the ledger and the run claim's note
                      "human-timeout/_owner.json"}  # which spec file owns the name
    assert keys(s3_client(sandbox_blocks), "human-timeout/quarantine/") == set()


def test_the_person_is_told_how_many_items_failed_before_review(sandbox_blocks, tmp_path) -> None:
    """The form and the images waiting for a decision did not say that an item had failed, so
    the person did not know an image was missing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    items = "  - {id: lone, prompt: a tower, seed: 3}\n  - {id: broken, prompt: \"a wall [[fail]]\", seed: 3}\n"
    text = spec_text("human-failed", items, review=", human: {timeout_seconds: 1, poll_interval: 0.5, default: reject}")
    state = run_spec(tmp_path, text, date(2026, 5, 7))
    assert state.is_failed()  # an item failed
    with get_client(sync_client=True) as client:
        key = ArtifactFilterKey(any_=["human-failed-to-review"])
        versions = client.read_artifacts(artifact_filter=ArtifactFilter(key=key))
    waiting = [a.data for a in versions if "to approve or reject" in str(a.data)]
    assert len(waiting) == 1, [a.data for a in versions]
    assert "1 image(s) to approve or reject (1 item(s) failed before review: the run's log says why)" in waiting[0]


def test_gallery_artifact_links_approved_and_rejected(sandbox_blocks, tmp_path) -> None:
    from prefect.client.orchestration import get_client

    items = "  - {id: good, prompt: a harbour, seed: 4}\n  - {id: flat, prompt: \"x [[blank]]\", seed: 4}\n"
    run_spec(tmp_path, spec_text("gallery", items), date(2026, 5, 6))
    with get_client(sync_client=True) as client:
        art = latest_artifacts("gallery-gallery")["gallery-gallery"]
    assert art.type == "markdown" and "<b>good #1</b> approved" in art.data and "<b>flat #1</b> rejected" in art.data
    assert rows_of(art.data) == [2]  # one row: both images side by side
    assert art.data.count('width="192"') == 2 and art.data.count("X-Amz-Signature") >= 2


def rows_of(markdown: str) -> list[int]:
    """The cells of each row of the one HTML table in `markdown`, which must be a single markdown
    block (no blank line inside: markdown would end the HTML there)."""
    table = markdown[markdown.index("<table>"):markdown.index("</table>")]
    assert "\n\n" not in table
    return [row.count("<td") for row in table.split("<tr>")[1:]]


def stored_form(flow_run) -> dict:  # noqa: ANN001 - a paused FlowRun
    """The JSON schema of the run's Resume form, as the Prefect UI reads it (saved just after the
    run turns Paused)."""
    from prefect.input.actions import read_flow_run_input

    deadline = time.monotonic() + 30
    while (schema := read_flow_run_input(flow_run.state.state_details.run_input_keyset["schema"],
                                         flow_run_id=flow_run.id)) is None:
        assert time.monotonic() < deadline, "the form's schema was never saved"
        time.sleep(0.2)
    return schema


def shown(n: int, input_url: str | None = None):  # noqa: ANN201 - a flows.imaging.review.Shown
    from flows.imaging.review import Shown

    return Shown(image_id=f"it{n}#1", label=f"it{n} #1", prompt=f"prompt {n}: a <b>bold</b> &\nmultiline prompt",
                 checks=f"stddev {n}.5 (threshold 3.0)",
                 image_url=f"https://s3.example/it{n}.png?X-Amz-Signature=a&b=1",
                 thumb_url=f"https://s3.example/it{n}.thumb.png?X-Amz-Signature=c", input_url=input_url)


def test_the_gallery_is_a_grid_of_thumbnails_four_wide() -> None:
    """Seven images and a failed item: two rows of four cells; each image shown 192 px wide (so
    not cropped) as a link to itself, with its id, verdict, checks and a full-size link."""
    from flows.running.report import gallery_markdown

    items = [{"item": f"it{n}", "objects": [{"index": 1, "s3_uri": f"s3://bucket/it{n}.png", "verdict": "approved",
                                             "reasons": []}]} for n in range(1, 8)]
    items[2]["objects"][0].update(verdict="rejected", reasons=["blank or near-uniform (stddev 1 < 3)"])
    items.append({"item": "broken", "objects": [], "error": {"error": "JobFailed", "message": "<script>x</script>"}})
    markdown = gallery_markdown("demo 2026-05-01", {"items": items}, lambda uri: uri.replace("s3://", "https://s3/")
                                + "?X-Amz-Signature=x&y=1")
    assert rows_of(markdown) == [4, 4]
    assert markdown.count('<img src="https://s3/bucket/') == 7 and markdown.count('width="192"') == 7
    assert '<a href="https://s3/bucket/it3.png?X-Amz-Signature=x&amp;y=1"><img src=' in markdown
    assert "<b>it3 #1</b> rejected<br>blank or near-uniform (stddev 1 &lt; 3)" in markdown
    assert markdown.count(">full size</a>") == 7 and "&lt;script&gt;" in markdown and "<script>" not in markdown


def test_a_large_gallery_is_pages_of_bounded_size_with_every_image_once() -> None:
    """1,201 images (links as long as real presigned ones) on pages of at most ~200 KB: every image
    on exactly one page, in order; each page says which cells it holds (one document of every
    image was 6.8 MB at 5,000 images, above what the Prefect server publishes as an event)."""
    from flows.running.report import gallery_pages

    items = [{"item": f"it{n}", "objects": [{"index": 1, "s3_uri": f"s3://bucket/it{n}.png", "verdict": "approved",
                                             "reasons": []}]} for n in range(1201)]
    pages = list(gallery_pages("big 2026-05-01", {"items": items}, lambda uri: uri + "?X-Amz-Signature=" + "0" * 400,
                               page_bytes=200_000))
    assert len(pages) > 5 and all(len(page) < 210_000 for page in pages)
    shown = [alt for page in pages for alt in re.findall(r'alt="(it\d+) #1"', page)]
    assert shown == [f"it{n}" for n in range(1201)]
    assert "Cells 1-" in pages[0] and "the other pages are on this run's Artifacts tab" in pages[0]
    assert pages[-1].splitlines()[2].endswith("of 1201.")
    assert all(rows_of(page) for page in pages)  # each one table, one markdown block


def test_each_form_field_holds_its_own_image_prompt_checks_and_input() -> None:
    """The Resume form's schema: one field per image, titled with it, described by one line of
    HTML (thumbnail linked to the full image, prompt, checks, input image); every field required
    (no "(Optional)" in the UI) and set to the default."""
    from flows.imaging.review import approval_form
    from flows.specs.spec import HumanSettings

    form = approval_form([shown(1), shown(2, input_url="https://s3.example/it2.input.thumb.png")],
                         HumanSettings(default="reject"))
    schema = form.model_json_schema()
    fields = schema["properties"]
    assert schema["required"] == ["image_1", "image_2"]
    assert [(f["title"], f["default"]) for f in fields.values()] == [("it1 #1", "reject"), ("it2 #1", "reject")]
    first, second = fields["image_1"]["description"], fields["image_2"]["description"]
    assert first.startswith("<table>") and "\n" not in first and "\n" not in second
    assert '<a href="https://s3.example/it1.png?X-Amz-Signature=a&amp;b=1"><img src="https://s3.example/it1.thumb.png' \
        in first and 'alt="it1 #1"' in first
    assert "prompt 1: a &lt;b&gt;bold&lt;/b&gt; &amp; multiline prompt" in first
    assert "stddev 1.5 (threshold 3.0)" in first
    assert "input" not in first and "it2" not in first
    assert '<img src="https://s3.example/it2.input.thumb.png" alt="input of it2 #1">' in second


def test_checks_in_a_few_words() -> None:
    from flows.imaging.review import checks_text

    assert checks_text({"readable": {"value": True, "threshold": True}, "stddev": {"value": 45.0661, "threshold": 3.0},
                        "phash": {"value": "ff00", "threshold": None},
                        "duplicate": {"value": 9, "threshold": 4, "nearest": "a#1"}}) == \
        "readable, stddev 45.07 (min 3), nearest image a#1 at distance 9 (a duplicate at 4 or less)"
    assert checks_text({"readable": {"value": False, "threshold": True}, "duplicate": {"value": None, "threshold": 4},
                        "moderation": {"value": 0.0213, "threshold": 0.8},
                        "size": {"value": "512x512", "threshold": "1024x1024"}}) == \
        "unreadable, no earlier image to compare with, moderation 0.0213 (max 0.8), size 512x512 (wanted 1024x1024)"


@pytest.mark.parametrize(("engine", "factor"), [("lanczos", 2), ("realesrgan", 2), ("realesrgan", 4)])
def test_local_upscale_of_a_real_image(engine: str, factor: int) -> None:
    from flows.imaging import images

    source = ASSET.read_bytes()
    if engine == "realesrgan":
        try:
            images._realesrgan(factor)
        except MissingDependency as exc:
            pytest.skip(str(exc))
    out = images.realesrgan(source, factor) if engine == "realesrgan" else images.lanczos(source, factor)
    assert Image.open(BytesIO(out)).size == (512 * factor, 512 * factor)


def test_realesrgan_in_a_pipeline(sandbox_blocks, tmp_path) -> None:
    from flows.imaging import images

    try:
        images._realesrgan(2)
    except MissingDependency as exc:
        pytest.skip(str(exc))
    state = run_spec(tmp_path, spec_text("esrgan", "  - {id: one, prompt: a fox, seed: 8}\n",
                                         upscale="upscale: {engine: realesrgan, factor: 2}"), date(2026, 5, 7))
    assert state.is_completed()
    side = sidecar("esrgan/2026-05-07/one-1.json", s3_client(sandbox_blocks))
    assert side["upscaled_by"] == "realesrgan" and side["review"]["checks"]["size"]["value"] == "1024x1024"


def test_provider_upscale_above_the_cap_is_refused_before_submit(sandbox_blocks, tmp_path) -> None:
    text = spec_text("cap", "  - {id: big, prompt: a fox}\n", upscale="upscale: {engine: provider, factor: 4}")
    before = tams_stats(sandbox_blocks)
    state = run_spec(tmp_path, text, date(2026, 5, 8))
    assert state.is_failed() and "above the provider cap" in str(state.result(raise_on_failure=False))
    assert tams_stats(sandbox_blocks)["requests"] == before["requests"]


def test_phash_distance() -> None:
    assert distance("ffff000000000000", "ffff000000000001") == 1
