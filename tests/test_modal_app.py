"""`modal_app.py` and the boundary to Modal, with no token and no network.

- the app imports with no token (as `modal deploy` and CI need);
- its class runs in-process with `.local()` (which runs `@modal.enter`);
- `RealModalClient` fails in well under 2 s with one clear line when there
  is no token, and translates Modal's exceptions into clipexport's;
- the CLI, once `--backend modal` is wired, fails fast the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipexport.backends.modal import (
    NO_TOKEN,
    NOT_DEPLOYED,
    CallCancelled,
    CallExpired,
    CallFailed,
    CallTimedOut,
    ModalBusy,
    ModalUnreachable,
    check_gpu,
    check_storage,
    translate_error,
)
from clipexport.errors import BackendError, UsageError
from clipexport.remote import channel_prefix, task_to_dict
from tests.fake_modal import MODEL, SCALE, make_job

ROOT = Path(__file__).resolve().parent.parent


def no_token_env(home: Path) -> dict[str, str]:
    """This environment without any Modal credential: an empty home, no MODAL_* variables."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env["HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


# "Fails fast" means "asks no server": any network use in the process exits it with this mark.
NO_NETWORK = (
    "import os, sys\n"
    "def _guard(event, args):\n"
    "    if event in ('socket.connect', 'socket.getaddrinfo'):\n"
    "        print('network used:', event, args[1:2], file=sys.stderr, flush=True); os._exit(99)\n"
    "sys.addaudithook(_guard)\n"
)


# -- modal_app.py ------------------------------------------------------------------


def test_modal_app_imports_without_a_token(tmp_path):
    code = (
        "import modal_app\n"
        "print(modal_app.app.name)\n"
        "print(type(modal_app.Upscaler).__name__)\n"
    )
    proc = run_python(code, no_token_env(tmp_path / "home"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["clipexport", "Cls"]


def test_modal_app_gpu_fallbacks_from_the_environment(tmp_path):
    env = no_token_env(tmp_path / "home")
    env["CLIPEXPORT_MODAL_GPUS"] = "A100, L4"
    env["CLIPEXPORT_GPU"] = "T4"  # the client's one-type setting does not change the deployment
    proc = run_python("import modal_app; print(modal_app._gpus())", env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['A100', 'L4']"
    env["CLIPEXPORT_TIMEOUT_S"] = "soon"
    proc = run_python("import modal_app", env)
    assert proc.returncode != 0 and "CLIPEXPORT_TIMEOUT_S" in proc.stderr


def test_upscaler_runs_locally_with_its_enter_hook(tmp_path, monkeypatch):
    import modal_app

    monkeypatch.setenv("CLIPEXPORT_WORK_DIR", str(tmp_path / "work"))
    job = make_job(tmp_path, frames=12, segment_frames=12)
    obj = modal_app.Upscaler(model=MODEL, scale=SCALE)
    warm = obj.warm_up.local()  # the first input after `enter`: a cold container
    assert warm["cold"] is True and warm["load_s"] >= 0
    dicts = [task_to_dict(t) for t in job.tasks]
    result = obj.run.local(dicts, job.storage.url, None)
    assert result["segments"][0]["part"] == "seg-0001"
    assert result["segments"][0]["frames"] == 12 and not result["segments"][0]["skipped"]
    assert "error" not in result
    assert job.storage.stat(job.tasks[0].key).size == result["segments"][0]["bytes"]
    assert job.storage.list(channel_prefix(job.id))  # progress went to the channel
    # the same input again (a retried call): nothing is redone
    again = obj.run.local(dicts, job.storage.url, None)
    assert again["segments"][0]["skipped"] is True
    assert obj.warm_up.local()["cold"] is False


# -- RealModalClient ---------------------------------------------------------------


def test_no_token_fails_fast_with_one_clear_line(tmp_path):
    code = NO_NETWORK + (
        "from clipexport.backends.modal import RealModalClient\n"
        "from clipexport.errors import BackendError\n"
        "try:\n"
        "    RealModalClient()\n"
        "except BackendError as exc:\n"
        "    print(exc.resumable, exc, sep='|')\n"
    )
    proc = run_python(code, no_token_env(tmp_path / "home"))
    assert proc.returncode == 0, proc.stderr  # 99: it asked a server before failing
    resumable, message = proc.stdout.strip().split("|")
    assert message == NO_TOKEN and "\n" not in message
    assert "modal token new" in message and "MODAL_TOKEN_ID" in message
    assert resumable == "False"


def test_a_token_in_the_environment_is_enough_to_construct(tmp_path):
    env = no_token_env(tmp_path / "home")
    env.update(MODAL_TOKEN_ID="ak-test", MODAL_TOKEN_SECRET="as-test")
    code = NO_NETWORK + "from clipexport.backends.modal import RealModalClient; RealModalClient(); print('ok')"
    proc = run_python(code, env)  # no call is made, so nothing waits on the (unreachable) server
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_a_token_in_modal_toml_is_found(tmp_path):
    home = tmp_path / "home"
    env = no_token_env(home)
    (home / ".modal.toml").write_text('[default]\ntoken_id = "ak-x"\ntoken_secret = "as-x"\n')
    code = "from clipexport.backends.modal import has_modal_token; print(has_modal_token())"
    proc = run_python(code, env)
    assert proc.stdout.strip() == "True", proc.stderr


def _modal_error(name: str, message: str):
    from modal import exception

    return getattr(exception, name)(message)


@pytest.mark.parametrize(
    ("exc", "deploying", "kind", "resumable", "says"),
    [
        (("AuthError", "Token ID is malformed"), True, BackendError, False, "modal token new"),
        (("NotFoundError", "App 'clipexport' not found in environment 'main'"), True, BackendError, False,
         "modal deploy modal_app.py"),
        (("NotFoundError", "FunctionCall fc-123 not found"), False, CallExpired, True, "does not know the call"),
        (("OutputExpiredError", ""), False, CallExpired, True, "expired"),
        (("FunctionTimeoutError", "Function timed out after 1800s"), False, CallTimedOut, True, "time limit"),
        (("RemoteError", "Traceback (most recent call last):\n  File x\nValueError: bad frame"), False,
         CallFailed, True, "RemoteError: ValueError: bad frame"),
        (("ConnectionError", "Deadline exceeded"), True, ModalUnreachable, True, "cannot reach Modal"),
        (("ServiceError", "UNAVAILABLE"), False, ModalBusy, True, "did not answer"),
        (("InternalError", "internal"), False, ModalBusy, True, "did not answer"),
        (("ResourceExhaustedError", "rate limited"), False, ModalBusy, True, "did not answer"),
        (("ClientClosed", "closed"), False, ModalBusy, True, "did not answer"),
        (("RemoteError", ""), False, CallCancelled, True, "cancelled"),
        (("InvalidError", "GPU type 'X1' is not supported"), True, BackendError, False, "Modal refused"),
    ],
)
def test_modal_errors_are_translated(exc, deploying, kind, resumable, says):
    error = translate_error(_modal_error(*exc), deploying=deploying)
    assert type(error) is kind
    assert error.resumable is resumable
    assert says in str(error) and "\n" not in str(error)


def test_not_deployed_message_names_the_command():
    assert NOT_DEPLOYED == "app clipexport is not deployed: run `modal deploy modal_app.py`"


def test_gpu_is_one_type():
    check_gpu(None)
    check_gpu("A100-80GB")
    check_gpu("H100:2")
    for bad in ("L4,A10G", "", "L4 A10G"):
        with pytest.raises(UsageError, match="one GPU type"):
            check_gpu(bad)


def test_modal_needs_a_bucket_not_a_directory():
    check_storage("r2://bucket/prefix")
    check_storage("s3://bucket")
    for url in (None, "file:///tmp/x"):
        with pytest.raises(UsageError, match="--storage r2://"):
            check_storage(url)


# -- the CLI -----------------------------------------------------------------------


def _cli_has_modal() -> bool:
    proc = subprocess.run([sys.executable, "-m", "clipexport", "render", "--help"], capture_output=True, text=True,
                          timeout=60)
    return "--backend" in proc.stdout


def test_cli_without_token_fails_fast_and_clearly(tmp_path):
    assert _cli_has_modal(), "render --help shows no --backend flag"
    from tests.clips import make_clip

    clip = make_clip(tmp_path / "clip.mp4", frames=6)
    env = no_token_env(tmp_path / "home")
    argv = ["render", str(clip), "-o", str(tmp_path / "out.mp4"), "--backend", "modal",
            "--storage", (tmp_path / "bucket").as_uri()]
    code = NO_NETWORK + f"from clipexport.cli import main\nmain({argv!r})\n"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode in (1, 2), (proc.returncode, proc.stderr)  # 99: it asked a server first
    assert len(lines) == 1 and "token" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.mp4").exists()
