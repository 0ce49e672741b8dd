"""Every durable fact of a job, in one place: what `resume` relies on.

The job store keeps facts as JSON values under string keys; this view is
the only code that spells the keys. Each family, its value, and why it is
kept::

    input:<index>     {"identity": {"size", "mtime_ns"}, "sha256"}
                      an input's hash, reused while its size and mtime match
    weights           sha256 of --weights: part of every segment's key
    segkey:<segment>  the segment's content key: where its file is, what
                      `cancel --purge` deletes (unless another job shares it)
    attempt:<segment> how many times the segment was submitted
    segment:<segment> {"attempt", "damaged"}: the segment finished (its encode
                      ended), and the damaged input frames it repaired
    output            {"size", "mtime_ns"} of the output as renamed into
                      place: a kill between the rename and `done` is ours
    output:<name>     the same for each file of `--each`
    plan_t            the plan event's time: anchors `done.elapsed` across runs
    force             render --force: resume may replace the output too
    cancel            `clipexport cancel` is stopping the job: its client
                      says "cancelled" rather than how to resume
    transfer:<key>    a multipart upload's id and verified parts
    call:<segment>    {"id", "attempt", "lane", "t", "past"}: the Modal call to
                      re-attach, and the ids of its earlier attempts
    warmup:<index>    {"id"}: a warm-up call, cancelled with the job
    modal:lanes       how many lanes were numbered: names stay unique across runs
"""

from __future__ import annotations

from typing import Any

from clipexport.jobs import JobStore

INPUT, WEIGHTS, SEGKEY, ATTEMPT, SEGMENT = "input:", "weights", "segkey:", "attempt:", "segment:"
OUTPUT, PLAN_T, FORCE, CANCEL = "output", "plan_t", "force", "cancel"
TRANSFER, CALL, WARMUP, LANES = "transfer:", "call:", "warmup:", "modal:lanes"


class JobFacts:
    """Typed getters and setters over one job's facts in the store."""

    def __init__(self, store: JobStore, job: str) -> None:
        self.store, self.job = store, job

    def _get(self, key: str) -> Any:
        return self.store.fact(self.job, key)

    def _set(self, key: str, value: Any) -> None:
        self.store.set_fact(self.job, key, value)

    def _family(self, prefix: str) -> dict[str, Any]:
        """The facts of one family, by the name after the prefix."""
        return {k.removeprefix(prefix): v for k, v in self.store.facts(self.job, prefix).items()}

    # -- inputs and weights ------------------------------------------------------

    def input_hash(self, index: int) -> dict[str, Any] | None:
        """{"identity": {"size", "mtime_ns"}, "sha256"} of input `index`, if hashed."""
        return self._get(f"{INPUT}{index}")

    def set_input_hash(self, index: int, identity: dict[str, int], sha256: str) -> None:
        self._set(f"{INPUT}{index}", {"identity": identity, "sha256": sha256})

    def weights_sha256(self) -> str | None:
        return self._get(WEIGHTS)

    def set_weights_sha256(self, sha256: str) -> None:
        self._set(WEIGHTS, sha256)

    # -- segments ----------------------------------------------------------------

    def set_segment_key(self, segment: str, key: str) -> None:
        self._set(f"{SEGKEY}{segment}", key)

    def segment_keys(self) -> dict[str, str]:
        """Each planned segment's content key, by segment name."""
        return self._family(SEGKEY)

    def attempts(self, segment: str) -> int:
        """How many times the segment was submitted (0: never)."""
        return int(self._get(f"{ATTEMPT}{segment}") or 0)

    def set_attempts(self, segment: str, count: int) -> None:
        self._set(f"{ATTEMPT}{segment}", count)

    def mark_finished(self, segment: str, attempt: int, damaged: list | None = None) -> None:
        """The segment finished in `attempt`; `damaged`: the input frames it had to repair."""
        self._set(f"{SEGMENT}{segment}", {"attempt": attempt, "damaged": damaged or []})

    def finished(self, segment: str) -> dict[str, Any] | None:
        """{"attempt", "damaged"} of a finished segment, else None."""
        return self._get(f"{SEGMENT}{segment}")

    def finished_segments(self) -> dict[str, int]:
        """The attempt each finished segment finished in, by segment name."""
        return {name: int(v.get("attempt", 1)) for name, v in self._family(SEGMENT).items()}

    # -- the output and the job as a whole -----------------------------------------

    def output_identity(self, name: str | None = None) -> dict[str, int] | None:
        """The output as renamed into place (`name`: one file of `--each`)."""
        return self._get(OUTPUT if name is None else f"{OUTPUT}:{name}")

    def set_output_identity(self, identity: dict[str, int], name: str | None = None) -> None:
        self._set(OUTPUT if name is None else f"{OUTPUT}:{name}", identity)

    def plan_time(self) -> float | None:
        return self._get(PLAN_T)

    def set_plan_time(self, t: float) -> None:
        self._set(PLAN_T, t)

    def force(self) -> bool:
        return bool(self._get(FORCE))

    def set_force(self, force: bool) -> None:
        self._set(FORCE, force)

    def cancel_requested(self) -> bool:
        return bool(self._get(CANCEL))

    def request_cancel(self) -> None:
        self._set(CANCEL, True)

    def withdraw_cancel(self) -> None:
        self.store.clear_fact(self.job, CANCEL)

    # -- transfers ---------------------------------------------------------------------

    def transfers(self) -> JobTransferState:
        """The storage layer's TransferState (multipart uploads), kept as this job's facts."""
        return JobTransferState(self)

    # -- Modal calls -------------------------------------------------------------------

    def call(self, segment: str) -> dict[str, Any] | None:
        """{"id", "attempt", "lane", "t"} of the call that runs `segment`, if spawned."""
        return self._get(f"{CALL}{segment}")

    def set_call(self, segment: str, record: dict[str, Any]) -> None:
        self._set(f"{CALL}{segment}", record)

    def calls(self) -> dict[str, dict[str, Any]]:
        """Every recorded call, by segment name (malformed ones left out)."""
        return {name: v for name, v in self._family(CALL).items() if isinstance(v, dict) and v.get("id")}

    def set_warmup(self, index: int, call_id: str) -> None:
        self._set(f"{WARMUP}{index}", {"id": call_id})

    def remote_call_ids(self) -> set[str]:
        """Every Modal call the job started: its segments' (current and past attempts) and its warm-ups'."""
        ids: set[str] = set()
        for value in [*self._family(CALL).values(), *self._family(WARMUP).values()]:
            if isinstance(value, dict) and value.get("id"):
                ids.add(value["id"])
                ids.update(i for i in value.get("past") or [] if isinstance(i, str))
        return ids

    def lanes(self) -> int:
        return int(self._get(LANES) or 0)

    def set_lanes(self, count: int) -> None:
        self._set(LANES, count)


class JobTransferState:
    """The storage layer's TransferState, as `transfer:` facts of one job."""

    def __init__(self, facts: JobFacts) -> None:
        self._store, self._job = facts.store, facts.job

    def load(self, key: str) -> dict | None:
        return self._store.fact(self._job, TRANSFER + key)

    def save(self, key: str, value: dict) -> None:
        self._store.set_fact(self._job, TRANSFER + key, value)

    def clear(self, key: str) -> None:
        self._store.clear_fact(self._job, TRANSFER + key)

    def keys(self) -> list[str]:
        return [k.removeprefix(TRANSFER) for k in self._store.facts(self._job, TRANSFER)]
