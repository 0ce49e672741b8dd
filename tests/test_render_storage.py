"""`render --storage` end to end against a real S3 server (SeaweedFS on 127.0.0.1).

The inputs go up, the worker reads them from the store and writes each
segment back, the client downloads segments as they finish: the same path a
cloud job takes, with the local backend standing in for the GPU.
"""

from __future__ import annotations

import json
import uuid

import pytest
from typer.testing import CliRunner

from clipexport import events
from clipexport.cli import app
from clipexport.progress import Tracker
from clipexport.progress.text import skip_notes
from tests.clips import make_clip
from tests.s3server import BUCKET, seaweed, seaweed_tls  # noqa: F401  (fixtures)
from tests.test_render import decode

runner = CliRunner()


def phase_bytes(lines: list[dict], phase: str) -> dict[str, int]:
    return {e["part"]: e["done"] for e in lines if e["type"] == "phase_end" and e.get("phase") == phase and "part" in e}


@pytest.mark.parametrize("server_fixture", ["seaweed", "seaweed_tls"])
def test_render_through_an_s3_store(tmp_path, monkeypatch, request, server_fixture):
    server = request.getfixturevalue(server_fixture)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    clip = make_clip(tmp_path / "clip.mp4", frames=20, width=64, height=36, fps=24)
    out = tmp_path / "out.mp4"
    url = f"s3://{BUCKET}/e2e-{uuid.uuid4().hex[:8]}"
    result = runner.invoke(app, ["render", str(clip), "-o", str(out), "--scale", "2", "--segment-frames", "8",
                                 "--storage", url, "--json"])
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    for event in lines:
        events.validate_event(event)
    assert [p["phase"] for p in lines[0]["phases"]] == [
        "prepare", "upload", "load_model", "upscale", "encode", "download", "finalize"]
    assert phase_bytes(lines, "upload") == {"clip-01": clip.stat().st_size}
    downloaded = phase_bytes(lines, "download")
    assert sorted(downloaded) == ["seg-0001", "seg-0002", "seg-0003"] and all(downloaded.values())
    indices, size, video_s, audio_s = decode(out)
    assert indices == list(range(20)) and size == (128, 72)
    assert abs(audio_s - video_s) <= 1 / 24
    assert server.secret_key not in result.stdout + result.stderr

    again = runner.invoke(app, ["render", str(clip), "-o", str(tmp_path / "again.mp4"), "--scale", "2",
                                "--segment-frames", "8", "--storage", url, "--json"])
    assert again.exit_code == 0, again.stderr
    second = [json.loads(line) for line in again.stdout.splitlines()]
    assert not [e for e in second if e["type"] == "phase_start" and e.get("phase") == "upscale" and "part" in e]
    def upload_marks(events_):
        return {e.get("skipped") for e in events_ if e.get("phase") == "upload" and "part" in e}

    assert (upload_marks(lines), upload_marks(second)) == ({None}, {True}), "only the second upload was skipped"
    tracker = Tracker()
    for event in second:
        tracker.feed(event)
    snap = tracker.snapshot(second[-1]["t"])
    assert skip_notes(snap.phases, snap.info) == ["upload skipped: already in the store",
                                                  "3 of 3 segments already rendered"]


def test_wrong_credentials_name_the_endpoint_not_the_secret(tmp_path, monkeypatch, seaweed):  # noqa: F811
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-Zz93")
    clip = make_clip(tmp_path / "clip.mp4", frames=4, width=32, height=18, fps=24)
    result = runner.invoke(app, ["render", str(clip), "-o", str(tmp_path / "o.mp4"),
                                 "--storage", f"s3://{BUCKET}/x", "--progress", "none"])
    assert result.exit_code == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert seaweed.endpoint_url in line and "not-the-secret" not in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_store_down_fails_resumably_then_resume_finishes(tmp_path, monkeypatch):
    from tests.s3server import SeaweedServer

    with SeaweedServer(tmp_path / "weed") as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        clip = make_clip(tmp_path / "clip.mp4", frames=12, width=64, height=36, fps=24)
        out = tmp_path / "out.mp4"
        server.kill()
        failed = runner.invoke(app, ["render", str(clip), "-o", str(out), "--scale", "2", "--segment-frames", "6",
                                     "--storage", f"s3://{BUCKET}/down", "--progress", "none"])
        assert failed.exit_code == 75, failed.stderr
        line = failed.stderr.strip().splitlines()[-1]
        job = line.split("clipexport resume ")[1].rstrip("`)")
        assert server.endpoint_url in line and "Traceback" not in failed.stderr
        assert not out.exists()
        server.start()
        resumed = runner.invoke(app, ["resume", job, "--progress", "none"])
        assert resumed.exit_code == 0, resumed.stderr
        assert decode(out)[0] == list(range(12))
