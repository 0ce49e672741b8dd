"""Remaining time of a job, from its state, a timing model and an explicit `now`.

Pure: no clock, no thread, no I/O. `Estimator.estimate(state, now)` walks the
job's pipeline forward from `now`:

1. *sequential phases before the GPU* (prepare, upload): work left over a rate
   that blends the observed rate with the model's prior, weighted by the
   evidence behind each (seconds observed against the prior's spread);
2. *containers* (queue, load_model): when each GPU container will be ready.
   A waiting container's remaining wait is the prior distribution conditioned
   on the time already waited (warm and cold starts are a mixture; the k-th
   container is warm with the model's probability, updated by what the other
   containers showed); containers not requested yet follow the prior;
3. *segments* (upscale, encode, download): a small simulation. Each container
   takes the next segment when free, at the job's time per frame (the prior
   for this GPU, model and resolution, scaled by what this job shows);
   encoding ends a flush after upscaling; finished segments are downloaded
   one after another at the download rate (predicted from the upload rate
   until downloads are seen: a slow uplink predicts a slow downlink);
4. *finalize*: the model's time for the output size, conditioned on time spent.

A stall counts as no progress: past a grace period without progress, the
remaining time of the stalled work grows with the stall instead of freezing.
Phases the model does not know are counted with their own observed rate.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

from .model import Dist, TimingModel
from .segments import container_kind, first_on_worker, settle_point
from .state import JobState, PartState, PhaseState

PRE = ("prepare", "upload")
START = ("queue", "load_model")
WORK = ("upscale", "encode", "download")
POST = ("finalize",)
KNOWN = PRE + START + WORK + POST
Z80 = 1.2816  # the normal quantile at 90 %: 80 % of the mass lies within +-Z80 sd


@dataclass(frozen=True)
class Estimate:
    """What the estimator says at one instant."""

    remaining_s: float | None  # None: nothing to go on
    phases: dict[str, float] = field(default_factory=dict)  # remaining seconds attributed to each phase
    rates: dict[str, float] = field(default_factory=dict)  # observed rate of each phase, unit per second
    remaining_lo_s: float | None = None  # the 80 % range of remaining_s: 10 % of jobs end sooner,
    remaining_hi_s: float | None = None  # 10 % later


def blend(log_prior: float, sd_prior: float, log_obs: float | None, evidence_s: float, tau_s: float) -> float:
    """Log-rate blended by evidence: w = T / (T + tau / sd^2).

    `tau_s` is the observation time worth as much as a prior of sd 1; a tight
    prior (small sd) needs more observed time to move. The prior is heavy
    tailed: an observation far from it (the prior is plainly wrong: other
    hardware, another network) widens it, so the job's own rate takes over.
    """
    if log_obs is None or evidence_s <= 0:
        return log_prior
    sd = max(sd_prior, abs(log_obs - log_prior) / 2.0, 1e-3)
    k = tau_s / sd**2
    w = evidence_s / (evidence_s + k)
    return w * log_obs + (1.0 - w) * log_prior


class Estimator:
    """Remaining-time estimator; one per job or shared, it keeps no job state."""

    def __init__(
        self,
        model: TimingModel | None = None,
        *,
        grace_s: float = 2.5,
        stall_growth: float = 0.5,
        min_remaining_s: float = 1.0,
        tau_spf: float = 0.05,
        tau_upload: float = 0.3,
        tau_download: float = 0.5,
        skew: float = 0.5,
        settle_frames: float | None = None,
        scenarios: bool = True,
        skew_download: float | None = None,
        settle_samples: int = 1,
        batch_frames: float = 8.0,
        range_scale: float = 2.5,
        range_floor: float = 0.03,
        range_default_sd: float = 0.3,
    ) -> None:
        self.range_scale = range_scale
        self.batch_frames = batch_frames
        self.range_floor = range_floor
        self.range_default_sd = range_default_sd
        self.settle_samples = settle_samples
        self.skew_download = skew if skew_download is None else skew_download
        self.settle_frames = settle_frames
        self.scenarios = scenarios
        self.skew = skew
        self.tau_spf = tau_spf
        self.tau_upload = tau_upload
        self.tau_download = tau_download
        self.model = model or TimingModel.default()
        self.grace_s = grace_s
        self.stall_growth = stall_growth
        self.min_remaining_s = min_remaining_s

    # -- entry point -------------------------------------------------------

    def estimate(self, st: JobState, now: float) -> Estimate:
        if st.terminal == "done":
            return Estimate(0.0)
        run = _Run(self, st, now)
        return run.go()

    # -- helpers shared with _Run -------------------------------------------

    def stream_end(self, left: float, rate: float, base_t: float, now: float, grace: float) -> float:
        """When a stream with `left` units at `rate` ends; its latest progress was at `base_t`.

        Between progress events the time counts down; past `grace` without
        progress the stall adds to the remaining time, growing with the stall.
        """
        need = left / rate if rate > 0 else math.inf
        quiet = now - base_t
        if quiet <= grace:
            end = base_t + need
        else:
            end = now + need - grace + self.stall_growth * (quiet - grace)
        return max(end, now + min(need, 0.05) if need > 0 else now)


class _Run:
    """One estimate: the state at `now` walked forward through the pipeline."""

    def __init__(self, est: Estimator, st: JobState, now: float) -> None:
        self.est = est
        self.model = est.model
        self.st = st
        self.now = now
        self.f: dict[str, Any] = st.features or {}
        self.attr: dict[str, float] = {}
        self.rates: dict[str, float] = {}
        self.observed_upload: tuple[float, float] | None = None  # (rate, evidence s)
        self.out_bytes_total: float | None = None  # predicted size of the output, for finalize
        self.spf_sd = est.range_default_sd  # spread of log time per frame still open (no GPU work seen yet)

    def add(self, phase: str, seconds: float) -> None:
        if seconds > 0:
            self.attr[phase] = self.attr.get(phase, 0.0) + seconds

    # -- the walk ------------------------------------------------------------

    def go(self) -> Estimate:
        st, now = self.st, self.now
        names = list(st.order)
        if not names:
            return Estimate(None)
        later_started = self._later_started(names)
        cursor = now
        known_any = False
        # 1. sequential phases before the GPU
        for i, name in enumerate(names):
            if name in START or name in WORK or name in POST:
                continue
            if name not in PRE and self._index_of_first_work(names) < i:
                continue  # an unknown phase after the GPU work: handled at the end
            ph = st.phases[name]
            if ph.ended or later_started[i]:
                self._rate_of_stream(ph, name)  # still evidence (upload rate)
                continue
            rem = self._stream_phase(ph, name, cursor)
            if rem is None:
                continue
            known_any = True
            self.add(name, rem)
            cursor += rem + (self.model.constant("upload", "gap_s") if name in PRE else 0.0)
        # 2 + 3 + 4. containers, segments, finalize. While the first GPU
        # container's fate is open (a warm start in seconds, or a cold one in
        # half a minute), both futures are walked and the one that minimises
        # the expected relative error is kept: the likelier, unless the
        # other is much shorter.
        p_first = self._first_warm_probability() if self.est.scenarios else None
        if p_first is None:
            end, used = self._after(cursor, names, None)
        else:
            base_attr = dict(self.attr)
            end_w, used = self._after(cursor, names, "warm")
            attr_w, self.attr = self.attr, dict(base_attr)
            end_c, _ = self._after(cursor, names, "cold")
            r_w, r_c = max(end_w - now, 1.0), max(end_c - now, 1.0)
            if p_first / r_w >= (1.0 - p_first) / r_c:
                end, self.attr = end_w, attr_w
            else:
                end = end_c
        known_any = known_any or used
        if not known_any:
            return Estimate(None, rates=self.rates)
        remaining = max(end - now, self.est.min_remaining_s)
        lo, hi = self._range(remaining)
        return Estimate(remaining, dict(self.attr), dict(self.rates), lo, hi)

    def _range(self, remaining: float) -> tuple[float, float]:
        """The 80 % range around `remaining`: log-normal, as wide as what is still uncertain.

        The spread is the time-per-frame prior's, narrowed by the evidence
        as the blend weighs it (sd x sqrt(1 - w)), over a floor for what no
        prior states (machine noise, the tail of a job); calibrated on the
        reference traces (`bench/eta_accuracy.py` prints the coverage).
        """
        s = math.hypot(self.spf_sd * self.est.range_scale, self.est.range_floor)
        return max(remaining * math.exp(-Z80 * s), 0.0), remaining * math.exp(Z80 * s)

    def _after(self, cursor: float, names: list[str], first: str | None) -> tuple[float, bool]:
        """(end of the job, anything estimated) from `cursor`: GPU work, then what follows."""
        st, now = self.st, self.now
        end, known_any = self._work(cursor, first)
        for i, name in enumerate(names):
            ph = st.phases[name]
            if name in POST:
                rem = self._finalize(ph, end)
                if rem is not None:
                    known_any = True
                    start = max(end, now)
                    self.add(name, start + rem - max(end, now))
                    end = start + rem
            elif name not in KNOWN and self._index_of_first_work(names) < i and not ph.ended:
                rem = self._stream_phase(ph, name, end)
                if rem is not None:
                    known_any = True
                    self.add(name, rem)
                    end = max(end, now) + rem
        return end, known_any

    def _first_warm_probability(self) -> float | None:
        """P(the first container starts warm), while that is still open; else None."""
        queue = self.st.phases.get("queue")
        up = self.st.phases.get("upscale")
        if queue is None or (up is not None and up.parts):
            return None
        conts = sorted((p for p in queue.parts.values() if p.start_t is not None), key=lambda p: p.start_t)
        if not conts:
            return self.model.p_warm(1) if not queue.ended else None
        first = conts[0]
        if first.ended or self._kind(first, self.st.phases.get("load_model")) is not None:
            return None
        waited = self.now - (first.start_t or self.now)
        pw = self.model.p_warm(1)
        sw, sc = self.model.warm_wait().survival(waited), self.model.cold_wait().survival(waited)
        den = pw * sw + (1 - pw) * sc
        return pw * sw / den if den > 1e-12 else None

    def _index_of_first_work(self, names: list[str]) -> int:
        for i, name in enumerate(names):
            if name in START or name in WORK or name in POST:
                return i
        return len(names)

    def _later_started(self, names: list[str]) -> list[bool]:
        """For each phase: has a phase planned after it already started?

        The phases before the GPU run one after another, so a later phase
        under way means the earlier one is over even if its end was lost.
        """
        out = [False] * len(names)
        seen = False
        for i in range(len(names) - 1, -1, -1):
            out[i] = seen
            seen = seen or self.st.phases[names[i]].started
        return out

    # -- byte streams: prepare, upload, unknown phases -------------------------

    def _evidence(self, ph: PhaseState) -> tuple[float, float, float | None]:
        """(units done, seconds of work, latest progress time) over all parts and attempts."""
        now, grace = self.now, self.est.grace_s
        done = time = 0.0
        last: float | None = None
        parts = list(ph.parts.values()) or [ph.whole]
        for p in parts:
            done += p.done + p.lost_done
            time += p.lost_time
            if p.start_t is None:
                continue
            if p.ended:
                time += max(0.0, p.end_t - p.start_t)  # type: ignore[operator]
                last = p.end_t if last is None else max(last, p.end_t)  # type: ignore[type-var]
            else:
                # a running part: its rate since its first progress (the
                # latency before the first byte is not rate), and any stall
                base = p.last_t if p.last_t is not None else p.start_t
                done -= p.done
                if p.first_t is not None and p.last_t is not None and p.last_t > p.first_t:
                    done += p.done - p.first_done
                    time += p.last_t - p.first_t
                time += max(0.0, now - base - self._grace(p, grace))
                last = base if last is None else max(last, base)
        return done, time, last

    def _rate_of_stream(self, ph: PhaseState, name: str) -> tuple[float, float] | None:
        """(rate, evidence seconds) observed for a byte or unit stream."""
        done, time, _ = self._evidence(ph)
        if done <= 0 or time <= 0:
            return None
        rate = done / time
        self.rates[name] = rate
        if name == "upload":
            self.observed_upload = (rate, time)
        return rate, time

    def _stream_phase(self, ph: PhaseState, name: str, cursor: float) -> float | None:
        """Remaining seconds of a sequential counted phase starting at `cursor`."""
        total = ph.known_total
        done = ph.done
        obs = self._rate_of_stream(ph, name)
        if name == "upload":
            mu, sd = self.model.upload_rate(total)
            mu += self.est.skew * sd * sd
            tau = self.est.tau_upload
        elif name == "prepare":
            mu, sd = self.model.prepare_rate()
            tau = 0.3
        else:
            if not ph.started:
                return None  # an unknown phase not started: no prior
            if obs is None or total is None:
                return max(self.now - (ph.start_t or self.now), 1.0)
            mu, sd, tau = math.log(obs[0]), 1.0, 0.0
        if total is None:
            return None if not ph.started else 1.0
        log_rate = blend(mu, sd, math.log(obs[0]) if obs else None, obs[1] if obs else 0.0, tau)
        rate = math.exp(log_rate)
        left = max(total - done, 0.0)
        if not ph.started:
            return left / rate
        _, _, last = self._evidence(ph)
        base = last if last is not None else (ph.start_t if ph.start_t is not None else self.now)
        running = [p for p in (list(ph.parts.values()) or [ph.whole]) if p.started and not p.ended]
        grace = max([self._grace(p, self.est.grace_s) for p in running] or [self.est.grace_s])
        end = self.est.stream_end(left, rate, base, self.now, grace)
        return max(end - self.now, 0.0)

    # -- containers ------------------------------------------------------------

    def _container_count(self, n_segments: int) -> int:
        par = self.f.get("parallel")
        par = int(par) if isinstance(par, (int, float)) and not isinstance(par, bool) and par >= 1 else 1
        if "queue" not in self.st.phases:
            return 1
        return max(1, min(par, max(n_segments, 1)))

    def _containers(
        self, cursor: float, n_wanted: int, busy: dict[str, float], workers: set[str], first: str | None = None
    ) -> list[tuple[float, bool]]:
        """(time free for a new segment, warmed up) of each container.

        `busy` maps the workers running a segment to its predicted end;
        `workers` names every worker that has run a segment (warmed up).
        """
        st, now, model = self.st, self.now, self.model
        load = model.load_time(self.f)
        queue = st.phases.get("queue")
        loadph = st.phases.get("load_model")
        if queue is None:
            # one local worker, ready once the model is loaded
            if busy:
                return [(t, True) for t in sorted(busy.values())]
            if loadph is None or loadph.ended or workers:
                return [(max(cursor, now), bool(workers))]
            if loadph.started:
                rem = load.remaining(now - (loadph.start_t or now))
                self.add("load_model", rem)
                return [(now + rem, False)]
            rem = load.mean()
            self.add("load_model", rem)
            return [(cursor + rem, False)]

        free: list[tuple[float, bool]] = []
        warm, cold = model.warm_wait(), model.cold_wait()
        conts = sorted(queue.parts.values(), key=lambda p: (p.start_t if p.start_t is not None else math.inf))
        # what the containers seen so far say about the number of warm GPUs
        lo, hi = 0, math.inf
        for k, c in enumerate(conts, start=1):
            kind = self._kind(c, loadph)
            if kind == "warm":
                lo = max(lo, k)
            elif kind == "cold":
                hi = min(hi, k)
        if first == "warm":
            lo = max(lo, 1)
        elif first == "cold":
            hi = min(hi, 1)

        def p_warm(k: int) -> float:
            if k <= lo:
                return 1.0
            if k >= hi:
                return 0.0
            s_k = model.p_warm(k)
            s_lo = model.p_warm(lo) if lo >= 1 else 1.0
            s_hi = model.p_warm(int(hi)) if hi != math.inf else 0.0
            den = s_lo - s_hi
            return min(max((s_k - s_hi) / den, 0.0), 1.0) if den > 1e-9 else 0.5

        first_ready = math.inf
        for k, c in enumerate(conts, start=1):
            name = c.key or ""
            lp = loadph.parts.get(name) if loadph else None
            if c.detail == "cancelled" or (lp is not None and lp.detail == "cancelled"):
                continue
            if name in busy:
                free.append((busy[name], True))
                continue
            if c.ended:
                if lp is not None and lp.ended:
                    t_ready = max(now, lp.end_t or now)
                elif lp is not None and lp.started:
                    t_ready = now + load.remaining(now - (lp.start_t or now))
                elif self._kind(c, loadph) == "cold":
                    t_ready = max(now, (c.end_t or now)) + load.remaining(now - (c.end_t or now))
                else:
                    t_ready = max(now, c.end_t or now)
            else:
                waited = now - (c.start_t if c.start_t is not None else now)
                pw = p_warm(k)
                sw, sc = warm.survival(waited), cold.survival(waited)
                den = pw * sw + (1 - pw) * sc
                post = pw * sw / den if den > 1e-12 else 0.0
                rem = post * warm.remaining(waited) + (1 - post) * (cold.remaining(waited) + load.mean())
                t_ready = now + rem
            free.append((t_ready, name in workers))
            first_ready = min(first_ready, t_ready)
        # containers not requested yet
        known = len(conts)
        stagger = model.constant("queue", "stagger_s")
        for k in range(known + 1, n_wanted + 1):
            pw = p_warm(k)
            if queue.started:
                start = max(now, queue.start_t or now) + stagger * (k - known - 1)
            else:
                start = cursor + model.constant("queue", "gap_s") + stagger * (k - 1)
            t_ready = start + pw * warm.mean() + (1 - pw) * (cold.mean() + load.mean())
            free.append((t_ready, False))
            first_ready = min(first_ready, t_ready)
        if not free:
            free.append((max(cursor, now) + warm.mean(), False))
        if not busy and first_ready < math.inf:
            # the wait for the first container is the queue's (and load's) share
            self.add("queue", max(0.0, first_ready - max(cursor, now)))
        return sorted(free)

    def _kind(self, c: PartState, loadph: PhaseState | None) -> str | None:
        """'warm' or 'cold' once known, from the queue end detail or what followed."""
        kind = container_kind(c, loadph)
        if kind is not None:
            return kind
        if c.ended:
            return "warm" if (c.end_t or 0) - (c.start_t or 0) <= self.model.warm_wait().q[-1] else "cold"
        if c.start_t is not None and self.now - c.start_t > self.model.warm_wait().q[-1]:
            return "cold"
        return None

    # -- segments ----------------------------------------------------------------

    def _settled(self, p: PartState, warm: bool) -> tuple[float, float] | None:
        """The (t, done) from which the part's rate is measured: past the warm-up."""
        if not warm:
            skip = 0.0
        elif self.est.settle_frames is not None:
            skip = self.est.settle_frames
        else:
            skip = self.model.constant("upscale", "settle_frames")
        probed = self.st.probe is not None  # the probe's untimed pass took the warm-up
        return settle_point(p, skip, self.est.settle_samples if probed else None)

    def _spf(self, up: PhaseState, firsts: set[str]) -> tuple[float, float]:
        """(seconds per frame of one container, evidence seconds)."""
        mu, sd = self.model.spf(self.f, self.st.probe)
        mu -= self.est.skew * sd * sd
        overhead = self.model.constant("upscale", "overhead_s")
        grace = self._grace_frames(math.exp(mu))
        warm_prior = self._warm_excess(math.exp(mu))
        done = time = 0.0
        for key, p in up.parts.items():
            if p.lost_done > 0:
                done += p.lost_done
                time += max(0.0, p.lost_time - overhead)
            if p.start_t is None:
                continue
            warm = key in firsts
            base = self._settled(p, warm)
            if p.ended:
                if base is not None and p.end_t is not None and p.end_t > base[0] and p.done > base[1]:
                    time += p.end_t - base[0]
                    done += p.done - base[1]
                elif p.done > 0:
                    time += max(0.0, (p.end_t or 0) - p.start_t - overhead - (warm_prior if warm else 0.0))
                    done += p.done
            else:
                last = p.last_t if p.last_t is not None else p.start_t
                if base is not None and p.last_t is not None and p.last_t > base[0]:
                    time += p.last_t - base[0]
                    done += max(0.0, p.done - base[1])
                time += max(0.0, self.now - last - self._grace(p, grace))
        if done > 0 and time > 0:
            obs = math.log(time / done)
            self.rates["upscale"] = done / time
        else:
            obs = None
        # frames leave the model in batches: a few frames' rate is a burst's, so
        # evidence counts fully only past a few batches' worth of frames
        evidence = time * done / (done + self.est.batch_frames) if done > 0 else 0.0
        log_spf = blend(mu, sd, obs, evidence, self.est.tau_spf)
        sd_wide = max(sd, abs(obs - mu) / 2.0, 1e-3) if obs is not None else sd
        k = self.est.tau_spf / sd_wide**2
        self.spf_sd = sd_wide * math.sqrt(k / (evidence + k)) if evidence > 0 else sd
        return math.exp(log_spf), time

    def _warm_excess(self, spf: float) -> float:
        """Extra seconds of a container's first segment (kernels tuned, caches filled): none after a probe."""
        w = self.model.section("upscale").get("warmup") or {}
        if not w or self.st.probe is not None:
            return 0.0
        return math.exp(float(w["a"]) + float(w["b"]) * math.log(max(spf, 1e-6)))

    def _warm_left(self, spf: float, done: float) -> float:
        decay = self.model.constant("upscale", "warmup_frames")
        return self._warm_excess(spf) * math.exp(-done / max(decay, 1e-3))

    def _grace_frames(self, spf: float) -> float:
        return max(self.est.grace_s, 2.0 * spf)

    def _grace(self, p: PartState, base: float) -> float:
        """How long a part may go without progress before it counts as stalled."""
        cadence = p.cadence
        return max(base, 2.0 * cadence) if cadence is not None else base

    def _segments(self, up: PhaseState) -> tuple[list[tuple[str, float]], int]:
        """Segments not started yet, as (name, frames), and the count of all segments."""
        total = up.known_total
        if total is None:
            frames = self.f.get("frames")
            total = float(frames) if isinstance(frames, (int, float)) else None
        nseg = self.f.get("segments")
        seg = self.f.get("segment_frames")
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

    def _work(self, cursor: float, first: str | None = None) -> tuple[float, bool]:
        """(time the GPU work and downloads end, whether anything was estimated)."""
        st, now, model = self.st, self.now, self.model
        up = st.phases.get("upscale")
        enc = st.phases.get("encode")
        dl = st.phases.get("download")
        start_cursor = max(cursor, now)
        if up is None:
            # no counted GPU work: only waiting phases, if any
            end = start_cursor
            for name in START:
                ph = st.phases.get(name)
                if ph is not None and not ph.ended:
                    rem = self._waiting_alone(ph)
                    self.add(name, rem)
                    end += rem
            return end, any(n in st.phases for n in START)
        if up.ended and (enc is None or enc.ended) and (dl is None or dl.ended):
            return start_cursor, True
        firsts = first_on_worker(up)
        spf, _ = self._spf(up, firsts)
        grace = self._grace_frames(spf)
        overhead = model.constant("upscale", "overhead_s")
        seg_gap = model.constant("upscale", "gap_s")
        flush = model.constant("encode", "flush_s")
        warm_full = self._warm_excess(spf)
        pending, nseg = self._segments(up)

        # running segments keep their container busy
        busy: dict[str, float] = {}
        up_end: dict[str, float] = {}  # predicted or actual upscale end of each segment
        frames: dict[str, float] = {}
        anon = 0
        for key, p in up.parts.items():
            n = p.total if p.total is not None else (pending[0][1] if pending else 1.0)
            frames[key] = n
            if p.ended:
                up_end[key] = p.end_t  # type: ignore[assignment]
                continue
            if p.start_t is None:
                continue
            left = max(n - p.done, 0.0)
            warm = self._warm_left(spf, p.done) if key in firsts else 0.0
            if p.last_t is not None:
                end = self.est.stream_end(left + warm / spf, 1.0 / spf, p.last_t, now, self._grace(p, grace))
            else:
                end = self.est.stream_end(left + warm / spf, 1.0 / spf, p.start_t + overhead, now, grace + overhead)
            up_end[key] = end
            worker = p.worker or f"#anon{anon}"
            anon += 1
            busy[worker] = max(busy.get(worker, now), end)
        if up.ended:
            pending = []
        n_cont = self._container_count(nseg)
        workers = {p.worker for p in up.parts.values() if p.worker} or ({"#local"} if up.parts else set())
        heap = self._containers(cursor, n_cont, busy, workers, first)[: max(n_cont, len(busy))]
        heapq.heapify(heap)
        first_free = heap[0][0] if heap else start_cursor
        for name, n in pending:
            t, hot = heapq.heappop(heap) if heap else (start_cursor, True)
            t = max(t, now)
            end = t + seg_gap + overhead + n * spf + (0.0 if hot else warm_full)
            up_end[name] = end
            frames[name] = n
            heapq.heappush(heap, (end, True))
        last_up = max([v for v in up_end.values()] + [now])
        work_start = now if busy else max(min(first_free, last_up), now)
        if up_end and not up.ended:
            self.add("upscale", max(0.0, last_up - work_start))

        # encode ends a flush after upscale
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
        if enc is not None and not enc.ended and enc_end:
            last_enc = max(enc_end.values())
            self.add("encode", max(0.0, last_enc - max(last_up, now)))
        end = max([now, last_up] + list(enc_end.values()))

        # output size: known per segment, else frames x bytes per frame
        bpf = self._bytes_per_frame(enc, dl, frames, out_bytes)
        self.out_bytes_total = 0.0
        for key, n in frames.items():
            b = out_bytes.get(key)
            if b is None and dl is not None and key in dl.parts and dl.parts[key].total is not None:
                b = dl.parts[key].total
            if b is None:
                b = n * bpf
            out_bytes[key] = b
            self.out_bytes_total += b
        if not up.parts and not frames and up.known_total:
            self.out_bytes_total = up.known_total * bpf

        # downloads, one after another in the order segments finish
        if dl is not None and not dl.ended:
            rate = self._download_rate(dl)
            latency = model.constant("download", "latency_s")
            free_t = now
            queue_ = []
            for key, t_enc in enc_end.items():
                part = dl.parts.get(key)
                if part is not None and part.ended:
                    continue
                if part is not None and part.started:
                    b = part.total if part.total is not None else out_bytes[key]
                    base = part.last_t if part.last_t is not None else (part.start_t or now)
                    free_t = max(free_t, self.est.stream_end(max(b - part.done, 0.0), rate, base, now, self._grace(part, self.est.grace_s)))
                else:
                    queue_.append((t_enc, out_bytes[key]))
            queue_.sort()
            for t_enc, b in queue_:
                free_t = max(free_t, t_enc + latency) + b / rate
            if free_t > end:
                self.add("download", free_t - end)
                end = free_t
        return end, True

    def _bytes_per_frame(self, enc, dl, frames: dict[str, float], out_bytes: dict[str, float]) -> float:
        mu, sd = self.model.bytes_per_frame(self.f)
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

    def _download_rate(self, dl: PhaseState) -> float:
        up_obs = self.observed_upload
        if up_obs is None and "upload" in self.st.phases:
            self._rate_of_stream(self.st.phases["upload"], "upload")
            up_obs = self.observed_upload
        if up_obs is not None:
            weight = up_obs[1] / (up_obs[1] + 1.0)
            mu, sd = self.model.download_rate(up_obs[0], weight)
        else:
            mu, sd = self.model.download_rate(None)
        mu += self.est.skew_download * sd * sd
        obs = self._rate_of_stream(dl, "download")
        log_rate = blend(mu, sd, math.log(obs[0]) if obs else None, obs[1] if obs else 0.0, self.est.tau_download)
        return math.exp(log_rate)

    def _waiting_alone(self, ph: PhaseState) -> float:
        dist: Dist = self.model.load_time(self.f) if ph.name == "load_model" else self.model.cold_wait()
        if ph.started:
            return dist.remaining(self.now - (ph.start_t or self.now))
        return dist.mean()

    # -- finalize ------------------------------------------------------------------

    def _finalize(self, ph: PhaseState, work_end: float) -> float | None:
        if ph.ended:
            return None
        prior = self.model.finalize_time(self.f, self.out_bytes_total)
        if ph.started:
            spent = self.now - (ph.start_t or self.now)
            return max(prior - spent, Dist.TAIL_SHARE * spent, 0.1)
        return prior + self.model.constant("upscale", "gap_s")
