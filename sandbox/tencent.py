"""Tencent Cloud AI Art emulator: `POST /` routed by `X-TC-Action`, on loopback.

As in `docs/providers/tencent.md`: TC3-HMAC-SHA256 verified over the signed headers
and the raw body (unknown SecretId -> `AuthFailure.SecretIdNotFound`, wrong secret ->
`AuthFailure.SignatureFailure`, clock off by more than 5 minutes -> `AuthFailure.SignatureExpire`);
HTTP 200 for every answer, errors inside `Response.Error`; `X-TC-Version` must be 2022-12-29;
ImageToImage only in `ap-singapore`; 20 requests a second per action (`RequestLimitExceeded`);
jobs in flight per action and account, 3 for ImageToImage and 1 for the others
(`RequestLimitExceeded.JobNumExceed`); async text-to-image jobs with string status codes;
one charge per successful image; input base64 under 8 MB (ImageToImage) and 6 MB (RefineImage),
read strictly (`FailedOperation.ImageSizeExceed`).

The signature check and the parameter rules are this module's own, from the document (never
imported from the client, so a misreading in one cannot hide behind the other).

Markers for tests: ``[[nsfw]]`` in a prompt -> `OperationDenied.TextIllegalDetected`;
``[[fail]]`` -> the async job ends "4" with `FailedOperation.GenerateImageFailed`;
``[[fail:CODE]]`` -> it ends "4" with that `JobErrorCode` (the document's examples are
`ServerError` and `FailedOperation.DownloadError`). Hooks:
``GET /_sandbox/stats`` (counters, ``paid``: charges per request keyed by a fingerprint of
the paid fields, see `sandbox.paid`, and ``rate_refusals``: the last requests refused over an
action's rate, each with those of the second before it; ``job_refusals``: the last refused over
a concurrency, each with what was running), ``POST /_sandbox/config`` (latency), ``DELETE
/_sandbox/faults``, and ``POST /_sandbox/faults`` ``{"code" | "kind", "count", "action",
"after", "delay"}`` for the next matching calls:

- ``code``: answer that error code; with ``"after": true`` only once the action was carried
  out (the job created, a synchronous image made and charged), as an ambiguous answer looks;
- ``kind: "drop"`` (with ``after``): carried out, then the connection is cut mid-answer;
- ``kind: "http_502"`` (with ``after``): carried out, then a gateway error;
- ``kind: "slow"``: carried out, then answered ``delay`` s later;
- ``kind: "result_503"``: downloading a result URL the action gave answers 503;
- ``kind: "busy"``: a synchronous action (RefineImage, ImageToImage) takes ``delay`` s to run,
  in flight meanwhile (counted against its concurrency), as a slow one does.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import re
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox.base import Emulator, end_sooner

from sandbox.accounts import read_secret, secret_file
from sandbox.faults import DroppedResponse, fault_hook
from sandbox.images import render_png
from sandbox.limits import SlidingWindow
from sandbox.paid import PaidLog, fingerprint
from sandbox.urls import SignedUrls

RATE = 20
IN_FLIGHT = {"ImageToImage": 3, "SubmitTextToImageJob": 1, "RefineImage": 1}
AUTH_RE = re.compile(r"^TC3-HMAC-SHA256 Credential=([^/]+)/(\d{4}-\d{2}-\d{2})/aiart/tc3_request, "
                     r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})$")
STATUS_MSG = {"1": "排队中", "2": "处理中", "4": "处理失败", "5": "处理完成"}
I2I_RESOLUTIONS = ("origin", "768:768", "768:1024", "1024:768")  # ImageToImage ResultConfig.Resolution
IMAGE_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP"}  # jpg/jpeg (MPO is a camera JPEG)/png/bmp/tiff/webp
FIELDS = {  # each action's request fields on its API page; anything else is UnknownParameter
    "ImageToImage": {"InputImage", "InputUrl", "Prompt", "NegativePrompt", "Styles", "ResultConfig", "LogoAdd",
                     "LogoParam", "Strength", "RspImgType", "EnhanceImage", "RestoreFace"},
    "SubmitTextToImageJob": {"Prompt", "Images", "Resolution", "Seed", "LogoAdd", "LogoParam", "Revise"},
    "QueryTextToImageJob": {"JobId"},
    "RefineImage": {"InputImage", "InputUrl", "RspImgType"},
}
I2I_MAX_AREA = 2000 * 2000  # ImageResolutionExceed "> 2000x2000"
# "base64 < 8 MB" (ImageToImage), "base64 < 6 MB" (RefineImage): the pages do not say whether MB is
# 10^6 or 2^20 bytes, nor whether it is the base64 text or the image; the sandbox holds the strictest
# reading (the base64 text, 10^6), so a client that passes here passes under every reading.
I2I_MAX_B64, REFINE_MAX_B64 = 8 * 10**6, 6 * 10**6
MESSAGES = {  # the service's texts for the codes the sandbox answers on request (faults)
    "FailedOperation.GenerateImageFailed": "The generated image failed the review. Please try again.",
    "OperationDenied.TextIllegalDetected": "The text contains illegal content.",
    "OperationDenied.ImageIllegalDetected": "The image contains illegal content.",
}
CODE_RE = re.compile(r"^[A-Z][A-Za-z]*(\.[A-Za-z]+)*$")  # the shape of Tencent error codes
FAULT_KINDS = ("drop", "http_502", "slow", "result_503", "busy")
ASIDE = ("result_503", "busy")  # faults taken at their own moment, not before or after an action's run


def _refined(raw: bytes) -> bytes:
    """RefineImage's result: the image at 2048 pixels on its longer side, as PNG."""
    with Image.open(io.BytesIO(raw)) as image:
        w, h = image.size
        scale = 2048 / max(w, h)
        out = io.BytesIO()
        image.convert("RGB").resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS).save(
            out, format="PNG")
    return out.getvalue()


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tc3_expected(secret_key: str, *, method: str, path: str, query: str, headers: dict[str, str],
                 signed: list[str], body: bytes, timestamp: int, date: str, service: str = "aiart") -> str:
    """The TC3-HMAC-SHA256 signature a request must carry, computed as the signature document
    says: canonical request (method, URI, query, `name:value` lines of the signed headers,
    their names, the body's SHA-256), string to sign, key derived from date and service."""
    lines = "".join(f"{name}:{headers[name].strip()}\n" for name in signed)
    canonical = "\n".join([method, path, query, lines, ";".join(signed), _sha256_hex(body)])
    to_sign = f"TC3-HMAC-SHA256\n{timestamp}\n{date}/{service}/tc3_request\n{_sha256_hex(canonical.encode())}"
    key = ("TC3" + secret_key).encode()
    for part in (date, service, "tc3_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class ApiError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


FAIL_MARKER = re.compile(r"\[\[fail(?::([A-Za-z.]+))?\]\]")


def failure_code(prompt: str) -> str:
    """The `JobErrorCode` a text job of this prompt ends "4" with (its `[[fail]]` or
    `[[fail:CODE]]` marker), or "" for one that succeeds."""
    found = FAIL_MARKER.search(prompt)
    return "" if found is None else found.group(1) or "FailedOperation.GenerateImageFailed"


@dataclass
class TextJob:
    id: str
    prompt: str
    width: int
    height: int
    seed: int
    created: float
    fail: str  # the JobErrorCode it ends "4" with; "" for a job that succeeds
    key: str = ""
    charged: bool = False
    duration: float = 0.0  # seconds it runs: the latency when it was made (see `end_sooner`)


@dataclass
class TencentState:
    secrets: dict[str, str]
    latency: float
    jobs: dict[str, TextJob] = field(default_factory=dict)
    sync_in_flight: dict[str, int] = field(default_factory=dict)
    windows: dict[str, SlidingWindow] = field(default_factory=dict)
    results: dict[str, bytes] = field(default_factory=dict)
    result_actions: dict[str, str] = field(default_factory=dict)
    faults: list[dict[str, Any]] = field(default_factory=list)
    paid: PaidLog = field(default_factory=PaidLog)
    counters: dict[str, int] = field(default_factory=lambda: {
        "requests": 0, "auth_failures": 0, "submits": 0, "charges": 0, "rate_limited": 0,
        "job_num_exceeded": 0, "content_rejections": 0, "injected_faults": 0, "validation_errors": 0})
    by_action: dict[str, int] = field(default_factory=dict)
    peak_in_flight: dict[str, int] = field(default_factory=dict)
    job_refusals: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=5))
    lock: threading.Lock = field(default_factory=threading.Lock)
    urls: SignedUrls = field(default_factory=lambda: SignedUrls(3600))  # result URLs live an hour


class TencentEmulator(Emulator):
    """The Starlette app and its state."""

    KEPT = ("jobs", "results", "result_actions", "paid", "counters", "by_action", "urls")

    def __init__(self, credentials: dict[str, str], *, latency: float = 2.0) -> None:
        self.state = TencentState(secrets=dict(credentials), latency=latency)
        self.app = self.build_app()

    def provider_routes(self) -> list[Route]:
        return [
            Route("/", self.dispatch, methods=["POST"]),
            Route("/_results/{rid}.png", self.result_image, methods=["GET"]),
        ]

    # --- envelope, auth and limits ---------------------------------------------------------------
    async def dispatch(self, request: Request) -> Response:
        request_id = str(uuid.uuid4())
        st = self.state
        body = await request.body()
        action = request.headers.get("x-tc-action", "")
        try:
            with st.lock:
                st.counters["requests"] += 1
                st.by_action[action] = st.by_action.get(action, 0) + 1
            secret_id = self._verify(request, body)
            if request.headers.get("x-tc-version") != "2022-12-29":
                raise ApiError("NoSuchVersion", "The API version does not exist.")
            region = request.headers.get("x-tc-region")
            if not region:
                raise ApiError("MissingParameter", "The request is missing a required parameter `Region`.")
            handler = {"ImageToImage": self.image_to_image, "SubmitTextToImageJob": self.submit_job,
                       "QueryTextToImageJob": self.query_job, "RefineImage": self.refine}.get(action)
            if handler is None:
                raise ApiError("InvalidAction", f"The action `{action}` does not exist.")
            if action == "ImageToImage" and region != "ap-singapore":
                raise ApiError("UnsupportedRegion", "ImageToImage is only available in ap-singapore.")
            window = st.windows.setdefault(f"{secret_id}/{action}", SlidingWindow(RATE))
            if not window.allow(secret_id, action):
                with st.lock:
                    st.counters["rate_limited"] += 1
                raise ApiError("RequestLimitExceeded", "The number of requests exceeds the frequency limit.")
            before = self._take_fault(action, after=False)
            if before is not None:
                raise ApiError(before["code"], MESSAGES.get(before["code"], f"injected fault {before['code']}"))
            try:
                params = json.loads(body or b"{}")
            except ValueError:
                raise ApiError("InvalidParameter", "The body is not JSON.") from None
            unknown = sorted(set(params) - FIELDS[action]) if isinstance(params, dict) else []
            if unknown:
                raise ApiError("UnknownParameter", f"The parameter `{unknown[0]}` is not recognized.")
            self._logo(params)
            result = await handler(params, request)
            after = self._take_fault(action, after=True)  # the action was carried out
            if after is not None:
                if after.get("code"):
                    raise ApiError(after["code"], MESSAGES.get(after["code"], f"injected fault {after['code']}")
                                   + " (after the action ran)")
                if after["kind"] == "drop":
                    return DroppedResponse()
                if after["kind"] == "http_502":
                    return Response("bad gateway", status_code=502)
                await asyncio.sleep(float(after.get("delay", 5)))
        except ApiError as exc:
            with st.lock:
                if exc.code.startswith("AuthFailure"):
                    st.counters["auth_failures"] += 1
                if exc.code.startswith(("OperationDenied", "FailedOperation.GenerateImageFailed")):
                    st.counters["content_rejections"] += 1
                if exc.code.startswith("InvalidParameter"):
                    st.counters["validation_errors"] += 1
            return JSONResponse({"Response": {"Error": {"Code": exc.code, "Message": exc.message},
                                              "RequestId": request_id}})
        return JSONResponse({"Response": {**result, "RequestId": request_id}})

    def _verify(self, request: Request, body: bytes) -> str:
        match = AUTH_RE.match(request.headers.get("authorization", ""))
        if not match:
            raise ApiError("AuthFailure.InvalidAuthorization", "The Authorization header is malformed.")
        secret_id, date, signed, signature = match.groups()
        if secret_id not in self.state.secrets:
            raise ApiError("AuthFailure.SecretIdNotFound", "The SecretId is not found.")
        try:
            timestamp = int(request.headers.get("x-tc-timestamp", ""))
        except ValueError:
            raise ApiError("AuthFailure.InvalidAuthorization", "X-TC-Timestamp is missing.") from None
        if abs(time.time() - timestamp) > 300:
            raise ApiError("AuthFailure.SignatureExpire", "The signature expired (timestamp off by over 5 minutes).")
        if datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d") != date:
            raise ApiError("AuthFailure.SignatureFailure", "The credential date is not the timestamp's UTC date.")
        names = signed.split(";")
        headers = {name: request.headers.get(name, "") for name in names}
        expected = tc3_expected(self.state.secrets[secret_id], method=request.method,
                                path=request.scope["raw_path"].decode() or "/", query=request.url.query,
                                headers=headers, signed=names, body=body, timestamp=timestamp, date=date)
        if not hmac.compare_digest(expected, signature):
            raise ApiError("AuthFailure.SignatureFailure", "The provided credentials could not be validated.")
        return secret_id

    def _take_fault(self, action: str, after: bool, kind: str | None = None) -> dict[str, Any] | None:
        """The next queued fault for `action` that fires before (or after) the action runs;
        `kind` asks for one of the `ASIDE` faults of `action` instead."""
        st = self.state
        with st.lock:
            for fault in st.faults:
                if fault["count"] > 0 and fault.get("action", action) == action \
                        and (fault.get("kind") if fault.get("kind") in ASIDE else None) == kind \
                        and bool(fault.get("after") or fault.get("kind") == "slow") == after:
                    fault["count"] -= 1
                    st.counters["injected_faults"] += 1
                    return fault
        return None

    def _enter(self, action: str, what: str = "") -> None:
        st = self.state
        with st.lock:
            running = st.sync_in_flight.get(action, 0)
            if action == "SubmitTextToImageJob":
                running = sum(self._status(j) in ("1", "2") for j in st.jobs.values())
            if running >= IN_FLIGHT[action]:
                st.counters["job_num_exceeded"] += 1
                st.job_refusals.append({"refused": f"{action} {what}".strip(), "running": self._running_jobs(action)})
                raise ApiError("RequestLimitExceeded.JobNumExceed", "The number of concurrent jobs exceeds the limit.")
            st.peak_in_flight[action] = max(st.peak_in_flight.get(action, 0), running + 1)
            if action != "SubmitTextToImageJob":
                st.sync_in_flight[action] = running + 1

    def _running_jobs(self, action: str) -> list[str]:
        """What runs against `action`'s concurrency, for a refusal's record: text jobs by prompt
        and age, else how many synchronous calls are in flight."""
        if action != "SubmitTextToImageJob":
            return [f"{self.state.sync_in_flight.get(action, 0)} {action} call(s) in flight"]
        now = time.monotonic()
        return [f"{j.prompt!r} ({now - j.created:.1f} s old)" for j in self.state.jobs.values()
                if self._status(j) in ("1", "2")]

    async def _running(self, action: str) -> None:
        """The time a synchronous action takes, in flight: half the latency, or a `busy` fault's delay."""
        busy = self._take_fault(action, after=False, kind="busy")
        await asyncio.sleep(float(busy.get("delay", 5)) if busy else self.state.latency / 2)

    def _leave(self, action: str) -> None:
        with self.state.lock:
            self.state.sync_in_flight[action] -= 1

    # --- validation and images -------------------------------------------------------------------
    @staticmethod
    def _logo(params: dict[str, Any]) -> None:
        """LogoParam is {LogoUrl or LogoImage, LogoRect{X, Y, Width, Height}} (LogoParamErr otherwise)."""
        logo = params.get("LogoParam")
        if logo is None:
            return
        rect = logo.get("LogoRect") if isinstance(logo, dict) else None
        ok = (isinstance(logo, dict) and set(logo) <= {"LogoUrl", "LogoImage", "LogoRect"}
              and bool(logo.get("LogoUrl") or logo.get("LogoImage"))
              and (rect is None or (isinstance(rect, dict) and set(rect) <= {"X", "Y", "Width", "Height"}
                                    and all(type(v) is int and v >= 0 for v in rect.values()))))
        if not ok:
            raise ApiError("InvalidParameterValue.LogoParamErr", "LogoParam is malformed.")

    @staticmethod
    def _text(params: dict[str, Any], name: str, limit: int, required: bool = False) -> str:
        value = params.get(name)
        if value is None:
            if required:
                raise ApiError("InvalidParameterValue.ParameterValueError", f"{name} is required.")
            return ""
        if len(str(value)) > limit:
            raise ApiError("InvalidParameterValue.TextLengthExceed", f"{name} is longer than {limit} characters.")
        if "[[nsfw]]" in str(value):
            raise ApiError("OperationDenied.TextIllegalDetected", "The text contains illegal content.")
        return str(value)

    @staticmethod
    async def _image(params: dict[str, Any], max_b64: int) -> bytes:
        if params.get("InputUrl"):  # the URL wins over InputImage, as on the real service
            try:
                async with httpx.AsyncClient(timeout=10) as client:
                    response = await client.get(params["InputUrl"])
                response.raise_for_status()
            except httpx.HTTPError:
                raise ApiError("FailedOperation.ImageDownloadError", "The image could not be downloaded.") from None
            params = {"InputImage": base64.b64encode(response.content).decode()}
        data = params.get("InputImage")
        if not data:
            raise ApiError("InvalidParameterValue.ImageEmpty", "InputImage or InputUrl is required.")
        if len(data) >= max_b64:
            raise ApiError("FailedOperation.ImageSizeExceed", f"The image's base64 is {len(data)} bytes, "
                           f"not under {max_b64}.")
        try:  # off the event loop: up to 8 MB of base64 would hold every other request up
            raw, fmt, (w, h) = await asyncio.to_thread(TencentEmulator._decode, data)
        except Exception:
            raise ApiError("FailedOperation.ImageDecodeFailed", "The image could not be decoded.") from None
        if fmt not in IMAGE_FORMATS:
            raise ApiError("FailedOperation.ImageDecodeFailed", f"Format {fmt} is not supported.")
        if not (50 < w < 5000 and 50 < h < 5000):
            raise ApiError("FailedOperation.ImageResolutionExceed", "Each side must be between 50 and 5000 pixels.")
        return raw

    @staticmethod
    def _decode(data: str) -> tuple[bytes, str | None, tuple[int, int]]:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            return raw, image.format, image.size

    def _answer_image(self, data: bytes, params: dict[str, Any], request: Request, action: str) -> str:
        if params.get("RspImgType", "base64") != "url":
            return base64.b64encode(data).decode()
        rid = uuid.uuid4().hex
        with self.state.lock:
            self.state.results[rid] = data
            self.state.result_actions[rid] = action
        return self.state.urls.sign(str(request.base_url), f"/_results/{rid}.png")[0]

    def _charge(self, key: str, label: str) -> None:
        self.state.counters["charges"] += 1  # one successful image (lock held)
        self.state.paid.charge(key, label)

    # --- actions ---------------------------------------------------------------------------------
    async def image_to_image(self, params: dict[str, Any], request: Request) -> dict[str, Any]:
        prompt = self._text(params, "Prompt", 256)
        self._text(params, "NegativePrompt", 256)
        styles = [str(s) for s in params.get("Styles") or ["201"]]
        if any(s.startswith("1") for s in styles) and len(styles) > 1:
            raise ApiError("InvalidParameterValue.StyleConflict", "1xx styles cannot be combined with others.")
        resolution = (params.get("ResultConfig") or {}).get("Resolution", "origin")
        if resolution not in I2I_RESOLUTIONS:
            raise ApiError("InvalidParameterValue.ParameterValueError", f"Resolution {resolution} is not supported.")
        strength = params.get("Strength")
        if strength is not None and not 0 < float(strength) <= 1:
            raise ApiError("InvalidParameterValue.ParameterValueError", "Strength must be in (0, 1].")
        if not 0 <= int(params.get("RestoreFace") or 0) <= 6:
            raise ApiError("InvalidParameterValue.ParameterValueError", "RestoreFace must be 0..6.")
        if params.get("LogoAdd", 1) not in (0, 1):
            params["LogoAdd"] = 1  # other values mean 1
        if params.get("EnhanceImage", 0) not in (0, 1):
            raise ApiError("InvalidParameterValue.ParameterValueError", "EnhanceImage must be 0 or 1.")
        raw = await self._image(params, I2I_MAX_B64)
        with Image.open(io.BytesIO(raw)) as image:
            if image.width * image.height > I2I_MAX_AREA:
                raise ApiError("FailedOperation.ImageResolutionExceed", "The image is larger than 2000x2000.")
        self._enter("ImageToImage")
        try:
            await self._running("ImageToImage")
            with Image.open(io.BytesIO(raw)) as image:
                w, h = image.size
            if resolution == "origin":
                scale = min(1.0, 2000 / max(w, h))
                w, h = int(w * scale), int(h * scale)
            else:
                w, h = (int(x) for x in resolution.split(":"))
            data = await asyncio.to_thread(render_png, prompt, 0, w, h, 0, raw)
            with self.state.lock:
                self.state.counters["submits"] += 1
                self._charge(fingerprint("ImageToImage", prompt, styles, resolution, strength, _sha256_hex(raw)), prompt)
        finally:
            self._leave("ImageToImage")
        return {"ResultImage": self._answer_image(data, params, request, "ImageToImage")}

    async def submit_job(self, params: dict[str, Any], request: Request) -> dict[str, Any]:
        prompt = self._text(params, "Prompt", 1024, required=True)
        resolution = str(params.get("Resolution") or "1024:1024")
        try:
            w, h = (int(x) for x in resolution.split(":"))
        except ValueError:
            raise ApiError("InvalidParameterValue.ParameterValueError", "Resolution must be W:H.") from None
        if not (512 <= w <= 2048 and 512 <= h <= 2048 and w * h <= 1024 * 1024):
            raise ApiError("InvalidParameterValue.ParameterValueError", f"Resolution {resolution} is not supported.")
        seed = int(params.get("Seed") or 0)
        if seed and not 1 <= seed <= 4294967295:
            raise ApiError("InvalidParameterValue.ParameterValueError", "Seed must be 1..4294967295.")
        self._enter("SubmitTextToImageJob", repr(prompt))
        with self.state.lock:
            job = TextJob(id=f"{int(time.time())}{secrets.randbelow(10**9):09d}", prompt=prompt, width=w, height=h,
                          seed=seed, created=time.monotonic(), fail=failure_code(prompt), duration=self.state.latency,
                          key=fingerprint("SubmitTextToImageJob", prompt, resolution, seed, params.get("LogoAdd")))
            self.state.jobs[job.id] = job
            self.state.counters["submits"] += 1
        return {"JobId": job.id}

    async def query_job(self, params: dict[str, Any], request: Request) -> dict[str, Any]:
        with self.state.lock:
            job = self.state.jobs.get(str(params.get("JobId")))
            if job is None:
                raise ApiError("FailedOperation.JobNotExist", "The job does not exist.")
            status = self._status(job)
        answer: dict[str, Any] = {"JobStatusCode": status, "JobStatusMsg": STATUS_MSG[status], "JobErrorCode": "",
                                  "JobErrorMsg": "", "ResultImage": [], "ResultDetails": [], "RevisedPrompt": []}
        if status == "5":
            data = await asyncio.to_thread(render_png, job.prompt, job.seed, job.width, job.height)
            answer.update(ResultImage=[self._answer_image(data, {"RspImgType": "url"}, request, "QueryTextToImageJob")],
                          ResultDetails=["Success"], RevisedPrompt=[job.prompt])
        if status == "4":
            answer.update(JobErrorCode=job.fail, JobErrorMsg="处理失败")
        return answer

    async def refine(self, params: dict[str, Any], request: Request) -> dict[str, Any]:
        raw = await self._image(params, REFINE_MAX_B64)
        self._enter("RefineImage")
        try:
            await self._running("RefineImage")
            data = await asyncio.to_thread(_refined, raw)
            with self.state.lock:
                self._charge(fingerprint("RefineImage", _sha256_hex(raw)), f"RefineImage of {_sha256_hex(raw)[:16]}")
        finally:
            self._leave("RefineImage")
        return {"ResultImage": self._answer_image(data, params, request, "RefineImage")}

    def _status(self, job: TextJob) -> str:
        elapsed = time.monotonic() - job.created
        if elapsed < 0.3 * job.duration:
            return "1"
        if elapsed < job.duration:
            return "2"
        if job.fail:
            return "4"
        if not job.charged:
            job.charged = True
            self._charge(job.key, job.prompt)
        return "5"

    # --- hooks -----------------------------------------------------------------------------------
    async def result_image(self, request: Request) -> Response:
        if self.state.urls.check(request.url.path, request.query_params) is not None:
            return Response(status_code=403)
        rid = request.path_params["rid"]
        fault = self._take_fault(self.state.result_actions.get(rid, ""), after=False, kind="result_503")
        if fault is not None:
            return Response("busy", status_code=503)
        data = self.state.results.get(rid)
        return Response(data, media_type="image/png") if data else Response(status_code=404)

    async def config(self, request: Request) -> Response:
        data = await request.json()
        with self.state.lock:
            self.state.latency = float(data.get("latency", self.state.latency))
            end_sooner(self.state.jobs.values(), self.state.latency)
        return JSONResponse({"latency": self.state.latency})

    async def set_faults(self, request: Request) -> Response:
        def refuse(fault: dict[str, Any]) -> str | None:
            if fault.get("kind") in FAULT_KINDS:
                ok = fault["kind"] == "slow" or fault["kind"] in ASIDE or fault.get("after")
                return None if ok else f"{fault['kind']} needs after: true"
            return None if CODE_RE.match(str(fault.get("code") or "")) else f"not an error code: {fault.get('code')!r}"

        return await fault_hook(request, self.state.lock, self.state.faults, refuse)

    async def stats(self, request: Request) -> Response:
        st = self.state
        with st.lock:
            for job in st.jobs.values():
                self._status(job)
            return JSONResponse({**st.counters, **st.paid.snapshot(), "by_action": st.by_action,
                                 "jobs": {j.id: {"status": self._status(j), "prompt": j.prompt} for j in st.jobs.values()},
                                 "peak_in_flight": st.peak_in_flight,
                                 "peak_requests_per_second": max((w.peak for w in st.windows.values()), default=0),
                                 "rate_refusals": [r for w in st.windows.values() for r in w.refusals],
                                 "job_refusals": list(st.job_refusals)})


# --- sandbox hooks (see sandbox/accounts.py) ------------------------------------------------------
DEFAULT_PORT = 8703


def sandbox_account(state_dir: Path) -> dict[str, str]:
    return {"secret_id": "AKIDsandbox" + secrets.token_hex(8),
            "secret_key_file": secret_file(state_dir, "tencent_secret_key", secrets.token_urlsafe(24))}


def make_app(account: dict[str, str], latency: float) -> Starlette:
    return TencentEmulator({account["secret_id"]: read_secret(account, "secret_key")}, latency=latency).app


def block_fields(account: dict[str, str]) -> dict[str, Any]:
    return {"secret_id": account["secret_id"], "secret_key": read_secret(account, "secret_key")}


def bench_counts(stats: dict[str, Any]) -> dict[str, int]:
    """Requests, text-to-image submits and polls, and limit violations, from `/_sandbox/stats`."""
    by_action = stats.get("by_action", {})
    return {"requests": stats["requests"], "submits": by_action.get("SubmitTextToImageJob", 0),
            "polls": by_action.get("QueryTextToImageJob", 0),
            "violations": stats["rate_limited"] + stats["job_num_exceeded"]}
