"""A write that fails after work started is resumable: exit 75, the user's path named once.

Disk full is a real small tmpfs (the tests run as root, as CI does); the
output directory vanishing is forced between the last segment and the
finalize by wrapping the real local backend. Then `resume` finishes the job.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import av
import pytest

from clipexport import cli, config
from clipexport.backends import create_backend
from clipexport.errors import EXIT_RESUMABLE, WriteFailed
from clipexport.jobs import JobSpec, JobState, JobStore
from clipexport.orchestrator import JobRunner
from clipexport.orchestrator import prepare_job
from tests.clips import make_clip


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    out, err = capsys.readouterr()
    return stopped.value.code, out, err


def frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 256 KiB tmpfs, nearly filled by `filler`: the output cannot fit."""
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"this test mounts a tmpfs and needs root, as CI has: {mounted.stderr.strip()}"
    try:
        st = os.statvfs(where)
        (where / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 8192))
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_disk_full_exits_75_naming_the_output_then_resume_finishes(tmp_path, small_disk, capsys):
    clip = make_clip(tmp_path / "in.mp4", frames=6, width=64, height=36, index_blocks=False)
    out = small_disk / "out.mp4"

    code, stdout, stderr = run_main(["render", str(clip), "-o", str(out), "--scale", "2", "--progress", "plain"],
                                    capsys)

    assert code == EXIT_RESUMABLE, stderr
    errors = [line for line in stderr.splitlines() if "No space left on device" in line]
    assert len(errors) == 1, stderr  # printed once
    assert errors[0].startswith(f"clipexport: error: {out}: cannot write the output") and "resume cx-" in errors[0]
    assert ".partial" not in stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no temporary file left behind
    store = JobStore(config.state_dir())
    [record] = store.all()
    assert record.state == JobState.FAILED

    (small_disk / "filler").unlink()
    code, stdout, stderr = run_main(["resume", record.id, "--progress", "none"], capsys)
    assert code == 0, stderr
    assert stdout.strip() == str(out) and frame_count(out) == 6
    assert store.get(record.id).state == JobState.DONE


class _RemovesOutputDirAfterRun:
    """The real backend; once its segments are done, the output directory is deleted."""

    def __init__(self, inner, directory: Path) -> None:
        self.inner, self.directory = inner, directory

    def run(self, tasks, emit, stop) -> None:  # noqa: ANN001
        self.inner.run(tasks, emit, stop)
        shutil.rmtree(self.directory)


def test_output_directory_gone_after_the_work_is_resumable(tmp_path, capsys):
    clip = make_clip(tmp_path / "in.mp4", frames=6, width=64, height=36)
    folder = tmp_path / "exports"
    folder.mkdir()
    out = folder / "out.mp4"
    spec = JobSpec(inputs=[str(clip)], output=str(out), model="realesr-animevideov3", scale=2)
    prepared = prepare_job(spec)
    store = JobStore(config.state_dir())
    record = store.create(spec)
    root = config.data_dir() / "store"
    runner = JobRunner(store, record, segment_root=root, backend_factory=lambda s, job: _RemovesOutputDirAfterRun(
        create_backend(s, root, None, store, job), folder))

    with pytest.raises(WriteFailed) as failed:
        runner.run(prepared)

    message = str(failed.value)
    assert failed.value.exit_code == EXIT_RESUMABLE and failed.value.resumable
    assert message.startswith(f"{out}: cannot write the output") and ".partial" not in message
    assert store.get(record.id).state == JobState.FAILED
    folder.mkdir()
    code, stdout, stderr = run_main(["resume", record.id, "--progress", "none"], capsys)
    assert code == 0, stderr
    assert frame_count(out) == 6


class _FailsAfter:
    """The real upscaler, failing with torch's own error once `after` frames came out (as OOM does mid-job)."""

    def __init__(self, inner, after: int, error: BaseException) -> None:
        self.inner, self.after, self.error, self.scale = inner, after, error, inner.scale
        self.frames = 0

    def __getattr__(self, name: str):  # noqa: ANN204 - device, upscale (the speed probe): the real one's
        return getattr(self.inner, name)

    def stream(self, frames, *, batch: int = 4):  # noqa: ANN001, ANN201
        for frame in self.inner.stream(frames, batch=batch):
            if self.frames == self.after:
                raise self.error
            self.frames += 1
            yield frame


def test_out_of_memory_mid_job_is_a_resumable_backend_error(tmp_path, capsys):
    import torch

    from clipexport.backends.local import LocalBackend
    from clipexport.errors import BackendError
    from clipexport.upscale import load_upscaler

    clip = make_clip(tmp_path / "in.mp4", frames=6, width=64, height=36)
    out = tmp_path / "out.mp4"
    spec = JobSpec(inputs=[str(clip)], output=str(out), model="realesr-animevideov3", scale=2, segment_frames=3)
    store = JobStore(config.state_dir())
    record = store.create(spec)
    root = config.data_dir() / "store"

    def loader(on_bytes):  # noqa: ANN001, ANN202
        oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _FailsAfter(load_upscaler(spec.model, scale=2, device="cpu"), 4, oom)

    runner = JobRunner(store, record, segment_root=root, backend_factory=lambda s, job: LocalBackend(loader, root))
    with pytest.raises(BackendError) as failed:
        runner.run(prepare_job(spec))

    assert failed.value.resumable and str(failed.value).startswith("out of memory in seg-0002 (CUDA out of memory")
    [logged] = [e for e in events_of(store, record.id) if e["type"] == "error"]
    assert logged["resumable"] is True and logged["message"] == str(failed.value)
    assert store.get(record.id).state == JobState.FAILED
    code, stdout, stderr = run_main(["resume", record.id, "--progress", "none"], capsys)
    assert code == 0, stderr
    assert frame_count(out) == 6
    skipped = {e["part"] for e in events_of(store, record.id) if e.get("skipped")}
    assert skipped == {"seg-0001"}  # the segment finished before the failure was not redone


def events_of(store: JobStore, job: str) -> list[dict]:
    from clipexport import events

    return list(events.read_events(store.log_path(job)))


@pytest.mark.parametrize(("error", "says"), [
    (RuntimeError("Input type (float) and bias type (c10::Half) should be the same\nmore"),
     "the model failed in seg-0003: RuntimeError: Input type (float) and bias type (c10::Half) should be the same"),
    (MemoryError(), "out of memory in seg-0003 (MemoryError)"),
])
def test_model_errors_become_one_line_resumable_backend_errors(error, says):
    from clipexport.backends.local import model_errors
    from clipexport.errors import BackendError

    with pytest.raises(BackendError) as failed, model_errors("seg-0003"):
        raise error
    assert str(failed.value).startswith(says) and "\n" not in str(failed.value) and failed.value.resumable
