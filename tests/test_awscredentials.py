"""The archive's AwsCredentials Block read without prefect-aws (`blocks.awscredentials`): the same
client arguments and session as prefect-aws builds from the same saved fields (prefect-aws is
the witness here), prefect-aws itself for what the reader does not know, and a process that
archives through it never imports prefect-aws."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from typing import Any

import pytest

from blocks.awscredentials import ArchiveCredentials, ClientParameters, load_credentials, readable
from blocks.errors import BlockMissing
from tests.conftest import TEST_BUCKET

PARAMETERS = [
    {},
    {"endpoint_url": "http://127.0.0.1:8333"},
    {"endpoint_url": "https://s3.example.com", "use_ssl": False, "api_version": "2006-03-01"},
    {"verify": False},
    {"verify": True, "verify_cert_path": __file__},
    {"verify": False, "verify_cert_path": __file__},
    {"verify": None, "verify_cert_path": __file__},
    {"config": {"retries": {"max_attempts": 7}, "connect_timeout": 3}},
    {"config": {"signature_version": "unsigned"}},
]


def _comparable(overrides: dict[str, Any]) -> dict[str, Any]:
    found = dict(overrides)
    if "config" in found:
        config = found["config"]
        found["config"] = (config._user_provided_options, config.signature_version)
    if "verify" in found and not isinstance(found["verify"], bool):
        found["verify"] = str(found["verify"])
    return found


@pytest.mark.parametrize("saved", PARAMETERS)
def test_the_client_arguments_are_prefect_aws_s(saved: dict[str, Any]) -> None:
    import warnings

    from prefect_aws.client_parameters import AwsClientParameters

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = AwsClientParameters(**saved).get_params_override()
    assert _comparable(ClientParameters(saved).overrides()) == _comparable(theirs)


def test_the_session_and_client_are_prefect_aws_s() -> None:
    from prefect_aws import AwsCredentials

    saved = {"aws_access_key_id": "AKIDEXAMPLE", "aws_secret_access_key": "s3cr3t-value", "aws_session_token": "token",
             "region_name": "eu-west-3", "aws_client_parameters": {"endpoint_url": "http://127.0.0.1:1"}}
    ours, theirs = ArchiveCredentials(saved), AwsCredentials(**saved)
    assert ours.get_boto3_session().get_credentials().get_frozen_credentials() \
        == theirs.get_boto3_session().get_credentials().get_frozen_credentials()
    mine, its = ours.get_s3_client(), theirs.get_s3_client()
    assert (mine.meta.endpoint_url, mine.meta.region_name) == (its.meta.endpoint_url, its.meta.region_name)
    assert ours.get_s3_client() is mine  # built once
    assert "s3cr3t-value" not in repr(ours) and "s3cr3t-value" not in str(vars(ours))  # a SecretStr until boto3


@pytest.mark.parametrize("saved, expected", [
    ({"aws_access_key_id": "a", "aws_secret_access_key": "b", "aws_client_parameters": {"endpoint_url": "x"}}, True),
    ({"assume_role_arn": "arn:aws:iam::123456789012:role/r"}, False),
    ({"a_field_of_a_newer_prefect_aws": 1}, False),
    ({"aws_client_parameters": {"a_newer_parameter": 1}}, False),
    ({"aws_client_parameters": {"use_ssl": "no"}}, False),  # prefect-aws's to convert or refuse
    ({"aws_client_parameters": {"verify": "false"}}, False),
    ({"aws_client_parameters": {"config": "retries=3"}}, False),
    ({"aws_client_parameters": {"verify_cert_path": "/no/such/bundle.pem"}}, False),
    ({"aws_client_parameters": {"verify_cert_path": __file__}}, True),
    ({"region_name": 3}, False),
])
def test_what_the_reader_leaves_to_prefect_aws(saved: dict[str, Any], expected: bool) -> None:
    assert readable(saved) is expected


def test_the_saved_block_is_read_and_reaches_s3(sandbox_blocks) -> None:  # noqa: ANN001
    from flows import storage

    assert isinstance(load_credentials("sandbox"), ArchiveCredentials)
    bucket = storage.archive_bucket(TEST_BUCKET, "sandbox")
    assert isinstance(bucket.credentials, ArchiveCredentials)
    key = f"awscreds/{uuid.uuid4().hex}.bin"
    storage.write_bytes(bucket, key, b"bytes")
    assert storage.read_bytes(bucket, key) == b"bytes"


def test_a_block_with_a_role_is_prefect_aws_s_and_a_missing_one_is_named(sandbox_blocks) -> None:  # noqa: ANN001
    from prefect_aws import AwsCredentials

    name = f"role-{uuid.uuid4().hex[:8]}"
    AwsCredentials(aws_access_key_id="a", aws_secret_access_key="b",
                   assume_role_arn="arn:aws:iam::123456789012:role/r").save(name)
    try:
        assert type(load_credentials(name)) is AwsCredentials
    finally:
        AwsCredentials.delete(name)
    with pytest.raises(BlockMissing, match=r"no aws-credentials Block named 'nobody'.*`imagegen sandbox register --block-name nobody`"):
        load_credentials("nobody")


def test_archiving_does_not_import_prefect_aws(sandbox_blocks) -> None:  # noqa: ANN001
    """A process that loads the flow and writes and reads through the archive's credentials: no
    prefect_aws module in it (about 13 MB resident and 0.5 s of CPU a flow process)."""
    from prefect.settings import PREFECT_API_URL

    script = ("import sys, uuid\nimport flows.pipeline\nfrom flows import storage\n"
              f"b = storage.archive_bucket({TEST_BUCKET!r}, 'sandbox')\n"
              "k = f'awscreds/{uuid.uuid4().hex}'\nstorage.write_bytes(b, k, b'x')\n"
              "assert storage.read_bytes(b, k) == b'x'\n"
              "print(sorted(m for m in sys.modules if m.startswith('prefect_aws')))\n")
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
