"""What a segment's timing means: shared by the live estimator and the fit, so they cannot drift apart.

- which segment carries a worker's warm-up (the first each worker ran; a
  restarted attempt runs on a fresh container; a local job has one worker);
- from which (t, done) sample a segment's rate is steady (past the warm-up);
- whether a container started warm or cold.
"""

from __future__ import annotations

from .state import PartState, PhaseState


def first_on_worker(up: PhaseState) -> set[str]:
    """Keys of the parts that are the first their worker ran: they carry the warm-up.

    A part without a worker ran on the one local worker; a restart
    (attempt > 1) runs on a container of its own; a part served from
    earlier work (`served`) ran nowhere here.
    """
    first: dict[str | None, tuple[float, str]] = {}
    for key, p in up.parts.items():
        if p.start_t is None or p.served:
            continue
        worker = f"{p.worker}#{key}" if p.attempt > 1 else p.worker
        if worker not in first or p.start_t < first[worker][0]:
            first[worker] = (p.start_t, key)
    return {key for _, key in first.values()}


def settle_point(p: PartState, skip_frames: float, after_samples: int | None = None) -> tuple[float, float] | None:
    """The (t, done) from which a part's rate is steady: `skip_frames` past its first sample.

    With `after_samples` (the warm-up was already paid, by a speed probe),
    that many samples past the first are enough: only the pipeline's start
    sits in the first interval.
    """
    if not p.early:
        return None
    d0 = p.early[0][1]
    for i, (t, d) in enumerate(p.early):
        if d >= d0 + skip_frames or (after_samples is not None and i >= after_samples):
            return t, d
    return None


def container_kind(c: PartState, loaded: PhaseState | None) -> str | None:
    """'warm' or 'cold' when the container's own events say so, else None.

    Said by the queue part's end detail, or by a model load that followed
    it (only a cold container loads the model).
    """
    if c.detail in ("warm", "cold start", "cold"):
        return "warm" if c.detail == "warm" else "cold"
    if loaded is not None and c.key in loaded.parts:
        return "cold"
    return None
