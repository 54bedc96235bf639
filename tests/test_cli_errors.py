"""What a person sees when something the run needs is not there: a missing Block is one line
naming it and the command that saves it, and `imagegen estimate` without a provider to ask
says so and prices by the published formula where one exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli import main

SPEC = """\
version: 1
name: cli-errors
provider: tams
blocks: {tams: no-such-account, tencent: no-such-account}
generate: {width: 512, height: 512, steps: 20, provider_options: {tencent: {LogoAdd: 0}}}
archive: {bucket: imagegen-test, credentials: no-such-credentials}
items:
  - {id: shoe, prompt: a red shoe}
  - {id: bag, prompt: a blue bag, provider: tencent}
"""


@pytest.fixture()
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    return path


def test_run_with_a_missing_block_is_one_line_naming_it(prefect_api, spec: Path, capsys) -> None:
    assert main(["run", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "run not started: no chuzhan" not in err
    assert "Block named 'no-such-account'" in err and "imagegen sandbox register" in err
    assert "prefect block create tams-provider" in err or "prefect block create tencent-provider" in err


@pytest.mark.parametrize("local", [[], ["--local"]])
def test_a_backfill_with_a_missing_block_is_one_line_naming_it(prefect_api, spec: Path, capsys, local) -> None:
    """`imagegen backfill --local` with a Block missing was an 11-frame traceback; `run` was one line."""
    assert main(["backfill", str(spec), "--start", "2026-05-01", "--end", "2026-05-02", *local]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("backfill not started: no ") and "Block named 'no-such-account'" in err, err


def test_estimate_without_the_providers_says_so_and_uses_published_formulas(prefect_api, spec: Path,
                                                                            capsys) -> None:
    assert main(["estimate", str(spec)]) == 1  # an item stays unpriced
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert "tams: could not ask the provider (no tams-provider Block named 'no-such-account'" in err
    assert "it publishes no formula, so its items are not priced" in err
    assert "tencent: could not ask the provider" in err and "priced by its published formula instead" in err
    assert "tencent: 1 item(s), 1.00 billable calls (from the provider's formula estimate)" in out, out


def test_a_pipeline_name_another_spec_owns_is_one_line_before_the_run(sandbox_blocks, tmp_path: Path,
                                                                        capsys) -> None:
    from datetime import date

    from tests.conftest import TEST_BUCKET, run_spec

    text = SPEC.replace("no-such-account", "sandbox").replace("no-such-credentials", "sandbox") \
        .replace("imagegen-test", TEST_BUCKET).replace("name: cli-errors", "name: cli-name-taken")
    text = text.replace("  - {id: bag, prompt: a blue bag, provider: tencent}\n", "")
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    assert run_spec(tmp_path, text, date(2026, 5, 1), path=first).is_completed()
    second.write_text(text)
    assert main(["run", str(second)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "run not started: pipeline name 'cli-name-taken'" in err, err
    assert "--take-over-name" in err and str(first) in err


@pytest.mark.parametrize("command", ["run", "backfill"])
def test_a_lease_setting_that_is_no_number_is_one_line_before_anything_starts(spec: Path, capsys, monkeypatch,
                                                                               command: str) -> None:
    """`IMAGEGEN_LEASE_SECONDS=3m`: one line naming the setting and the fix, and no Prefect
    server started, no Block read, no flow run."""
    monkeypatch.setenv("IMAGEGEN_LEASE_SECONDS", "3m")
    dates = ["--start", "2026-11-01", "--end", "2026-11-02"] if command == "backfill" else []
    assert main([command, str(spec), *dates]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (f"{command} not started: IMAGEGEN_LEASE_SECONDS='3m' is not a number of seconds: "
                           "set 60 to 86400, or unset it for the default of 180"), err


def test_a_backfill_ending_before_it_starts_is_one_line_before_anything_starts(spec: Path, capsys) -> None:
    """`--end` before `--start`: one line saying so and what to give, and no Prefect server
    started (the refusal comes before the temporary server's note)."""
    assert main(["backfill", str(spec), "--start", "2026-01-05", "--end", "2026-01-01"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("backfill not started: the end 2026-01-01 is before the start 2026-01-05: "
                           "give an end on or after the start"), err


@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_misspelt_spec_name_is_one_line_suggesting_the_shipped_one(command: str, capsys, monkeypatch) -> None:
    """`imagegen run demoo`: the shipped spec closest to the name, and no Prefect server started
    for a spec that is not there."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main([command, "demoo"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("demoo:1:1: cannot read spec: No such file or directory (did you mean 'demo', "
                           "pipelines/demo.yaml?)"), err


def test_a_spec_name_nothing_is_close_to_names_the_folder_and_its_specs(capsys, monkeypatch) -> None:
    """`imagegen run nope` said only "cannot read spec": not where a bare name is looked for."""
    from flows.specs.spec import PIPELINES_DIR

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["run", "nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"nope:1:1: cannot read spec: No such file or directory; a name is looked for in "
                          f"{PIPELINES_DIR}/, which has: "), err
    assert "demo" in err.rsplit(":", 1)[1] and "\n" not in err


def test_a_ctrl_c_inside_pydantic_is_told_as_an_interruption() -> None:
    """Ctrl-C during `imagegen sandbox up` struck while pydantic serialised a Block: its Rust
    core turned the KeyboardInterrupt into a `PydanticSerializationError` naming it, which the
    command told as an error (exit 1) instead of an interruption (130)."""
    from pydantic import BaseModel, model_serializer

    from flows.cli import _ctrl_c_inside

    class Saved(BaseModel):
        name: str = "sandbox"

        @model_serializer(mode="wrap")
        def _serialise(self, handler):  # noqa: ANN001, ANN202 - where the person's Ctrl-C lands
            raise KeyboardInterrupt

    with pytest.raises(Exception) as caught:
        Saved().model_dump()
    assert _ctrl_c_inside(caught.value)
    assert not _ctrl_c_inside(ValueError("a value error"))
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as wrapped:
        assert _ctrl_c_inside(wrapped)


def test_a_failed_task_run_is_one_line_for_a_told_error_and_keeps_its_traceback_for_a_bug(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect logs a failed task run with its traceback: an S3 server gone mid-run printed ~250
    lines for four items. Errors raised on purpose say it all in their message; a step that never
    started because its item's earlier step failed is not told at all."""
    import logging

    from botocore.exceptions import EndpointConnectionError

    from flows.paying.ledger import LedgerUnavailable
    from flows.running import oneline

    monkeypatch.delenv(oneline.DEBUG, raising=False)
    logger, seen = logging.getLogger(oneline.TASK_RUNS), []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(self.format(record))

    handlers, logger.handlers = logger.handlers, [Keep()]  # not Prefect's: no run to send the records to
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not the attribute: the logger caches isEnabledFor
    oneline.install()
    oneline.install()  # once
    try:
        assert sum(isinstance(f, oneline.OneLine) for f in logger.filters) == 1
        for exc in (LedgerUnavailable("ledger read: EndpointConnectionError after 6 attempts"),
                    EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k"), ValueError("a bug")):
            try:
                raise exc
            except Exception:  # noqa: BLE001
                logger.error("Task run failed with exception: %r - Retries are exhausted", exc, exc_info=True)
        logger.error("Finished in state NotReady(\"Upstream task run '01a2' did not reach a 'COMPLETED' state.\")")
        logger.error("Finished in state Failed('Task run encountered an exception ValueError: a bug')")
        logger.info("Finished in state Completed()")  # every task run's: its state shows in the UI
        logger.info("red-sneaker: tams accepted request 8339 as job 7017")
    finally:
        logger.handlers = handlers
        logger.setLevel(level)
        logger.filters = [f for f in logger.filters if not isinstance(f, oneline.OneLine)]
    assert ["Traceback" in line for line in seen] == [False, False, True, False, False], seen  # no NotReady line
    assert seen[-1] == "red-sneaker: tams accepted request 8339 as job 7017", seen  # and no Completed one
    assert "LedgerUnavailable('ledger read" in seen[0] and "Could not connect" in seen[1]


def test_the_engine_raising_a_run_s_told_outcome_again_adds_no_traceback() -> None:
    """A deployment's engine raises a Failed run's exception again and logs it with its
    traceback: dropped where the flow said it in one line, one line where the engine refused
    the flow's parameters, kept for a bug."""
    import logging

    from prefect.exceptions import ParameterTypeError

    from flows.running import oneline
    from flows.specs.spec import SpecError

    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord(oneline.FLOW_RUNS, logging.ERROR, __file__, 1, oneline.ENGINE_EXIT, (),
                                 (type(exc), exc, None))

    keep = oneline.OneLine()
    assert not keep.filter(record(oneline.told(SpecError("demo.yaml:3:1: run.max_paralel: unknown key"))))
    refused = record(ParameterTypeError("Flow run received invalid parameters:\n - overrides.max_credits: x"))
    assert keep.filter(refused) and refused.exc_info is None
    assert refused.getMessage().startswith("ParameterTypeError: Flow run received invalid parameters:")
    bug = record(ValueError("a bug"))
    assert keep.filter(bug) and bug.exc_info is not None and bug.getMessage() == oneline.ENGINE_EXIT


def test_the_ledger_away_is_one_line_naming_the_fix_and_read_once_for_the_manifest(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """S3 killed mid-run: the run's end read each failed item's ledger record, waiting out the
    ledger's backoff once an item (two minutes for four), then failed with a traceback and
    `run failed: LedgerUnavailable: ...`, naming no fix."""
    from datetime import date

    from flows import pipeline
    from flows.cli_errors import explain
    from flows.paying.ledger import LedgerUnavailable
    from flows.specs.spec import load_spec

    assert explain(LedgerUnavailable("ledger read: EndpointConnectionError after 6 attempts")).startswith(
        "the ledger in S3 could not be read or written (ledger read: EndpointConnectionError after 6 attempts); "
        "is the S3 server up? Start it (the sandbox's: `imagegen sandbox up`) and run the same command again")
    plans = pipeline.plan_items(load_spec(Path(__file__).parent.parent / "pipelines" / "demo.yaml"), "",
                                date(2026, 1, 2), str(tmp_path))
    reads = []

    class Away:
        def get(self, *args: object) -> None:
            reads.append(args)
            raise LedgerUnavailable("ledger read: EndpointConnectionError after 6 attempts")

    monkeypatch.setattr(pipeline, "ledger_of", lambda plan: Away())
    failed = [(None, {"step": "archive", "error": "EndpointConnectionError", "message": "S3"}) for _ in plans]
    charge_of = pipeline._Charges()
    charges = [charge_of(plan, error) for plan, (_, error) in zip(plans, failed, strict=True)]
    assert len(reads) == 1 and len(charges) == len(plans)
    assert all(cost is None and note.startswith("not known: its ledger record") for cost, note in charges)


def test_an_api_url_that_answers_as_something_else_is_told_with_the_fix() -> None:
    """`PREFECT_API_URL=http://127.0.0.1:4200` (a server's UI, no `/api`) made every command say
    that a Block or a limit was missing, though both were saved."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from flows.cli_errors import not_a_prefect_api

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            healthy = self.path == "/api/health"
            body = json.dumps(True).encode() if healthy else b"<html>not found</html>"
            self.send_response(200 if healthy else 404)
            self.send_header("Content-Type", "application/json" if healthy else "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert not_a_prefect_api(f"{base}/api") is None and not_a_prefect_api(f"{base}/api/") is None
        told = not_a_prefect_api(base)
        assert told is not None and f"did you mean {base}/api?" in told and "HTTP 404, text/html" in told, told
        assert "imagegen server up" in (not_a_prefect_api(f"{base}/other/api") or "")
    finally:
        server.shutdown()
        server.server_close()
    assert not_a_prefect_api(base) is None  # nothing answers: told where a command reaches it


@pytest.mark.parametrize("argv, told", [
    (["run", "pipelines/demo.yaml", "--run-date", "2026-13-45"],
     "imagegen run: error: argument --run-date: '2026-13-45' is not a date (month must be in 1..12); give it as YYYY-MM-DD, such as 2026-03-01"),
    (["backfill", "pipelines/demo.yaml", "--start", "yesterday", "--end", "2026-01-02"],
     "imagegen backfill: error: argument --start: 'yesterday' is not a date; give it as YYYY-MM-DD, such as 2026-03-01"),
    (["run", "pipelines/demo.yaml", "--dry-run"], "imagegen run: error: unrecognized arguments: --dry-run"),
])
def test_a_bad_argument_is_told_with_its_command_s_usage(argv: list[str], told: str, capsys) -> None:  # noqa: ANN001
    """`--run-date 2026-13-45` said `invalid fromisoformat value`; an unknown option of a command
    was told under the list of all commands."""
    from flows.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.strip().splitlines()[-1] == told, err
    assert err.startswith(f"usage: imagegen {argv[0]} "), err


def test_resolving_an_item_the_spec_does_not_have_names_it_before_asking_s3(capsys) -> None:  # noqa: ANN001
    """`ledger resolve SPEC ../../x` waited out six S3 tries, then asked whether S3 was up."""
    from flows.cli import main

    common = ["--run-date", "2026-01-01", "--not-sent"]
    assert main(["ledger", "resolve", "pipelines/demo.yaml", "red-sneakr", *common]) == 1
    assert capsys.readouterr().err.strip() == "demo-products has no item 'red-sneakr': did you mean 'red-sneaker'?"
    assert main(["ledger", "resolve", "pipelines/demo.yaml", "../../x", *common]) == 1
    assert capsys.readouterr().err.strip().startswith("demo-products has no item '../../x'; its items: red-sneaker, ")


@pytest.mark.unit
def test_an_item_whose_archive_write_found_s3_away_says_what_to_do() -> None:
    """An item failed at its archive step with botocore's words only (`Could not connect to the
    endpoint URL: ...`); its manifest entry and the run's summary now say what to do."""
    from botocore.exceptions import EndpointConnectionError

    from flows.cli_errors import storage_fix
    from flows.paying.ledger import LedgerUnavailable

    assert storage_fix(EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k")).startswith(
        "S3 is not reachable with the archive's credentials Block (Could not connect to the endpoint URL")
    assert "run the same command again: nothing is paid twice" in storage_fix(EndpointConnectionError(endpoint_url="x"))
    assert storage_fix(LedgerUnavailable("ledger write: timeout")).startswith("the ledger in S3 could not be read")
    assert storage_fix(ValueError("a bug")) is None


def test_version_is_told(capsys) -> None:
    """`imagegen --version` says the installed version (it was refused: a command was required)."""
    from flows.cli import parser

    with pytest.raises(SystemExit) as stop:
        parser().parse_args(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("imagegen-pipelines 0.")


def test_limits_show_reads_the_temporary_server_s_leases(monkeypatch) -> None:
    """Without PREFECT_API_URL the command's temporary server keeps its leases in this Prefect
    home, as every temporary server of it does: `limits show` reads them there (it said they
    were not readable here, naming that very folder)."""
    from prefect.settings import get_current_settings

    from flows.cli import local_lease_storage

    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert local_lease_storage() == get_current_settings().home / "concurrency_leases"
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # a profile's server elsewhere
        assert local_lease_storage() is None


def test_server_up_on_a_port_in_use_says_so_instead_of_reporting_the_other_server(tmp_path) -> None:
    """`imagegen server up --port 4200` beside another server on 4200: its own server exited at
    once ("Port 4200 is already in use"), the other answered the health check, and `server up`
    printed success with that server's URL."""
    import socket

    from deployments import server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(server.ServerError, match=f"port {port} on 127.0.0.1 is in use.*--port"):
            server.up(tmp_path / "srv", port=port, database="sqlite")
    assert not (tmp_path / "srv" / "server.log").exists()  # nothing was started


@pytest.mark.parametrize("account, told", [
    ("tamz=prod", "no provider 'tamz' (one of chuzhan, tams, tencent); give PROVIDER=BLOCK, such as tams=prod"),
    ("tams", "give PROVIDER=BLOCK, the name of a saved Block"),
    ("tams=a:b", "give PROVIDER=BLOCK, the name of a saved Block"),
])
def test_limits_apply_for_an_account_it_cannot_name_says_so(account: str, told: str, capsys) -> None:
    """`--account tamz=prod` applied nothing and said nothing; `--account tams` applied
    `imagegen:tams::rate:api`, and `tams=a:b` a limit of an account `a:b`."""
    from flows.cli import main

    assert main(["limits", "apply", "--account", account]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"imagegen limits apply: --account {account}: {told}") and err.count("\n") == 1, err


def test_a_branch_the_repository_lacks_is_refused_before_workers_clone_it(tmp_path) -> None:
    """`setup-server --branch nosuch` was accepted: every run then ended Crashed with a
    `workspace.json` error, the cause only in the worker's own log."""
    import subprocess

    from deployments.setup import missing_branch

    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "first"], check=True)
    assert missing_branch(str(tmp_path), "main") is None
    said = missing_branch(str(tmp_path), "nosuch")
    assert said is not None and "has no branch 'nosuch'" in said and "--branch" in said, said
    assert missing_branch(str(tmp_path / "not-a-repository"), "main") is None  # git cannot tell: not refused


def test_limits_show_with_a_lease_folder_that_is_not_there_says_so(capsys, tmp_path) -> None:
    """`limits show --leases /nonexistent` ignored the path and showed the limits without leases."""
    assert main(["limits", "show", "--leases", str(tmp_path / "nonexistent")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_resetting_a_limit_the_server_lacks_names_it(prefect_api, capsys) -> None:
    """`limits reset nosuch --yes` said `... not found on the Prefect server at URL: None`."""
    assert main(["limits", "reset", "imagegen:nosuch", "--yes"]) == 1
    assert capsys.readouterr().err.strip() == ("no limit named imagegen:nosuch on the Prefect server "
                                               "(`imagegen limits show` lists them)")
