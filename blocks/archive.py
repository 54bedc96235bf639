"""The S3 archive, written through prefect-aws (`AwsCredentials`, `S3Bucket`, boto3 underneath)."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from botocore.config import Config
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
