"""The flow end to end: a spec runs on a real Prefect API against the sandbox processes and
lands in SeaweedFS; checked through S3 and the emulator's own counters."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import date
from pathlib import Path

import pytest

from flows.running.report import PipelineIncomplete
from flows.specs.spec import SpecError
from tests.conftest import TEST_BUCKET, latest_artifacts, s3_client, tams_stats

ASSET = Path(__file__).parent.parent / "pipelines" / "assets" / "sneaker-sketch.png"


def spec_text(name: str, items: str, upscale: str = "provider") -> str:
    return f"""\
version: 1
name: {name}
provider: tams
blocks: {{tams: sandbox}}
generate: {{width: 512, height: 512, steps: 20, sampler: "Euler a"}}
upscale: {{engine: {upscale}, factor: 2}}
archive: {{bucket: {TEST_BUCKET}, credentials: sandbox}}
run: {{poll_interval: 0.2, job_timeout: 60, max_parallel: 3}}
items:
{items}"""


ITEMS = f"""\
  - {{id: shoe, prompt: a red shoe, seed: 11}}
  - {{id: sketch, prompt: render this sketch, input_image: {ASSET}, seed: 12}}
  - {{id: bag, prompt: a blue bag}}
  - {{id: lamp, prompt: a brass lamp, count: 2}}
"""


def read_json(s3, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read())


@pytest.fixture()
def run(sandbox_blocks, tmp_path: Path):
    from flows.pipeline import run_pipeline

    def go(text: str, run_date: date):
        path = tmp_path / "spec.yaml"
        path.write_text(text)
        before = tams_stats(sandbox_blocks)
        state = run_pipeline(spec=str(path), run_date=run_date, return_state=True)
        return state, before, tams_stats(sandbox_blocks)
    return go


def test_pipeline_archives_images_sidecars_and_manifest(run, sandbox_blocks) -> None:
    state, before, after = run(spec_text("e2e", ITEMS), date(2026, 1, 15))
    assert state.is_completed(), state.message
    manifest = state.result()
    s3 = s3_client(sandbox_blocks)
    stored = read_json(s3, "e2e/2026-01-15/manifest.json")
    assert stored["status"] == "complete" and stored["totals"]["images"] == 5
    assert stored["totals"]["credits"] == manifest["totals"]["credits"]
    # Credits in the manifest are what the emulator charged, no more, no less.
    charged = after["charged_credits"] - before["charged_credits"]
    assert stored["totals"]["credits"] == pytest.approx(charged) and charged > 0
    assert stored["totals"]["credits_by_provider"] == {"tams": pytest.approx(charged)}
    assert after["submits"] - before["submits"] == 4 and after["uploads"] - before["uploads"] == 1
    for item in stored["items"]:
        for obj in item["objects"]:
            key = obj["s3_uri"].removeprefix(f"s3://{TEST_BUCKET}/")
            data = s3.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read()
            sidecar = read_json(s3, key.removesuffix(".png") + ".json")
            assert hashlib.sha256(data).hexdigest() == obj["sha256"] == sidecar["sha256"]
            assert sidecar["provider_job_id"] == item["job_id"] and sidecar["verdict"] == "approved"
            assert sidecar["provider"] == "tams" and sidecar["run_date"] == "2026-01-15"
            assert sidecar["review"]["checks"]["size"]["value"] == "1024x1024"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix="e2e/")["Contents"]}
    assert "e2e/2026-01-15/lamp-2.png" in keys and "e2e/2026-01-15/sketch-1.json" in keys


def test_rerun_of_the_same_date_pays_nothing(run) -> None:
    first, _, _ = run(spec_text("rerun", ITEMS), date(2026, 1, 16))
    assert first.is_completed()
    second, before, after = run(spec_text("rerun", ITEMS), date(2026, 1, 16))
    assert second.is_completed()
    # Every item was archived by the first run: the ledger reuses it without any provider call.
    assert after["requests"] == before["requests"]
    manifest = second.result()
    assert manifest["totals"]["reused_items"] == 4 and manifest["totals"]["credits_this_run"] == 0
    assert [i["job_id"] for i in first.result()["items"]] == [i["job_id"] for i in manifest["items"]]


def test_failed_item_is_recorded_and_the_rest_archive(run, sandbox_blocks) -> None:
    items = "  - {id: good, prompt: a cat}\n  - {id: doomed, prompt: \"a dog [[fail]]\"}\n"
    state, before, after = run(spec_text("partial", items, upscale="lanczos"), date(2026, 1, 17))
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PipelineIncomplete)
    stored = read_json(s3_client(sandbox_blocks), "partial/2026-01-17/manifest.json")
    assert stored["status"] == "partial" and stored["totals"]["failed_items"] == 1
    doomed = next(i for i in stored["items"] if i["item"] == "doomed")
    assert doomed["error"]["step"] == "generate" and doomed["error"]["error"] == "JobFailed"
    assert "[[fail]] marker" in doomed["error"]["message"]
    good = next(i for i in stored["items"] if i["item"] == "good")
    assert good["objects"][0]["verdict"] == "approved"
    # A failed job is neither retried (it would fail again) nor charged.
    assert after["submits"] - before["submits"] == 2 and after["charges"] - before["charges"] == 1
    # Nor held as maybe charged by the run's budget: what this run spent is the one charge.
    assert stored["spend"]["tams"]["reserved"] == 0, stored["spend"]
    assert stored["totals"]["credits_this_run"] == stored["totals"]["credits"] == good["credits"] > 0, stored["totals"]
    # Every task run is named by its step and item, also the doomed item's steps that never ran.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    wanted = ["archive-doomed", "archive-good", "generate-doomed", "generate-good", "review-doomed", "review-good",
              "upscale-doomed", "upscale-good"]
    deadline = time.monotonic() + 60  # the server records a task run's name from its events, in its own time
    with get_client(sync_client=True) as client:
        while (names := sorted(t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))))) != wanted and time.monotonic() < deadline:
            time.sleep(0.5)
        assert names == wanted, names
        # The doomed item's steps that never ran end as NotRun (Cancelled): Prefect left them
        # Pending for good, and the run's page drew them as still waiting, its graph running on.
        time.sleep(2)  # any event the server had still to record is recorded: it must not undo them
        states = {t.name: (t.state_type.value, t.state_name) for t in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))}
    assert {n: s for n, s in states.items() if n.endswith("-doomed") and n != "generate-doomed"} == {
        n: ("CANCELLED", "NotRun") for n in ("archive-doomed", "review-doomed", "upscale-doomed")}, states
    assert not [n for n, (kind, _) in states.items() if kind in ("PENDING", "RUNNING")], states


def test_spec_the_provider_would_refuse_makes_no_call(run) -> None:
    text = spec_text("refused", "  - {id: a, prompt: a cat}\n").replace("width: 512", "width: 500")
    state, before, after = run(text, date(2026, 1, 18))
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, SpecError) and "not a multiple of 64" in str(error)
    assert after["requests"] == before["requests"]  # the emulator saw nothing at all


def test_summary_table_artifact(run) -> None:
    state, _, _ = run(spec_text("artifacted", "  - {id: a, prompt: a cat}\n"), date(2026, 1, 19))
    table = list(latest_artifacts("artifacted-summary").values())
    assert table and table[0].type == "table"
    rows = json.loads(table[0].data) if isinstance(table[0].data, str) else table[0].data
    assert rows[0]["item"] == "a" and rows[0]["verdict"] == "approved"


def test_items_override_generate_settings_and_archive_at_their_own_size(run, sandbox_blocks) -> None:
    """A catalogue of mixed sizes and models in one spec: each item is requested with its own
    settings (and its own request id), and archived at its own size."""
    items = ("  - {id: square, prompt: a cat}\n"
             "  - {id: wide, prompt: a wide cat, generate: {width: 768, height: 512, steps: 12, "
             "model: \"600423083519508503\"}}\n")
    state, before, after = run(spec_text("mixed-sizes", items, upscale="lanczos"), date(2026, 1, 20))
    assert state.is_completed(), state.message
    s3 = s3_client(sandbox_blocks)
    sizes = {}
    for item in read_json(s3, "mixed-sizes/2026-01-20/manifest.json")["items"]:
        key = item["objects"][0]["s3_uri"].removeprefix(f"s3://{TEST_BUCKET}/")
        sizes[item["item"]] = read_json(s3, key.removesuffix(".png") + ".json")["review"]["checks"]["size"]["value"]
    assert sizes == {"square": "1024x1024", "wide": "1536x1024"}
    assert after["submits"] - before["submits"] == 2


def test_a_run_of_chosen_items_pays_only_for_them(run, sandbox_blocks, tmp_path) -> None:
    """The Run form's `overrides.items`: only those items are submitted; the others show as not
    selected in a partial manifest (so a backfill still sees the date as unfinished) while the
    run itself completes; a later full run pays for the rest only."""
    from flows.pipeline import UnknownItems, run_pipeline

    path = tmp_path / "spec.yaml"
    path.write_text(spec_text("subset", ITEMS.replace(f"input_image: {ASSET}, ", ""), upscale="lanczos"))
    before = tams_stats(sandbox_blocks)
    state = run_pipeline(spec=str(path), run_date=date(2026, 1, 21), return_state=True,
                         overrides={"items": ["shoe", "lamp"], "max_parallel": 2})
    assert state.is_completed(), state.message
    manifest = state.result()
    assert manifest["status"] == "partial"
    errors = {i["item"]: i["error"]["error"] for i in manifest["items"] if i.get("error")}
    assert errors == {"sketch": "NotSelected", "bag": "NotSelected"}
    assert tams_stats(sandbox_blocks)["submits"] - before["submits"] == 2
    state = run_pipeline(spec=str(path), run_date=date(2026, 1, 21), return_state=True)
    assert state.is_completed() and state.result()["totals"]["reused_items"] == 2
    assert tams_stats(sandbox_blocks)["submits"] - before["submits"] == 4
    refused = run_pipeline(spec=str(path), run_date=date(2026, 1, 21), return_state=True,
                           overrides={"items": ["shoe", "sheo"]})
    assert isinstance(refused.result(raise_on_failure=False), UnknownItems)
    assert "no item 'sheo' in this spec" in refused.message


def test_a_run_lets_go_of_the_items_that_ended(run, sandbox_blocks, monkeypatch) -> None:
    """A long run's memory does not grow with its length: as each item ends, the run keeps its
    outcome and lets go of its task runs (their futures, Prefect's per-flow-run copy of each
    final state, its task runner's cancel events, its tasks' assets). Seen at each submit, after
    the first items ended: the earlier items' futures are gone but for those in flight or just
    ended."""
    import gc
    import weakref

    from prefect.context import FlowRunContext

    import flows.pipeline as pipeline

    real, futures, seen = pipeline._submit_item, [], []

    def submit_and_watch(plan, archive_now):  # noqa: ANN001, ANN202
        gc.collect()
        context = FlowRunContext.get()
        seen.append({"before": len(futures), "alive": sum(ref() is not None for ref in futures),
                     "run_results": len(context.run_results), "cancel_events": len(context.task_runner._cancel_events),
                     "assets": len(context.task_run_assets)})
        chain = real(plan, archive_now)
        futures.extend(weakref.ref(future) for _, future in chain)
        return chain

    monkeypatch.setattr(pipeline, "_submit_item", submit_and_watch)
    items = "".join(f"  - {{id: item{n}, prompt: a lamp number {n}}}\n" for n in range(10))
    state, before, after = run(spec_text("letgo", items, upscale="lanczos").replace("max_parallel: 3", "max_parallel: 2"),
                               date(2026, 1, 22))
    assert state.is_completed(), state.message
    assert state.result()["totals"]["failed_items"] == 0
    print(seen)
    last = seen[-1]
    assert last["before"] == 9 * 4  # generate, upscale, review, archive for each earlier item
    assert last["alive"] <= 4 * 4, seen  # two in flight, at most two ended since the last look
    assert last["cancel_events"] <= 4 * 4, seen
    assert last["assets"] <= 4 * 4, seen
    assert last["run_results"] <= seen[3]["run_results"] + 2 * 4 * 8, seen
