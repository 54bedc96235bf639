"""A fourth provider, added the way a provider package adds one: its Block module, its emulator
module and its limits, declared by entry points (`imagegen.providers`, `imagegen.emulators`)
and its `limits.yaml` (`imagegen.limits`). Nothing else in the project changes. The toy then runs a spec end to end:
its own sandbox (emulator process and S3), the Prefect API, its Prefect limits and the flow.
Also here: what a person sees of a run (its name) and of a sandbox that cannot start."""

from __future__ import annotations

import textwrap
from datetime import date
from pathlib import Path

import httpx
import pytest

TOY_BLOCK = '''
"""Toy provider Block: POST /jobs, GET /jobs/{id}, images by URL; a bearer token."""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, SecretStr

from blocks.base import ApiCall, CreditEstimate, GenerationRequest, ImageProvider, JobState, JobStatus, download
from blocks.errors import BadRequest


class ToyProvider(ImageProvider):
    """A toy image provider for the registry test."""

    provider_name: ClassVar[str] = "toy"
    idempotent_submit: ClassVar[bool] = True
    _block_type_name = "Toy Provider"
    _block_type_slug = "toy-provider"

    token: SecretStr = Field(description="The account token.")
    endpoint: str = Field("http://127.0.0.1:8799", description="API base URL.")
    timeout: float = Field(10.0, description="Seconds for one HTTP request.")

    def client_options(self) -> dict[str, Any]:
        return {"base_url": self.endpoint, "timeout": self.timeout,
                "headers": {"Authorization": f"Bearer {self.token.get_secret_value()}"}}

    @classmethod
    def validate(cls, request: GenerationRequest) -> None:
        if not 64 <= request.width <= 1024 or not 64 <= request.height <= 1024:
            raise BadRequest("generate.width/height: 64..1024", provider="toy", code="validation")

    @classmethod
    def estimate_offline(cls, request: GenerationRequest) -> CreditEstimate:
        return CreditEstimate(credits=float(request.count), source="formula")

    def estimate(self, request: GenerationRequest) -> CreditEstimate:
        return self.estimate_offline(request)

    def upload(self, data: bytes, content_type: str) -> str:
        raise BadRequest("toy: no input images", provider="toy")

    # Its request shapes; the base sends them (request slot, retries, transport faults) and
    # reads a 200's JSON; any other status is transient (429, 5xx) or a bad request.
    def submit_call(self, request: GenerationRequest) -> ApiCall:
        return ApiCall.with_json("api", "POST", "/jobs", {
            "request_id": request.request_id, "prompt": request.prompt, "width": request.width,
            "height": request.height, "count": request.count, "seed": request.seed})

    def read_job_id(self, answer: Any) -> str:
        return answer["id"]

    def poll_call(self, job_id: str) -> ApiCall:
        return ApiCall("api", "GET", f"/jobs/{job_id}")

    def read_status(self, job_id: str, answer: Any) -> JobStatus:
        state = JobState.SUCCEEDED if answer["status"] == "done" else JobState.RUNNING
        return JobStatus(job_id=job_id, state=state, provider_status=answer["status"], result_urls=answer["images"])

    def fetch(self, status: JobStatus) -> list[bytes]:
        return [download(url, provider="toy", timeout=self.timeout, attempts=3, expiry="ever")
                for url in status.result_urls]
'''

TOY_EMULATOR = '''
"""Toy emulator: checks the bearer token, dedupes by request_id, charges a credit an image."""
from __future__ import annotations

import io
import itertools
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox.accounts import new_token, read_secret, secret_file
from sandbox.base import Emulator

DEFAULT_PORT = 8799


def sandbox_account(state_dir: Path) -> dict[str, str]:
    return {"token_file": secret_file(state_dir, "toy_token", new_token())}


def block_fields(account: dict[str, str]) -> dict[str, Any]:
    return {"token": read_secret(account, "token")}


def make_app(account: dict[str, str], latency: float) -> Starlette:
    token, lock, ids = read_secret(account, "token"), threading.Lock(), itertools.count(1)
    jobs: dict[str, dict[str, Any]] = {}
    by_request: dict[str, str] = {}
    stats = {"requests": 0, "submits": 0, "charges": 0, "auth_failures": 0}

    def authorized(request: Request) -> bool:
        with lock:
            stats["requests"] += 1
            ok = request.headers.get("authorization") == f"Bearer {token}"
            stats["auth_failures"] += not ok
        return ok

    async def submit(request: Request) -> Response:
        if not authorized(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        body = await request.json()
        with lock:
            job_id = by_request.get(body["request_id"])
            if job_id is None:
                job_id = by_request[body["request_id"]] = str(next(ids))
                jobs[job_id] = {**body, "at": time.monotonic()}
                stats["submits"] += 1
        return JSONResponse({"id": job_id})

    async def poll(request: Request) -> Response:
        if not authorized(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        job = jobs[request.path_params["job_id"]]
        done = time.monotonic() - job["at"] >= latency
        with lock:
            if done and not job.get("charged"):
                job["charged"] = True
                stats["charges"] += job["count"]
        base = str(request.base_url).rstrip("/")
        images = [f"{base}/images/{request.path_params['job_id']}/{n}" for n in range(job["count"])] if done else []
        return JSONResponse({"status": "done" if done else "running", "images": images})

    async def image(request: Request) -> Response:
        job = jobs[request.path_params["job_id"]]
        out = io.BytesIO()
        Image.effect_noise((job["width"], job["height"]), 60).convert("RGB").save(out, format="PNG")
        return Response(out.getvalue(), media_type="image/png")

    class Toy(Emulator):  # the sandbox's hooks (health, stats, config, faults) come from the base
        def provider_routes(self) -> list[Route]:
            return [Route("/jobs", submit, methods=["POST"]), Route("/jobs/{job_id}", poll),
                    Route("/images/{job_id}/{n}", image)]

        async def stats(self, request: Request) -> Response:
            return JSONResponse(stats)

        async def config(self, request: Request) -> Response:
            return JSONResponse({"latency": latency})

        async def set_faults(self, request: Request) -> Response:
            return JSONResponse({"error": "the toy takes no faults"}, status_code=400)

    return Toy().build_app()
'''

TOY_LIMITS = """\
providers:
  toy:
    rate: {api: 20}
    jobs: {job: 2}
"""

ENTRY_POINTS = """\
[imagegen.providers]
toy = toy_imagegen.block:ToyProvider

[imagegen.emulators]
toy = toy_imagegen.emulator

[imagegen.limits]
toy = toy_imagegen
"""


def install_toy(root: Path) -> Path:
    """What `pip install toy-imagegen` would leave: the package and its dist-info."""
    package = root / "toy_imagegen"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "block.py").write_text(textwrap.dedent(TOY_BLOCK))
    (package / "emulator.py").write_text(textwrap.dedent(TOY_EMULATOR))
    (package / "limits.yaml").write_text(TOY_LIMITS)
    info = root / "toy_imagegen-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-imagegen\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return package


@pytest.fixture()
def toy(tmp_path_factory, monkeypatch, prefect_api):
    from blocks import registry
    from sandbox import accounts, launcher

    root = tmp_path_factory.mktemp("site")
    install_toy(root)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", f"{root}:{Path(__file__).parent.parent}")  # the emulator's process
    registry.refresh()
    accounts.emulators.cache_clear()
    state_dir = tmp_path_factory.mktemp("toy-sandbox")
    state = launcher.up_on_free_ports(state_dir, latency=0.3, buckets=("toy-archive",), providers=["toy"])
    try:
        yield state
    finally:
        launcher.down(state_dir)
        monkeypatch.undo()
        registry.refresh()
        accounts.emulators.cache_clear()


def test_a_fourth_provider_from_its_own_package_runs_a_spec_end_to_end(toy, tmp_path) -> None:
    from prefect.client.orchestration import get_client

    from blocks import PROVIDERS
    from deployments.limits import apply_limits, show_limits
    from flows.cli import main
    from flows.pipeline import run_pipeline
    from sandbox import launcher
    from tests.conftest import run_spec

    assert "toy" in PROVIDERS and {"tams", "chuzhan", "tencent"} <= set(PROVIDERS)
    assert launcher.register_blocks(toy, "toy-sandbox") == ["toy-provider/toy-sandbox", "aws-credentials/toy-sandbox"]
    assert set(apply_limits({"toy": ["toy-sandbox"]})) == {"imagegen:toy:toy-sandbox:rate:api",
                                                         "imagegen:toy:toy-sandbox:jobs:job"}
    text = """\
version: 1
name: toy-products
provider: toy
blocks: {toy: toy-sandbox}
generate: {width: 256, height: 192}
archive: {bucket: toy-archive, credentials: toy-sandbox}
run: {poll_interval: 0.2, job_timeout: 30}
items:
  - {id: kite, prompt: a red kite, count: 2}
  - {id: boat, prompt: a paper boat}
"""
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    assert main(["validate", str(spec)]) == 0
    state = run_spec(tmp_path, text, date(2026, 11, 5))
    assert state.is_completed(), state.message
    stats = httpx.get(f"{toy.url('toy')}/_sandbox/stats").json()
    assert stats["submits"] == 2 and stats["charges"] == 3 and stats["auth_failures"] == 0
    manifest = state.result()
    assert manifest["totals"]["images"] == 3 and manifest["totals"]["approved"] == 3
    again = run_spec(tmp_path, text, date(2026, 11, 5))  # a rerun pays nothing
    assert again.is_completed() and httpx.get(f"{toy.url('toy')}/_sandbox/stats").json()["charges"] == 3
    assert any(row["name"] == "imagegen:toy:toy-sandbox:jobs:job" for row in show_limits())
    dry = run_pipeline(spec=str(spec), run_date=date(2026, 11, 6), dry_run=True, return_state=True)
    with get_client(sync_client=True) as client:
        names = [client.read_flow_run(s.state_details.flow_run_id).name for s in (state, dry)]
    assert names == ["toy-products-2026-11-05", "toy-products-2026-11-06-dry-run"]  # not imperious-poodle


def test_sandbox_up_refuses_a_taken_port_and_names_its_holder(tmp_path) -> None:
    import os
    import socket
    import subprocess
    import sys

    from sandbox import launcher

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        # --free-ports for the others: only the held port decides, whatever holds the default ones.
        out = subprocess.run([sys.executable, "-m", "flows.cli", "sandbox", "up", "--state-dir", str(tmp_path),
                              "--no-register", "--free-ports", "--port", f"tams={port}"], capture_output=True,
                             text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"port {port} for the tams sandbox is taken by pid {os.getpid()}" in out.stderr
    assert "--port tams=PORT" in out.stderr
    assert launcher.SandboxState.load(tmp_path) is None  # nothing was started
