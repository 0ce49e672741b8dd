"""The client side of a job: validate, plan, prepare, run segments, finalize.

`prepare_job` checks everything a user can get wrong before any job exists
(so bad input leaves nothing behind); `JobRunner` carries a job from wherever
it stands to its output, and is what both `render` and `resume` run. Every
step is recorded in the job store as it completes, so a rerun skips it:
input hashes (keyed by size and mtime), finished segments (by their content
key, which exists only once complete), the output (renamed into place last).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from clipexport import events, stopping, testhook
from clipexport.backends.base import Backend
from clipexport.errors import (
    BackendError,
    BusyError,
    Cancelled,
    ClipexportError,
    DamagedInput,
    InputError,
    Interrupted,
    JobLookupError,
    ModelError,
    OutputError,
    UsageError,
    WriteFailed,
    EXIT_SIGINT,
)
from clipexport.facts import JobFacts
from clipexport.jobs import RESUMABLE, JobRecord, JobSpec, JobState, JobStore
from clipexport.locks import Lock, lock_job
from clipexport.media import ClipInfo, ClipPlan, Crop, Segment, concat_and_mux, plan_clips, plan_segments, probe
from clipexport.overlay import touches
from clipexport.remote import channel_prefix
from clipexport.storage import ProgressChannel, Storage, hash_file
from clipexport.validate import OUTPUT_SUFFIXES, check_encoder, check_name_length, check_spec, hidden_name
from clipexport.transfers import SegmentDownloader, upload_inputs
from clipexport.upscale.cpu import busy_elsewhere, usable_cpus
from clipexport.upscale.precision import int8_prepared
from clipexport.upscale.registry import MODELS
from clipexport.worker import SegmentTask, fragment_prefix, fragments_beside, scratch_path, segment_key

logger = logging.getLogger(__name__)
BackendFactory = Callable[[JobSpec, str], Backend]


@dataclass(frozen=True)
class Prepared:
    """A validated spec and what probing its inputs found."""

    spec: JobSpec
    infos: list[ClipInfo]
    plans: list[ClipPlan]
    segments: list[Segment]
    precision: str  # the one that runs (never "auto"): in the plan and in segment keys


def prepare_job(spec: JobSpec, *, force: bool = False) -> Prepared:
    """Check model, output and inputs; raise a UsageError naming the problem.

    With `validate`, this is the one validation pass a render makes before
    any job exists: settings, environment, storage and device first, the
    encoder's limits once the plan gives the output size.
    """
    check_spec(spec)
    _check_model(spec)
    check_output(spec, force)
    infos = [probe(Path(p)) for p in spec.inputs]
    trims = spec.trims or [None] * len(infos)
    crops = spec.crops or [None] * len(infos)
    plans = plan_clips(infos, [_trim(t) for t in trims], [_crop(c) for c in crops])
    check_encoder(spec, plans[0].size)
    segments = plan_segments([p.frames for p in plans], spec.segment_frames)
    return Prepared(spec, infos, plans, segments, resolve_precision(spec))


def resolve_precision(spec: JobSpec) -> str:
    """The precision the upscaling will run in: the GPU's for modal, else this machine's."""
    from clipexport.upscale.precision import normalise, resolve

    if spec.backend != "local":
        if normalise(spec.precision) not in ("auto", "fp16"):
            raise UsageError(f"--precision {spec.precision}: the {spec.backend} backend runs fp16 (use auto or fp16)")
        return "fp16"
    model = MODELS.get(spec.model)
    if spec.device.strip().lower() == "cpu":  # no torch import needed
        return resolve(spec.precision, "cpu", model=model)
    from clipexport.upscale.engine import resolve_device

    return resolve(spec.precision, resolve_device(spec.device).type, model=model)


def _check_model(spec: JobSpec) -> None:
    model = MODELS.get(spec.model)
    if model is None:
        raise ModelError(f"unknown model {spec.model!r}; known models: {', '.join(sorted(MODELS))}")
    if spec.scale not in (2, 4) or spec.scale > model.native_scale:
        supported = [s for s in (2, 4) if s <= model.native_scale]
        raise ModelError(f"model {spec.model} supports --scale {' or '.join(map(str, supported))}, not {spec.scale}")
    if spec.weights is not None:
        if not Path(spec.weights).is_file():
            raise ModelError(f"{spec.weights}: weights file not found")
        from clipexport.upscale import load_upscaler

        load_upscaler(spec.model, scale=spec.scale, weights=Path(spec.weights), device="cpu", precision="fp32")  # fits the arch?


def check_output(spec: JobSpec, force: bool) -> None:
    """Refuse an output that cannot or must not be written (an existing one unless `force`)."""
    if spec.each is not None:
        _check_each_dir(Path(spec.each))
    for out in output_paths(spec):
        _check_one_output(spec, out, force)


def _check_each_dir(directory: Path) -> None:
    """--each DIR: a directory, or one that can be made (at the end, not now)."""
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{directory}: --each needs a directory")
    if not directory.exists() and not directory.parent.is_dir():
        raise OutputError(f"{directory}: directory {directory.parent} does not exist")


def _check_one_output(spec: JobSpec, out: Path, force: bool) -> None:
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise OutputError(f"{out}: output must end in {', '.join(OUTPUT_SUFFIXES)}")
    check_name_length(out)
    directory = out.parent if out.parent.is_dir() or spec.each is None else out.parent.parent  # --each makes it
    if not directory.is_dir():
        raise OutputError(f"{out}: directory {out.parent} does not exist")
    if not _writable(directory):
        raise OutputError(f"{out}: directory {directory} is not writable")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory")
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists (use --force to replace it)")
    resolved = out.resolve()
    for inp in spec.inputs:
        if Path(inp).resolve() == resolved:
            raise OutputError(f"{out}: output would overwrite an input")


def _writable(directory: Path) -> bool:
    """Try it: permission bits say nothing for root or read-only mounts."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".clipexport-probe-"):
            return True
    except OSError:
        return False


def _trim(value: list[float] | None) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


def _crop(value: list[int] | None) -> Crop | None:
    return None if value is None else Crop(*value)


def build_plan(prepared: Prepared, *, input_bytes: int, backend: str, device: str) -> dict[str, Any]:
    """The `plan` event: all the work up front, and the features an ETA needs.

    A job with a store uploads its inputs and downloads its segments; a
    remote backend also waits for a container (`queue`).
    """
    spec, first = prepared.spec, prepared.plans[0]
    frames = sum(p.frames for p in prepared.plans)
    width, height = first.size
    stored, remote = spec.storage is not None, backend != "local"
    phases = [
        {"phase": "prepare", "unit": "bytes", "total": input_bytes},
        *([{"phase": "upload", "unit": "bytes", "total": input_bytes}] if stored else []),
        *([{"phase": "queue", "unit": None, "total": None}] if remote else []),
        {"phase": "load_model", "unit": None, "total": None},
        {"phase": "upscale", "unit": "frames", "total": frames},
        {"phase": "encode", "unit": "frames", "total": frames},
        *([{"phase": "download", "unit": "bytes", "total": None}] if stored else []),
        {"phase": "finalize", "unit": None, "total": None},
    ]
    features = {
        "backend": backend,
        "gpu": device,
        "precision": prepared.precision,
        "model": spec.model,
        "scale": spec.scale,
        "in_width": width,
        "in_height": height,
        "fps": float(first.fps),
        "frames": frames,
        "input_bytes": input_bytes,
        "clips": len(prepared.plans),
        "segments": len(prepared.segments),
        "parallel": spec.parallel,
        "segment_frames": spec.segment_frames,
        "clip_frames": [p.frames for p in prepared.plans],
        "out_width": width * spec.scale,
        "out_height": height * spec.scale,
        "duration_s": round(frames / float(first.fps), 3),
    }
    if device == "cpu":  # the model's speed there goes with the cores it gets, and what others leave of them
        features["threads"] = usable_cpus()
        busy = busy_elsewhere()
        if busy is not None:
            features["cpu_busy"] = round(busy, 1)
        if prepared.precision == "int8" and not int8_prepared(spec.model):
            features["int8_first"] = True  # its load rounds the weights and compiles the kernels first
    # inputs and output name the job for the display's header (extra fields: the contract allows them)
    return {"type": "plan", "phases": phases, "features": features,
            "inputs": list(spec.inputs), "output": spec.output}


class JobRunner:
    """Carries one job to its output; used by `render` and `resume` alike."""

    def __init__(
        self,
        store: JobStore,
        record: JobRecord,
        *,
        segment_root: Path,
        backend_factory: BackendFactory,
        sinks: Sequence[events.Sink] = (),
        accept_changed_inputs: bool = False,
        fraction: Callable[[], float] = lambda: 0.0,
        storage: Storage | None = None,
    ) -> None:
        self.store = store
        self.facts = JobFacts(store, record.id)
        self.storage = storage
        self._downloads: SegmentDownloader | None = None
        self._keys: dict[str, str] = {}
        self._billed: dict[str, Any] | None = None  # what a cloud backend billed in this run
        self.job = record.id
        self.spec = record.spec
        self.segment_root = segment_root
        self._backend_factory = backend_factory
        self._accept_changed = accept_changed_inputs
        self._fraction = fraction
        self._last_seq: int | None = None
        log_path = store.log_path(record.id)
        next_seq = max(record.last_seq, events.last_seq(log_path)) + 1  # a killed client may not have stored it
        self._log = events.EventLog(log_path)
        self.emitter = events.Emitter(
            record.id, [self._log, events.log_sink, self._remember_seq, *sinks], next_seq=next_seq
        )
        self.stop = threading.Event()
        self.damage: str | None = None  # one line on frames that could not be decoded, once the segments ran
        self._done = False  # the job reached `done`: a stop that comes now is too late to change that

    def _remember_seq(self, event: events.Event) -> None:
        """Store seq and fraction at phase changes (and at the end), not per frame."""
        self._last_seq = event["seq"]
        if event["type"] != "progress" and event["type"] != "heartbeat":
            self.store.record_progress(self.job, event["seq"], self._fraction())

    def run(self, prepared: Prepared) -> Path:
        """Run the job to completion; on any stop the job stays resumable."""
        out = Path(self.spec.output)
        try:
            self._run(prepared)
        except (KeyboardInterrupt, Interrupted) as exc:
            self._stopped(exc)
        except ClipexportError as exc:
            self._failed(exc.args[0] if exc.args else str(exc), exc.resumable)
            raise
        except Exception as exc:  # an unexpected failure still leaves a resumable job
            stop = stopping.stop_within(exc)
            if stop is None:
                self._failed(f"internal error: {type(exc).__name__}: {exc}", True)
                raise
            self._stopped(stop)
        finally:
            for tmp in partial_outputs(self.spec, self.job):
                tmp.unlink(missing_ok=True)
            try:
                self._flush_seq()
            finally:
                self._log.close()
        return out

    def _run(self, prepared: Prepared) -> None:
        emit = self.emitter
        hashes = self._prepare(prepared)
        backend = self._backend_factory(replace(self.spec, precision=prepared.precision), self.job)
        warm_up = getattr(backend, "warm_up", None)
        if warm_up is not None:  # a cold start overlaps the upload instead of following it
            warm_up(min(self.spec.parallel, len(prepared.segments)))
        input_keys: list[str | None] = [None] * len(hashes)
        if self.storage is not None:
            paths = [info.path for info in prepared.infos]
            input_keys = list(upload_inputs(self.storage, paths, hashes, self.emitter.emit,
                                            self.facts.transfers()))
            self._downloads = SegmentDownloader(self.storage, self.segment_root, self.emitter.emit)
        tasks = self._pending_tasks(prepared, hashes, input_keys)
        frames = sum(p.frames for p in prepared.plans)
        emit("phase_start", phase="upscale", unit="frames", total=frames)
        emit("phase_start", phase="encode", unit="frames", total=frames)
        started = time.monotonic()
        with write_failures(self.segment_root, "a segment"):
            backend.run(tasks, self._relay, self.stop)
        bill = getattr(backend, "bill", None)  # a cloud backend's bill goes into `done`
        self._billed = bill() if bill is not None else None
        if self._downloads is not None:
            self._downloads.finish()
        elapsed = round(time.monotonic() - started, 3)
        emit("phase_end", phase="upscale", unit="frames", done=frames, total=frames, elapsed=elapsed)
        emit("phase_end", phase="encode", unit="frames", done=frames, total=frames, elapsed=elapsed)
        self.damage = damage_report(prepared, self.facts)
        if self.damage is not None and self.spec.strict:
            raise DamagedInput(self.damage.replace("they were repeated from the previous frame",
                                                   "--strict makes that fatal"))
        self._finalize(prepared)

    def _relay(self, partial: dict[str, Any]) -> None:
        """Backend events enter the job's stream here; segment ends are facts."""
        event = self.emitter.emit(partial)
        if event["type"] == "phase_end" and event.get("phase") == "encode" and "part" in event:
            damaged = event.get("damaged") or []
            self.facts.mark_finished(event["part"], event.get("attempt", 1), damaged)
            if damaged:  # beside the segment, for a later job that reuses it
                note = damage_note(self.segment_root, self._keys[event["part"]])
                note.parent.mkdir(parents=True, exist_ok=True)
                note.write_text(json.dumps(damaged), encoding="utf-8")
            if self._downloads is not None:
                self._downloads.add(event["part"], self._keys[event["part"]])

    def _prepare(self, prepared: Prepared) -> list[str]:
        """Hash the inputs (byte progress); reuse hashes of unchanged files."""
        total = sum(i.size_bytes for i in prepared.infos)
        self.emitter("phase_start", phase="prepare", unit="bytes", total=total)
        started, base, hashes = time.monotonic(), 0, []
        for index, info in enumerate(prepared.infos):
            hashes.append(self._input_hash(index, info, base, total))
            base += info.size_bytes
            self.emitter("progress", phase="prepare", unit="bytes", done=base, total=total)
        elapsed = round(time.monotonic() - started, 3)
        self.emitter("phase_end", phase="prepare", unit="bytes", done=total, total=total, elapsed=elapsed)
        return hashes

    def _input_hash(self, index: int, info: ClipInfo, base: int, total: int) -> str:
        identity = file_identity(info.path)
        known = self.facts.input_hash(index)
        if known is not None and known["identity"] == identity:
            return known["sha256"]
        throttle = events.Throttle()

        def on_bytes(done: int) -> None:
            if throttle.ready():
                self.emitter("progress", phase="prepare", unit="bytes", done=base + done, total=total)

        sha = hash_file(info.path, on_bytes)
        if known is not None and known["sha256"] != sha and not self._accept_changed:
            raise InputError(
                f"{info.path}: changed since job {self.job} started; "
                f"`clipexport resume {self.job} --force` re-renders what it affects"
            )
        self.facts.set_input_hash(index, identity, sha)
        return sha

    def _key(self, prepared: Prepared, hashes: list[str], seg: Segment) -> str:
        spec = self.spec
        weights_id = "builtin" if spec.weights is None else self._weights_id()
        return segment_key(
            hashes[seg.clip], prepared.plans[seg.clip], seg,
            model=spec.model, weights_id=weights_id, scale=spec.scale, codec=spec.codec, crf=spec.crf,
            precision=prepared.precision,
            overlays=self._overlays(prepared, seg),
        )

    def _overlays(self, prepared: Prepared, seg: Segment) -> tuple[dict[str, Any], ...]:
        """The clip's overlays that show on some frame of `seg`, in their order."""
        overlays = self.spec.overlays[seg.clip] if self.spec.overlays else []
        fps = prepared.plans[seg.clip].fps
        return tuple(o for o in overlays if touches(o, seg.start, seg.count, fps))

    def _weights_id(self) -> str:
        known = self.facts.weights_sha256()
        if known is None:
            known = hash_file(Path(self.spec.weights))  # type: ignore[arg-type]
            self.facts.set_weights_sha256(known)
        return known

    def _pending_tasks(self, prepared: Prepared, hashes: list[str], input_keys: list[str | None]) -> list[SegmentTask]:
        """Tasks for segments not finished yet; finished ones count as done.

        A segment is finished when its file is here, or (with a store) when
        the store has it: then only its download is left.
        """
        tasks = []
        for seg in prepared.segments:
            key = self._keys[seg.name] = self._key(prepared, hashes, seg)
            self.facts.set_segment_key(seg.name, key)
            if (self.segment_root / key).is_file():
                self._count_finished(seg)
                continue
            if self._downloads is not None and self.storage is not None and self.storage.stat(key) is not None:
                self._count_finished(seg)
                self._downloads.add(seg.name, key)
                continue
            previous = self.facts.attempts(seg.name)
            self.facts.set_attempts(seg.name, previous + 1)
            tasks.append(SegmentTask(self.job, seg, prepared.plans[seg.clip], key, codec=self.spec.codec,
                                     crf=self.spec.crf, attempt=previous + 1, input_key=input_keys[seg.clip],
                                     overlays=self._overlays(prepared, seg)))
        return tasks

    def _count_finished(self, seg: Segment) -> None:
        attempt = self.facts.attempts(seg.name) or 1
        note = damage_note(self.segment_root, self._keys[seg.name])
        if note.is_file() and self.facts.finished(seg.name) is None:
            self.facts.mark_finished(seg.name, attempt, json.loads(note.read_text(encoding="utf-8")))
        for phase in ("upscale", "encode"):
            self.emitter("progress", phase=phase, part=seg.name, unit="frames", done=seg.count, total=seg.count,
                         attempt=attempt, skipped=True)

    def _finalize(self, prepared: Prepared) -> None:
        """Join the segments into the output, or with --each each clip's into its own file."""
        self.emitter("phase_start", phase="finalize")
        testhook.pause("finalize")
        started = time.monotonic()
        outs = output_paths(self.spec)
        clips = [None] if self.spec.each is None else list(range(len(prepared.plans)))
        if self.spec.each is not None:
            Path(self.spec.each).mkdir(exist_ok=True)
        for out, clip in zip(outs, clips):
            segments = [s for s in prepared.segments if clip is None or s.clip == clip]
            plans = prepared.plans if clip is None else [prepared.plans[clip]]
            tmp = hidden_name(out, self.job)
            with write_failures(out, "the output"):
                concat_and_mux([self.segment_root / self._keys[s.name] for s in segments], plans, tmp)
                self.facts.set_output_identity(file_identity(tmp), _each_name(self.spec, out))  # resume knows it
                os.replace(tmp, out)
        if self.storage is not None:
            ProgressChannel(self.storage, channel_prefix(self.job)).clear()
        self.emitter("phase_end", phase="finalize", elapsed=round(time.monotonic() - started, 3),
                     bytes=sum(out.stat().st_size for out in outs))
        with stopping.deferred():  # done in the store and `done` in the log, or neither
            self.store.transition(self.job, JobState.DONE)
            self._done = True
            plan_t = self.facts.plan_time() or time.time()
            billed = self._billed
            extra = {"cost_usd": billed["usd"], "gpu_s": billed["gpu_s"], "billed": billed} if billed else {}
            self.emitter("done", output=self.spec.output, elapsed=round(time.time() - plan_t, 3), **extra)

    def _stopped(self, exc: BaseException) -> None:
        """The job stays resumable; unless it was already done (a Ctrl-C at its very end): that stands.
        `exc`: the stop's exception, `Interrupted` or a Ctrl-C's KeyboardInterrupt."""
        if self._done:
            return
        if not isinstance(exc, Interrupted):
            exc = Interrupted("interrupted", exit_code=EXIT_SIGINT)
        self.emitter("interrupted", reason=str(exc), exit_code=exc.exit_code, resumable=True)
        self.store.transition(self.job, JobState.INTERRUPTED, str(exc))
        if self.facts.cancel_requested():  # `clipexport cancel` sent the signal: nothing to resume
            raise Cancelled(f"job {self.job} was cancelled from another shell") from None
        raise exc

    def _failed(self, message: str, resumable: bool) -> None:
        self.emitter("error", message=message, resumable=resumable)
        self.store.transition(self.job, JobState.FAILED, message)

    def _flush_seq(self) -> None:
        if self._last_seq is not None:
            self.store.record_progress(self.job, self._last_seq, self._fraction())

    def emit_plan(self, prepared: Prepared, *, backend: str, device: str) -> None:
        """The first event of a new job (or of a resumed one whose log was lost); it anchors `done.elapsed`."""
        total = sum(i.size_bytes for i in prepared.infos)
        event = self.emitter.emit(build_plan(prepared, input_bytes=total, backend=backend, device=device))
        if self.facts.plan_time() is None:  # a plan written again keeps the job's start
            self.facts.set_plan_time(event["t"])


#: Errors of a write that `resume` can finish once the user has made room or restored a directory.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.ENOENT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                 errno.EIO, errno.ENOTDIR}


@contextmanager
def write_failures(target: Path, what: str) -> Iterator[None]:
    """A write failing after work started becomes `WriteFailed` (exit 75) naming `target`, not a temp file."""
    try:
        yield
    except (OutputError, OSError) as exc:
        code = _errno(exc)
        if code not in _WRITE_ERRNOS and not isinstance(exc, OutputError):
            raise
        reason = os.strerror(code) if code is not None else "write error"
        raise WriteFailed(f"{target}: cannot write {what} ({reason}); make room or restore the directory") from exc


def _errno(exc: BaseException) -> int | None:
    """The errno behind an error, looking through the chain of causes (PyAV's errors carry one)."""
    seen: BaseException | None = exc
    while seen is not None:
        code = getattr(seen, "errno", None)
        if isinstance(code, int) and code > 0:
            return code
        seen = seen.__cause__ or seen.__context__
    return None


def damage_note(segment_root: Path, key: str) -> Path:
    """Where a segment's undecodable frames are noted, beside the segment itself."""
    return segment_root / f"{key}.damaged.json"


def damage_report(prepared: Prepared, facts: JobFacts) -> str | None:
    """One line on the output frames that repeat an undecodable one, from the finished segments' facts."""
    fps = prepared.plans[0].fps
    offsets = [sum(p.frames for p in prepared.plans[:i]) for i in range(len(prepared.plans))]
    frames = sorted(offsets[seg.clip] + k for seg in prepared.segments
                    for k in (facts.finished(seg.name) or {}).get("damaged", []))
    if not frames:
        return None
    span = f"{_mmss(frames[0] / fps)}–{_mmss((frames[-1] + 1) / fps)}"
    count = f"{len(frames)} frame{'s' if len(frames) != 1 else ''}"
    return f"{count} could not be decoded ({span}); they were repeated from the previous frame"


def _mmss(seconds: Any) -> str:
    whole = int(seconds)
    return f"{whole // 60:02d}:{whole % 60:02d}" if whole < 3600 else f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def file_identity(path: Path) -> dict[str, int]:
    """Size and mtime: enough to tell a file we wrote from one put there since."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def owns_output(store: JobStore, job_id: str) -> bool:
    """Whether the file at the job's output is the one this job renamed there.

    A job killed between its output's rename and being marked done is
    finished but for the bookkeeping; its resume may rewrite that file.
    """
    spec = store.get(job_id).spec
    existing = [out for out in output_paths(spec) if out.exists()]
    facts = JobFacts(store, job_id)
    return bool(existing) and all(
        out.is_file() and facts.output_identity(_each_name(spec, out)) == file_identity(out) for out in existing)


def output_paths(spec: JobSpec) -> list[Path]:
    """The files a job writes: its output, or with --each `DIR/01-<input stem>.mp4`, ... ."""
    if spec.each is None:
        return [Path(spec.output)]
    return [Path(spec.each) / f"{i:02d}-{Path(p).stem}.mp4" for i, p in enumerate(spec.inputs, 1)]


def _each_name(spec: JobSpec, out: Path) -> str | None:
    """Which file of `--each` an output is (None: the job's one output)."""
    return None if spec.each is None else out.name


def partial_outputs(spec: JobSpec, job_id: str) -> list[Path]:
    """The temporary names of every file the job writes."""
    return [hidden_name(out, job_id) for out in output_paths(spec)]


def cancel_job(store: JobStore, job_id: str, *, segment_root: Path, purge: bool = False,
               wait_s: float = 15.0) -> tuple[JobRecord, int]:
    """Stop a job's local work, drop its temporary files, mark it cancelled.

    A live client is told (the `cancel` fact, so that it says "cancelled"
    rather than how to resume), sent SIGTERM and given `wait_s` to stop
    cleanly and let go of the job's lock, which this then holds so that no
    `resume` starts meanwhile. Finished segments stay in the store for other
    jobs to reuse unless `purge`; even then, those another unfinished job
    needs are kept. Returns the record and how many segments were kept so.
    """
    record = store.get(job_id)
    if record.state in (JobState.DONE, JobState.CANCELLED):
        raise JobLookupError(f"job {job_id} is already {record.state.value}")
    JobFacts(store, job_id).request_cancel()
    lock = _stop_client(store, record, wait_s)
    try:
        record = store.get(job_id)
        if record.state == JobState.DONE:
            raise JobLookupError(f"job {job_id} finished before it could be cancelled")
        _cancel_remote(store, record)
        for tmp in partial_outputs(record.spec, job_id):
            tmp.unlink(missing_ok=True)
        _drop_fragments(store, job_id, segment_root)
        kept = _purge_segments(store, job_id, segment_root) if purge else 0
        record = store.transition(job_id, JobState.CANCELLED, "cancelled by user")
        log_path = store.log_path(job_id)
        log = events.EventLog(log_path)
        try:
            events.Emitter(job_id, [log, events.log_sink], next_seq=events.last_seq(log_path) + 1)(
                "cancelled", purged=purge)
        finally:
            log.close()
    finally:
        lock.release()
    return record, kept


def _drop_fragments(store: JobStore, job_id: str, segment_root: Path) -> None:
    """Delete the fragments of the job's unfinished segments, here: they are named after the job, no one else's."""
    for key in JobFacts(store, job_id).segment_keys().values():
        for out in (segment_root / key, scratch_path(segment_root, key)):
            fragments_beside(out, job_id).clear()


def _purge_segments(store: JobStore, job_id: str, segment_root: Path) -> int:
    """Delete the job's finished segments but those another unfinished job still needs.

    Segments are content-addressed: a job rendering the same input with the
    same options shares them. Returns how many were kept for such jobs.
    """
    needed = {key for other in store.all() if other.id != job_id and other.state in RESUMABLE
              for key in JobFacts(store, other.id).segment_keys().values()}
    mine = set(JobFacts(store, job_id).segment_keys().values())
    for key in mine - needed:
        (segment_root / key).unlink(missing_ok=True)
        damage_note(segment_root, key).unlink(missing_ok=True)
    return len(mine & needed)


def _cancel_remote(store: JobStore, record: JobRecord) -> None:
    """Abort the job's unfinished multipart uploads and its remote calls."""
    spec = record.spec
    if spec.storage is not None:
        from clipexport.storage import open_storage

        storage = open_storage(spec.storage, endpoint_url=spec.endpoint_url)
        facts = JobFacts(store, record.id)
        storage.abort_uploads(facts.transfers())
        for key in facts.segment_keys().values():  # fragments a container kept in the store
            storage.delete_prefix(fragment_prefix(key, record.id))
    if spec.backend == "modal":
        from clipexport.backends.modal import RealModalClient, cancel_calls

        try:
            cancel_calls(RealModalClient(), store, record.id)
        except BackendError as exc:  # no token here: the job is still cancelled locally
            logger.warning("could not cancel the job's Modal calls: %s", exc)


def _stop_client(store: JobStore, record: JobRecord, wait_s: float) -> Lock:
    """SIGTERM the job's live client, then hold the job's lock once it has let go."""
    if record.state == JobState.RUNNING and record.pid and record.pid != os.getpid():
        try:
            os.kill(record.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        return lock_job(store.root, record.id, wait_s=wait_s)
    except BusyError:
        JobFacts(store, record.id).withdraw_cancel()
        raise BusyError(f"job {record.id}: its process (pid {record.pid}) did not stop within {wait_s:.0f} s; "
                        f"run `clipexport cancel {record.id}` again") from None
