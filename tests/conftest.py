"""Shared test set-up: the whole run sees a temporary HOME, every test its own clipexport home.

HOME and every XDG directory point at a temporary folder for the whole run
(set at import, before any test module reads them), so no test can read or
write a user's files; the session fails if anything under the real user's
clipexport directories changed anyway. Converted model weights are cached once
per session (converting is the slow part), and weights come from the offline
package: no test reaches the network.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_REAL_HOME = Path(os.path.expanduser("~"))
_REAL_DIRS = [
    _REAL_HOME / ".local" / "share" / "clipexport",
    _REAL_HOME / ".local" / "state" / "clipexport",
    _REAL_HOME / ".cache" / "clipexport",
    _REAL_HOME / ".config" / "clipexport",
]
_FAKE_HOME = Path(tempfile.mkdtemp(prefix="clipexport-test-home-"))
os.environ["HOME"] = str(_FAKE_HOME)
for _var, _sub in (("XDG_DATA_HOME", ".local/share"), ("XDG_STATE_HOME", ".local/state"),
                   ("XDG_CACHE_HOME", ".cache"), ("XDG_CONFIG_HOME", ".config"),
                   ("XDG_RUNTIME_DIR", "run")):
    os.environ[_var] = str(_FAKE_HOME / _sub)
    (_FAKE_HOME / _sub).mkdir(parents=True, exist_ok=True)


def _snapshot(dirs: list[Path]) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file under the real user's clipexport directories."""
    seen: dict[str, tuple[int, int]] = {}
    for root in dirs:
        for path in root.rglob("*") if root.is_dir() else []:
            if path.is_file():
                st = path.stat()
                seen[str(path)] = (st.st_size, st.st_mtime_ns)
    return seen


@pytest.fixture(scope="session", autouse=True)
def real_user_files_untouched():
    before = _snapshot(_REAL_DIRS)
    yield
    after = _snapshot(_REAL_DIRS)
    shutil.rmtree(_FAKE_HOME, ignore_errors=True)
    assert after == before, "the test run changed files under the real user's clipexport directories"


@pytest.fixture(scope="session")
def weights_cache(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("weights-cache")


@pytest.fixture(autouse=True)
def clipexport_home(tmp_path, monkeypatch, weights_cache):
    home = tmp_path / "clipexport-home"
    monkeypatch.setenv("CLIPEXPORT_HOME", str(home))
    monkeypatch.setenv("CLIPEXPORT_CACHE_DIR", str(weights_cache))
    monkeypatch.setenv("CLIPEXPORT_WEIGHTS_SOURCE", "offline")
    monkeypatch.delenv("CLIPEXPORT_CONFIG", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    return home
