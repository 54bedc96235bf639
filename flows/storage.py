"""The archive in S3: its key layout and every S3 call of the flows, in one place.

- The key layout (`KeyLayout`, which `ArchiveSettings` of a spec inherits, and the functions
  after it): images and sidecars from the spec's `key_template`, the manifest, the perceptual
  hashes, the job ledger, quarantine and review staging, the owner record; and what makes a key
  unsafe. One derivation, for the writers and for the spec's checks.
- The calls, through boto3 with the credentials of a saved prefect-aws `AwsCredentials` Block
  (`blocks.awscredentials`, which reads it without importing prefect-aws): reads, listings,
  writes, conditional writes, deletes, presigned links. The small calls every item makes (a
  read with its ETag, a head, a conditional write) go out directly first (`flows.s3direct`, a
  quarter of the CPU), and through boto3 whenever that cannot tell.

botocore is imported only by the calls, so reading a spec (`imagegen validate`) does not load it.
"""

from __future__ import annotations

import io
import json
import re
import string
import unicodedata
from collections.abc import Iterator
from datetime import date, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from flows import s3direct

if TYPE_CHECKING:
    from blocks.awscredentials import ArchiveBucket, ArchiveCredentials


@lru_cache(maxsize=16)
def _credentials(name: str) -> ArchiveCredentials:
    from blocks.awscredentials import load_credentials

    return load_credentials(name)


def archive_bucket(bucket: str, credentials: str) -> ArchiveBucket:
    """`bucket`, authenticated by the saved AwsCredentials Block `credentials`."""
    from blocks.awscredentials import ArchiveBucket

    return ArchiveBucket(bucket, _credentials(credentials))


def write_bytes(bucket: ArchiveBucket, key: str, data: bytes) -> str:
    """Write `data` at `key`; return its `s3://` URI."""
    bucket.write_path(key, data)
    return f"s3://{bucket.bucket_name}/{key}"


def write_json(bucket: ArchiveBucket, key: str, document: Any) -> str:
    """Write `document` at `key` as indented JSON (`json_bytes`); return its `s3://` URI."""
    return write_bytes(bucket, key, json_bytes(document))


def json_bytes(document: Any) -> bytes:
    """`json.dumps(document, indent=2, sort_keys=True, default=str).encode()`, the same bytes,
    without its transient list of every piece: indented JSON is encoded in Python, piece by
    piece, and `dumps` keeps all the pieces (about six times the text in memory; 38 MB for a
    5,000-item manifest of 6.5 MB) until it joins them. Here they go to a buffer as they come."""
    buffer = io.BytesIO()
    pending: list[str] = []
    for piece in json.JSONEncoder(indent=2, sort_keys=True, default=str).iterencode(document):
        pending.append(piece)
        if len(pending) >= 4096:
            buffer.write("".join(pending).encode())
            pending.clear()
    buffer.write("".join(pending).encode())
    return buffer.getvalue()


def read_json(bucket: ArchiveBucket, key: str) -> Any | None:
    """The JSON document at `key`, or None when there is none."""
    client = bucket.credentials.get_s3_client()
    try:
        body = client.get_object(Bucket=bucket.bucket_name, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    return json.loads(body)


def read_bytes(bucket: ArchiveBucket, key: str) -> bytes:
    """The bytes of the object at `key` (raises when there is none)."""
    client = bucket.credentials.get_s3_client()
    return client.get_object(Bucket=bucket.bucket_name, Key=key)["Body"].read()


def read_object(bucket: ArchiveBucket, key: str) -> tuple[bytes, str] | None:
    """The bytes and ETag of the object at `key`, or None when there is none."""
    return _direct_first(bucket, lambda: s3direct.get(bucket, key), lambda: _read_object(bucket, key))


def _direct_first(bucket: ArchiveBucket, direct: Any, through_boto3: Any) -> Any:
    """The direct call's answer (`flows.s3direct`); where it cannot tell, boto3's, after which
    a bucket whose answer the direct call could not read is boto3's from then on."""
    try:
        return direct()
    except s3direct.Fallback as why:
        found = through_boto3()
        s3direct.switch_off(bucket, why)
        return found


def _read_object(bucket: ArchiveBucket, key: str) -> tuple[bytes, str] | None:
    client = bucket.credentials.get_s3_client()
    try:
        answer = client.get_object(Bucket=bucket.bucket_name, Key=key)
    except client.exceptions.NoSuchKey:
        return None
    return answer["Body"].read(), answer["ETag"]


def head(bucket: ArchiveBucket, key: str) -> dict[str, Any] | None:
    """The object's head (`ETag`, `Metadata`, ...), or None when there is none."""
    return _direct_first(bucket, lambda: s3direct.head(bucket, key), lambda: _head(bucket, key))


def _head(bucket: ArchiveBucket, key: str) -> dict[str, Any] | None:
    from botocore.exceptions import ClientError

    client = bucket.credentials.get_s3_client()
    try:
        return client.head_object(Bucket=bucket.bucket_name, Key=key)
    except ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return None
        raise


def list_objects(bucket: ArchiveBucket, prefix: str, *, folder_only: bool = False,
                 limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The objects under `prefix` (`Key`, `Size`, `ETag`), page by page; with `folder_only`,
    not those in its subfolders; at most `limit`, if given. Listed directly
    (`s3direct.list_page`); from the page the direct call cannot tell on, through boto3."""
    delimiter, given = "/" if folder_only else None, 0
    if limit is not None and limit <= 0:
        return
    for page in _pages(bucket, prefix, delimiter):
        for obj in page:
            yield obj
            given += 1
            if limit is not None and given >= limit:
                return  # before asking for a page it would not read


def _pages(bucket: ArchiveBucket, prefix: str, delimiter: str | None) -> Iterator[list[dict[str, Any]]]:
    token = None
    while True:
        try:
            page, token = s3direct.list_page(bucket, prefix, delimiter, token)
        except s3direct.Fallback as why:
            yield from _boto3_pages(bucket, prefix, delimiter, token, why)
            return
        yield page
        if token is None:
            return


def _boto3_pages(bucket: ArchiveBucket, prefix: str, delimiter: str | None, token: str | None,
                 why: s3direct.Fallback) -> Iterator[list[dict[str, Any]]]:
    """The pages from `token` on (None: the first) through boto3; once one is read where the
    direct call got an answer it could not, the bucket is boto3's from then on."""
    client = bucket.credentials.get_s3_client()
    ask: dict[str, Any] = {"Bucket": bucket.bucket_name, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
    while True:
        answer = client.list_objects_v2(**ask, **({"ContinuationToken": token} if token else {}))
        s3direct.switch_off(bucket, why)  # idempotent: one dict entry set
        yield [{"Key": o["Key"], "Size": o["Size"], "ETag": o.get("ETag", "")} for o in answer.get("Contents", [])]
        token = answer.get("NextContinuationToken") if answer.get("IsTruncated") else None
        if token is None:
            return


def delete(bucket: ArchiveBucket, key: str) -> None:
    bucket.credentials.get_s3_client().delete_object(Bucket=bucket.bucket_name, Key=key)


class PreconditionFailed(Exception):
    """A conditional write found the object other than it expected (HTTP 412)."""


class NotConditional(Exception):
    """The S3 server has no conditional writes (501), and the caller would not write without."""


_unconditional: set[str] = set()  # buckets whose S3 server answered 501 to a conditional write


def conditional_writes(bucket: ArchiveBucket) -> bool:
    """False once the bucket's S3 server has answered that it has no conditional writes."""
    return bucket.bucket_name not in _unconditional


def _no_conditional_writes(bucket: ArchiveBucket) -> None:
    """Remember the bucket's server has no conditional writes; the first time, say so."""
    if not _unconditional:
        from prefect.logging import get_logger

        get_logger("imagegen.ledger").warning("this S3 server does not implement conditional writes; the ledger "
                                              "relies on the run claim alone to keep two runs apart")
    _unconditional.add(bucket.bucket_name)


def put_conditionally(bucket: ArchiveBucket, key: str, body: bytes, *, if_match: str | None,
                      content_type: str = "application/json", metadata: dict[str, str] | None = None,
                      unconditional: bool = True) -> str:
    """Write `body` at `key` only if the object still has ETag `if_match` (or, with None,
    does not exist yet); return the new ETag or raise `PreconditionFailed`. On an S3 server
    without conditional writes (501) it writes unconditionally, once warned; or, with
    `unconditional=False`, writes nothing and raises `NotConditional`."""
    def through_boto3() -> str:
        return _put_conditionally(bucket, key, body, if_match, content_type, metadata, unconditional)

    if not conditional_writes(bucket):
        return through_boto3()
    try:
        return _direct_first(bucket, lambda: s3direct.put(bucket, key, body, if_match=if_match,
                                                          content_type=content_type, metadata=metadata), through_boto3)
    except s3direct.NotMatched:
        raise PreconditionFailed(key) from None


def _put_conditionally(bucket: ArchiveBucket, key: str, body: bytes, if_match: str | None, content_type: str,
                       metadata: dict[str, str] | None, unconditional: bool) -> str:
    from botocore.exceptions import ClientError

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
            _no_conditional_writes(bucket)
            if not unconditional:
                raise NotConditional(key) from None
            return client.put_object(**put)["ETag"]
        raise


def read_uri(uri: str, credentials: str) -> bytes:
    """The bytes of an `s3://bucket/key` object."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    client = _credentials(credentials).get_s3_client()
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


_presigners: dict[int, tuple[ArchiveCredentials, Any]] = {}


def _presigner(creds: ArchiveCredentials) -> Any:
    """A SigV4 S3 client for `creds`, built once (a boto3 client costs ~0.3 s of CPU)."""
    held = _presigners.get(id(creds))
    if held is None or held[0] is not creds:
        from botocore.config import Config

        client = creds.get_boto3_session().client(
            "s3", endpoint_url=creds.aws_client_parameters.endpoint_url, config=Config(signature_version="s3v4"))
        held = _presigners[id(creds)] = (creds, client)  # the creds kept alive, so their id stays theirs
    return held[1]


def presigned_url(bucket: ArchiveBucket, key: str, expires: int = 7 * 24 * 3600) -> str:
    """A SigV4 presigned GET URL (at most 7 days), for links in artifacts: signed directly
    where the bucket's direct path is on (`flows.s3direct`), else by a boto3 client of its own."""
    try:
        return s3direct.presigned(bucket, key, expires)
    except s3direct.Fallback:
        pass
    client = _presigner(bucket.credentials)
    return client.generate_presigned_url("get_object", Params={"Bucket": bucket.bucket_name, "Key": key},
                                         ExpiresIn=expires)


# --- the key layout: every key a pipeline writes, derived here --------------------------------
KEY_FIELDS = {"pipeline", "run_date", "item", "index", "provider"}
LEDGER_DIR = "_jobs"
OWNER_KEY = "{pipeline}/_owner.json"


class KeyLayout:
    """The keys of an archive's settings (`flows.specs.spec.ArchiveSettings`, which holds
    `key_template`, `manifest_template`, `quarantine_prefix` and `review_prefix`)."""

    key_template: str
    manifest_template: str
    quarantine_prefix: str
    review_prefix: str

    # --- the keys a run writes besides images and sidecars (one derivation, for writers and checks)
    def manifest_key(self, pipeline: str, run_date: date) -> str:
        return render_manifest_key(self.manifest_template, pipeline=pipeline, run_date=run_date)

    def phashes_key(self, pipeline: str, run_date: date) -> str:
        """The perceptual hashes of a run's approved images, beside its manifest."""
        return beside(self.manifest_key(pipeline, run_date), "phashes.json")

    def ledger_prefix(self, pipeline: str, run_date: date) -> str:
        """The folder of a run date's job ledger, beside its manifest."""
        return beside(self.manifest_key(pipeline, run_date), LEDGER_DIR + "/")

    # Quarantine and review staging lie inside the pipeline's own prefix (`{pipeline}/`, which
    # key_template starts with and `_owner.json` claims), so no prefix can reach another
    # pipeline's keys: `p/2026-07-02/a-1.png` is quarantined at `p/quarantine/2026-07-02/a-1.png`.
    def quarantined(self, key: str) -> str:
        """Where an image the review rejected goes: its key with the quarantine folder after `{pipeline}/`."""
        pipeline, _, rest = key.partition("/")
        return f"{self.quarantine_root(pipeline)}{rest}"

    def in_review(self, key: str) -> str:
        """Where an image waits for a person's decision: its key with the review folder after `{pipeline}/`."""
        pipeline, _, rest = key.partition("/")
        return f"{self.review_root(pipeline)}{rest}"

    def quarantine_root(self, pipeline: str) -> str:
        """The whole quarantine namespace of `pipeline`."""
        return f"{pipeline}/{self.quarantine_prefix.strip('/')}/"

    def review_root(self, pipeline: str) -> str:
        """The whole review staging namespace of `pipeline`."""
        return f"{pipeline}/{self.review_prefix.strip('/')}/"

    def legacy_quarantined(self, key: str) -> str:
        """Where releases before issue 25 quarantined an image (`<quarantine_prefix>/<key>`,
        outside the pipeline's prefix): read, never written, to recognise what they archived."""
        return f"{self.quarantine_prefix.strip('/')}/{key}"


def check_template(template: str, allowed: set[str]) -> set[str]:
    """The fields of a key template; `ValueError` unless it starts with `{pipeline}/`, has
    `{run_date}`, uses only `allowed` fields and no format spec that could make two different
    values one key (only `{index:03d}`-style padding and a `{run_date:...}` strftime format that
    tells every date apart)."""
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"malformed template: {exc}") from None
    fields = {f for f, _, _ in parsed}
    unknown = sorted(fields - allowed)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join('{' + f + '}' for f in unknown)} in template; "
                         f"allowed: {', '.join('{' + f + '}' for f in sorted(allowed))}")
    for field, spec, conv in parsed:
        if conv:
            raise ValueError(f"{{{field}!{conv}}}: conversions change what a key says; use {{{field}}}")
        if not spec:
            continue
        if field == "index" and re.fullmatch(r"0?[1-9]?d?", spec):
            continue
        if field == "run_date" and _tells_dates_apart(spec):
            continue
        why = ("a strftime format that gives two dates one key (it needs the year, month and day)"
               if field == "run_date" else "a format spec, which can cut or change the value and make keys collide")
        raise ValueError(f"{{{field}:{spec}}} has {why}")
    if not template.startswith("{pipeline}/"):
        raise ValueError("template must start with {pipeline}/ so that it writes only in this pipeline's own prefix")
    if "run_date" not in fields:
        raise ValueError("template must contain {run_date}, or every run date overwrites the last")
    return fields


def _tells_dates_apart(strftime: str) -> bool:
    if "{" in strftime or "}" in strftime:
        return False
    days = [date(2024, 1, 1) + timedelta(days=n) for n in range(4 * 366)]
    days += [date(year, month, 28) for year in range(2000, 2100) for month in (1, 12)]
    try:
        return len({d.strftime(strftime) for d in days}) == len(set(days))
    except ValueError:
        return False


UNSEEN = {"Cc": "a control character", "Cf": "an invisible format character", "Cs": "a lone surrogate",
          "Zl": "a line or paragraph separator", "Zp": "a line or paragraph separator"}
"""Unicode categories no key may hold: controls (U+0000-U+001F, U+007F-U+009F: NEL too), format
characters (zero-width, bidirectional overrides that show a name other than it is), lone
surrogates, and the line and paragraph separators (U+2028, U+2029), which split a printed line."""


def key_problem(key: str) -> str | None:
    """Why `key` is no safe S3 key of ours (absolute, empty/`.`/`..` segment, a character of
    `UNSEEN`'s categories, too long), or None."""
    if key.startswith("/"):
        return f"{key!r} is absolute (starts with '/')"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return f"{key!r} has an empty, '.' or '..' path segment"
    if (unseen := next((ch for ch in key if unicodedata.category(ch) in UNSEEN), None)) is not None:
        return f"{key!r} has {UNSEEN[unicodedata.category(unseen)]} (U+{ord(unseen):04X})"
    if len(key.encode()) > 1024:
        return "a key is longer than S3's 1024 bytes"
    return None


def beside(key: str, name: str) -> str:
    """`name` in the folder of `key`."""
    return (key.rsplit("/", 1)[0] + "/" if "/" in key else "") + name


def sidecar_key(key: str) -> str:
    """The JSON sidecar beside an image key: its extension replaced by `.json`."""
    return key.rsplit(".", 1)[0] + ".json" if "." in key.rsplit("/", 1)[-1] else key + ".json"


def render_key(
    template: str, *, pipeline: str, run_date: date, item: str, index: int, provider: str
) -> str:
    """Fill a key template; `{run_date}` is ISO unless given a strftime format."""
    return template.format(
        pipeline=pipeline, run_date=_IsoDate(run_date), item=item, index=index, provider=provider
    )


def render_manifest_key(template: str, *, pipeline: str, run_date: date) -> str:
    """Fill the manifest key template (fields pipeline and run_date)."""
    return template.format(pipeline=pipeline, run_date=_IsoDate(run_date))


class _IsoDate:
    def __init__(self, value: date) -> None:
        self.value = value

    def __format__(self, spec: str) -> str:
        return self.value.strftime(spec) if spec else self.value.isoformat()
