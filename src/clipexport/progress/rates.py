"""Live rate smoothing: what the running job's own progress says of its speed.

A rate is the model's prior (log-normal) blended with the rate observed so
far, weighted by the evidence behind each (`blend`). Observed rates leave
out what is not rate: the latency before a stream's first byte, a fresh
container's warm-up, the few frames of one batch. A stall counts as time
with no progress, so the rate falls during one instead of freezing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .moment import Moment
from .segments import settle_point
from .state import PartState, PhaseState


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


def grace_of(p: PartState, base: float) -> float:
    """How long a part may go without progress before it counts as stalled: its event cadence, twice."""
    cadence = p.cadence
    return max(base, 2.0 * cadence) if cadence is not None else base


def stream_end(m: Moment, left: float, rate: float, base_t: float, grace: float) -> float:
    """When a stream with `left` units at `rate` ends; its latest progress was at `base_t`.

    Between progress events the time counts down; past `grace` without
    progress the stall adds to the remaining time, growing with the stall.
    """
    now = m.now
    need = left / rate if rate > 0 else math.inf
    quiet = now - base_t
    if quiet <= grace:
        end = base_t + need
    else:
        end = now + need - grace + m.settings.stall_growth * (quiet - grace)
    return max(end, now + min(need, 0.05) if need > 0 else now)


def stream_evidence(m: Moment, ph: PhaseState) -> tuple[float, float, float | None]:
    """(units done, seconds of work, latest progress time) over all parts and attempts."""
    now, grace = m.now, m.settings.grace_s
    done = time = 0.0
    last: float | None = None
    parts = list(ph.parts.values()) or [ph.whole]
    for p in parts:
        done += p.lost_done
        time += p.lost_time
        if p.start_t is None or p.served:
            continue  # not started, or served from earlier work: no time spent on it here
        done += p.done
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
            time += max(0.0, now - base - grace_of(p, grace))
            last = base if last is None else max(last, base)
    return done, time, last


def stream_rate(m: Moment, ph: PhaseState) -> tuple[float, float] | None:
    """(rate, evidence seconds) observed for a byte or unit stream; None before any."""
    return rate_of(stream_evidence(m, ph))


def rate_of(evidence: tuple[float, float, float | None]) -> tuple[float, float] | None:
    """(rate, evidence seconds) from `stream_evidence`'s answer; None before any."""
    done, time, _ = evidence
    if done <= 0 or time <= 0:
        return None
    return done / time, time


# -- time per frame of the GPU work ---------------------------------------------


@dataclass(frozen=True)
class FrameTime:
    """Seconds per frame of one container, as the estimate uses it."""

    spf: float  # the blend of prior and observation
    evidence_s: float  # seconds of steady work observed
    sd: float  # spread of log spf still open (narrows with evidence; the range reads it)
    observed: float | None  # the job's own frames per second, if any


def warm_excess(m: Moment, spf: float) -> float:
    """Extra seconds of a container's first segment (kernels tuned, caches filled): none after a probe."""
    w = m.model.section("upscale").get("warmup") or {}
    if not w or m.st.probe is not None:
        return 0.0
    return math.exp(float(w["a"]) + float(w["b"]) * math.log(max(spf, 1e-6)))


def grace_frames(m: Moment, spf: float) -> float:
    """Stall grace of a segment: a frame may take a while on a slow device."""
    return max(m.settings.grace_s, 2.0 * spf)


def _settled(m: Moment, p: PartState, warm: bool) -> tuple[float, float] | None:
    """The (t, done) from which the part's rate is measured: past the warm-up."""
    if not warm:
        skip = 0.0
    elif m.settings.settle_frames is not None:
        skip = m.settings.settle_frames
    else:
        skip = m.model.constant("upscale", "settle_frames")
    probed = m.st.probe is not None  # the probe's untimed pass took the warm-up
    return settle_point(p, skip, m.settings.settle_samples if probed else None)


Stretch = tuple[float, float, float]  # (end t, seconds, frames) of steady work


def _part_stretches(m: Moment, p: PartState, warm: bool, warm_prior: float) -> list[Stretch]:
    """A segment's steady work between its samples, past its warm-up, in time order."""
    base = _settled(m, p, warm)
    if p.ended and (base is None or p.end_t is None or p.end_t <= base[0] or p.done <= base[1]):
        if p.done <= 0:
            return []
        # no steady stretch to measure: its whole span, less the overhead and the prior's warm-up
        overhead = m.model.constant("upscale", "overhead_s")
        span = (p.end_t or 0) - (p.start_t or 0) - overhead - (warm_prior if warm else 0.0)
        return [(p.end_t or 0.0, max(0.0, span), p.done)]
    if base is None:
        return []
    samples = sorted(set(p.early + p.recent))
    if p.ended:
        samples = [s for s in samples if s[0] < p.end_t] + [(p.end_t, p.done)]  # type: ignore[operator]
    out = []
    t0, d0 = base
    for t, d in samples:
        if t > t0:
            out.append((t, t - t0, max(0.0, d - d0)))
            t0, d0 = t, max(d, d0)
    return out


def _noise(stretches: list[Stretch]) -> float:
    """Spread of the stretches' own rates around the mean (log scale, roughly): what one stretch says is noisy."""
    frames = sum(f for _, _, f in stretches)
    secs = sum(t for _, t, _ in stretches)
    rel = [(f / t) / (frames / secs) for _, t, f in stretches if t > 0]
    if len(rel) < 2:
        return 0.0
    mean = sum(rel) / len(rel)
    return math.sqrt(sum((r - mean) ** 2 for r in rel) / (len(rel) - 1))


def _since_change(m: Moment, stretches: list[Stretch]) -> int:
    """Index of the first stretch to measure the rate on: 0 (all the steady work), or the first after a change of speed.

    A machine that slows down halfway (another process takes a core) or
    speeds up again: the split of the work, in time order, where the rate
    after differs from the rate before by more than `change_ratio` and by
    more than the stretches' own noise allows (`change_z` standard errors),
    each side holding enough work to be a rate; the likeliest such split (the
    largest gain in Poisson log-likelihood) wins.
    """
    s = m.settings
    frames = sum(f for _, _, f in stretches)
    secs = sum(t for _, t, _ in stretches)
    if frames <= 0 or secs <= 0:
        return 0
    noise = _noise(stretches)
    best, gain = 0, 0.0
    fa = ta = 0.0
    for k in range(len(stretches) - 1, 0, -1):
        _, t, f = stretches[k]
        fa, ta = fa + f, ta + t
        fb, tb = frames - fa, secs - ta
        na, nb = len(stretches) - k, k
        if tb < s.change_min_s or nb < s.change_min_samples:
            break
        if ta < s.change_min_s or na < s.change_min_samples or fa < s.change_min_frames or fb <= 0:
            continue
        jump = abs(math.log((fa / ta) / (fb / tb)))
        if jump < math.log(s.change_ratio) or jump < s.change_z * noise * math.sqrt(1 / na + 1 / nb):
            continue
        g = fa * math.log(fa / ta) + fb * math.log(fb / tb) - frames * math.log(frames / secs)
        if g > gain:
            best, gain = k, g
    return best


def _frames_seen(m: Moment, up: PhaseState, firsts: set[str], grace: float, warm_prior: float) -> tuple[float, float]:
    """(frames, seconds) of steady work to measure the rate on; stalls of running segments count as time.

    Work of earlier attempts (cut short, redone since) counts as the oldest.
    """
    overhead = m.model.constant("upscale", "overhead_s")
    lost_done = lost_time = stalled = 0.0
    stretches: list[Stretch] = []
    for key, p in up.parts.items():
        if p.lost_done > 0:
            lost_done += p.lost_done
            lost_time += max(0.0, p.lost_time - overhead)
        if p.start_t is None or p.served:
            continue  # not started, or a segment served from earlier work: no rate in it
        stretches += _part_stretches(m, p, key in firsts, warm_prior)
        if not p.ended:
            last = p.last_t if p.last_t is not None else p.start_t
            stalled += max(0.0, m.now - last - grace_of(p, grace))
    stretches.sort()
    if lost_done > 0:
        stretches.insert(0, (-math.inf, lost_time, lost_done))
    if not stretches:
        return 0.0, stalled
    kept = stretches[_since_change(m, stretches):]
    done, time = sum(f for _, _, f in kept), sum(t for _, t, _ in kept)
    return _recent_weighted(m, kept, done, time), time + stalled


def _recent_weighted(m: Moment, kept: list[Stretch], done: float, time: float) -> float:
    """`done` rescaled so that done / time is the rate with recent stretches weighted more (a drifting machine).

    Each stretch counts half as much per `recent_share` of the work's span it
    lies in the past; the evidence (seconds) stays the plain sum.
    """
    share = m.settings.recent_share
    first = next((t for t, _, _ in kept if math.isfinite(t)), None)
    if share <= 0 or first is None or time <= 0:
        return done
    half = max(m.settings.recent_min_s, share * (m.now - first))
    fw = tw = 0.0
    for t_end, t, f in kept:
        w = 0.5 ** ((m.now - t_end) / half) if math.isfinite(t_end) else 0.0
        fw, tw = fw + w * f, tw + w * t
    return time * fw / tw if tw > 0 and fw > 0 else done


def frame_time(m: Moment, up: PhaseState, firsts: set[str]) -> FrameTime:
    """The job's seconds per frame: the prior (probe, or model) blended with its steady frames.

    `firsts` are the segments that carried their worker's warm-up.
    """
    s = m.settings
    mu, sd = m.model.spf(m.f, m.st.probe)
    mu -= s.skew * sd * sd
    done, time = _frames_seen(m, up, firsts, grace_frames(m, math.exp(mu)), warm_excess(m, math.exp(mu)))
    obs = math.log(time / done) if done > 0 and time > 0 else None
    # frames leave the model in batches: a few frames' rate is a burst's, so
    # evidence counts fully only past a few batches' worth of frames
    evidence = time * done / (done + s.batch_frames) if done > 0 else 0.0
    log_spf = blend(mu, sd, obs, evidence, s.tau_spf)
    sd_wide = max(sd, abs(obs - mu) / 2.0, 1e-3) if obs is not None else sd
    k = s.tau_spf / sd_wide**2
    sd_left = sd_wide * math.sqrt(k / (evidence + k)) if evidence > 0 else sd
    return FrameTime(math.exp(log_spf), time, sd_left, done / time if obs is not None else None)


# -- downloads -------------------------------------------------------------------


def download_rate(m: Moment, dl: PhaseState) -> tuple[float, tuple[float, float] | None]:
    """(bytes per second of the downloads to come, the observed (rate, evidence) if any).

    Until downloads are seen the prior follows the upload's observed rate:
    a slow uplink predicts a slow downlink.
    """
    upload = m.st.phases.get("upload")
    up_obs = stream_rate(m, upload) if upload is not None else None
    if up_obs is not None:
        weight = up_obs[1] / (up_obs[1] + 1.0)
        mu, sd = m.model.download_rate(up_obs[0], weight)
    else:
        mu, sd = m.model.download_rate(None)
    skew = m.settings.skew if m.settings.skew_download is None else m.settings.skew_download
    mu += skew * sd * sd
    obs = stream_rate(m, dl)
    log_rate = blend(mu, sd, math.log(obs[0]) if obs else None, obs[1] if obs else 0.0, m.settings.tau_download)
    return math.exp(log_rate), obs
