"""The local backend: segments run in-process on this machine's GPU or CPU.

The model is loaded once, in a thread, while the caller's thread emits a
heartbeat every second: loading (or downloading weights) has no unit to
count, and a silent bar would look dead. Segments then run one after the
other in the caller's thread, so Ctrl-C lands where the work is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clipexport.backends.base import EmitFn
from clipexport.backends.probe import probe_speed
from clipexport.errors import BackendError, Interrupted
from clipexport.stopping import deferred
from clipexport.storage import Storage
from clipexport.worker import FrameUpscaler, SegmentTask, fragments_beside, run_segment, scratch_path

HEARTBEAT_S = 1.0
LOAD_GRACE_S = 30.0  # how long a stop waits for a model load in progress

Loader = Callable[[Callable[[int, int | None], None]], FrameUpscaler]


class LocalBackend:
    """Runs the worker body in-process; segment files land under `root`.

    With a `storage`, it behaves as a remote worker would: the segment is
    written to a scratch file under `root`, put into the store, and only
    then announced as encoded, so the client downloads it from the store.
    """

    name = "local"

    def __init__(self, loader: Loader, root: Path, storage: Storage | None = None) -> None:
        self._loader = loader
        self.root = root
        self._storage = storage
        self._upscaler: FrameUpscaler | None = None

    def run(self, tasks: Sequence[SegmentTask], emit: EmitFn, stop: threading.Event) -> None:
        if not tasks:
            return
        with model_errors():
            upscaler = self._load(emit, tasks[0].clip.size)
        for task in tasks:
            if stop.is_set():
                raise Interrupted("stopped before all segments were done")
            with model_errors(task.segment.name):
                if self._storage is None:
                    for event in run_segment(task, upscaler, self.root / task.key):
                        emit(event)
                else:
                    self._run_to_store(task, upscaler, emit)

    def _run_to_store(self, task: SegmentTask, upscaler: FrameUpscaler, emit: EmitFn) -> None:
        """Fragments stay here until the segment is in the store: a kill before that loses none."""
        scratch = scratch_path(self.root, task.key)
        fragments = fragments_beside(scratch, task.job)
        last = None
        try:
            for event in run_segment(task, upscaler, scratch, fragments=fragments):
                if last is not None:
                    emit(last)
                last = event
            self._storage.put_file(task.key, scratch)  # type: ignore[union-attr]
        finally:
            scratch.unlink(missing_ok=True)
        fragments.clear()
        if last is not None:
            emit(last)

    def _load(self, emit: EmitFn, size: tuple[int, int]) -> FrameUpscaler:
        """Load the model once and probe its speed at the job's frame `size`, with heartbeats meanwhile.

        The probe's seconds per pixel ride on the load's `phase_end` (field
        `probe`): the ETA's prior for this device from then on.
        """
        if self._upscaler is not None:
            return self._upscaler
        emit({"type": "phase_start", "phase": "load_model"})
        started = time.monotonic()
        result: dict[str, Any] = {}
        download: dict[str, Any] = {}

        def on_bytes(done: int, total: int | None) -> None:
            download.update(done=done, total=total)

        def load() -> None:
            try:
                upscaler = result["upscaler"] = self._loader(on_bytes)
                result["probe"] = probe_speed(upscaler, *size, device=device_name(upscaler.device))
            except BaseException as exc:  # re-raised in the caller's thread
                result["error"] = exc

        thread = threading.Thread(target=load, name="load-model", daemon=True)
        try:
            with deferred():  # a stop inside start() would skip the grace below
                thread.start()
            while thread.is_alive():
                thread.join(HEARTBEAT_S)
                if thread.is_alive():
                    emit(_heartbeat(download))
        except BaseException:  # Ctrl-C: let torch finish loading before the process exits
            thread.join(LOAD_GRACE_S)
            raise
        if "error" in result:
            raise result["error"]
        self._upscaler = result["upscaler"]
        end = {"type": "phase_end", "phase": "load_model", "elapsed": round(time.monotonic() - started, 3),
               "probe": result["probe"]}
        precision = getattr(self._upscaler, "precision", None)  # the one the loaded model runs in
        emit({**end, "precision": precision} if precision else end)
        return self._upscaler


@contextmanager
def model_errors(segment: str | None = None) -> Iterator[None]:
    """torch's failures become BackendError at this boundary: a message, exit 75, and `resume` helps.

    Out of memory (CUDA or CPU) and a RuntimeError from the model are resumable:
    the finished segments are kept and a resume retries the rest (after freeing
    memory, or with a smaller CLIPEXPORT_TILE, or on another device).
    """
    where = segment or "loading the model"
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            raise BackendError(f"out of memory in {where} ({first}); free memory or set CLIPEXPORT_TILE=256, "
                               "then resume", resumable=True) from exc
        raise BackendError(f"the model failed in {where}: {type(exc).__name__}: {first}", resumable=True) from exc


def _heartbeat(download: dict[str, Any]) -> dict[str, Any]:
    if not download:
        return {"type": "heartbeat", "phase": "load_model", "detail": "loading model"}
    total = download.get("total")
    mib = download["done"] / 2**20
    detail = f"downloading weights {mib:.1f} MiB" + (f" of {total / 2**20:.1f} MiB" if total else "")
    return {"type": "heartbeat", "phase": "load_model", "detail": detail, "bytes": download["done"]}


def device_name(device: str) -> str:
    """"cpu", or the CUDA device's name ("NVIDIA H100 80GB HBM3") for `device`."""
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return torch.cuda.get_device_name(torch.device(device if device != "auto" else "cuda"))
