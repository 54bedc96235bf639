"""触站AI emulator: `/v1/draw`, `/v1/task/detail` and `/v1/customer/detail` on loopback.

As in `docs/providers/chuzhan.md`: `Auth-Token` or `Authorization: Bearer` checked (each one
sent must carry the token); every
answer in the `{code, subCode, msg, success, data}` envelope with HTTP 200, business errors
included; numbers accepted as numeric strings; credits charged **at submit** by the published
formula (`price`; where the page's rounding is ambiguous, `rounding` picks the reading) and
refunded when a task fails [A] (`refund_failed`); `predictConsume` prices without drawing or charging; at most
`task_limit` tasks in flight per account (returned as `taskLimitCount`); tasks walk
`in_queue -> running -> success|fail` over the latency; `waitUtilEnd` holds the answer until
the task ends, or `hold_max` seconds at most [A] (counted as `held_polls`); result URLs expire
after 30 minutes.

The credit formula and the caps are this module's own, written from the provider's credit
page (never imported from the client, so a misreading in one cannot hide behind the other).
Error codes are the sandbox's own (the provider's table is not published), the same table the
Block maps: 400 parameter, 401 token, 402 credits, 403 sensitive words, 404 task, 429 task
limit, 500 internal. Markers for tests: a prompt with ``[[fail]]`` fails its task, ``[[nsfw]]``
is refused as sensitive, ``[[audit]]`` succeeds with every image failing the audit (0),
``[[audit1]]`` with only the first image failing it, ``[[audit2]]`` and ``[[audit3]]`` with the
first image's audit 2 or 3 (assumed: "a person should confirm", "show privately"). The answer's
top-level ``audit`` is the single image's, on single-image tasks only. A task with a ``callback`` is POSTed to it
when it ends (``taskId``, ``nonce`` and the detail fields), retried 5 times at +5 s steps on any
answer but 200 (`sandbox.callbacks`); callback URLs must be public, except in sandbox mode
(``imagegen sandbox up``), whose receiver is on loopback.

Hooks: ``GET /_sandbox/stats`` (counters, and ``paid``: charges per request, keyed by a
fingerprint of the paid fields, see `sandbox.paid`), ``POST /_sandbox/config``, ``POST
/_sandbox/faults`` ``{"kind", "count", "delay"}`` for the next draw submits, ``DELETE`` clears:

- ``error_before``: code 500, no task created;
- ``error_after``: the task is created and charged, then the answer is code 500;
- ``drop_after``: the task is created and charged, then the connection is cut mid-answer;
- ``slow``: the task is created and charged, and the answer comes ``delay`` s later;
- ``callback_lost``, ``callback_late``, ``callback_duplicate``, ``callback_forged``: the next
  callback (see `sandbox.callbacks`).

``POST /_sandbox/config`` also takes ``callback_step`` (seconds between retries, 5),
``sandbox_callbacks`` (allow loopback callback URLs), ``hold_max`` (0: `waitUtilEnd` answers at
once), ``refund_failed`` and ``rounding`` (``image_first`` or ``total``). Stats count status
requests (``polls``) and their ``peak_detail_per_second``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox.base import Emulator, end_sooner

from sandbox.accounts import new_token, read_secret, secret_file
from sandbox.callbacks import KINDS as CALLBACK_FAULTS
from sandbox.callbacks import CallbackSender, private_target
from sandbox.faults import DroppedResponse, fault_hook
from sandbox.images import render_png
from sandbox.limits import SlidingWindow
from sandbox.paid import PaidLog, fingerprint
from sandbox.urls import SignedUrls

RESULT_TTL = 1800
NUMERIC = ("width", "height", "steps", "batchSize", "modelStyleId", "hrSteps", "upscale", "seed")
FAULTS = ("error_before", "error_after", "drop_after", "slow")

# The credit page: base W*H*0.000000763*steps (sides at least 512); hires w*h*r^2*0.000000763*
# hrSteps (text-to-image only); AI upscale W'*H'*0.0000038*u over the size after hires (sides at
# least 256); flat extras (faceFix +2 from the request schema, not this page); several images
# x0.9 each. Rounding is not stated: the page's three examples (12.00095 -> 12, 20.0016 -> 20,
# 5.9926 -> 6) fit half-up rounding. Whether the single image's cost is rounded before x0.9 x n
# they cannot tell: `image_first` rounds it first (the sandbox's default), `total` rounds once.
RATE, UP_RATE = Decimal("0.000000763"), Decimal("0.0000038")
FLAT = {"removeBackground": 2, "redrawBackground": 2, "facePreservation": 2, "genderDetect": 1}
ROUNDINGS = ("image_first", "total")


def _half_up(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _num(params: dict[str, Any], name: str, default: float) -> Decimal:
    value = params.get(name)
    return Decimal(str(value)) if value not in (None, "") else Decimal(str(default))


def price(params: dict[str, Any], rounding: str = "image_first") -> tuple[int, dict[str, Decimal]]:
    """Credits of a draw request by the published page, and its terms for `consumeDetail`;
    `rounding` is where several images' total is rounded (see `ROUNDINGS`)."""
    w, h, steps = _num(params, "width", 512), _num(params, "height", 512), _num(params, "steps", 20)
    r = Decimal(1) if params.get("img") else _num(params, "hrScale", 1)  # hires: text-to-image only
    u = _num(params, "upscale", 1)
    terms = {"base": max(w, Decimal(512)) * max(h, Decimal(512)) * RATE * steps}
    if r > 1:
        terms["hires"] = w * h * r * r * RATE * _num(params, "hrSteps", 20)
    if u > 1:
        terms["upscale"] = max(w * r, Decimal(256)) * max(h * r, Decimal(256)) * UP_RATE * u
    units = len((params.get("controlnet") or {}).get("units") or [])
    if units:
        terms["controlnet"] = Decimal(2 * units)
    for name, cost in FLAT.items():
        if (params.get("imgOptions") or {}).get(name):
            terms[name] = Decimal(cost)
    if params.get("faceFix"):
        terms["faceFix"] = Decimal(2)
    one = sum(terms.values(), Decimal(0))
    n = int(params.get("batchSize") or 1)
    if n == 1:
        return _half_up(one), terms
    single = Decimal(_half_up(one)) if rounding == "image_first" else one
    return _half_up(single * Decimal("0.9") * n), terms


def refusal(params: dict[str, Any], *, private_callbacks: bool = False) -> str | None:
    """Why the provider refuses the request's parameters (the page's and schema's caps), or None.
    `private_callbacks`: loopback callback URLs are accepted (sandbox mode)."""
    w, h = int(params.get("width") or 512), int(params.get("height") or 512)
    if not (64 <= w <= 2048 and 64 <= h <= 2048):
        return "width/height must be 64..2048"
    if not 1 <= int(params.get("steps") or 20) <= 50:
        return "steps must be 1..50"
    if not 1 <= int(params.get("batchSize") or 1) <= 6:
        return "batchSize must be 1..6"
    if not str(params.get("prompt") or "").strip():
        return "prompt is required"
    r = float(params.get("hrScale") or 1) if not params.get("img") else 1.0
    if not 1 <= r <= 3 or w * h * r * r > 2048 * 2048 or max(w, h) * r > 2048:
        return "hrScale: at most 3, drawing area at most 2048x2048, each side after hires at most 2048"
    if int(params.get("hrSteps") or 20) > 50:
        return "hrSteps must be at most 50"
    if not 1 <= float(params.get("upscale") or 1) <= 3:
        return "upscale must be at most 3"
    if len((params.get("controlnet") or {}).get("units") or []) > 3:
        return "controlnet: at most 3 units"
    if len(str(params.get("nonce") or "")) > 32:
        return "nonce: at most 32 characters"
    callback = params.get("callback")
    if callback and private_target(str(callback)) and not private_callbacks:
        return "callback must be a public URL (localhost and LAN addresses are refused)"
    return None


def size_of(params: dict[str, Any]) -> tuple[int, int]:
    """The image size a task returns: (w x hrScale x upscale) by (h x hrScale x upscale)."""
    r = 1.0 if params.get("img") else float(params.get("hrScale") or 1)
    factor = r * float(params.get("upscale") or 1)
    return int(int(params.get("width") or 512) * factor), int(int(params.get("height") or 512) * factor)


def paid_key(params: dict[str, Any]) -> str:
    """What a draw is paid for: the same prompt, seed, size and options are the same request."""
    paid = {k: v for k, v in params.items() if k not in ("nonce", "callback", "predictConsume", "img")}
    return fingerprint(paid, hashlib.sha256(str(params.get("img") or "").encode()).hexdigest())


class Refused(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code, self.msg = code, msg


def envelope(data: Any = None, code: int = 0, msg: str = "") -> JSONResponse:
    return JSONResponse({"code": code, "subCode": 1000 if code == 0 else code, "msg": msg,
                         "success": code == 0, "data": data})


@dataclass
class Task:
    sign: str
    params: dict[str, Any]
    created: float
    credits: int
    fail_reason: str | None
    audit_fail: bool
    refunded: bool = False
    audit_fail_first: bool = False
    first_audit: int | None = None  # the first image's audit where a marker sets it (2, 3)
    key: str = ""
    duration: float = 0.0  # seconds it runs: the latency when it was made (see `end_sooner`)


@dataclass
class ChuzhanState:
    token: str
    latency: float
    task_limit: int
    balance: float
    hold_max: float = 60.0  # [A] longest a `waitUtilEnd` request is held (the document: "may be cut, retry")
    refund_failed: bool = True  # [A] the document: refund on failure "not documented", assumed refunded
    rounding: str = "image_first"  # [A] where several images' credits are rounded (see `price`)
    price_rise: float = 1.0  # sandbox only: a draw takes this many times its quote (a price rose since)
    details: SlidingWindow = field(default_factory=lambda: SlidingWindow(10**9))  # status requests a second
    tasks: dict[str, Task] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: {
        "requests": 0, "auth_failures": 0, "submits": 0, "estimates": 0, "polls": 0, "held_polls": 0, "charges": 0,
        "refunds": 0, "limit_rejections": 0, "sensitive_rejections": 0, "param_rejections": 0})
    charged_credits: float = 0.0
    peak_in_flight: int = 0
    faults: list[dict[str, Any]] = field(default_factory=list)
    paid: PaidLog = field(default_factory=PaidLog)
    lock: threading.Lock = field(default_factory=threading.Lock)
    results: SignedUrls = field(default_factory=lambda: SignedUrls(RESULT_TTL))


class ChuzhanEmulator(Emulator):
    """The Starlette app and its state (one account)."""

    KEPT = ("tasks", "balance", "paid", "charged_credits", "counters", "results")

    def __init__(self, token: str, *, latency: float = 2.0, task_limit: int = 2, balance: float = 100_000,
                 sandbox_callbacks: bool = False) -> None:
        self.state = ChuzhanState(token=token, latency=latency, task_limit=task_limit, balance=balance)
        self.callbacks = CallbackSender(sandbox=sandbox_callbacks)
        self.app = self.build_app()

    def provider_routes(self) -> list[Route]:
        return [
            Route("/v1/draw", self.draw, methods=["POST"]),
            Route("/v1/task/detail", self.detail, methods=["POST"]),
            Route("/v1/customer/detail", self.customer, methods=["POST"]),
            Route("/_results/{sign}/{index:int}.png", self.result_image, methods=["GET"]),
        ]

    async def _body(self, request: Request) -> dict[str, Any]:
        st = self.state
        with st.lock:
            st.counters["requests"] += 1
        bearer = request.headers.get("authorization")
        sent = [t for t in (request.headers.get("auth-token"),
                            bearer.removeprefix("Bearer ") if bearer is not None else None) if t is not None]
        if not sent or not all(hmac.compare_digest(t, st.token) for t in sent):
            with st.lock:
                st.counters["auth_failures"] += 1
            raise Refused(401, "无效的 Auth-Token")
        try:
            data = json.loads(await request.body() or b"{}")
        except ValueError:
            raise Refused(400, "请求体不是 JSON") from None
        for name in NUMERIC:  # numbers may come as numeric strings
            if isinstance(data.get(name), str) and data[name].lstrip("-").isdigit():
                data[name] = int(data[name])
        if isinstance(data.get("hrScale"), str):
            data["hrScale"] = float(data["hrScale"])
        return data

    def _refuse_bad(self, params: dict[str, Any]) -> None:
        """Refuse bad parameters (400) and a sensitive prompt (403), counted; nothing is charged."""
        why = refusal(params, private_callbacks=self.callbacks.sandbox)
        if why is not None:
            with self.state.lock:
                self.state.counters["param_rejections"] += 1
            raise Refused(400, f"参数错误: {why}")
        if "[[nsfw]]" in str(params.get("prompt")):
            with self.state.lock:
                self.state.counters["sensitive_rejections"] += 1
            raise Refused(403, "词条中涉及敏感词，请调整后再生成图片")

    async def draw(self, request: Request) -> Response:
        st = self.state
        try:
            params = await self._body(request)
            self._refuse_bad(params)
            cost, terms = price(params, st.rounding)
            if params.get("predictConsume"):
                with st.lock:
                    st.counters["estimates"] += 1
                detail = [{"count": round(float(v), 4), "desc": k} for k, v in terms.items()]
                return envelope({"estimateUsed": cost, "consumeDetail": detail, "balance": st.balance,
                                 "taskLimitCount": st.task_limit})
            fault = self._take_fault()
            if fault is not None and fault["kind"] == "error_before":
                raise Refused(500, "系统繁忙 (injected fault, no task created)")
            cost = round(cost * st.price_rise) if st.price_rise != 1.0 else cost
            with st.lock:
                in_flight = sum(self._state_of(t) in ("in_queue", "running") for t in st.tasks.values())
                turned_away = (Refused(429, f"同时进行的任务数已达上限 ({st.task_limit})") if in_flight >= st.task_limit else
                           Refused(402, f"积分余额不足: 余额 {st.balance}, 需要 {cost}") if st.balance < cost else None)
                if turned_away is not None:
                    if turned_away.code == 429:
                        st.counters["limit_rejections"] += 1
                    if fault is not None:  # a fault about a created task waits for one
                        fault["count"] += 1
                        st.counters["injected_faults"] -= 1
                    raise turned_away
                prompt = str(params.get("prompt"))
                task = Task(sign=secrets.token_hex(16), params=params, created=time.monotonic(), credits=cost, duration=st.latency,
                            fail_reason="绘画失败 ([[fail]] marker)" if "[[fail]]" in prompt else None,
                            audit_fail="[[audit]]" in prompt, audit_fail_first="[[audit1]]" in prompt,
                            first_audit=3 if "[[audit3]]" in prompt else 2 if "[[audit2]]" in prompt else None,
                            key=paid_key(params))
                st.tasks[task.sign] = task
                st.balance -= cost
                st.charged_credits += cost
                st.counters["submits"] += 1
                st.counters["charges"] += 1
                st.paid.charge(task.key, prompt)
                st.peak_in_flight = max(st.peak_in_flight, in_flight + 1)
                answer = {"paintingSign": task.sign, "used": cost, "balance": st.balance,
                          "taskLimitCount": st.task_limit}
            if params.get("callback"):
                base = str(request.base_url)
                self.callbacks.schedule(str(params["callback"]), lambda: self._callback_body(task, base),
                                        after=st.latency + 0.01)
            if fault is not None and fault["kind"] == "error_after":
                raise Refused(500, "系统繁忙 (injected fault after the task was created)")
            if fault is not None and fault["kind"] == "drop_after":
                return DroppedResponse()
            if fault is not None and fault["kind"] == "slow":
                await asyncio.sleep(float(fault.get("delay", 5)))
            return envelope(answer)
        except Refused as exc:
            return envelope(None, exc.code, exc.msg)

    def _take_fault(self) -> dict[str, Any] | None:
        st = self.state
        with st.lock:
            for fault in st.faults:
                if fault["count"] > 0:
                    fault["count"] -= 1
                    st.counters["injected_faults"] = st.counters.get("injected_faults", 0) + 1
                    return fault
        return None

    async def set_faults(self, request: Request) -> Response:
        def refuse(fault: dict[str, Any]) -> str | None:
            known = fault.get("kind") in FAULTS + CALLBACK_FAULTS
            return None if known else f"unknown fault kind {fault.get('kind')!r}"

        if request.method == "DELETE":
            await fault_hook(request, self.callbacks.lock, self.callbacks.faults, refuse)
        elif (await request.json()).get("kind") in CALLBACK_FAULTS:
            return await fault_hook(request, self.callbacks.lock, self.callbacks.faults, refuse)
        return await fault_hook(request, self.state.lock, self.state.faults, refuse)

    def _callback_body(self, task: Task, base_url: str) -> dict[str, Any]:
        """What the provider POSTs when a task ends: taskId, nonce and the detail fields."""
        with self.state.lock:
            return {"taskId": task.sign, "nonce": task.params.get("nonce"),
                    **self._detail(task, base_url, preview=False)}

    async def detail(self, request: Request) -> Response:
        st = self.state
        try:
            body = await self._body(request)
            sign = str(body.get("taskId") or "")
            with st.lock:
                st.counters["polls"] += 1
                task = st.tasks.get(sign)
            st.details.allow("detail")
            if task is None:
                raise Refused(404, "任务不存在")
            if body.get("waitUtilEnd"):
                with st.lock:
                    st.counters["held_polls"] += 1
                let_go = time.monotonic() + st.hold_max
                while self._state_of(task) in ("in_queue", "running") and time.monotonic() < let_go:
                    await asyncio.sleep(0.05)
            with st.lock:
                return envelope(self._detail(task, str(request.base_url), preview=body.get("preview", True)))
        except Refused as exc:
            return envelope(None, exc.code, exc.msg)

    async def customer(self, request: Request) -> Response:
        try:
            await self._body(request)
        except Refused as exc:
            return envelope(None, exc.code, exc.msg)
        return envelope({"balance": self.state.balance, "taskLimitCount": self.state.task_limit})

    async def result_image(self, request: Request) -> Response:
        sign, index = request.path_params["sign"], request.path_params["index"]
        if self.state.results.check(request.url.path, request.query_params) is not None:
            return Response(status_code=403)
        task = self.state.tasks.get(sign)
        if task is None:
            return Response(status_code=404)
        return Response(await asyncio.to_thread(self._render, task, index), media_type="image/png")

    async def config(self, request: Request) -> Response:
        data = await request.json()
        st = self.state
        with st.lock:
            st.latency = float(data.get("latency", st.latency))
            end_sooner(st.tasks.values(), st.latency)
            st.balance = float(data.get("balance", st.balance))
            st.task_limit = int(data.get("task_limit", st.task_limit))
            st.hold_max = float(data.get("hold_max", st.hold_max))
            st.refund_failed = bool(data.get("refund_failed", st.refund_failed))
            st.price_rise = float(data.get("price_rise", st.price_rise))
            if data.get("rounding", st.rounding) not in ROUNDINGS:
                return JSONResponse({"error": f"rounding: one of {', '.join(ROUNDINGS)}"}, status_code=400)
            st.rounding = str(data.get("rounding", st.rounding))
            self.callbacks.step = float(data.get("callback_step", self.callbacks.step))
            self.callbacks.sandbox = bool(data.get("sandbox_callbacks", self.callbacks.sandbox))
        return JSONResponse({"latency": st.latency, "balance": st.balance, "task_limit": st.task_limit,
                             "hold_max": st.hold_max, "refund_failed": st.refund_failed, "rounding": st.rounding,
                             "price_rise": st.price_rise,
                             "callback_step": self.callbacks.step,
                             "sandbox_callbacks": self.callbacks.sandbox})

    async def stats(self, request: Request) -> Response:
        st = self.state
        with st.lock:
            for task in st.tasks.values():
                self._state_of(task)
            return JSONResponse({**st.counters, **st.paid.snapshot(), "charged_credits": st.charged_credits,
                                 "callbacks": self.callbacks.snapshot(),
                                 "balance": st.balance,
                                 "peak_in_flight": st.peak_in_flight, "task_limit": st.task_limit,
                                 "peak_detail_per_second": st.details.peak,
                                 "tasks": {t.sign: {"state": self._state_of(t), "credits": t.credits,
                                                    "nonce": t.params.get("nonce"),
                                                    "prompt": t.params.get("prompt")} for t in st.tasks.values()}})

    # --- task timeline -------------------------------------------------------------------------
    def _state_of(self, task: Task) -> str:
        elapsed = time.monotonic() - task.created
        if elapsed < 0.3 * task.duration:
            return "in_queue"
        if elapsed < task.duration:
            return "running"
        if task.fail_reason:
            if not task.refunded and self.state.refund_failed:  # [A] credits of a failed task are refunded
                task.refunded = True
                self.state.balance += task.credits
                self.state.charged_credits -= task.credits
                self.state.counters["refunds"] += 1
                self.state.paid.refund(task.key)
            return "fail"
        return "success"

    def _detail(self, task: Task, base_url: str, preview: bool) -> dict[str, Any]:
        state = self._state_of(task)
        progress = 0.0 if state == "in_queue" else 1.0 if state in ("success", "fail") else \
            min(1.0, (time.monotonic() - task.created) / task.duration)
        data: dict[str, Any] = {"state": state, "progress": round(progress, 3)}
        if state == "running" and preview:
            thumb = io.BytesIO()
            Image.new("RGB", (64, 64), (128, 128, 128)).save(thumb, format="JPEG")
            data["current_image"] = base64.b64encode(thumb.getvalue()).decode()
        if state == "success":
            urls = [self.state.results.sign(base_url, f"/_results/{task.sign}/{i}.png")[0]
                    for i in range(int(task.params.get("batchSize") or 1))]
            audits = [0 if task.audit_fail or (task.audit_fail_first and i == 0) else
                      task.first_audit if task.first_audit is not None and i == 0 else 1 for i in range(len(urls))]
            data.update(images=[{"imageUrl": u, "audit": a} for u, a in zip(urls, audits, strict=True)],
                        imgUrl=urls[0])
            if len(urls) == 1:  # "when a single image is made, its audit is returned here"
                data["audit"] = audits[0]
        if state == "fail":
            data["failReason"] = task.fail_reason
        return data

    def _render(self, task: Task, index: int) -> bytes:
        width, height = size_of(task.params)
        img = task.params.get("img")
        init = None
        if isinstance(img, str) and not img.startswith("http"):
            try:
                init = base64.b64decode(img, validate=True)
            except ValueError:
                init = None
        return render_png(str(task.params.get("prompt")), int(task.params.get("seed") or 0), width, height,
                          index, init)


# --- sandbox hooks (see sandbox/accounts.py) ------------------------------------------------------
DEFAULT_PORT = 8702


def sandbox_account(state_dir: Path) -> dict[str, str]:
    return {"token_file": secret_file(state_dir, "chuzhan_token", new_token()), "task_limit": "2"}


def make_app(account: dict[str, str], latency: float) -> Starlette:
    return ChuzhanEmulator(read_secret(account, "token"), latency=latency, task_limit=int(account["task_limit"]),
                           sandbox_callbacks=True).app


def block_fields(account: dict[str, str]) -> dict[str, Any]:
    return {"api_token": read_secret(account, "token")}


def bench_counts(stats: dict[str, Any]) -> dict[str, int]:
    """Requests, drawing submits and polls, and limit violations, from `/_sandbox/stats`."""
    return {"requests": stats["requests"], "submits": stats["submits"], "polls": stats["polls"],
            "violations": stats["limit_rejections"]}
