"""Archive writes on S3 servers with and without conditional writes, request by request.

The real-bucket behaviour is in `test_archive_last_word.py`; here an in-memory S3 client
stands in for botocore's, so each case can count what was asked and answer 501 where a server
has no conditional writes. It stands in for S3, not for any of the project's code."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from flows import storage
from flows.paying.owned import KeyTaken, Owner, put_owned


class FakeS3:
    """put_object / head_object / get_object over a dict, counting calls; with
    `conditional=False` a conditional put answers 501, as servers without them do."""

    def __init__(self, conditional: bool = True) -> None:
        self.conditional = conditional
        self.objects: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []
        self.exceptions = type("E", (), {"NoSuchKey": KeyError})

    @staticmethod
    def _error(status: int, code: str) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "op")

    def put_object(self, *, Key: str, Body: bytes, IfMatch: str | None = None, IfNoneMatch: str | None = None,
                   Metadata: dict[str, str] | None = None, **_: Any) -> dict[str, str]:
        self.calls.append("put")
        if (IfMatch or IfNoneMatch) and not self.conditional:
            raise self._error(501, "NotImplemented")
        now = self.objects.get(Key)
        if (IfNoneMatch == "*" and now is not None) or (IfMatch and (now is None or now["ETag"] != IfMatch)):
            raise self._error(412, "PreconditionFailed")
        etag = f'"{len(self.calls)}"'
        self.objects[Key] = {"Body": Body, "ETag": etag, "Metadata": Metadata or {}}
        return {"ETag": etag}

    def head_object(self, *, Key: str, **_: Any) -> dict[str, Any]:
        self.calls.append("head")
        if Key not in self.objects:
            raise self._error(404, "404")
        return {"ETag": self.objects[Key]["ETag"], "Metadata": self.objects[Key]["Metadata"]}

    def get_object(self, *, Key: str, **_: Any) -> dict[str, Any]:
        self.calls.append("get")
        if Key not in self.objects:
            raise KeyError(Key)
        body = self.objects[Key]["Body"]
        return {"Body": type("B", (), {"read": lambda self: body})(), "ETag": self.objects[Key]["ETag"]}


class Bucket:
    def __init__(self, client: FakeS3, name: str) -> None:
        self.bucket_name = name
        self.credentials = type("C", (), {"get_s3_client": lambda self: client})()


@pytest.fixture(autouse=True)
def _fresh_servers(monkeypatch) -> None:
    monkeypatch.setattr(storage, "_unconditional", set())


MINE, OTHER = Owner("p", "a"), Owner("q", "a")


def test_a_new_key_is_one_request_and_an_own_object_is_looked_at_before_its_overwrite() -> None:
    s3 = FakeS3()
    bucket = Bucket(s3, "b1")
    put_owned(bucket, "k.png", b"one", MINE, content_type="image/png")
    assert s3.calls == ["put"]
    put_owned(bucket, "k.png", b"two", MINE, content_type="image/png")
    assert s3.calls == ["put", "put", "head", "put"] and s3.objects["k.png"]["Body"] == b"two"
    with pytest.raises(KeyTaken):
        put_owned(bucket, "k.png", b"three", OTHER, content_type="image/png")
    assert s3.objects["k.png"]["Body"] == b"two"


def test_without_conditional_writes_another_owners_object_is_still_never_overwritten() -> None:
    """The first try (no look) writes nothing on a 501 server: the owner is looked at first,
    for that write and every later one."""
    s3 = FakeS3(conditional=False)
    bucket = Bucket(s3, "b2")
    s3.objects["k.png"] = {"Body": b"theirs", "ETag": '"0"', "Metadata": OTHER.metadata()}
    with pytest.raises(KeyTaken):
        put_owned(bucket, "k.png", b"mine", MINE, content_type="image/png")
    assert s3.objects["k.png"]["Body"] == b"theirs"
    assert s3.calls == ["put", "head"]
    put_owned(bucket, "new.png", b"mine", MINE, content_type="image/png")
    # looked at first; then the conditional put (501) and the plain one
    assert s3.calls[2:] == ["head", "put", "put"] and s3.objects["new.png"]["Body"] == b"mine"


def test_an_archive_write_s3_does_not_answer_is_told_on_the_progress_line(monkeypatch) -> None:
    """A frozen S3 server: the image write waits (its read timeout and backoff, minutes in
    all); meanwhile the run's progress line says S3 has not answered an archive write, without
    the key, and stops saying it once the write is answered."""
    import threading
    import time

    from flows.paying import stalled
    from flows.running.progress import RunProgress

    monkeypatch.setattr(stalled, "STALL_SECONDS", 0.2)
    answered = threading.Event()

    class FrozenS3(FakeS3):
        def put_object(self, **kwargs: Any) -> dict[str, str]:
            answered.wait(10)
            return super().put_object(**kwargs)

    s3 = FrozenS3()
    progress = RunProgress("run p 2026-01-01", 1)
    write = threading.Thread(target=lambda: put_owned(Bucket(s3, "b3"), "p/2026-01-01/a-1.png", b"png", MINE,
                                                      content_type="image/png"))
    write.start()
    try:
        time.sleep(0.5)
        line = progress.line()
        assert "; S3 has not answered an archive write for " in line and "(is the S3 server up?)" in line, line
        assert "a-1.png" not in line, line
    finally:
        answered.set()
        write.join(10)
    assert s3.objects["p/2026-01-01/a-1.png"]["Body"] == b"png" and "S3" not in progress.line()
