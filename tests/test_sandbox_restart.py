"""The sandbox keeps what a real provider keeps across `imagegen sandbox down` and `up`: the
account, its jobs, what it charged. Before, the emulators started empty while S3 kept the
ledger, so a run interrupted before a restart (a Ctrl-C'd `make demo`, then `make demo` again)
polled jobs the new emulator did not know, failed every item `HTTP 404: job not found`, and
did so on every rerun of that date; a TAMS job id could even name another request's job, as
the ids started again from the same number."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from blocks.base import GenerationRequest, JobState
from sandbox import launcher

REQUEST = GenerationRequest(request_id="r" * 32, prompt="a lamp kept across a restart", seed=7, width=512, height=512,
                            steps=20, sampler="Euler a")


def test_a_job_submitted_before_a_sandbox_restart_is_found_after_it_and_charged_once(tmp_path: Path) -> None:
    state = launcher.up_on_free_ports(tmp_path, latency=0.5, buckets=("kept",), providers=["tams"])
    try:
        job_id = state.block("tams").submit(REQUEST)
        app_id = state.account("tams")["app_id"]
        assert launcher.down(tmp_path)
        state = launcher.up_on_free_ports(tmp_path, latency=0.5, buckets=("kept",), providers=["tams"])
        provider = state.block("tams")
        assert state.account("tams")["app_id"] == app_id  # the same account, as a real one outlives our restarts
        assert provider.submit(REQUEST) == job_id  # the same request id finds its job: not a second one
        deadline = time.monotonic() + 30
        while not (status := provider.poll(job_id)).state.final and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status.state is JobState.SUCCEEDED, status
        assert provider.fetch(status)[0].startswith(b"\x89PNG")
        assert provider.submit(REQUEST.model_copy(update={"request_id": "s" * 32})) != job_id  # ids never repeat
        stats = httpx.get(f"{state.url('tams')}/_sandbox/stats").json()
        assert stats["duplicate_submits"] == 1 and stats["max_charges_per_request"] == 1, stats
        assert stats["charges"] == 1, stats  # the kept job, once (the new one is charged when it ends)
    finally:
        launcher.down(tmp_path)
