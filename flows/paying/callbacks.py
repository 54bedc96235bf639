"""The callback receiver: `imagegen callbacks serve`, where providers POST a job's end.

Each paid job gets its own capability URL, `<public base>/v1/heard/<ref>.<sig>`: `ref` names
the provider, account, request id and ledger place; `sig` is an HMAC of `ref` keyed by the
Prefect Secret block `imagegen-callback-key`. 触站AI's callbacks are unsigned, so the URL is
the only proof: a guessed or altered URL is refused (404), and a real one cannot be replayed
onto another job because the request id is inside what is signed.

A callback that verifies is recorded in the ledger as a *heard note*
(`<ledger>/_heard/<request id>/<job id>-<state>-<body digest>.json`, written only if absent, so a duplicate
from the provider's retries or a second receiver replica is recognised) and announced as the
Prefect event `imagegen.callback.heard` on resource `imagegen.job.<request id>`. The waiting
task hears the event wherever it runs (`flows.paying.wakeup`) and looks: a callback is a hint where
to look, never a fact (see docs/callbacks.md, "Threat model").

A body the receiver cannot read (not JSON, another shape, over `MAX_BODY`, or slower than
`BODY_TIMEOUT`) at a URL that verifies still wakes its job to poll once, and is logged and
kept as an `unreadable` note: a provider whose body differs from what its Block reads costs a
poll, never the fallback wait. Headers must arrive within `HEADER_TIMEOUT` (`Guarded`).

The receiver answers 200 once the note is written (milliseconds; 触站AI allows 10 s) and 503
when S3 or the Prefect API is away, so the provider's retries deliver it again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import h11
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from flows.storage import PreconditionFailed, archive_bucket, list_objects, put_conditionally, read_json

KEY_BLOCK = "imagegen-callback-key"
HEARD_EVENT = "imagegen.callback.heard"
RESOURCE_PREFIX = "imagegen.job."
UNREADABLE = "unreadable"
"""The state an event carries for a body the receiver could not read (its job id unknown: "")."""
MAX_BODY = 1 << 20
HEADER_TIMEOUT = 10.0
"""Seconds a request's headers may take, from the connection (or the previous answer) on."""
BODY_TIMEOUT = 10.0
"""Seconds a request's body may take once its headers are in."""
MAX_CONNECTIONS = 1000
"""Open connections past this are closed as they come (each is cut by its deadlines anyway)."""
WAKE_GAP = 5.0
"""Seconds between two wake-ups of one request for unreadable bodies (a flood wakes it once)."""
KEPT_RAW = 64 * 1024
"""Characters of an unreadable body kept in its note (for seeing what the provider really sends)."""
SIG_BYTES = 16
SEEN_KEPT = 10_000  # callbacks remembered in memory (a long-lived receiver must not grow without end)
log = logging.getLogger("imagegen.callbacks")


class CallbacksNotSetUp(RuntimeError):
    """The Prefect server has no callback key yet (`imagegen setup-server` creates it)."""


class Forged(ValueError):
    """A capability URL whose signature does not verify (altered, guessed or of another key)."""


class BodyRefused(ValueError):
    """A callback body the receiver would not read whole; `status` is the answer."""

    status = 400


class BodyTooLarge(BodyRefused):
    """Over `MAX_BODY`: refused by its Content-Length before reading, or cut at the cap."""

    status = 413


class BodyTooSlow(BodyRefused):
    """Not whole within `BODY_TIMEOUT`."""

    status = 408


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

    def heard_key(self, job_id: str, state: str, digest: str = "") -> str:
        """Where a heard note is kept: by job, state and body, so a forged body naming the same
        job and state never takes the place of the real one (and a retried delivery is the same)."""
        tail = f"-{safe_part(digest)}" if digest else ""
        return f"{self.ledger_prefix}_heard/{self.request_id}/{safe_part(job_id)}-{safe_part(state)}{tail}.json"


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


async def read_capped(request: Request, cap: int = MAX_BODY, timeout: float = BODY_TIMEOUT) -> bytes:
    """The request's body, refused before reading by a Content-Length over `cap`, cut as soon as
    the stream passes `cap`, and given up after `timeout` seconds (`BodyRefused`)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > cap):
        raise BodyTooLarge(f"Content-Length {declared[:20]} is over {cap} bytes")

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise BodyTooLarge(f"the body passed {cap} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise BodyTooSlow(f"the body was not whole in {timeout:.0f} s") from None
    except ClientDisconnect:
        raise BodyRefused("the sender went away mid-body") from None


class Receiver:
    """The Starlette app and its counters (`GET /v1/stats`)."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.counts: Counter[str] = Counter()
        self._seen: OrderedDict[tuple[str, str, str, str], None] = OrderedDict()  # the last SEEN_KEPT heard
        self._woke: OrderedDict[str, float] = OrderedDict()  # request id -> when an unreadable body last woke it
        self._lock = threading.Lock()
        self._prefect: Any = None
        self.app = Starlette(routes=[
            Route("/v1/heard/{token}", self.heard, methods=["POST"]),
            Route("/v1/stats", self.stats, methods=["GET"]),
            Route("/health", lambda r: JSONResponse({"ok": True}), methods=["GET"]),
        ])

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    async def heard(self, request: Request) -> Response:
        try:
            ref = read_capability(request.path_params["token"], self.key)
        except (Forged, ValueError, TypeError):
            self.count("forged")
            return JSONResponse({"error": "unknown callback URL"}, status_code=404, headers={"Connection": "close"})
        try:
            raw = await read_capped(request)
        except BodyRefused as exc:
            return await self.unreadable(ref, None, exc)
        try:
            from blocks.registry import provider

            block = provider(ref.provider)
            body = json.loads(raw)
            heard = block.read_callback(body)
        except Exception as exc:  # noqa: BLE001 - a body this Block cannot read still wakes its job
            return await self.unreadable(ref, raw, exc)
        if heard.nonce is not None and heard.nonce != block.callback_nonce(ref.request_id):
            self.count("nonce_mismatch")  # a real URL, another job's body: a replay
            return JSONResponse({"error": "the callback's nonce is not this job's"}, status_code=409)
        seen = (ref.request_id, heard.job_id, heard.state, body_digest(raw))
        with self._lock:
            duplicate = seen in self._seen
        if duplicate:
            self.count("duplicates")
            return JSONResponse({"ok": True, "duplicate": True})
        return await self.keep(ref, seen, heard.nonce, body)

    async def keep(self, ref: JobRef, seen: tuple[str, str, str, str], nonce: str | None, body: Any) -> Response:
        """Write the heard note and announce it; 409 where the ledger records another job."""
        _, job_id, state, digest = seen
        try:
            # A nonce that matched binds the body to this request already; else the ledger's job id does.
            if nonce is None and await run_in_threadpool(recorded_job_differs, ref, job_id):
                self.count("wrong_job")  # a real URL, another job's body: a replay
                return JSONResponse({"error": "the ledger records another job for this request"}, status_code=409)
            fresh = await run_in_threadpool(record, ref, job_id, state, nonce, body, digest)
            # Announced even when the note was there: an earlier delivery may have written it and
            # then failed to announce (503); a second event costs the waiter nothing.
            await run_in_threadpool(self.announce, ref, job_id, state, digest)
        except Exception as exc:  # noqa: BLE001 - S3 or the Prefect API away: let the provider retry
            return self.not_recorded(ref, exc)
        with self._lock:
            self._seen[seen] = None
            if len(self._seen) > SEEN_KEPT:  # an older duplicate meets the note already written (If-None-Match)
                self._seen.popitem(last=False)
            self.counts["heard" if fresh else "duplicates"] += 1
        return JSONResponse({"ok": True, "duplicate": not fresh})

    async def unreadable(self, ref: JobRef, raw: bytes | None, exc: Exception) -> Response:
        """A body at a verified URL that cannot be read: logged, kept (where it was read) and its
        job woken to poll (at most once per `WAKE_GAP`). Answered 200 when read (a retry would
        not read better), else 413 or 408 with the connection closed."""
        reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        self.count("unreadable")
        status = exc.status if isinstance(exc, BodyRefused) else 200
        headers = {"Connection": "close"} if status != 200 else None
        if self._may_wake(ref.request_id):
            try:
                digest = await run_in_threadpool(keep_unreadable, ref, raw, reason)
                await run_in_threadpool(self.announce, ref, "", UNREADABLE, digest)
            except Exception as failure:  # noqa: BLE001 - S3 or the Prefect API away: let the provider retry
                with self._lock:
                    self._woke.pop(ref.request_id, None)
                return self.not_recorded(ref, failure)
            self.count("woken_unreadable")
        log.warning("a %s callback for request %s could not be read (%s; top-level keys: %s): its job was woken to "
                    "poll. If every one is so, the provider's body differs from what its Block reads "
                    "(docs/callbacks.md)", ref.provider, ref.request_id, reason, top_keys(raw))
        return JSONResponse({"ok": status == 200, "unreadable": True}, status_code=status, headers=headers)

    def _may_wake(self, request_id: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._woke.get(request_id, -WAKE_GAP) < WAKE_GAP:
                return False
            self._woke[request_id] = now
            self._woke.move_to_end(request_id)
            if len(self._woke) > SEEN_KEPT:
                self._woke.popitem(last=False)
            return True

    def not_recorded(self, ref: JobRef, exc: BaseException) -> Response:
        log.warning("callback for %s not recorded (%s); answered 503 so it is sent again", ref.request_id,
                    type(exc).__name__)
        self.count("errors")
        return JSONResponse({"error": "not recorded, send again"}, status_code=503)

    async def stats(self, request: Request) -> Response:
        with self._lock:
            return JSONResponse(dict(self.counts))

    def announce(self, ref: JobRef, job_id: str, state: str, digest: str = "") -> None:
        """`announce` through one Prefect client kept for the receiver's life (no connection a callback)."""
        with self._lock:
            if self._prefect is None:
                from prefect.client.orchestration import get_client

                self._prefect = get_client(sync_client=True).__enter__()
        announce(ref, job_id, state, self._prefect, digest)


def body_digest(raw: bytes) -> str:
    """A callback body's short digest: its heard note's name and its event's `imagegen.body`."""
    return hashlib.sha256(raw).hexdigest()[:12]


def top_keys(raw: bytes | None) -> str:
    """The top-level keys of a JSON object body, for the log (never its values: they may hold URLs)."""
    try:
        body = json.loads(raw or b"")
    except ValueError:
        return "not JSON" if raw else "none read"
    return ", ".join(sorted(str(k)[:40] for k in body)[:20]) if isinstance(body, dict) else type(body).__name__


class Guarded(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with deadlines: a request's headers must be in within
    `HEADER_TIMEOUT` of the connection (or of the previous answer on it), its body within
    `BODY_TIMEOUT` more, or the connection is cut; past `MAX_CONNECTIONS` it is closed at once.
    `counts` (set by `serve`) is the receiver's counters."""

    counts: Counter[str] = Counter()
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > MAX_CONNECTIONS:
            self._cut("cut_too_many")
        else:
            self._arm(HEADER_TIMEOUT, "headers")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm(HEADER_TIMEOUT, "headers")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm(self, seconds: float, phase: str) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(seconds, self._expired, phase)

    def _expired(self, phase: str) -> None:
        state = self.conn.their_state
        if state is h11.IDLE:
            self._cut("cut_headers")
        elif state is h11.SEND_BODY and phase == "headers":
            self._arm(BODY_TIMEOUT, "body")
        elif state is h11.SEND_BODY:
            self._cut("cut_body")
        # else the request is whole and being answered: the answer arms the next deadline

    def _cut(self, why: str) -> None:
        self.counts[why] += 1
        if not self.transport.is_closing():
            self.transport.close()


def recorded_job_differs(ref: JobRef, job_id: str) -> bool:
    """True when the ledger records a job for this request id and it is not `job_id` (before the
    submit's answer is recorded there is none to compare: the nonce, where echoed, still is)."""
    record = read_json(archive_bucket(ref.bucket, ref.credentials), ref.record_key) or {}
    return (record.get("request_id") == ref.request_id and bool(record.get("job_id"))
            and str(record["job_id"]) != job_id)


def record(ref: JobRef, job_id: str, state: str, nonce: str | None, body: Any, digest: str = "") -> bool:
    """Write the heard note (with the callback's body, for a Block that trusts callbacks)
    unless it exists; True when this call wrote it."""
    note = {"request_id": ref.request_id, "provider": ref.provider, "block": ref.block, "job_id": job_id,
            "state": state, "nonce": nonce, "heard_at": datetime.now(timezone.utc).isoformat(), "body": body}
    bucket = archive_bucket(ref.bucket, ref.credentials)
    try:
        put_conditionally(bucket, ref.heard_key(job_id, state, digest), json.dumps(note, sort_keys=True).encode(),
                          if_match=None)
    except PreconditionFailed:
        return False
    return True


def announce(ref: JobRef, job_id: str, state: str, client: Any, digest: str = "") -> None:
    """Post the Prefect event the waiting task listens for (no URLs, no credentials in it).
    Posted and checked here, not queued as `emit_event` does: a server that is away makes the
    callback answer 503, so the provider sends it again."""
    from prefect.events import Event

    event = Event(event=HEARD_EVENT, resource={"prefect.resource.id": f"{RESOURCE_PREFIX}{ref.request_id}",
                                               "imagegen.provider": ref.provider, "imagegen.job-id": job_id,
                                               "imagegen.state": state, "imagegen.body": digest})
    client.request("POST", "/events", json=[event.model_dump(mode="json")]).raise_for_status()


def keep_unreadable(ref: JobRef, raw: bytes | None, reason: str) -> str:
    """Keep an unreadable body (its first `KEPT_RAW` characters; none, for a body refused before
    it was read) as a note beside the heard notes, once per distinct body: what the provider
    really sends, for whoever fixes its Block, and what confirms the wake-up it causes. Returns
    the note's body digest."""
    digest = body_digest(raw if raw is not None else reason.encode())
    note = {"request_id": ref.request_id, "provider": ref.provider, "block": ref.block, "job_id": None,
            "state": UNREADABLE, "reason": reason, "heard_at": datetime.now(timezone.utc).isoformat(),
            "size": len(raw or b""), "raw": (raw or b"").decode("utf-8", errors="replace")[:KEPT_RAW]}
    try:
        put_conditionally(archive_bucket(ref.bucket, ref.credentials), ref.heard_key("", UNREADABLE, digest),
                          json.dumps(note, sort_keys=True).encode(), if_match=None)
    except PreconditionFailed:
        pass  # the same body was kept before
    return digest


def serve(host: str, port: int) -> None:
    """Run the receiver until interrupted (uvicorn, with `Guarded`'s deadlines), with the key
    from the Prefect server."""
    import uvicorn

    receiver = Receiver(callback_key(create=True))
    protocol = type("GuardedReceiver", (Guarded,), {"counts": receiver.counts})
    config = uvicorn.Config(receiver.app, host=host, port=port, http=protocol, log_level="warning",
                            timeout_keep_alive=5)
    uvicorn.Server(config).run()


def heard_notes(bucket: Any, ledger_prefix: str, request_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """The first `limit` heard notes of one request, oldest first (for settling an `unknown`
    record; a forger who floods a URL with notes costs this at most `limit` reads)."""
    prefix = f"{ledger_prefix}_heard/{request_id}/"
    notes = [read_json(bucket, obj["Key"]) for obj in list_objects(bucket, prefix, limit=limit)]
    return sorted((n for n in notes if n), key=lambda n: n.get("heard_at", ""))
