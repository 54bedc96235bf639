"""The ledger's small S3 calls sent directly (`flows.s3direct`): signed as S3 documents it, the
same answers as through boto3 from a real S3 server (SeaweedFS checks every signature), and
boto3's calls, error types included, wherever the direct call cannot tell."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timezone
from urllib.parse import parse_qs

import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from flows import s3direct, storage
from tests.netcut import CuttableProxy


def test_the_signature_of_aws_documented_get_example() -> None:
    """AWS's own worked example (S3 API reference, "Signature Calculations for the Authorization
    Header: Transferring Payload in a Single Chunk", GET Object): the signature it prints."""
    signed = s3direct.sign("GET", "https://examplebucket.s3.amazonaws.com/test.txt", "examplebucket.s3.amazonaws.com",
                           {"Range": "bytes=0-9"}, s3direct.EMPTY_SHA256, "us-east-1", "AKIAIOSFODNN7EXAMPLE",
                           "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", None, datetime(2013, 5, 24, tzinfo=timezone.utc))
    assert signed["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")


@pytest.mark.parametrize("key", ["p/_jobs/item-1.json", "p/2026-07-01/a b+c=d,e;f@g~h(1).json"])
def test_a_conditional_put_is_signed_as_botocore_signs_it(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same request through botocore's own S3 signer gives the same signature (session token,
    metadata and condition headers included; keys with characters S3 escapes)."""
    import botocore.auth

    now = datetime(2026, 12, 3, 19, 30, 5, tzinfo=timezone.utc)
    body = b'{"state": "sending"}'
    url = "http://127.0.0.1:9000/bucket/" + s3direct.quote_key(key)
    headers = {"Content-Type": "application/json", "If-None-Match": "*", "x-amz-meta-imagegen-item": "item-1"}
    ours = s3direct.sign("PUT", url, "127.0.0.1:9000", headers, hashlib.sha256(body).hexdigest(), "eu-west-1",
                         "AK", "SK", "TOKEN", now)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now)
    request = AWSRequest(method="PUT", url=url, data=body, headers=headers)
    S3SigV4Auth(Credentials("AK", "SK", "TOKEN"), "s3", "eu-west-1").add_auth(request)
    assert request.headers["x-amz-content-sha256"] == ours["x-amz-content-sha256"]
    assert ours["authorization"] == request.headers["Authorization"]


@pytest.mark.parametrize("token", [None, "TOKEN/with+odd=chars"])
def test_a_presigned_url_is_signed_as_botocore_presigns_it(token: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A presigned GET (query authentication) equals botocore's own `S3SigV4QueryAuth` URL,
    for a key with characters S3 escapes, with and without a session token."""
    import botocore.auth

    now = datetime(2026, 12, 3, 19, 30, 5, tzinfo=timezone.utc)
    url = "http://127.0.0.1:9000/bucket/" + s3direct.quote_key("p/_review/a b+c=d,e;f@g~h(1).png")
    ours = s3direct.presign_get(url, "127.0.0.1:9000", 3600, "eu-west-1", "AK", "SK", token, now)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now)
    request = AWSRequest(method="GET", url=url)
    S3SigV4QueryAuth(Credentials("AK", "SK", token), "s3", "eu-west-1", expires=3600).add_auth(request)
    theirs = request.prepare().url
    assert ours.partition("?")[0] == theirs.partition("?")[0] == url
    assert parse_qs(ours.partition("?")[2], strict_parsing=True) == parse_qs(theirs.partition("?")[2])  # any order


def _bucket(url: str, access_key: str, secret_key: str, name: str):  # noqa: ANN202 - an S3Bucket
    from prefect_aws import AwsCredentials, S3Bucket

    creds = AwsCredentials(aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name="us-east-1",
                           aws_client_parameters={"endpoint_url": url})
    return S3Bucket(bucket_name=name, credentials=creds)


def test_direct_answers_are_boto3s_answers_on_a_real_s3_server(sandbox) -> None:  # noqa: ANN001
    bucket = _bucket(sandbox.s3_url, sandbox.s3_access_key, sandbox.s3_secret_key, sandbox.buckets[0])
    client = bucket.credentials.get_s3_client()
    key = f"direct/{uuid.uuid4().hex}/a b+c.json"
    assert storage.read_object(bucket, key) is None and storage.head(bucket, key) is None
    etag = storage.put_conditionally(bucket, key, b'{"n": 1}', if_match=None, metadata={"imagegen-item": "i1"})
    assert s3direct.route(bucket) is not None  # the direct path answered, and is still on
    with pytest.raises(storage.PreconditionFailed):
        storage.put_conditionally(bucket, key, b'{"n": 2}', if_match=None)
    with pytest.raises(storage.PreconditionFailed):
        storage.put_conditionally(bucket, key, b'{"n": 2}', if_match='"not-its-etag"')
    found = client.get_object(Bucket=bucket.bucket_name, Key=key)
    assert (found["Body"].read(), found["ETag"], found["ContentType"], found["Metadata"]) == (
        b'{"n": 1}', etag, "application/json", {"imagegen-item": "i1"})
    assert storage.read_object(bucket, key) == (b'{"n": 1}', etag)
    assert storage.head(bucket, key) == {"ETag": etag, "Metadata": {"imagegen-item": "i1"}}
    again = storage.put_conditionally(bucket, key, b'{"n": 3}', if_match=etag)
    assert client.get_object(Bucket=bucket.bucket_name, Key=key)["ETag"] == again != etag


def test_a_presigned_url_opens_the_object_on_a_real_s3_server(sandbox) -> None:  # noqa: ANN001
    """The gallery's and review's links: signed here, without a second boto3 client, and S3
    serves the object by them; a link whose signature is altered is refused."""
    import httpx

    bucket = _bucket(sandbox.s3_url, sandbox.s3_access_key, sandbox.s3_secret_key, sandbox.buckets[0])
    key = f"direct/{uuid.uuid4().hex}/a b+c.png"
    bucket.credentials.get_s3_client().put_object(Bucket=bucket.bucket_name, Key=key, Body=b"image bytes")
    url = storage.presigned_url(bucket, key)
    assert "X-Amz-Signature=" in url and id(bucket.credentials) not in storage._presigners
    assert httpx.get(url).content == b"image bytes"
    forged = url[:-1] + ("0" if url[-1] != "0" else "1")
    assert httpx.get(forged).status_code == 403


def test_what_the_direct_call_cannot_tell_goes_through_boto3_with_its_errors(sandbox) -> None:  # noqa: ANN001
    from botocore.exceptions import BotoCoreError, ClientError

    missing = _bucket(sandbox.s3_url, sandbox.s3_access_key, sandbox.s3_secret_key, f"no-such-{uuid.uuid4().hex[:8]}")
    with pytest.raises(ClientError, match="NoSuchBucket"):  # a 404 that is not NoSuchKey: boto3's error, as before
        storage.read_object(missing, "k.json")
    with pytest.raises(ClientError, match="NoSuchBucket"):
        list(storage.list_objects(missing, "p/"))
    proxy = CuttableProxy(int(sandbox.s3_url.rpartition(":")[2]))
    try:
        bucket = _bucket(proxy.url, sandbox.s3_access_key, sandbox.s3_secret_key, sandbox.buckets[0])
        key = f"direct/{uuid.uuid4().hex}.json"
        storage.put_conditionally(bucket, key, b"{}", if_match=None)
        proxy.cut()
        with pytest.raises(BotoCoreError):  # boto3's own error for a server gone, as before
            storage.read_object(bucket, key)
        proxy.restore()
        assert storage.read_object(bucket, key)[0] == b"{}"
        assert s3direct.route(bucket) is not None  # a connection that failed does not switch it off
    finally:
        proxy.close()


def test_a_bucket_boto3_answered_for_is_boto3s_from_then_on(sandbox) -> None:  # noqa: ANN001
    bucket = _bucket(sandbox.s3_url, sandbox.s3_access_key, sandbox.s3_secret_key, sandbox.buckets[0])
    s3direct.route(bucket)
    s3direct.switch_off(bucket, s3direct.Fallback("answered 301", answered=True))
    with pytest.raises(s3direct.Fallback):
        s3direct.route(bucket)
    key = f"direct/{uuid.uuid4().hex}.json"
    etag = storage.put_conditionally(bucket, key, b"{}", if_match=None)  # through boto3 now
    assert storage.read_object(bucket, key) == (b"{}", etag)


def _listed_by_boto3(client, bucket: str, prefix: str, delimiter: str | None) -> list[dict]:  # noqa: ANN001
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                             **({"Delimiter": delimiter} if delimiter else {}))
    return [{"Key": o["Key"], "Size": o["Size"], "ETag": o["ETag"]} for page in pages for o in page.get("Contents", [])]


def test_a_direct_listing_is_boto3s_listing_on_a_real_s3_server(sandbox, monkeypatch) -> None:  # noqa: ANN001
    """Keys S3 escapes (and XML must), more than one page, a folder with and without its
    subfolders, a limit (one at a page's end asks for that page alone); and a listing the direct
    call cannot read on from some page goes on through boto3 from that page, whole and once."""
    from concurrent.futures import ThreadPoolExecutor

    bucket = _bucket(sandbox.s3_url, sandbox.s3_access_key, sandbox.s3_secret_key, sandbox.buckets[0])
    client = bucket.credentials.get_s3_client()
    top = f"listing-{uuid.uuid4().hex[:8]}/"
    keys = [f"{top}k{n:04d} a+b=c&d<e>'\"é.png" for n in range(1100)] + [f"{top}sub/x.png", f"{top}sub/y z.png"]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=bucket.bucket_name, Key=key, Body=key.encode()), keys))
    for prefix, folder_only in ((top, True), (top, False), (f"{top}sub/", True), (f"{top}none/", False)):
        ours = list(storage.list_objects(bucket, prefix, folder_only=folder_only))
        assert ours == _listed_by_boto3(client, bucket.bucket_name, prefix, "/" if folder_only else None)
    assert len(list(storage.list_objects(bucket, top, limit=1050))) == 1050
    assert s3direct.route(bucket) is not None  # every page was read directly

    direct, pages, asked = s3direct.list_page, [], []
    monkeypatch.setattr(s3direct, "list_page", lambda *args: asked.append(args[3]) or direct(*args))
    assert len(list(storage.list_objects(bucket, top, limit=1000))) == 1000  # a page holds 1,000
    assert asked == [None]  # a limit at a page's end asks for no page it would not read

    def second_page_unread(*args):  # noqa: ANN002, ANN202 - a fault point: the second page's answer not read
        pages.append(args[3])
        if len(pages) == 2:
            raise s3direct.Fallback("LIST answer not read", answered=True)
        return direct(*args)

    monkeypatch.setattr(s3direct, "list_page", second_page_unread)
    assert list(storage.list_objects(bucket, top)) == _listed_by_boto3(client, bucket.bucket_name, top, None)
    assert pages[0] is None and pages[1] is not None and len(pages) == 2  # boto3 went on from the second page
    with pytest.raises(s3direct.Fallback):
        s3direct.route(bucket)  # and the bucket is boto3's from then on


def test_a_listing_page_decodes_keys_only_where_it_says_they_are_encoded() -> None:
    """As botocore does: keys are url-decoded where the answer's `EncodingType` is `url`, and
    taken as they are where an S3 server ignored the request for it; a page that says more follow
    without saying from where is not read."""
    page = ('<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><IsTruncated>{t}</IsTruncated>'
            '<Contents><Key>a+b%20c</Key><Size>3</Size><ETag>"e"</ETag></Contents>{extra}</ListBucketResult>')
    plain = page.format(t="false", extra="").encode()
    assert s3direct._listed(plain) == ([{"Key": "a+b%20c", "Size": 3, "ETag": '"e"'}], None)
    encoded = page.format(t="true", extra="<EncodingType>url</EncodingType>"
                                          "<NextContinuationToken>n1</NextContinuationToken>").encode()
    assert s3direct._listed(encoded) == ([{"Key": "a b c", "Size": 3, "ETag": '"e"'}], "n1")
    with pytest.raises(ValueError):
        s3direct._listed(page.format(t="true", extra="").encode())
