"""Settings: flags > environment > config file > defaults.

The config file is TOML at `<config dir>/config.toml` with the same names as
the long flags (`model = "realesr-animevideov3"`, `parallel = 3`, ...).
`CLIPEXPORT_HOME` moves every directory (state, data, cache, config) under
one folder: tests and sandboxed pipelines use it to stay off the user's home.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import platformdirs

from clipexport.errors import StateError, UsageError
from clipexport.options import OPTIONS, SETTINGS

APP = "clipexport"


def _dir(kind: str) -> Path:
    home = os.environ.get("CLIPEXPORT_HOME")
    if home:
        root = Path(home).expanduser().absolute()  # relative: fixed once, not per later chdir
        if root.exists() and not root.is_dir():
            raise StateError(f"CLIPEXPORT_HOME={root} is a file: point it at a folder (it is created if missing)")
        return root / kind
    finder = getattr(platformdirs, f"user_{kind}_dir")
    return Path(finder(APP))


def state_dir() -> Path:
    """Job store and event logs."""
    return _dir("state")


def data_dir() -> Path:
    """The embedded default store (inputs, segments) when no --storage is given."""
    return _dir("data")


def cache_dir() -> Path:
    """Downloaded and converted model weights."""
    return Path(os.environ.get("CLIPEXPORT_CACHE_DIR") or _dir("cache"))


def config_path() -> Path:
    return Path(os.environ.get("CLIPEXPORT_CONFIG") or _dir("config") / "config.toml")


@dataclass(frozen=True)
class Settings:
    """Defaults a render uses when its flags do not say otherwise (declared in `options.SETTINGS`)."""

    model: str = OPTIONS["model"].default
    scale: int | None = OPTIONS["scale"].default
    codec: str = OPTIONS["codec"].default
    crf: int | None = OPTIONS["crf"].default
    segment_frames: int = OPTIONS["segment_frames"].default
    backend: str = OPTIONS["backend"].default
    storage: str | None = OPTIONS["storage"].default
    endpoint_url: str | None = OPTIONS["endpoint_url"].default
    parallel: int = OPTIONS["parallel"].default
    gpu: str | None = OPTIONS["gpu"].default  # modal: None keeps the deployment's GPU fallback list
    device: str = OPTIONS["device"].default
    prices: dict[str, float] | None = None  # config file only: USD per hour by GPU type (clipexport/cost.py)
    precision: str = OPTIONS["precision"].default  # see clipexport.upscale.precision


_ENV = {o.name: o.env for o in SETTINGS if o.env}
# Older names still read when the new one is not set.
_ENV_ALIASES = {"precision": "CLIPEXPORT_CPU_DTYPE"}


def load_settings(flags: dict[str, Any] | None = None) -> Settings:
    """Merge the layers; `flags` holds only the flags the user gave (not None)."""
    settings = Settings()
    settings = _apply(settings, _read_file(config_path()), "config file")
    env = {k: OPTIONS[k].parse(os.environ[v], v) for k, v in _ENV_ALIASES.items() if os.environ.get(v, "").strip()}
    env.update({k: os.environ[v] for k, v in _ENV.items() if os.environ.get(v, "").strip()})
    settings = _apply(settings, env, "environment")
    return _apply(settings, {k: v for k, v in (flags or {}).items() if v is not None}, "flag")


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None


def _apply(settings: Settings, values: dict[str, Any], origin: str) -> Settings:
    known = {f.name for f in fields(Settings)}
    changes: dict[str, Any] = {}
    for name, value in values.items():
        name = name.replace("-", "_")
        if name not in known:
            if origin == "config file":
                raise UsageError(f"{config_path()}: unknown setting {name!r}")
            continue
        option = OPTIONS.get(name)  # a setting without a declaration (prices) is checked where it is used
        changes[name] = value if option is None else option.parse(value, _origin(name, origin))
    return replace(settings, **changes)


def _origin(name: str, origin: str) -> str:
    """How a message names where a value came from: the flag, the variable, the file's key."""
    if origin == "environment":
        return _ENV[name]
    if origin == "config file":
        return f"{config_path()}: {name}"
    return OPTIONS[name].label
