"""The one validation pass a render (or resume) makes before any job exists.

Everything a user can get wrong is checked here, fastest first, and raises a
`UsageError` whose message is the one line the CLI prints (exit 2): every
setting against its declaration (`options`), every environment variable the
tool reads, the device against what torch on this machine can do, the storage
URL and its S3/R2 settings, the output path (including the hidden temporary
name it is written under first), the model and weights, the backend's own
preflight (a Modal token), the inputs and the plan, and the encoder's limits
for the planned output size. A render that passes here fails later only for
reasons a user could not have seen coming (a full disk, a lost connection).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipexport import options
from clipexport.errors import BackendError, OutputError, UsageError
from clipexport.jobs import JobSpec

OUTPUT_SUFFIXES = (".mp4", ".mov", ".mkv")
#: Largest width or height each encoder opens with (measured with PyAV's libx264/libx265: 16386 fails).
ENCODER_MAX_SIDE = {"h264": 16384, "hevc": 16384}
#: Smallest side libx265 opens with (measured: 16 fails, 32 works); libx264 takes 2.
ENCODER_MIN_SIDE = {"h264": 2, "hevc": 32}
_JOB_ID_EXAMPLE = "cx-000000"  # jobs.new_id's length: sizes the temporary name before a job exists


def check_spec(spec: JobSpec) -> None:
    """What can be checked of a spec before its inputs are probed (`orchestrator.prepare_job` calls it first)."""
    check_settings(spec)
    options.check_environment()
    check_device(spec)


def check_settings(spec: JobSpec) -> None:
    """Every setting in the spec against its declared type and range."""
    for option in options.SETTINGS:
        if hasattr(spec, option.name):
            option.parse(getattr(spec, option.name))


def check_name_length(out: Path) -> None:
    """The name, and the longer hidden name it is written under first, fit the file system."""
    limit = _name_max(out.parent)
    size = len(os.fsencode(out.name))
    if size > limit:
        raise OutputError(f"{out.name[:40]}...: output file name is {size} bytes; the file system allows {limit}")
    hidden = hidden_name(out, _JOB_ID_EXAMPLE).name
    extra = len(os.fsencode(hidden)) - size
    if size + extra > limit:
        raise OutputError(f"{out.name[:40]}...: output file name is {size} bytes; at most {limit - extra} fit "
                          f"(it is written under a temporary name {extra} bytes longer)")
    if len(os.fsencode(str(out.parent / hidden))) >= _path_max(out.parent):
        raise OutputError(f"{out.name[:40]}...: output path is longer than the file system allows")


def _name_max(directory: Path) -> int:
    for folder in (directory, *directory.parents):
        try:
            return os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return 255


def _path_max(directory: Path) -> int:
    try:
        return os.pathconf(directory if directory.is_dir() else "/", "PC_PATH_MAX")
    except (OSError, ValueError):
        return 4096


def hidden_name(out: Path, job_id: str) -> Path:
    """The temporary name `out` is written under before its rename."""
    return out.with_name(f".{out.stem}.{job_id}.partial{out.suffix}")


def check_storage(spec: JobSpec) -> None:
    """The storage URL parses and its S3/R2 settings resolve (no network)."""
    if spec.endpoint_url is not None:
        from clipexport.storage.config import check_endpoint

        check_endpoint(spec.endpoint_url)
    if spec.storage is not None:
        from clipexport.storage import open_storage

        open_storage(spec.storage, endpoint_url=spec.endpoint_url)


def check_device(spec: JobSpec) -> None:
    """A CUDA device asked for must exist in the torch this machine has."""
    if spec.backend != "local" or not spec.device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--device {spec.device}: torch {torch.__version__} on this machine sees no CUDA GPU; "
                         "use --device cpu or auto")
    index = int(spec.device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {spec.device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def check_backend(spec: JobSpec) -> None:
    """What a run (not an estimate) needs before a job exists: a storage URL that resolves, a token."""
    check_storage(spec)
    if spec.backend == "modal":
        from clipexport.backends.modal import preflight

        try:
            preflight(spec.storage, weights=spec.weights, gpu=spec.gpu)
        except BackendError as exc:  # no token, modal missing: nothing started, so a usage error
            if exc.resumable:
                raise
            raise UsageError(str(exc)) from None


def check_weights(spec: JobSpec, on_download: Callable[[int | None], None]) -> None:
    """The local backend's weights are at hand (cache, conversion, ncnn export, --weights) or fetched
    now: a model that cannot be had fails before a job exists. `on_download` is told a fetch began."""
    from clipexport.upscale.registry import MODELS
    from clipexport.upscale.weights import ensure_available

    if spec.model not in MODELS:
        return  # named by the model check, with the known names
    started: list[bool] = []

    def progress(done: int, total: int | None) -> None:
        if not started:
            started.append(True)
            on_download(total)

    ensure_available(MODELS[spec.model], weights=spec.weights, progress=progress)


def check_encoder(spec: JobSpec, size: tuple[int, int]) -> None:
    """The upscaled frame fits the encoder: x264 and x265 refuse sides over 16384 pixels."""
    width, height = size[0] * spec.scale, size[1] * spec.scale
    high, low = ENCODER_MAX_SIDE[spec.codec], ENCODER_MIN_SIDE[spec.codec]
    if max(width, height) > high:
        raise UsageError(f"output {width}x{height} is larger than {spec.codec} can encode (at most {high} pixels "
                         "a side): use a smaller --scale or --crop")
    if min(width, height) < low:
        raise UsageError(f"output {width}x{height} is smaller than {spec.codec} can encode "
                         f"(at least {low} pixels a side)")


def check_timing_model(path: Path) -> Any:
    """A timing model file (`eta replay --model`) that loads."""
    from clipexport.progress import load_model

    try:
        return load_model(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such timing model") from None
    except (OSError, ValueError, TypeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.errno != errno.EISDIR else "not a timing model"
        raise UsageError(f"{path}: {reason} (expected the JSON `clipexport eta fit` writes)") from None


def check_event_logs(paths: list[Path], what: str = "log") -> None:
    """Files that are clipexport event logs: at least one event with a job, a seq and a type."""
    from clipexport import events

    for path in paths:
        if not path.is_file():
            raise UsageError(f"{path}: no such {what}")
        try:
            found = any(isinstance(e, dict) and {"job", "seq", "type"} <= e.keys() for e in events.read_events(path))
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or 'not UTF-8 text'})") from None
        if not found:
            raise UsageError(f"{path}: not a clipexport event log (no events in it)")
