"""Errors of provider calls, as types the flow can act on.

    ProviderError
     ├── TransientError     retry with backoff, never sooner than `retry_after`
     ├── ContentRejected    record on the item with the provider's reason; never retry
     │    └── ChargedRejection  refused after the paid work was done: counted as maybe charged
     ├── AccountStop        no balance, arrears, auth failure, service stopped: stop spending
     └── BadRequest         a bug or a bad spec: fail the item with the message
          ├── JobFailed     the provider ran the job and it ended failed
          └── SubmitUnknown a submit that may have reached the provider: never sent blindly again

    LimiterError            ours, not the provider's: a slot on the Prefect server could not be
                            taken (nothing was sent); retried like a transient fault
    BlockMissing            a saved Block the spec names is not on the Prefect server

Messages are built from provider codes and texts only, never from request objects, so a
secret cannot end up in an exception.
"""

from __future__ import annotations

from typing import ClassVar


class ProviderError(Exception):
    """Base of every provider error; `provider` and `code` say who and what."""

    def __init__(self, message: str, *, provider: str, code: str | None = None) -> None:
        self.provider = provider
        self.code = code
        self.message = message
        prefix = f"{provider}: {code}: " if code else f"{provider}: "
        super().__init__(prefix + message)


class TransientError(ProviderError):
    """A fault that may pass: rate limit, 5xx, timeout, dropped connection."""

    def __init__(self, message: str, *, provider: str, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, provider=provider, code=code)
        self.retry_after = retry_after


class ContentRejected(ProviderError):
    """The provider refused the prompt or image on content grounds."""


class ChargedRejection(ContentRejected):
    """Refused after the paid work was done (Tencent: the image was made, then failed its
    review): nothing to collect, yet nothing says the call was free, so it counts as maybe
    charged (the ledger's `charged_before`, the run's budget). `calls` is how many such calls
    the item made in this submit."""

    charge: ClassVar[str] = "maybe"

    def __init__(self, message: str, *, provider: str, code: str | None = None, calls: int = 1) -> None:
        super().__init__(message, provider=provider, code=code)
        self.calls = calls


class AccountStop(ProviderError):
    """The account cannot be used until a person acts (credentials, balance, service state)."""


class BadRequest(ProviderError):
    """The request is wrong; sending it again will fail again."""


class ResultExpired(BadRequest):
    """A result URL answers that it no longer gives its image (403, 404, 410): it expired."""


class JobFailed(BadRequest):
    """The provider accepted the job and reported it failed."""


class SubmitUnknown(BadRequest):
    """A submit may have reached the provider (timeout after sending, answer cut off, an error
    answer that does not say whether the job was created). Submitting again could pay twice:
    the ledger records the item `unknown` until the job is found or a person settles it."""


class LimiterError(RuntimeError):
    """Taking a slot of a provider limit on the Prefect server failed (API down, timeout):
    the request it guarded was never sent."""


class BlockMissing(LookupError):
    """A Block the spec names (a provider account, the archive's credentials) is not saved on
    the Prefect server the run talks to; the message names it and how to save it."""

    def __init__(self, slug: str, name: str, api: str | None) -> None:
        self.slug, self.name = slug, name
        where = f"the Prefect server at {api}" if api else "the temporary Prefect server of this run (no PREFECT_API_URL)"
        register = "imagegen sandbox register" + ("" if name == "sandbox" else f" --block-name {name}")
        super().__init__(f"no {slug} Block named {name!r} on {where}: save it with `{register}` "
                         f"(the sandbox's, with `imagegen sandbox up` running) or `prefect block create {slug}` "
                         "(a real account), or name a saved one in the spec's `blocks:`/`archive.credentials`")

    def __str__(self) -> str:
        return str(self.args[0])


def is_retryable(exc: BaseException) -> bool:
    """True for errors worth another attempt (transient provider faults, limiter faults)."""
    return isinstance(exc, TransientError | LimiterError)
