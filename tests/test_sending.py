"""Sending, written once in `blocks.base`: every registered provider's calls go through
`ImageProvider.send`, which takes the request slot outside the transport-error handling,
classifies a cut connection by whether the call was safe to repeat, and retries. Unit tests
over respx; the same rules run against the emulators in the integration tests."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator

import httpx
import pytest
import respx

from blocks import registry
from blocks.base import ImageProvider
from blocks.errors import ProviderError, SubmitUnknown, TransientError

ENDPOINT = "https://provider.test"
CREDENTIALS = {"tams": {"app_id": "app", "api_token": "token"}, "chuzhan": {"api_token": "token"},
               "tencent": {"secret_id": "AKIDtest", "secret_key": "key"}}
PROVIDERS = sorted(CREDENTIALS)


def block(name: str, **fields: object) -> ImageProvider:
    return registry.provider(name)(**CREDENTIALS[name], endpoint=ENDPOINT, **fields)


class FailingLimiter:
    """A limiter whose own HTTP (the Prefect API, over httpx too) times out taking a slot."""

    @contextlib.contextmanager
    def request(self, action: str) -> Iterator[None]:
        raise httpx.ReadTimeout("prefect api: slot request timed out")
        yield

    def job(self, action: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def test_every_provider_shapes_its_text_job() -> None:
    """A submit is unsafe to repeat exactly where the provider does not dedupe request ids
    (a repeat would be a second charge); a poll is always safe; the actions are the ones its
    limiter is told of, read from the shapes without credentials."""
    for name, cls in registry.providers().items():
        request = cls.sample_request()
        cls.validate(request)
        shaped = cls.model_construct()
        assert shaped.submit_call(request).safe_to_repeat is cls.idempotent_submit, name
        assert shaped.poll_call("job-1").safe_to_repeat, name
        submit, poll, job = cls.text_job_actions()
        assert (submit, poll) == (shaped.submit_call(request).action, shaped.poll_call("x").action)
        assert job == shaped.job_action(request)


@pytest.mark.parametrize("name", PROVIDERS)
@respx.mock(assert_all_called=False)
def test_a_limiter_fault_is_the_limiters_not_the_providers(name: str) -> None:
    """The limiter's own I/O runs outside the provider's transport-error handling: its
    timeout is not read as a cut provider connection (for a paid call that would be
    `SubmitUnknown`, an item held for a person), and nothing reaches the provider."""
    route = respx.route(host="provider.test").mock(return_value=httpx.Response(500))
    provider = block(name)
    provider.use_limiter(FailingLimiter())
    with pytest.raises(httpx.ReadTimeout, match="prefect api"):
        provider.submit(type(provider).sample_request())
    assert route.call_count == 0


@pytest.mark.parametrize("name", PROVIDERS)
@respx.mock
def test_a_call_cut_after_sending_is_unknown_where_a_repeat_could_pay(name: str) -> None:
    """A read timeout after the submit went out: where the provider dedupes (TAMS) the same
    request is sent again; elsewhere it is `SubmitUnknown` after one request."""
    route = respx.route(host="provider.test").mock(side_effect=httpx.ReadTimeout("slow"))
    provider = block(name, max_attempts=2)
    expected = TransientError if type(provider).idempotent_submit else SubmitUnknown
    with pytest.raises(expected, match="ReadTimeout"):
        provider.submit(type(provider).sample_request())
    assert route.call_count == (2 if type(provider).idempotent_submit else 1)


@pytest.mark.parametrize("name", PROVIDERS)
@respx.mock
def test_a_call_that_never_connected_is_retried_on_every_provider(name: str) -> None:
    """A refused connection cannot have been acted on: transient, retried, on paid calls too."""
    route = respx.route(host="provider.test").mock(side_effect=httpx.ConnectError("refused"))
    provider = block(name, max_attempts=2)
    with pytest.raises(TransientError, match="ConnectError"):
        provider.submit(type(provider).sample_request())
    assert route.call_count == 2


class _ClosesReusedConnections(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 that answers the first request of a connection and closes the connection at any
    later one unanswered, as a server does when its idle timer fires just as a request arrives."""

    protocol_version = "HTTP/1.1"
    seen: list[int] = []  # each request's number on its connection, in order

    def setup(self) -> None:
        super().setup()
        self.served = 0

    def do_POST(self) -> None:
        self.served += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).seen.append(self.served)
        if self.served > 1:
            self.close_connection = True
            return
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("name", PROVIDERS)
def test_a_paid_call_never_goes_out_on_a_reused_connection(name: str) -> None:
    """A connection the client keeps for reuse may be closed by the server as a request goes
    out on it; for a call that may charge that is `SubmitUnknown`, an item held for a person.
    So such calls open their own connection; calls safe to repeat keep reusing theirs."""
    _ClosesReusedConnections.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ClosesReusedConnections)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cls = registry.provider(name)
        provider = cls(**CREDENTIALS[name], endpoint=f"http://127.0.0.1:{server.server_address[1]}", max_attempts=1)
        shaped = cls.model_construct()
        poll, submit = shaped.poll_call("job-1"), shaped.submit_call(cls.sample_request())
        for call in (poll, submit, submit):
            with contextlib.suppress(ProviderError):  # `{}` is no provider's answer: only the connection matters
                provider.send(call)
    finally:
        server.shutdown()
        server.server_close()
    numbers = _ClosesReusedConnections.seen
    if submit.safe_to_repeat:  # TAMS dedupes: its submit reuses the poll's connection, as any safe call
        assert numbers[:2] == [1, 2]
    else:
        assert numbers == [1, 1, 1]


def _answered(name: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[ImageProvider, respx.Route]:
    route = respx.route(host="provider.test").mock(  # a stream: read (and decoded) as the client reads it
        side_effect=lambda request: httpx.Response(200, stream=httpx.ByteStream(body), headers=headers))
    return block(name, max_attempts=2), route


@pytest.mark.parametrize("name", PROVIDERS)
@respx.mock
def test_a_submit_answer_that_does_not_decode_is_unknown_where_a_repeat_could_pay(name: str) -> None:
    """A body that claims gzip and is not: the request went out, so for a paid call that is not
    safe to repeat it is `SubmitUnknown` (it was recorded `refused`, and the next run paid again)."""
    provider, route = _answered(name, b"not gzip at all", {"Content-Encoding": "gzip",
                                                           "Content-Type": "application/json"})
    expected = TransientError if type(provider).idempotent_submit else SubmitUnknown
    with pytest.raises(expected, match="DecodingError"):
        provider.submit(type(provider).sample_request())
    assert route.call_count == (2 if type(provider).idempotent_submit else 1)


@pytest.mark.parametrize("body", [
    b'{"code": 0, "success": true, "data": {"paintingSign": "t1", "used": "4x"}}',  # a charge that is no number
    b'{"code": "0", "success": true, "data": {"paintingSign": "t1", "used": 4}}',  # success, with a code of text
    b'{"code": "zero", "success": false, "msg": "?"}',  # a code that is no number
])
@respx.mock
def test_a_draw_answer_that_cannot_be_read_is_unknown_not_refused(body: bytes) -> None:
    """触站AI charges at submit: an answer this client cannot read may be of a task created and
    charged, so it is never taken for a refusal (which the next run sends again)."""
    provider, route = _answered("chuzhan", body, {"Content-Type": "application/json"})
    with pytest.raises(SubmitUnknown, match="may have been charged|says success|could not be read"):
        provider.submit(provider.sample_request())
    assert route.call_count == 1


@respx.mock
def test_an_image_to_image_answer_without_its_image_is_unknown() -> None:
    """Tencent ImageToImage answers with the image: an answer without it may still be charged."""
    provider, route = _answered("tencent", b'{"Response": {"RequestId": "r1"}}', {"Content-Type": "application/json"})
    request = provider.sample_request().model_copy(update={"input_ref": "aW1hZ2U=", "has_input": True})
    with pytest.raises(SubmitUnknown, match="without a ResultImage"):
        provider.submit(request)
    assert route.call_count == 1


@respx.mock
def test_a_tams_submit_answered_already_exists_is_unknown_not_refused() -> None:
    """TAMS documents requestId as idempotent, not what a repeat returns: a 409 ALREADY_EXISTS
    says a job of this request exists (paid for), so the step is never recorded as refused."""
    route = respx.route(host="provider.test").mock(
        return_value=httpx.Response(409, json={"code": 6, "message": "job already exists"}))
    provider = block("tams", max_attempts=2)
    with pytest.raises(SubmitUnknown, match="a job of this requestId already exists"):
        provider.submit(provider.sample_request())
    assert route.call_count == 1


@respx.mock
def test_an_image_to_image_result_on_a_private_address_is_not_fetched() -> None:
    """Tencent's synchronous answer names its result URL: a private address is refused as an
    asynchronous job's is (the provider's world is the internet, never the worker's network)."""
    from blocks.base import CreditEstimate, ResultRefused

    respx.route(host="provider.test").mock(return_value=httpx.Response(
        200, json={"Response": {"RequestId": "r1", "ResultImage": "http://10.0.0.7/result.png"}}))
    private = respx.route(host="10.0.0.7").mock(return_value=httpx.Response(200, content=b"png"))
    provider = block("tencent", max_attempts=2)
    request = provider.sample_request().model_copy(update={"input_ref": "aW1hZ2U=", "has_input": True})
    with pytest.raises(ResultRefused, match=r"private address \(10.0.0.7\)"):
        provider.run_job(request, poll_interval=0.1, timeout=5, estimate=CreditEstimate(credits=1.0, source="formula"))
    assert private.call_count == 0


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f000001", "0177.0.0.1", "0", "2852039166", "10.1"])
@respx.mock
def test_a_private_address_in_a_short_or_numeric_form_is_refused_too(host: str) -> None:
    """The resolver takes `127.1`, `2130706433` (a number), `0x7f000001` and `0177.0.0.1` as
    addresses, and `2852039166` is 169.254.169.254 (a cloud's metadata service): each is
    refused as its dotted form is, never fetched."""
    from blocks.base import CreditEstimate, ResultRefused, private_host

    respx.route(host="provider.test").mock(return_value=httpx.Response(
        200, json={"Response": {"RequestId": "r1", "ResultImage": f"http://{host}/result.png"}}))
    private = respx.route(host=host).mock(return_value=httpx.Response(200, content=b"png"))
    provider = block("tencent", max_attempts=2)
    request = provider.sample_request().model_copy(update={"input_ref": "aW1hZ2U=", "has_input": True})
    with pytest.raises(ResultRefused, match="private address"):
        provider.run_job(request, poll_interval=0.1, timeout=5, estimate=CreditEstimate(credits=1.0, source="formula"))
    assert private.call_count == 0
    assert not any(private_host(name) for name in ("8.8.8.8", "0x8.0x8.0x8.0x8", "example.com", "123abc"))


@pytest.mark.parametrize("declared", [True, False])
@respx.mock
def test_a_result_larger_than_an_image_may_be_is_not_read(declared: bool, monkeypatch) -> None:
    """A result URL that answers without end (or says it will): refused as it streams in, not
    read into memory whole."""
    from blocks import base

    monkeypatch.setattr(base, "MAX_IMAGE_BYTES", 1000)
    chunks = [b"x" * 400] * 5
    headers = {"Content-Length": "2000"} if declared else {}
    route = respx.get("https://results.test/big.png").mock(
        side_effect=lambda request: httpx.Response(200, stream=httpx.ByteStream(b"".join(chunks)), headers=headers))
    with pytest.raises(base.BadRequest, match=r"larger than an image may be \(1,000 bytes\); not read"):
        base.download("https://results.test/big.png", provider="tams", timeout=5, attempts=2, expiry="an hour")
    assert route.call_count == 1
