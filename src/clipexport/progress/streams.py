"""Sequential counted phases (prepare, upload, phases the model does not know): their remaining time.

Work left over a rate: the model's prior blended with the rate the phase
shows (`rates.blend`). A phase the model has no prior for is counted with
its own observed rate, and before it has one, as long again as it has run.
"""

from __future__ import annotations

import math

from .moment import Moment
from .rates import blend, grace_of, rate_of, stream_end, stream_evidence
from .state import PhaseState

PREPARE_TAU_S = 0.3  # observed seconds worth a prepare-rate prior of sd 1


def _prior(m: Moment, ph: PhaseState) -> tuple[float, float, float] | None:
    """(log rate, sd, tau) of the phase's prior; None for a phase the model does not know."""
    if ph.name == "upload":
        mu, sd = m.model.upload_rate(ph.known_total)
        return mu + m.settings.skew * sd * sd, sd, m.settings.tau_upload
    if ph.name == "prepare":
        mu, sd = m.model.prepare_rate()
        return mu, sd, PREPARE_TAU_S
    return None


def stream_remaining(m: Moment, ph: PhaseState) -> float | None:
    """Seconds until the phase ends, if it runs from now on; None when nothing tells."""
    total = ph.known_total
    evidence = stream_evidence(m, ph)
    obs = rate_of(evidence)
    prior = _prior(m, ph)
    if prior is None:
        if not ph.started:
            return None  # an unknown phase not started: no prior
        if obs is None or total is None:
            return max(m.now - (ph.start_t or m.now), 1.0)
        prior = math.log(obs[0]), 1.0, 0.0
    if total is None:
        return None if not ph.started else 1.0
    mu, sd, tau = prior
    rate = math.exp(blend(mu, sd, math.log(obs[0]) if obs else None, obs[1] if obs else 0.0, tau))
    left = max(total - ph.done, 0.0)
    if not ph.started:
        return left / rate
    last = evidence[2]
    base = last if last is not None else (ph.start_t if ph.start_t is not None else m.now)
    running = [p for p in (list(ph.parts.values()) or [ph.whole]) if p.started and not p.ended]
    grace = max([grace_of(p, m.settings.grace_s) for p in running] or [m.settings.grace_s])
    return max(stream_end(m, left, rate, base, grace) - m.now, 0.0)
