"""The ledger's small S3 calls, sent directly: a GET with its ETag, a HEAD, a conditional PUT,
and a listing of a folder.

Every item reads its ledger record and writes it three times, and writes its images and sidecars
conditionally; through boto3 each of those calls cost about 1.6 ms of CPU (its event hooks,
user-agent, endpoint rules and parsing), a quarter of the flow's CPU outside Prefect. Here the
same request is signed (AWS Signature Version 4, `sign`) and sent on one pooled connection per
host, about 0.4 ms. It is a fast path only, never a second implementation of S3:

- where it goes and with what is taken from the bucket's own boto3 client: the URL botocore
  would use for the bucket (path or virtual-host style, its endpoint), its region and
  credentials (refreshed as botocore refreshes them);
- it answers only what it can tell for sure: the object (200), no such key (404
  `NoSuchKey`), not the ETag expected (412 `PreconditionFailed`). Any other answer, a connection
  that fails, a proxy in the environment, a non-ASCII header value or anonymous credentials
  make `Fallback`, and `flows.storage` makes the call through boto3 as before, with its retries,
  redirects and error types;
- a bucket where boto3 then succeeded where the direct call did not (another region, a header
  the server requires) takes boto3 for the rest of the process.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from xml.etree import ElementTree

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
PROBE_KEY = "imagegen-route-probe"


class Fallback(Exception):
    """The direct call cannot tell: make it through boto3. `answered`: S3 gave an answer this
    path does not read (if boto3 then succeeds, this bucket is boto3's from then on); not after
    a connection that failed, which says nothing about the path."""

    def __init__(self, why: str, answered: bool = False) -> None:
        super().__init__(why)
        self.answered = answered


@dataclass(frozen=True)
class Route:
    """Where a bucket's objects are and how requests to them are signed."""

    base: str  # scheme://host[:port]/ or scheme://host[:port]/bucket/ (as botocore addresses it)
    host: str  # the Host header (netloc)
    region: str
    credentials: Any  # botocore Credentials (maybe refreshable)
    timeout: tuple[float, float]  # connect, read


_routes: dict[tuple[int, str], Route | None] = {}
_pinned: dict[int, Any] = {}  # keeps each credentials Block alive, so its id stays its own
_lock = threading.Lock()
_pool: Any = None


def route(bucket: Any) -> Route:
    """The bucket's route (built once per credentials Block and bucket); `Fallback` where the
    direct path is off for it."""
    key = (id(bucket.credentials), bucket.bucket_name)
    if key not in _routes:
        with _lock:
            if key not in _routes:
                _pinned[id(bucket.credentials)] = bucket.credentials
                try:
                    _routes[key] = _build(bucket)
                except Exception:  # noqa: BLE001 - a client this path cannot read: boto3's calls
                    _routes[key] = None
    found = _routes[key]
    if found is None:
        raise Fallback("direct S3 calls are off for this bucket")
    return found


def switch_off(bucket: Any, why: Fallback) -> None:
    """boto3 succeeded where the direct call got an answer it could not read: boto3 for this
    bucket from now on."""
    if why.answered:
        _routes[(id(bucket.credentials), bucket.bucket_name)] = None


def _build(bucket: Any) -> Route | None:
    if urllib.request.getproxies():
        return None  # botocore honours proxies from the environment; this path does not
    client = bucket.credentials.get_s3_client()
    config = client.meta.config
    if getattr(config, "proxies", None) or getattr(config, "signature_version", None) not in (None, "s3v4", "v4"):
        return None
    if getattr(bucket.credentials, "assume_role_arn", None):
        return None  # each session assumes the role anew: botocore's client keeps its own
    credentials = bucket.credentials.get_boto3_session().get_credentials()
    if credentials is None:
        return None  # anonymous: botocore's to sign (or not)
    probe = urllib.parse.urlsplit(client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket.bucket_name, "Key": PROBE_KEY}, ExpiresIn=60))
    if probe.scheme not in ("http", "https") or not probe.path.endswith("/" + PROBE_KEY):
        return None
    if probe.scheme == "https" and _custom_verify(bucket.credentials):
        return None  # a CA bundle or verify=False of the Block: botocore's to apply
    base = f"{probe.scheme}://{probe.netloc}{probe.path[:-len(PROBE_KEY)]}"
    return Route(base=base, host=probe.netloc, region=client.meta.region_name or "us-east-1",
                 credentials=credentials, timeout=(float(config.connect_timeout), float(config.read_timeout)))


def _custom_verify(credentials: Any) -> bool:
    params = getattr(credentials, "aws_client_parameters", None)
    return params is not None and (getattr(params, "verify", None) not in (None, True)
                                   or getattr(params, "verify_cert_path", None) is not None)


def quote_key(key: str) -> str:
    """A key as it goes in the URL path, escaped as botocore escapes it."""
    return urllib.parse.quote(key, safe="/~")


def sign(method: str, url: str, host: str, headers: dict[str, str], payload_sha256: str, region: str,
         access_key: str, secret_key: str, token: str | None, now: datetime) -> dict[str, str]:
    """`headers` with the SigV4 headers added (`Authorization`, `x-amz-date`,
    `x-amz-content-sha256`, and `x-amz-security-token` with a session token), for S3. A query in
    `url` must be in canonical form (`canonical_query`)."""
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    signed = {**{k.lower(): v for k, v in headers.items()}, "host": host, "x-amz-date": stamp,
              "x-amz-content-sha256": payload_sha256, **({"x-amz-security-token": token} if token else {})}
    names = sorted(signed)
    parts = urllib.parse.urlsplit(url)
    canonical = "\n".join([method, parts.path, parts.query,
                           "".join(f"{n}:{' '.join(str(signed[n]).split())}\n" for n in names),
                           ";".join(names), payload_sha256])
    scope = f"{stamp[:8]}/{region}/s3/aws4_request"
    signature = _signature(canonical, stamp, scope, secret_key)
    signed.pop("host")
    signed["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                               f"SignedHeaders={';'.join(names)}, Signature={signature}")
    return signed


def presign_get(url: str, host: str, expires: int, region: str, access_key: str, secret_key: str,
                token: str | None, now: datetime) -> str:
    """`url` with SigV4 query authentication for a GET valid `expires` seconds (a presigned URL,
    as S3 documents "Authenticating Requests: Using Query Parameters")."""
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    scope = f"{stamp[:8]}/{region}/s3/aws4_request"
    query = {"X-Amz-Algorithm": "AWS4-HMAC-SHA256", "X-Amz-Credential": f"{access_key}/{scope}",
             "X-Amz-Date": stamp, "X-Amz-Expires": str(expires), "X-Amz-SignedHeaders": "host",
             **({"X-Amz-Security-Token": token} if token else {})}
    encoded = canonical_query(query)
    canonical = "\n".join(["GET", urllib.parse.urlsplit(url).path, encoded, f"host:{host}\n", "host",
                           "UNSIGNED-PAYLOAD"])
    return f"{url}?{encoded}&X-Amz-Signature={_signature(canonical, stamp, scope, secret_key)}"


def canonical_query(query: dict[str, str]) -> str:
    """A query string as SigV4 signs it: each name and value escaped, sorted by name."""
    return "&".join(f"{_uri(k)}={_uri(v)}" for k, v in sorted(query.items()))


def _uri(text: str) -> str:
    return urllib.parse.quote(text, safe="-_.~")


def _signature(canonical: str, stamp: str, scope: str, secret_key: str) -> str:
    """The SigV4 signature of a canonical request, in `scope` (date/region/s3/aws4_request)."""
    to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = ("AWS4" + secret_key).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def _frozen(found: Route) -> Any:
    """The route's credentials as of now (refreshed as botocore refreshes them); `Fallback`
    where that fails."""
    try:
        return found.credentials.get_frozen_credentials()
    except Exception as exc:  # noqa: BLE001 - a refresh that failed: boto3's to report
        raise Fallback(f"credentials: {type(exc).__name__}") from None


def presigned(bucket: Any, key: str, expires: int) -> str:
    """A presigned GET URL of `key`, signed here with the bucket's route (no second boto3 client:
    one costs ~10 MB of botocore's models); `Fallback` where the direct path is off for it."""
    found = route(bucket)
    frozen = _frozen(found)
    return presign_get(found.base + quote_key(key), found.host, expires, found.region, frozen.access_key,
                       frozen.secret_key, frozen.token, datetime.now(timezone.utc))


def _send(bucket: Any, method: str, key: str, headers: dict[str, str] | None = None,
          body: bytes = b"", query: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One signed request for `key` of `bucket` (the bucket itself: ""): status, headers, body;
    `Fallback` on anything but an answer."""
    global _pool
    found = route(bucket)
    headers = headers or {}
    if not all(str(v).isascii() for v in headers.values()):
        raise Fallback("a header value is not ASCII")
    url = found.base + quote_key(key) + (f"?{canonical_query(query)}" if query else "")
    frozen = _frozen(found)
    signed = sign(method, url, found.host, headers, hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256,
                  found.region, frozen.access_key, frozen.secret_key, frozen.token, datetime.now(timezone.utc))
    import urllib3

    if _pool is None:
        with _lock:
            _pool = _pool or urllib3.PoolManager(maxsize=64, retries=False)
    try:
        answer = _pool.request(method, url, body=body if method == "PUT" else None, headers=signed, redirect=False,
                               timeout=urllib3.Timeout(connect=found.timeout[0], read=found.timeout[1]))
    except Exception as exc:  # noqa: BLE001 - whatever failed, boto3 makes the call (and says why)
        raise Fallback(f"{type(exc).__name__}: {exc}") from None
    return answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.data


def _code(body: bytes) -> str | None:
    """The `<Code>` of an S3 error document."""
    start = body.find(b"<Code>")
    end = body.find(b"</Code>", start)
    return body[start + 6:end].decode(errors="replace") if start >= 0 and end > start else None


def get(bucket: Any, key: str) -> tuple[bytes, str] | None:
    """The object's bytes and ETag; None where S3 says there is no such key."""
    status, headers, body = _send(bucket, "GET", key)
    if status == 200 and "etag" in headers:
        return body, headers["etag"]
    if status == 404 and _code(body) == "NoSuchKey":
        return None
    raise Fallback(f"GET answered {status}", answered=True)


def head(bucket: Any, key: str) -> dict[str, Any] | None:
    """The object's `ETag` and `Metadata` (as boto3's `head_object` names them); None when absent."""
    status, headers, _ = _send(bucket, "HEAD", key)
    if status == 200 and "etag" in headers:
        return {"ETag": headers["etag"],
                "Metadata": {k[len("x-amz-meta-"):]: v for k, v in headers.items() if k.startswith("x-amz-meta-")}}
    if status == 404:  # a HEAD answer has no body: boto3 maps any 404 to None here too
        return None
    raise Fallback(f"HEAD answered {status}", answered=True)


class NotMatched(Exception):
    """The object is not as the condition says (412 `PreconditionFailed`)."""


def put(bucket: Any, key: str, body: bytes, *, if_match: str | None, content_type: str,
        metadata: dict[str, str] | None) -> str:
    """Write `body` if the object still has ETag `if_match` (None: if there is none yet); the
    new ETag, or `NotMatched`."""
    condition = {"if-match": if_match} if if_match else {"if-none-match": "*"}
    headers = {"content-type": content_type, **condition,
               **{f"x-amz-meta-{k.lower()}": v for k, v in (metadata or {}).items()}}
    status, answer, data = _send(bucket, "PUT", key, headers, body)
    if status == 200 and "etag" in answer:
        return answer["etag"]
    if status == 412 and _code(data) == "PreconditionFailed":
        raise NotMatched(key)
    raise Fallback(f"PUT answered {status}", answered=True)


LIST_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def list_page(bucket: Any, prefix: str, delimiter: str | None, token: str | None
              ) -> tuple[list[dict[str, Any]], str | None]:
    """One page of the objects under `prefix` (ListObjectsV2; with `delimiter`, not those past
    it): each object's `Key`, `Size` and `ETag` as boto3 gives them, and the token of the next
    page (None: this is the last). Read as the page arrives, keeping only those three: through
    botocore, listing a folder of 10,000 objects left the process 18 MB larger."""
    query = {"list-type": "2", "prefix": prefix, "encoding-type": "url",
             **({"delimiter": delimiter} if delimiter else {}), **({"continuation-token": token} if token else {})}
    status, _, body = _send(bucket, "GET", "", query=query)
    if status != 200:
        raise Fallback(f"LIST answered {status}", answered=True)
    try:
        return _listed(body)
    except (ElementTree.ParseError, KeyError, ValueError) as exc:
        raise Fallback(f"LIST answer not read: {exc}", answered=True) from None


def _listed(body: bytes) -> tuple[list[dict[str, Any]], str | None]:
    """The objects of a ListObjectsV2 answer, their keys decoded where the answer says they are
    url-encoded (as botocore decodes them), and the next page's token."""
    objects, fields, top = [], {}, {}
    for _, element in ElementTree.iterparse(io.BytesIO(body)):
        name = element.tag.removeprefix(LIST_NS)
        if name == "Contents":
            objects.append({"Key": fields["Key"], "Size": int(fields["Size"]), "ETag": fields.get("ETag", "")})
            fields = {}
        elif name in ("Key", "Size", "ETag"):
            fields[name] = element.text or ""
        elif name in ("IsTruncated", "NextContinuationToken", "EncodingType"):
            top[name] = element.text or ""
        element.clear()
    if top.get("EncodingType") == "url":
        for obj in objects:
            obj["Key"] = urllib.parse.unquote_plus(obj["Key"])
    truncated = top.get("IsTruncated") == "true"
    if truncated and not top.get("NextContinuationToken"):
        raise ValueError("truncated without a next token")
    return objects, top["NextContinuationToken"] if truncated else None
