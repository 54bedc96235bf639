"""The S3 archive, through prefect-aws (`AwsCredentials`, `S3Bucket`, boto3 underneath): every S3
call of the flows is one of these functions (reads, listings, writes, conditional writes,
deletes, presigned links); the key layout is `flows.specs.spec`'s."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from collections.abc import Iterator

from botocore.config import Config
from botocore.exceptions import ClientError
from prefect_aws import AwsCredentials, S3Bucket


@lru_cache(maxsize=16)
def _credentials(name: str) -> AwsCredentials:
    from blocks import load_block

    return load_block(AwsCredentials, name)


def archive_bucket(bucket: str, credentials: str) -> S3Bucket:
    """An `S3Bucket` for `bucket`, authenticated by the saved AwsCredentials Block `credentials`."""
    return S3Bucket(bucket_name=bucket, credentials=_credentials(credentials))


def write_bytes(bucket: S3Bucket, key: str, data: bytes) -> str:
    """Write `data` at `key`; return its `s3://` URI."""
    bucket.write_path(key, data)
    return f"s3://{bucket.bucket_name}/{key}"


def write_json(bucket: S3Bucket, key: str, document: Any) -> str:
    return write_bytes(bucket, key, json.dumps(document, indent=2, sort_keys=True, default=str).encode())


def read_json(bucket: S3Bucket, key: str) -> Any | None:
    """The JSON document at `key`, or None when there is none."""
    client = bucket.credentials.get_s3_client()
    try:
        body = client.get_object(Bucket=bucket.bucket_name, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    return json.loads(body)


def read_bytes(bucket: S3Bucket, key: str) -> bytes:
    """The bytes of the object at `key` (raises when there is none)."""
    client = bucket.credentials.get_s3_client()
    return client.get_object(Bucket=bucket.bucket_name, Key=key)["Body"].read()


def read_object(bucket: S3Bucket, key: str) -> tuple[bytes, str] | None:
    """The bytes and ETag of the object at `key`, or None when there is none."""
    client = bucket.credentials.get_s3_client()
    try:
        answer = client.get_object(Bucket=bucket.bucket_name, Key=key)
    except client.exceptions.NoSuchKey:
        return None
    return answer["Body"].read(), answer["ETag"]


def head(bucket: S3Bucket, key: str) -> dict[str, Any] | None:
    """The object's head (`ETag`, `Metadata`, ...), or None when there is none."""
    client = bucket.credentials.get_s3_client()
    try:
        return client.head_object(Bucket=bucket.bucket_name, Key=key)
    except ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return None
        raise


def list_objects(bucket: S3Bucket, prefix: str, *, folder_only: bool = False,
                 limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The objects under `prefix` (`Key`, `Size`, `ETag`), page by page; with `folder_only`,
    not those in its subfolders; at most `limit`, if given."""
    client = bucket.credentials.get_s3_client()
    ask: dict[str, Any] = {"Bucket": bucket.bucket_name, "Prefix": prefix, **({"Delimiter": "/"} if folder_only else {})}
    if limit is not None:
        ask["PaginationConfig"] = {"MaxItems": limit}
    for page in client.get_paginator("list_objects_v2").paginate(**ask):
        yield from page.get("Contents", [])


def delete(bucket: S3Bucket, key: str) -> None:
    bucket.credentials.get_s3_client().delete_object(Bucket=bucket.bucket_name, Key=key)


class PreconditionFailed(Exception):
    """A conditional write found the object other than it expected (HTTP 412)."""


_warned: list[bool] = []


def _warn_unconditional() -> None:
    if not _warned:
        _warned.append(True)
        from prefect.logging import get_logger

        get_logger("imagegen.ledger").warning("this S3 server does not implement conditional writes; the ledger "
                                              "relies on the run claim alone to keep two runs apart")


def put_conditionally(bucket: S3Bucket, key: str, body: bytes, *, if_match: str | None,
                      content_type: str = "application/json", metadata: dict[str, str] | None = None) -> str:
    """Write `body` at `key` only if the object still has ETag `if_match` (or, with None,
    does not exist yet); return the new ETag or raise `PreconditionFailed`. On an S3 server
    without conditional writes (501) it writes unconditionally, once warned."""
    client = bucket.credentials.get_s3_client()
    condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
    put = {"Bucket": bucket.bucket_name, "Key": key, "Body": body, "ContentType": content_type,
           **({"Metadata": metadata} if metadata else {})}
    try:
        return client.put_object(**put, **condition)["ETag"]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "PreconditionFailed":
            raise PreconditionFailed(key) from None
        if status == 501 or code == "NotImplemented":
            _warn_unconditional()
            return client.put_object(**put)["ETag"]
        raise


def read_uri(uri: str, credentials: str) -> bytes:
    """The bytes of an `s3://bucket/key` object."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    client = _credentials(credentials).get_s3_client()
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


_presigners: dict[int, tuple[AwsCredentials, Any]] = {}


def _presigner(creds: AwsCredentials) -> Any:
    """A SigV4 S3 client for `creds`, built once (a boto3 client costs ~0.3 s of CPU)."""
    held = _presigners.get(id(creds))
    if held is None or held[0] is not creds:
        client = creds.get_boto3_session().client(
            "s3", endpoint_url=creds.aws_client_parameters.endpoint_url, config=Config(signature_version="s3v4"))
        held = _presigners[id(creds)] = (creds, client)  # the creds kept alive, so their id stays theirs
    return held[1]


def presigned_url(bucket: S3Bucket, key: str, expires: int = 7 * 24 * 3600) -> str:
    """A SigV4 presigned GET URL (at most 7 days), for links in artifacts."""
    client = _presigner(bucket.credentials)
    return client.generate_presigned_url("get_object", Params={"Bucket": bucket.bucket_name, "Key": key},
                                         ExpiresIn=expires)
