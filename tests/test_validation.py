"""The one validation pass: every bad input is refused before a job exists.

One table of hostile cases, each run through the real entry point
(`cli.main`, in-process for speed), each asserting: exit code 2, exactly one
line on stderr naming the problem, nothing on stdout, no job in
`clipexport jobs`, nothing at the output path (nor a hidden temporary file
beside it). A few cases run as real subprocesses (stderr closed, a parse
error as a user sees it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipexport import cli
from tests.clips import make_bad_files, make_clip


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Real clips and files the cases refer to as {name}; made once for the table."""
    d = tmp_path_factory.mktemp("media")
    bad = make_bad_files(d / "bad")
    fifo = d / "pipe.mp4"
    os.mkfifo(fifo)
    (d / "garbage.log").write_text("not json\n{broken\n42\n")
    (d / "model.json").write_text("this is not JSON")
    trace = d / "trace.jsonl"
    trace.write_text('{"v":1,"job":"cx-1","seq":0,"t":1.0,"type":"plan","phases":[],"features":{}}\n')
    (d / "exists.mp4").write_bytes(b"keep me")
    (d / "adir.mp4").mkdir()
    weights = d / "w.pth"
    weights.write_bytes(b"x")
    import torch
    from safetensors.torch import save_file

    save_file({"conv_first.weight": torch.zeros(8, 3, 3, 3)}, str(d / "wrong.safetensors"))
    return {
        "clip": str(make_clip(d / "good.mp4", frames=6, width=64, height=36, audio=False)),
        "wide": str(make_clip(d / "wide.mp4", frames=2, width=4100, height=16, audio=False)),
        "thin": str(make_clip(d / "thin.mp4", frames=2, width=32, height=8, audio=False)),
        "text": str(bad.text), "empty": str(bad.empty), "audio_only": str(bad.audio_only),
        "truncated": str(bad.truncated), "truncated_index": str(bad.truncated_index),
        "fifo": str(fifo), "garbage": str(d / "garbage.log"), "badmodel": str(d / "model.json"),
        "trace": str(trace), "exists": str(d / "exists.mp4"), "adir": str(d / "adir.mp4"),
        "weights": str(weights), "wrong_weights": str(d / "wrong.safetensors"), "media": str(d),
    }


def _cuda_case() -> str:
    import torch

    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


R = ("render", "{clip}", "-o", "{out}")
CASES: list[tuple[str, tuple[str, ...], dict[str, str], str]] = [
    # Click's own parse errors: one line, not a box
    ("scale-not-a-number", (*R, "--scale", "abc"), {}, "--scale"),
    ("crf-not-a-number", (*R, "--crf", "abc"), {}, "--crf"),
    ("crf-huge", (*R, "--crf", "1e20"), {}, "--crf"),
    ("segment-frames-not-a-number", (*R, "--segment-frames", "x"), {}, "--segment-frames"),
    ("parallel-not-a-number", (*R, "--parallel", "two"), {}, "--parallel"),
    ("no-output", ("render", "{clip}"), {}, "-o OUTPUT"),
    ("unknown-option", (*R, "--bogus"), {}, "--bogus"),
    ("unknown-command", ("rendr",), {}, "rendr"),
    ("interval-not-a-number", ("status", "--interval", "soon"), {}, "--interval"),
    # every number in range
    ("scale-0", (*R, "--scale", "0"), {}, "--scale 0"),
    ("scale-3", (*R, "--scale", "3"), {}, "--scale 3"),
    ("scale-negative", (*R, "--scale", "-2"), {}, "--scale -2"),
    ("crf-negative", (*R, "--crf", "-1"), {}, "--crf -1"),
    ("crf-52", (*R, "--crf", "52"), {}, "--crf 52"),
    ("segment-frames-0", (*R, "--segment-frames", "0"), {}, "--segment-frames 0"),
    ("segment-frames-negative", (*R, "--segment-frames", "-5"), {}, "--segment-frames -5"),
    ("segment-frames-huge", (*R, "--segment-frames", "100001"), {}, "--segment-frames 100001"),
    ("parallel-0", (*R, "--parallel", "0"), {}, "--parallel 0"),
    ("parallel-huge", (*R, "--parallel", "101"), {}, "--parallel 101"),
    ("codec", (*R, "--codec", "vp9"), {}, "vp9"),
    ("backend", (*R, "--backend", "gpu"), {}, "'gpu'"),
    ("device-gpu", (*R, "--device", "gpu"), {}, "--device 'gpu'"),
    ("device-cuda-x", (*R, "--device", "cuda:x"), {}, "cuda:x"),
    ("device-cuda-missing", (*R, "--device", _cuda_case()), {}, "CUDA"),
    ("progress-fancy", (*R, "--progress", "fancy"), {}, "fancy"),
    ("unknown-model", (*R, "--model", "realesrgan-x8"), {}, "realesrgan-x8"),
    ("scale-the-model-lacks", (*R, "--model", "realesrgan-x2plus", "--scale", "4"), {}, "realesrgan-x2plus"),
    ("weights-missing", (*R, "--weights", "{media}/none.pth"), {}, "none.pth"),
    ("weights-not-a-checkpoint", (*R, "--weights", "{weights}"), {}, "w.pth"),
    ("weights-wrong-architecture", (*R, "--weights", "{wrong_weights}"), {}, "wrong.safetensors"),
    ("weights-not-to-be-had", (*R, "--model", "realesr-general-x4v3"), {"CLIPEXPORT_WEIGHTS_SOURCE": "offline"},
     "model realesr-general-x4v3: no weights"),
    # every environment variable the tool reads
    ("env-tile-word", R, {"CLIPEXPORT_TILE": "big"}, "CLIPEXPORT_TILE"),
    ("env-tile-negative", R, {"CLIPEXPORT_TILE": "-1"}, "CLIPEXPORT_TILE"),
    ("env-cpu-dtype", R, {"CLIPEXPORT_CPU_DTYPE": "float64"}, "float64"),
    ("env-precision", R, {"CLIPEXPORT_PRECISION": "fp8"}, "fp8"),
    ("precision", (*R, "--precision", "fp8"), {}, "fp8"),
    ("env-weights-source", R, {"CLIPEXPORT_WEIGHTS_SOURCE": "sometimes"}, "CLIPEXPORT_WEIGHTS_SOURCE"),
    ("env-segment-frames-0", R, {"CLIPEXPORT_SEGMENT_FRAMES": "0"}, "CLIPEXPORT_SEGMENT_FRAMES"),
    ("env-segment-frames-word", R, {"CLIPEXPORT_SEGMENT_FRAMES": "lots"}, "CLIPEXPORT_SEGMENT_FRAMES"),
    ("env-parallel", R, {"CLIPEXPORT_PARALLEL": "0"}, "CLIPEXPORT_PARALLEL"),
    ("env-codec", R, {"CLIPEXPORT_CODEC": "av1"}, "CLIPEXPORT_CODEC"),
    ("env-device", R, {"CLIPEXPORT_DEVICE": "gpu"}, "CLIPEXPORT_DEVICE"),
    ("env-backend", R, {"CLIPEXPORT_BACKEND": "cloud"}, "CLIPEXPORT_BACKEND"),
    ("env-model", R, {"CLIPEXPORT_MODEL": "nope"}, "nope"),
    ("env-storage", R, {"CLIPEXPORT_STORAGE": "ftp://host/x"}, "ftp://host/x"),
    ("env-endpoint", (*R, "--storage", "s3://bucket"), {"CLIPEXPORT_S3_ENDPOINT": "ftp://h"}, "endpoint URL"),
    ("env-r2-account", (*R, "--storage", "r2://bucket"), {"R2_ACCOUNT_ID": "not an id!"}, "R2_ACCOUNT_ID"),
    ("config-crf", R, {"CONFIG": "crf = 99\n"}, "crf 99"),
    ("config-unknown", R, {"CONFIG": "colour = 'red'\n"}, "colour"),
    ("config-not-toml", R, {"CONFIG": "crf = = 1\n"}, "TOML"),
    ("config-wrong-type", R, {"CONFIG": "parallel = 'many'\n"}, "parallel"),
    # storage URLs and R2/S3 settings
    ("storage-ftp", (*R, "--storage", "ftp://host/x"), {}, "ftp://host/x"),
    ("storage-s3-no-bucket", (*R, "--storage", "s3://"), {}, "bucket"),
    ("storage-s3-path-no-bucket", (*R, "--storage", "s3:///prefix"), {}, "bucket"),
    ("storage-bad-bucket", (*R, "--storage", "s3://Bad_Bucket"), {}, "Bad_Bucket"),
    ("storage-query", (*R, "--storage", "s3://bucket/p?x=1"), {}, "query"),
    ("storage-r2-no-account", (*R, "--storage", "r2://bucket/p"), {}, "R2_ACCOUNT_ID"),
    ("storage-file-host", (*R, "--storage", "file://host/dir"), {}, "file:///"),
    ("endpoint-scheme", (*R, "--storage", "s3://bucket", "--endpoint-url", "ftp://h"), {}, "endpoint URL"),
    ("endpoint-broken-ipv6", (*R, "--storage", "s3://bucket", "--endpoint-url", "http://[::1"), {},
     "the S3 endpoint (--endpoint-url, CLIPEXPORT_S3_ENDPOINT) is not a valid URL"),
    ("storage-broken-ipv6", (*R, "--storage", "s3://[bucket"), {}, "--storage is not a valid URL"),
    ("modal-no-storage", (*R, "--backend", "modal"), {}, "--storage"),
    ("modal-local-storage", (*R, "--backend", "modal", "--storage", "file:///tmp"), {}, "--storage"),
    ("modal-weights", (*R, "--backend", "modal", "--storage", "s3://bucket", "--weights", "{weights}"), {},
     "--weights"),
    ("modal-gpu-list", (*R, "--backend", "modal", "--storage", "s3://bucket", "--gpu", "L4,T4"), {}, "--gpu"),
    ("modal-no-token", (*R, "--backend", "modal", "--storage", "s3://bucket"), {}, "modal token new"),
    # the output path
    ("output-suffix", ("render", "{clip}", "-o", "{tmp}/out.gif"), {}, "out.gif"),
    ("output-dir-missing", ("render", "{clip}", "-o", "{tmp}/no/such/out.mp4"), {}, "does not exist"),
    ("output-dir-unwritable", ("render", "{clip}", "-o", "/proc/out.mp4"), {}, "not writable"),
    ("output-is-dir", ("render", "{clip}", "-o", "{adir}"), {}, "is a directory"),
    ("output-exists", ("render", "{clip}", "-o", "{exists}"), {}, "already exists"),
    ("output-is-input", ("render", "{clip}", "-o", "{clip}", "--force"), {}, "overwrite an input"),
    ("output-name-240-bytes", ("render", "{clip}", "-o", "{tmp}/" + "a" * 236 + ".mp4"), {}, "temporary name"),
    ("output-name-255-bytes", ("render", "{clip}", "-o", "{tmp}/" + "é" * 125 + "a.mp4"), {}, "temporary name"),
    ("output-name-256-bytes", ("render", "{clip}", "-o", "{tmp}/" + "a" * 252 + ".mp4"), {}, "256 bytes"),
    # inputs
    ("input-missing", ("render", "{media}/nope.mp4", "-o", "{out}"), {}, "nope.mp4"),
    ("input-fifo", ("render", "{fifo}", "-o", "{out}"), {}, "FIFO"),
    ("input-dev-zero", ("render", "/dev/zero", "-o", "{out}"), {}, "character device"),
    ("input-proc", ("render", "/proc/self/status", "-o", "{out}"), {}, "/proc"),
    ("input-text", ("render", "{text}", "-o", "{out}"), {}, "notes.mp4"),
    ("input-empty", ("render", "{empty}", "-o", "{out}"), {}, "empty"),
    ("input-truncated", ("render", "{truncated}", "-o", "{out}"), {}, "truncated.mp4"),
    ("input-truncated-index", ("render", "{truncated_index}", "-o", "{out}"), {}, "truncated"),
    ("input-audio-only", ("render", "{audio_only}", "-o", "{out}"), {}, "audio only"),
    ("input-directory", ("render", "{media}", "-o", "{out}"), {}, "directory"),
    # the plan
    ("trim-outside", (*R, "--trim", "5-6"), {}, "trim"),
    ("trim-malformed", (*R, "--trim", "abc"), {}, "abc"),
    ("crop-malformed", (*R, "--crop", "64:36"), {}, "64:36"),
    ("crop-outside", (*R, "--crop", "64:36:10:0"), {}, "crop"),
    ("trim-count", ("render", "{clip}", "{clip}", "{clip}", "-o", "{out}", "--trim", "0-0.1", "--trim", "0-0.2"),
     {}, "--trim"),
    # the encoder's limits for the planned output size
    ("x264-too-wide", ("render", "{wide}", "-o", "{out}", "--scale", "4"), {}, "16400x64"),
    ("x265-too-small", ("render", "{thin}", "-o", "{out}", "--scale", "2", "--codec", "hevc"), {}, "64x16"),
    # other commands
    ("interval-0", ("status", "--watch", "--interval", "0"), {}, "--interval 0"),
    ("interval-negative", ("status", "--watch", "--interval", "-1"), {}, "--interval -1"),
    ("interval-nan", ("status", "--watch", "--interval", "nan"), {}, "--interval"),
    ("interval-inf", ("status", "--interval", "inf"), {}, "--interval"),
    ("replay-model-not-json", ("eta", "replay", "{trace}", "--model", "{badmodel}"), {}, "model.json"),
    ("replay-model-missing", ("eta", "replay", "{trace}", "--model", "{media}/none.json"), {}, "none.json"),
    ("replay-garbage-trace", ("eta", "replay", "{garbage}"), {}, "garbage.log"),
    ("fit-garbage-log", ("eta", "fit", "{garbage}", "-o", "{tmp}/m.json"), {}, "garbage.log"),
    ("fit-missing-log", ("eta", "fit", "{media}/none.log", "-o", "{tmp}/m.json"), {}, "none.log"),
    ("resume-unknown-job", ("resume", "cx-000000"), {}, "cx-000000"),
    ("resume-progress", ("resume", "cx-000000", "--progress", "fancy"), {}, "fancy"),
    ("cancel-unknown-job", ("cancel", "cx-000000"), {}, "cx-000000"),
    ("log-level", ("jobs",), {"CLIPEXPORT_LOG_LEVEL": "LOUD"}, "CLIPEXPORT_LOG_LEVEL"),
]
_UNSET = ("CLIPEXPORT_PRECISION", "R2_ACCOUNT_ID", "CLIPEXPORT_S3_ENDPOINT", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "CLIPEXPORT_STORAGE",
          "CLIPEXPORT_BACKEND", "CLIPEXPORT_DEVICE", "CLIPEXPORT_TILE", "CLIPEXPORT_CPU_DTYPE", "CLIPEXPORT_LOG_LEVEL")


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The console entry point in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    out, err = capsys.readouterr()
    return stopped.value.code, out, err


def _listing(folder: Path) -> list[str]:
    """What a case may leave in its folder: nothing but the state dir of `clipexport jobs`."""
    return sorted(p.name for p in folder.iterdir() if p.name != "clipexport-home")


def test_the_table_is_big_enough():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("args", "env", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_a_job_exists(args, env, needle, media, tmp_path, monkeypatch, capsys):
    for name in _UNSET:
        monkeypatch.delenv(name, raising=False)
    saved = {name: os.environ.get(name) for name in [*env, "CLIPEXPORT_CONFIG"]}
    for name, value in env.items():
        if name == "CONFIG":
            (tmp_path / "config.toml").write_text(value)
            monkeypatch.setenv("CLIPEXPORT_CONFIG", str(tmp_path / "config.toml"))
        else:
            monkeypatch.setenv(name, value)
    out = tmp_path / "out.mp4"
    argv = [a.format(out=out, tmp=tmp_path, **media) for a in args]
    before = _listing(tmp_path)

    code, stdout, stderr = run_main(argv, capsys)

    lines = stderr.splitlines()
    assert code == 2, (code, stderr)
    assert len(lines) == 1 and lines[0].startswith("clipexport: error: "), stderr
    assert needle in lines[0], (needle, lines[0])
    assert stdout == "" and "Traceback" not in stderr
    assert not out.exists() and _listing(tmp_path) == before  # no hidden file either
    assert Path(media["exists"]).read_bytes() == b"keep me"
    for name, value in saved.items():  # `jobs` itself must run: undo what only the bad case wanted
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert run_main(["jobs"], capsys) == (0, "", ""), "a refused command must not create a job"


def _subprocess(args: list[str], *, stderr: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    code = "from clipexport.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=stderr, text=True,
                          timeout=120)


def test_a_parse_error_is_one_line_in_a_real_process(media, tmp_path):
    proc = _subprocess(["render", media["clip"], "-o", str(tmp_path / "o.mp4"), "--scale", "abc"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "--scale" in proc.stderr and "│" not in proc.stderr


def test_with_stderr_closed_nothing_reaches_stdout(media, tmp_path):
    """`2>&-`: Python has no sys.stderr; the error must not land on stdout."""
    out = tmp_path / "o.mp4"
    argv = [sys.executable, "-c", "from clipexport.cli import main; main()", "render", media["clip"], "-o", str(out),
            "--device", "gpu"]
    proc = subprocess.run(["sh", "-c", '"$@" 2>&-', "sh", *argv], stdout=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert not out.exists()
    jobs = _subprocess(["jobs"])
    assert jobs.returncode == 0 and jobs.stdout == ""
