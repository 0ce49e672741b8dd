"""Every setting and environment variable, declared once.

Each `Option` says its name, type, allowed values or range, the environment
variable that sets it and its default. `config` reads names, variables and
types from here; `validate` checks every value against it before a job
exists; the modules that read an environment variable at run time
(`upscale.engine`, `upscale.weights`) read it through `env_value`, so a value
refused at validation is refused the same way wherever it is read.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

from clipexport.errors import UsageError


@dataclass(frozen=True)
class Option:
    """One setting: how it is named, typed, bounded and defaulted."""

    name: str
    kind: type
    default: Any = None
    env: str | None = None
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    pattern: str | None = None  # a full match, for values such as "cuda:1"
    flag: str | None = None  # how messages name it when set on the command line

    @property
    def label(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def parse(self, value: Any, origin: str | None = None) -> Any:
        """`value` converted to `kind` and checked; UsageError naming `origin` otherwise."""
        shown = origin or self.label
        if value is None:
            return None
        converted = _convert(self.kind, value, shown)
        self._check(converted, shown)
        return converted

    def _check(self, value: Any, shown: str) -> None:
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(str(c) for c in self.choices)
            raise UsageError(f"{shown} {value!r} is not one of {allowed}")
        if self.pattern is not None and not re.fullmatch(self.pattern, str(value)):
            raise UsageError(f"{shown} {value!r} is not valid ({_describe(self)})")
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            raise UsageError(f"{shown} {value}: must be {_range(self)}")


def _convert(kind: type, value: Any, shown: str) -> Any:
    if kind is str:
        return str(value).strip()
    if isinstance(value, bool):
        raise UsageError(f"{shown}: expected a number, got {value!r}")
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            number: Any = int(value) if not isinstance(value, str) else int(value.strip(), 10)
        else:
            number = float(value)
    except (TypeError, ValueError, OverflowError):
        what = "a whole number" if kind is int else "a number"
        raise UsageError(f"{shown}: expected {what}, got {value!r}") from None
    if kind is float and not math.isfinite(number):
        raise UsageError(f"{shown}: expected a finite number, got {value!r}")
    return number


def _range(option: Option) -> str:
    if option.low is not None and option.high is not None:
        return f"between {option.low:g} and {option.high:g}"
    if option.low is not None:
        return f"at least {option.low:g}"
    return f"at most {option.high:g}"


def _describe(option: Option) -> str:
    return {"device": "use auto, cpu, cuda or cuda:N"}.get(option.name, f"expected {option.pattern}")


_TINY = 1e-3  # seconds: the smallest refresh interval that is not a busy loop

#: Render settings: the fields of `config.Settings`, in the same order.
SETTINGS: tuple[Option, ...] = (
    Option("model", str, "realesr-animevideov3", env="CLIPEXPORT_MODEL"),  # checked against the registry
    Option("scale", int, None, choices=(2, 4)),
    Option("codec", str, "h264", env="CLIPEXPORT_CODEC", choices=("h264", "hevc")),
    Option("crf", int, None, low=0, high=51),
    Option("segment_frames", int, 240, env="CLIPEXPORT_SEGMENT_FRAMES", low=1, high=100_000),
    Option("backend", str, "local", env="CLIPEXPORT_BACKEND", choices=("local", "modal")),
    Option("storage", str, None, env="CLIPEXPORT_STORAGE"),  # checked by opening it (storage.open_storage)
    Option("endpoint_url", str, None, env="CLIPEXPORT_S3_ENDPOINT"),
    Option("parallel", int, 3, env="CLIPEXPORT_PARALLEL", low=1, high=100),
    Option("gpu", str, None, env="CLIPEXPORT_GPU"),  # checked by backends.modal.check_gpu
    Option("device", str, "auto", env="CLIPEXPORT_DEVICE", pattern=r"auto|cpu|cuda(:[0-9]+)?"),
    Option("precision", str, "auto", env="CLIPEXPORT_PRECISION"),  # checked by upscale.precision.normalise
)

#: Options of other commands, and environment variables read outside `config`.
OTHERS: tuple[Option, ...] = (
    Option("progress", str, "auto", choices=("auto", "rich", "plain", "json", "none")),
    Option("interval", float, 1.0, low=_TINY, high=86_400.0),
    Option("tile", int, None, env="CLIPEXPORT_TILE", low=0, high=65_536, flag="CLIPEXPORT_TILE"),
    Option("cpu_dtype", str, None, env="CLIPEXPORT_CPU_DTYPE", flag="CLIPEXPORT_CPU_DTYPE",  # precision's old name
           choices=("auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16", "half")),
    Option("weights_source", str, "auto", env="CLIPEXPORT_WEIGHTS_SOURCE", flag="CLIPEXPORT_WEIGHTS_SOURCE",
           choices=("auto", "offline", "download")),
    Option("log_level", str, "WARNING", env="CLIPEXPORT_LOG_LEVEL", flag="CLIPEXPORT_LOG_LEVEL",
           choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
)

OPTIONS: dict[str, Option] = {o.name: o for o in SETTINGS + OTHERS}
BY_ENV: dict[str, Option] = {o.env: o for o in SETTINGS + OTHERS if o.env}


def env_value(variable: str) -> Any:
    """The parsed value of an environment variable in the table, or its default when unset or empty."""
    option = BY_ENV[variable]
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return option.default
    value = raw.upper() if option.name == "log_level" else raw.lower() if option.kind is str else raw
    return option.parse(value, variable)


def check_environment() -> None:
    """Every variable in the table that is set must parse: one UsageError for the first that does not."""
    for variable in BY_ENV:
        env_value(variable)


def check(name: str, value: Any) -> Any:
    """A command-line value checked against its option."""
    return OPTIONS[name].parse(value)
