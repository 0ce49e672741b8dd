"""Shared test set-up: every test gets its own clipexport home.

Converted model weights are cached once per session (converting is the slow
part), and weights come from the offline package: no test reaches the network.
"""

from __future__ import annotations

import pytest


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
