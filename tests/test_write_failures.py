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
from clipexport.validate import prepare_job
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
    clip = make_clip(tmp_path / "in.mp4", frames=24, width=64, height=36, index_blocks=False)
    out = small_disk / "out.mp4"

    code, stdout, stderr = run_main(["render", str(clip), "-o", str(out), "--progress", "plain"], capsys)

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
    assert stdout.strip() == str(out) and frame_count(out) == 24
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
