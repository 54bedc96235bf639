"""Hostile and mistaken specs (`tests/hostile/`, plus a few made here that a repository cannot
hold well): each is refused by `imagegen validate` and by `imagegen run` with a clear message,
no traceback and none of a secret, before any provider request and any S3 write (the emulators'
request counters and the bucket's listing say so), in bounded time and memory.

Every file but the secrets ones is a working spec with one hostile thing in it, so a check
that stopped refusing it would make the run reach the sandbox and this test fail."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import date
from pathlib import Path

import pytest

from flows.cli import main
from flows.specs.spec import MAX_ITEMS, MAX_SPEC_BYTES, SpecRefused, resolve_spec_path
from tests.conftest import TEST_BUCKET, chuzhan_stats, s3_client, tams_stats, tencent_stats
from tests.test_limits_and_faults import cli_env

ROOT = Path(__file__).parent.parent
HOSTILE = Path(__file__).parent / "hostile"
SECRET = "hostile-secret-value-do-not-print"
VALID_HEAD = ('version: 1\nname: hostile-made\nprovider: tams\nblocks: {tams: sandbox}\n'
              'generate: {width: 512, height: 512, steps: 20, sampler: "Euler a"}\n'
              f"archive: {{bucket: {TEST_BUCKET}, credentials: sandbox}}\n")
MAX_RSS_MB = 700  # a Python with Prefect imported is ~300 MB; an expanding alias bomb is GBs


def expected(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode("utf-8", "replace")
    return first.removeprefix("# expect: ") if first.startswith("# expect: ") else "not a pipeline spec"


def made_here(folder: Path) -> list[Path]:
    """Specs written at test time: too large, too many items, not UTF-8, an input that is a
    symlink out of the spec's folder."""
    made = {
        "too-large": ("# expect: larger than 1,000,000 bytes\n" + VALID_HEAD + "items:\n  - {id: a, prompt: a cat}\n"
                      + "# padding\n" * (MAX_SPEC_BYTES // 10)).encode(),
        "too-many-items": ("# expect: a spec has at most 10,000\n" + VALID_HEAD + "items:\n"
                           + "".join(f"  - {{id: i{n}, prompt: p}}\n" for n in range(MAX_ITEMS + 1))).encode(),
        "latin-1": ("# expect: not UTF-8 text: byte 0xe9 at offset\n" + VALID_HEAD
                    + "items:\n  - {id: a, prompt: caf\u00e9}\n").encode("latin-1"),
        "utf-16": ("# expect: not UTF-8 text: byte 0xff at offset 0\n" + VALID_HEAD
                   + "items:\n  - {id: a, prompt: a cat}\n").encode("utf-16"),
        "symlink-input": ("# expect: outside the spec's folder\n" + VALID_HEAD
                          + "items:\n  - {id: a, prompt: a cat, input_image: passwd.png}\n").encode(),
    }
    (folder / "passwd.png").symlink_to("/etc/passwd")
    paths = []
    for name, data in made.items():
        path = folder / f"{name}.yaml"
        path.write_bytes(data)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return sorted(HOSTILE.glob("*.yaml")) + made_here(tmp_path_factory.mktemp("hostile-made"))


def expected_text(path: Path) -> str:
    """The first line of a made-here spec decoded as its writer meant it (UTF-16 included)."""
    data = path.read_bytes()
    return expected(path) if not data.startswith(b"\xff\xfe") else data.decode("utf-16").split("\n", 1)[0][10:]


def bounded_imagegen(args: list[str], env: dict[str, str]) -> tuple[int, str, str, float]:
    """Run `imagegen ARGS` in a child; return its exit code, output, error and peak RSS in MB.
    Killed after 120 s, so a spec that makes it spin fails the test instead of hanging it."""
    out_path, err_path = Path(env["TMP_OUT"]), Path(env["TMP_ERR"])
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], stdout=out, stderr=err, env=env,
                                cwd=ROOT)
        peak = PeakRss(proc.pid)
        killer = threading.Timer(120, proc.kill)
        killer.start()
        _, status = os.waitpid(proc.pid, 0)
        killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, out_path.read_text(), err_path.read_text(), peak.stop()


class PeakRss:
    """A child's peak resident set (`VmHWM`), read from /proc every 20 ms while it runs. Not
    `wait4`'s `ru_maxrss`: Linux carries a forking parent's high-water mark across `exec`, so a
    child of a large test process (an xdist worker) reports the parent's size."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kb, self._done = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.is_set():
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            self._done.wait(0.02)

    def stop(self) -> float:
        """The peak seen, in MB."""
        self._done.set()
        self._thread.join()
        return self.peak_kb / 1024


def issue_lines(stderr: str, path: Path) -> str:
    return "\n".join(line for line in stderr.splitlines() if line.startswith(f"{path}:"))


def test_the_corpus_covers_every_class(corpus) -> None:
    names = [p.stem for p in corpus]
    assert len(corpus) >= 40
    for prefix in ("parse-", "dup-", "tpl-", "secret-", "input-", "strict-"):
        assert sum(n.startswith(prefix) for n in names) >= 3, prefix


def test_validate_refuses_each_in_one_process_with_bounded_memory(corpus, tmp_path) -> None:
    env = {**os.environ, "TMP_OUT": str(tmp_path / "out"), "TMP_ERR": str(tmp_path / "err")}
    code, out, err, rss = bounded_imagegen(["validate", *map(str, corpus)], env)
    assert code == 1
    assert "Traceback" not in err and "OK " not in out, (out + err)[-3000:]
    assert SECRET not in out + err and "root:x:0" not in out + err
    for path in corpus:
        lines = issue_lines(err, path)
        assert expected_text(path) in lines, f"{path.name}: expected {expected_text(path)!r}, got {lines!r}"
    print(f"validate of {len(corpus)} hostile specs: peak RSS {rss:.0f} MB")
    assert rss < MAX_RSS_MB


def test_run_refuses_each_before_any_request_or_write(corpus, sandbox_blocks, capsys) -> None:
    state = sandbox_blocks
    counters = lambda: (tams_stats(state)["requests"], chuzhan_stats(state)["requests"],  # noqa: E731
                        tencent_stats(state)["requests"])
    listing = lambda: sorted(o["Key"] for page in s3_client(state).get_paginator("list_objects_v2").paginate(  # noqa: E731
        Bucket=TEST_BUCKET) for o in page.get("Contents", []))
    before, objects = counters(), listing()
    for path in corpus:
        code = main(["run", str(path), "--run-date", "2026-11-30"])
        out, err = capsys.readouterr()
        assert code == 1, f"{path.name}: exit {code}"
        assert expected_text(path) in issue_lines(err, path), f"{path.name}: {err[-800:]}"
        assert "Traceback" not in err and SECRET not in out + err and "root:x:0" not in out + err
    assert counters() == before, "a hostile spec reached a provider"
    assert listing() == objects, "a hostile spec wrote to the bucket"


@pytest.mark.parametrize("name", ["parse-billion-laughs", "parse-merge-bomb", "parse-deep-nesting"])
def test_run_of_a_bomb_stays_small_in_its_own_process(name, sandbox_blocks, tmp_path) -> None:
    env = {**cli_env(), "TMP_OUT": str(tmp_path / "out"), "TMP_ERR": str(tmp_path / "err")}
    path = HOSTILE / f"{name}.yaml"
    code, _, err, rss = bounded_imagegen(["run", str(path)], env)
    assert code == 1 and expected(path) in err and "Traceback" not in err
    assert rss < MAX_RSS_MB


def test_a_deployment_spec_is_a_pipelines_name_or_under_a_spec_root(tmp_path, monkeypatch) -> None:
    assert resolve_spec_path("demo", confined=True).name == "demo.yaml"
    outside = tmp_path / "mine.yaml"
    outside.write_text((ROOT / "pipelines" / "demo.yaml").read_text())
    for spec in ("/etc/passwd", "../../../etc/passwd", "pipelines/../../../etc/passwd", str(outside),
                 "demo/../../etc/passwd"):
        with pytest.raises(SpecRefused):
            resolve_spec_path(spec, confined=True)
    with pytest.raises(SpecRefused, match=r"no spec named 'demoo' in pipelines/ \(did you mean 'demo'"):
        resolve_spec_path("demoo", confined=True)  # was "must be a name in pipelines/", which it is
    monkeypatch.setenv("IMAGEGEN_SPEC_ROOTS", str(tmp_path))
    assert resolve_spec_path(str(outside), confined=True) == outside
    with pytest.raises(SpecRefused, match=r"no such spec on this worker's machine; give a name in pipelines/ or a "
                                          r"spec file under IMAGEGEN_SPEC_ROOTS there"):  # was "no such spec"
        resolve_spec_path(str(tmp_path / "nope.yaml"), confined=True)
    assert resolve_spec_path(str(outside)) == outside  # the CLI: a person's own path


def test_one_name_belongs_to_one_spec_file(sandbox_blocks, tmp_path) -> None:
    """A second spec file with the same `name` is refused at run start, before any request, until
    it takes the name over; the first spec's images are never touched meanwhile."""
    from flows.pipeline import run_pipeline

    text = VALID_HEAD.replace("hostile-made", "one-name") + "items:\n  - {id: a, prompt: a cat}\n"
    first, second = tmp_path / "first.yaml", tmp_path / "copy-of-first.yaml"
    first.write_text(text)
    second.write_text(text.replace("a cat", "a dog"))
    day = date(2026, 11, 2)
    assert run_pipeline(spec=str(first), run_date=day, return_state=True).is_completed()
    before = tams_stats(sandbox_blocks)["requests"]
    state = run_pipeline(spec=str(second), run_date=day, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "belongs to spec" in message and str(first) in message and "--take-over-name" in message
    assert tams_stats(sandbox_blocks)["requests"] == before
    assert run_pipeline(spec=str(second), run_date=day, take_over_name=True, return_state=True).is_completed()
    assert run_pipeline(spec=str(first), run_date=day, return_state=True).is_failed()  # now the copy owns it


def test_a_spec_s_ledger_does_not_move_under_its_dates(sandbox_blocks, tmp_path) -> None:
    """Editing `archive.manifest_template` moved the job ledgers (they lie beside the manifests):
    the next run of a date already run started from nothing, and a job left maybe charged was
    sent again. Refused before any request, saying why and the ways out."""
    from flows.pipeline import run_pipeline

    text = VALID_HEAD.replace("hostile-made", "ledger-stays") + "items:\n  - {id: a, prompt: a cat}\n"
    spec, day = tmp_path / "stays.yaml", date(2026, 11, 3)
    spec.write_text(text)
    assert run_pipeline(spec=str(spec), run_date=day, return_state=True).is_completed()
    spec.write_text(text.replace("credentials: sandbox}", "credentials: sandbox, manifest_template: "
                                 "'{pipeline}/{run_date}/v2/manifest.json'}"))
    before = tams_stats(sandbox_blocks)["requests"]
    state = run_pipeline(spec=str(spec), run_date=day, return_state=True)
    message = str(state.result(raise_on_failure=False))
    assert state.is_failed() and "archive.manifest_template of 'ledger-stays' was '{pipeline}/{run_date}/manifest.json'" \
        in message and "Put it back" in message, message
    assert tams_stats(sandbox_blocks)["requests"] == before
    spec.write_text(text)
    assert run_pipeline(spec=str(spec), run_date=day, return_state=True).is_completed()  # put back: reused
    assert tams_stats(sandbox_blocks)["requests"] == before
