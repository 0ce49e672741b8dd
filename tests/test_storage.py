"""Storage: the pieces (counting, progress, config, URLs) and the contract
every store keeps, run against the local directory, moto (in-process) and a
real SeaweedFS server."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipexport.errors import StorageError, StorageNotFoundError, UsageError
from clipexport.storage import (
    CountingReader,
    HighWater,
    JsonFileTransferState,
    LocalStorage,
    MemoryTransferState,
    ProgressChannel,
    Reporter,
    content_key,
    hash_file,
    open_storage,
)
from clipexport.storage.base import check_key
from clipexport.storage.download import sidecar
from clipexport.storage.config import R2_REGION, S3Settings, resolve
from tests.s3server import seaweed  # noqa: F401 - fixture

MiB = 1 << 20


def data(n: int, seed: int = 0) -> bytes:
    """Deterministic incompressible-enough bytes, cheaper than os.urandom for tests."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- counting and progress ---------------------------------------------------


def test_counting_reader_reports_positions_and_rewinds():
    seen = []
    reader = CountingReader(io.BytesIO(b"abcdefgh"), seen.append)
    assert reader.read(3) == b"abc"
    assert reader.read(10) == b"defgh"
    assert reader.read(10) == b""
    reader.seek(0)
    assert reader.tell() == 0
    assert reader.read(2) == b"ab"
    assert seen == [3, 8, 2]
    assert len(reader) == 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 100)), max_size=60))
def test_high_water_total_never_decreases(moves):
    water = HighWater(4, base=7)
    slots = [water.slot(i) for i in range(4)]
    best = [0] * 4
    last = water.total
    for slot, position in moves:
        slots[slot](position)  # positions go back when a request is retried
        best[slot] = max(best[slot], position)
        assert water.total >= last
        last = water.total
    assert water.total == 7 + sum(best)


def test_reporter_throttles_keeps_max_and_flushes():
    clock, got = Clock(), []
    report = Reporter(got.append, interval=0.1, clock=clock)
    report(10)
    report(20)  # same instant: held back
    clock.now = 0.2
    report(8)  # lower than sent: never sent
    report(30)
    report.flush(30)  # already sent
    report.flush(40)
    assert got == [10, 30, 40]


def test_hash_file_reports_its_own_progress(tmp_path):
    content = data(3 * MiB + 5)
    got = []
    digest = hash_file(write(tmp_path / "f", content), got.append)
    assert digest == hashlib.sha256(content).hexdigest()
    assert got[-1] == len(content) and got == sorted(got)


def test_hash_file_missing_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError, match="cannot read"):
        hash_file(tmp_path / "nope")


@pytest.mark.parametrize(
    "key, ok",
    [("a", True), ("a/b.mp4", True), ("", False), ("/a", False), ("a//b", False), ("a/../b", False),
     ("./a", False), ("a\\b", False), ("a/", False)],
)
def test_check_key(key, ok):
    if ok:
        assert check_key(key) == key
    else:
        with pytest.raises(UsageError):
            check_key(key)


def test_content_key():
    sha = "ab" * 32
    assert content_key(sha, ".mp4") == f"inputs/{sha}.mp4"
    with pytest.raises(ValueError):
        content_key("xyz")


def test_json_file_transfer_state_survives_a_new_process(tmp_path):
    state = JsonFileTransferState(tmp_path / "state.json")
    state.save("k", {"upload_id": "u", "parts": {"1": "e"}})
    again = JsonFileTransferState(tmp_path / "state.json")
    assert again.load("k") == {"upload_id": "u", "parts": {"1": "e"}}
    assert again.keys() == ["k"]
    again.clear("k")
    assert JsonFileTransferState(tmp_path / "state.json").load("k") is None


# -- configuration and URLs --------------------------------------------------


@pytest.mark.parametrize(
    "scheme, flag, env, endpoint, region",
    [
        ("s3", None, {}, None, None),
        ("s3", None, {"AWS_REGION": "eu-west-1"}, None, "eu-west-1"),
        ("s3", "http://127.0.0.1:9000", {"CLIPEXPORT_S3_ENDPOINT": "http://other:1"}, "http://127.0.0.1:9000", "us-east-1"),
        ("s3", None, {"CLIPEXPORT_S3_ENDPOINT": "https://minio.lan/"}, "https://minio.lan", "us-east-1"),
        ("r2", None, {"R2_ACCOUNT_ID": "0123abcd"}, "https://0123abcd.r2.cloudflarestorage.com", R2_REGION),
        ("r2", None, {"R2_ACCOUNT_ID": "acc", "AWS_REGION": "us-west-2"}, "https://acc.r2.cloudflarestorage.com", R2_REGION),
        ("r2", "http://127.0.0.1:8333", {"R2_ACCOUNT_ID": "acc"}, "http://127.0.0.1:8333", "us-east-1"),
    ],
)
def test_resolve_endpoint_and_region(scheme, flag, env, endpoint, region):
    settings_ = resolve(scheme, endpoint_url=flag, env=env)
    assert (settings_.endpoint_url, settings_.region) == (endpoint, region)


@pytest.mark.parametrize(
    "scheme, flag, env, match",
    [
        ("r2", None, {}, "R2_ACCOUNT_ID"),
        ("r2", None, {"R2_ACCOUNT_ID": "not/an id"}, "account id"),
        ("s3", "ftp://host", {}, "http"),
        ("s3", "https://AKIA:topsecret@host", {}, "credentials"),
        ("s3", "https://host?x=1", {}, "query"),
    ],
)
def test_resolve_rejects(scheme, flag, env, match):
    with pytest.raises(UsageError, match=match) as caught:
        resolve(scheme, endpoint_url=flag, env=env)
    assert "topsecret" not in str(caught.value)


def test_botocore_config_is_r2_compatible():
    config = S3Settings(endpoint_url="http://x", connect_timeout=2, max_attempts=3).botocore_config()
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.retries == {"max_attempts": 3, "mode": "standard"}
    assert config.connect_timeout == 2
    assert config.s3["addressing_style"] == "path"


def test_open_storage_default_is_the_user_data_dir(clipexport_home):
    store = open_storage(None)
    assert isinstance(store, LocalStorage)
    assert store.root == clipexport_home / "data" / "store"
    assert open_storage(None, root=Path("/tmp/x")).root == Path("/tmp/x")


def test_open_storage_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.delenv("CLIPEXPORT_S3_ENDPOINT", raising=False)
    assert open_storage(f"file://{tmp_path}/s").root == tmp_path / "s"
    s3 = open_storage("s3://my-bucket/some/prefix/", endpoint_url="http://127.0.0.1:1", max_attempts=1)
    assert (s3.url, s3.bucket, s3.prefix) == ("s3://my-bucket/some/prefix", "my-bucket", "some/prefix/")
    assert s3.settings.max_attempts == 1
    monkeypatch.setenv("R2_ACCOUNT_ID", "abc123")
    r2 = open_storage("r2://clips")
    assert r2.settings.endpoint_url == "https://abc123.r2.cloudflarestorage.com"
    assert r2.settings.region == "auto"
    assert r2.url == "r2://clips"


@pytest.mark.parametrize(
    "url", ["bucket/prefix", "gs://b/p", "s3://", "s3://B_ad/p", "s3://key:secret@bucket/p", "file://host/x",
            "s3://bucket/a/../b", "s3://bucket:99/p"],
)
def test_open_storage_rejects(url):
    with pytest.raises(UsageError) as caught:
        open_storage(url, endpoint_url="http://127.0.0.1:1")
    assert "secret" not in str(caught.value)


# -- the contract, on every store --------------------------------------------


@pytest.fixture
def moto_store():
    import moto  # in the test extra
    import boto3

    from clipexport.storage.s3 import S3Storage

    with moto.mock_aws():
        session = boto3.session.Session(aws_access_key_id="a", aws_secret_access_key="b", region_name="us-east-1")
        session.client("s3").create_bucket(Bucket="unit")
        yield S3Storage(
            "unit", "pre/fix", settings=S3Settings(region="us-east-1"), session=session,
            part_size=5 * MiB, multipart_threshold=5 * MiB,
        )


@pytest.fixture(params=["local", "moto", "seaweed"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    if request.param == "moto":
        return request.getfixturevalue("moto_store")
    server = request.getfixturevalue("seaweed")
    return server.storage(part_size=5 * MiB, multipart_threshold=5 * MiB)


@pytest.mark.parametrize("size", [0, 1000, 11 * MiB + 3])
def test_put_then_get_round_trip(store, tmp_path, size):
    content = data(size, seed=size)
    src = write(tmp_path / "src.bin", content)
    ups: list[int] = []
    sha = hash_file(src)
    info = store.put_file(content_key(sha, ".bin"), src, progress=ups.append, sha256=sha)
    assert (info.size, info.sha256) == (size, sha)
    assert ups == sorted(ups) and ups[-1] == size
    stat = store.stat(info.key)
    assert (stat.size, stat.sha256) == (size, sha)
    downs: list[int] = []
    out = tmp_path / "out" / "got.bin"
    got = store.get_file(info.key, out, progress=downs.append, sha256=sha)
    assert got.size == size
    assert out.read_bytes() == content
    assert downs == sorted(downs) and downs[-1] == size
    assert not any(p.exists() for p in sidecar(out))


def test_put_skips_what_is_stored(store, tmp_path):
    src = write(tmp_path / "src.bin", data(2000))
    store.put_file("a/x.bin", src)
    again: list[int] = []
    before = store.stat("a/x.bin")
    info = store.put_file("a/x.bin", src, progress=again.append)
    assert again == [2000]
    assert info.etag == before.etag


def test_put_replaces_different_content(store, tmp_path):
    store.put_file("k.bin", write(tmp_path / "a", b"old content"))
    store.put_file("k.bin", write(tmp_path / "b", b"new"))
    assert store.get_bytes("k.bin") == b"new"
    assert store.stat("k.bin").sha256 == hashlib.sha256(b"new").hexdigest()


def test_small_objects_stat_list_delete(store):
    store.check()
    assert store.stat("nothing/here") is None
    assert store.get_bytes("nothing/here") is None
    for key in ("jobs/j1/progress/seg-2.json", "jobs/j1/progress/seg-1.json", "jobs/j2/x", "jobsx"):
        store.put_bytes(key, key.encode())
    assert store.get_bytes("jobs/j2/x") == b"jobs/j2/x"
    assert store.stat("jobs/j2/x").sha256 == hashlib.sha256(b"jobs/j2/x").hexdigest()
    assert [i.key for i in store.list("jobs/j1/")] == ["jobs/j1/progress/seg-1.json", "jobs/j1/progress/seg-2.json"]
    assert [i.key for i in store.list("jobs")] == [
        "jobs/j1/progress/seg-1.json", "jobs/j1/progress/seg-2.json", "jobs/j2/x", "jobsx"
    ]
    assert [i.size for i in store.list("jobs/j2/")] == [9]
    assert store.delete_prefix("jobs/j1/") == 2
    assert [i.key for i in store.list("")] == ["jobs/j2/x", "jobsx"]
    with pytest.raises(UsageError):
        store.delete_prefix("")


def test_get_missing_object(store, tmp_path):
    with pytest.raises(StorageNotFoundError):
        store.get_file("no/such.bin", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_get_with_wrong_hash_leaves_nothing(store, tmp_path):
    store.put_bytes("k", b"content")
    out = tmp_path / "out.bin"
    with pytest.raises(StorageError, match="sha256"):
        store.get_file("k", out, sha256="0" * 64)
    assert not out.exists() and not any(p.exists() for p in sidecar(out))


class Stop(BaseException):
    """Kills a transfer from inside its progress callback, like a SIGKILL would."""


@pytest.fixture
def unthrottled(monkeypatch):
    """Progress on every chunk, so a callback can stop a transfer mid-way."""
    monkeypatch.setattr("clipexport.storage.base.PROGRESS_INTERVAL_S", 0.0)


def noted_bytes(out: Path) -> int:
    """Bytes a killed download's note says it kept (whole chunks and parts of chunks)."""
    note = json.loads(sidecar(out)[1].read_text())
    whole = sum(min(note["chunk"], note["size"] - i * note["chunk"]) for i in note["done"])
    return whole + sum(note["have"].values())


def _interrupted_download(store, key, out, after):
    def progress(done):
        if done >= after:
            raise Stop()

    sequential = getattr(store, "max_concurrency", None)
    if sequential is not None:
        store.max_concurrency = 1  # so the callback runs between a chunk's reads
    try:
        with pytest.raises(Stop):
            store.get_file(key, out, progress=progress)
    finally:
        if sequential is not None:
            store.max_concurrency = sequential


def test_download_resumes_from_the_partial(store, tmp_path, unthrottled):
    content = data(6 * MiB + 17, seed=3)
    store.put_file("big.bin", write(tmp_path / "src", content))
    out = tmp_path / "out.bin"
    _interrupted_download(store, "big.bin", out, after=1)
    have = noted_bytes(out)
    assert 0 < have < len(content) and not out.exists()
    assert json.loads(sidecar(out)[1].read_text())["size"] == len(content)
    progress: list[int] = []
    store.get_file("big.bin", out, progress=progress.append)
    assert out.read_bytes() == content
    assert progress[0] == have  # resumed, not restarted
    assert progress == sorted(progress)


def test_download_restarts_when_the_object_changed(store, tmp_path, unthrottled):
    store.put_file("obj.bin", write(tmp_path / "v1", data(3 * MiB, seed=1)))
    out = tmp_path / "out.bin"
    _interrupted_download(store, "obj.bin", out, after=1)
    changed = data(3 * MiB, seed=2)
    store.put_file("obj.bin", write(tmp_path / "v2", changed))
    progress: list[int] = []
    info = store.get_file("obj.bin", out, progress=progress.append)
    assert out.read_bytes() == changed
    assert info.sha256 == hashlib.sha256(changed).hexdigest()
    assert progress == sorted(progress)


def test_download_refuses_a_changed_object_with_a_pinned_hash(store, tmp_path, unthrottled):
    v1 = data(3 * MiB, seed=1)
    store.put_file("obj.bin", write(tmp_path / "v1", v1))
    out = tmp_path / "out.bin"
    _interrupted_download(store, "obj.bin", out, after=1)
    store.put_file("obj.bin", write(tmp_path / "v2", data(3 * MiB, seed=2)))
    with pytest.raises(StorageError, match="sha256"):
        store.get_file("obj.bin", out, sha256=hashlib.sha256(v1).hexdigest())
    assert not out.exists()


def test_channel_follows_cumulative_snapshots(store):
    clock = Clock()
    worker = ProgressChannel(store, "jobs/cx-1/progress", clock=clock)
    client = ProgressChannel(store, "jobs/cx-1/progress/")
    assert client.poll() == []
    assert worker.publish("seg-0001", {"phase": "upscale", "part": "seg-0001", "done": 10, "total": 240})
    assert not worker.publish("seg-0001", {"phase": "upscale", "part": "seg-0001", "done": 20, "total": 240})
    worker.publish("seg-0002", {"phase": "upscale", "part": "seg-0002", "done": 5, "total": 240})
    assert sorted(s["done"] for s in client.poll()) == [5, 10]
    assert client.poll() == []  # nothing changed
    clock.now = 1.5
    worker.publish("seg-0001", {"phase": "upscale", "part": "seg-0001", "done": 30, "total": 240})
    worker.publish("seg-0002", {"phase": "upscale", "part": "seg-0002", "done": 240, "total": 240}, force=True)
    assert sorted(s["done"] for s in client.poll()) == [30, 240]
    worker.publish("seg-0001", {"phase": "upscale", "part": "seg-0001", "done": 40, "total": 240})  # held
    worker.flush()
    assert [s["done"] for s in client.poll()] == [40]
    late = ProgressChannel(store, "jobs/cx-1/progress/")  # a resumed client sees the latest at once
    assert sorted(s["done"] for s in late.poll()) == [40, 240]
    with pytest.raises(ValueError):
        worker.publish("../evil", {})
    assert client.clear() == 2


def test_local_put_resumes_its_partial(tmp_path, unthrottled):
    """A killed local copy leaves a partial in incoming/; the rerun appends to it."""
    store = LocalStorage(tmp_path / "store")
    content = data(5 * MiB + 1, seed=9)
    src = write(tmp_path / "src", content)
    state = MemoryTransferState()

    def stop(done):
        if 0 < done < len(content):
            raise Stop()

    with pytest.raises(Stop):
        store.put_file("v.bin", src, progress=stop, state=state)
    assert store.stat("v.bin") is None
    assert len(state.keys()) == 1
    progress: list[int] = []
    store.put_file("v.bin", src, progress=progress.append, state=state)
    assert progress[0] >= 1 * MiB  # started from the partial
    assert store.get_bytes("v.bin") == content
    assert state.keys() == []


def test_local_abort_drops_partials(tmp_path, unthrottled):
    store = LocalStorage(tmp_path / "store")
    state = MemoryTransferState()

    def stop(done):
        raise Stop()

    with pytest.raises(Stop):
        store.put_file("v.bin", write(tmp_path / "src", data(3 * MiB)), progress=stop, state=state)
    assert list((store.root / ".clipexport" / "incoming").glob("*.part"))
    store.abort_uploads(state)
    assert not list((store.root / ".clipexport" / "incoming").glob("*.part"))
    assert state.keys() == []


def test_local_store_hides_its_own_files_and_refuses_its_namespace(tmp_path):
    store = LocalStorage(tmp_path / "store")
    store.put_bytes("a", b"1")
    assert [i.key for i in store.list("")] == ["a"]
    with pytest.raises(UsageError):
        store.put_bytes(".clipexport/meta/x", b"")


def test_local_stat_without_metadata_has_no_hash(tmp_path):
    store = LocalStorage(tmp_path / "store")
    (tmp_path / "store" / "seg").mkdir(parents=True)
    (tmp_path / "store" / "seg" / "x.mp4").write_bytes(b"made by hand")
    info = store.stat("seg/x.mp4")
    assert (info.size, info.sha256) == (12, None) and info.etag
    os.utime(tmp_path / "store" / "seg" / "x.mp4", ns=(1, 1))
    assert store.stat("seg/x.mp4").etag != info.etag


def test_local_concurrent_writers_of_one_object(tmp_path):
    """Parallel workers storing the same content: one copy, no spurious error."""
    import threading

    store = LocalStorage(tmp_path / "store")
    content = data(4 * MiB, seed=21)
    src = write(tmp_path / "src", content)
    errors: list[BaseException] = []

    def put() -> None:
        try:
            store.put_file("seg/x.mp4", src)
        except BaseException as exc:  # noqa: BLE001 - collected for the assert
            errors.append(exc)

    threads = [threading.Thread(target=put) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert store.get_bytes("seg/x.mp4") == content
    assert not list((store.root / ".clipexport" / "incoming").iterdir())


def test_corrupt_partial_is_fetched_again(store, tmp_path, unthrottled):
    content = data(6 * MiB + 17, seed=22)
    store.put_file("c.bin", write(tmp_path / "src", content))
    out = tmp_path / "c.bin"
    _interrupted_download(store, "c.bin", out, after=1)
    assert noted_bytes(out) >= 16
    with open(sidecar(out)[0], "r+b") as f:
        f.write(b"rotten bytes....")  # inside what the note says was kept
    store.get_file("c.bin", out)
    assert out.read_bytes() == content


def test_uneven_parts_are_refused_before_complete(moto_store, tmp_path, monkeypatch):
    """R2 rejects uneven parts at complete (SeaweedFS and moto accept them): checked first."""
    from clipexport.storage import s3

    real = s3._Multipart._list_parts

    def one_part_off(self, upload_id):
        listed = real(self, upload_id)
        if listed and self.workers.cancel.is_set():  # after the sends: the check before complete
            etag, size = listed[1][0]
            listed[1] = [(etag, size - 1)]
        return listed

    monkeypatch.setattr(s3._Multipart, "_list_parts", one_part_off)
    with pytest.raises(StorageError, match="one part size"):
        moto_store.put_file("u.bin", write(tmp_path / "u", data(11 * MiB)))
    assert moto_store.stat("u.bin") is None
