"""TAMS emulator: the `/v1` API of Tensor.Art's model service, on loopback.

Faithful to `docs/providers/tams.md` where the notes are confirmed, and documented where
they assume: RSA signatures verified against the app's public key (or a Bearer token), 5
requests a second per app (HTTP 429 with a gRPC status body and Retry-After), int64 fields as
strings, camelCase or snake_case keys, idempotent `requestId`, jobs walking CREATED ->
WAITING -> RUNNING -> SUCCESS|FAILED over a configurable latency, credits charged only when a
job succeeds, expiring result URLs, and a presigned PUT for uploads.

The credit formula of the real service is not published; this one is ours and fake:
one credit per 512x512 image at 20 steps, scaled by pixels and steps, plus the hires pass.
A prompt containing ``[[fail]]`` makes the job fail, for tests.

Test hooks (no auth, not part of TAMS): ``GET /_sandbox/stats`` (with ``rate_refusals``: the
last requests refused over 5 QPS, each with the requests of the second before it);
``POST /_sandbox/config``
(``latency``, ``balance``); ``POST /_sandbox/faults`` with ``{"kind", "count", "method",
"path", "exact", "delay"}`` queues faults for the next matching API requests (``path`` a prefix,
or the whole path with ``"exact": true``), ``DELETE`` clears them:

- ``rate_limit``: HTTP 429, gRPC 8, ``Retry-After: 1``;
- ``http_500``: HTTP 503, gRPC 14 UNAVAILABLE;
- ``slow``: the request is handled only after ``delay`` seconds (beyond a client timeout,
  a submit then succeeds although the client saw a timeout);
- ``drop``: the request is handled, then the connection is cut mid-response;
- ``job_fail``: the next created job ends FAILED;
- ``callback_lost``, ``callback_late``, ``callback_duplicate``, ``callback_forged``: the next
  notification (see `sandbox.callbacks`).

A job created with ``notifyUrl`` is POSTed there when it ends. TAMS documents the field but not
the payload or the retries: assumed here, the GET's ``{"job": {...}}`` body, retried as 触站AI
documents (5 attempts, +5 s steps; ``callback_step`` in the config), public URLs only except in
sandbox mode (``sandbox_callbacks``).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import itertools
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox.base import Emulator, end_sooner

from sandbox.accounts import new_token, read_secret, secret_file
from sandbox.callbacks import KINDS as CALLBACK_FAULTS
from sandbox.callbacks import CallbackSender
from sandbox.faults import DroppedResponse, fault_hook
from sandbox.images import render_png
from sandbox.limits import SlidingWindow
from sandbox.paid import PaidLog
from sandbox.urls import SignedUrls

QPS = 5
CLOCK_SKEW = 300
RESULT_TTL = 3600
MIN_PIXELS, MAX_PIXELS, MAX_SIDE = 262_144, 2_073_600, 1536
AUTH_RE = re.compile(r"^TAMS-SHA256-RSA app_id=([^,]+),nonce_str=([^,]+),timestamp=(\d+),signature=(\S+)$")


def credits_for(stages: list[dict[str, Any]]) -> float:
    """The sandbox's (fake, documented) credit formula for a staged job."""
    by_type = {s.get("type"): s for s in stages}
    init = by_type.get("INPUT_INITIALIZE", {}).get("inputInitialize", {})
    diffusion = by_type.get("DIFFUSION", {}).get("diffusion", {})
    count = int(init.get("count") or 1)
    w, h = int(diffusion.get("width") or 512), int(diffusion.get("height") or 512)
    steps = int(diffusion.get("steps") or 20)
    per_image = w * h * steps / (512 * 512 * 20)
    hires = by_type.get("IMAGE_TO_UPSCALER", {}).get("imageToUpscaler")
    if hires:
        scale = float(hires.get("hrScale") or 1)
        per_image += w * h * scale * scale * int(hires.get("hrSecondPassSteps") or 10) / (1024 * 1024 * 20)
    return round(count * per_image, 2)


def camel(data: Any) -> Any:
    """Accept snake_case keys as the gateway does: turn them into lowerCamelCase."""
    if isinstance(data, dict):
        return {re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), str(k)): camel(v) for k, v in data.items()}
    if isinstance(data, list):
        return [camel(v) for v in data]
    return data


class ApiError(Exception):
    def __init__(self, http: int, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.http, self.code, self.message, self.headers = http, code, message, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"code": self.code, "message": self.message, "details": []},
                            status_code=self.http, headers=self.headers)


@dataclass
class Job:
    id: str
    app_id: str
    request_id: str
    stages: list[dict[str, Any]]
    created: float
    credits: float
    fail_reason: str | None
    canceled: bool = False
    charged: bool = False
    duration: float = 0.0  # seconds it runs: the latency when it was made (see `end_sooner`)


@dataclass
class TamsState:
    """Everything the emulator remembers; one lock guards it."""

    latency: float
    apps: dict[str, Any]                      # app_id -> RSA public key
    token: str | None
    balance: dict[str, float]
    jobs: dict[str, Job] = field(default_factory=dict)
    by_request: dict[tuple[str, str], str] = field(default_factory=dict)
    uploads: dict[str, bytes | None] = field(default_factory=dict)
    upload_tokens: dict[str, str] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: {
        "requests": 0, "auth_failures": 0, "submits": 0, "duplicate_submits": 0,
        "charges": 0, "polls": 0, "estimates": 0, "uploads": 0, "failed_jobs": 0, "injected_faults": 0})
    faults: list[dict[str, Any]] = field(default_factory=list)
    paid: PaidLog = field(default_factory=PaidLog)
    charged_credits: float = 0.0
    window: SlidingWindow = field(default_factory=lambda: SlidingWindow(QPS))
    lock: threading.Lock = field(default_factory=threading.Lock)
    # 64-bit job ids, unique across restarts (the jobs kept from before one keep theirs)
    ids: itertools.count = field(default_factory=lambda: itertools.count(700_000_000_000_000_000 + time.time_ns() // 1000))
    results: SignedUrls = field(default_factory=lambda: SignedUrls(RESULT_TTL, "Expires", "Signature"))


class TamsEmulator(Emulator):
    """The Starlette app and its state."""

    KEPT = ("jobs", "by_request", "uploads", "upload_tokens", "balance", "paid", "charged_credits", "counters", "results")

    def __init__(self, public_keys: dict[str, bytes], *, latency: float = 2.0,
                 token: str | None = None, balance: float = 100_000.0, sandbox_callbacks: bool = False) -> None:
        apps = {app: serialization.load_pem_public_key(pem) for app, pem in public_keys.items()}
        self.state = TamsState(latency=latency, apps=apps, token=token,
                               balance={app: balance for app in apps})
        self.callbacks = CallbackSender(sandbox=sandbox_callbacks)
        self.app = self.build_app()

    def provider_routes(self) -> list[Route]:
        return [
            Route("/v1/resource/image", self.create_resource, methods=["POST"]),
            Route("/v1/jobs/credits", self.credits, methods=["POST"]),
            Route("/v1/jobs", self.create_job, methods=["POST"]),
            Route("/v1/jobs/{job_id}", self.get_job, methods=["GET"]),
            Route("/v1/jobs/{job_id}", self.cancel_job, methods=["DELETE"]),
            Route("/_storage/{resource_id}", self.put_resource, methods=["PUT"]),
            Route("/_results/{job_id}/{index:int}.png", self.result_image, methods=["GET"]),
        ]

    # --- authentication and limits -----------------------------------------------------------
    async def _authorize(self, request: Request) -> tuple[str, bytes]:
        """Verify the signature (or token) and the 5 QPS limit; return app id and raw body."""
        body = await request.body()
        st = self.state
        with st.lock:
            st.counters["requests"] += 1
        header = request.headers.get("authorization", "")
        app_id = self._verify(request, header, body)
        if app_id is None:
            with st.lock:
                st.counters["auth_failures"] += 1
            raise ApiError(401, 16, "unauthorized")
        if not st.window.allow(app_id, f"{request.method} {request.url.path}"):
            wait = max(1, round(st.window.retry_after(app_id) + 0.5))
            raise ApiError(429, 8, f"rate limit exceeded: {QPS} requests per second",
                           {"Retry-After": str(wait)})
        fault = self._take_fault(request.method, request.url.path, ("rate_limit", "http_500", "slow", "drop"))
        if fault is not None:
            if fault["kind"] == "rate_limit":
                raise ApiError(429, 8, "rate limit exceeded (injected)", {"Retry-After": "1"})
            if fault["kind"] == "http_500":
                raise ApiError(503, 14, "service unavailable (injected)")
            if fault["kind"] == "slow":
                await asyncio.sleep(float(fault.get("delay", 5)))
            if fault["kind"] == "drop":
                request.state.drop = True
        return app_id, body

    def _take_fault(self, method: str, path: str, kinds: tuple[str, ...]) -> dict[str, Any] | None:
        st = self.state
        with st.lock:
            for fault in st.faults:
                if fault["kind"] in kinds and fault["count"] > 0 \
                        and fault.get("method", method).upper() == method.upper() \
                        and (path == fault["path"] if fault.get("exact") else path.startswith(fault.get("path", ""))):
                    fault["count"] -= 1
                    st.counters["injected_faults"] += 1
                    return fault
        return None

    def _verify(self, request: Request, header: str, body: bytes) -> str | None:
        st = self.state
        if header.startswith("Bearer "):
            ok = st.token is not None and hmac.compare_digest(header[7:], st.token)
            return next(iter(st.apps)) if ok else None
        match = AUTH_RE.match(header)
        if not match:
            return None
        app_id, nonce, timestamp, signature = match.groups()
        key = st.apps.get(app_id)
        if key is None or abs(time.time() - int(timestamp)) > CLOCK_SKEW:
            return None
        path = request.scope["raw_path"].decode("ascii")
        if request.url.query:
            path += "?" + request.url.query
        message = f"{request.method}\n{path}\n{timestamp}\n{nonce}\n".encode() + body
        try:
            key.verify(base64.b64decode(signature, validate=True), message, padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError):
            return None
        return app_id

    async def _json(self, request: Request) -> tuple[str, dict[str, Any]]:
        import json

        app_id, body = await self._authorize(request)
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise ApiError(400, 3, "body is not JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, 3, "body must be an object")
        return app_id, camel(data)

    @staticmethod
    def _handle(fn):  # noqa: ANN001, ANN205
        async def wrapper(self: "TamsEmulator", request: Request) -> Response:
            try:
                response = await fn(self, request)
            except ApiError as exc:
                return exc.response()
            return DroppedResponse() if getattr(request.state, "drop", False) else response
        return wrapper

    # --- validation ----------------------------------------------------------------------------
    def _validate(self, stages: Any, app_id: str) -> None:
        if not isinstance(stages, list) or not stages:
            raise ApiError(400, 3, "stages: required")
        by_type = {s.get("type"): s for s in stages if isinstance(s, dict)}
        diffusion = by_type.get("DIFFUSION", {}).get("diffusion")
        if diffusion is None:
            raise ApiError(400, 3, "stages: a DIFFUSION stage is required")
        for name in ("sampler", "sdVae"):
            if not diffusion.get(name):
                raise ApiError(400, 3, f"diffusion.{name}: required")
        try:
            w, h = int(diffusion.get("width")), int(diffusion.get("height"))
            steps = int(diffusion.get("steps") or 0)
        except (TypeError, ValueError):
            raise ApiError(400, 3, "diffusion.width/height/steps: must be integers") from None
        if w % 64 or h % 64 or max(w, h) > MAX_SIDE or not MIN_PIXELS <= w * h <= MAX_PIXELS:
            raise ApiError(400, 3, f"diffusion: size {w}x{h} not allowed")
        if steps and not 10 <= steps <= 50:
            raise ApiError(400, 3, "diffusion.steps: must be within 10..50")
        if float(diffusion.get("cfgScale") or 7) > 35:
            raise ApiError(400, 3, "diffusion.cfgScale: must be at most 35")
        if not [p for p in diffusion.get("prompts") or [] if str(p.get("text", "")).strip()]:
            raise ApiError(400, 3, "diffusion.prompts: required")
        init = by_type.get("INPUT_INITIALIZE", {}).get("inputInitialize", {})
        if not 1 <= int(init.get("count") or 1) <= 4:
            raise ApiError(400, 3, "inputInitialize.count: must be within 1..4")
        if int(init.get("seed") or 0) > 4294967295:
            raise ApiError(400, 3, "inputInitialize.seed: too large")
        resource = init.get("imageResourceId")
        if resource is not None and self.state.uploads.get(str(resource)) is None:
            raise ApiError(400, 3, f"inputInitialize.imageResourceId: resource {resource} not found")
        hires = by_type.get("IMAGE_TO_UPSCALER", {}).get("imageToUpscaler")
        if hires is not None:
            for name in ("hrUpscaler", "hrSecondPassSteps", "denoisingStrength"):
                if hires.get(name) in (None, ""):
                    raise ApiError(400, 3, f"imageToUpscaler.{name}: required")
            scale = float(hires.get("hrScale") or 1)
            if not MIN_PIXELS <= w * h * scale * scale <= MAX_PIXELS:
                raise ApiError(400, 3, f"imageToUpscaler: target {int(w * scale)}x{int(h * scale)} too large")

    # --- endpoints -------------------------------------------------------------------------------
    @_handle
    async def create_resource(self, request: Request) -> Response:
        await self._json(request)
        st = self.state
        with st.lock:
            resource_id = str(next(st.ids))
            token = secrets.token_hex(16)
            st.uploads[resource_id] = None
            st.upload_tokens[resource_id] = token
        base = str(request.base_url).rstrip("/")
        return JSONResponse({
            "resourceId": resource_id,
            "putUrl": f"{base}/_storage/{resource_id}?Expires={int(time.time()) + 3600}",
            "headers": {"Content-Type": "application/octet-stream", "x-sandbox-upload-token": token},
        })

    async def put_resource(self, request: Request) -> Response:
        resource_id = request.path_params["resource_id"]
        st = self.state
        expected = st.upload_tokens.get(resource_id)
        if expected is None or request.headers.get("x-sandbox-upload-token") != expected \
                or request.headers.get("content-type") != "application/octet-stream":
            return Response("<Error><Code>AccessDenied</Code></Error>", status_code=403)
        data = await request.body()
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
        except Exception:
            return Response("<Error><Code>InvalidImage</Code></Error>", status_code=400)
        with st.lock:
            st.uploads[resource_id] = data
            st.counters["uploads"] += 1
        return JSONResponse({"Status": "OK"})

    @_handle
    async def credits(self, request: Request) -> Response:
        _, data = await self._json(request)
        self._validate(data.get("stages"), "")
        with self.state.lock:
            self.state.counters["estimates"] += 1
        return JSONResponse({"credits": credits_for(data["stages"])})

    @_handle
    async def create_job(self, request: Request) -> Response:
        app_id, data = await self._json(request)
        request_id = str(data.get("requestId") or "")
        if not request_id:
            raise ApiError(400, 3, "requestId: required")
        st = self.state
        with st.lock:
            existing = st.by_request.get((app_id, request_id))
            if existing is not None:
                st.counters["duplicate_submits"] += 1
                return JSONResponse({"job": self._job_info(st.jobs[existing], request)})
        self._validate(data.get("stages"), app_id)
        notify = str(data.get("notifyUrl") or "")
        if notify and self.callbacks.refuses(notify):
            raise ApiError(400, 3, "notifyUrl: must be a public URL")  # [A] as 触站AI refuses LAN targets
        stages = data["stages"]
        cost = credits_for(stages)
        prompt = " ".join(str(p.get("text", "")) for s in stages if s.get("type") == "DIFFUSION"
                          for p in s["diffusion"].get("prompts", []))
        with st.lock:
            if st.balance[app_id] < cost:
                raise ApiError(400, 9, f"insufficient credits: balance {st.balance[app_id]}, need {cost}")
            fail = "generation failed: [[fail]] marker in prompt" if "[[fail]]" in prompt else None
        if fail is None and self._take_fault("POST", "/v1/jobs", ("job_fail",)) is not None:
            fail = "generation failed: out of GPU memory (injected)"
        with st.lock:
            existing = st.by_request.get((app_id, request_id))
            if existing is not None:  # a concurrent submit of the same requestId got here first
                st.counters["duplicate_submits"] += 1
                return JSONResponse({"job": self._job_info(st.jobs[existing], request)})
            job = Job(id=str(next(st.ids)), app_id=app_id, request_id=request_id, stages=stages,
                      created=time.monotonic(), credits=cost, fail_reason=fail, duration=st.latency)
            st.jobs[job.id] = job
            st.by_request[(app_id, request_id)] = job.id
            st.counters["submits"] += 1
            answer = {"job": self._job_info(job, request)}
        if notify:
            self.callbacks.schedule(notify, lambda: self._notification(job, request), after=st.latency + 0.01)
        return JSONResponse(answer)

    def _notification(self, job: Job, request: Request) -> dict[str, Any]:
        """What is POSTed to notifyUrl when the job ends [A]: the GET's body."""
        with self.state.lock:
            return {"job": self._job_info(job, request)}

    @_handle
    async def get_job(self, request: Request) -> Response:
        app_id, _ = await self._authorize(request)
        st = self.state
        with st.lock:
            st.counters["polls"] += 1
            job = st.jobs.get(request.path_params["job_id"])
            if job is None or job.app_id != app_id:
                raise ApiError(404, 5, "job not found")
            return JSONResponse({"job": self._job_info(job, request)})

    @_handle
    async def cancel_job(self, request: Request) -> Response:
        app_id, _ = await self._authorize(request)
        st = self.state
        with st.lock:
            job = st.jobs.get(request.path_params["job_id"])
            if job is None or job.app_id != app_id:
                raise ApiError(404, 5, "job not found")
            if self._status(job) not in ("SUCCESS", "FAILED"):
                job.canceled = True
            return JSONResponse({"jobId": job.id})

    async def result_image(self, request: Request) -> Response:
        job_id, index = request.path_params["job_id"], request.path_params["index"]
        st = self.state
        problem = st.results.check(request.url.path, request.query_params)
        if problem == "signature":
            return Response("<Error><Code>AccessDenied</Code></Error>", status_code=403)
        if problem == "expired":
            return Response("<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
                            status_code=403)
        job = st.jobs.get(job_id)
        if job is None:
            return Response(status_code=404)
        return Response(await asyncio.to_thread(self._render, job, index), media_type="image/png")

    async def config(self, request: Request) -> Response:
        data = await request.json()
        st = self.state
        with st.lock:
            if "latency" in data:
                st.latency = float(data["latency"])
                end_sooner(st.jobs.values(), st.latency)
            if "balance" in data:
                st.balance = {app: float(data["balance"]) for app in st.balance}
            self.callbacks.step = float(data.get("callback_step", self.callbacks.step))
            self.callbacks.sandbox = bool(data.get("sandbox_callbacks", self.callbacks.sandbox))
        return JSONResponse({"latency": st.latency, "balance": st.balance, "callback_step": self.callbacks.step,
                             "sandbox_callbacks": self.callbacks.sandbox})

    async def set_faults(self, request: Request) -> Response:
        def refuse(fault: dict[str, Any]) -> str | None:
            known = fault.get("kind") in ("rate_limit", "http_500", "slow", "drop", "job_fail") + CALLBACK_FAULTS
            return None if known else f"unknown fault kind {fault.get('kind')!r}"

        if request.method == "DELETE":
            await fault_hook(request, self.callbacks.lock, self.callbacks.faults, refuse)
        elif (await request.json()).get("kind") in CALLBACK_FAULTS:
            return await fault_hook(request, self.callbacks.lock, self.callbacks.faults, refuse)
        return await fault_hook(request, self.state.lock, self.state.faults, refuse)

    async def stats(self, request: Request) -> Response:
        st = self.state
        with st.lock:
            for job in st.jobs.values():
                self._status(job)  # settles charges of jobs that finished unobserved
            return JSONResponse({
                **st.counters, **st.paid.snapshot(),
                "rate_limited": st.window.rejected, "peak_requests_per_second": st.window.peak,
                "rate_refusals": list(st.window.refusals),
                "charged_credits": round(st.charged_credits, 2), "balance": st.balance,
                "callbacks": self.callbacks.snapshot(),
                "jobs": {j.id: {"requestId": j.request_id, "status": self._status(j), "credits": j.credits,
                                "charged": j.charged} for j in st.jobs.values()},
            })

    # --- job timeline ----------------------------------------------------------------------------
    def _status(self, job: Job) -> str:
        """The job's status now; charges it the first time it is seen succeeded (lock held)."""
        if job.canceled:
            return "CANCELED"
        elapsed = time.monotonic() - job.created
        latency = job.duration
        if elapsed < 0.1 * latency:
            return "CREATED"
        if elapsed < 0.4 * latency:
            return "WAITING"
        if elapsed < latency:
            return "RUNNING"
        if job.fail_reason:
            if not job.charged:  # failed jobs cost nothing; count them once
                job.charged = True
                self.state.counters["failed_jobs"] += 1
            return "FAILED"
        if not job.charged:
            job.charged = True
            self.state.balance[job.app_id] -= job.credits
            self.state.charged_credits += job.credits
            self.state.counters["charges"] += 1
            self.state.paid.charge(job.request_id, " ".join(
                str(p.get("text", "")) for st in job.stages if st.get("type") == "DIFFUSION"
                for p in st["diffusion"].get("prompts", [])))
        return "SUCCESS"

    def _job_info(self, job: Job, request: Request) -> dict[str, Any]:
        status = self._status(job)
        info: dict[str, Any] = {"id": job.id, "status": status}
        elapsed = time.monotonic() - job.created
        if status == "WAITING":
            info["waitingInfo"] = {"queueRank": str(max(1, int(3 * (1 - elapsed / job.duration)))), "queueLen": 3}
        elif status == "RUNNING":
            progress = int(100 * min(1.0, elapsed / job.duration))
            info["runningInfo"] = {"stages": [{"stageIndex": "1", "processingImages": [{"progress": progress}]}]}
        elif status == "SUCCESS":
            images = []
            for index in range(self._count(job)):
                url, expires = self.state.results.sign(str(request.base_url), f"/_results/{job.id}/{index}.png")
                images.append({"id": f"{job.id}{index}", "expiredIn": expires, "url": url})
            info["successInfo"] = {"images": images, "stages": []}
        elif status == "FAILED":
            info["failedInfo"] = {"reason": job.fail_reason, "stages": []}
        return info

    @staticmethod
    def _count(job: Job) -> int:
        for stage in job.stages:
            if stage.get("type") == "INPUT_INITIALIZE":
                return int(stage["inputInitialize"].get("count") or 1)
        return 1

    def _render(self, job: Job, index: int) -> bytes:
        by_type = {s.get("type"): s for s in job.stages}
        diffusion = by_type["DIFFUSION"]["diffusion"]
        init = by_type.get("INPUT_INITIALIZE", {}).get("inputInitialize", {})
        scale = float((by_type.get("IMAGE_TO_UPSCALER", {}).get("imageToUpscaler") or {}).get("hrScale") or 1)
        w, h = int(int(diffusion["width"]) * scale), int(int(diffusion["height"]) * scale)
        prompt = " ".join(str(p.get("text", "")) for p in diffusion.get("prompts", []))
        resource = init.get("imageResourceId")
        return render_png(prompt, int(init.get("seed") or 0), w, h, index,
                          self.state.uploads.get(str(resource)) if resource else None)


# --- sandbox hooks (see sandbox/accounts.py) ------------------------------------------------------
DEFAULT_PORT = 8700


def sandbox_account(state_dir: Path) -> dict[str, str]:
    """An app with a fresh 2048-bit RSA key pair and a token (both ways of authenticating)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "app_id": "sandbox-" + secrets.token_hex(4),
        "private_key_file": secret_file(state_dir, "tams_private_key.pem", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())),
        "public_key_file": secret_file(state_dir, "tams_public_key.pem", key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)),
        "token_file": secret_file(state_dir, "tams_token", new_token()),
    }


def make_app(account: dict[str, str], latency: float) -> Starlette:
    return TamsEmulator({account["app_id"]: Path(account["public_key_file"]).read_bytes()}, latency=latency,
                        token=read_secret(account, "token"), sandbox_callbacks=True).app


def block_fields(account: dict[str, str]) -> dict[str, Any]:
    return {"app_id": account["app_id"], "private_key": Path(account["private_key_file"]).read_text()}


def bench_counts(stats: dict[str, Any]) -> dict[str, int]:
    """Requests, text-to-image submits and polls, and limit violations, from `/_sandbox/stats`."""
    return {"requests": stats["requests"], "submits": stats["submits"], "polls": stats["polls"],
            "violations": stats["rate_limited"]}
