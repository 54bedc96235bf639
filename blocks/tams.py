"""Tensor.Art TAMS (Tensor Art Model Service) provider Block.

Wire protocol as in `docs/providers/tams.md`: JSON over HTTPS under `/v1`, every request
signed `TAMS-SHA256-RSA` with the app's RSA private key, a two-step input upload (ask for a
`resourceId` and presigned `putUrl`, then PUT the bytes with the returned headers), staged
jobs (INPUT_INITIALIZE, DIFFUSION, IMAGE_TO_UPSCALER), polling, and `/v1/jobs/credits` for
estimates. Published limit: 5 requests per second per app, polls included.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Generator
from typing import Any, ClassVar

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydantic import Field, SecretStr, model_validator

from blocks.base import (CallbackFields, ApiCall, CreditEstimate, GenerationRequest, Heard, ImageProvider, JobState, JobStatus,
                         download, retry_after_seconds, status_error, with_retries)
from blocks.errors import AccountStop, BadRequest, ProviderError, SubmitUnknown, TransientError

PROVIDER = "tams"
USD_PER_CREDIT = 0.003
RESULT_HOSTS = ("tensor.art", "tensorart.cloud")  # [A] the provider's domains; its result CDN is not published
SAMPLERS = frozenset({
    "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE",
    "DPM++ 2M SDE", "DPM fast", "LMS Karras", "DPM2 Karras", "DPM2 a Karras", "DPM++ 2S a Karras",
    "DPM++ 2M Karras", "DPM++ SDE Karras", "DPM++ 2M SDE Karras",
})
MIN_PIXELS, MAX_PIXELS, MAX_SIDE = 262_144, 2_073_600, 1536
UPSCALER = "R-ESRGAN 4x+"

# gRPC status code -> our error type. Codes the gateway may return; 0 (OK) never is an error.
GRPC_ERRORS: dict[int, type[ProviderError]] = {
    1: TransientError,   # CANCELLED (by the server side)
    2: TransientError,   # UNKNOWN
    3: BadRequest,       # INVALID_ARGUMENT
    4: TransientError,   # DEADLINE_EXCEEDED
    5: BadRequest,       # NOT_FOUND
    6: BadRequest,       # ALREADY_EXISTS
    7: AccountStop,      # PERMISSION_DENIED
    8: TransientError,   # RESOURCE_EXHAUSTED (over 5 QPS)
    9: BadRequest,       # FAILED_PRECONDITION (AccountStop when about credits)
    10: TransientError,  # ABORTED
    11: BadRequest,      # OUT_OF_RANGE
    12: BadRequest,      # UNIMPLEMENTED
    13: TransientError,  # INTERNAL
    14: TransientError,  # UNAVAILABLE
    15: TransientError,  # DATA_LOSS
    16: AccountStop,     # UNAUTHENTICATED
}
HTTP_TO_GRPC = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 429: 8, 500: 13, 501: 12, 502: 14, 503: 14, 504: 4}
STATES = {
    "DEFAULT": JobState.QUEUED, "CREATED": JobState.QUEUED, "PENDING": JobState.QUEUED,
    "WAITING": JobState.QUEUED, "RUNNING": JobState.RUNNING, "SUCCESS": JobState.SUCCEEDED,
    "FAILED": JobState.FAILED, "CANCELED": JobState.CANCELED,
}


def load_private_key(pem: str) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
        raise AccountStop("private key must be an RSA key of at least 2048 bits", provider=PROVIDER)
    return key


def string_to_sign(method: str, path: str, timestamp: str, nonce: str, body: str) -> str:
    """`METHOD\\nPATH?QUERY\\nTIMESTAMP\\nNONCE\\nBODY`, no trailing newline."""
    return f"{method.upper()}\n{path}\n{timestamp}\n{nonce}\n{body}"


class BearerToken(httpx.Auth):
    """TAMS simple authentication: `Authorization: Bearer <token>` on every call (what the
    official ComfyUI nodes send); not offered on the China edition."""

    def __init__(self, token: SecretStr | None) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token.get_secret_value() if self._token else ''}"
        yield request


class TamsSigner(httpx.Auth):
    """Signs each request `TAMS-SHA256-RSA` (RSASSA-PKCS1-v1_5 over SHA-256, base64)."""

    requires_request_body = True

    def __init__(self, app_id: str, private_key: SecretStr,
                 clock: Callable[[], float] = time.time,
                 nonce: Callable[[], str] = lambda: uuid.uuid4().hex) -> None:
        self._app_id = app_id
        self._key = load_private_key(private_key.get_secret_value())
        self._clock = clock
        self._nonce = nonce

    def sign(self, method: str, path: str, body: str) -> str:
        """The Authorization header value for one request."""
        timestamp, nonce = str(int(self._clock())), self._nonce()
        message = string_to_sign(method, path, timestamp, nonce, body).encode("utf-8")
        signature = base64.b64encode(self._key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()
        return (f"TAMS-SHA256-RSA app_id={self._app_id},nonce_str={nonce},"
                f"timestamp={timestamp},signature={signature}")

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        path = request.url.raw_path.decode("ascii")
        request.headers["Authorization"] = self.sign(request.method, path, request.content.decode("utf-8"))
        yield request


def map_error(status_code: int, body: Any, retry_after: float | None = None) -> ProviderError:
    """Turn a non-200 answer into our error type, from the gRPC code in the body or the HTTP status."""
    code = body.get("code") if isinstance(body, dict) else None
    message = str(body.get("message") or "") if isinstance(body, dict) else ""
    if not isinstance(code, int) or code not in GRPC_ERRORS:
        code = HTTP_TO_GRPC.get(status_code, 13 if status_code >= 500 else 3)
    kind = GRPC_ERRORS[code]
    lowered = message.lower()
    if code in (7, 9) and ("credit" in lowered or "balance" in lowered):
        kind = AccountStop
    text = f"HTTP {status_code}: {message or 'no message'}"
    if kind is TransientError:
        return TransientError(text, provider=PROVIDER, code=str(code), retry_after=retry_after)
    return kind(text, provider=PROVIDER, code=str(code))


class TamsProvider(ImageProvider, CallbackFields):
    """Tensor.Art TAMS account: app id, RSA private key and endpoint.

    Example:
        ```python
        from blocks.tams import TamsProvider
        provider = TamsProvider.load("BLOCK_NAME")
        ```
    """

    result_domains: ClassVar[tuple[str, ...]] = RESULT_HOSTS

    _block_type_name = "TAMS Provider"
    _block_type_slug = "tams-provider"
    _documentation_url = "https://tams-docs.tensor.art/docs/api/guide/integration-faq"
    provider_name: ClassVar[str] = PROVIDER
    idempotent_submit: ClassVar[bool] = True  # the same requestId returns the same job
    spec_fields: ClassVar[dict[str, str]] = {  # the DIFFUSION stage fields `stages()` fills
        "width": "generate.width", "height": "generate.height", "prompts": "items.prompt",
        "negativePrompts": "items.negative_prompt", "sampler": "generate.sampler", "sdVae": "generate.vae",
        "steps": "generate.steps", "cfgScale": "generate.cfg_scale", "sdModel": "generate.model",
        "denoisingStrength": "generate.denoising_strength"}

    app_id: str = Field(description="The app id shown on the TAMS console.")
    private_key: SecretStr | None = Field(
        None, description="PEM of the app's RSA private key (2048 bits or more): standard (signed) authentication.")
    api_token: SecretStr | None = Field(
        None, description="The app's token: simple authentication (`Authorization: Bearer`). Give this or private_key.")
    endpoint: str = Field("https://ap-east-1.tensorart.cloud", description="The app's endpoint URL.")
    notify_url: str | None = Field(None, description=(
        "Public URL of `imagegen callbacks serve`: each job is then sent with a notifyUrl of its own there and "
        "polled only to confirm its end, which saves the 5-a-second request budget for submits."))

    @model_validator(mode="after")
    def _one_credential(self) -> TamsProvider:
        if (self.private_key is None) == (self.api_token is None):
            raise ValueError("give the TAMS Block exactly one of private_key (signed requests) or api_token (Bearer)")
        return self

    def client_options(self) -> dict[str, Any]:
        auth = TamsSigner(self.app_id, self.private_key) if self.private_key is not None else BearerToken(self.api_token)
        return {"base_url": self.endpoint.rstrip("/"), "timeout": self.timeout, "auth": auth,
                "headers": {"Accept": "application/json"}}

    # --- HTTP: the base sends; TAMS's answers and errors ----------------------------------------
    def api(self, method: str, path: str, payload: dict | None = None) -> ApiCall:
        """A TAMS request (5 QPS per app, every call counts, polls included). Every call is safe
        to repeat: a submit is deduplicated by its requestId."""
        return ApiCall("api", method, path) if payload is None else ApiCall.with_json("api", method, path, payload)

    def _call(self, method: str, path: str, payload: dict | None = None) -> dict:
        return self.send(self.api(method, path, payload))

    def read_answer(self, call: ApiCall, response: httpx.Response) -> Any:
        if response.status_code != 200:
            try:
                err_body = response.json()
            except ValueError:
                err_body = None
            error = map_error(response.status_code, err_body, retry_after_seconds(response))
            if error.code == "6" and call.method == "POST" and call.path == "/v1/jobs":
                # ALREADY_EXISTS on a submit: a job of this requestId exists (paid for), just not
                # returned as the document's idempotence suggests; never a refusal to send again
                raise SubmitUnknown(f"{call.what}: {error.message}: a job of this requestId already exists",
                                    provider=PROVIDER, code="6") from None
            raise error
        return self.json_answer(call, response)

    # --- the provider interface -------------------------------------------------------------
    @classmethod
    def validate(cls, request: GenerationRequest) -> None:
        def bad(field: str, why: str) -> BadRequest:
            return BadRequest(f"{field}: {why}", provider=PROVIDER, code="validation")

        w, h = request.width, request.height
        for field, value in (("width", w), ("height", h)):
            if value % 64 or value > MAX_SIDE:
                near = min(MAX_SIDE, max(64, round(value / 64) * 64))
                why = " and ".join(text for wrong, text in ((value % 64, "is not a multiple of 64"),
                                                             (value > MAX_SIDE, f"is above {MAX_SIDE}")) if wrong)
                raise bad(f"generate.{field}", f"{value} {why}; give a multiple of 64 up to {MAX_SIDE}, such as {near}")
        if not MIN_PIXELS <= w * h <= MAX_PIXELS:
            raise bad("generate.width/height", f"{w}x{h} = {w * h} pixels, allowed {MIN_PIXELS}..{MAX_PIXELS}")
        if request.steps is not None and not 10 <= request.steps <= 50:
            raise bad("generate.steps", f"{request.steps} is outside 10..50")
        if request.sampler is not None and request.sampler not in SAMPLERS:
            raise bad("generate.sampler", f"unknown sampler {request.sampler!r}")
        if request.cfg_scale is not None and request.cfg_scale > 35:
            raise bad("generate.cfg_scale", f"{request.cfg_scale} is above 35")
        if not 1 <= request.count <= 4:
            raise bad("items.count", f"{request.count} is outside 1..4 images per job")
        if not request.prompt.strip():
            raise bad("items.prompt", "empty prompt")
        if request.upscale_factor:
            uw, uh = request.output_size
            if not MIN_PIXELS <= uw * uh <= MAX_PIXELS:
                raise bad("upscale.factor", f"upscaled size {uw}x{uh} = {uw * uh} pixels is above "
                                            f"the provider cap of {MAX_PIXELS}")

    def estimate_key(self, request: GenerationRequest) -> str:
        """Credits depend on the stages' shape, not on prompt, seed or input image (assumed:
        TAMS does not publish its formula; `/v1/jobs/credits` prices stages)."""
        shape = request.model_dump(exclude={"request_id", "prompt", "negative_prompt", "seed", "input_ref",
                                            "callback_url"})
        return json.dumps(shape, sort_keys=True)

    def stages(self, request: GenerationRequest) -> list[dict[str, Any]]:
        """The job's stages in TAMS form."""
        init: dict[str, Any] = {"seed": str(request.seed), "count": request.count}
        if request.input_ref:
            init["imageResourceId"] = request.input_ref
        diffusion: dict[str, Any] = {
            "width": request.width, "height": request.height,
            "prompts": [{"text": request.prompt}],
            "negativePrompts": [{"text": request.negative_prompt}] if request.negative_prompt else [],
            "sampler": request.sampler or "Euler a",
            "sdVae": request.vae or "Automatic",
            "steps": request.steps or 20,
            "cfgScale": request.cfg_scale if request.cfg_scale is not None else 7,
        }
        if request.model:
            diffusion["sdModel"] = request.model
        if request.denoising_strength is not None:
            diffusion["denoisingStrength"] = request.denoising_strength
        diffusion.update(request.options)
        stages: list[dict[str, Any]] = [
            {"type": "INPUT_INITIALIZE", "inputInitialize": init},
            {"type": "DIFFUSION", "diffusion": diffusion},
        ]
        if request.upscale_factor:
            stages.append({"type": "IMAGE_TO_UPSCALER", "imageToUpscaler": {
                "hrUpscaler": UPSCALER, "hrScale": request.upscale_factor,
                "hrSecondPassSteps": 10, "denoisingStrength": 0.3,
            }})
        return stages

    def upload(self, data: bytes, content_type: str) -> str:
        grant = self._call("POST", "/v1/resource/image", {"expireSec": 3600, "term": 1})
        resource_id, put_url = grant.get("resourceId"), grant.get("putUrl")
        if not resource_id or not put_url:
            raise TransientError("upload grant without resourceId/putUrl", provider=PROVIDER)
        headers = {str(k): str(v) for k, v in (grant.get("headers") or {}).items()}

        def put() -> None:
            try:  # A presigned object-store URL: no TAMS signature.
                response = httpx.put(put_url, content=data, headers=headers, timeout=self.timeout)
            except httpx.TransportError as exc:
                raise TransientError(f"upload PUT: {type(exc).__name__}", provider=PROVIDER) from None
            if response.status_code != 200:
                raise status_error("upload PUT", response, PROVIDER)

        with_retries(put, self.max_attempts)
        return str(resource_id)

    def estimate(self, request: GenerationRequest) -> CreditEstimate:
        answer = self._call("POST", "/v1/jobs/credits", {"stages": self.stages(request)})
        credits = float(answer.get("credits", 0))
        return CreditEstimate(credits=credits, source="api", money=round(credits * USD_PER_CREDIT, 6),
                              currency="USD")

    def submit_call(self, request: GenerationRequest) -> ApiCall:
        # requestId is there "to ensure request idempotence, should be unique" (the API reference,
        # POST /v1/jobs); a retried submit returns the same job (assumed: what a repeat returns is
        # not published). Ours is the item's own (`flows.pipeline.request_id`: a SHA-256 of the
        # pipeline, item, run date, step, account and paid request), never the FAQ's
        # md5(unix seconds), which gives every job of one second the same id.
        payload: dict[str, Any] = {"requestId": request.request_id, "stages": self.stages(request)}
        if request.callback_url:
            payload["notifyUrl"] = request.callback_url
        return self.api("POST", "/v1/jobs", payload)

    # --- callbacks: notifyUrl; the payload is not documented [A: the GET's {"job": {...}}] -----
    @property
    def callback_base(self) -> str | None:
        return self.notify_url

    @classmethod
    def read_callback(cls, body: Any) -> Heard:
        job = body.get("job") if isinstance(body, dict) else None
        if not isinstance(job, dict) or not job.get("id"):
            raise ValueError("a TAMS notification names its job in job.id (assumed: the payload is undocumented)")
        return Heard(job_id=str(job["id"]), state=str(job.get("status") or "unknown"))

    def read_job_id(self, answer: Any) -> str:
        job = answer.get("job") or {}
        if not job.get("id"):
            raise TransientError("job created without an id", provider=PROVIDER)
        return str(job["id"])

    def poll_call(self, job_id: str) -> ApiCall:
        return self.api("GET", f"/v1/jobs/{job_id}")

    @property
    def polls_are_scarce(self) -> bool:
        """5 requests a second per application, "every call counts, including polls": a status
        request that finds the job running is a submit not sent."""
        return True

    def read_status(self, job_id: str, answer: Any) -> JobStatus:
        job = answer.get("job") or {}
        status = str(job.get("status", "DEFAULT"))
        state = STATES.get(status, JobState.QUEUED)
        urls = [img["url"] for img in (job.get("successInfo") or {}).get("images", []) if img.get("url")]
        reason = (job.get("failedInfo") or {}).get("reason")
        return JobStatus(job_id=job_id, state=state, provider_status=status, result_urls=urls, reason=reason)

    def fetch(self, status: JobStatus) -> list[bytes]:
        if not status.result_urls:
            raise BadRequest(f"job {status.job_id} succeeded without images", provider=PROVIDER)
        return [download(url, provider=PROVIDER, timeout=self.timeout, attempts=self.max_attempts,
                         expiry="their expiredIn") for url in status.result_urls]

    def cancel(self, job_id: str) -> None:
        self._call("DELETE", f"/v1/jobs/{job_id}")
