"""A worker decodes its segment of a stored clip from byte ranges, not from a download of the whole clip.

Against the real S3 server of the suite, behind a TCP proxy that counts the
bytes the server sends: each segment's decode is served a fraction of the
clip, and its frames are the frames decoded from the file itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clipexport.errors import StorageNotFoundError
from clipexport.media import plan_clips, plan_segments, probe, read_frames
from clipexport.remote import stored_input
from clipexport.storage import content_key, hash_file
from clipexport.storage.reader import StoredClip
from clipexport.storage.s3 import S3Storage
from tests.clips import make_clip, read_index
from tests.s3server import CountingProxy, SeaweedServer, seaweed  # noqa: F401 - fixture


@pytest.fixture
def proxied(seaweed: SeaweedServer) -> Iterator[tuple[S3Storage, CountingProxy]]:  # noqa: F811
    proxy = CountingProxy(seaweed.s3_port)
    yield seaweed.storage(proxy=proxy), proxy
    proxy.close()


def on(plan, source):
    """`plan` with its clip read from `source` (a StoredClip) instead of its file."""
    return dataclasses.replace(plan, info=dataclasses.replace(plan.info, path=source))


def test_each_segment_is_decoded_from_a_fraction_of_the_clip(proxied, tmp_path):
    store, proxy = proxied
    clip = make_clip(tmp_path / "long.mp4", frames=240, width=128, height=72, index_blocks=False, gop=24,
                     audio=False)
    size = clip.stat().st_size
    key = content_key(hash_file(clip), ".mp4")
    store.put_file(key, clip)
    plan = plan_clips([probe(clip)], [None], [None])[0]
    source = StoredClip(store, key, size, block=8 << 10, max_block=32 << 10)  # read-ahead to the clip's scale
    proxy.take()
    served = []
    for seg in plan_segments([plan.frames], 24):
        got = list(read_frames(on(plan, source), seg.start, seg.count))
        served.append(proxy.take())
        want = list(read_frames(plan, seg.start, seg.count))
        assert len(got) == seg.count and all(np.array_equal(a, b) for a, b in zip(got, want)), seg
    assert len(served) == 10
    assert max(served) < size / 3, (served, size)  # each segment: its packets and the index, not the clip
    assert source.fetched <= sum(served)  # what the reader counted did cross the wire


def test_a_worker_reads_its_input_from_the_store_by_its_key(seaweed, tmp_path):  # noqa: F811
    store = seaweed.storage()
    clip = make_clip(tmp_path / "in.mp4", frames=48, gop=12)
    key = content_key(hash_file(clip), ".mp4")
    store.put_file(key, clip)
    plan = plan_clips([probe(clip)], [None], [None])[0]
    source = stored_input(store, key, tmp_path / "cache")
    assert isinstance(source, StoredClip)
    assert [read_index(f) for f in read_frames(on(plan, source), 30, 12)] == list(range(30, 42))
    assert not (tmp_path / "cache").exists()  # nothing downloaded
    with pytest.raises(StorageNotFoundError, match="not in the store"):
        stored_input(store, content_key("0" * 64, ".mp4"), tmp_path / "cache")


def test_a_raw_stream_is_downloaded_whole_once(seaweed, tmp_path):  # noqa: F811
    """No index, no timestamps: every segment is decoded from its start, so ranges would read it again and again."""
    store = seaweed.storage()
    clip = make_clip(tmp_path / "raw.h264", frames=36, fps=30, gop=6, audio=False)
    key = content_key(hash_file(clip), ".h264")
    store.put_file(key, clip)
    first = stored_input(store, key, tmp_path / "cache")
    assert isinstance(first, Path) and first.read_bytes() == clip.read_bytes()
    mtime = first.stat().st_mtime_ns  # a second fetch would put a new file there
    assert stored_input(store, key, tmp_path / "cache") == first and first.stat().st_mtime_ns == mtime
    plan = plan_clips([probe(clip)], [None], [None])[0]
    assert [read_index(f) for f in read_frames(on(plan, first), 24, 12)] == list(range(24, 36))
