"""The callback receiver: `imagegen callbacks serve`, where providers POST a job's end.

Each paid job gets its own capability URL, `<public base>/v1/heard/<ref>.<sig>`: `ref` names
the provider, account, request id and ledger place; `sig` is an HMAC of `ref` keyed by the
Prefect Secret block `imagegen-callback-key`. 触站AI's callbacks are unsigned, so the URL is
the only proof: a guessed or altered URL is refused (404), and a real one cannot be replayed
onto another job because the request id is inside what is signed.

A callback that verifies is recorded in the ledger as a *heard note*
(`<ledger>/_heard/<request id>/<job id>-<state>.json`, written only if absent, so a duplicate
from the provider's retries or a second receiver replica is recognised) and announced as the
Prefect event `imagegen.callback.heard` on resource `imagegen.job.<request id>`. The waiting
task hears the event wherever it runs (`flows.wakeup`), confirms with one poll and fetches. A
callback is a hint: nothing is paid or archived on its word alone.

The receiver answers 200 once the note is written (milliseconds; 触站AI allows 10 s) and 503
when S3 or the Prefect API is away, so the provider's retries deliver it again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

KEY_BLOCK = "imagegen-callback-key"
HEARD_EVENT = "imagegen.callback.heard"
RESOURCE_PREFIX = "imagegen.job."
MAX_BODY = 1 << 20
SIG_BYTES = 16
SEEN_KEPT = 10_000  # callbacks remembered in memory (a long-lived receiver must not grow without end)
log = logging.getLogger("imagegen.callbacks")


class CallbacksNotSetUp(RuntimeError):
    """The Prefect server has no callback key yet (`imagegen setup-server` creates it)."""


class Forged(ValueError):
    """A capability URL whose signature does not verify (altered, guessed or of another key)."""


@dataclass(frozen=True)
class JobRef:
    """What one capability URL stands for: a paid job's request and where its ledger lives."""

    provider: str
    block: str
    request_id: str
    bucket: str
    credentials: str
    ledger_prefix: str
    record_key: str
    """The request's ledger record: a callback naming another job than it records is refused."""

    def heard_key(self, job_id: str, state: str) -> str:
        return f"{self.ledger_prefix}_heard/{self.request_id}/{safe_part(job_id)}-{safe_part(state)}.json"


def safe_part(text: str) -> str:
    """`text` as one S3 key segment (provider ids are hex or digits; anything else is cut)."""
    return "".join(c for c in str(text) if c.isalnum() or c in "-_.")[:80] or "none"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: bytes, ref: str) -> str:
    return _b64(hmac.new(key, ref.encode(), hashlib.sha256).digest()[:SIG_BYTES])


def capability_url(base: str, ref: JobRef, key: bytes) -> str:
    """The URL a provider calls back for `ref`'s job (unguessable without `key`)."""
    body = _b64(json.dumps(asdict(ref), separators=(",", ":"), sort_keys=True).encode())
    return f"{base.rstrip('/')}/v1/heard/{body}.{_sign(key, body)}"


def read_capability(token: str, key: bytes) -> JobRef:
    """The job a capability URL's last segment names; `Forged` unless its signature verifies."""
    body, dot, sig = token.rpartition(".")
    if not dot or not hmac.compare_digest(sig, _sign(key, body)):
        raise Forged("the callback URL's signature does not verify")
    return JobRef(**json.loads(_unb64(body)))


def callback_key(*, create: bool = False) -> bytes:
    """The receiver's HMAC key from the Prefect Secret block; created once where `create`."""
    from prefect.blocks.system import Secret

    try:
        return Secret.load(KEY_BLOCK).get().encode()
    except ValueError:
        if not create:
            raise CallbacksNotSetUp(f"no Secret block {KEY_BLOCK!r} on this Prefect server: run "
                                    "`imagegen setup-server` (or `imagegen callbacks serve`) once") from None
    try:
        Secret(value=secrets.token_hex(32)).save(KEY_BLOCK)
    except ValueError:  # another process created it meanwhile
        pass
    return Secret.load(KEY_BLOCK).get().encode()


_keys: dict[str, bytes] = {}
_keys_lock = threading.Lock()


def cached_key() -> bytes:
    """The callback key, read from the Prefect server once per process (workers sign with it)."""
    with _keys_lock:
        if "key" not in _keys:
            _keys["key"] = callback_key()
        return _keys["key"]


class Receiver:
    """The Starlette app and its counters (`GET /v1/stats`)."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.counts: Counter[str] = Counter()
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()  # the last SEEN_KEPT heard
        self._lock = threading.Lock()
        self._prefect: Any = None
        self.app = Starlette(routes=[
            Route("/v1/heard/{token}", self.heard, methods=["POST"]),
            Route("/v1/stats", self.stats, methods=["GET"]),
            Route("/health", lambda r: JSONResponse({"ok": True}), methods=["GET"]),
        ])

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    async def heard(self, request: Request) -> Response:
        try:
            ref = read_capability(request.path_params["token"], self.key)
        except (Forged, ValueError, TypeError):
            self._count("forged")
            return JSONResponse({"error": "unknown callback URL"}, status_code=404)
        raw = await request.body()
        try:
            if len(raw) > MAX_BODY:
                raise ValueError("body too large")
            from blocks.registry import provider

            block = provider(ref.provider)
            heard = block.read_callback(json.loads(raw))
        except Exception as exc:  # noqa: BLE001 - any unreadable body is the sender's problem
            self._count("unreadable")
            return JSONResponse({"error": f"unreadable callback: {type(exc).__name__}"}, status_code=400)
        if heard.nonce is not None and heard.nonce != block.callback_nonce(ref.request_id):
            self._count("nonce_mismatch")  # a real URL, another job's body: a replay
            return JSONResponse({"error": "the callback's nonce is not this job's"}, status_code=409)
        seen = (ref.request_id, heard.job_id, heard.state)
        with self._lock:
            duplicate = seen in self._seen
        if duplicate:
            self._count("duplicates")
            return JSONResponse({"ok": True, "duplicate": True})
        try:
            # A nonce that matched binds the body to this request already; else the ledger's job id does.
            if heard.nonce is None and await run_in_threadpool(recorded_job_differs, ref, heard.job_id):
                self._count("wrong_job")  # a real URL, another job's body: a replay
                return JSONResponse({"error": "the ledger records another job for this request"}, status_code=409)
            fresh = await run_in_threadpool(record, ref, heard.job_id, heard.state, heard.nonce, json.loads(raw))
            # Announced even when the note was there: an earlier delivery may have written it and
            # then failed to announce (503); a second event costs the waiter nothing.
            await run_in_threadpool(self.announce, ref, heard.job_id, heard.state)
        except Exception as exc:  # noqa: BLE001 - S3 or the Prefect API away: let the provider retry
            log.warning("callback for %s not recorded (%s); answered 503 so it is sent again", ref.request_id,
                        type(exc).__name__)
            self._count("errors")
            return JSONResponse({"error": "not recorded, send again"}, status_code=503)
        with self._lock:
            self._seen[seen] = None
            if len(self._seen) > SEEN_KEPT:  # an older duplicate meets the note already written (If-None-Match)
                self._seen.popitem(last=False)
            self.counts["heard" if fresh else "duplicates"] += 1
        return JSONResponse({"ok": True, "duplicate": not fresh})

    async def stats(self, request: Request) -> Response:
        with self._lock:
            return JSONResponse(dict(self.counts))

    def announce(self, ref: JobRef, job_id: str, state: str) -> None:
        """`announce` through one Prefect client kept for the receiver's life (no connection a callback)."""
        with self._lock:
            if self._prefect is None:
                from prefect.client.orchestration import get_client

                self._prefect = get_client(sync_client=True).__enter__()
        announce(ref, job_id, state, self._prefect)


def recorded_job_differs(ref: JobRef, job_id: str) -> bool:
    """True when the ledger records a job for this request id and it is not `job_id` (before the
    submit's answer is recorded there is none to compare: the nonce, where echoed, still is)."""
    from blocks.archive import archive_bucket, read_json

    record = read_json(archive_bucket(ref.bucket, ref.credentials), ref.record_key) or {}
    return (record.get("request_id") == ref.request_id and bool(record.get("job_id"))
            and str(record["job_id"]) != job_id)


def record(ref: JobRef, job_id: str, state: str, nonce: str | None, body: Any) -> bool:
    """Write the heard note (with the callback's body, for a Block that trusts callbacks)
    unless it exists; True when this call wrote it."""
    from blocks.archive import archive_bucket
    from flows.ledger import PreconditionFailed, put_conditionally

    note = {"request_id": ref.request_id, "provider": ref.provider, "block": ref.block, "job_id": job_id,
            "state": state, "nonce": nonce, "heard_at": datetime.now(timezone.utc).isoformat(), "body": body}
    bucket = archive_bucket(ref.bucket, ref.credentials)
    try:
        put_conditionally(bucket, ref.heard_key(job_id, state), json.dumps(note, sort_keys=True).encode(),
                          if_match=None)
    except PreconditionFailed:
        return False
    return True


def announce(ref: JobRef, job_id: str, state: str, client: Any) -> None:
    """Post the Prefect event the waiting task listens for (no URLs, no credentials in it).
    Posted and checked here, not queued as `emit_event` does: a server that is away makes the
    callback answer 503, so the provider sends it again."""
    from prefect.events import Event

    event = Event(event=HEARD_EVENT, resource={"prefect.resource.id": f"{RESOURCE_PREFIX}{ref.request_id}",
                                               "imagegen.provider": ref.provider, "imagegen.job-id": job_id,
                                               "imagegen.state": state})
    client.request("POST", "/events", json=[event.model_dump(mode="json")]).raise_for_status()


def serve(host: str, port: int) -> None:
    """Run the receiver until interrupted (uvicorn), with the key from the Prefect server."""
    import uvicorn

    receiver = Receiver(callback_key(create=True))
    uvicorn.run(receiver.app, host=host, port=port, log_level="warning")


def heard_notes(bucket: Any, ledger_prefix: str, request_id: str) -> list[dict[str, Any]]:
    """The heard notes of one request, oldest first (for settling an `unknown` record)."""
    from blocks.archive import read_json

    client = bucket.credentials.get_s3_client()
    prefix = f"{ledger_prefix}_heard/{request_id}/"
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket.bucket_name, Prefix=prefix)
    notes = [read_json(bucket, obj["Key"]) for page in pages for obj in page.get("Contents", [])]
    return sorted((n for n in notes if n), key=lambda n: n.get("heard_at", ""))
