"""The provider interface: what every image provider Block does, in provider-neutral types.

A provider is one module in `blocks/` with one Block class implementing `ImageProvider`:
validate a request offline, upload an input image, estimate credits, submit a job, poll it,
download its results. `run_job` chains submit, poll and fetch the same way for all of them.

Sending is written once, here: a provider shapes each request as an `ApiCall` and reads the
answer into its own error types (`read_answer`); `ImageProvider.send` takes the request slot,
sends, turns transport faults into `TransientError` or `SubmitUnknown` and retries with backoff.
"""

from __future__ import annotations

import contextlib
import email.utils
import ipaddress
import json
import logging
import random
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any, ClassVar, Literal, Protocol, TypeVar
from urllib.parse import urlparse

import httpx
from prefect.blocks.core import Block
from pydantic import BaseModel, Field, PrivateAttr, model_validator

from blocks.errors import (BadRequest, ChargedRejection, JobFailed, ProviderError, ResultExpired, SubmitUnknown,
                           TransientError)
from blocks.first_poll import FirstPoll, first_poll


class GenerationRequest(BaseModel):
    """One provider job: a prompt and settings, for `count` images."""

    request_id: str = Field(description="Deterministic id; the same id must never be paid twice.")
    prompt: str
    negative_prompt: str = ""
    seed: int
    count: int = 1
    width: int
    height: int
    model: str | None = None
    steps: int | None = None
    sampler: str | None = None
    cfg_scale: float | None = None
    vae: str | None = None
    denoising_strength: float | None = None
    has_input: bool = Field(False, description="The item has an input image (image-to-image).")
    input_ref: str | None = Field(None, description="What `upload` returned for the input image.")
    upscale_factor: int | None = Field(None, description="Provider-side upscale in the same job.")
    options: dict[str, Any] = Field(default_factory=dict)
    callback_url: str | None = Field(None, description="Where the provider POSTs the job's end: this job's "
                                     "capability URL of `imagegen callbacks serve` (set at submit time).")

    @property
    def output_size(self) -> tuple[int, int]:
        factor = self.upscale_factor or 1
        return self.width * factor, self.height * factor


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)


class JobStatus(BaseModel):
    """A job as the provider last reported it."""

    job_id: str
    state: JobState
    provider_status: str = Field(description="The provider's own status word.")
    progress: float | None = None
    result_urls: list[str] = Field(default_factory=list)
    reason: str | None = None
    rejected: dict[int, str] = Field(default_factory=dict,
                                     description="Images (1-based) the provider's own audit failed, with why.")


@dataclass(frozen=True)
class Heard:
    """What a provider's callback says: the job, its state word, and the nonce it echoes."""

    job_id: str
    state: str
    nonce: str | None = None


class Waker(Protocol):
    """Where a job's callback is heard (the flow plugs in Prefect's event stream)."""

    def wait(self, seconds: float, job_id: str | None = None) -> bool:
        """Block until a callback naming `job_id` (any job where None) or no job at all (a body
        the receiver could not read) is heard, or `seconds` pass; True when heard."""

    def heard(self) -> Any | None:
        """The body of the job's last callback the receiver verified, or None."""


class ResultRefused(BadRequest):
    """A result URL the Block will not download: a private address (never, outside the
    sandbox), or, for a callback's word, a host the Block does not declare."""


def private_host(host: str) -> bool:
    """True for localhost and for IP literals that are not global (loopback, LAN, link-local),
    in every form the resolver takes: `127.1`, `2130706433`, `0x7f000001`, `0177.0.0.1` and `0`
    reach an address as surely as `127.0.0.1` does."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return not ipaddress.ip_address(host).is_global
    except ValueError:
        pass
    try:
        return not ipaddress.IPv4Address(socket.inet_aton(host)).is_global
    except (OSError, UnicodeEncodeError, ValueError):  # not an address in any form: a name
        return False


def origin(url: str) -> tuple[str, str, int | None]:
    """A URL's scheme, host and port (the default port made explicit)."""
    parsed = urlparse(url)
    try:
        port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    except ValueError:  # not a port: matches nothing
        port = -1
    return parsed.scheme, (parsed.hostname or "").lower(), port


class CreditEstimate(BaseModel):
    """What a request will cost, and where the number came from."""

    credits: float
    source: Literal["api", "formula"]
    money: float | None = None
    currency: str | None = None
    note: str | None = Field(None, description="What the number rests on where the provider does not say.")


class JobResult(BaseModel):
    """A finished job with its images downloaded."""

    job_id: str
    images: list[bytes]
    credits: float
    credits_source: Literal["api", "formula", "charged"]
    polls: int
    rejected: dict[int, str] = Field(default_factory=dict)


class Journal(Protocol):
    """Where `run_job` records a paid job's progress as it happens (the flow plugs in its ledger)."""

    def sending(self) -> None:
        """The submit is about to go on the wire (inside the job slot)."""

    def refused(self, error: BaseException) -> None:
        """The provider definitively created nothing; the same request may be sent again."""

    def charged_refusal(self, error: BaseException) -> None:
        """The provider refused after doing the paid work (`ChargedRejection`): nothing to
        collect, the call counted as maybe charged; the same request may be sent again."""

    def unknown(self, error: BaseException) -> None:
        """The submit may have reached the provider."""

    def submitted(self, job_id: str, charged: float | None = None, answer_urls: list[str] | None = None) -> None:
        """The provider's job id is known (and what it said it charged, where it says so; and
        the result URLs a synchronous call answered with, downloaded again from if need be)."""

    def done(self, job_id: str, images: list[bytes]) -> None:
        """A synchronous answer's images, which the provider cannot give again."""


class NoJournal:
    """Records nothing: for unit tests and one-off scripts. The flow never uses it."""

    def sending(self) -> None: ...
    def refused(self, error: BaseException) -> None: ...
    def charged_refusal(self, error: BaseException) -> None: ...
    def unknown(self, error: BaseException) -> None: ...
    def submitted(self, job_id: str, charged: float | None = None, answer_urls: list[str] | None = None) -> None: ...
    def done(self, job_id: str, images: list[bytes]) -> None: ...


class Limiter(Protocol):
    """Where a provider's published limits are held (the flow plugs in Prefect's server)."""

    def request(self, action: str) -> contextlib.AbstractContextManager[None]:
        """Around one API request of `action`: enter when it may be sent, exit once answered.
        Exiting must not fail (no I/O there): a paid call's answer would be lost with it."""

    def job(self, action: str) -> contextlib.AbstractContextManager[None]:
        """Hold one in-flight job slot of `action` for the whole job, submit to result."""


class NoLimits:
    """No limits: for unit tests and one-off scripts. The flow never uses it."""

    def request(self, action: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def job(self, action: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@dataclass(frozen=True)
class ApiCall:
    """One request to a provider's API, shaped by the provider and sent by `ImageProvider.send`."""

    action: str
    """The limiter action whose request slot the call takes (its rate limit, where it has one)."""
    method: str
    path: str
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    safe_to_repeat: bool = True
    """False for a call that may charge and that the provider does not dedupe: a fault after it
    was sent is `SubmitUnknown`, never repeated."""
    label: str = ""
    """How errors name the call (default: method and path)."""
    timeout: float | None = None
    """Seconds this call may take to answer, where it differs from the client's (a held poll)."""

    @property
    def what(self) -> str:
        return self.label or f"{self.method} {self.path}"

    @classmethod
    def with_json(cls, action: str, method: str, path: str, payload: Any, **kw: Any) -> ApiCall:
        """A call carrying `payload` as compact UTF-8 JSON (the bytes signed are the bytes sent)."""
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
        return cls(action, method, path, body=body, headers=headers, **kw)


def status_error(what: str, response: httpx.Response, provider: str) -> ProviderError:
    """An HTTP error status as our type: 429 and 5xx are transient (with their Retry-After)."""
    code = response.status_code
    if code == 429 or code >= 500:
        return TransientError(f"{what}: HTTP {code}", provider=provider, retry_after=retry_after_seconds(response))
    return BadRequest(f"{what}: HTTP {code}", provider=provider)


class CallbackFields(BaseModel):
    """The fields of a provider whose jobs call back when they end (TAMS, 触站AI), declared
    once. The callback URL's own field keeps the provider's name for it (`notify_url`,
    `callback`); `result_domains` are the provider's own domains, `result_hosts`' default."""

    result_domains: ClassVar[tuple[str, ...]] = ()

    callback_fallback_seconds: float = Field(60.0, gt=0, description=(
        "Seconds a job waits for its callback before polling anyway (a lost callback, the receiver down)."))
    trust_callbacks: bool = Field(False, description=(
        "Take a callback that came through the job's own signed URL, naming its job, as the job's end "
        "without a confirming status request, when it says the job succeeded with results on result_hosts "
        "(a failure is always confirmed by a poll)."))
    result_hosts: list[str] | None = Field(None, description=(
        "Domains (and their subdomains) a trusted callback's result URLs may be on; other hosts are polled for. "
        "The endpoint's own host is always allowed. Default: the provider's own domains."))

    @model_validator(mode="before")
    @classmethod
    def _provider_domains(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("result_hosts") is None:
            data = {**data, "result_hosts": list(cls.result_domains)}
        return data


class ImageProvider(Block, ABC):
    """A provider account: subclasses hold credentials and speak one wire protocol."""

    provider_name: ClassVar[str]
    upscale_in_job: ClassVar[bool] = True
    """True when the provider's upscaler is part of the generation job; else `refine` is a call."""
    idempotent_submit: ClassVar[bool] = False
    """True when submitting the same request id twice returns the first job (no second charge)."""
    callback_wake_gap: ClassVar[float] = 5.0
    """Least seconds between two looks at one job that wake-ups cause (a flood of forged events
    costs one status request a gap, whatever their number)."""
    credit_unit: ClassVar[str] = "credits"
    """What the provider's estimates and `run.max_credits` count."""
    sample_options: ClassVar[dict[str, Any]] = {}
    """`generate.options` a plain text-to-image request needs (the benchmark's workload uses them)."""
    spec_fields: ClassVar[dict[str, str]] = {}
    """Request fields the client fills from validated spec fields (wire name -> spec field):
    `generate.options` may not set them, or an option would override a checked value."""

    default_timeout: ClassVar[float] = 30.0
    """The `timeout` a Block of this provider gets when none is given."""

    timeout: float = Field(30.0, gt=0, description=(
        "Seconds for one HTTP request (default 30; Tencent's 60, as its synchronous calls take a while)."))
    max_attempts: int = Field(5, ge=1, description="Attempts per call through transient errors (429, 5xx, network).")

    _limiter: Limiter = PrivateAttr(default_factory=NoLimits)
    _http: httpx.Client | None = PrivateAttr(default=None)
    _paid_http: httpx.Client | None = PrivateAttr(default=None)
    _http_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def _inject_field_positions(cls, schema: dict[str, Any], model_cls: type[Block], by_alias: bool) -> None:
        """The form's order in the Prefect UI: the provider's own fields (credentials, endpoint)
        first, then those every provider shares (`timeout`, `max_attempts`, the callback fields),
        which pydantic would list first as inherited."""
        shared = set(ImageProvider.model_fields) | set(CallbackFields.model_fields)
        names = list(model_cls.model_fields)
        for position, name in enumerate([n for n in names if n not in shared] + [n for n in names if n in shared]):
            info = model_cls.model_fields[name]
            key = (info.alias or name) if by_alias else name
            if key in schema.get("properties", {}):
                schema["properties"][key]["position"] = position

    @model_validator(mode="before")
    @classmethod
    def _provider_defaults(cls, data: Any) -> Any:
        """The provider's own default `timeout` where the Block gives none."""
        if isinstance(data, dict) and data.get("timeout") is None:
            data = {**data, "timeout": cls.default_timeout}
        return data

    def client(self, fresh_connections: bool = False) -> httpx.Client:
        """The account's HTTP client, built once and shared by every thread; with
        `fresh_connections`, its twin that opens a connection for every request (for calls that
        may charge: see `new_client`)."""
        with self._http_lock:
            if fresh_connections:
                self._paid_http = self._paid_http or self.new_client(keep_alive=False)
                return self._paid_http
            if self._http is None:
                self._http = self.new_client()
            return self._http

    def new_client(self, keep_alive: bool = True) -> httpx.Client:
        """Build the HTTP client from `client_options`. Without `keep_alive` no connection is
        reused: a server closes an idle connection when its own timer says so (5 s is common),
        and a request that goes out on it just then fails as a cut connection, which for a
        call that may charge is an unknown outcome (`SubmitUnknown`, held for a person)."""
        limits = {} if keep_alive else {"limits": httpx.Limits(max_keepalive_connections=0)}
        return httpx.Client(**self.client_options(), **limits)

    @abstractmethod
    def client_options(self) -> dict[str, Any]:
        """The HTTP client's base URL, timeout, auth and headers (sync or async client alike)."""

    def use_limiter(self, limiter: Limiter) -> None:
        """Take every request and job slot from `limiter` from now on."""
        self._limiter = limiter

    def job_action(self, request: GenerationRequest) -> str:
        """The provider action a request runs as (limits may differ per action)."""
        return "job"

    @classmethod
    def sample_request(cls, width: int = 512, height: int = 512) -> GenerationRequest:
        """A plain text-to-image request this provider accepts (for benchmarks and probes)."""
        return GenerationRequest(request_id="sample", prompt="a product shot", seed=1, width=width, height=height,
                                 options=dict(cls.sample_options))

    @classmethod
    def text_job_actions(cls) -> tuple[str, str, str]:
        """The limiter actions of one plain text-to-image job: its submit's and its polls'
        request slots and its in-flight slot, read from its request shapes (no credentials)."""
        block, request = cls.model_construct(), cls.sample_request()
        return block.submit_call(request).action, block.poll_call("sample").action, block.job_action(request)

    # --- sending ----------------------------------------------------------------------------
    @property
    def attempts(self) -> int:
        """Attempts per call through transient faults: the Block's `max_attempts` field."""
        return self.max_attempts

    def send(self, call: ApiCall) -> Any:
        """Send `call` in its request slot, retrying transient faults with backoff (within
        `CALL_DEADLINE`), and return what `read_answer` makes of the answer."""
        seen: Counter[str] = Counter()

        def once() -> Any:
            try:
                response = self._exchange(call)
                with self.reading(call):
                    return self.read_answer(call, response)
            except TransientError as exc:
                seen[exc.code or ""] += 1
                raise self.settle(exc, seen[exc.code or ""]) from None

        return with_retries(once, self.attempts, extra_wait=self.retry_steps)

    def _exchange(self, call: ApiCall) -> httpx.Response:
        """One request inside the action's request slot. The slot is taken and given back
        outside the transport-error handling, so a fault of the limiter (its Prefect API, over
        httpx too) surfaces as the limiter's, never as the provider's; and a request the
        limiter never let through is never taken for a paid call that may have been sent."""
        fault: httpx.TransportError | httpx.DecodingError | None = None
        with self._limiter.request(call.action):
            try:
                extra = {} if call.timeout is None else {"timeout": call.timeout}
                return self.client(fresh_connections=not call.safe_to_repeat).request(
                    call.method, call.path, content=call.body, headers=dict(call.headers), **extra)
            except (httpx.TransportError, httpx.DecodingError) as exc:  # a body that does not decode came back
                fault = exc
        raise self.transport_fault(call, fault)

    def unclear(self, call: ApiCall, what: str) -> ProviderError:
        """An answer that does not say what became of the request: transient where repeating
        `call` is safe, else `SubmitUnknown` (a paid call that may have been acted on)."""
        return (TransientError if call.safe_to_repeat else SubmitUnknown)(what, provider=self.provider_name)

    def unreadable(self, call: ApiCall, exc: Exception) -> ProviderError:
        """An answer this client could not read (a field missing or of another type): the
        request went out, so a paid call may have been charged (`SubmitUnknown`, never taken for
        a refusal and sent again); a call safe to repeat is transient."""
        what = f"{call.what}: its answer could not be read ({type(exc).__name__}: {str(exc)[:200]})"
        return self.unclear(call, what if call.safe_to_repeat else f"{what}; it may have been charged, so it is not "
                            "repeated")

    @contextlib.contextmanager
    def reading(self, call: ApiCall) -> Iterator[None]:
        """Reading `call`'s answer: a fault of this client's reading (not a provider's error)
        is `unreadable`, since the request went out."""
        try:
            yield
        except ProviderError:
            raise
        except Exception as exc:
            raise self.unreadable(call, exc) from exc

    def transport_fault(self, call: ApiCall, exc: httpx.TransportError | httpx.DecodingError | None) -> ProviderError:
        """A cut connection or a timeout: transient where the request cannot have been acted
        on (it never connected, or repeating it is safe), else `SubmitUnknown`."""
        what = f"{call.what}: {type(exc).__name__}"
        if call.safe_to_repeat or isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return TransientError(what, provider=self.provider_name)
        return SubmitUnknown(f"{what} after the request was sent; it may have been charged, so it is not "
                             "repeated", provider=self.provider_name)

    def read_answer(self, call: ApiCall, response: httpx.Response) -> Any:
        """The answer's content, or the provider's error as our type. Providers override it with
        their own envelope and error codes; this default reads a JSON body of a 200."""
        if response.status_code != 200:
            raise status_error(call.what, response, self.provider_name)
        return self.json_answer(call, response)

    def json_answer(self, call: ApiCall, response: httpx.Response) -> Any:
        """The answer's JSON; an unreadable one is transient, or `SubmitUnknown` for a paid call."""
        try:
            return response.json()
        except ValueError:
            raise self.unclear(call, f"{call.what}: the answer is not JSON") from None

    def settle(self, exc: TransientError, times: int) -> ProviderError:
        """What a transient error becomes the `times`-th time one call gets its code (a provider
        may stop retrying a code after a few); by default it stays transient."""
        return exc

    def retry_steps(self, exc: TransientError) -> int:
        """Extra backoff steps before retrying `exc` (for errors that need a longer pause)."""
        return 0

    @classmethod
    def output_size(cls, request: GenerationRequest) -> tuple[int, int] | None:
        """Width and height of the images the job returns; None when only the run can tell."""
        return request.output_size

    @classmethod
    def notes(cls, request: GenerationRequest) -> list[str]:
        """Things the provider accepts but a person should know (each `field: what`), offline."""
        return []

    @classmethod
    def refine_check(cls, width: int, height: int, factor: int) -> None:
        """Raise `BadRequest` when the provider's separate upscaler cannot give `factor`."""
        raise BadRequest(f"upscale.engine: {cls.provider_name} has no separate upscaler; its upscale is part of "
                         "the job", provider=cls.provider_name, code="validation")

    def refine_cost(self) -> float:
        """Credits of one `refine` call (0 where the upscale is part of the job)."""
        return 0.0

    def refine(self, data: bytes) -> bytes:
        """Upscale one image with the provider's separate upscaler (where `upscale_in_job` is False)."""
        raise BadRequest(f"{self.provider_name} has no separate upscaler", provider=self.provider_name)

    @classmethod
    def estimate_offline(cls, request: GenerationRequest) -> CreditEstimate | None:
        """Credits by the provider's published formula, or None where none is published."""
        return None

    def estimate_key(self, request: GenerationRequest) -> str:
        """Requests with the same key cost the same; by default every request is its own."""
        return request.model_dump_json(exclude={"request_id", "callback_url"})

    @classmethod
    @abstractmethod
    def validate(cls, request: GenerationRequest) -> None:
        """Raise `BadRequest` naming the field when the provider would refuse `request`.

        Offline and credential-free, so a spec can be checked before any paid call."""

    @abstractmethod
    def upload(self, data: bytes, content_type: str) -> str:
        """Upload an input image; return the reference to put in `input_ref`."""

    @abstractmethod
    def estimate(self, request: GenerationRequest) -> CreditEstimate:
        """Credits `request` will cost."""

    def submit(self, request: GenerationRequest) -> str:
        """Start the job; return the provider's job id."""
        call = self.submit_call(request)
        answer = self.send(call)
        with self.reading(call):  # e.g. a charge that is not a number: the job may exist
            return self.read_job_id(answer)

    def poll(self, job_id: str) -> JobStatus:
        """The job's current status."""
        return self.read_status(job_id, self.send(self.poll_call(job_id)))

    # The request shapes of an asynchronous job (the benchmark's plain client sends them too).
    @abstractmethod
    def submit_call(self, request: GenerationRequest) -> ApiCall:
        """The call that starts `request`'s job."""

    @abstractmethod
    def read_job_id(self, answer: Any) -> str:
        """The job id in a submit's answer."""

    @abstractmethod
    def poll_call(self, job_id: str) -> ApiCall:
        """The call that asks for a job's status."""

    @abstractmethod
    def read_status(self, job_id: str, answer: Any) -> JobStatus:
        """A job's status from a poll's answer."""

    @abstractmethod
    def fetch(self, status: JobStatus) -> list[bytes]:
        """Download the result images of a succeeded job (their URLs expire)."""

    def charged(self, job_id: str) -> float | None:
        """What the provider said it charged for a job this process submitted, where its submit
        answer says so (触站AI's `used`); None elsewhere (the estimate stands)."""
        return None

    def can_fetch_again(self, job_id: str) -> bool:
        """False when the job's results came with the submit answer and cannot be asked for
        again (a synchronous call): they must be kept before anything else happens."""
        return True

    def answered_at_submit(self, job_id: str) -> bool:
        """True when a job's submit answer already ended it with result URLs (a synchronous call
        whose results can be downloaded again for a while): no poll to wait for."""
        return False

    def answer_urls(self, job_id: str) -> list[str]:
        """The result URLs a synchronous call answered with (`answered_at_submit`), recorded
        apart from the job id (they are capabilities: never logged); empty elsewhere."""
        return []

    # --- callbacks (where the provider calls back at a job's end) ------------------------------
    @property
    def callback_base(self) -> str | None:
        """The public URL of `imagegen callbacks serve` this account's jobs call back to (a
        Block field where the provider has callbacks); None: results are polled for."""
        return None

    @property
    def trusts_callbacks(self) -> bool:
        """True where the Block's `trust_callbacks` takes a verified callback's own status as
        the job's end (no confirming poll); its results are still downloaded from the provider."""
        return isinstance(self, CallbackFields) and self.trust_callbacks

    @property
    def callback_fallback(self) -> float:
        """Seconds a job with a callback waits for it before polling anyway (a lost callback)."""
        return self.callback_fallback_seconds if isinstance(self, CallbackFields) else 60.0


    def result_url_declared(self, url: str) -> bool:
        """True for a result URL on a host the Block declares (its `result_hosts` and their
        subdomains) or on its own endpoint's origin (the API host; the sandbox's emulator). A
        callback's result URLs are downloaded only then; never from another private address."""
        scheme, host, _ = origin(url)
        if scheme not in ("http", "https") or not host:
            return False
        endpoint = str(getattr(self, "endpoint", "") or "")
        if endpoint and origin(url) == origin(endpoint):
            return True
        if private_host(host):
            return False
        declared = (self.result_hosts or []) if isinstance(self, CallbackFields) else []
        return any(host == d or host.endswith("." + d) for d in (h.lower().strip(".") for h in declared))

    def refuse_private_results(self, status: JobStatus) -> None:
        """`ResultRefused` for a result URL on a private address, unless the provider's own
        endpoint is on one (the sandbox): a worker fetches from the provider's world only."""
        endpoint_host = origin(str(getattr(self, "endpoint", "") or ""))[1]
        for url in status.result_urls:
            scheme, host, _ = origin(url)
            if scheme in ("http", "https") and private_host(host) and not private_host(endpoint_host):
                raise ResultRefused(f"job {status.job_id}: a result URL on a private address ({host}) is not fetched",
                                    provider=self.provider_name, code="ResultRefused")

    def owns_job(self, job_id: str, request: GenerationRequest) -> bool:
        """True when the provider's own status of `job_id` names `request` (`status_names`):
        the only ground on which a job a callback names is adopted for a lost submit answer.
        False where the provider does not know the job or its status does not say."""
        try:
            answer = self.send(self.status_call(job_id))
        except BadRequest:
            return False
        return self.status_names(answer, request)

    def status_call(self, job_id: str) -> ApiCall:
        """The call that asks for a job's status at once (never held; by default `poll_call`)."""
        return self.poll_call(job_id)

    @classmethod
    def status_names(cls, answer: Any, request: GenerationRequest) -> bool:
        """True when a status answer names `request` (its nonce or request id, and its prompt);
        providers whose status says so override it. By default it never does."""
        return False

    @classmethod
    def read_callback(cls, body: Any) -> Heard:
        """The job and state a callback's JSON body names (`ValueError` if it names none)."""
        raise ValueError(f"{cls.provider_name} sends no callbacks")

    @classmethod
    def callback_nonce(cls, request_id: str) -> str | None:
        """The nonce a callback for `request_id` must echo, where the provider echoes one."""
        return None

    def run_job(
        self,
        request: GenerationRequest,
        *,
        poll_interval: float,
        timeout: float,
        estimate: CreditEstimate | None = None,
        job_id: str | None = None,
        journal: Journal | None = None,
        unknown_hold: float = 0.0,
        waker: Waker | None = None,
    ) -> JobResult:
        """Submit (unless `job_id` resumes a job), poll to a final state and fetch, holding
        one in-flight slot throughout and telling `journal` each step as it happens.

        A submit that may have reached the provider is never repeated blindly: where the
        provider dedupes request ids it is asked again with the same id; elsewhere it raises
        `SubmitUnknown` after keeping the job slot `unknown_hold` seconds (the job may be
        running and count against the provider's cap). With a `waker` (the request carries a
        callback URL), the wait is for the callback, polling once to confirm it, and only
        every `callback_fallback` seconds without one."""
        journal = journal or NoJournal()
        estimate = estimate or self.estimate(request)
        with self._limiter.job(self.job_action(request)):
            fresh = job_id is None
            if job_id is None:
                job_id = self._submit_recorded(request, journal, unknown_hold)
            if not self.can_fetch_again(job_id):  # its images exist only in this process: kept at once
                return self.answered(self.poll(job_id), estimate, journal)
            over = self.answered_at_submit(job_id)  # over already: its result URLs download after the slot
            if not over:
                status, polls = self._held_wait(request, job_id, fresh=fresh, poll_interval=poll_interval,
                                                timeout=timeout, waker=waker)
        if over:
            return self.answered(self.poll(job_id), estimate, journal)
        # The job is over at the provider: its slot is free while the results download.
        if status.state is not JobState.SUCCEEDED:
            raise self.job_failure(status)
        self.refuse_private_results(status)
        charged = self.charged(job_id)
        return JobResult(job_id=job_id, images=self.fetch(status),
                         credits=estimate.credits if charged is None else charged,
                         credits_source=estimate.source if charged is None else "charged", polls=polls,
                         rejected=status.rejected)

    def _held_wait(self, request: GenerationRequest, job_id: str, *, fresh: bool, poll_interval: float,
                   timeout: float, waker: Waker | None) -> tuple[JobStatus, int]:
        """Wait for a job to end (its slot held), learning how long a fresh one takes."""
        submitted = time.monotonic()
        learner = self._first_poll(request) if fresh and waker is None else None
        first_wait = min(timeout, learner.wait(poll_interval)) if learner else poll_interval if fresh else 0.0
        status, polls, last_took = self._wait(job_id, poll_interval=poll_interval, timeout=timeout,
                                              first_wait=first_wait, waker=waker)
        if learner is not None:  # less a stall of the last status request (a limiter whose server stalled)
            stalled = last_took - poll_interval if last_took > STALLED_POLLS * poll_interval else 0.0
            learner.ended(time.monotonic() - submitted - stalled)
        return status, polls

    def answered(self, status: JobStatus, estimate: CreditEstimate, journal: Journal) -> JobResult:
        """A synchronous call's answer (`status`): its images (given in it, or downloaded from
        the result URLs recorded with its job), kept in S3 at once: the provider cannot give
        them again, and a rerun reads them back whenever it comes."""
        self.refuse_private_results(status)
        images = self.fetch(status)
        journal.done(status.job_id, images)
        return JobResult(job_id=status.job_id, images=images, credits=estimate.credits,
                         credits_source=estimate.source, polls=0)

    def _submit_recorded(self, request: GenerationRequest, journal: Journal, unknown_hold: float) -> str:
        """One submit, recorded: sending, then submitted, refused or unknown. Asked again with
        the same request where the provider dedupes it, and after a refusal that may have been
        charged where the provider says to try again (`asks_again`): each such ask is reserved
        and recorded anew, so the run's budget holds every call that may have been charged."""
        asked, charged = 0, 0
        while True:
            asked += 1
            journal.sending()
            try:
                job_id = self.submit(request)
            except (SubmitUnknown, TransientError) as exc:
                maybe_sent = isinstance(exc, SubmitUnknown) or self.idempotent_submit
                (journal.unknown if maybe_sent else journal.refused)(exc)
                if self.idempotent_submit and asked == 1:
                    continue  # the same request id finds the job, or creates it once
                if isinstance(exc, SubmitUnknown):
                    time.sleep(unknown_hold)
                raise
            except ChargedRejection as exc:
                charged += 1
                journal.charged_refusal(exc)
                exc.calls = charged
                if self.asks_again(request, exc):
                    continue
                raise type(exc)(f"{exc.message} ({charged} call{'s' if charged > 1 else ''}, "
                                f"{'each ' if charged > 1 else ''}maybe charged)", provider=exc.provider,
                                code=exc.code, calls=charged) from None
            except BaseException as exc:
                journal.refused(exc)
                raise
            if self.can_fetch_again(job_id):  # else `run_job` records the images themselves at once
                journal.submitted(job_id, self.charged(job_id), self.answer_urls(job_id) or None)
            return job_id

    def asks_again(self, request: GenerationRequest, refused: ChargedRejection) -> bool:
        """True to send `request` again after `refused` (its `calls` so far), where the provider
        says to try again; by default never."""
        return False

    def job_failure(self, status: JobStatus) -> ProviderError:
        """The error a job that ended without success stands for (providers may refine it)."""
        return JobFailed(f"job {status.job_id} ended {status.provider_status}: {status.reason or 'no reason given'}",
                         provider=self.provider_name, code=status.provider_status)

    def _wait(self, job_id: str, *, poll_interval: float, timeout: float,
              first_wait: float = 0.0, waker: Waker | None = None) -> tuple[JobStatus, int, float]:
        """Poll to a final state; return it, the polls it took and how long the last one took
        (its rate slot and retries included). A job just submitted is first polled after
        `first_wait` (no job finishes at once, and every poll counts against rate limits); a
        resumed one at once. With a `waker`, each poll waits for the job's callback, or
        `callback_fallback` seconds when none comes."""
        deadline = time.monotonic() + timeout
        polls = 0
        if waker is not None:
            return (*self._wait_for_callback(job_id, waker, deadline, resumed=first_wait == 0.0), 0.0)
        if self.holds_polls:  # each status request is held until the job ends: ask at once, again at once
            first_wait, poll_interval = 0.0, min(poll_interval, HELD_POLL_PAUSE)
        time.sleep(first_wait)
        while True:
            asked = time.monotonic()
            status = self.poll(job_id)
            polls += 1
            if status.state.final:
                return status, polls, time.monotonic() - asked
            if time.monotonic() > deadline:
                raise self._timed_out(status, f"after {timeout:.0f}s")
            time.sleep(poll_interval)

    def _wait_for_callback(self, job_id: str, waker: Waker, deadline: float, *,
                           resumed: bool) -> tuple[JobStatus, int]:
        """Wait for the callback, then look with one poll (a callback is a hint); poll anyway
        every `callback_fallback` seconds, and at once for a resumed job (its callback may have
        come while no one listened). Wake-ups look at most once per `callback_wake_gap`."""
        polls, looked = 0, -self.callback_wake_gap
        due = resumed
        while True:
            if not due and waker.wait(max(0.0, min(self.callback_fallback, deadline - time.monotonic())), job_id):
                time.sleep(max(0.0, min(looked + self.callback_wake_gap, deadline) - time.monotonic()))
                looked = time.monotonic()
                if (status := self._trusted_end(job_id, waker)) is not None:
                    return status, polls
            due = False
            status = self.poll(job_id)
            polls, looked = polls + 1, time.monotonic()
            if status.state.final:
                return status, polls
            if time.monotonic() > deadline:
                raise self._timed_out(status, "by its deadline, and no callback ended it")

    def _timed_out(self, status: JobStatus, when: str) -> TransientError:
        return TransientError(f"job {status.job_id} not finished {when} (last: {status.provider_status})",
                              provider=self.provider_name, code="JobTimeout")

    def _trusted_end(self, job_id: str, waker: Waker) -> JobStatus | None:
        """The job's success as its verified callback tells it, where the Block trusts callbacks
        and the callback names this job, succeeded, with results only on hosts the Block
        declares (`result_url_declared`); else None, and a poll looks. A failure is never taken
        from a callback: a forged `fail` would fail a paid job that is running."""
        if not self.trusts_callbacks or (body := waker.heard()) is None:
            return None
        try:
            if self.read_callback(body).job_id != job_id:
                return None
            status = self.read_status(job_id, body)
        except Exception:  # noqa: BLE001 - an unreadable body is confirmed by a poll
            return None
        if status.state is not JobState.SUCCEEDED or not status.result_urls:
            return None
        foreign = [url for url in status.result_urls if not self.result_url_declared(url)]
        if foreign:
            _retry_log().warning("job %s: its callback names results on %s, not a host %s declares; polled instead",
                                 job_id, ", ".join(sorted({origin(u)[1] or "?" for u in foreign})), self.provider_name)
            return None
        return status

    @property
    def polls_are_scarce(self) -> bool:
        """True where status requests spend a rate that binds the provider's lane (TAMS: one rate
        for every call; 触站AI: one for all tasks' status requests), so a poll finding a job still
        running is worth avoiding: a job just submitted is then first polled after the time
        recent jobs took (`blocks.first_poll`)."""
        return False

    def _first_poll(self, request: GenerationRequest) -> FirstPoll | None:
        """The learned first-poll wait of `request`'s job, where polls are scarce (and not held)."""
        if not self.polls_are_scarce or self.holds_polls:
            return None
        return first_poll((self.provider_name, str(getattr(self, "endpoint", "")), self.job_action(request)))

    @property
    def holds_polls(self) -> bool:
        """True where `poll_call` asks the provider to hold its answer until the job ends (a
        long poll): one status request per job instead of one per poll interval."""
        return False


T = TypeVar("T")


HELD_POLL_PAUSE = 0.2
"""Seconds between two held status requests (the provider let go of the first before the end)."""
STALLED_POLLS = 10
"""A status request that took this many poll intervals stalled on our side (its rate slot, on a
Prefect server that stopped answering): beyond one interval, not counted as the job's time."""
MAX_RETRY_AFTER = 60.0
"""Longest Retry-After honoured; a provider asking for more gets a transient failure at once."""
CALL_DEADLINE = 300.0
"""Seconds one call may take in all, retries and their waits included (checked before each wait)."""


def with_retries(call: Callable[[], T], attempts: int, *, extra_wait: Callable[[TransientError], int] | None = None,
                 deadline: float = CALL_DEADLINE) -> T:
    """Call, retrying `TransientError` up to `attempts` times with backoff (and Retry-After, up
    to `MAX_RETRY_AFTER`), within `deadline` seconds in all; `extra_wait` may add backoff steps
    for errors that need a longer pause."""
    started = time.monotonic()
    for attempt in range(attempts):
        try:
            return call()
        except TransientError as exc:
            if attempt + 1 >= attempts:
                raise
            if exc.retry_after is not None and exc.retry_after > MAX_RETRY_AFTER:
                raise TransientError(f"{exc.message} (the provider asks to wait {exc.retry_after:.0f} s, more than "
                                     f"{MAX_RETRY_AFTER:.0f} s: not retried now)", provider=exc.provider,
                                     code=exc.code, retry_after=exc.retry_after) from None
            delay = backoff_delay(attempt + (extra_wait(exc) if extra_wait else 0), exc.retry_after)
            if time.monotonic() - started + delay > deadline:
                raise TransientError(f"{exc.message} (gave up: the call's {deadline:.0f} s deadline would pass)",
                                     provider=exc.provider, code=exc.code, retry_after=exc.retry_after) from None
            _retry_log().warning("%s; retrying in %.1f s (attempt %d of %d)", exc, delay, attempt + 2, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _retry_log() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger inside a Prefect flow or task run (so retries show on the run's log in
    the UI), this module's otherwise."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - no run context
        return logging.getLogger("imagegen.retries")


_downloads: list[httpx.Client] = []
_downloads_lock = threading.Lock()


def download_client() -> httpx.Client:
    """One HTTP client for result downloads, shared by every thread of the process: making a
    client costs about 25 ms of CPU (its TLS context), once an image when made per download."""
    with _downloads_lock:
        if not _downloads:
            _downloads.append(httpx.Client(follow_redirects=False))
        return _downloads[0]


MAX_IMAGE_BYTES = 128 * 2**20
"""The largest image (a result or an input) read: a larger body is refused as it streams in,
never held whole (a 4096 x 4096 PNG is at most about 64 MiB)."""


class TooLarge(ValueError):
    """A body longer than `MAX_IMAGE_BYTES`: not read further."""


def read_bounded(response: httpx.Response, limit: int | None = None) -> bytes:
    """A streamed response's body, `TooLarge` past `limit` bytes (`MAX_IMAGE_BYTES`; said by
    its Content-Length, or found as it comes in)."""
    limit = MAX_IMAGE_BYTES if limit is None else limit
    too_large = TooLarge(f"larger than an image may be ({limit:,} bytes)")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def download(url: str, *, provider: str, timeout: float, attempts: int, expiry: str) -> bytes:
    """GET a result URL (no provider auth: it is presigned), retrying transient faults.
    `expiry` says how long such URLs live, for the error a late download gets."""
    def get() -> bytes:
        try:
            with download_client().stream("GET", url, timeout=timeout) as response:
                if response.status_code in (403, 404, 410):
                    raise ResultExpired(f"result download (result URLs expire after {expiry}): HTTP "
                                        f"{response.status_code}", provider=provider)
                if response.status_code != 200:
                    raise status_error(f"result download (result URLs expire after {expiry})", response, provider)
                return read_bounded(response)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise TransientError(f"result download: {type(exc).__name__}", provider=provider) from None
        except TooLarge as exc:
            raise BadRequest(f"result download: {exc}; not read", provider=provider) from None

    return with_retries(get, attempts)


def backoff_delay(attempt: int, retry_after: float | None, *, base: float = 0.5, cap: float = 20.0) -> float:
    """Exponential backoff with full jitter, never sooner than the provider's Retry-After."""
    delay = random.uniform(0, min(cap, base * 2**attempt))
    return max(delay, retry_after or 0.0)


def retry_after_seconds(response: httpx.Response) -> float | None:
    """A Retry-After header in seconds: its delay-seconds form, or its HTTP-date form counted
    from now (RFC 9110 10.2.3); None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())