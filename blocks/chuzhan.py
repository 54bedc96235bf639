"""触站AI (Chuzhan AI, huashi6 open platform) provider Block and its published credit formula.

Wire protocol as in `docs/providers/chuzhan.md`: every endpoint is `POST` with a JSON body,
the API token goes in the `Auth-Token` header and again as `Authorization: Bearer` (the clients
found send the first, the document's page renders the second), answers come in a `{code, msg, success, data}`
envelope (`code == 0` is success, business errors are HTTP 200). A drawing task is submitted
with `/v1/draw` (which **charges at submit**) and polled with `/v1/task/detail` until
`success` or `fail`. `predictConsume: true` prices a request without drawing or charging.

The provider is the least documented of the three; every path and field name is in the
constants below, so a correction from a live account is a one-line change.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import threading
import time
from dataclasses import replace
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, ClassVar, Literal
from urllib.parse import urlparse

import httpx
from pydantic import Field, PrivateAttr, SecretStr, ValidationInfo, field_validator

from blocks.base import (CallbackFields, ApiCall, CreditEstimate, GenerationRequest, Heard, ImageProvider, JobState, JobStatus,
                         download, status_error)
from blocks.errors import (AccountStop, BadRequest, ContentRejected, JobFailed, ProviderError, SubmitUnknown,
                           TransientError)

PROVIDER = "chuzhan"
PATH_DRAW = "/v1/draw"
PATH_DETAIL = "/v1/task/detail"
PATH_CUSTOMER = "/v1/customer/detail"  # [A] path not published; balance in data.balance
RESULT_HOSTS = ("huashi6.com", "czhanai.com")  # [A] the provider's domains; its result CDN is not published
STATES = {"in_queue": JobState.QUEUED, "running": JobState.RUNNING, "success": JobState.SUCCEEDED,
          "fail": JobState.FAILED}

# The credit page's constants.
BASE_RATE = 0.000000763    # credits per pixel per step (base and hires fix)
UPSCALE_RATE = 0.0000038   # credits per pixel per upscale factor
MIN_BASE_SIDE, MIN_UPSCALE_SIDE = 512, 256
MAX_AREA = 2048 * 2048     # w * h * hrScale^2
MAX_SIDE, MIN_SIDE = 2048, 64
MAX_HR_SCALE, MAX_HR_STEPS, MAX_UPSCALE, MAX_BATCH, MAX_UNITS = 3, 50, 3, 6, 3
EXTRAS = {"removeBackground": 2, "redrawBackground": 2, "facePreservation": 2, "genderDetect": 1}
FACE_FIX, PER_UNIT, MULTI_IMAGE_FACTOR = 2, 2, Decimal("0.9")  # FACE_FIX [A]: the schema's "+2", not the credit page
# The image audit (`audit`, per image and, for a single image, at the top of the answer): 1 passed
# [A]. 2 and 3 are assumed to ask for a person ("confirm", "show privately"; not in the document):
# such paid images are kept and flagged for a person, never counted as failed.
AUDIT_PASSED = 1
AUDIT_FOR_A_PERSON = {2: "a person should confirm it", 3: "to be shown privately only"}
STATUS_FLOOR = 1.0  # least seconds between two status requests of one task in long-poll mode
Charge = Literal["charged", "refunded", "maybe"]

# Error codes. The provider's own table is not published; these are the sandbox's, kept in one
# place so the real ones can replace them. Messages are matched too (the real service's texts).
ERRORS: dict[int, type[ProviderError]] = {
    400: BadRequest,        # invalid parameter
    401: AccountStop,       # bad or missing Auth-Token
    402: AccountStop,       # not enough credits
    403: ContentRejected,   # sensitive words in the prompt
    404: BadRequest,        # unknown taskId
    423: AccountStop,       # account disabled
    429: TransientError,    # the account's taskLimitCount reached: wait for a task to end
    500: TransientError,    # internal error
    503: TransientError,    # service busy
}
MESSAGE_HINTS: tuple[tuple[str, type[ProviderError]], ...] = (
    ("敏感", ContentRejected), ("违规", ContentRejected), ("余额不足", AccountStop), ("积分不足", AccountStop),
)


def _half_up(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def hires_scale(params: dict[str, Any]) -> Decimal:
    """The hrScale that takes effect: as sent on text-to-image; 1 on image-to-image, where
    hires fix has no effect."""
    return Decimal(1) if params.get("img") else Decimal(str(params.get("hrScale") or 1))


def credit_terms(params: dict[str, Any]) -> dict[str, Decimal]:
    """Each term of the formula for one image, unrounded (Decimal, so .5 rounds as written)."""
    w, h = int(params.get("width") or 512), int(params.get("height") or 512)
    steps = int(params.get("steps") or 20)
    hr = hires_scale(params)
    hr_steps = int(params.get("hrSteps") or 20)
    up = Decimal(str(params.get("upscale") or 1))  # as sent: never truncated
    terms = {"base": Decimal(max(w, MIN_BASE_SIDE) * max(h, MIN_BASE_SIDE)) * Decimal(str(BASE_RATE)) * steps}
    if hr > 1:
        terms["hires"] = Decimal(w * h) * hr * hr * Decimal(str(BASE_RATE)) * hr_steps
    if up > 1:
        uw, uh = Decimal(w) * hr, Decimal(h) * hr
        terms["upscale"] = (max(uw, Decimal(MIN_UPSCALE_SIDE)) * max(uh, Decimal(MIN_UPSCALE_SIDE))
                            * Decimal(str(UPSCALE_RATE)) * up)
    units = len((params.get("controlnet") or {}).get("units") or [])
    if units:
        terms["controlnet"] = Decimal(PER_UNIT * units)
    options = params.get("imgOptions") or {}
    for name, cost in EXTRAS.items():
        if options.get(name):
            terms[name] = Decimal(cost)
    if params.get("faceFix"):
        terms["faceFix"] = Decimal(FACE_FIX)
    return terms


def credit_readings(params: dict[str, Any]) -> dict[str, int]:
    """Credits of a drawing task under each reading of the page's rounding.

    The page shows whole numbers and does not say how it rounds: its three worked examples
    (12.00095 -> 12, 20.0016 -> 20, 5.9926 -> 6) rule out floor and ceiling, so one image costs
    the sum of its terms rounded half up. For several images (`single x 0.9 x n`) they cannot
    tell whether `single` is that whole number (`image_first`) or the unrounded sum (`total`):
    768x768, 25 steps, 6 images is 59 one way and 61 the other."""
    exact = sum(credit_terms(params).values(), Decimal(0))
    count = int(params.get("batchSize") or 1)
    if count == 1:
        return {"single": _half_up(exact)}
    return {"image_first": _half_up(_half_up(exact) * MULTI_IMAGE_FACTOR * count),
            "total": _half_up(exact * MULTI_IMAGE_FACTOR * count)}


def credits_for(params: dict[str, Any]) -> int:
    """Credits to estimate and reserve for a drawing task: the larger reading of the page's
    rounding (`credit_readings`). Online, the Block asks `predictConsume` instead."""
    return max(credit_readings(params).values())


def output_size(params: dict[str, Any]) -> tuple[int, int]:
    """Final size: (w x hrScale x upscale) by (h x hrScale x upscale); hrScale has no effect on
    image-to-image."""
    factor = float(hires_scale(params)) * float(params.get("upscale") or 1)
    return int(int(params.get("width") or 512) * factor), int(int(params.get("height") or 512) * factor)


def check_caps(params: dict[str, Any]) -> None:
    """Raise `BadRequest` naming the field for every cap of the credit page and the schema."""
    def bad(field: str, why: str) -> BadRequest:
        return BadRequest(f"{field}: {why}", provider=PROVIDER, code="validation")

    w, h = int(params.get("width") or 512), int(params.get("height") or 512)
    for name, value in (("width", w), ("height", h)):
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise bad(f"generate.{name}", f"{value} is outside {MIN_SIDE}..{MAX_SIDE}")
    steps = params.get("steps")
    if steps is not None and not 1 <= int(steps) <= 50:
        raise bad("generate.steps", f"{steps} is outside 1..50")
    if not str(params.get("prompt") or "").strip():
        raise bad("items.prompt", "empty prompt")
    batch = int(params.get("batchSize") or 1)
    if not 1 <= batch <= MAX_BATCH:
        raise bad("items.count", f"{batch} is outside 1..{MAX_BATCH} images per task")
    sent = float(params.get("hrScale") or 1)
    if sent != 1 and not 1 <= sent <= MAX_HR_SCALE:
        raise bad("generate.options.hrScale", f"{sent} is outside 1..{MAX_HR_SCALE}")
    hr = float(hires_scale(params))  # the caps below are about the hires fix that takes effect (see `notes`)
    if params.get("hrSteps") is not None and not 1 <= int(params["hrSteps"]) <= MAX_HR_STEPS:
        raise bad("generate.options.hrSteps", f"{params['hrSteps']} is outside 1..{MAX_HR_STEPS}")
    if w * h * hr * hr > MAX_AREA:
        raise bad("generate.options.hrScale", f"drawing area {w}x{h}x{hr}^2 = {int(w * h * hr * hr)} pixels is above "
                                              f"{MAX_AREA} (2048x2048)")
    if max(w, h) * hr > MAX_SIDE:
        raise bad("generate.options.hrScale", f"a side after hires fix ({int(max(w, h) * hr)}) is above {MAX_SIDE}")
    up = params.get("upscale") or 1
    if isinstance(up, bool) or not isinstance(up, int):
        raise bad("upscale.factor", f"{up!r}: the provider's AI upscale factor is a whole number")
    if not 1 <= up <= MAX_UPSCALE:
        raise bad("upscale.factor", f"{up} is above the provider's AI upscale cap of {MAX_UPSCALE}")
    units = (params.get("controlnet") or {}).get("units") or []
    if len(units) > MAX_UNITS:
        raise bad("generate.options.controlnet.units", f"{len(units)} units, at most {MAX_UNITS}")
    cfg = params.get("cfgScale")
    if cfg is not None and not 1 <= float(cfg) <= 30:
        raise bad("generate.cfg_scale", f"{cfg} is outside 1..30")
    strength = params.get("denoisingStrength")
    if strength is not None and not params.get("img"):
        raise bad("generate.denoising_strength", "only applies with an input image")
    options = params.get("imgOptions") or {}
    if options.get("removeBackground") and not params.get("img"):
        raise bad("generate.options.imgOptions.removeBackground", "needs an input image")
    if len(str(params.get("nonce") or "")) > 32:
        raise bad("nonce", "at most 32 characters")
    callback = params.get("callback")
    if callback and not public_url(callback):
        raise bad("callback", "must be a public http(s) URL (the provider refuses localhost and LAN addresses)")


def nonce(request_id: str) -> str:
    """The request id in the 32 characters `nonce` allows, keeping its attempt suffix
    (`<32 hex>-<n>`): a cut from the right would make every attempt's nonce the same."""
    base, dash, attempt = request_id.rpartition("-")
    if not dash or not attempt.isdigit():
        return request_id[:32]
    return base[:32 - len(attempt) - 1] + "-" + attempt


def public_url(url: str) -> bool:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.hostname == "localhost":
        return False
    try:
        address = ipaddress.ip_address(parsed.hostname)
    except ValueError:
        return True
    return address.is_global


def on_loopback(url: str) -> bool:
    """True for a loopback endpoint (the sandbox), which can call back to a loopback receiver."""
    host = urlparse(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_headers(token: str) -> dict[str, str]:
    """The token both ways: `Auth-Token` (every client found) and `Authorization: Bearer` (what
    the document's page renders); which one the service reads is not published."""
    return {"Auth-Token": token, "Authorization": f"Bearer {token}"}


def audit_reason(value: Any) -> str | None:
    """Why an image's `audit` keeps it from approval, or None where it passed (1)."""
    try:
        audit = int(value)
    except (TypeError, ValueError):
        return f"the provider's audit is unreadable (audit={value!r}): held for a person"
    if audit == AUDIT_PASSED:
        return None
    if audit in AUDIT_FOR_A_PERSON:
        return f"held for a person: the provider's audit says {AUDIT_FOR_A_PERSON[audit]} (audit={audit})"
    return f"failed the provider's audit (audit={audit})"


def priced(data: Any) -> float:
    """`estimateUsed` of a `predictConsume` answer. One that names a task or a charge
    (`paintingSign`, `used`) means the service drew instead of pricing, and charged: an
    `AccountStop`, so nothing more is asked or sent until a person looks; one without a price
    is unclear (`BadRequest`)."""
    answer = data if isinstance(data, dict) else {}
    if answer.get("paintingSign") or answer.get("used") is not None:
        task, used = answer.get("paintingSign"), answer.get("used")
        raise AccountStop(f"asked only for a price (predictConsume), the service drew task {task!r} and took {used!r} "
                          "credits: it does not honour predictConsume. Nothing more is sent; check the account's "
                          "tasks and tell the Block's maintainers", provider=PROVIDER, code="predictConsume")
    try:
        return float(answer["estimateUsed"])
    except (KeyError, TypeError, ValueError):
        raise BadRequest(f"a predictConsume answer without a readable estimateUsed: {sorted(answer)}",
                         provider=PROVIDER) from None


class AuditFailed(ContentRejected):
    """A task whose every image failed the provider's audit: rejected on content after its
    credits were taken at submit, so it counts as maybe charged where `used` was not seen."""

    charge: ClassVar[str] = "maybe"


class TaskFailed(JobFailed):
    """A drawing task that ended `fail`. Its credits were taken at submit (`used`, where this
    process saw the answer); the provider does not say whether a failed task gives them back and
    its answer reports nothing of it, so `charge` is "maybe"."""

    def __init__(self, message: str, *, used: float | None, charge: Charge = "maybe", code: str | None = None) -> None:
        super().__init__(message, provider=PROVIDER, code=code)
        self.used, self.charge = used, charge


def map_error(code: int, message: str) -> ProviderError:
    """Our error type for an envelope with `success: false`."""
    kind = ERRORS.get(code, TransientError if code >= 500 else BadRequest)
    for hint, hinted in MESSAGE_HINTS:
        if hint in message:
            kind = hinted
    return kind(f"code {code}: {message or 'no message'}", provider=PROVIDER, code=str(code))


class ChuzhanProvider(ImageProvider, CallbackFields):
    """触站AI open-platform account: API token and endpoint.

    Example:
        ```python
        from blocks.chuzhan import ChuzhanProvider
        provider = ChuzhanProvider.load("BLOCK_NAME")
        ```
    """

    result_domains: ClassVar[tuple[str, ...]] = RESULT_HOSTS

    _block_type_name = "Chuzhan Provider"
    _block_type_slug = "chuzhan-provider"
    _documentation_url = "https://chuzhanai.apifox.cn/"
    provider_name: ClassVar[str] = PROVIDER
    idempotent_submit: ClassVar[bool] = False  # charged at submit; a repeat is a second charge
    spec_fields: ClassVar[dict[str, str]] = {  # the `/v1/draw` fields `draw_params()` fills
        "prompt": "items.prompt", "negativePrompt": "items.negative_prompt", "width": "generate.width",
        "height": "generate.height", "modelStyleId": "generate.model", "batchSize": "items.count",
        "seed": "items.seed", "nonce": "(the request id)", "steps": "generate.steps", "cfgScale": "generate.cfg_scale",
        "denoisingStrength": "generate.denoising_strength", "img": "items.input_image", "upscale": "upscale.factor",
        "callback": "(the client)", "predictConsume": "(the client)"}

    api_token: SecretStr = Field(description="API token from the open-platform console (sent as Auth-Token).")
    endpoint: str = Field("https://ai.huashi6.com/aiapi", description="API base URL.")
    callback: str | None = Field(None, description=(
        "Public URL of `imagegen callbacks serve`: each task then calls back to a URL of its own there, and "
        "is polled only to confirm (or every callback_fallback_seconds when no callback comes)."))

    @field_validator("callback")
    @classmethod
    def _public_callback(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value and not public_url(value) and not on_loopback(str(info.data.get("endpoint") or "")):
            raise ValueError("callback must be a public http(s) URL: the provider refuses localhost and LAN addresses")
        return value
    long_poll: bool = Field(False, description=(
        "Ask for a task's status with waitUtilEnd: the provider holds each request until the task ends, so a "
        "job costs one status request instead of one per poll interval. For accounts with no public callback URL."))
    long_poll_seconds: float = Field(120.0, description="Seconds one held status request may take before it is "
                                     "asked again.")
    long_poll_floor_seconds: float = Field(STATUS_FLOOR, ge=0.2, description=(
        "Least seconds between the starts of two status requests of one task in long-poll mode (a service that "
        "answers at once instead of holding is not asked again at once)."))

    _charged: dict[str, float] = PrivateAttr(default_factory=dict)  # job id -> `used` of its submit
    _asked: dict[str, float] = PrivateAttr(default_factory=dict)  # job id -> when its last status request left
    _asked_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def client_options(self) -> dict[str, Any]:
        return {"base_url": self.endpoint.rstrip("/"), "timeout": self.timeout,
                "headers": auth_headers(self.api_token.get_secret_value())}

    # --- HTTP: the base sends; 触站AI's envelope and errors ------------------------------------
    @staticmethod
    def api(path: str, payload: dict[str, Any], *, safe_to_repeat: bool = True) -> ApiCall:
        """A POST of `payload`; its request slot is named after the path (`v1.draw`)."""
        return ApiCall.with_json(path.strip("/").replace("/", "."), "POST", path, payload,
                                 safe_to_repeat=safe_to_repeat, label=path)

    def _post(self, path: str, payload: dict[str, Any], *, safe_to_repeat: bool = True) -> Any:
        """POST and unwrap the envelope. A request that may have been acted on (a submit whose
        answer was lost) is never repeated: it raises `SubmitUnknown`."""
        return self.send(self.api(path, payload, safe_to_repeat=safe_to_repeat))

    def read_answer(self, call: ApiCall, response: httpx.Response) -> Any:
        if response.status_code != 200:
            if not call.safe_to_repeat and response.status_code >= 500 and response.status_code != 503:
                raise SubmitUnknown(f"{call.what}: HTTP {response.status_code}; the task may exist", provider=PROVIDER)
            raise status_error(call.what, response, PROVIDER)
        envelope = self.json_answer(call, response)
        if not isinstance(envelope, dict):
            raise self.unclear(call, f"{call.what}: the answer is not an envelope")
        if envelope.get("success") and envelope.get("code") == 0:
            return envelope.get("data")
        if envelope.get("success") or envelope.get("code") in (0, "0"):  # success and failure at once
            raise self.unclear(call, f"{call.what}: the answer says success {envelope.get('success')!r} with code "
                               f"{envelope.get('code')!r}")
        code = int(envelope.get("code") or -1)
        if not call.safe_to_repeat and code >= 500:  # an internal error says nothing of the task
            raise SubmitUnknown(f"{call.what}: code {code} does not say whether the task was created "
                                "(and charged)", provider=PROVIDER, code=str(code))
        raise map_error(code, str(envelope.get("msg") or ""))

    # --- requests ------------------------------------------------------------------------------
    @classmethod
    def draw_params(cls, request: GenerationRequest) -> dict[str, Any]:
        """The `/v1/draw` body for a request (without callback and predictConsume)."""
        params: dict[str, Any] = {
            "prompt": request.prompt, "width": request.width, "height": request.height,
            "modelStyleId": int(request.model) if request.model and request.model.isdigit() else 1,
            "batchSize": request.count, "seed": request.seed, "nonce": nonce(request.request_id),
        }
        if request.negative_prompt:
            params["negativePrompt"] = request.negative_prompt
        for field, value in (("steps", request.steps), ("cfgScale", request.cfg_scale),
                             ("denoisingStrength", request.denoising_strength)):
            if value is not None:
                params[field] = value
        if request.input_ref or request.has_input:
            params["img"] = request.input_ref or "<input image, uploaded at run time>"
        if request.upscale_factor:
            params["upscale"] = request.upscale_factor
        params.update(request.options)
        return params

    def job_action(self, request: GenerationRequest) -> str:
        return "draw"  # held against the account's taskLimitCount, submit to result

    @classmethod
    def validate(cls, request: GenerationRequest) -> None:
        check_caps(cls.draw_params(request))

    @classmethod
    def output_size(cls, request: GenerationRequest) -> tuple[int, int]:
        return output_size(cls.draw_params(request))

    @classmethod
    def estimate_offline(cls, request: GenerationRequest) -> CreditEstimate:
        readings = credit_readings(cls.draw_params(request))
        note = None
        if len(readings) > 1:
            note = (f"{request.count} images: the page does not say whether one image's cost is rounded before "
                    f"x0.9 x n ({readings['image_first']} if so, {readings['total']} if not); assumed the larger")
        return CreditEstimate(credits=max(readings.values()), source="formula", note=note)

    @classmethod
    def notes(cls, request: GenerationRequest) -> list[str]:
        params = cls.draw_params(request)
        if params.get("img") and float(params.get("hrScale") or 1) != 1:
            return ["generate.options.hrScale: no effect on an item with an input image (hires fix is text-to-image "
                    "only); it is sent as given, and priced and sized as without it"]
        return []

    def estimate_key(self, request: GenerationRequest) -> str:
        params = self.draw_params(request)
        for volatile in ("prompt", "negativePrompt", "seed", "nonce", "img"):
            params.pop(volatile, None)
        return json.dumps({**params, "has_img": request.has_input}, sort_keys=True)

    def estimate(self, request: GenerationRequest) -> CreditEstimate:
        """`predictConsume` when the service answers (free), the published formula otherwise."""
        try:
            data = self._post(PATH_DRAW, {**self.draw_params(request), "predictConsume": True})
        except TransientError:
            return self.estimate_offline(request)
        return CreditEstimate(credits=priced(data), source="api")

    def upload(self, data: bytes, content_type: str) -> str:
        """No upload endpoint: `img` takes base64 (or a public URL), so the reference is the data."""
        return base64.b64encode(data).decode()

    def submit_call(self, request: GenerationRequest) -> ApiCall:
        payload = self.draw_params(request)
        if request.callback_url:
            payload["callback"] = request.callback_url
        return self.api(PATH_DRAW, payload, safe_to_repeat=False)  # charged at submit

    # --- callbacks: POST {taskId, nonce, state, images...} when a task succeeds or fails ---------
    @property
    def callback_base(self) -> str | None:
        return self.callback

    @classmethod
    def read_callback(cls, body: Any) -> Heard:
        if not isinstance(body, dict) or not body.get("taskId"):
            raise ValueError("a 触站AI callback names its task in taskId")
        data = body.get("data") if isinstance(body.get("data"), dict) else body
        return Heard(job_id=str(body["taskId"]), state=str(data.get("state") or "unknown"),
                     nonce=None if body.get("nonce") is None else str(body["nonce"]))

    @classmethod
    def callback_nonce(cls, request_id: str) -> str | None:
        return nonce(request_id)

    def status_call(self, job_id: str) -> ApiCall:
        return self.api(PATH_DETAIL, {"taskId": job_id, "preview": False, "imgFormat": "png"})  # never held

    @classmethod
    def status_names(cls, answer: Any, request: GenerationRequest) -> bool:
        """The task detail names our nonce and prompt. [A] The documented detail carries
        neither, so on such an answer no task a callback names is adopted (a person settles it)."""
        data = answer if isinstance(answer, dict) else {}
        return data.get("nonce") == nonce(request.request_id) and data.get("prompt") == request.prompt

    def read_job_id(self, answer: Any) -> str:
        if not answer or not answer.get("paintingSign"):
            raise SubmitUnknown("draw answered without a paintingSign", provider=PROVIDER)
        job_id = str(answer["paintingSign"])
        if answer.get("used") is not None:
            self._charged[job_id] = float(answer["used"])  # charged now, at submit
        return job_id

    def charged(self, job_id: str) -> float | None:
        return self._charged.get(job_id)

    def poll_call(self, job_id: str) -> ApiCall:
        if self.long_poll:  # held until the task ends (or the connection is cut: then asked again)
            return replace(self.api(PATH_DETAIL, {"taskId": job_id, "waitUtilEnd": True, "preview": False,
                                                  "imgFormat": "png"}), timeout=self.long_poll_seconds)
        return self.api(PATH_DETAIL, {"taskId": job_id, "preview": False, "imgFormat": "png"})

    @property
    def holds_polls(self) -> bool:
        return self.long_poll

    @property
    def polls_are_scarce(self) -> bool:
        """Status requests share one rate for all tasks (2 a second, assumed: none is published),
        which polling two tasks in flight every second would exceed."""
        return True

    def poll(self, job_id: str) -> JobStatus:
        """In long-poll mode, `long_poll_floor_seconds` at least between the starts of two status
        requests of one task: a held request that comes back at once is not asked again at once."""
        if not self.long_poll:
            return super().poll(job_id)
        with self._asked_lock:
            last = self._asked.get(job_id)
        if last is not None:
            time.sleep(max(0.0, last + self.long_poll_floor_seconds - time.monotonic()))
        with self._asked_lock:
            self._asked[job_id] = time.monotonic()
        status = super().poll(job_id)
        if status.state.final:
            with self._asked_lock:
                self._asked.pop(job_id, None)
        return status

    def read_status(self, job_id: str, answer: Any) -> JobStatus:
        """A task detail (or a callback body: the same fields). An image's own `audit` counts;
        where it has none, the answer's top-level `audit` (the single image's) applies."""
        data = answer or {}
        state = str(data.get("state", "in_queue"))
        images = [img for img in data.get("images") or [] if isinstance(img, dict)]
        urls = [img["imageUrl"] for img in images if img.get("imageUrl")]
        if not urls and data.get("imgUrl"):
            urls = [data["imgUrl"]]
        top = data.get("audit")
        audits = [img.get("audit", top) for img in images] if images else [top] * len(urls)
        reason = data.get("failReason")
        rejected = {n: why for n, a in enumerate(audits, start=1) if a is not None and (why := audit_reason(a))}
        failed = [n for n, why in rejected.items() if why.startswith("failed")]
        if state == "success" and audits and len(failed) == len(audits):  # none passed, none held for a person
            state, reason, rejected = "fail", "every image failed the provider's audit", {}
        return JobStatus(job_id=job_id, state=STATES.get(state, JobState.QUEUED), provider_status=state,
                         progress=data.get("progress"), result_urls=urls, reason=reason, rejected=rejected)

    def job_failure(self, status: JobStatus) -> ProviderError:
        if status.reason and "audit" in status.reason:
            return AuditFailed(status.reason, provider=PROVIDER, code="audit")
        return TaskFailed(f"task {status.job_id} ended {status.provider_status}: {status.reason or 'no reason given'}",
                          used=self._charged.get(status.job_id), code=status.provider_status)

    def fetch(self, status: JobStatus) -> list[bytes]:
        if not status.result_urls:
            raise BadRequest(f"task {status.job_id} succeeded without images", provider=PROVIDER)
        return [download(url, provider=PROVIDER, timeout=self.timeout, attempts=self.max_attempts,
                         expiry="30 minutes") for url in status.result_urls]

    def balance(self) -> float:
        """The account's credit balance."""
        return float((self._post(PATH_CUSTOMER, {}) or {}).get("balance", 0))

