"""ETA accuracy on job traces: the learned estimator against three baselines.

    python bench/eta_accuracy.py [--train DIR] [--dev DIR] [--model FILE]

Fits a timing model on the train traces, replays the dev traces through the
same code a live job uses (`replay_traces`), and, on the same traces in the
same run, computes three baselines from the same overall fraction:

  fixed  fixed phase weights (upload 0-10 %, processing 10-95 %, finalize
         95-100 %), remaining = elapsed x (1 - p) / p
  rich   Rich's default: speed over a 30 s window of the overall fraction
         (rich.progress.Task.speed / time_remaining, replicated)
  tqdm   tqdm's EMA of the rate, smoothing 0.3 (tqdm.std.EMA, replicated)

A last row replays the same dev traces with their GPU renamed to one the
model has never seen (the fallback: a generic GPU prior, then the job's own
observed rate).

Metrics, over samples (one per event) with at least 10 s left and after 5 %
of the job's time: per-trace median absolute percentage error of the
remaining time, then its median and p90 over traces; share of samples within
20 %; error of the up-front estimate (at the plan event) against the true
total, and how often the 80 % range shown at the plan holds the true
length; decreases of the shown fraction; upward jumps of the ETA of more than
20 % from one sample to the next. A missing estimate counts as 100 % error.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clipexport.events import read_events  # noqa: E402
from clipexport.progress import TimingModel, estimate_plan, fit_logs, replay_traces  # noqa: E402
from clipexport.progress.replay import replay_events  # noqa: E402

TRACES = ROOT.parent / "shared" / "traces"  # shared/ sits beside the checkout
MIN_LEFT_S = 10.0
MIN_DONE_SHARE = 0.05
JUMP = 1.2


# -- the baselines' overall fraction -------------------------------------------


class FixedWeights:
    """Overall fraction with fixed phase weights: upload 0-10 %, processing
    10-95 %, finalize 95-100 %. Local jobs (no upload) use prepare's bytes for
    the first band. Processing is the mean work fraction of upscale, encode
    and download (download counted in finished segments, its size being
    unknown up front)."""

    def __init__(self) -> None:
        self.plan = None
        self.segments = 1
        self.parts: dict[tuple[str, str | None], tuple[float, float | None]] = {}
        self.totals: dict[str, float] = {}
        self.dl_done: set[str] = set()
        self.ended: set[str] = set()
        self.done = False
        self.p = 0.0

    def feed(self, e: dict) -> None:
        typ = e.get("type")
        if typ == "plan":
            self.plan = e
            self.segments = int(e.get("features", {}).get("segments") or 1)
            for ph in e.get("phases", []):
                if ph.get("total"):
                    self.totals[ph["phase"]] = ph["total"]
        elif typ == "done":
            self.done = True
        elif typ in ("progress", "phase_end") and "done" in e:
            self.parts[(e["phase"], e.get("part"))] = (e["done"], e.get("total"))
            if typ == "phase_end" and e["phase"] == "download" and e.get("part"):
                self.dl_done.add(e["part"])
        if typ == "phase_end" and "part" not in e:
            self.ended.add(e["phase"])

    def _frac(self, phase: str) -> float:
        if phase in self.ended:
            return 1.0
        total = self.totals.get(phase)
        parts = [(d, t) for (ph, part), (d, t) in self.parts.items() if ph == phase and part is not None]
        whole = self.parts.get((phase, None))
        done = sum(d for d, _ in parts) if parts else (whole[0] if whole else 0.0)
        if not total:
            return 0.0
        return min(done / total, 1.0)

    def fraction(self) -> float:
        if self.done:
            return 1.0
        names = [p["phase"] for p in (self.plan or {}).get("phases", [])]
        first = "upload" if "upload" in names else "prepare"
        proc = []
        for ph in ("upscale", "encode"):
            if ph in names:
                proc.append(self._frac(ph))
        if "download" in names:
            proc.append(1.0 if "download" in self.ended else len(self.dl_done) / max(self.segments, 1))
        f_proc = sum(proc) / len(proc) if proc else 0.0
        f_fin = 1.0 if "finalize" in self.ended else 0.0
        p = 0.10 * self._frac(first) + 0.85 * f_proc + 0.05 * f_fin
        self.p = max(self.p, min(p, 1.0))
        return self.p


class RichSpeed:
    """rich.progress.Task: samples of completed deltas, dropped after 30 s."""

    def __init__(self, period: float = 30.0) -> None:
        self.period = period
        self.samples: deque[tuple[float, float]] = deque(maxlen=1000)
        self.completed = 0.0

    def update(self, now: float, completed: float) -> None:
        delta = completed - self.completed
        self.completed = completed
        old = now - self.period
        while self.samples and self.samples[0][0] < old:
            self.samples.popleft()
        if delta > 0:
            self.samples.append((now, delta))

    def remaining(self) -> float | None:
        if self.completed >= 1.0:
            return 0.0
        if not self.samples:
            return None
        total_time = self.samples[-1][0] - self.samples[0][0]
        if total_time == 0:
            return None
        speed = sum(d for _, d in list(self.samples)[1:]) / total_time
        if not speed:
            return None
        return float(math.ceil((1.0 - self.completed) / speed))


class TqdmEma:
    """tqdm.std.tqdm with smoothing=0.3: EMAs of dn and dt, mininterval 0.1 s."""

    def __init__(self, start: float, smoothing: float = 0.3) -> None:
        self.alpha = smoothing
        self.dn = self.dt = 0.0
        self.calls = 0
        self.n = self.last_n = 0.0
        self.last_t = start
        self.start = start

    def update(self, now: float, n: float) -> None:
        if n <= self.n:
            return
        self.n = n
        dt = now - self.last_t
        if dt < 0.1:
            return
        dn = self.n - self.last_n
        if dt and dn:
            beta = 1 - self.alpha
            self.dn = self.alpha * dn + beta * self.dn
            self.dt = self.alpha * dt + beta * self.dt
            self.calls += 1
        self.last_n, self.last_t = self.n, now

    def remaining(self) -> float | None:
        if self.n >= 1.0:
            return 0.0
        if self.calls:
            rate = self.dn / self.dt if self.dt else 0.0
        else:
            elapsed = self.last_t - self.start
            rate = self.n / elapsed if elapsed > 0 else 0.0
        return (1.0 - self.n) / rate if rate > 0 else None


# -- metrics -------------------------------------------------------------------


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    if not n:
        return math.nan
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Score:
    def __init__(self) -> None:
        self.trace_mdape: list[float] = []
        self.within = 0
        self.samples = 0
        self.decreases = 0
        self.jumps: list[int] = []

    def add_trace(self, rows: list[tuple[float, float | None, float | None]], t0: float, t_end: float) -> None:
        """rows: (t, fraction, remaining) per event."""
        total = t_end - t0
        apes = []
        jumps = 0
        prev_rem = None
        prev_frac = None
        for t, frac, rem in rows:
            if frac is not None and prev_frac is not None and frac < prev_frac - 1e-12:
                self.decreases += 1
            prev_frac = frac if frac is not None else prev_frac
            left = t_end - t
            if left < MIN_LEFT_S or (t - t0) < MIN_DONE_SHARE * total:
                prev_rem = None
                continue
            ape = 1.0 if rem is None else abs(rem - left) / left
            apes.append(ape)
            self.within += ape <= 0.2
            self.samples += 1
            if rem is not None and prev_rem is not None and rem > JUMP * prev_rem:
                jumps += 1
            prev_rem = rem
        if apes:
            self.trace_mdape.append(_median(apes))
        self.jumps.append(jumps)


def _unseen_gpu(events: list[dict]) -> list[dict]:
    """The same trace, its GPU renamed to one no model has seen."""
    out = [dict(e) for e in events]
    for e in out:
        if e.get("type") == "plan":
            e["features"] = dict(e["features"], gpu="unseen-gpu")
    return out


def run(train: Path, dev: Path, model_path: Path | None, per_trace: bool = False) -> int:
    t_fit = time.perf_counter()
    if model_path:
        model = TimingModel.load(model_path)
        fit_s = 0.0
    else:
        model = fit_logs(sorted(train.glob("*.jsonl")))
        fit_s = time.perf_counter() - t_fit
    traces = sorted(dev.glob("*.jsonl"))

    t_rep = time.perf_counter()
    ours_rows: dict[str, list] = {}
    first_range: dict[str, tuple[float, float]] = {}  # the 80 % range shown at the plan
    for line in replay_traces(traces, model):
        ours_rows.setdefault(line["trace"], []).append((line["t"], line["fraction"], line["remaining_s"]))
        if "remaining_lo_s" in line:
            first_range.setdefault(line["trace"], (line["remaining_lo_s"], line["remaining_hi_s"]))
    replay_s = time.perf_counter() - t_rep

    scores = {name: Score() for name in ("learned", "fixed", "rich", "tqdm", "unseen-gpu")}
    upfront = []
    upfront_unseen = []
    covered: list[bool] = []
    for path in traces:
        events = list(read_events(path))
        plan = next(e for e in events if e["type"] == "plan")
        t0 = plan["t"]
        t_end = next(e["t"] for e in events if e["type"] == "done")
        est = estimate_plan(plan, model)["total_s"]
        upfront.append(abs(est - (t_end - t0)) / (t_end - t0))
        lo, hi = first_range.get(path.name, (math.nan, math.nan))
        covered.append(lo <= t_end - t0 <= hi)
        n_before = len(scores["learned"].trace_mdape)
        scores["learned"].add_trace(ours_rows[path.name], t0, t_end)
        if per_trace and len(scores["learned"].trace_mdape) == n_before:
            print(f"  {path.name}: {t_end - t0:.0f} s, no sample with 10 s left after 5 % of the job")
        elif per_trace:
            f = plan["features"]
            print(f"  {path.name}: {f.get('backend')} {f.get('gpu')} {f.get('model')} x{f.get('scale')} "
                  f"{f.get('frames')} frames, {t_end - t0:.0f} s: median error {scores['learned'].trace_mdape[-1]:.1%}, "
                  f"up-front {est - (t_end - t0):+.0f} s ({(est - (t_end - t0)) / (t_end - t0):+.0%})")
        unseen = _unseen_gpu(events)
        upfront_unseen.append(abs(estimate_plan(unseen[0], model)["total_s"] - (t_end - t0)) / (t_end - t0))
        scores["unseen-gpu"].add_trace(
            [(r["t"], r["fraction"], r["remaining_s"]) for r in replay_events(unseen, model, path.name)], t0, t_end
        )
        fw, rs, tq = FixedWeights(), RichSpeed(), TqdmEma(t0)
        rows = {"fixed": [], "rich": [], "tqdm": []}
        for e in events:
            fw.feed(e)
            p = fw.fraction()
            now = e["t"]
            elapsed = now - t0
            rows["fixed"].append((now, p, elapsed * (1 - p) / p if p > 0 else None))
            rs.update(now, p)
            rows["rich"].append((now, p, rs.remaining()))
            tq.update(now, p)
            rows["tqdm"].append((now, p, tq.remaining()))
        for name, r in rows.items():
            scores[name].add_trace(r, t0, t_end)

    header = f"{'estimator':<10} {'median':>8} {'p90':>8} {'within20':>9} {'up-front<=20%':>14} {'decreases':>10} {'jumps/trace':>12} {'max jumps':>10}"
    print(f"traces: train {train} (fit {fit_s:.2f} s), dev {dev}: {len(traces)} traces, replay {replay_s:.2f} s")
    print(header)
    print("-" * len(header))
    for name, s in scores.items():
        if name == "unseen-gpu":
            print("-" * len(header))
        ups = {"learned": upfront, "unseen-gpu": upfront_unseen}.get(name)
        up = f"{sum(u <= 0.2 for u in ups) / len(ups):.0%}" if ups else "n/a"
        print(
            f"{name:<10} {_median(s.trace_mdape):>8.1%} {_pct(s.trace_mdape, 0.9):>8.1%} "
            f"{s.within / max(s.samples, 1):>9.1%} {up:>14} {s.decreases:>10d} "
            f"{sum(s.jumps) / max(len(s.jumps), 1):>12.2f} {max(s.jumps, default=0):>10d}"
        )
    best = min(_median(s.trace_mdape) for n, s in scores.items() if n in ("fixed", "rich", "tqdm"))
    ours = _median(scores["learned"].trace_mdape)
    print(f"up-front error: median {_median(upfront):.1%}, p90 {_pct(upfront, 0.9):.1%}; "
          f"80 % range at the plan covers the truth in {sum(covered) / max(len(covered), 1):.0%} of traces")
    print(f"best baseline median / learned median: {best / ours:.2f}x" if ours > 0 else "learned median is 0")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=Path, default=TRACES / "train")
    ap.add_argument("--dev", type=Path, default=TRACES / "dev")
    ap.add_argument("--model", type=Path, default=None, help="use this model instead of fitting on --train")
    ap.add_argument("--per-trace", action="store_true", help="print each trace's error")
    args = ap.parse_args(argv)
    return run(args.train, args.dev, args.model, args.per_trace)


if __name__ == "__main__":
    raise SystemExit(main())
