"""A run's progress line: counts, time left, what it waits for, and who hears of it."""

from __future__ import annotations

from flows.running.progress import RunProgress, listening


def test_progress_counts_and_stays_below_done_while_a_person_decides() -> None:
    logged: list[str] = []
    heard: list[str] = []
    progress = RunProgress("demo 2026-01-31", 4, log=logged.append, reused=1)
    with listening(lambda p: heard.append(p.line())):
        progress.update(submitted=4)
        progress.update(done=1, credits=1.5)
        progress.update(failed=1)
        progress.update(done=2, credits=3)
        assert progress.fraction == 1.0
        progress.update(waiting="a person's review")
        assert progress.fraction == 0.99  # not done while a person decides
        progress.update(waiting=None)
        progress.finish()
    progress.update(done=0)  # nobody listens any more
    assert len(heard) == 7 and heard[-1] == progress.line()
    assert heard[1].startswith("demo 2026-01-31: 4/4 items started (1 already archived), 1 done, 0 failed, "
                               "1.5 credits, 0:00 elapsed, about 0:00 left")
    assert "waiting for a person's review" in heard[4] and "left" not in heard[4]
    assert logged[0] == heard[0] and logged[-1].endswith("elapsed")  # the first line and the last, on the log
    assert progress.finished


def test_a_failing_listener_never_breaks_the_run() -> None:
    def broken(_: RunProgress) -> None:
        raise RuntimeError("display gone")

    progress = RunProgress("demo", 1)
    with listening(broken):
        progress.update(done=1)
    assert progress.done == 1


def test_the_run_log_gets_a_line_every_few_seconds_while_nothing_changes(monkeypatch) -> None:
    """A run waiting (an unknown submit's hold, a long job) still says it is alive."""
    import time

    import flows.running.progress as progress

    monkeypatch.setattr(progress, "LOG_EVERY", 0.2)
    lines: list[str] = []
    run = progress.RunProgress("quiet", 2, log=lines.append)
    time.sleep(0.9)
    run.finish()
    assert len(lines) >= 3 and all(line.startswith("quiet: 0/2 items started") for line in lines)


def test_a_result_in_memory_is_read_without_prefect_s_event_loop(monkeypatch) -> None:
    """`result_of` hands over what `State.result()` would, and falls back to it where the
    result is not simply in memory (a failure)."""
    from prefect.client.schemas.objects import State
    from prefect.states import Completed, Failed

    from flows.running.progress import result_of

    assert result_of(Completed(data={"credits": 2})) == State.result(Completed(data={"credits": 2})) == {"credits": 2}
    failed = Failed(data=ValueError("no"))
    assert isinstance(result_of(failed, raise_on_failure=False), ValueError)
    calls = []
    monkeypatch.setattr(State, "result", lambda self, **kw: calls.append(kw) or "read the usual way")
    assert result_of(Completed(data={"a": 1})) == {"a": 1} and calls == []
    assert result_of(failed, raise_on_failure=False) == "read the usual way" and calls == [{"raise_on_failure": False}]


def test_the_progress_line_says_when_s3_has_not_answered_a_ledger_call(monkeypatch) -> None:
    """A frozen S3 server answers nothing: the line tells it, for as long as the call waits,
    retries and backoff included, and no longer once it returns."""
    import threading
    import time

    from flows.paying import stalled
    from flows.paying.ledger import with_backoff

    monkeypatch.setattr(stalled, "STALL_SECONDS", 0.2)
    answered, attempts = threading.Event(), []

    def frozen() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise TimeoutError("read timed out")  # the first attempt's read timeout, then a backoff
        answered.wait(10)
        return "record"

    progress = RunProgress("run p 2026-01-01", 4)
    call = threading.Thread(target=lambda: with_backoff(frozen, "ledger write p/_jobs/i1.json"))
    call.start()
    try:
        deadline = time.monotonic() + 30
        while len(attempts) < 2 and time.monotonic() < deadline:  # past the first attempt's backoff
            time.sleep(0.05)
        assert len(attempts) == 2, attempts
        line = progress.line()
        assert "; S3 has not answered a ledger write for " in line and "(is the S3 server up?)" in line, line
        assert "i1.json" not in line, line
    finally:
        answered.set()
        call.join(10)
    assert "S3" not in progress.line()


def test_a_run_of_several_providers_shows_each_one_s_credits_in_its_own_unit() -> None:
    """TAMS credits, 触站AI points and Tencent calls do not add up: one total would mean nothing."""
    progress = RunProgress("mixed 2026-01-31", 3)
    progress.charged("tams", 1.5)
    assert "1.5 credits" in progress.line()
    progress.charged("tencent", 1)
    progress.charged("tams", 2)
    assert ", credits tams 3.5, tencent 1, " in progress.line() and "4.5" not in progress.line()


def test_a_manifest_s_credits_read_per_provider_where_it_lists_several() -> None:
    from flows.running.report import credits_of

    assert credits_of({"items": [{"provider": "tams", "credits": 1.5}, {"provider": "tams", "credits": 6}]}) == "7.5 credits"
    rerun = {"items": [{"provider": "tams", "credits": 7.5}], "totals": {"credits": 7.5, "credits_this_run": 0.0}}
    assert credits_of(rerun) == "7.5 credits (0 this run)"  # a rerun's items were paid by an earlier run
    assert credits_of({"items": [{"provider": "tams", "credits": 1.5}, {"provider": "tencent", "credits": 1},
                                 {"provider": "tencent", "credits": None}]}) == "credits tams 1.5, tencent 1"


LIVE_LINE_CHILD = """
import logging, time
import prefect.main  # noqa: F401 - its logging set up (on its console handler), as in `imagegen run`
from flows.running.progress import RunProgress, terminal_line

with terminal_line():
    progress = RunProgress(label="demo 2026-01-01", total=4)
    for n in range(4):
        progress.update(submitted=1)
        time.sleep(0.7)  # the line is drawn twice a second
        logging.getLogger("prefect.demo").warning("record %d of the run", n)
        progress.update(done=1)
        time.sleep(0.7)
"""


def screen(output: str) -> list[str]:
    """The lines a terminal ends with for `output`: text, CR, LF, cursor up, erase line."""
    import re

    lines, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", output):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        elif token.startswith("\x1b["):
            count = int(token[2:-1] or 1) if token[2:-1].isdigit() else 1
            if token.endswith("A"):
                row = max(0, row - count)
            elif token.endswith("K"):
                lines[row] = lines[row][:col] if token[2:-1] in ("", "0") else ""
        else:
            line = lines[row].ljust(col)
            lines[row], col = line[:col] + token + line[col + len(token):], col + len(token)
    return lines


def test_log_records_print_above_the_live_line_never_onto_it(tmp_path) -> None:
    """In a terminal the progress is a live line, and Prefect's log records print above it: a
    console of the line's own put 5-6 records a demo run onto the end of the line."""
    import os
    import pty
    import select
    import sys
    import time
    from pathlib import Path

    env = {**os.environ, "PREFECT_LOGGING_COLORS": "false", "COLUMNS": "200", "LINES": "40", "TERM": "xterm"}
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(Path(__file__).parent.parent)
        os.execve(sys.executable, [sys.executable, "-c", LIVE_LINE_CHILD], env)
    output, deadline = b"", time.monotonic() + 120
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                output += os.read(fd, 65536)
            except OSError:  # the child ended and the terminal closed
                break
        if os.waitpid(pid, os.WNOHANG)[0]:
            break
    text = output.decode(errors="replace")
    assert "demo 2026-01-01: 4/4 items started" in text, text[-3000:]  # the line was drawn
    records = [line for line in screen(text) if "record " in line]
    assert len(records) == 4, text[-3000:]
    assert all("demo 2026-01-01" not in line and "record" in line.split("|")[-1] for line in records), records


def test_a_backfill_line_counts_a_date_s_credits_with_the_date(monkeypatch) -> None:
    """A finished date's credits are counted before the date itself, so the line that says it
    is done says what it cost (it lagged a date behind: 2 done, 7.5 credits where 15 were)."""
    from datetime import date
    from types import SimpleNamespace

    from prefect.states import Completed

    from flows import backfill
    from flows.running import progress

    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    lines: list[str] = []
    tracker = progress.RunProgress("demo backfill", 3, log=lines.append, unit="dates")
    for day in (1, 2):
        row = {"date": f"2026-01-0{day}", "status": "done", "by_provider": {"tams": {"credits": 7.5}}}
        future = SimpleNamespace(wrapped_future=SimpleNamespace(result=lambda row=row: Completed(data=row)))
        backfill.date_row(date(2026, 1, day), future, tracker)  # type: ignore[arg-type]
    done_lines = [line for line in lines if "2 done" in line]
    assert done_lines and all("15 credits" in line for line in done_lines), lines
