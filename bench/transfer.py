"""Upload and download throughput: clipexport's S3 store vs boto3's plain transfers.

    python bench/transfer.py                       # SeaweedFS on 127.0.0.1, 64 and 512 MiB
    python bench/transfer.py --sizes 64 --repeat 7
    python bench/transfer.py --tls                 # the same over HTTPS (self-signed)
    python bench/transfer.py --storage r2://bucket/bench   # a real store (AWS_* / R2_ACCOUNT_ID env)

Both sides use the same boto3 client (same botocore settings: checksums
`when_required`, timeouts, retries, connection pool) against the same
server in the same run, so the ratio measures the transfer code only:

- plain: `client.upload_file` / `client.download_file` (s3transfer defaults:
  8 MiB parts, 10 threads; no resume, no checksum, no verification);
- ours:  `S3Storage.put_file` (resumable multipart, Content-MD5 on every
  part, upload id and parts recorded in a TransferState) and `get_file`
  (ranged GETs pinned by IfMatch, resumable `.part`, size and sha256
  verified, fsync, atomic rename), with a progress callback;
- ours without progress: the same with `progress=None`, to price tracking;
- a probe: our download with the stored sha256 hidden (nothing hashed), to
  tell the transfer machinery from the verification plain does not do.

Each repetition runs every variant once, the order alternating, with the
page cache flushed (untimed) around each run. Reported per size: median
throughput (size / wall time, MiB/s), the median of the per-repetition
ratios ours/plain (pairs run back to back, so a busy neighbour on a shared
machine hits both), and client CPU seconds per GiB (user + system, all
threads; the S3 server's CPU is not counted). Hashing the input for its
content key is its own phase, with its own progress; it is timed alone
and shown folded into the upload as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from boto3.s3.transfer import TransferConfig  # noqa: E402

from clipexport.storage import MemoryTransferState, hash_file, open_storage  # noqa: E402

MiB = 1 << 20
#: boto3's own transfer defaults, pinned to the classic (s3transfer) client:
#: the CRT one ignores endpoint_url.
CLASSIC = TransferConfig(preferred_transfer_client="classic")
VARIANTS = ("plain", "ours", "ours_noprog")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, cpu) seconds of `fn`, dirty pages flushed before and after, untimed,
    so one run's writeback never lands in the next one's time (plain
    download_file does not fsync; ours does, inside its own time)."""
    os.sync()
    cpu, started = cpu_seconds(), time.perf_counter()
    fn()
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    os.sync()
    return wall, cpu


def make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n


class Counter:
    """A progress callback keeping what a display would: the last value."""

    def __init__(self) -> None:
        self.calls = 0
        self.last = 0

    def __call__(self, done: int) -> None:
        if done < self.last:
            raise AssertionError(f"progress went back: {done} < {self.last}")
        self.calls += 1
        self.last = done


class Results:
    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}
        self.callbacks: dict[str, int] = {}

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.wall.setdefault(name, []).append(wall)
        self.cpu.setdefault(name, []).append(cpu)

    def rate(self, name: str, mib: int) -> float:
        return mib / statistics.median(self.wall[name])

    def ratio(self, ours: str, plain: str) -> float:
        """Median over repetitions of plain time / ours time (>1: ours faster)."""
        return statistics.median(p / o for p, o in zip(self.wall[plain], self.wall[ours]))

    def cpu_per_gib(self, name: str, mib: int) -> float:
        return statistics.median(self.cpu[name]) * 1024 / mib


def unverified_get(store, key: str, out: Path) -> None:
    """A probe, not a mode of the store: get_file with the stored sha256 hidden,
    so nothing is hashed; it prices the download machinery without verification."""
    real = store.stat
    store.stat = lambda k: dataclasses.replace(real(k), sha256=None)
    try:
        store.get_file(key, out)
    finally:
        del store.stat


def bench_size(store, client, workdir: Path, size_mib: int, repeat: int) -> Results:
    size = size_mib * MiB
    src = workdir / f"src-{size_mib}.bin"
    make_file(src, size)
    results = Results()
    hashing = Counter()
    sha = ""

    def do_hash() -> None:
        nonlocal sha
        sha = hash_file(src, hashing)

    results.add("hash", *timed(do_hash))
    results.callbacks["hash"] = hashing.calls
    sample = src.read_bytes()[: 64 * MiB]
    results.add("md5", *timed(lambda: hashlib.md5(sample).digest()))  # Content-MD5: what plain skips
    results.add("sha256", *timed(lambda: hashlib.sha256(sample).digest()))  # the download's verification
    keys = {v: f"{v}-{size_mib}.bin" for v in VARIANTS}
    outs = {v: workdir / f"out-{v}.bin" for v in (*VARIANTS, "ours_unverified")}
    for rep in range(repeat):
        order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
        up, down = Counter(), Counter()
        uploads = {
            "plain": lambda: client.upload_file(str(src), store.bucket, store.prefix + keys["plain"], Config=CLASSIC),
            "ours": lambda: store.put_file(keys["ours"], src, sha256=sha, progress=up, state=MemoryTransferState()),
            "ours_noprog": lambda: store.put_file(keys["ours_noprog"], src, sha256=sha, state=MemoryTransferState()),
        }
        downloads = {
            "plain": lambda: client.download_file(
                store.bucket, store.prefix + keys["plain"], str(outs["plain"]), Config=CLASSIC
            ),
            "ours": lambda: store.get_file(keys["ours"], outs["ours"], progress=down),
            "ours_noprog": lambda: store.get_file(keys["ours_noprog"], outs["ours_noprog"]),
            "ours_unverified": lambda: unverified_get(store, keys["ours_noprog"], outs["ours_unverified"]),
        }
        for variant in order:
            store.delete_prefix(keys[variant])  # ours would skip an object already stored
            results.add(f"up_{variant}", *timed(uploads[variant]))
        for variant in (*order, "ours_unverified") if rep % 2 == 0 else ("ours_unverified", *order):
            results.add(f"down_{variant}", *timed(downloads[variant]))
        for variant in outs:
            if outs[variant].stat().st_size != size:
                raise AssertionError(f"{variant}: downloaded {outs[variant].stat().st_size} bytes, not {size}")
            outs[variant].unlink()
        if up.last != size or down.last != size:
            raise AssertionError("progress did not end at the size")
        results.callbacks["up"], results.callbacks["down"] = up.calls, down.calls
    for variant in VARIANTS:
        store.delete_prefix(keys[variant])
    src.unlink()
    return results


def report(mib: int, r: Results) -> list[str]:
    hash_s = statistics.median(r.wall["hash"])
    up_with_hash = mib / (statistics.median(r.wall["up_ours"]) + hash_s)
    lines = []
    for op, name in (("up", "upload"), ("down", "download")):
        lines.append(
            f"{mib:>5} MiB  {name:<8}  plain {r.rate(f'{op}_plain', mib):7.1f} MiB/s"
            f"   ours {r.rate(f'{op}_ours', mib):7.1f} MiB/s"
            f"   ratio {r.ratio(f'{op}_ours', f'{op}_plain'):.3f}x"
            f"   cpu/GiB plain {r.cpu_per_gib(f'{op}_plain', mib):.2f} s, ours {r.cpu_per_gib(f'{op}_ours', mib):.2f} s"
        )
    lines.append(
        f"{'':>5}      progress tracking: upload {r.ratio('up_ours', 'up_ours_noprog'):.3f}x,"
        f" download {r.ratio('down_ours', 'down_ours_noprog'):.3f}x of the same without a callback"
        f" ({r.callbacks['up']} and {r.callbacks['down']} callbacks)"
    )
    lines.append(
        f"{'':>5}      download without the sha256 check (a probe): ratio"
        f" {r.ratio('down_ours_unverified', 'down_plain'):.3f}x plain,"
        f" cpu/GiB {r.cpu_per_gib('down_ours_unverified', mib):.2f} s"
    )
    md5_mib = min(mib, 64) / statistics.median(r.wall["md5"])
    sha_mib = min(mib, 64) / statistics.median(r.wall["sha256"])
    lines.append(
        f"{'':>5}      integrity work plain skips, CPU per GiB on this machine: Content-MD5 {1024 / md5_mib:.2f} s"
        f" (upload), sha256 {1024 / sha_mib:.2f} s (download)"
    )
    lines.append(
        f"{'':>5}      sha256 for the content key {r.rate('hash', mib):7.1f} MiB/s ({r.callbacks['hash']} callbacks);"
        f" upload incl. hashing {up_with_hash:7.1f} MiB/s = {up_with_hash / r.rate('up_plain', mib):.3f}x plain"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,512", help="file sizes in MiB, comma-separated")
    parser.add_argument("--repeat", type=int, default=0, help="repetitions per size (default: 9 up to 64 MiB, else 3)")
    parser.add_argument("--storage", help="benchmark a real s3:// or r2:// store instead of a local SeaweedFS")
    parser.add_argument("--endpoint-url")
    parser.add_argument("--tls", action="store_true", help="local SeaweedFS over HTTPS (self-signed)")
    parser.add_argument("--workdir", type=Path, help="where the test files go (default: a temp dir)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]

    server = None
    if args.storage:
        store = open_storage(args.storage, endpoint_url=args.endpoint_url)
    else:
        from tests.s3server import SeaweedServer

        server = SeaweedServer(tls=args.tls).start()
        store = server.storage("bench")
    import boto3

    print(f"clipexport transfer benchmark: {store.url} at {store.settings.endpoint_label}")
    print(
        f"python {sys.version.split()[0]}, boto3 {boto3.__version__}, {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.2f}; ours: {store.part_size // MiB} MiB parts, {store.max_concurrency} threads;"
        f" plain: s3transfer defaults"
    )
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            for mib in sizes:
                repeat = args.repeat or (9 if mib <= 64 else 3)
                results = bench_size(store, store.client, Path(tmp), mib, repeat)
                print(f"{'':>5}      ({repeat} repetitions)")
                for line in report(mib, results):
                    print(line, flush=True)
    finally:
        if server is not None:
            server.close()
    print(f"total {time.monotonic() - started:.0f} s, load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
