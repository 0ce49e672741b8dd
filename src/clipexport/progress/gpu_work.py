"""The GPU work (upscale, encode, download) as a small simulation of its segments.

Each container takes the next segment when free (`containers.ready`), at
the job's time per frame (`rates.frame_time`: the prior for this GPU, model
and resolution, scaled by what this job shows); a container's first segment
carries its warm-up; encoding ends a flush after upscaling; finished
segments are downloaded one after another at the download rate.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from . import containers
from .moment import Moment, add_share
from .rates import FrameTime, download_rate, frame_time, grace_frames, grace_of, stream_end, warm_excess
from .segments import first_on_worker
from .state import PhaseState

START = ("queue", "load_model")


@dataclass
class Work:
    """What the simulation says: when the GPU work and downloads end, and what it saw on the way."""

    end: float
    known: bool  # anything estimated
    shares: dict[str, float] = field(default_factory=dict)  # remaining seconds by phase
    rates: dict[str, float] = field(default_factory=dict)  # observed rates (frames/s, bytes/s)
    out_bytes: float | None = None  # predicted size of the output, for finalize
    frames: FrameTime | None = None  # the time per frame used


def gpu_work(m: Moment, cursor: float, first: str | None = None) -> Work:
    """The GPU work from `cursor` (when the sequential phases before it end); `first` forces the first container's kind."""
    st, now = m.st, m.now
    up, enc, dl = st.phases.get("upscale"), st.phases.get("encode"), st.phases.get("download")
    start_cursor = max(cursor, now)
    if up is None:
        return _waits_only(m, start_cursor)
    if up.ended and (enc is None or enc.ended) and (dl is None or dl.ended):
        return Work(start_cursor, True)
    ft = frame_time(m, up, first_on_worker(up))
    work = Work(start_cursor, True, frames=ft)
    if ft.observed is not None:
        work.rates["upscale"] = ft.observed
    up_end, frames = _upscale_ends(m, up, ft, cursor, first, work.shares)
    enc_end, out_bytes = _encode_ends(m, enc, up_end)
    last_up = max([v for v in up_end.values()] + [now])
    if enc is not None and not enc.ended and enc_end:
        add_share(work.shares, "encode", max(0.0, max(enc_end.values()) - max(last_up, now)))
    end = max([now, last_up] + list(enc_end.values()))
    work.out_bytes = _output_bytes(m, up, enc, dl, frames, out_bytes)
    if dl is not None and not dl.ended:
        rate, obs = download_rate(m, dl)
        if obs is not None:
            work.rates["download"] = obs[0]
        free_t = _downloads_end(m, dl, rate, enc_end, out_bytes)
        if free_t > end:
            add_share(work.shares, "download", free_t - end)
            end = free_t
    work.end = end
    return work


def _waits_only(m: Moment, start: float) -> Work:
    """No counted GPU work: only waiting phases, if any."""
    work = Work(start, any(n in m.st.phases for n in START))
    for name in START:
        ph = m.st.phases.get(name)
        if ph is not None and not ph.ended:
            rem = containers.waiting_alone(m, ph)
            add_share(work.shares, name, rem)
            work.end += rem
    return work


def _segments_to_come(m: Moment, up: PhaseState) -> tuple[list[tuple[str, float]], int]:
    """Segments not started yet, as (name, frames), and the count of all segments."""
    total = up.known_total
    if total is None:
        frames = m.f.get("frames")
        total = float(frames) if isinstance(frames, (int, float)) else None
    nseg = m.f.get("segments")
    seg = m.f.get("segment_frames")
    if not isinstance(seg, (int, float)) or seg <= 0:
        if total and isinstance(nseg, (int, float)) and nseg >= 1:
            seg = math.ceil(total / nseg)
        else:
            seg = total or 1.0
    seg = float(seg)
    seen = sum((p.total if p.total is not None else seg) for p in up.parts.values())
    unseen = max(0.0, (total or 0.0) - seen) if up.parts else (total or 0.0)
    if not up.parts and up.done > 0:
        unseen = max(0.0, unseen - up.done)  # a phase counted as a whole
    pending = [(key, p.total if p.total is not None else seg)  # halted by a stop: they run again
               for key, p in up.parts.items() if p.start_t is None and p.end_t is None and p.lost_done > 0]
    i = len(up.parts)
    while unseen > 1e-9:
        n = min(seg, unseen)
        i += 1
        pending.append((f"seg-{i:04d}", n))
        unseen -= n
    return pending, i


def _warm_left(m: Moment, spf: float, done: float) -> float:
    """Warm-up seconds a container's first segment still has to pay, `done` frames in."""
    decay = m.model.constant("upscale", "warmup_frames")
    return warm_excess(m, spf) * math.exp(-done / max(decay, 1e-3))


def _running(m: Moment, up: PhaseState, spf: float, pending: list[tuple[str, float]]
             ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(predicted or actual upscale end of each segment seen, its frames, the busy workers' ends)."""
    now, overhead = m.now, m.model.constant("upscale", "overhead_s")
    grace = grace_frames(m, spf)
    firsts = first_on_worker(up)
    busy: dict[str, float] = {}
    up_end: dict[str, float] = {}
    frames: dict[str, float] = {}
    anon = 0
    local = "queue" not in m.st.phases  # one worker: whatever runs, runs there
    for key, p in up.parts.items():
        n = p.total if p.total is not None else (pending[0][1] if pending else 1.0)
        frames[key] = n
        if p.ended:
            up_end[key] = p.end_t  # type: ignore[assignment]
            continue
        if p.start_t is None:
            continue
        left = max(n - p.done, 0.0)
        warm = _warm_left(m, spf, p.done) if key in firsts else 0.0
        if p.last_t is not None:
            end = stream_end(m, left + warm / spf, 1.0 / spf, p.last_t, grace_of(p, grace))
        else:
            end = stream_end(m, left + warm / spf, 1.0 / spf, p.start_t + overhead, grace + overhead)
        up_end[key] = end
        worker = p.worker or ("#local" if local else f"#anon{anon}")
        anon += 1
        busy[worker] = max(busy.get(worker, now), end)
    return up_end, frames, busy


def _upscale_ends(m: Moment, up: PhaseState, ft: FrameTime, cursor: float, first: str | None,
                  shares: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(upscale end of every segment, its frames): running ones, then pending ones on the next free container."""
    now, spf = m.now, ft.spf
    start_cursor = max(cursor, now)
    between = _between_segments(m, up, spf)
    warm_full = warm_excess(m, spf)
    pending, nseg = _segments_to_come(m, up)
    up_end, frames, busy = _running(m, up, spf, pending)
    if up.ended:
        pending = []
    n_cont = containers.container_count(m, nseg)
    workers = {p.worker for p in up.parts.values() if p.worker} or ({"#local"} if up.parts else set())
    free, waits = containers.ready(m, cursor, n_cont, busy, workers, first)
    shares.update(waits)
    heap = free[: max(n_cont, len(busy))]
    heapq.heapify(heap)
    first_free = heap[0][0] if heap else start_cursor
    for name, n in pending:
        t, hot = heapq.heappop(heap) if heap else (start_cursor, True)
        t = max(t, now)
        end = t + between + n * spf + (0.0 if hot else warm_full)
        up_end[name] = end
        frames[name] = n
        heapq.heappush(heap, (end, True))
    last_up = max([v for v in up_end.values()] + [now])
    work_start = now if busy else max(min(first_free, last_up), now)
    if up_end and not up.ended:
        add_share(shares, "upscale", max(0.0, last_up - work_start))
    return up_end, frames


def _between_segments(m: Moment, up: PhaseState, spf: float) -> float:
    """Seconds a segment costs beyond its frames (the gap before it, its start-up and flush).

    The model's constants, moved by this job's own segments: each one that
    followed another on the same worker shows its cost, from the end of the
    one before to its own end, less its frames at `spf` (a local CPU job
    starts the next segment at once; a container pays a round trip).
    """
    prior = m.model.constant("upscale", "gap_s") + m.model.constant("upscale", "overhead_s")
    ends: dict[str | None, list[tuple[float, float, float]]] = {}
    for p in up.parts.values():
        if p.ended and p.start_t is not None and p.attempt <= 1 and p.done > 0 and not p.served:
            ends.setdefault(p.worker, []).append((p.start_t, p.end_t, p.done))  # type: ignore[arg-type]
    seen = []
    for runs in ends.values():
        runs.sort()
        seen += [max(0.0, b[1] - a[1] - b[2] * spf) for a, b in zip(runs, runs[1:]) if b[0] >= a[1] - 1e-6]
    return (sum(seen) + prior) / (len(seen) + 1)


def _encode_ends(m: Moment, enc: PhaseState | None, up_end: dict[str, float]
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """(encode end of every segment: a flush after its upscale, the encoded sizes known so far)."""
    now, flush = m.now, m.model.constant("encode", "flush_s")
    enc_end: dict[str, float] = {}
    out_bytes: dict[str, float] = {}
    for key, t_up in up_end.items():
        ep = enc.parts.get(key) if enc else None
        if ep is not None and ep.ended:
            enc_end[key] = ep.end_t  # type: ignore[assignment]
        else:
            enc_end[key] = max(t_up + flush, now + 0.05) if t_up <= now else t_up + flush
        if ep is not None and ep.out_bytes is not None:
            out_bytes[key] = ep.out_bytes
    return enc_end, out_bytes


def _output_bytes(m: Moment, up: PhaseState, enc: PhaseState | None, dl: PhaseState | None,
                  frames: dict[str, float], out_bytes: dict[str, float]) -> float:
    """The output's size: known per segment, else frames x bytes per frame. Fills `out_bytes` for every segment."""
    bpf = _bytes_per_frame(m, dl, frames, out_bytes)
    total = 0.0
    for key, n in frames.items():
        b = out_bytes.get(key)
        if b is None and dl is not None and key in dl.parts and dl.parts[key].total is not None:
            b = dl.parts[key].total
        if b is None:
            b = n * bpf
        out_bytes[key] = b
        total += b
    if not up.parts and not frames and up.known_total:
        total = up.known_total * bpf
    return total


def _bytes_per_frame(m: Moment, dl: PhaseState | None, frames: dict[str, float], out_bytes: dict[str, float]) -> float:
    """Encoded bytes of one output frame: the prior, moved by the segments whose size is known."""
    mu, sd = m.model.bytes_per_frame(m.f)
    n_obs = b_obs = 0.0
    for key, b in out_bytes.items():
        n_obs += frames.get(key, 0.0)
        b_obs += b
    if dl is not None:
        for key, p in dl.parts.items():
            if key not in out_bytes and p.total is not None and key in frames:
                n_obs += frames[key]
                b_obs += p.total
    if n_obs <= 0 or b_obs <= 0:
        return math.exp(mu)
    segs = max(len(out_bytes), 1)
    within = 0.2  # spread of one segment's size around the job's mean
    w = segs / (segs + (within / max(sd, 1e-3)) ** 2)
    return math.exp(w * math.log(b_obs / n_obs) + (1 - w) * mu)


def _downloads_end(m: Moment, dl: PhaseState, rate: float, enc_end: dict[str, float],
                   out_bytes: dict[str, float]) -> float:
    """When the last download ends: one after another, in the order the segments finish."""
    now = m.now
    latency = m.model.constant("download", "latency_s")
    free_t = now
    queue = []
    for key, t_enc in enc_end.items():
        part = dl.parts.get(key)
        if part is not None and part.ended:
            continue
        if part is not None and part.started:
            b = part.total if part.total is not None else out_bytes[key]
            base = part.last_t if part.last_t is not None else (part.start_t or now)
            free_t = max(free_t, stream_end(m, max(b - part.done, 0.0), rate, base, grace_of(part, m.settings.grace_s)))
        else:
            queue.append((t_enc, out_bytes[key]))
    queue.sort()
    for t_enc, b in queue:
        free_t = max(free_t, t_enc + latency) + b / rate
    return free_t
