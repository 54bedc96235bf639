"""The archive's credentials: a saved prefect-aws `AwsCredentials` Block, read without importing
prefect-aws where the Block needs nothing beyond boto3.

`import prefect_aws` loads its S3, Lambda and ECS worker modules with aiobotocore and aiohttp:
about 13 MB resident and half a second of CPU in every flow process, for a Block of which the
archive uses one thing, an S3 client. `load_credentials` reads the Block's saved document from
the Prefect server and builds that client from it exactly as prefect-aws does (`boto3.Session`
from the keys, profile and region; the client parameters as prefect-aws's
`AwsClientParameters.get_params_override` maps them). A Block that assumes an IAM role, or has a
field this reader does not know (a newer prefect-aws), is loaded through prefect-aws itself.
"""

from __future__ import annotations

import io
import os
import threading
from typing import Any

from blocks.errors import BlockMissing

SLUG = "aws-credentials"
_SESSION_FIELDS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "profile_name", "region_name")
_KNOWN = {*_SESSION_FIELDS, "aws_client_parameters", "assume_role_arn", "assume_role_kwargs"}
_CLIENT_FIELDS = {"api_version", "use_ssl", "verify", "verify_cert_path", "endpoint_url", "config"}


class ClientParameters:
    """The Block's `aws_client_parameters`, as the attributes prefect-aws's model has."""

    def __init__(self, saved: dict[str, Any]) -> None:
        self.api_version: str | None = saved.get("api_version")
        self.use_ssl: bool = saved.get("use_ssl", True)
        self.verify: bool | str | None = saved.get("verify")
        self.verify_cert_path: str | None = saved.get("verify_cert_path")
        self.endpoint_url: str | None = saved.get("endpoint_url")
        self.config: dict[str, Any] | None = saved.get("config")
        verify = saved.get("verify", True)  # prefect-aws's validator, as written there
        if not verify and self.verify_cert_path:
            self.verify_cert_path = None  # a CA bundle is ignored when verify is False (or null)
        elif not isinstance(verify, bool) and self.verify_cert_path:
            self.verify = True  # verify_cert_path takes precedence over a path in verify

    def overrides(self) -> dict[str, Any]:
        """The keyword arguments of `session.client(...)`, as `get_params_override` gives them."""
        from botocore import UNSIGNED
        from botocore.config import Config

        found: dict[str, Any] = {"use_ssl": self.use_ssl}
        if self.api_version is not None:
            found["api_version"] = self.api_version
        if self.endpoint_url is not None:
            found["endpoint_url"] = self.endpoint_url
        if self.verify_cert_path:
            found["verify"] = self.verify_cert_path
        elif self.verify is not None:
            found["verify"] = self.verify
        if self.config is not None:
            config = found["config"] = Config(**self.config)
            if config.signature_version == "unsigned":
                config.signature_version = UNSIGNED
        return found


class ArchiveCredentials:
    """A saved AwsCredentials Block, with the calls the archive makes of one:
    `get_boto3_session`, `get_s3_client` (one client, built once) and `aws_client_parameters`.
    The secret key stays a `SecretStr` until boto3 is handed it, as in prefect-aws."""

    assume_role_arn = None  # a Block with a role is prefect-aws's to load (`load_credentials`)

    def __init__(self, saved: dict[str, Any]) -> None:
        from pydantic import SecretStr

        self._session_args = {field: saved.get(field) for field in _SESSION_FIELDS}
        secret = self._session_args.pop("aws_secret_access_key")
        self._secret = SecretStr(secret) if secret is not None else None
        self.aws_client_parameters = ClientParameters(saved.get("aws_client_parameters") or {})
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ArchiveCredentials(aws_access_key_id={self._session_args['aws_access_key_id']!r}, secret=********)"

    def get_boto3_session(self) -> Any:
        import boto3

        secret = self._secret.get_secret_value() if self._secret is not None else None
        return boto3.Session(**self._session_args, aws_secret_access_key=secret)

    def get_s3_client(self) -> Any:
        if self._client is not None:
            return self._client
        with self._lock:
            if self._client is None:
                overrides = self.aws_client_parameters.overrides()
                if (region := self._session_args["region_name"]) is not None:
                    overrides["region_name"] = region
                self._client = self.get_boto3_session().client("s3", **overrides)
            return self._client


class ArchiveBucket:
    """A bucket and the credentials to reach it (what the archive used prefect-aws's `S3Bucket` for)."""

    def __init__(self, bucket_name: str, credentials: Any) -> None:
        self.bucket_name = bucket_name
        self.credentials = credentials

    def write_path(self, key: str, content: bytes) -> str:
        """Upload `content` at `key` (boto3's managed upload, as `S3Bucket.write_path`); return `key`."""
        with io.BytesIO(content) as stream:
            self.credentials.get_s3_client().upload_fileobj(Fileobj=stream, Bucket=self.bucket_name, Key=key)
        return key


def readable(saved: dict[str, Any]) -> bool:
    """True when this module builds the Block's client as prefect-aws would: no role to assume,
    no field it does not know, and every value of the type prefect-aws takes without converting
    it (anything else is prefect-aws's to check, and to refuse in its words)."""
    params = saved.get("aws_client_parameters") or {}
    if saved.get("assume_role_arn") or not set(saved) <= _KNOWN or not isinstance(params, dict) \
            or not set(params) <= _CLIENT_FIELDS:
        return False
    texts = [saved.get(f) for f in _SESSION_FIELDS] + [params.get("api_version"), params.get("endpoint_url")]
    cert = params.get("verify_cert_path")
    return (all(isinstance(v, str | None) for v in texts) and isinstance(params.get("use_ssl", True), bool)
            and isinstance(params.get("verify"), bool | None) and isinstance(params.get("config"), dict | None)
            and (cert is None or (isinstance(cert, str) and os.path.isfile(cert))))


def load_credentials(name: str) -> Any:
    """The saved AwsCredentials Block `name`: an `ArchiveCredentials` where `readable`, else
    prefect-aws's `AwsCredentials`; `BlockMissing` when the server has none of that name."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            saved = client.read_block_document_by_name(name=name, block_type_slug=SLUG, include_secrets=True).data
    except ObjectNotFound:
        from prefect.settings import PREFECT_API_URL

        raise BlockMissing(SLUG, name, PREFECT_API_URL.value()) from None
    if readable(saved):
        return ArchiveCredentials(saved)
    from prefect_aws import AwsCredentials

    from blocks import load_block

    return load_block(AwsCredentials, name)
