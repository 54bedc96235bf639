"""A newcomer's first hour: the shipped specs and the README's examples work as typed, and a
person's mistakes get one line naming the fix (exit non-zero, no traceback, no hang). The
commands run as a person types them: the `imagegen` program, in a shell of its own."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
IMAGEGEN = str(Path(os.sys.prefix) / "bin" / "imagegen")
DEAD_API = "http://127.0.0.1:9/api"  # the discard port: nothing listens there


def imagegen(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([IMAGEGEN, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def test_every_shipped_spec_passes_validate_provider_rules_included() -> None:
    specs = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "pipelines").glob("*.yaml"))
    out = imagegen("validate", *specs)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("OK ") == len(specs) >= 3


def test_the_readme_validate_example_prints_what_the_readme_shows() -> None:
    block = re.search(r"```console\n\$ (imagegen validate \S+)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README's validate example is gone"
    out = imagegen(*block.group(1).split()[1:])
    assert out.returncode == 1
    assert out.stderr.strip() == block.group(2).strip()


def test_a_json_spec_is_a_spec(tmp_path: Path) -> None:
    spec = yaml.safe_load((ROOT / "pipelines" / "demo.yaml").read_text())
    (tmp_path / "assets").symlink_to(ROOT / "pipelines" / "assets")
    (tmp_path / "demo.json").write_text(json.dumps(spec, indent=2))
    out = imagegen("validate", str(tmp_path / "demo.json"))
    assert out.returncode == 0 and "pipeline 'demo-products'" in out.stdout, out.stderr


def corrupt_state(tmp_path: Path) -> str:
    (tmp_path / "state.json").write_text("{ not json")
    return str(tmp_path)


MISTAKES = [
    (["sandbox", "up", "--port", "tams=abc"], {}, "'abc' is not a port number"),
    (["sandbox", "up", "--port", "nosuch=8700"], {}, "PROVIDER one of chuzhan, tams, tencent"),
    (["backfill", "demo", "--start", "2026-01-01", "--end", "2026-01-02", "--max-parallel", "0"], {},
     "max_parallel is 0: give 1 or more"),
    (["backfill", "demo", "--start", "2026-01-01", "--end", "2026-01-02", "--max-credits", "nan"], {},
     "max_credits is nan: give a finite number"),
    (["backfill", "demo", "--start", "2026-01-01", "--end", "2026-01-02", "--max-credits", "-3"], {},
     "max_credits is -3.0"),
    (["backfill", "catalogue-demo", "--start", "2026-01-01", "--end", "2026-01-02", "--max-credits", "50"], {},
     "max_credits 50 is one number, but this spec uses chuzhan, tams, tencent"),
    (["backfill", "demo", "--start", "2026-01-01", "--end", "2026-01-02", "--max-credits", "tams=lots"], {},
     "give a number (500) or one per provider (tams=500,tencent=50)"),
    (["validate", "no/such/spec.yaml"], {}, "cannot read spec"),
    (["estimate", "demo"], {"PREFECT_API_URL": DEAD_API}, "cannot reach the Prefect API at " + DEAD_API),
    (["limits", "reset", "no-such-limit", "--yes"], {"PREFECT_API_URL": DEAD_API}, "imagegen server up"),
    (["ledger", "show", "demo", "--run-date", "2026-01-01"], {"PREFECT_API_URL": DEAD_API},
     "cannot reach the Prefect API"),
]


@pytest.mark.parametrize("args, env, says", MISTAKES, ids=[" ".join(m[0][:3]) for m in MISTAKES])
def test_a_mistake_gets_one_line_naming_the_fix(args: list[str], env: dict[str, str], says: str) -> None:
    out = imagegen(*args, env=env)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-2000:]
    assert says in out.stderr, out.stderr[-2000:]


def test_a_corrupt_sandbox_state_file_is_named_with_the_fix(tmp_path: Path) -> None:
    out = imagegen("sandbox", "status", "--state-dir", corrupt_state(tmp_path))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "state.json is not a sandbox state file" in out.stderr and "remove it" in out.stderr


@pytest.mark.sandbox  # `make demo` starts both itself (the tier markers: tests/conftest.py)
@pytest.mark.server
def test_make_demo_works_the_first_time_on_a_fresh_prefect_home_while_the_machine_is_busy(tmp_path: Path) -> None:
    """`make demo` as a new user types it: a fresh clone, a Prefect home with no database yet,
    and two processes keeping both cores busy (Prefect's own 20 s wait for its temporary server
    failed here every time)."""
    import sys

    from tests.servers import clone_sharing_this_venv

    clone = clone_sharing_this_venv(tmp_path / "clone")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "IMAGEGEN_"))}
    env["PREFECT_HOME"] = str(tmp_path / "new-prefect-home")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        out = subprocess.run(["make", "demo"], cwd=clone, env=env, capture_output=True, text=True, timeout=900,
                             stdin=subprocess.DEVNULL)
    finally:
        for proc in busy:
            proc.kill()
        subprocess.run([str(clone / ".venv" / "bin" / "imagegen"), "sandbox", "down"], cwd=clone, env=env,
                       capture_output=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "first run: creating its database" in text and "complete: 5 image(s) archived" in text, text[-4000:]
    assert "Traceback" not in text and "database is locked" not in text, text[-4000:]
