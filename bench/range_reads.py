"""Bytes a Modal container fetches per segment: range reads against the whole-clip download they replace.

    python bench/range_reads.py                    # a 30 s 640x360 clip, 1 s keyframes, 48-frame segments
    python bench/range_reads.py --seconds 60 --segment-frames 96

A clip is uploaded to a local SeaweedFS behind a TCP proxy that counts the
bytes the server sends. Each segment is decoded as a container decodes it
(`remote.stored_input`, the production read-ahead), and the bytes served
for it are printed beside the clip's size, which is what every container
downloaded before (the baseline): the ratio is the part of the clip a
segment costs. Decoded frames are checked against the local file's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402

from clipexport.media import plan_clips, plan_segments, probe, read_frames  # noqa: E402
from clipexport.remote import stored_input  # noqa: E402
from clipexport.storage import content_key, hash_file  # noqa: E402
from tests.clips import make_clip  # noqa: E402
from tests.s3server import CountingProxy, SeaweedServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--segment-frames", type=int, default=48)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, SeaweedServer(Path(tmp) / "s3") as server:
        clip = make_clip(Path(tmp) / "clip.mp4", frames=24 * args.seconds, width=640, height=360, fps=24,
                         index_blocks=False, gop=24)
        size = clip.stat().st_size
        proxy = CountingProxy(server.s3_port)
        store = server.storage(proxy=proxy)
        key = content_key(hash_file(clip), ".mp4")
        store.put_file(key, clip)
        plan = plan_clips([probe(clip)], [None], [None])[0]
        proxy.take()
        print(f"clip: {size} bytes, {plan.frames} frames; baseline: every container downloads the whole clip")
        served = []
        for seg in plan_segments([plan.frames], args.segment_frames):
            source = stored_input(store, key, Path(tmp) / "cache")
            stored = dataclasses.replace(plan, info=dataclasses.replace(plan.info, path=source))
            got = list(read_frames(stored, seg.start, seg.count))
            served.append(proxy.take())
            want = list(read_frames(plan, seg.start, seg.count))
            assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), seg.name
            print(f"{seg.name}: {served[-1]:>9} bytes served, {served[-1] / size:6.1%} of the whole-clip download")
        print(f"all {len(served)} segments: {sum(served)} bytes, {sum(served) / (size * len(served)):.1%} of "
              f"{len(served)} whole-clip downloads ({size * len(served)} bytes)")
        proxy.close()


if __name__ == "__main__":
    main()
