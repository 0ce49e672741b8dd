"""The S3 store against a real server (SeaweedFS, signatures checked): resumable
multipart uploads, resumed and pinned downloads, outages, bad credentials,
missing buckets, unreachable endpoints, and TLS."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import botocore.exceptions
import pytest

from clipexport.errors import (
    PreconditionFailedError,
    StorageAuthError,
    StorageError,
    StorageNotFoundError,
    StorageUnreachableError,
)
from clipexport.storage import JsonFileTransferState, MemoryTransferState, hash_file
from clipexport.storage.download import sidecar
from clipexport.storage.config import S3Settings
from clipexport.storage.s3 import S3Storage
from tests.s3server import SECRET_KEY, SeaweedServer, seaweed, seaweed_tls  # noqa: F401 - fixtures
from tests.test_storage import Stop, data, noted_bytes, unthrottled, write  # noqa: F401 - fixture

MiB = 1 << 20
PART = 5 * MiB
REPO = Path(__file__).resolve().parents[1]


def store_on(server: SeaweedServer, **options):
    options.setdefault("part_size", PART)
    options.setdefault("multipart_threshold", PART)
    return server.storage(**options)


class Calls:
    """Counts the part numbers a client sends (botocore's own event hooks)."""

    def __init__(self, store, *, stop_after: int | None = None, delay: float = 0.0) -> None:
        self.sent: list[int] = []
        self.ranges: list[str] = []
        self.stop_after = stop_after
        self.delay = delay
        events = store.client.meta.events
        events.register("before-send.s3.UploadPart", self._before_part)
        events.register("before-call.s3.UploadPart", self._note_part)
        events.register("after-call.s3.UploadPart", self._after_part)
        events.register("before-send.s3.GetObject", self._before_get)

    def _before_part(self, request, **_):
        if self.delay:
            time.sleep(self.delay)

    def _note_part(self, params, context, **_):
        context["clipexport_part"] = int(params["query_string"]["partNumber"])

    def _after_part(self, context, **_):
        self.sent.append(context["clipexport_part"])
        if self.stop_after is not None and len(self.sent) >= self.stop_after:
            raise Stop()  # the part is on the server; the client dies before recording it

    def _before_get(self, request, **_):
        value = request.headers.get("Range") or ""
        self.ranges.append(value.decode() if isinstance(value, bytes) else value)


def upload_id(state, store, key) -> str:
    return state.load(f"{store.url}/{key}")["upload_id"]


# -- multipart uploads ---------------------------------------------------------


def test_killed_multipart_upload_resumes_with_only_the_missing_parts(seaweed, tmp_path):
    content = data(16 * MiB, seed=11)  # parts 1-3 of 5 MiB, part 4 of 1 MiB
    src = write(tmp_path / "clip.mp4", content)
    sha = hash_file(src)
    state = MemoryTransferState()
    first = store_on(seaweed, max_concurrency=1)
    calls = Calls(first, stop_after=2)
    with pytest.raises(Stop):
        first.put_file("inputs/clip.mp4", src, state=state, sha256=sha)
    assert calls.sent == [1, 2]
    record = state.load(f"{first.url}/inputs/clip.mp4")
    assert record["part_size"] == PART and record["upload_id"]
    assert first.stat("inputs/clip.mp4") is None

    again = store_on(seaweed, prefix=first.prefix.rstrip("/"))
    resumed = Calls(again)
    progress: list[int] = []
    info = again.put_file("inputs/clip.mp4", src, state=state, sha256=sha, progress=progress.append)
    assert sorted(resumed.sent) == [3, 4]  # part 2 reached the server unrecorded: checked by MD5, not re-sent
    assert progress[0] == 2 * PART and progress[-1] == len(content)
    assert progress == sorted(progress)
    assert (info.size, info.sha256) == (len(content), sha)
    assert state.keys() == []
    out = tmp_path / "back.mp4"
    again.get_file("inputs/clip.mp4", out, sha256=sha)
    assert out.read_bytes() == content


KILL_SCRIPT = r"""
import json, sys, time
from tests.s3server import SeaweedServer
from clipexport.storage import JsonFileTransferState
args = json.loads(sys.argv[1])
server = SeaweedServer(args["dir"], base_port=args["base"])
store = server.storage(args["prefix"], part_size=args["part"], multipart_threshold=args["part"], max_concurrency=1)
store.client.meta.events.register("before-send.s3.UploadPart", lambda **_: time.sleep(0.4))
store.put_file("inputs/big.bin", args["src"], state=JsonFileTransferState(args["state"]))
print("finished")
"""


def test_sigkilled_upload_process_resumes_with_only_the_missing_parts(seaweed, tmp_path):
    content = data(20 * MiB, seed=12)
    src = write(tmp_path / "big.bin", content)
    state_file = tmp_path / "state.json"
    prefix = f"kill-{os.getpid()}"
    args = {"dir": str(tmp_path / "unused"), "base": seaweed.base, "prefix": prefix, "part": PART,
            "src": str(src), "state": str(state_file)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, json.dumps(args)], cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                records = json.loads(state_file.read_text())
            except (OSError, ValueError):
                records = {}
            if any(len(r.get("parts", {})) >= 2 for r in records.values()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    state = JsonFileTransferState(state_file)
    store = store_on(seaweed, prefix=prefix)
    uid = upload_id(state, store, "inputs/big.bin")
    on_server = {p["PartNumber"] for p in seaweed.client().list_parts(
        Bucket=seaweed.bucket, Key=f"{prefix}/inputs/big.bin", UploadId=uid).get("Parts", [])}
    assert 2 <= len(on_server) < 4
    calls = Calls(store)
    info = store.put_file("inputs/big.bin", src, state=state)
    assert sorted(calls.sent) == sorted({1, 2, 3, 4} - on_server)
    assert info.sha256 == hashlib.sha256(content).hexdigest()


def test_retried_part_never_moves_progress_back(seaweed, tmp_path, unthrottled):
    content = data(12 * MiB, seed=13)
    src = write(tmp_path / "f.bin", content)
    store = store_on(seaweed, max_concurrency=1)
    attempts: list[int] = []

    def flaky(request, **_):
        number = int(request.url.split("partNumber=")[1].split("&")[0])
        attempts.append(number)
        if number == 2 and attempts.count(2) == 1:
            request.body.read(3 * MiB)  # bytes counted, then the connection drops
            raise botocore.exceptions.ConnectionClosedError(endpoint_url=request.url)

    store.client.meta.events.register("before-send.s3.UploadPart", flaky)
    progress: list[int] = []
    store.put_file("f.bin", src, progress=progress.append)
    assert attempts.count(2) == 2
    assert progress == sorted(progress) and progress[-1] == len(content)
    assert store.get_bytes("f.bin") == content


def test_a_part_of_the_wrong_size_is_sent_again(seaweed, tmp_path):
    """R2 rejects uneven parts at complete; SeaweedFS does not, so the store checks."""
    content = data(12 * MiB, seed=14)
    src = write(tmp_path / "f.bin", content)
    state = MemoryTransferState()
    store = store_on(seaweed, max_concurrency=1)
    Calls(store, stop_after=1)
    with pytest.raises(Stop):
        store.put_file("f.bin", src, state=state)
    uid = upload_id(state, store, "f.bin")
    seaweed.client().upload_part(  # another tool's part 2, 6 MiB instead of 5
        Bucket=seaweed.bucket, Key=f"{store.prefix}f.bin", UploadId=uid, PartNumber=2, Body=content[PART:PART + 6 * MiB]
    )
    again = store_on(seaweed, prefix=store.prefix.rstrip("/"))
    calls = Calls(again)
    again.put_file("f.bin", src, state=state)
    assert sorted(calls.sent) == [2, 3]
    assert again.get_bytes("f.bin") == content


def test_cancel_aborts_the_recorded_upload(seaweed, tmp_path):
    src = write(tmp_path / "f.bin", data(12 * MiB, seed=15))
    state = MemoryTransferState()
    store = store_on(seaweed, max_concurrency=1)
    Calls(store, stop_after=1)
    with pytest.raises(Stop):
        store.put_file("f.bin", src, state=state)
    client = seaweed.client()
    listed = client.list_multipart_uploads(Bucket=seaweed.bucket, Prefix=store.prefix).get("Uploads", [])
    assert len(listed) == 1
    store.abort_uploads(state)
    assert client.list_multipart_uploads(Bucket=seaweed.bucket, Prefix=store.prefix).get("Uploads", []) == []
    assert state.keys() == []
    store.abort_uploads(state)  # nothing left: no error


def test_upload_survives_a_server_restart(seaweed, tmp_path):
    content = data(20 * MiB, seed=16)
    src = write(tmp_path / "f.bin", content)
    store = store_on(seaweed, max_concurrency=2)
    restarted = threading.Event()
    restarter = threading.Thread(target=lambda: (seaweed.restart(downtime=0.5, hard=True), restarted.set()))

    once = threading.Lock()

    def after_first_part(**_):  # runs on several part threads at once
        if once.acquire(blocking=False):
            restarter.start()

    store.client.meta.events.register("after-call.s3.UploadPart", after_first_part)
    store.client.meta.events.register("before-send.s3.UploadPart", lambda **_: time.sleep(0.3))
    failures: list[str] = []

    def note_failure(caught_exception=None, **_):
        if caught_exception is not None:
            failures.append(type(caught_exception).__name__)

    store.client.meta.events.register("needs-retry.s3", note_failure)
    progress: list[int] = []
    info = store.put_file("f.bin", src, progress=progress.append, state=MemoryTransferState())
    restarter.join(60)
    assert restarted.is_set()
    assert failures  # some requests met the outage and were tried again
    assert info.sha256 == hashlib.sha256(content).hexdigest()
    assert progress == sorted(progress)
    assert store.get_bytes("f.bin") == content


# -- downloads -----------------------------------------------------------------


def test_killed_download_resumes_with_a_ranged_get(seaweed, tmp_path, unthrottled):
    content = data(14 * MiB + 5, seed=17)
    store = store_on(seaweed)
    store.put_file("seg.mp4", write(tmp_path / "src", content))
    out = tmp_path / "seg.mp4"

    def stop(done):
        if done >= 3 * MiB:
            raise Stop()

    with pytest.raises(Stop):  # one chunk at a time, killed inside the first
        store_on(seaweed, prefix=store.prefix.rstrip("/"), max_concurrency=1).get_file("seg.mp4", out, progress=stop)
    note = json.loads(sidecar(out)[1].read_text())
    assert note["chunk"] == PART and note["etag"]
    expected = set()
    for index in range(3):  # 5 + 5 + 4 MiB chunks, each resumed where it got to
        start, end = index * PART, min(len(content), (index + 1) * PART)
        if index not in note["done"] and note["have"].get(str(index), 0) < end - start:
            expected.add(f"bytes={start + note['have'].get(str(index), 0)}-{end - 1}")
    assert len(expected) == 3 and not any(r.startswith("bytes=0-") for r in expected)  # chunk 0 resumes mid-way
    kept = noted_bytes(out)
    calls = Calls(store)
    progress: list[int] = []
    store.get_file("seg.mp4", out, progress=progress.append)
    assert set(calls.ranges) == expected and len(calls.ranges) == len(expected)
    assert progress[0] == kept >= 3 * MiB  # resumed from what the note kept
    assert out.read_bytes() == content


def test_download_survives_a_server_restart(seaweed, tmp_path, unthrottled):
    content = data(24 * MiB, seed=18)
    store = store_on(seaweed)
    store.put_file("seg.mp4", write(tmp_path / "src", content))
    out = tmp_path / "seg.mp4"
    calls = Calls(store)
    restarted = []

    def progress(done):
        if done and not restarted:
            restarted.append(done)
            seaweed.restart(downtime=0.5, hard=True)  # the stream in flight dies with the server

    store.get_file("seg.mp4", out, progress=progress)
    assert restarted
    assert len(calls.ranges) > 3  # three chunks, and at least one resumed after the outage
    assert out.read_bytes() == content


def test_object_changed_between_head_and_get_is_a_412_then_a_fresh_start(seaweed, tmp_path, caplog):
    store = store_on(seaweed)
    store.put_file("obj", write(tmp_path / "v1", data(2 * MiB, seed=1)))
    stale = store.stat("obj")
    v2 = data(2 * MiB, seed=2)
    store.put_file("obj", write(tmp_path / "v2", v2))
    real_stat, stats = store.stat, []

    def stat_then_change(key):  # the first look sees v1, as if it changed right after
        stats.append(key)
        return stale if len(stats) == 1 else real_stat(key)

    store.stat = stat_then_change
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="clipexport.storage"):
        info = store.get_file("obj", out)
    assert "changed since its download began" in caplog.text
    assert out.read_bytes() == v2 and info.etag != stale.etag
    store.stat = real_stat

    def always_stale(key):
        return stale

    store.stat = always_stale
    with pytest.raises(PreconditionFailedError, match="412"):
        store.get_file("obj", tmp_path / "out2")


# -- failures with clear messages ---------------------------------------------


def _all_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def test_wrong_credentials_name_the_endpoint_never_the_secret(seaweed, tmp_path):
    import boto3

    wrong_secret = "WRONG-" + SECRET_KEY[::-1]
    store = S3Storage(
        seaweed.bucket, "p",
        settings=S3Settings(endpoint_url=seaweed.endpoint_url, region="us-east-1", max_attempts=1),
        session=boto3.session.Session(aws_access_key_id=seaweed.access_key, aws_secret_access_key=wrong_secret),
    )
    for attempt in (
        lambda: store.put_bytes("k", b"x"),
        lambda: store.stat("k"),
        lambda: store.list(""),
        lambda: store.put_file("big", write(tmp_path / "f", data(6 * MiB))),
        lambda: store.check(),
    ):
        with pytest.raises(StorageAuthError) as caught:
            attempt()
        message = str(caught.value)
        assert seaweed.endpoint_url in message
        assert wrong_secret not in _all_text(caught.value) and SECRET_KEY not in message
        assert not caught.value.resumable


def test_no_credentials_is_an_auth_error(seaweed, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3Storage(seaweed.bucket, settings=S3Settings(endpoint_url=seaweed.endpoint_url, region="us-east-1"))
    with pytest.raises(StorageAuthError, match="AWS_ACCESS_KEY_ID"):
        store.put_bytes("k", b"x")


def test_missing_bucket_is_named(seaweed, tmp_path):
    store = S3Storage(
        "clipexport-no-such-bucket",
        settings=S3Settings(endpoint_url=seaweed.endpoint_url, region="us-east-1"),
        session=seaweed.session(),
    )
    for attempt in (
        lambda: store.put_bytes("k", b"x"),
        lambda: store.list("x/"),
        lambda: store.check(),
        lambda: store.put_file("big", write(tmp_path / "f", data(6 * MiB))),
    ):
        with pytest.raises(StorageNotFoundError, match="clipexport-no-such-bucket") as caught:
            attempt()
        assert seaweed.endpoint_url in str(caught.value)
    with pytest.raises(StorageNotFoundError, match="clipexport-no-such-bucket"):
        store.get_file("k", tmp_path / "out")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_endpoint_fails_fast_and_clearly(seaweed):
    endpoint = f"http://127.0.0.1:{_free_port()}"
    store = S3Storage(
        "bucket", settings=S3Settings(endpoint_url=endpoint, region="us-east-1", connect_timeout=1, max_attempts=2),
        session=seaweed.session(),
    )
    started = time.monotonic()
    with pytest.raises(StorageUnreachableError, match=endpoint.replace(".", r"\.")) as caught:
        store.put_bytes("k", b"x")
    assert time.monotonic() - started < 10
    assert caught.value.resumable


def test_silent_endpoint_times_out_in_bounded_time(seaweed):
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        store = S3Storage(
            "bucket",
            settings=S3Settings(endpoint_url=endpoint, region="us-east-1", connect_timeout=1, read_timeout=1,
                                max_attempts=2),
            session=seaweed.session(),
        )
        started = time.monotonic()
        with pytest.raises(StorageUnreachableError, match="did not answer"):
            store.stat("k")
        assert time.monotonic() - started < 10


# -- TLS -------------------------------------------------------------------------


def test_tls_multipart_upload_resume_and_download(seaweed_tls, tmp_path):
    content = data(12 * MiB + 1, seed=19)
    src = write(tmp_path / "f.bin", content)
    state = MemoryTransferState()
    store = store_on(seaweed_tls, max_concurrency=1)
    Calls(store, stop_after=1)
    with pytest.raises(Stop):
        store.put_file("f.bin", src, state=state)
    again = store_on(seaweed_tls, prefix=store.prefix.rstrip("/"))
    calls = Calls(again)
    again.put_file("f.bin", src, state=state)
    assert sorted(calls.sent) == [2, 3]
    out = tmp_path / "out.bin"
    again.get_file("f.bin", out)
    assert out.read_bytes() == content


def test_tls_reads_what_a_default_boto3_wrote_with_aws_chunked(seaweed_tls, tmp_path):
    """boto3's defaults (checksums when_supported) stream aws-chunked bodies over TLS, as to R2."""
    content = data(7 * MiB, seed=20)
    client = seaweed_tls.client(request_checksum_calculation="when_supported")
    encodings = []
    client.meta.events.register(
        "before-send.s3.*", lambda request, **_: encodings.append(request.headers.get("Content-Encoding"))
    )
    store = store_on(seaweed_tls)
    client.put_object(Bucket=seaweed_tls.bucket, Key=f"{store.prefix}w.bin", Body=content)
    assert b"aws-chunked" in encodings
    out = tmp_path / "w.bin"
    info = store.get_file("w.bin", out)
    assert out.read_bytes() == content and info.sha256 is None


def test_tls_untrusted_certificate_is_a_clear_error(seaweed_tls):
    store = S3Storage(
        seaweed_tls.bucket,
        settings=S3Settings(endpoint_url=seaweed_tls.endpoint_url, region="us-east-1", max_attempts=1),
        session=seaweed_tls.session(),
    )
    with pytest.raises(StorageUnreachableError, match="TLS"):
        store.stat("k")


def test_put_bytes_and_list_over_tls(seaweed_tls):
    store = store_on(seaweed_tls)
    store.put_bytes("a/b", b"hello")
    assert [(i.key, i.size) for i in store.list("a/")] == [("a/b", 5)]
    assert store.delete_prefix("a/") == 1


def test_upload_refuses_a_stale_hash(seaweed, tmp_path):
    src = write(tmp_path / "f.bin", data(2 * MiB))
    store = store_on(seaweed)
    with pytest.raises(StorageError, match="sha256"):
        store.put_file("f.bin", src, sha256="0" * 64)  # the hash the caller computed is stale
    assert store.stat("f.bin") is None


def test_upload_refuses_a_file_that_changed_meanwhile(seaweed, tmp_path):
    src = write(tmp_path / "f.bin", data(12 * MiB))
    store = store_on(seaweed, max_concurrency=1)
    state = MemoryTransferState()

    def touch(**_):
        os.utime(src, ns=(1, 1))  # edited while its parts go out

    store.client.meta.events.register("after-call.s3.UploadPart", touch)
    with pytest.raises(StorageError, match="changed while being uploaded"):
        store.put_file("f.bin", src, state=state)
    assert store.stat("f.bin") is None
    assert state.keys() == []  # the upload was aborted and forgotten
    assert seaweed.client().list_multipart_uploads(Bucket=seaweed.bucket, Prefix=store.prefix).get("Uploads", []) == []
