"""No secret at rest: credentials in a URL are refused before a job exists, and never written."""

from __future__ import annotations


from typer.testing import CliRunner

from clipexport.cli import app
from clipexport.jobs import JobStore
from tests.clips import make_clip

runner = CliRunner()
SECRET = "wJalrXUtnFEMIplantedSECRETbPxRfiCY"
REFUSED = [
    (["--endpoint-url", f"http://AKIDPLANTED:{SECRET}@127.0.0.1:9"], {}),
    ([], {"CLIPEXPORT_S3_ENDPOINT": f"https://AKIDPLANTED:{SECRET}@s3.example.com"}),
    (["--storage", f"s3://AKIDPLANTED:{SECRET}@bucket/prefix"], {}),
]


def test_urls_with_credentials_are_refused_and_no_secret_reaches_the_state_dir(tmp_path, clipexport_home,
                                                                                monkeypatch):
    clip = make_clip(tmp_path / "c.mp4", frames=6, width=32, height=18, fps=24)
    out = tmp_path / "out.mp4"
    for args, env in REFUSED:
        with monkeypatch.context() as scoped:
            for name, value in env.items():
                scoped.setenv(name, value)
            result = runner.invoke(app, ["render", str(clip), "-o", str(out), "--progress", "none", *args])
        assert result.exit_code == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert "must not carry credentials" in line and "AWS_ACCESS_KEY_ID" in line and "AWS_PROFILE" in line
        assert SECRET not in result.stderr + result.stdout and "AKIDPLANTED" not in line
        assert not out.exists() and not (clipexport_home / "state" / "jobs").exists(), "refused before any job"

    # A job that does run, with an endpoint it never uses (no --storage): the endpoint is not kept either.
    monkeypatch.setenv("CLIPEXPORT_S3_ENDPOINT", "http://127.0.0.1:9/unused-endpoint")
    result = runner.invoke(app, ["render", str(clip), "-o", str(out), "--progress", "none"])
    assert result.exit_code == 0, result.stderr
    (record,) = JobStore(clipexport_home / "state").all()
    assert record.spec.endpoint_url is None
    files = [p for p in clipexport_home.rglob("*") if p.is_file()]
    assert any(p.name == "jobs.db" for p in files) and any(p.name == "events.jsonl" for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes() and b"unused-endpoint" not in path.read_bytes(), path
