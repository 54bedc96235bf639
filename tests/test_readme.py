"""The README's deployment quick-start, run as written: its shell block, line for line, in a
fresh clone, with its own Prefect home. It starts `imagegen server up` on 4200 and the
sandbox on its default ports, as a person following the README would, so it is skipped (saying
why) when one of those ports is taken."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.servers import clone_sharing_this_venv

# It starts the sandbox and a Prefect server itself (the tier markers: tests/conftest.py).
pytestmark = [pytest.mark.sandbox, pytest.mark.server]

ROOT = Path(__file__).parent.parent
PORTS = (4200, 8700, 8702, 8703, 8333)  # prefect server, the emulators, S3: the README's defaults


def readme_block(marker: str) -> str:
    """The README's first shell block holding `marker`."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return next(block for block in blocks if marker in block)


def quick_start() -> str:
    """The README's shell block that deploys (`prefect --no-prompt deploy --all`), then its
    backfill block (`imagegen backfill` and the `backfill` deployment), as a reader types them."""
    return readme_block("prefect --no-prompt deploy --all") + readme_block("imagegen backfill demo")


def taken(port: int) -> bool:
    """Listened on or bound: the sandbox's own check (a bind, as its servers bind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_the_deployment_quick_start_runs_as_written(tmp_path: Path) -> None:
    if busy := [port for port in PORTS if taken(port)]:
        pytest.skip(f"ports {busy} are taken; the README's commands use them")
    clone = clone_sharing_this_venv(tmp_path / "clone")
    script = tmp_path / "quick-start.sh"
    script.write_text("set -euo pipefail\n" + quick_start())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    # Its own session: the server and the worker it starts with `&` stay in its process group.
    proc = subprocess.Popen(["bash", str(script)], cwd=clone, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        for what in ("sandbox", "server"):  # what the block started in the background, in its own sessions
            subprocess.run([str(clone / ".venv" / "bin" / "imagegen"), what, "down"], cwd=clone, env=env,
                           capture_output=True, timeout=120)
        _stop_group(proc.pid)
    if proc.returncode and (held := re.search(r"port \d+ for the \w+ sandbox is taken by .*", out)):
        pytest.skip(f"a default port was taken while the README's commands ran: {held.group(0)[:200]}")
    assert proc.returncode == 0, out[-4000:]
    assert "export PREFECT_API_URL=http://127.0.0.1:4200/api" in out, out[-4000:]
    assert "registered Blocks:" in out and "work pool imagegen-process" in out, out[-4000:]
    assert out.count("Flow run finished successfully in 'Completed'.") == 2, out[-4000:]  # the run, the backfill
    dates = [line.split()[1] for line in out.splitlines() if line.startswith("2026-01-0")]
    assert dates == ["done", "done", "done"], out[-4000:]  # imagegen backfill's table: every date done


def _stop_group(pgid: int) -> None:
    """Stop what the block left running (the server, the worker): SIGTERM, then SIGKILL."""
    import time

    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
