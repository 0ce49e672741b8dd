"""Fit a `TimingModel` from event logs (`clipexport eta fit LOG... -o MODEL.json`).

Each log is read with the same `JobState` aggregation a live job uses, then
reduced to a few measurements per job: upload and download throughput,
prepare speed, encoded bytes per output pixel, the wait of every container
(warm or cold) and of every model load, seconds per frame of one container,
the encoder's flush, finalize time against output size. Those become:

- log-normal rate priors (upload throughput by size; download throughput by
  the same job's upload throughput: a slow line is slow both ways);
- quantile distributions for waits (warm start, cold start, model load) and
  the chance that the k-th container finds a warm GPU;
- seconds per frame: log(spf / input pixels) = mu + gpu + model + model@scale
  + gpu|model@scale, fitted by backfitting with shrinkage, so a rare
  combination borrows from its GPU and model, and an unseen GPU gets the
  median GPU with a wide spread;
- small constants (gaps, flush, per-segment overhead, download latency).

Given a `base` model (the built-in one), sections with little data are
shrunk towards it, so a user's refit from a handful of jobs stays sane.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..events import read_events
from .model import (FORMAT, GENERIC, VERSION, Dist, TimingModel, cpu_load_term, in_pixels, input_bytes_per_px,
                    out_pixels, probe_key)
from .segments import container_kind, first_on_worker, settle_point
from .state import JobState

# Ridge weights of the spf terms, in jobs: how much data a level needs to move.
_RIDGE = {"gpu": 0.05, "model": 0.05, "model_scale": 1.0, "cell": 3.0}
_BASE_WEIGHT_JOBS = 4.0  # what the base model counts for in a refit
_FEW = 8  # jobs below which a spread is not trusted to be narrower than the reference's
_SETTLE_FRAMES = 15  # frames a fresh container needs before its rate is steady


def jobs_from_logs(paths: Iterable[Path]) -> list[JobState]:
    """One `JobState` per job found in the logs (a log may hold several jobs)."""
    jobs: dict[tuple[str, str], JobState] = {}
    for path in paths:
        for event in read_events(Path(path)):
            if not isinstance(event, dict):
                continue
            key = (str(path), str(event.get("job")))
            st = jobs.get(key)
            if st is None:
                st = jobs[key] = JobState()
            st.feed(event)
    return list(jobs.values())


def _median(xs: Sequence[float], default: float) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return statistics.median(xs) if xs else default


def _mean_sd(xs: Sequence[float]) -> tuple[float, float] | None:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return None
    mu = sum(xs) / len(xs)
    if len(xs) < 2:
        return mu, 0.0
    return mu, math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def _linfit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float, float] | None:
    """Least squares y = a + b (x - ref); returns (a, b, ref, residual sd)."""
    n = len(xs)
    if n < 3:
        return None
    ref = sum(xs) / n
    sxx = sum((x - ref) ** 2 for x in xs)
    a = sum(ys) / n
    b = sum((x - ref) * (y - a) for x, y in zip(xs, ys)) / sxx if sxx > 1e-12 else 0.0
    res = [y - a - b * (x - ref) for x, y in zip(xs, ys)]
    sd = math.sqrt(sum(r * r for r in res) / max(n - 2, 1))
    return a, b, ref, sd


def _linfit2(rows: Sequence[tuple[float, float, float]]) -> dict[str, float] | None:
    """Least squares y = a + b1 (x1 - ref1) + b2 (x2 - ref2) over (x1, x2, y); with the residual sd.

    When x2 never varies (one scale only), b2 is 0 and the fit is `_linfit`'s.
    """
    n = len(rows)
    if n < 4:
        return None
    r1, r2, a = (sum(r[i] for r in rows) / n for i in range(3))
    s11 = sum((x1 - r1) ** 2 for x1, _, _ in rows)
    s22 = sum((x2 - r2) ** 2 for _, x2, _ in rows)
    s12 = sum((x1 - r1) * (x2 - r2) for x1, x2, _ in rows)
    s1y = sum((x1 - r1) * (y - a) for x1, _, y in rows)
    s2y = sum((x2 - r2) * (y - a) for _, x2, y in rows)
    det = s11 * s22 - s12 * s12
    if det > 1e-9 * max(s11 * s22, 1e-12):
        b1, b2 = (s22 * s1y - s12 * s2y) / det, (s11 * s2y - s12 * s1y) / det
    else:
        b1, b2 = (s1y / s11 if s11 > 1e-12 else 0.0), 0.0
    res = [y - a - b1 * (x1 - r1) - b2 * (x2 - r2) for x1, x2, y in rows]
    sd = math.sqrt(sum(r * r for r in res) / max(n - 3, 1))
    return {"a": a, "b_in": b1, "ref_in": r1, "b_scale": b2, "ref_scale": r2, "sd": sd}


def _span(p) -> float | None:
    if p.start_t is None or p.end_t is None:
        return None
    return p.end_t - p.start_t


class _Samples:
    def __init__(self) -> None:
        self.jobs = 0
        self.prepare: list[float] = []  # log rate
        self.upload: list[tuple[float, float]] = []  # (log size, log rate)
        self.download: list[tuple[float | None, float]] = []  # (log upload rate, log download rate)
        self.bpp: list[float] = []  # log encoded bytes per output pixel per frame
        self.bpp_vs: list[tuple[float, float, float]] = []  # (log input bytes per pixel, log scale, log bpp)
        self.warm: list[float] = []
        self.cold: list[float] = []
        self.warm_counts: list[tuple[int, int]] = []  # (warm containers, containers)
        self.stagger: list[float] = []
        self.queue_gap: list[float] = []
        self.load: dict[str, list[float]] = defaultdict(list)
        self.spf: list[tuple[dict[str, Any], float]] = []  # (features, log spf)
        self.overhead: list[float] = []
        self.warmup: list[tuple[float, float]] = []  # (steady spf, extra seconds of a first segment)
        self.seg_gap: list[float] = []
        self.flush: list[float] = []
        self.dl_latency: list[float] = []
        self.finalize: dict[str, list[tuple[float, float]]] = defaultdict(list)  # backend -> (GB, s)
        self.probes: dict[str, list[float]] = defaultdict(list)  # probe_key -> seconds per pixel


def _collect(jobs: Iterable[JobState]) -> _Samples:
    """Each finished job that rendered, reduced stage by stage to the samples the fit needs."""
    s = _Samples()
    for st in jobs:
        if st.terminal != "done" or not st.phases or st.reused:  # a job served from cache did not render
            continue
        s.jobs += 1
        idle = math.exp(-cpu_load_term(st.features))  # what the job measured, as on an idle machine
        if st.probe is not None:
            pr = st.probe
            s.probes[probe_key(pr.get("device"), pr.get("model"), pr.get("scale"), pr.get("precision"))].append(
                float(pr["s_per_px"]) * idle)
        prep = _prepare_rate(st)
        if prep is not None:
            s.prepare.append(prep)
        upload = _upload(st)
        if upload is not None:
            s.upload.append((math.log(upload[0]), math.log(upload[1])))
        down = _download_rate(st, upload[1] if upload else None)
        if down is not None:
            s.download.append(down)
        segs = _segments(st)
        if segs.spf is not None:  # the next plan puts its own load back on top (model.cpu_load_term)
            s.spf.append(({k: v for k, v in st.features.items() if k != "cpu_busy"}, math.log(segs.spf * idle)))
        s.overhead += segs.overhead
        s.warmup += segs.warmup
        s.seg_gap += segs.gaps
        s.flush += _lags(st, "upscale", "encode", to_start=False)
        bpp = _bytes_per_pixel(st, segs.frames)
        if bpp is not None:
            s.bpp.append(bpp)
            x = input_bytes_per_px(st.features)
            scale = st.features.get("scale")
            if x is not None and isinstance(scale, (int, float)) and scale > 0:
                s.bpp_vs.append((x, math.log(scale), bpp))
        s.dl_latency += _lags(st, "encode", "download", to_start=True)
        conts = _containers(st)
        s.warm += conts.warm
        s.cold += conts.cold
        if conts.warm_count is not None:
            s.warm_counts.append(conts.warm_count)
        s.stagger += conts.stagger
        s.queue_gap += conts.queue_gap
        for key, spans in _loads(st).items():
            s.load[key] += spans
        fin = _finalize(st)
        if fin is not None:
            for key in (str(st.features.get("backend", "")), "*"):
                s.finalize[key].append(fin)
    return s


# -- stages: one job in, its samples out ------------------------------------------


def _prepare_rate(st: JobState) -> float | None:
    """log bytes/s of hashing the inputs."""
    prep = st.phases.get("prepare")
    if prep and prep.ended and prep.start_t is not None and prep.done > 0:
        dt = prep.end_t - prep.start_t  # type: ignore[operator]
        if dt > 0:
            return math.log(prep.done / dt)
    return None


def _upload(st: JobState) -> tuple[float, float] | None:
    """(bytes, bytes/s) of the upload, retried attempts included."""
    upl = st.phases.get("upload")
    if upl and upl.parts:
        b = sum(p.done + p.lost_done for p in upl.parts.values() if p.ended)
        t = sum((_span(p) or 0.0) + p.lost_time for p in upl.parts.values() if p.ended)
        if b > 0 and t > 0:
            return b, b / t
    return None


def _download_rate(st: JobState, up_rate: float | None) -> tuple[float | None, float] | None:
    """(log upload rate of the same job, log download bytes/s)."""
    dl = st.phases.get("download")
    if dl and dl.parts:
        b = sum(p.done for p in dl.parts.values() if p.ended)
        t = sum(_span(p) or 0.0 for p in dl.parts.values() if p.ended)
        if b > 0 and t > 0:
            return (math.log(up_rate) if up_rate else None, math.log(b / t))
    return None


@dataclass
class _SegmentFit:
    """What one job's segments say: its steady seconds per frame and what surrounds it."""

    spf: float | None = None
    frames: dict[str, float] = field(default_factory=dict)  # frames of each finished segment
    overhead: list[float] = field(default_factory=list)  # extra seconds of short, warm segments
    warmup: list[tuple[float, float]] = field(default_factory=list)  # (spf, extra s of a first segment)
    gaps: list[float] = field(default_factory=list)  # idle seconds between a worker's segments


def _segments(st: JobState) -> _SegmentFit:
    out = _SegmentFit()
    up = st.phases.get("upscale")
    if not up:
        return out
    first_keys = first_on_worker(up)
    segs = []  # (frames, span, steady spf or None, first on its worker)
    by_worker: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key, p in up.parts.items():
        span = _span(p)
        if span is None or not p.done:
            continue
        out.frames[key] = p.done
        first = key in first_keys
        steady = None
        if first and p.early:
            settle = settle_point(p, _SETTLE_FRAMES)
            if settle and p.done > settle[1] + 5:
                steady = (p.end_t - settle[0]) / (p.done - settle[1])  # type: ignore[operator]
        elif not first:
            steady = span / p.done
        segs.append((p.done, span, steady, first))
        by_worker[p.worker or "?"].append((p.start_t, p.end_t))  # type: ignore[arg-type]
    for spans in by_worker.values():
        spans.sort()
        out.gaps += [b[0] - a[1] for a, b in zip(spans, spans[1:]) if b[0] >= a[1]]
    if segs:
        big = max(n for n, *_ in segs)
        full = [st_ for n, _, st_, _ in segs if st_ and n >= 0.5 * big]
        if not full:
            full = [t / n for n, t, *_ in segs if n >= 0.5 * big]
        spf = out.spf = statistics.median(full)
        out.overhead = [t - n * spf for n, t, _, first in segs if n < 0.5 * big and not first]
        out.warmup = [(spf, t - n * spf) for n, t, st_, first in segs if first and st_ and n >= 0.5 * big]
    return out


def _lags(st: JobState, earlier: str, later: str, *, to_start: bool) -> list[float]:
    """Seconds from each part's end in phase `earlier` to the same part's end (or start) in `later`.

    Encode after upscale is the encoder's flush; download after encode the
    latency before a finished segment is fetched.
    """
    first, then = st.phases.get(earlier), st.phases.get(later)
    if not (first and then):
        return []
    out = []
    for key, p in then.parts.items():
        q = first.parts.get(key)
        t = p.start_t if to_start else p.end_t
        if t is not None and q is not None and q.end_t is not None:
            out.append(t - q.end_t)
    return out


def _bytes_per_pixel(st: JobState, seg_frames: dict[str, float]) -> float | None:
    """log encoded bytes per output pixel per frame."""
    enc = st.phases.get("encode")
    if not enc:
        return None
    nb = [(seg_frames.get(k), p.out_bytes) for k, p in enc.parts.items() if p.out_bytes]
    n = sum(x for x, _ in nb if x)
    b = sum(y for x, y in nb if x)
    return math.log(b / n / out_pixels(st.features)) if n > 0 and b > 0 else None


@dataclass
class _ContainerFit:
    """What one job's containers say: warm and cold waits, the warm run, the stagger."""

    warm: list[float] = field(default_factory=list)
    cold: list[float] = field(default_factory=list)
    warm_count: tuple[int, int] | None = None  # (warm containers in a row, containers resolved)
    stagger: list[float] = field(default_factory=list)
    queue_gap: list[float] = field(default_factory=list)


def _containers(st: JobState) -> _ContainerFit:
    out = _ContainerFit()
    q, lm, upl = st.phases.get("queue"), st.phases.get("load_model"), st.phases.get("upload")
    if not (q and q.parts):
        return out
    conts = sorted(q.parts.values(), key=lambda p: p.start_t if p.start_t is not None else math.inf)
    kinds = []
    for c in conts:
        span = _span(c)
        if span is None or c.detail == "cancelled":
            kinds.append(None)
            continue
        cold = container_kind(c, lm) == "cold"
        (out.cold if cold else out.warm).append(span)
        kinds.append(not cold)
    warm_n = 0
    for k in kinds:
        if k is True:
            warm_n += 1
        else:
            break
    resolved = warm_n + (1 if warm_n < len(kinds) and kinds[warm_n] is False else 0)
    if resolved:
        out.warm_count = (warm_n, len(kinds) if warm_n == len(kinds) else resolved)
    starts = [c.start_t for c in conts if c.start_t is not None]
    out.stagger = [b - a for a, b in zip(starts, starts[1:])]
    if upl and upl.ended and q.start_t is not None:
        out.queue_gap.append(q.start_t - upl.end_t)  # type: ignore[operator]
    return out


def _loads(st: JobState) -> dict[str, list[float]]:
    """Model load seconds, under each key the model reads them by (backend|model, backend, model, '*')."""
    lm = st.phases.get("load_model")
    if not lm or st.features.get("int8_first"):  # a one-off: that load also prepared int8 for the machine
        return {}
    spans = [_span(p) for p in lm.parts.values() if p.detail != "cancelled"] if lm.parts else [
        (lm.end_t - lm.start_t) if lm.ended and lm.start_t is not None else None  # type: ignore[operator]
    ]
    backend, model = str(st.features.get("backend", "")), str(st.features.get("model", ""))
    keys = (f"{backend}|{model}", backend, model, "*")
    good = [x for x in spans if x is not None and x > 0]
    return {key: list(good) for key in keys} if good else {}


def _finalize(st: JobState) -> tuple[float, float] | None:
    """(GB of output, seconds) of the finalize step."""
    fin = st.phases.get("finalize")
    if not (fin and fin.ended and fin.start_t is not None):
        return None
    enc, dl = st.phases.get("encode"), st.phases.get("download")
    out_b = sum(p.out_bytes or 0.0 for p in enc.parts.values()) if enc else 0.0
    if not out_b and dl:
        out_b = sum(p.done for p in dl.parts.values())
    return out_b / 1e9, fin.end_t - fin.start_t  # type: ignore[operator]


def _warm_survival(counts: list[tuple[int, int]], kmax: int = 8) -> list[float]:
    """P(W >= k), k = 1..kmax, from (warm run, containers seen) with censoring."""
    surv, s = [], 1.0
    for k in range(kmax):
        at_risk = sum(1 for w, n in counts if w >= k and n > k)
        events = sum(1 for w, n in counts if w == k and n > k)
        if at_risk:
            s *= 1.0 - events / at_risk
        surv.append(round(s, 4))
    return surv


def _fit_spf(rows: list[tuple[dict[str, Any], float]], base: TimingModel | None) -> dict[str, Any] | None:
    """Backfit log(spf / input pixels) on gpu, model, model@scale and cell terms."""
    if not rows:
        return None
    data = []
    for f, log_spf in rows:
        y = log_spf - math.log(max(in_pixels(f), 1.0))
        gpu, model = str(f.get("gpu", "")), str(f.get("model", ""))
        ms = f"{model}@x{f.get('scale', '')}"
        data.append({"gpu": gpu, "model": model, "model_scale": ms, "cell": f"{gpu}|{ms}", "y": y, "f": f})
    if base is not None:
        # refit: model the deviation from the base model's prediction
        bsec = base.section("upscale")
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in bsec.items()}
        for d in data:
            d["r"] = d["y"] + math.log(max(in_pixels(d["f"]), 1.0)) - base.spf(d["f"])[0]
        by_gpu: dict[str, list[float]] = defaultdict(list)
        for d in data:
            by_gpu[d["gpu"]].append(d["r"])
        for g, rs in by_gpu.items():
            shift = sum(rs) / (len(rs) + 1.0)
            if g in out["gpu"]:
                out["gpu"][g] = round(out["gpu"][g] + shift, 4)
            else:
                out["gpu"][g] = round(out.get("generic_gpu", 0.0) + shift, 4)
            for d in data:
                if d["gpu"] == g:
                    d["r"] -= shift
        by_cell: dict[str, list[float]] = defaultdict(list)
        for d in data:
            by_cell[d["cell"]].append(d["r"])
        for c, rs in by_cell.items():
            out["cell"][c] = round(out["cell"].get(c, 0.0) + sum(rs) / (len(rs) + 2.0), 4)
        return out
    mu = sum(d["y"] for d in data) / len(data)
    effects: dict[str, dict[str, float]] = {g: defaultdict(float) for g in _RIDGE}
    for _ in range(50):
        for group, lam in _RIDGE.items():
            sums: dict[str, float] = defaultdict(float)
            counts: dict[str, int] = defaultdict(int)
            for d in data:
                other = sum(effects[g][d[g]] for g in _RIDGE if g != group)
                sums[d[group]] += d["y"] - mu - other
                counts[d[group]] += 1
            effects[group] = defaultdict(float, {k: sums[k] / (counts[k] + lam) for k in sums})
        mu = sum(d["y"] - sum(effects[g][d[g]] for g in _RIDGE) for d in data) / len(data)
    res = [d["y"] - mu - sum(effects[g][d[g]] for g in _RIDGE) for d in data]
    n = len(res)
    sd = math.sqrt(sum(r * r for r in res) / max(n - 1, 1)) if n > 1 else 0.3
    gpus = {k: v for k, v in effects["gpu"].items()}
    accel = sorted(v for k, v in gpus.items() if k.lower() != "cpu") or [0.0]
    generic = statistics.median(accel)
    spread = math.sqrt(sum((v - generic) ** 2 for v in accel) / max(len(accel) - 1, 1)) if len(accel) > 1 else 0.7
    return {
        "mu": round(mu, 5),
        "gpu": {k: round(v, 4) for k, v in sorted(gpus.items())},
        "model": {k: round(v, 4) for k, v in sorted(effects["model"].items())},
        "model_scale": {k: round(v, 4) for k, v in sorted(effects["model_scale"].items())},
        "cell": {k: round(v, 4) for k, v in sorted(effects["cell"].items()) if abs(v) > 1e-4},
        "sd": round(max(sd, 0.05), 4),
        "generic_gpu": round(generic, 4),
        "sd_unknown": round(math.sqrt(max(sd, 0.05) ** 2 + spread**2), 4),
    }


def _spread(sd: float, n: int, ref_sd: float, floor: float) -> float:
    """A prior's spread: from few jobs, no tighter than the reference's."""
    return max(sd, float(ref_sd) if n < _FEW else 0.0, floor)


def _shrink(new: float | None, n: int, old: float | None) -> float | None:
    if new is None:
        return old
    if old is None:
        return new
    return (n * new + _BASE_WEIGHT_JOBS * old) / (n + _BASE_WEIGHT_JOBS)


def _builtin() -> TimingModel:
    try:
        return TimingModel.default()
    except (OSError, ValueError):
        return TimingModel.generic()


def fit_logs(paths: Iterable[Path], base: TimingModel | None = None) -> TimingModel:
    """Fit a timing model from the logs of finished jobs.

    With `base`, every section keeps the base's values where the logs say
    little, and moves towards the logs as they say more.
    """
    return fit_jobs(jobs_from_logs(paths), base=base)


def fit_jobs(jobs: Iterable[JobState], base: TimingModel | None = None) -> TimingModel:
    """The samples of `jobs`, then each section fitted by its own function.

    Where the logs say nothing: the base, else the built-in model, so a user
    who only ran local jobs still gets sane cloud priors.
    """
    s = _collect(jobs)
    fit = _Fit(s, base or _builtin(), base)
    out: dict[str, Any] = {"format": FORMAT, "version": VERSION,
                           "jobs": s.jobs + (fit.ref.data.get("jobs", 0) if base else 0)}
    for name, section in (("prepare", _fit_prepare), ("upload", _fit_upload), ("download", _fit_download),
                          ("output", _fit_output), ("queue", _fit_queue), ("load_model", _fit_load),
                          ("upscale", _fit_upscale), ("encode", _fit_encode), ("finalize", _fit_finalize),
                          ("probes", _fit_probes)):
        value = section(fit)
        if value:
            out[name] = value
    return TimingModel(out)


@dataclass
class _Fit:
    """The samples, the reference model (base or built-in) and the base if this is a refit."""

    s: _Samples
    ref: TimingModel
    base: TimingModel | None

    def dist(self, samples: list[float], key: str, section: str, min_n: int = 6) -> list[float]:
        """Quantiles of `samples`; a refit mixes the base's in while the samples are few."""
        old = self.ref.section(section).get(key)
        if len(samples) >= min_n or (samples and self.base is None):
            if self.base is not None and old and len(samples) < 30:
                # mix the base's quantiles in, as if they were a few jobs
                weight = max(1, int(round(_BASE_WEIGHT_JOBS * len(old) / 21)))
                samples = list(samples) + list(old) * weight
            return Dist.from_samples(samples).to_json()
        return list(old) if old else []


def _fit_prepare(fit: _Fit) -> dict[str, Any]:
    sec, s = fit.ref.section("prepare"), fit.s
    ms = _mean_sd(s.prepare)
    if not ms:
        return sec
    mu = _shrink(ms[0], len(s.prepare), sec["log_rate"]["mu"] if fit.base else None)
    return {"log_rate": {"mu": round(mu, 4), "sd": round(max(ms[1], 0.2), 4)}, "base_s": sec["base_s"]}


def _fit_upload(fit: _Fit) -> dict[str, Any]:
    """Upload throughput by size."""
    sec, s = fit.ref.section("upload"), fit.s
    lf = _linfit([x for x, _ in s.upload], [y for _, y in s.upload])
    if lf:
        a, b, r, sd = lf
        if fit.base:
            old = sec["log_rate"]
            a = _shrink(a, len(s.upload), float(old["a"]) + float(old.get("b", 0)) * (r - float(old.get("ref", r))))
        sd = _spread(sd, len(s.upload), sec["log_rate"]["sd"], 0.1)
        out = {"log_rate": {"a": round(a, 4), "b": round(b, 4), "ref": round(r, 4), "sd": round(sd, 4)}}
    elif s.upload:
        x, y = s.upload[0]
        a = round(_shrink(y, 1, sec["log_rate"]["a"] if fit.base else None), 4)  # type: ignore[arg-type]
        out = {"log_rate": {"a": a, "b": 0.0, "ref": round(x, 4), "sd": 1.0}}
    else:
        out = {"log_rate": sec["log_rate"]}
    out["gap_s"] = round(float(sec["gap_s"]), 3)
    return out


def _fit_download(fit: _Fit) -> dict[str, Any]:
    """Download throughput, alone and against the same job's upload throughput."""
    sec, s = fit.ref.section("download"), fit.s
    all_dl = [y for _, y in s.download]
    ms = _mean_sd(all_dl)
    pairs = [(x, y) for x, y in s.download if x is not None]
    lf = _linfit([x for x, _ in pairs], [y for _, y in pairs])
    dsec: dict[str, Any] = {}
    if ms:
        mu = _shrink(ms[0], len(all_dl), sec["log_rate"]["mu"] if fit.base else None)
        dsec["log_rate"] = {"mu": round(mu, 4), "sd": round(_spread(ms[1], len(all_dl), sec["log_rate"]["sd"], 0.1), 4)}
    else:
        dsec["log_rate"] = sec["log_rate"]
    if lf:
        a, b, r, sd = lf
        sd = _spread(sd, len(pairs), sec["vs_upload"]["sd"], 0.1)
        dsec["vs_upload"] = {"a": round(a, 4), "b": round(b, 4), "ref": round(r, 4), "sd": round(sd, 4)}
    else:
        dsec["vs_upload"] = sec["vs_upload"]
    dsec["latency_s"] = round(_median([x for x in s.dl_latency if 0 <= x < 10], sec["latency_s"]), 3)
    return dsec


def _fit_output(fit: _Fit) -> dict[str, Any]:
    """Encoded size per output pixel."""
    sec, s = fit.ref.section("output"), fit.s
    ms = _mean_sd(s.bpp)
    if not ms:
        return sec
    mu = _shrink(ms[0], len(s.bpp), sec["log_bytes_per_px"]["mu"] if fit.base else None)
    sd = _spread(ms[1], len(s.bpp), sec["log_bytes_per_px"]["sd"], 0.1)
    out: dict[str, Any] = {"log_bytes_per_px": {"mu": round(mu, 4), "sd": round(sd, 4)}}
    lf = _linfit2(s.bpp_vs) if len(s.bpp_vs) >= _FEW else None
    if lf is not None:  # a busy input encodes to a busy output; a larger scale to fewer bytes per pixel
        lf["sd"] = _spread(lf["sd"], len(s.bpp_vs), (sec.get("vs_input") or {}).get("sd", sd), 0.1)
        out["vs_input"] = {k: round(v, 4) for k, v in lf.items()}
    elif sec.get("vs_input"):
        out["vs_input"] = sec["vs_input"]
    return out


def _fit_queue(fit: _Fit) -> dict[str, Any]:
    """Containers: the chance the k-th is warm, warm and cold waits, stagger, gap after the upload."""
    sec, s = fit.ref.section("queue"), fit.s
    qsec: dict[str, Any] = {}
    if s.warm_counts:
        surv = _warm_survival(s.warm_counts)
        if fit.base:
            n = len(s.warm_counts)
            surv = [round((n * a + _BASE_WEIGHT_JOBS * b) / (n + _BASE_WEIGHT_JOBS), 4) for a, b in zip(surv, sec["p_warm"])]
        qsec["p_warm"] = surv
    else:
        qsec["p_warm"] = sec["p_warm"]
    qsec["warm_s"] = fit.dist(s.warm, "warm_s", "queue")
    qsec["cold_s"] = fit.dist(s.cold, "cold_s", "queue")
    qsec["stagger_s"] = round(_median(s.stagger, sec["stagger_s"]), 3)
    qsec["gap_s"] = round(_median([x for x in s.queue_gap if 0 <= x < 10], sec["gap_s"]), 3)
    return qsec


def _fit_load(fit: _Fit) -> dict[str, Any]:
    """Model load time, by backend and model."""
    sec, s = fit.ref.section("load_model"), fit.s
    lsec: dict[str, Any] = dict(sec) if fit.base or not s.load else {}
    for key, xs in s.load.items():
        got = fit.dist(xs, key, "load_model", min_n=3)
        if got:
            lsec[key] = got
    if "*" not in lsec:
        lsec["*"] = list(GENERIC["load_model"]["*"])
    return lsec


def _fit_upscale(fit: _Fit) -> dict[str, Any]:
    """Time per frame, and around it: per-segment overhead, gaps, the first segment's warm-up."""
    sec, s, base = fit.ref.section("upscale"), fit.s, fit.base
    usec = _fit_spf(s.spf, base) or dict(sec)
    if base is None and s.spf:
        usec["sd"] = round(_spread(usec["sd"], len(s.spf), float(sec["sd"]), 0.05), 4)
        # GPUs this fit has not seen keep the built-in prior
        known = set(usec.get("gpu", {}))
        builtin = {k: v for k, v in sec.items() if k != "fallback"}
        if set(builtin.get("gpu", {})) - known:
            usec["fallback"] = builtin
    usec["overhead_s"] = round(min(max(_median(s.overhead, sec["overhead_s"]), 0.0), 5.0), 3)
    usec["gap_s"] = round(_median(s.seg_gap, sec["gap_s"]), 3)
    usec["settle_frames"] = _SETTLE_FRAMES
    usec["warmup_frames"] = sec["warmup_frames"]
    pts = [(math.log(x), math.log(max(y - usec["overhead_s"], 0.05))) for x, y in s.warmup if x > 0]
    lf = _linfit([x for x, _ in pts], [y for _, y in pts]) if len(pts) >= _FEW else None
    if lf:
        a, b, r, sd = lf
        usec["warmup"] = {"a": round(a - b * r, 4), "b": round(b, 4), "sd": round(sd, 4)}
    elif sec.get("warmup"):
        usec["warmup"] = sec["warmup"]
    return usec


def _fit_encode(fit: _Fit) -> dict[str, Any]:
    """The encoder's flush after a segment's last frame."""
    return {"flush_s": round(_median([x for x in fit.s.flush if x >= 0], fit.ref.section("encode")["flush_s"]), 3)}


def _fit_finalize(fit: _Fit) -> dict[str, Any]:
    """Finalize time by output size, per backend."""
    sec, s = fit.ref.section("finalize"), fit.s
    fsec: dict[str, Any] = dict(sec) if fit.base or not s.finalize else {}
    for key, pts in s.finalize.items():
        lf = _linfit([x for x, _ in pts], [y for _, y in pts])
        ys = [y for _, y in pts]
        if lf and lf[1] >= 0:
            a, b, r, _ = lf
            entry = {"base_s": round(max(a - b * r, 0.05), 4), "s_per_gb": round(b, 4), "max_s": round(max(ys) * 1.5, 3)}
        else:
            entry = {"base_s": round(_median(ys, 0.3), 4), "s_per_gb": 0.0, "max_s": round(max(ys) * 1.5, 3)}
        fsec[key] = entry
    return fsec or dict(GENERIC["finalize"])


def _fit_probes(fit: _Fit) -> dict[str, float]:
    """This machine's speed probes: the latest jobs' median, each device, model and precision apart."""
    probes = dict(fit.ref.data.get("probes") or {})
    probes.update({key: float(f"{_median(xs[-20:], 0.0):.4g}") for key, xs in fit.s.probes.items()})
    return probes
