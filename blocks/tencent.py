"""Tencent Cloud AI Art (`aiart`, version 2022-12-29) provider Block.

Wire protocol as in `docs/providers/tencent.md`: every action is `POST /` with a JSON
body, named by `X-TC-Action`, signed TC3-HMAC-SHA256 (service `aiart`); answers are HTTP 200
`{"Response": {...}}`, errors included (`Response.Error.Code`). Text-to-image runs as the
asynchronous `SubmitTextToImageJob` / `QueryTextToImageJob` pair (status codes are strings:
"1" queued, "2" running, "4" failed, "5" done); image-to-image is the synchronous
`ImageToImage`; the provider's upscaler is the synchronous `RefineImage` (long side -> 2048).
Result URLs expire after an hour, so they are downloaded at once.

Published limits: 20 requests a second per action; 3 jobs in flight for ImageToImage and 1
for the other actions (per account). No per-call price is published: estimates count
billable calls (one per image) and say so.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import time
import uuid
from collections.abc import Callable, Generator
from datetime import datetime, timezone
from typing import Any, ClassVar

import httpx
from PIL import Image
from pydantic import Field, PrivateAttr, SecretStr

from blocks.base import (ApiCall, CreditEstimate, GenerationRequest, ImageProvider, Journal, JobState, JobStatus,
                         NoJournal, download)
from blocks.errors import (AccountStop, BadRequest, ChargedRejection, ContentRejected, JobFailed, ProviderError,
                           SubmitUnknown, TransientError)

PROVIDER = "tencent"
SERVICE, VERSION = "aiart", "2022-12-29"
TEXT_JOB, TEXT_QUERY, IMAGE_TO_IMAGE, REFINE = ("SubmitTextToImageJob", "QueryTextToImageJob", "ImageToImage",
                                                "RefineImage")
STATUS = {"1": JobState.QUEUED, "2": JobState.RUNNING, "4": JobState.FAILED, "5": JobState.SUCCEEDED}
I2I_RESOLUTIONS = ("origin", "768:768", "768:1024", "1024:768")
I2I_PROMPT_MAX, TEXT_PROMPT_MAX = 256, 1024
IMAGE_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP"}  # MPO: a phone camera's JPEG (CIPA DC-007)
# Input sizes: "base64 < 8 MB" (ImageToImage) and "base64 < 6 MB" (RefineImage). Read as the
# base64 text, in decimal megabytes: the strictest reading (the image itself is 3/4 of its base64,
# and 10^6 < 2^20), so no reading of the pages refuses what the client sends.
I2I_MAX_BASE64, REFINE_MAX_BASE64 = 8_000_000, 6_000_000
SYNC_PREFIX = "sync:"  # an ImageToImage answered with its image (base64): given once
ANSWER_PREFIX = "answer:"  # one answered with a result URL (an hour), recorded apart (`answer_urls`)
GENERATE_FAILED = "FailedOperation.GenerateImageFailed"
MAX_REVIEW_FAILURE_RETRIES = 2  # the document: "retry once or twice, then treat as content rejection"


class ReviewFailed(ChargedRejection):
    """`FailedOperation.GenerateImageFailed` ("The generated image failed the review. Please try
    again."): the image was made, then refused. Nothing says such a call is free, so each one
    counts as maybe charged (`ChargedRejection`); `calls` is how many the item made so."""

    def __init__(self, message: str, *, provider: str = PROVIDER, code: str | None = GENERATE_FAILED,
                 calls: int = 1) -> None:
        super().__init__(message, provider=provider, code=code, calls=calls)


# Every code the official SDK lists (tencentcloud.aiart.v20221229.errorcodes) and the common
# platform codes, each mapped to exactly one of our four kinds.
ERROR_CODES: dict[str, type[ProviderError]] = {
    # transient: retried with backoff
    "RequestLimitExceeded": TransientError, "RequestLimitExceeded.JobNumExceed": TransientError,
    "RequestLimitExceeded.UinLimitExceeded": TransientError, "RequestLimitExceeded.IPLimitExceeded": TransientError,
    "RequestLimitExceeded.GlobalRegionUinLimitExceeded": TransientError,
    "InternalError": TransientError, "ServiceUnavailable": TransientError,
    "FailedOperation.InnerError": TransientError, "FailedOperation.ServerError": TransientError,
    "FailedOperation.RpcFail": TransientError, "FailedOperation.RequestTimeout": TransientError,
    "FailedOperation.Unknown": TransientError, "FailedOperation.ConsoleServerError": TransientError,
    "FailedOperation.ImageDownloadError": TransientError, "ResourceUnavailable.Delivering": TransientError,
    # content rejection: recorded, never retried (GenerateImageFailed only where a Block opts in)
    GENERATE_FAILED: ReviewFailed,
    "OperationDenied.TextIllegalDetected": ContentRejected, "OperationDenied.ImageIllegalDetected": ContentRejected,
    "FailedOperation.ModerationFailed": ContentRejected,
    # account stop: credentials, balance or service state; a person must act
    "AuthFailure.SignatureFailure": AccountStop, "AuthFailure.SignatureExpire": AccountStop,
    "AuthFailure.SecretIdNotFound": AccountStop, "AuthFailure.InvalidSecretId": AccountStop,
    "AuthFailure.InvalidAuthorization": AccountStop, "AuthFailure.TokenFailure": AccountStop,
    "AuthFailure.MFAFailure": AccountStop, "AuthFailure.UnauthorizedOperation": AccountStop,
    "UnauthorizedOperation": AccountStop, "IpInBlacklist": AccountStop, "IpNotInWhitelist": AccountStop,
    "ResourceUnavailable.InArrears": AccountStop, "ResourceUnavailable.LowBalance": AccountStop,
    "ResourceUnavailable.NotExist": AccountStop, "ResourceUnavailable.StopUsing": AccountStop,
    "ResourcesSoldOut.ChargeStatusException": AccountStop, "LimitExceeded": AccountStop,
    # bad request: a bug or a bad spec
    "InvalidParameter": BadRequest, "InvalidParameter.InvalidParameter": BadRequest,
    "InvalidParameterValue": BadRequest, "InvalidParameterValue.ParameterValueError": BadRequest,
    "InvalidParameterValue.ImageEmpty": BadRequest, "InvalidParameterValue.TextLengthExceed": BadRequest,
    "InvalidParameterValue.UrlIllegal": BadRequest, "InvalidParameterValue.StyleConflict": BadRequest,
    "InvalidParameterValue.LogoParamErr": BadRequest, "MissingParameter": BadRequest, "UnknownParameter": BadRequest,
    "FailedOperation.ImageDecodeFailed": BadRequest, "FailedOperation.ImageResolutionExceed": BadRequest,
    "FailedOperation.ImageSizeExceed": BadRequest, "FailedOperation.RequestEntityTooLarge": BadRequest,
    "RequestSizeLimitExceeded": BadRequest, "FailedOperation.JobNotExist": BadRequest, "InvalidAction": BadRequest,
    "NoSuchVersion": BadRequest, "UnsupportedRegion": BadRequest, "UnsupportedOperation": BadRequest,
    "ActionOffline": BadRequest,
    # prefixes, for codes the SDK does not list yet: credentials stop the account; the
    # document's OperationDenied codes are both content rejections, so a new one rejects the item
    "AuthFailure": AccountStop, "OperationDenied": ContentRejected,
}
I2I_MAX_PIXELS = 2000 * 2000  # FailedOperation.ImageResolutionExceed: "> 2000x2000" (read as the area; assumed)
# What each action takes besides the fields the spec fills (`spec_fields`); any other option is
# an error, never silently dropped. `Resolution` is our short form of ImageToImage's ResultConfig.
I2I_OPTIONS = frozenset({"Styles", "ResultConfig", "Resolution", "LogoAdd", "LogoParam", "RspImgType",
                         "EnhanceImage", "RestoreFace"})
TEXT_OPTIONS = frozenset({"LogoAdd", "LogoParam", "Revise"})
LOGO_FIELDS, RECT_FIELDS = frozenset({"LogoUrl", "LogoImage", "LogoRect"}), ("X", "Y", "Width", "Height")


# Answers to a paid action that do not tell whether it was acted on: the error came from
# behind the gateway (the job may exist), so the call is `SubmitUnknown`, never repeated.
AMBIGUOUS_CODES = frozenset({"InternalError", "FailedOperation.InnerError", "FailedOperation.ServerError",
                             "FailedOperation.RpcFail", "FailedOperation.RequestTimeout", "FailedOperation.Unknown",
                             "FailedOperation.ConsoleServerError"})  # grouped with InnerError by the notes
REFUSED_STATUS = frozenset({429, 503})  # HTTP answers that say the request was turned away


def result_image(answer: dict[str, Any], action: str) -> str:
    """The `ResultImage` a synchronous paid call answered with; `SubmitUnknown` without one (it
    was answered, so maybe charged: never sent again)."""
    if not isinstance(found := answer.get("ResultImage"), str):
        raise SubmitUnknown(f"{action} answered without a ResultImage; it may have been charged, so it is not "
                            "repeated", provider=PROVIDER)
    return found


def is_url(value: str) -> bool:
    """Whether an answer's image (or a job id) is a URL, not base64 data."""
    return value.startswith(("http://", "https://"))


def check_logo(logo: Any) -> str | None:
    """Why a LogoParam is malformed ({LogoUrl | LogoImage, LogoRect{X, Y, Width, Height}}), or None."""
    if not isinstance(logo, dict) or not logo.keys() <= LOGO_FIELDS:
        return f"must be a mapping of {', '.join(sorted(LOGO_FIELDS))}"
    if not (logo.get("LogoUrl") or logo.get("LogoImage")):
        return "needs LogoUrl or LogoImage"
    rect = logo.get("LogoRect")
    if rect is not None and not (isinstance(rect, dict) and set(rect) <= set(RECT_FIELDS) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in rect.values())):
        return "LogoRect takes non-negative integers X, Y, Width, Height"
    return None


def error_kind(code: str, unknown: type[ProviderError] = BadRequest) -> type[ProviderError]:
    """Our error type for a Tencent error code; an unknown code falls back on its prefix, then `unknown`."""
    return ERROR_CODES.get(code) or ERROR_CODES.get(code.split(".")[0], unknown)


def map_error(code: str, message: str) -> ProviderError:
    """Our error for a `Response.Error`."""
    return error_kind(code)(message or "no message", provider=PROVIDER, code=code)


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def tc3_signature(secret_key: str, date: str, string_to_sign: str, service: str = SERVICE) -> str:
    """Derive the signing key from the date and service, and sign (lowercase hex)."""
    k_signing = _hmac(_hmac(_hmac(("TC3" + secret_key).encode("utf-8"), date), service), "tc3_request")
    return hmac.new(k_signing, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def canonical_request(method: str, path: str, query: str, headers: dict[str, str], signed: list[str],
                      body: bytes) -> str:
    canonical_headers = "".join(f"{name}:{headers[name].strip().lower() if name == 'host' else headers[name].strip()}\n"
                                for name in signed)
    return "\n".join([method, path, query, canonical_headers, ";".join(signed), _sha256_hex(body)])


def string_to_sign(timestamp: int, scope: str, canonical: str) -> str:
    return f"TC3-HMAC-SHA256\n{timestamp}\n{scope}\n{_sha256_hex(canonical.encode('utf-8'))}"


class TC3Signer(httpx.Auth):
    """TC3-HMAC-SHA256 over `content-type;host` and the exact body, with the X-TC headers."""

    requires_request_body = True

    def __init__(self, secret_id: SecretStr, secret_key: SecretStr, region: str,
                 clock: Callable[[], float] = time.time) -> None:
        self._id, self._key, self._region, self._clock = secret_id, secret_key, region, clock

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        timestamp = int(self._clock())
        date = datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d")  # UTC, never local
        scope = f"{date}/{SERVICE}/tc3_request"
        headers = {"content-type": request.headers["content-type"], "host": request.headers["host"]}
        signed = ["content-type", "host"]
        canonical = canonical_request(request.method, request.url.raw_path.decode().split("?")[0] or "/",
                                      request.url.query.decode(), headers, signed, request.content)
        signature = tc3_signature(self._key.get_secret_value(), date, string_to_sign(timestamp, scope, canonical))
        request.headers.update({
            "X-TC-Timestamp": str(timestamp), "X-TC-Version": VERSION,
            "X-TC-Region": request.headers.get("X-TC-Region") or self._region,  # an action's own region wins
            "Authorization": (f"TC3-HMAC-SHA256 Credential={self._id.get_secret_value()}/{scope}, "
                              f"SignedHeaders={';'.join(signed)}, Signature={signature}"),
        })
        yield request


def check_image(data: bytes, field: str = "items.input_image", max_pixels: int | None = None,
                max_base64: int = I2I_MAX_BASE64) -> None:
    """The input-image rules of ImageToImage (`max_pixels`, base64 under 8 MB) and RefineImage
    (`max_base64=REFINE_MAX_BASE64`), before any call."""
    def bad(why: str) -> BadRequest:
        return BadRequest(f"{field}: {why}", provider=PROVIDER, code="validation")

    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (w, h) = image.format, image.size
    except Exception:
        raise bad("not a readable image") from None
    if fmt not in IMAGE_FORMATS:
        raise bad(f"format {fmt} not accepted (JPG, PNG, BMP, TIFF, WEBP)")
    if not (50 < w < 5000 and 50 < h < 5000):
        raise bad(f"{w}x{h}: each side must be between 50 and 5000 pixels")
    if max_pixels is not None and w * h > max_pixels:
        raise bad(f"{w}x{h} is over 2000x2000 pixels (ImageResolutionExceed); scale it down first")
    if (size := len(base64.b64encode(data))) >= max_base64:
        raise bad(f"{size:,} bytes as base64; it must be under {max_base64:,} (the page's "
                  f"{max_base64 // 1_000_000} MB)")


class TencentAiArtProvider(ImageProvider):
    """Tencent Cloud AI Art account: SecretId, SecretKey, region and endpoint.

    Example:
        ```python
        from blocks.tencent import TencentAiArtProvider
        provider = TencentAiArtProvider.load("BLOCK_NAME")
        ```
    """

    default_timeout: ClassVar[float] = 60.0  # its synchronous calls (ImageToImage, RefineImage) take a while

    _block_type_name = "Tencent AI Art Provider"
    _block_type_slug = "tencent-aiart-provider"
    _documentation_url = "https://www.tencentcloud.com/document/product/1238"
    provider_name: ClassVar[str] = PROVIDER
    upscale_in_job: ClassVar[bool] = False  # RefineImage is a call of its own
    credit_unit: ClassVar[str] = "billable calls"  # no per-call price is published
    sample_options: ClassVar[dict[str, Any]] = {"LogoAdd": 0}  # LogoAdd must be chosen (see validate)
    spec_fields: ClassVar[dict[str, str]] = {  # what `submit()` fills from the spec, never from options
        "Prompt": "items.prompt", "NegativePrompt": "items.negative_prompt", "Seed": "items.seed",
        "InputImage": "items.input_image", "InputUrl": "items.input_image",
        "Strength": "generate.denoising_strength"}

    secret_id: SecretStr = Field(description="The API key's SecretId.")
    secret_key: SecretStr = Field(description="The API key's SecretKey.")
    region: str = Field("ap-singapore", description="Region; ImageToImage is served in ap-singapore (intl).")
    action_regions: dict[str, str] = Field(
        default_factory=dict, description=("Region per action where it differs from `region`, e.g. "
                                           "{SubmitTextToImageJob: ap-guangzhou} (the region is not signed)."))
    endpoint: str = Field("https://aiart.tencentcloudapi.com", description="API endpoint.")
    review_failure_retries: int = Field(0, ge=0, le=MAX_REVIEW_FAILURE_RETRIES, description=(
        "ImageToImage calls made again after FailedOperation.GenerateImageFailed (\"please try again\"; the "
        "document: once or twice). Each such call counts as maybe charged, and each is reserved against "
        "run.max_credits before it is made: 0 rejects the item at the first."))

    _sync_results: dict[str, list[str]] = PrivateAttr(default_factory=dict)

    def client_options(self) -> dict[str, Any]:
        return {"base_url": self.endpoint.rstrip("/"), "timeout": self.timeout,
                "auth": TC3Signer(self.secret_id, self.secret_key, self.region)}

    # --- HTTP: the base sends; Tencent Cloud's answers and errors ------------------------------
    def api(self, action: str, payload: dict[str, Any], *, safe_to_repeat: bool = True) -> ApiCall:
        """One action, its body as the SDK writes it (None fields left out)."""
        body = json.dumps({k: v for k, v in payload.items() if v is not None}).encode()
        return ApiCall(action, "POST", "/", body=body, safe_to_repeat=safe_to_repeat, label=action, headers={
            "Content-Type": "application/json", "X-TC-Action": action, "X-TC-Language": "en-US",
            "X-TC-Region": self.action_regions.get(action, self.region)})

    def call(self, action: str, payload: dict[str, Any], *, safe_to_repeat: bool = True) -> dict[str, Any]:
        """One action; returns `Response` without `RequestId`, or raises our error type.

        A paid action (`safe_to_repeat=False`) is never repeated after an answer that does not
        say whether it was acted on (a cut connection, a gateway error, `InternalError`): that
        is `SubmitUnknown`. Refusals (rate and job limits, 503, 429) are retried."""
        return self.send(self.api(action, payload, safe_to_repeat=safe_to_repeat))

    def read_answer(self, call: ApiCall, response: httpx.Response) -> Any:
        if response.status_code != 200:  # the SDK's ServerNetworkError: not an API answer
            if not call.safe_to_repeat and response.status_code not in REFUSED_STATUS:
                raise SubmitUnknown(f"{call.what}: HTTP {response.status_code}; the job may have been created",
                                    provider=PROVIDER)
            raise TransientError(f"{call.what}: HTTP {response.status_code}", provider=PROVIDER)
        answer = self.json_answer(call, response)
        answer = answer.get("Response", {}) if isinstance(answer, dict) else {}
        if "Error" in answer:
            code = str(answer["Error"].get("Code"))
            if not call.safe_to_repeat and code in AMBIGUOUS_CODES:
                raise SubmitUnknown(f"{call.what}: {code} does not say whether the job was created",
                                    provider=PROVIDER, code=code)
            raise map_error(code, str(answer["Error"].get("Message", "")))
        answer.pop("RequestId", None)
        return answer

    def retry_steps(self, exc: TransientError) -> int:
        # JobNumExceed: a running job must finish first, so wait longer than a rate blip.
        return 2 if exc.code == "RequestLimitExceeded.JobNumExceed" else 0

    # --- requests -------------------------------------------------------------------------------
    @staticmethod
    def _options(request: GenerationRequest) -> dict[str, Any]:
        return dict(request.options)

    @staticmethod
    def _resolution(opts: dict[str, Any]) -> str:
        """ImageToImage's ResultConfig.Resolution: as given in `ResultConfig`, or `Resolution`."""
        config = opts.get("ResultConfig")
        return str(config.get("Resolution", "origin") if isinstance(config, dict) else opts.get("Resolution", "origin"))

    @classmethod
    def validate(cls, request: GenerationRequest) -> None:
        def bad(field: str, why: str) -> BadRequest:
            return BadRequest(f"{field}: {why}", provider=PROVIDER, code="validation")

        opts = cls._options(request)
        known = I2I_OPTIONS | TEXT_OPTIONS  # one spec's options serve both actions: each takes its own
        for name in opts:
            if name not in known and name not in cls.spec_fields:
                raise bad(f"generate.options.{name}", f"neither ImageToImage nor SubmitTextToImageJob has this field "
                                                      f"(options: {', '.join(sorted(known))})")
        if "LogoParam" in opts and (why := check_logo(opts["LogoParam"])):
            raise bad("generate.options.LogoParam", why)
        if "LogoAdd" not in opts:
            raise bad("generate.options.LogoAdd", "say whether to add the provider's 'AI generated' mark: "
                                                  "1 (Tencent's default) or 0")
        if int(opts["LogoAdd"]) not in (0, 1):
            raise bad("generate.options.LogoAdd", "must be 0 or 1")
        if request.count != 1:
            raise bad("items.count", "Tencent AI Art returns one image a call; use several items")
        limit = I2I_PROMPT_MAX if request.has_input else TEXT_PROMPT_MAX
        if len(request.prompt) > limit:
            raise bad("items.prompt", f"{len(request.prompt)} characters, at most {limit}")
        if len(request.negative_prompt) > I2I_PROMPT_MAX:
            raise bad("items.negative_prompt", f"{len(request.negative_prompt)} characters, at most {I2I_PROMPT_MAX}")
        if request.has_input:
            strength = opts.get("Strength", request.denoising_strength)
            if strength is not None and not 0 < float(strength) <= 1:
                raise bad("generate.denoising_strength", f"{strength} must be in (0, 1]")
            if not 0 <= int(opts.get("RestoreFace", 0)) <= 6:
                raise bad("generate.options.RestoreFace", "must be 0..6")
            if "ResultConfig" in opts and ("Resolution" in opts or not isinstance(opts["ResultConfig"], dict)
                                           or set(opts["ResultConfig"]) != {"Resolution"}):
                raise bad("generate.options.ResultConfig", "give {Resolution: ...} here or Resolution alone, not both")
            resolution = cls._resolution(opts)
            if resolution not in I2I_RESOLUTIONS:
                raise bad("generate.options.Resolution", f"{resolution!r} not one of {', '.join(I2I_RESOLUTIONS)}")
            if int(opts.get("EnhanceImage", 0)) not in (0, 1):
                raise bad("generate.options.EnhanceImage", "must be 0 or 1")
            styles = [str(s) for s in opts.get("Styles", ["201"])]
            if any(s.startswith("1") for s in styles) and len(styles) > 1:
                raise bad("generate.options.Styles", "1xx styles cannot be mixed with other styles")
            if opts.get("RspImgType", "url") not in ("url", "base64"):
                raise bad("generate.options.RspImgType", "must be url or base64")
        else:
            w, h = request.width, request.height
            if not (512 <= w <= 2048 and 512 <= h <= 2048 and w * h <= 1024 * 1024):
                raise bad("generate.width/height", f"{w}x{h}: sides 512..2048 and at most 1024x1024 pixels")
            if request.seed and not 1 <= request.seed <= 4294967295:
                raise bad("items.seed", "must be 1..4294967295")
        if request.upscale_factor:
            raise bad("upscale.engine", "Tencent upscales with RefineImage after the job, not inside it")

    @classmethod
    def output_size(cls, request: GenerationRequest) -> tuple[int, int] | None:
        if not request.has_input:
            return request.width, request.height
        resolution = cls._resolution(request.options)
        return None if resolution == "origin" else tuple(int(x) for x in resolution.split(":"))  # type: ignore[return-value]

    @classmethod
    def refine_check(cls, width: int, height: int, factor: int) -> None:
        """RefineImage always makes the long side 2048: the spec's factor must say so."""
        if max(width, height) * factor != 2048:
            raise BadRequest(f"upscale.factor: RefineImage makes the long side 2048, so from {width}x{height} "
                             f"the factor is {2048 / max(width, height):g}, not {factor}", provider=PROVIDER,
                             code="validation")

    def job_action(self, request: GenerationRequest) -> str:
        return IMAGE_TO_IMAGE if request.has_input else TEXT_JOB

    @classmethod
    def estimate_offline(cls, request: GenerationRequest) -> CreditEstimate:
        return CreditEstimate(credits=1.0, source="formula")  # one billable call; no price published

    def estimate(self, request: GenerationRequest) -> CreditEstimate:
        return self.estimate_offline(request)

    def estimate_key(self, request: GenerationRequest) -> str:
        return "one-call"

    def upload(self, data: bytes, content_type: str) -> str:
        """ImageToImage takes the image inline: check it and return it as base64."""
        check_image(data, max_pixels=I2I_MAX_PIXELS)
        return base64.b64encode(data).decode()

    def submit(self, request: GenerationRequest) -> str:
        opts = self._options(request)
        if request.has_input:
            payload: dict[str, Any] = {
                "Prompt": request.prompt, "NegativePrompt": request.negative_prompt or None,
                "Styles": [str(s) for s in opts.get("Styles", ["201"])],
                "ResultConfig": {"Resolution": self._resolution(opts)},
                "LogoAdd": int(opts["LogoAdd"]), "LogoParam": opts.get("LogoParam"),
                "Strength": opts.get("Strength", request.denoising_strength),
                "RspImgType": opts.get("RspImgType", "url"), "EnhanceImage": opts.get("EnhanceImage"),
                "RestoreFace": opts.get("RestoreFace"),
            }
            if is_url(str(request.input_ref or "")):
                payload["InputUrl"] = request.input_ref
            else:
                payload["InputImage"] = request.input_ref
            answer = self.call(IMAGE_TO_IMAGE, payload, safe_to_repeat=False)
            result = result_image(answer, IMAGE_TO_IMAGE)
            # A result URL (it lives an hour) is recorded with the job before the download, so a
            # failed download is made again from it, paying nothing. A base64 image is given once.
            job_id = f"{ANSWER_PREFIX if is_url(result) else SYNC_PREFIX}{uuid.uuid4().hex}"
            self._sync_results[job_id] = [result]
            return job_id
        return super().submit(request)

    def asks_again(self, request: GenerationRequest, refused: ChargedRejection) -> bool:
        """ImageToImage is made again after a failed review, up to `review_failure_retries` times
        (each call reserved and recorded as maybe charged by `run_job`); a text-to-image submit
        never is (that would be a new job)."""
        return (request.has_input and isinstance(refused, ReviewFailed)
                and refused.calls <= self.review_failure_retries)

    def submit_call(self, request: GenerationRequest) -> ApiCall:
        """SubmitTextToImageJob (ImageToImage is a synchronous call of its own, in `submit`)."""
        opts = self._options(request)
        return self.api(TEXT_JOB, {"Prompt": request.prompt, "Resolution": f"{request.width}:{request.height}",
                                   "Seed": request.seed or None, "LogoAdd": int(opts["LogoAdd"]),
                                   "LogoParam": opts.get("LogoParam"), "Revise": int(opts.get("Revise", 0))},
                        safe_to_repeat=False)

    def read_job_id(self, answer: Any) -> str:
        if not answer.get("JobId"):
            raise SubmitUnknown(f"{TEXT_JOB} answered without a JobId", provider=PROVIDER)
        return str(answer["JobId"])

    def can_fetch_again(self, job_id: str) -> bool:
        return not job_id.startswith(SYNC_PREFIX)  # an ImageToImage base64 answer is given once

    def answered_at_submit(self, job_id: str) -> bool:
        return job_id.startswith(ANSWER_PREFIX)  # ImageToImage answered with a result URL: the call is over

    def answer_urls(self, job_id: str) -> list[str]:
        return list(self._sync_results.get(job_id, [])) if self.answered_at_submit(job_id) else []

    def poll(self, job_id: str) -> JobStatus:
        if job_id.startswith((SYNC_PREFIX, ANSWER_PREFIX)):
            results = self._sync_results.get(job_id)
            if results is None:  # a sync answer lives only in the process that got it
                raise SubmitUnknown(f"the result of synchronous call {job_id} was lost with its process",
                                    provider=PROVIDER)
            return JobStatus(job_id=job_id, state=JobState.SUCCEEDED, provider_status="sync", result_urls=results)
        return super().poll(job_id)

    def poll_call(self, job_id: str) -> ApiCall:
        return self.api(TEXT_QUERY, {"JobId": job_id})

    def read_status(self, job_id: str, answer: Any) -> JobStatus:
        code = str(answer.get("JobStatusCode", "1"))
        reason = answer.get("JobErrorMsg") or None
        if answer.get("JobErrorCode"):
            reason = f"{answer['JobErrorCode']}: {reason or ''}"
        return JobStatus(job_id=job_id, state=STATUS.get(code, JobState.QUEUED), provider_status=code,
                         result_urls=list(answer.get("ResultImage") or []), reason=reason)

    def job_failure(self, status: JobStatus) -> ProviderError:
        """A job that ended "4", named with its `JobErrorCode` and `JobErrorMsg`. Tencent bills
        successful calls, so a failed job settles the item's budget at nothing, except a failed
        review: the image was made, then refused, so it counts as maybe charged, as
        ImageToImage's does. A content code is a rejection; any other code (`ServerError`, an
        account's) is the job's failure (`JobFailed`), recorded as such: mapped as an answer's
        error it left the record `submitted`, its dead job polled on every rerun and counted as
        paid. It is not tried again here (that would be a new job)."""
        code, _, text = (status.reason or "").partition(":")
        said = f"job {status.job_id} failed: {text.strip() or 'no message'}"
        if code == GENERATE_FAILED:
            return ReviewFailed(said)
        if issubclass(error_kind(code, JobFailed), ContentRejected):
            return map_error(code, said)
        return JobFailed(f"job {status.job_id} failed: {status.reason or 'no reason given'}", provider=PROVIDER,
                         code=status.provider_status)

    def fetch(self, status: JobStatus) -> list[bytes]:
        out = [base64.b64decode(value) if not is_url(value) else
               download(value, provider=PROVIDER, timeout=self.timeout, attempts=self.max_attempts, expiry="an hour")
               for value in status.result_urls]
        self._sync_results.pop(status.job_id, None)
        return out

    def refine_cost(self) -> float:
        return 1.0  # one billable call, as every estimate of this provider counts

    def refine(self, data: bytes, journal: Journal | None = None, result_url: str | None = None,
               unknown_hold: float = 0.0) -> bytes:
        """RefineImage: the provider's upscaler (long side to 2048), holding its in-flight slot.

        `journal` hears `sending` right before the paid call, `submitted` with the result URL
        among its `answer_urls` once it answered, and `done` with the image; `result_url`
        resumes a paid call whose download failed (the URL lives an hour), paying nothing. A call whose answer was not seen keeps
        the slot `unknown_hold` seconds: it may still be running, against a concurrency of one."""
        journal = journal or NoJournal()
        if result_url is None:
            check_image(data, "upscale input", max_base64=REFINE_MAX_BASE64)
            with self._limiter.job(REFINE):
                journal.sending()
                try:
                    answer = self.call(REFINE, {"InputImage": base64.b64encode(data).decode(), "RspImgType": "url"},
                                       safe_to_repeat=False)
                except SubmitUnknown as exc:
                    journal.unknown(exc)
                    time.sleep(unknown_hold)
                    raise
                except ChargedRejection as exc:  # the upscale was made, then refused: maybe charged
                    journal.charged_refusal(exc)
                    raise
                except BaseException as exc:
                    journal.refused(exc)
                    raise
            try:
                result_url = result_image(answer, REFINE)
            except SubmitUnknown as exc:
                journal.unknown(exc)
                raise
            # The URL (a capability, an hour) goes with the record, not as its job id: a job id is
            # in log lines and `ledger show`.
            journal.submitted(f"{ANSWER_PREFIX}{uuid.uuid4().hex}", answer_urls=[result_url])
        status = JobStatus(job_id="refine", state=JobState.SUCCEEDED, provider_status="sync", result_urls=[result_url])
        self.refuse_private_results(status)
        image = self.fetch(status)[0]
        journal.done("refine", [image])
        return image
