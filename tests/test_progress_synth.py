"""A small job simulator that writes contract events with known rates.

Used by the progress tests (imported as `test_progress_synth`): the fit must
recover the rates a log was made with, the tracker must survive any damage
done to a realistic event stream, a replay must not look ahead.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from pathlib import Path

from clipexport.events import Emitter, EventLog, read_events, validate_event


@dataclass
class JobSpec:
    job: str = "cx-test01"
    t0: float = 1_700_000_000.0
    backend: str = "modal"
    gpu: str = "T4"
    model: str = "realesr-animevideov3"
    scale: int = 4
    width: int = 640
    height: int = 360
    frames: int = 480
    segment_frames: int = 120
    parallel: int = 2
    input_bytes: int = 20_000_000
    upload_rate: float = 2e6  # bytes/s
    spf: float = 0.05  # seconds per frame of one container, after warm-up
    download_rate: float = 8e6
    bytes_per_frame: float = 50_000.0
    warm: tuple[bool, ...] = (True, False)  # per container
    cold_s: float = 30.0
    warm_s: float = 1.5
    load_s: float = 5.0
    finalize_s: float = 0.5
    restart: dict[int, float] = field(default_factory=dict)  # segment index -> share done when preempted
    tick: float = 1.0  # seconds between progress events
    slow: tuple[float, float] | None = None  # (seconds after t0, factor): from then the GPU work takes factor x as long


def simulate(spec: JobSpec) -> list[tuple[float, dict]]:
    """(t, partial event) pairs of one successful job, in time order."""
    out: list[tuple[float, dict]] = []
    local = spec.backend == "local"

    def ev(t: float, type_: str, **fields) -> None:
        out.append((t, {"type": type_, **fields}))

    nseg = math.ceil(spec.frames / spec.segment_frames)
    phases = [{"phase": "prepare", "unit": "bytes", "total": spec.input_bytes}]
    if not local:
        phases += [{"phase": "upload", "unit": "bytes", "total": spec.input_bytes}, {"phase": "queue", "unit": None, "total": None}]
    phases += [
        {"phase": "load_model", "unit": None, "total": None},
        {"phase": "upscale", "unit": "frames", "total": spec.frames},
        {"phase": "encode", "unit": "frames", "total": spec.frames},
    ]
    if not local:
        phases.append({"phase": "download", "unit": "bytes", "total": None})
    phases.append({"phase": "finalize", "unit": None, "total": None})
    features = {
        "backend": spec.backend, "gpu": spec.gpu, "model": spec.model, "scale": spec.scale,
        "in_width": spec.width, "in_height": spec.height, "fps": 24.0, "frames": spec.frames,
        "input_bytes": spec.input_bytes, "clips": 1, "segments": nseg,
        "parallel": 1 if local else spec.parallel, "segment_frames": spec.segment_frames,
        "out_width": spec.width * spec.scale, "out_height": spec.height * spec.scale,
    }
    t = spec.t0
    ev(t, "plan", phases=phases, features=features)

    def stream(phase: str, part: str | None, start: float, total: float, rate: float, extra: dict,
               flow: float | None = None, stop: float | None = None) -> float:
        """`total` units at `rate` from `flow` (default: `start`); returns the end.

        With `stop`, the part is cut there (preempted): no end is written.
        """
        keys = {"part": part} if part else {}
        unit = {"unit": "frames" if phase in ("upscale", "encode") else "bytes"}
        flow = start if flow is None else flow
        ev(start, "phase_start", phase=phase, **keys, **unit, total=total, **extra)
        slow_t, factor = (spec.t0 + spec.slow[0], spec.slow[1]) if spec.slow and phase in ("upscale", "encode") \
            else (math.inf, 1.0)
        fast = rate * max(0.0, slow_t - flow)  # units done before the machine slows
        end = flow + total / rate if fast >= total else max(flow, slow_t) + (total - fast) * factor / rate

        def done_by(k: int) -> float:
            if flow + k * spec.tick <= slow_t:
                return rate * k * spec.tick
            return fast + rate * (flow + k * spec.tick - max(flow, slow_t)) / factor

        k = 1
        while flow + k * spec.tick < end:
            tt = flow + k * spec.tick
            if stop is not None and tt > stop:
                return stop
            ev(tt, "progress", phase=phase, **keys, **unit, done=int(done_by(k)), total=total, **extra)
            k += 1
        if stop is not None and end > stop:
            return stop
        ev(end, "progress", phase=phase, **keys, **unit, done=total, total=total, **extra)
        ev(end, "phase_end", phase=phase, **keys, **unit, done=total, total=total, elapsed=round(end - start, 3), **extra)
        return end

    # prepare
    ev(t + 0.1, "phase_start", phase="prepare", unit="bytes", total=spec.input_bytes)
    ev(t + 0.3, "progress", phase="prepare", unit="bytes", done=spec.input_bytes, total=spec.input_bytes)
    ev(t + 0.3, "phase_end", phase="prepare", unit="bytes", done=spec.input_bytes, total=spec.input_bytes, elapsed=0.2)
    t += 0.4
    # upload
    if not local:
        ev(t, "phase_start", phase="upload", unit="bytes", total=spec.input_bytes)
        end = stream("upload", "clip-01", t, spec.input_bytes, spec.upload_rate, {"attempt": 1})
        ev(end, "phase_end", phase="upload", unit="bytes", done=spec.input_bytes, total=spec.input_bytes, elapsed=round(end - t, 3))
        t = end + 0.2
    # containers
    ready: list[tuple[float, str]] = []
    if local:
        ev(t, "phase_start", phase="load_model")
        ev(t + spec.load_s, "phase_end", phase="load_model", elapsed=spec.load_s)
        ready.append((t + spec.load_s, "local"))
    else:
        ev(t, "phase_start", phase="queue")
        ncont = min(spec.parallel, nseg)
        q_end = t
        for k in range(ncont):
            name = f"ctr-{k + 1:02d}"
            s = t + 0.2 * k
            ev(s, "phase_start", phase="queue", part=name)
            warm = spec.warm[k] if k < len(spec.warm) else spec.warm[-1]
            wait = spec.warm_s if warm else spec.cold_s
            hb = s + 1.0
            while hb < s + wait:
                ev(hb, "heartbeat", phase="queue", detail="waiting for GPU" if hb - s < 3 else "cold start")
                hb += 1.0
            ev(s + wait, "phase_end", phase="queue", part=name, elapsed=wait, detail="warm" if warm else "cold start")
            r = s + wait
            if not warm:
                ev(r, "phase_start", phase="load_model", part=name)
                ev(r + spec.load_s, "phase_end", phase="load_model", part=name, elapsed=spec.load_s)
                r += spec.load_s
            q_end = max(q_end, s + wait)
            ready.append((r, name))
        ev(q_end, "phase_end", phase="queue", elapsed=round(q_end - t, 3))
    # segments on containers
    heapq.heapify(ready)
    warmed: set[str] = set()
    enc_done: list[tuple[float, str, int]] = []
    first_start = None
    for i in range(nseg):
        n = min(spec.segment_frames, spec.frames - i * spec.segment_frames)
        name = f"seg-{i + 1:04d}"
        r, worker = heapq.heappop(ready)
        start = r + 0.1
        if first_start is None:
            first_start = start
            ev(start, "phase_start", phase="upscale", unit="frames", total=spec.frames)
            ev(start + 0.2, "phase_start", phase="encode", unit="frames", total=spec.frames)
        rate = 1.0 / spec.spf
        flow = start
        if worker not in warmed:
            flow += 2.0  # warm-up of a fresh container
            warmed.add(worker)
        attempt = 1
        if i in spec.restart:
            cut = flow + spec.restart[i] * n / rate
            stream("upscale", name, start, n, rate, {"attempt": 1, "worker": worker}, flow=flow, stop=cut)
            stream("encode", name, start + 0.2, n, rate, {"attempt": 1, "worker": worker}, flow=flow + 0.2, stop=cut)
            start = flow = cut + 5.0  # restarted on the same container, warm
            attempt = 2
        end = stream("upscale", name, start, n, rate, {"attempt": attempt, "worker": worker}, flow=flow)
        enc_end = stream("encode", name, start + 0.2, n, rate, {"attempt": attempt, "worker": worker}, flow=flow + 0.2 + 0.3)
        out[-1][1]["bytes"] = int(n * spec.bytes_per_frame)
        enc_done.append((enc_end, name, n))
        heapq.heappush(ready, (end, worker))
    # containers that never got a segment are cancelled once all are handed out
    used = {w for w in warmed}
    handed = max(t_ for t_, e in out if e["type"] == "phase_start" and e.get("phase") == "upscale" and "part" in e)
    for k in range(min(spec.parallel, nseg) if not local else 0):
        name = f"ctr-{k + 1:02d}"
        if name in used:
            continue
        mine = [x for x in out if x[1].get("part") == name or (x[1]["type"] == "heartbeat" and x[0] > handed)]
        late = {id(x) for x in mine if x[0] > handed}
        out[:] = [x for x in out if id(x) not in late]
        phase = "load_model" if any(e.get("phase") == "load_model" for t_, e in mine if t_ <= handed) else "queue"
        ev(handed + 0.1, "phase_end", phase=phase, part=name, detail="cancelled")
        if phase == "load_model":
            ev(handed + 0.1, "phase_end", phase="load_model")
    qend = [x for x in out if x[1]["type"] == "phase_end" and x[1].get("phase") == "queue" and "part" not in x[1]]
    if qend and qend[0][0] > handed:
        out.remove(qend[0])
        ev(handed + 0.2, "phase_end", phase="queue")
    last_enc = max(e for e, _, _ in enc_done)
    ev(max(e for e, _, _ in enc_done) - 0.1, "phase_end", phase="upscale", unit="frames", done=spec.frames, total=spec.frames)
    ev(last_enc, "phase_end", phase="encode", unit="frames", done=spec.frames, total=spec.frames)
    t = last_enc
    if not local:
        free = 0.0
        total_b = 0
        for enc_end, name, n in sorted(enc_done):
            b = int(n * spec.bytes_per_frame)
            total_b += b
            s = max(free, enc_end + 0.5)
            if free == 0.0:
                ev(s, "phase_start", phase="download", unit="bytes", total=None)
            free = stream("download", name, s, b, spec.download_rate, {"attempt": 1})
        ev(free, "phase_end", phase="download", unit="bytes", done=total_b, total=total_b)
        t = free
    ev(t + 0.1, "phase_start", phase="finalize")
    ev(t + 0.1 + spec.finalize_s, "phase_end", phase="finalize", elapsed=spec.finalize_s)
    ev(t + 0.2 + spec.finalize_s, "done", output="/tmp/out.mp4", elapsed=round(t + 0.2 + spec.finalize_s - spec.t0, 3))
    out.sort(key=lambda x: x[0])
    return out


def job_events(spec: JobSpec) -> list[dict]:
    """Stamped events of one job, as the Emitter makes them."""
    clock = [spec.t0]
    emitter = Emitter(spec.job, clock=lambda: clock[0])
    events = []
    for t, partial in simulate(spec):
        clock[0] = t
        events.append(emitter.emit(partial))
    return events


def write_log(path: Path, spec: JobSpec) -> Path:
    log = EventLog(path)
    for event in job_events(spec):
        log(event)
    log.close()
    return path


def test_simulated_jobs_follow_the_contract(tmp_path: Path) -> None:
    for spec in (JobSpec(), JobSpec(backend="local", gpu="rtx4090"), JobSpec(restart={1: 0.5})):
        path = write_log(tmp_path / f"{spec.backend}-{len(spec.restart)}.jsonl", spec)
        events = list(read_events(path))
        for event in events:
            validate_event(event)
        assert [e["seq"] for e in events] == list(range(len(events)))
        assert events[0]["type"] == "plan" and events[-1]["type"] == "done"
        assert all(a["t"] <= b["t"] for a, b in zip(events, events[1:]))
