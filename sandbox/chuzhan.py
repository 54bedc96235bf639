"""触站AI emulator: `/v1/draw`, `/v1/task/detail` and `/v1/customer/detail` on loopback.

As in `shared/providers/chuzhan.md`: `Auth-Token` (or `Authorization: Bearer`) checked; every
answer in the `{code, subCode, msg, success, data}` envelope with HTTP 200, business errors
included; numbers accepted as numeric strings; credits charged **at submit** by the published
formula (`blocks.chuzhan.credits_for`, so estimate and charge can be compared) and refunded
when a task fails [A]; `predictConsume` prices without drawing or charging; at most
`task_limit` tasks in flight per account (returned as `taskLimitCount`); tasks walk
`in_queue -> running -> success|fail` over the latency; `waitUtilEnd` holds the answer until
the task ends; result URLs expire after 30 minutes.

Error codes are the sandbox's own (the provider's table is not published), the same table the
Block maps: 400 parameter, 401 token, 402 credits, 403 sensitive words, 404 task, 429 task
limit. Markers for tests: a prompt with ``[[fail]]`` fails its task, ``[[nsfw]]`` is refused as
sensitive, ``[[audit]]`` succeeds with every image failing the audit. Callbacks are checked
(public URLs only, as the real service demands) but not delivered: the sandbox cannot reach
a public URL. Hooks: ``GET /_sandbox/stats``, ``POST /_sandbox/config``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from blocks.chuzhan import check_caps, credit_terms, credits_for, output_size
from blocks.errors import BadRequest
from sandbox.images import render_png
from sandbox.urls import SignedUrls

RESULT_TTL = 1800
NUMERIC = ("width", "height", "steps", "batchSize", "modelStyleId", "hrSteps", "upscale", "seed")


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


@dataclass
class ChuzhanState:
    token: str
    latency: float
    task_limit: int
    balance: float
    tasks: dict[str, Task] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: {
        "requests": 0, "auth_failures": 0, "submits": 0, "estimates": 0, "polls": 0, "charges": 0,
        "refunds": 0, "limit_rejections": 0, "sensitive_rejections": 0, "param_rejections": 0})
    charged_credits: float = 0.0
    peak_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    results: SignedUrls = field(default_factory=lambda: SignedUrls(RESULT_TTL))


class ChuzhanEmulator:
    """The Starlette app and its state (one account)."""

    def __init__(self, token: str, *, latency: float = 2.0, task_limit: int = 2, balance: float = 100_000) -> None:
        self.state = ChuzhanState(token=token, latency=latency, task_limit=task_limit, balance=balance)
        self.app = Starlette(routes=[
            Route("/v1/draw", self.draw, methods=["POST"]),
            Route("/v1/task/detail", self.detail, methods=["POST"]),
            Route("/v1/customer/detail", self.customer, methods=["POST"]),
            Route("/_results/{sign}/{index:int}.png", self.result_image, methods=["GET"]),
            Route("/_sandbox/stats", self.stats, methods=["GET"]),
            Route("/_sandbox/config", self.config, methods=["POST"]),
            Route("/_sandbox/health", lambda r: JSONResponse({"ok": True}), methods=["GET"]),
        ])

    async def _body(self, request: Request) -> dict[str, Any]:
        st = self.state
        with st.lock:
            st.counters["requests"] += 1
        token = request.headers.get("auth-token") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(token or "", st.token):
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

    async def draw(self, request: Request) -> Response:
        st = self.state
        try:
            params = await self._body(request)
            try:
                check_caps(params)
            except BadRequest as exc:
                with st.lock:
                    st.counters["param_rejections"] += 1
                raise Refused(400, f"参数错误: {exc.message}") from None
            if "[[nsfw]]" in str(params.get("prompt")):
                with st.lock:
                    st.counters["sensitive_rejections"] += 1
                raise Refused(403, "词条中涉及敏感词，请调整后再生成图片")
            cost = credits_for(params)
            if params.get("predictConsume"):
                with st.lock:
                    st.counters["estimates"] += 1
                detail = [{"count": round(float(v), 4), "desc": k} for k, v in credit_terms(params).items()]
                return envelope({"estimateUsed": cost, "consumeDetail": detail, "balance": st.balance,
                                 "taskLimitCount": st.task_limit})
            with st.lock:
                in_flight = sum(self._state_of(t) in ("in_queue", "running") for t in st.tasks.values())
                if in_flight >= st.task_limit:
                    st.counters["limit_rejections"] += 1
                    raise Refused(429, f"同时进行的任务数已达上限 ({st.task_limit})")
                if st.balance < cost:
                    raise Refused(402, f"积分余额不足: 余额 {st.balance}, 需要 {cost}")
                prompt = str(params.get("prompt"))
                task = Task(sign=secrets.token_hex(16), params=params, created=time.monotonic(), credits=cost,
                            fail_reason="绘画失败 ([[fail]] marker)" if "[[fail]]" in prompt else None,
                            audit_fail="[[audit]]" in prompt)
                st.tasks[task.sign] = task
                st.balance -= cost
                st.charged_credits += cost
                st.counters["submits"] += 1
                st.counters["charges"] += 1
                st.peak_in_flight = max(st.peak_in_flight, in_flight + 1)
                return envelope({"paintingSign": task.sign, "used": cost, "balance": st.balance,
                                 "taskLimitCount": st.task_limit})
        except Refused as exc:
            return envelope(None, exc.code, exc.msg)

    async def detail(self, request: Request) -> Response:
        st = self.state
        try:
            body = await self._body(request)
            sign = str(body.get("taskId") or "")
            with st.lock:
                st.counters["polls"] += 1
                task = st.tasks.get(sign)
            if task is None:
                raise Refused(404, "任务不存在")
            if body.get("waitUtilEnd"):
                while self._state_of(task) in ("in_queue", "running"):
                    await asyncio.sleep(0.05)
            with st.lock:
                return envelope(self._detail(task, request, preview=body.get("preview", True)))
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
        return Response(self._render(task, index), media_type="image/png")

    async def config(self, request: Request) -> Response:
        data = await request.json()
        st = self.state
        with st.lock:
            st.latency = float(data.get("latency", st.latency))
            st.balance = float(data.get("balance", st.balance))
            st.task_limit = int(data.get("task_limit", st.task_limit))
        return JSONResponse({"latency": st.latency, "balance": st.balance, "task_limit": st.task_limit})

    async def stats(self, request: Request) -> Response:
        st = self.state
        with st.lock:
            for task in st.tasks.values():
                self._state_of(task)
            return JSONResponse({**st.counters, "charged_credits": st.charged_credits, "balance": st.balance,
                                 "peak_in_flight": st.peak_in_flight, "task_limit": st.task_limit,
                                 "tasks": {t.sign: {"state": self._state_of(t), "credits": t.credits,
                                                    "nonce": t.params.get("nonce")} for t in st.tasks.values()}})

    # --- task timeline -------------------------------------------------------------------------
    def _state_of(self, task: Task) -> str:
        elapsed = time.monotonic() - task.created
        if elapsed < 0.3 * self.state.latency:
            return "in_queue"
        if elapsed < self.state.latency:
            return "running"
        if task.fail_reason:
            if not task.refunded:  # [A] credits of a failed task are refunded
                task.refunded = True
                self.state.balance += task.credits
                self.state.charged_credits -= task.credits
                self.state.counters["refunds"] += 1
            return "fail"
        return "success"

    def _detail(self, task: Task, request: Request, preview: bool) -> dict[str, Any]:
        state = self._state_of(task)
        progress = min(1.0, (time.monotonic() - task.created) / self.state.latency) if state != "in_queue" else 0.0
        data: dict[str, Any] = {"state": state, "progress": round(progress, 3)}
        if state == "running" and preview:
            thumb = io.BytesIO()
            Image.new("RGB", (64, 64), (128, 128, 128)).save(thumb, format="JPEG")
            data["current_image"] = base64.b64encode(thumb.getvalue()).decode()
        if state == "success":
            urls = [self.state.results.sign(str(request.base_url), f"/_results/{task.sign}/{i}.png")[0]
                    for i in range(int(task.params.get("batchSize") or 1))]
            audit = 0 if task.audit_fail else 1
            data.update(images=[{"imageUrl": u, "audit": audit} for u in urls], imgUrl=urls[0], audit=audit)
        if state == "fail":
            data["failReason"] = task.fail_reason
        return data

    def _render(self, task: Task, index: int) -> bytes:
        width, height = output_size(task.params)
        img = task.params.get("img")
        init = None
        if isinstance(img, str) and not img.startswith("http"):
            try:
                init = base64.b64decode(img, validate=True)
            except ValueError:
                init = None
        return render_png(str(task.params.get("prompt")), int(task.params.get("seed") or 0), width, height,
                          index, init)
