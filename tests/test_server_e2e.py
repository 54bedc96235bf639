"""On a real `prefect server start` (SQLite in a temp dir) with process workers: the project's
deployments from `prefect deploy --all`, a run triggered through the API as the UI does, a
schedule that fires by itself, and a backfill spread over two workers, all on the sandbox.

The workers start in a directory of their own, as on another machine: every run clones the
repository the deployments' pull step names (here a snapshot of this working tree, with one
spec only the snapshot has) and runs from that clone."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from flows.arenas import NO_THREAD_CACHES
from sandbox import launcher
from tests.conftest import TEST_BUCKET, assert_within_limits, refusals, s3_client, tams_stats
from tests.servers import BIN, cli, client_for, logs_of, snapshot_repository, start, stop, wait_final, wait_healthy

TRIGGERED: dict = {}


CLONE_ONLY_SPEC = "from-the-clone"  # a spec in the snapshot's pipelines/ and nowhere else


@pytest.fixture(scope="module")
def server(sandbox, tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server")
    port = launcher.free_port()
    # The project's default lease (IMAGEGEN_LEASE_SECONDS unset), as a user's runs beside a
    # SQLite server have it (docs/paying-once.md, "Why three minutes").
    inherited = {k: v for k, v in os.environ.items() if k != "IMAGEGEN_LEASE_SECONDS"}
    env = {**inherited, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_UI_URL": f"http://127.0.0.1:{port}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_V2_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_LOGGING_LEVEL": "WARNING",
           "IMAGEGEN_RECLAIM_LEASES": "0"}  # as a user's runs beside a real server: its repossessor frees leases
    proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                  home / "server.log")
    wait_healthy(env["PREFECT_API_URL"], proc, home / "server.log")
    yield env, home
    stop(proc)


@pytest.fixture(scope="module")
def deployed(server, sandbox, tmp_path_factory):
    env, home = server
    spec_text = f"""\
version: 1
name: server-e2e
provider: tams
blocks: {{tams: sandbox}}
generate: {{width: 512, height: 512, steps: 20, sampler: "Euler a"}}
archive: {{bucket: {TEST_BUCKET}, credentials: sandbox}}
run: {{poll_interval: 0.3, job_timeout: 60}}
items:
  - {{id: a, prompt: a cat}}
  - {{id: b, prompt: a dog}}
"""
    origin = snapshot_repository(tmp_path_factory.mktemp("origin"))
    (origin / "pipelines" / f"{CLONE_ONLY_SPEC}.yaml").write_text(spec_text.replace("server-e2e", CLONE_ONLY_SPEC))
    subprocess.run(["git", "add", "-A"], cwd=origin, check=True)
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-qm",
                    "a spec only the clone has"], cwd=origin, check=True)
    cli(env, str(BIN / "imagegen"), "sandbox", "register", "--state-dir", sandbox.state_dir)
    setup = cli(env, str(BIN / "imagegen"), "setup-server", "--repository", str(origin), "--branch", "main")
    assert "work pool imagegen-process created (type process)" in setup.stdout
    assert f"workers clone {origin} at main" in setup.stdout
    deploy = cli(env, str(BIN / "prefect"), "--no-prompt", "deploy", "--all")
    assert "run-pipeline" in deploy.stdout
    specs = tmp_path_factory.mktemp("specs")
    # A deployment's `spec` is confined to pipelines/ and the configured spec roots.
    worker_env = {**env, "IMAGEGEN_SPEC_ROOTS": str(specs)}
    elsewhere = tmp_path_factory.mktemp("worker-machine")  # no flows/, no pipelines/ here
    workers = [start([str(BIN / "prefect"), "worker", "start", "--pool", "imagegen-process"], worker_env,
                      home / f"worker-{n}.log", cwd=elsewhere) for n in (1, 2)]
    spec = specs / "server.yaml"
    spec.write_text(spec_text)
    yield env, str(spec)
    for worker in workers:
        stop(worker)


def test_deployments_from_prefect_yaml(deployed) -> None:
    env, _ = deployed
    with client_for(env) as client:
        names = {d.name for d in client.read_deployments()}
        nightly = client.read_deployment_by_name("run-pipeline/nightly-demo")
        schema = client.read_deployment_by_name("run-pipeline/run-pipeline").parameter_openapi_schema
    assert {"run-pipeline", "nightly-demo", "backfill"} <= names
    # The Run form's overrides are typed fields a person fills in, with `spec` as the escape hatch.
    assert set(schema["definitions"]["RunOverrides"]["properties"]) == {"max_credits", "max_parallel", "items", "spec"}
    # Heartbeats, so the zombie automation `imagegen setup-server` made can tell a dead run.
    assert nightly.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30", nightly.job_variables
    # Its runs start as `imagegen run` starts them: without glibc's per-thread caches.
    assert nightly.job_variables["env"]["GLIBC_TUNABLES"] == NO_THREAD_CACHES, nightly.job_variables
    assert nightly.schedules[0].schedule.cron == "0 3 * * *"
    assert nightly.schedules[0].schedule.timezone == "Europe/Berlin"


def test_a_worker_in_another_directory_runs_the_deployment_from_a_clone(deployed, sandbox) -> None:
    """The spec this run names exists only in the repository the pull step clones: the run can
    complete only if the worker (started in a directory with no flows) cloned it and ran from it."""
    env, _ = deployed
    with client_for(env) as client:
        deployment = client.read_deployment_by_name("run-pipeline/run-pipeline")
        flow_run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"spec": CLONE_ONLY_SPEC, "run_date": "2026-09-02"})
        final = wait_final(client, flow_run.id)
    clone_step, install_step = deployment.pull_steps
    assert clone_step["prefect.deployments.steps.git_clone"]["repository"] == \
        "{{ prefect.variables.imagegen_repository }}"  # resolved on the worker, when the run starts
    assert install_step["prefect.deployments.steps.pip_install_requirements"]["requirements_file"] == "requirements.txt"
    assert final.state.is_completed(), final.state.message
    keys = {o["Key"] for o in s3_client(sandbox).list_objects_v2(
        Bucket=TEST_BUCKET, Prefix=f"{CLONE_ONLY_SPEC}/2026-09-02/")["Contents"]}
    assert f"{CLONE_ONLY_SPEC}/2026-09-02/a-1.png" in keys


def test_the_backfill_deployment_runs_every_date_from_clones(deployed, sandbox) -> None:
    """The `backfill` deployment as the UI's Run button starts it: the backfill runs in one
    worker's clone and each date's run in another's, so the dates must name the spec by its
    place in the checkout (an absolute path names only the backfill's clone and is refused)."""
    env, _ = deployed
    with client_for(env) as client:
        deployment = client.read_deployment_by_name("backfill/backfill")
        flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={
            "spec": CLONE_ONLY_SPEC, "start": "2026-09-20", "end": "2026-09-21"})
        final = wait_final(client, flow_run.id, timeout=400)
        children = [r for r in client.read_flow_runs() if r.name.startswith(f"{CLONE_ONLY_SPEC}-2026-09-2")]
    assert final.state.is_completed(), final.state.message
    assert sorted(r.name for r in children) == [f"{CLONE_ONLY_SPEC}-2026-09-20", f"{CLONE_ONLY_SPEC}-2026-09-21"]
    assert all(r.state.is_completed() and r.deployment_id for r in children)
    for day in ("2026-09-20", "2026-09-21"):
        keys = {o["Key"] for o in s3_client(sandbox).list_objects_v2(
            Bucket=TEST_BUCKET, Prefix=f"{CLONE_ONLY_SPEC}/{day}/")["Contents"]}
        assert f"{CLONE_ONLY_SPEC}/{day}/b-1.png" in keys


def test_run_triggered_through_the_api_lands_in_s3(deployed, sandbox) -> None:
    env, spec = deployed
    with client_for(env) as client:
        deployment = client.read_deployment_by_name("run-pipeline/run-pipeline")
        created = datetime.now(timezone.utc)
        flow_run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"spec": spec, "run_date": "2026-09-01"})
        final = wait_final(client, flow_run.id)
        tasks = client.read_task_runs()
    assert final.state.is_completed(), final.state.message
    TRIGGERED["run"] = final
    starts = [t.start_time for t in tasks if t.flow_run_id == flow_run.id and t.start_time]
    first = f"{(min(starts) - created).total_seconds():.1f} s" if starts else "not recorded yet"  # the server's own time
    print(f"trigger to flow start {(final.start_time - created).total_seconds():.1f} s, "
          f"to first task start {first} (worker query every 2 s)")
    keys = {o["Key"] for o in s3_client(sandbox).list_objects_v2(Bucket=TEST_BUCKET, Prefix="server-e2e/2026-09-01/")
            ["Contents"]}
    assert {"server-e2e/2026-09-01/a-1.png", "server-e2e/2026-09-01/b-1.png"} <= keys


def test_a_spec_parameter_outside_the_spec_roots_is_refused_and_never_echoed(deployed, tmp_path) -> None:
    """Someone types a secrets file's path as the deployment's `spec` in the UI: the run fails
    naming the rule, and none of the file's content reaches Prefect's logs or the run's state."""
    env, _ = deployed
    secret = tmp_path / "aws.env"
    secret.write_text("version: 1\nname: x\nAWS_SECRET_ACCESS_KEY: hostile-secret-value-do-not-print\n")
    with client_for(env) as client:
        deployment = client.read_deployment_by_name("run-pipeline/run-pipeline")
        runs = [client.create_flow_run_from_deployment(deployment.id, parameters={"spec": spec})
                for spec in (str(secret), "../../../etc/passwd")]
        finals = [wait_final(client, run.id) for run in runs]
        logs = logs_of(client, [run.id for run in runs], "IMAGEGEN_SPEC_ROOTS")
    for final in finals:
        assert final.state.is_failed()
        assert "a deployment's spec must be a name in pipelines/" in final.state.message
    assert any("IMAGEGEN_SPEC_ROOTS" in line for line in logs)
    assert not any("hostile-secret" in line or "root:" in line for line in logs + [f.state.message for f in finals])


def _exited(client, flow_run_id, timeout: float = 90) -> None:  # noqa: ANN001
    """Wait until the worker's process of the run has exited: it sends its last log records as it
    exits, after the run's final state is set."""
    pid = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        where = client.read_flow_run(flow_run_id).infrastructure_pid or ""
        pid = int(where.rpartition(":")[2]) if where.rpartition(":")[2].isdigit() else pid
        if pid is not None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.5)
    raise AssertionError(f"the process of flow run {flow_run_id} ({pid}) has not exited")


def test_a_refused_deployment_run_says_why_in_one_line_without_a_traceback(deployed) -> None:
    """Every deployment run that ended Failed on a person's mistake logged Prefect's "Engine
    execution exited with unexpected exception" and the whole traceback after its one line,
    in the run's logs and the worker's terminal; a cap named for no provider was told in
    pydantic's terms, once for each form the field takes."""
    env, spec = deployed
    typo = Path(spec).with_name("typo.yaml")
    typo.write_text(Path(spec).read_text().replace("run: {", "run: {max_paralel: 3, "))
    with client_for(env) as client:
        run_pipeline = client.read_deployment_by_name("run-pipeline/run-pipeline").id
        runs = [client.create_flow_run_from_deployment(run_pipeline, parameters={"spec": str(typo)}),
                client.create_flow_run_from_deployment(run_pipeline, parameters={
                    "spec": spec, "overrides": {"max_credits": {"bogus": 5}}}),
                client.create_flow_run_from_deployment(client.read_deployment_by_name("backfill/backfill").id,
                                                       parameters={"spec": spec, "start": "2026-03-10",
                                                                   "end": "2026-03-01"}),
                client.create_flow_run_from_deployment(run_pipeline, parameters={  # the clone's path, gone when read
                    "spec": CLONE_ONLY_SPEC, "overrides": {"spec": {"run": {"max_parallel": 0}}}})]
        finals = [wait_final(client, run.id) for run in runs]
        for run in runs:
            _exited(client, run.id)
        logs = logs_of(client, [run.id for run in runs], "BackfillRefused")
    assert all(final.state.is_failed() for final in finals), [f.state for f in finals]
    messages = [final.state.message for final in finals]
    assert "typo.yaml:7:" in messages[0] and "run.max_paralel: unknown key (did you mean max_parallel?)" in messages[0]
    assert "overrides.max_credits: Value error, 'bogus' is no provider: it should be" in messages[1], messages
    assert "constrained-float" not in messages[1] and "BackfillRefused: the end 2026-03-01 is before" in messages[2]
    assert messages[3].startswith(f"SpecError: pipelines/{CLONE_ONLY_SPEC}.yaml, in this run's overrides: "
                                  "run.max_parallel: "), messages
    assert any("max_paralel" in line for line in logs), logs
    assert any(line.startswith("ParameterTypeError: ") and "'bogus' is no provider" in line for line in logs), logs
    assert not [line for line in logs if "Traceback" in line or "Engine execution exited" in line], logs


def test_a_schedule_produces_a_run_by_itself(deployed) -> None:
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import IntervalSchedule

    env, spec = deployed
    with client_for(env) as client:
        deployment = client.read_deployment_by_name("run-pipeline/run-pipeline")
        anchor = datetime.now(timezone.utc) + timedelta(seconds=5)
        client.create_deployment_schedules(deployment.id, [DeploymentScheduleCreate(
            schedule=IntervalSchedule(interval=timedelta(hours=1), anchor_date=anchor), active=True,
            parameters={"spec": spec}, slug="soon")])
        deadline = time.monotonic() + 120
        scheduled = []
        while not scheduled:
            scheduled = [r for r in client.read_flow_runs() if r.deployment_id == deployment.id and r.auto_scheduled]
            assert time.monotonic() < deadline, "the scheduler created no run"
            time.sleep(1)
        first = min(scheduled, key=lambda r: r.expected_start_time)
        final = wait_final(client, first.id)
    assert final.state.is_completed(), final.state.message


def test_backfill_through_the_deployment_on_two_workers(deployed, sandbox) -> None:
    env, spec = deployed
    before, refused = tams_stats(sandbox), refusals(sandbox)
    out = cli(env, str(BIN / "imagegen"), "backfill", spec, "--start", "2026-09-10", "--end", "2026-09-13",
              "--max-parallel", "4", timeout=600)
    after = tams_stats(sandbox)
    assert out.stdout.count(" done ") == 4, out.stdout
    assert after["submits"] - before["submits"] == 8
    assert_within_limits(sandbox, refused)  # two workers, one account, limit held
    with client_for(env) as client:
        runs = [r for r in client.read_flow_runs() if "backfill" in r.tags and r.name.startswith("server-e2e-2026-09-1")]
    assert len(runs) == 4 and all(r.deployment_id for r in runs)  # each date its own deployment run


def test_the_run_and_its_summary_render_in_the_prefect_ui(deployed, tmp_path) -> None:
    """What a person sees: the flow run page and its summary table, in headless Chromium."""
    from tests.browser import chromium, page_text

    if chromium() is None:
        pytest.skip("Chromium is not installed (Debian package chromium; make installs it when run as root)")
    run = TRIGGERED.get("run")
    assert run is not None, "the triggered run test did not run first"
    env, _ = deployed
    ui = env["PREFECT_UI_URL"]
    text = page_text(f"{ui}/runs/flow-run/{run.id}", [run.name, "Completed"], launcher.free_port(),
                     screenshot=tmp_path / "flow-run.png")
    assert run.name in text and "Completed" in text, text[:2000]
    with client_for(env) as client:
        artifact = next(a for a in client.read_artifacts() if a.key == "server-e2e-summary" and a.flow_run_id == run.id)
    wanted = ["s3://imagegen-test/server-e2e/2026-09-01/a-1.png", "approved"]
    text = page_text(f"{ui}/artifacts/artifact/{artifact.id}", wanted, launcher.free_port(),
                     screenshot=tmp_path / "summary.png")
    assert all(w in text for w in wanted), text[:2000]


def assert_thumbnails(boxes: list[dict], widest: int) -> None:
    """Each image is shown whole: at most `widest` and its cell wide, its own shape, and cut by
    no clipping ancestor."""
    for box in boxes:
        assert not box["clipped"] and 0 < box["width"] <= min(widest, box["cell"]), box
        assert abs(box["width"] / box["height"] - box["natural"][0] / box["natural"][1]) < 0.02, box


def test_gallery_images_load_in_the_classic_ui(deployed, tmp_path) -> None:
    """The gallery artifact is a grid of thumbnails: in headless Chromium the run's two images
    load from S3 side by side in one row, each shown whole, 192 px wide, in its own cell."""
    from tests.browser import chromium, image_boxes, page_until

    if chromium() is None:
        pytest.skip("Chromium is not installed (Debian package chromium; make installs it when run as root)")
    run = TRIGGERED.get("run")
    assert run is not None, "the triggered run test did not run first"
    env, _ = deployed
    with client_for(env) as client:
        gallery = next(a for a in client.read_artifacts() if a.key == "server-e2e-gallery" and a.flow_run_id == run.id)
    assert gallery.data.count("<tr>") == 1 and gallery.data.count("<td") == 2  # up to 4 a row
    boxes = page_until(f"{env['PREFECT_UI_URL']}/artifacts/artifact/{gallery.id}", image_boxes("document", 2),
                       launcher.free_port(), screenshot=tmp_path / "gallery.png")
    print(f"gallery screenshot {tmp_path / 'gallery.png'}: {boxes}")
    assert boxes and len(boxes) == 2, "the gallery's images did not load"
    assert boxes[0]["top"] == boxes[1]["top"] and boxes[0]["left"] + 192 <= boxes[1]["left"], boxes  # one row
    assert_thumbnails(boxes, 192)
    assert all(box["width"] == 192 for box in boxes), boxes


def test_the_resume_form_shows_each_image_beside_its_own_field(deployed, sandbox, tmp_path) -> None:
    """A run waiting for a person: its Resume form (opened as a person does, with the Resume
    button of the flow run page) shows each image in the field that decides it, between the
    field's title and its select, with its prompt, its checks and (item a) its input image, all
    loaded and whole. The person's choice, sent with the form's Submit, finishes the run."""
    from prefect.client.schemas.objects import StateType

    from tests.browser import (FORM_FIELDS, RESUME_DIALOG, chromium, click_button, image_boxes, page_until,
                               submit_resume_form)

    if chromium() is None:
        pytest.skip("Chromium is not installed (Debian package chromium; make installs it when run as root)")
    env, spec = deployed
    human = Path(spec).with_name("human.yaml")
    shutil.copy(Path(__file__).parent.parent / "pipelines" / "assets" / "sneaker-sketch.png",
                human.with_name("sketch.png"))
    human.write_text(Path(spec).read_text().replace("name: server-e2e", "name: server-human").replace(
        "archive:", "review: {human: {timeout_seconds: 900, poll_interval: 1}}\narchive:").replace(
        "{id: a, prompt: a cat}", "{id: a, prompt: a cat, input_image: sketch.png}"))
    with client_for(env) as client:
        deployment = client.read_deployment_by_name("run-pipeline/run-pipeline")
        flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={"spec": str(human),
                                                                                     "run_date": "2026-09-20"})
        deadline = time.monotonic() + 180
        while client.read_flow_run(flow_run.id).state.type is not StateType.PAUSED:
            assert time.monotonic() < deadline, "the run never paused for a person"
            time.sleep(1)
        page = f"{env['PREFECT_UI_URL']}/runs/flow-run/{flow_run.id}"
        both = (f"(() => {{ const boxes = {image_boxes(RESUME_DIALOG, 3)}; const fields = {FORM_FIELDS};"
                " return boxes && fields ? {boxes, fields} : null; })()")
        seen = page_until(page, both, launcher.free_port(), screenshot=tmp_path / "resume-form.png",
                          act=click_button("Resume"))
        print(f"resume form screenshot {tmp_path / 'resume-form.png'}: {seen}")
        assert seen, "the Resume form shows no loaded images"
        assert [(f["label"], [i["alt"] for i in f["images"]], f["value"]) for f in seen["fields"]] == [
            ("a #1", ["a #1", "input of a #1"], "reject"), ("b #1", ["b #1"], "reject")], seen["fields"]
        for field, prompt in zip(seen["fields"], ("a cat", "a dog"), strict=True):
            assert f"prompt: {prompt}" in field["text"] and "checks: readable" in field["text"], field
            assert all(image["bottom"] <= field["select"] for image in field["images"]), field  # above its select
        assert seen["fields"][0]["select"] < min(i["bottom"] for i in seen["fields"][1]["images"])  # not the next one's
        thumbs = {box["alt"]: box for box in seen["boxes"]}
        assert_thumbnails([thumbs["a #1"], thumbs["b #1"]], 192)
        assert_thumbnails([thumbs["input of a #1"]], 96)
        sent = page_until(page, f"window.__submitted && !{RESUME_DIALOG}", launcher.free_port(),
                          screenshot=tmp_path / "resume-submitted.png", act=submit_resume_form({0: "approve"}))
        assert sent, "the form was not submitted"
        final = wait_final(client, flow_run.id)
    assert final.state.is_completed(), final.state.message
    s3 = s3_client(sandbox)
    listed = {o["Key"] for prefix in ("server-human/2026-09-20/", "server-human/quarantine/2026-09-20/")
              for o in s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix=prefix).get("Contents", [])}
    assert {"server-human/2026-09-20/a-1.png", "server-human/quarantine/2026-09-20/b-1.png"} <= listed, listed
    assert "server-human/2026-09-20/b-1.png" not in listed  # the person approved a, left b at the default


def test_a_long_review_suspends_the_run_and_the_decision_resumes_it_paying_nothing_again(deployed, sandbox) -> None:
    """A review that may wait longer than `suspend_after`: the deployment's run suspends and its
    process ends, so it holds no worker while a person decides; the decision starts it again on
    a worker, which reads the kept images back from the ledger: no job is paid twice (the
    emulator's counts), the decision is archived, and the kept copies are gone."""
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env, spec = deployed
    long_review = Path(spec).with_name("long-review.yaml")
    long_review.write_text(Path(spec).read_text().replace("name: server-e2e", "name: server-long").replace(
        "archive:", "review: {human: {timeout_seconds: 3600, suspend_after: 60, poll_interval: 1}}\narchive:"))
    before = tams_stats(sandbox)
    with client_for(env) as client:
        deployment = client.read_deployment_by_name("run-pipeline/run-pipeline")
        flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={"spec": str(long_review),
                                                                                     "run_date": "2026-09-21"})
        deadline = time.monotonic() + 180
        while (run := client.read_flow_run(flow_run.id)).state.name != "Suspended":
            assert time.monotonic() < deadline and not run.state.is_final(), f"not suspended: {run.state}"
            time.sleep(1)
        pid = int(str(run.infrastructure_pid or "0").rsplit(":", 1)[-1])
        deadline = time.monotonic() + 60
        while pid and _running(pid):  # the run's process has ended: no worker is held
            assert time.monotonic() < deadline, f"process {pid} of the suspended run is still running"
            time.sleep(0.5)
        suspended = tams_stats(sandbox)
        assert suspended["submits"] - before["submits"] == 2
        kept = {o["Key"] for o in s3_client(sandbox).list_objects_v2(
            Bucket=TEST_BUCKET, Prefix="server-long/2026-09-21/_jobs/").get("Contents", [])}
        assert sum(key.endswith(".png") for key in kept) == 2, kept  # each item's images, kept for the re-entry
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            resume_flow_run(flow_run.id, run_input={"image_1": "approve", "image_2": "reject"})
        final = wait_final(client, flow_run.id)
    assert final.state.is_completed(), final.state.message
    after = tams_stats(sandbox)
    assert after["submits"] == suspended["submits"] and after["charges"] - before["charges"] == 2
    s3 = s3_client(sandbox)
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix="server-long/").get("Contents", [])}
    assert "server-long/2026-09-21/a-1.png" in listed and "server-long/2026-09-21/b-1.png" not in listed
    assert not any(key.endswith(".png") for key in listed if "/_jobs/" in key)  # the kept copies are gone
    assert "server-long/quarantine/2026-09-21/b-1.png" in listed  # quarantine lies in the pipeline's own prefix


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except OSError:
        return False
