"""One line for each error a person's mistake or a missing service gives the CLI.

`explain(exc)` names what went wrong and the fix; `imagegen` prints it instead of a traceback
(`IMAGEGEN_DEBUG=1` shows the traceback).
"""

from __future__ import annotations

import os
from collections.abc import Callable

DEBUG = "IMAGEGEN_DEBUG"


def _api_url() -> str:
    return os.environ.get("PREFECT_API_URL") or "the temporary Prefect server"


SANDBOX_S3 = "(the sandbox's: `imagegen sandbox up`)"


def _unreachable(exc: BaseException) -> str | None:
    import httpx

    if isinstance(exc, httpx.TransportError):
        if os.environ.get("PREFECT_API_URL"):
            return (f"cannot reach the Prefect API at {_api_url()} ({type(exc).__name__}: {exc}): start that server "
                    "(`imagegen server up`), or unset PREFECT_API_URL to let each command start a temporary one")
        from flows import tempserver

        if tempserver.given_up():
            return (f"this command's temporary Prefect server kept stopping and was left stopped ({type(exc).__name__}: "
                    f"{exc}); its log says why: {tempserver.log_path()}")
        return f"a service did not answer ({type(exc).__name__}: {exc}); is the sandbox up (`imagegen sandbox status`)?"
    return None


def _s3(exc: BaseException) -> str | None:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        bucket = exc.response.get("Error", {}).get("BucketName", "")
        if code == "NoSuchBucket":
            return (f"S3 bucket {bucket or '(the archive bucket)'} does not exist: create it, or name an existing one "
                    "in the spec's archive.bucket")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"S3 refused the archive's credentials ({code}): check the AwsCredentials Block the spec names"
        return f"S3 answered {code or 'an error'}: {exc}"
    if isinstance(exc, (EndpointConnectionError, NoCredentialsError)):
        return (f"S3 is not reachable with the archive's credentials Block ({exc}); is the S3 server up? Start it "
                f"{SANDBOX_S3} and run the same command again: nothing is paid twice")
    return None


def _ledger(exc: BaseException) -> str | None:
    from flows.paying.ledger import LedgerUnavailable

    if isinstance(exc, LedgerUnavailable):
        return (f"the ledger in S3 could not be read or written ({exc}); is the S3 server up? Start it {SANDBOX_S3} "
                "and run the same command again: what the ledger recorded is not paid again, and the run's log names "
                "the jobs it could not record")
    return None


def _prefect(exc: BaseException) -> str | None:
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    if isinstance(exc, ObjectNotFound):
        return f"not found on the Prefect server at {_api_url()}: {exc}"
    if isinstance(exc, PrefectHTTPStatusError):
        return f"the Prefect API at {_api_url()} refused a request: {str(exc).splitlines()[0]}"
    return None


def not_a_prefect_api(url: str) -> str | None:
    """Why `url` (the user's `PREFECT_API_URL`) is no Prefect API, where it answers as something
    else (else None; one that does not answer is told where a command reaches it). Without `/api`
    a server's UI answered, and each command then said a Block or a limit was missing."""
    import httpx

    base = url.rstrip("/")
    if "api.prefect.cloud" in base:  # Prefect Cloud: its own address rules, and its own errors
        return None
    try:
        answer = httpx.get(f"{base}/health", timeout=10)
    except httpx.HTTPError:
        return None
    try:
        healthy = answer.status_code == 200 and answer.json() is True
    except ValueError:
        healthy = False
    if healthy or answer.status_code in (401, 403):  # a server behind a login answers for itself
        return None
    hint = (f"a Prefect server's API is its address with /api: did you mean {base}/api?" if not base.endswith("/api")
            else "is a Prefect server listening there? (`imagegen server up` starts one)")
    return (f"PREFECT_API_URL {url} does not answer as a Prefect API (GET {base}/health: HTTP "
            f"{answer.status_code}, {answer.headers.get('content-type') or 'no content type'}); {hint}")


EXPLAINERS: tuple[Callable[[BaseException], str | None], ...] = (_unreachable, _s3, _ledger, _prefect)


def storage_fix(exc: BaseException) -> str | None:
    """The one line for an S3 fault (the archive's or the ledger's), None for anything else:
    an item whose archive write failed says what to do, not botocore's words alone."""
    for explainer in (_s3, _ledger):
        try:
            if line := explainer(exc):
                return line
        except ImportError:
            return None
    return None


def explain(exc: BaseException) -> str:
    """One line: what failed and what to do (`RuntimeError: ...` for anything unknown)."""
    for explainer in EXPLAINERS:
        try:
            line = explainer(exc)
        except ImportError:
            continue
        if line:
            return line
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" + (f" (details: {DEBUG}=1 imagegen ...)" if not text else "")
