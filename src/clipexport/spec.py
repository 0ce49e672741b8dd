"""Spec files: a render described in TOML or JSON (`render --spec reel.toml`).

One declaration (`SPEC`, tables of `Field`s) drives both the validator and
the JSON Schema that `clipexport spec --schema` prints, so they cannot
disagree. A spec is checked completely before any job exists, in two steps:

1. `load_spec`: syntax (with its line), unknown keys and kinds, types and
   ranges, colours, trim and crop syntax (the `--trim`/`--crop` parsers),
   sources and images that are missing, keyframes out of order;
2. `check_media`, once the sources are probed and the scale is known: crop
   and trim against each clip, overlay times outside their clip, overlays
   that leave no pixel on screen.

Every problem is one `SpecError` line naming the file and the field:
``reel.toml: clips[2].overlays[0].kind: 'sparkle' is not one of text, box,
ellipse, spotlight, image``. Paths in a spec are relative to its file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from clipexport.errors import UsageError
from clipexport.media import ClipInfo, parse_crop, parse_trim, plan_clips
from clipexport.overlay import GEOMETRY, KINDS, decode_png, footprint, geometry_at, on_screen, parse_color
from clipexport.upscale.registry import MODELS

MAX_IMAGE_BYTES = 4 * 2**20  # an image overlay travels inside every task that shows it
COLOR_PATTERN = "^#([0-9a-fA-F]{6}|[0-9a-fA-F]{8})$"


class SpecError(UsageError):
    """A spec file that cannot be rendered; the message names the file and the field."""


@dataclass(frozen=True)
class Field:
    """One key of a spec table: its JSON type, its limits and what it means."""

    type: str  # JSON Schema type: number, integer, string, array
    help: str
    required: bool = False
    default: Any = None
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None  # inclusive
    above: float | None = None  # exclusive minimum
    maximum: float | None = None
    pattern: str | None = None
    items: dict[str, Field] | None = None  # an array of tables
    check: Callable[[Any], Any] | None = None  # parses further (colour, trim, crop); raises ValueError or UsageError


def _number(help: str, **limits: Any) -> Field:
    return Field("number", help, **limits)


def _geometry(w_required: bool, h_required: bool) -> dict[str, Field]:
    return {
        "x": _number("Left edge, a fraction of the output width.", required=True),
        "y": _number("Top edge, a fraction of the output height.", required=True),
        "w": _number("Width, a fraction of the output width.", required=w_required, above=0),
        "h": _number("Height, a fraction of the output height.", required=h_required, above=0),
    }


_TIMING = {
    "kind": Field("string", "What to draw.", required=True, choices=KINDS),
    "start": _number("Seconds from the clip's start (after its trim).", default=0.0, minimum=0),
    "end": _number("Seconds from the clip's start (default: the clip's end).", above=0),
}
_SHAPE = {
    "color": Field("string", "#rrggbb or #rrggbbaa.", default="#ffffff", pattern=COLOR_PATTERN, check=parse_color),
    "outline": Field("integer", "Outline width in output pixels (filled when absent).", minimum=1),
}
OVERLAYS: dict[str, dict[str, Field]] = {
    "text": {
        **_TIMING,
        "text": Field("string", "The text.", required=True),
        **{k: v for k, v in _geometry(False, False).items() if k in ("x", "y")},
        "size": _number("Text height, a fraction of the output height.", default=0.05, above=0),
        "color": _SHAPE["color"],
        "background": Field("string", "A box behind the text: #rrggbb or #rrggbbaa.", pattern=COLOR_PATTERN,
                            check=parse_color),
    },
    "box": {**_TIMING, **_geometry(True, True), **_SHAPE},
    "ellipse": {**_TIMING, **_geometry(True, True), **_SHAPE},
    "spotlight": {
        **_TIMING, **_geometry(True, True),
        "dim": _number("How much to darken outside the ellipse: 0 none, 1 black.", default=0.5, minimum=0, maximum=1),
    },
    "image": {
        **_TIMING,
        "path": Field("string", "A PNG file, relative to the spec.", required=True),
        **_geometry(True, False),
        "opacity": _number("0 transparent to 1 opaque.", default=1.0, minimum=0, maximum=1),
    },
}
for _fields in OVERLAYS.values():  # any geometric field of a kind may move
    _fields["keyframes"] = Field(
        "array", "Geometry over time: {t, x, y, ...}, linear in t between keyframes, held outside them.",
        items={"t": _number("Seconds from the clip's start; must increase.", required=True, minimum=0),
               **{k: Field(v.type, v.help, above=v.above) for k, v in _fields.items() if k in GEOMETRY}},
    )

CLIP: dict[str, Field] = {
    "source": Field("string", "The video file, relative to the spec.", required=True),
    "trim": Field("string", "START-END, as --trim: 1.5-4, 00:01-00:04.5, 2-.", check=parse_trim),
    "crop": Field("string", "W:H:X:Y in source pixels, as --crop.", check=parse_crop),
    "overlays": Field("array", "Drawn on the upscaled frame, in this order.", items=None),
}
SETTINGS: dict[str, Field] = {
    "output": Field("string", "Output file (.mp4, .mov, .mkv), relative to the spec; -o wins."),
    "each": Field("string", "A directory: each clip to its own file DIR/01-<source stem>.mp4; --each wins."),
    "model": Field("string", "The Real-ESRGAN model.", choices=tuple(MODELS)),
    "scale": Field("integer", "Output scale.", choices=(2, 4)),
    "weights": Field("string", "A checkpoint for the model's architecture, relative to the spec."),
    "codec": Field("string", "Video codec.", choices=("h264", "hevc")),
    "crf": Field("integer", "Constant rate factor.", minimum=0, maximum=51),
    "segment_frames": Field("integer", "Frames per segment.", minimum=1),
    "device": Field("string", "auto, cpu or cuda (local backend)."),
    "backend": Field("string", "Where frames are upscaled.", choices=("local", "modal")),
    "storage": Field("string", "r2://bucket/prefix, s3://bucket/prefix or file:///dir."),
    "endpoint_url": Field("string", "S3 endpoint."),
    "parallel": Field("integer", "Containers at once (modal backend).", minimum=1),
    "gpu": Field("string", "One GPU type for the modal backend."),
}
SPEC: dict[str, Field] = {
    **SETTINGS,
    "clips": Field("array", "The clips, joined in this order (or each to its own file).", required=True, items=CLIP),
}
PATHS = ("output", "each", "weights")  # top-level settings that name files, relative to the spec


@dataclass(frozen=True)
class ClipEntry:
    """One clip of a spec: its source, framing and completed overlays."""

    source: Path
    trim: str | None  # as --trim takes it
    crop: str | None  # as --crop takes it
    overlays: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Reel:
    """A validated spec: render settings as given, and its clips."""

    name: str  # the file as the user named it, for messages
    settings: dict[str, Any]
    clips: list[ClipEntry]


# -- the JSON Schema ----------------------------------------------------------


def json_schema() -> dict[str, Any]:
    """The spec's JSON Schema (draft 2020-12), for editors' completion."""
    schema = _table_schema(SPEC)
    clip = schema["properties"]["clips"]
    clip["minItems"] = 1
    clip["items"]["properties"]["overlays"]["items"] = {
        "oneOf": [_table_schema(fields, kind=kind) for kind, fields in OVERLAYS.items()]}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "clipexport spec", **schema}


def _table_schema(fields: dict[str, Field], kind: str | None = None) -> dict[str, Any]:
    properties = {name: _field_schema(f) for name, f in fields.items()}
    if kind is not None:
        properties["kind"] = {"const": kind, "description": fields["kind"].help}
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    required = [name for name, f in fields.items() if f.required]
    if required:
        schema["required"] = required
    return schema


def _field_schema(f: Field) -> dict[str, Any]:
    out: dict[str, Any] = {"type": f.type, "description": f.help}
    for key, value in (("enum", f.choices), ("minimum", f.minimum), ("exclusiveMinimum", f.above),
                       ("maximum", f.maximum), ("pattern", f.pattern), ("default", f.default)):
        if value is not None:
            out[key] = list(value) if key == "enum" else value
    if f.type == "array":
        out["items"] = _table_schema(f.items) if f.items else {"type": "object"}
    return out


# -- step 1: the file ---------------------------------------------------------


def load_spec(path: Path) -> Reel:
    """Read and check a spec file; raise SpecError naming the file and the field."""
    name = str(path)
    data = _parse(path, name)
    base = path.parent.absolute()
    top = _Checker(name).table(data, SPEC, "")
    settings = {k: v for k, v in top.items() if k in SETTINGS and v is not None}
    if "output" in settings and "each" in settings:
        raise SpecError(f"{name}: each: give output (the clips joined) or each (a file per clip), not both")
    for key in PATHS:
        if key in settings:
            settings[key] = str(base / settings[key])
    clips = [_clip(name, base, raw, f"clips[{i}]") for i, raw in enumerate(data["clips"])]
    if not clips:
        raise SpecError(f"{name}: clips: give at least one clip")
    return Reel(name, settings, clips)


def _parse(path: Path, name: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{name}: spec file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{name}: cannot read the spec ({exc})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{name}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise SpecError(f"{name}: line 1: the spec must be a JSON object")
        return data
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or _line_of(str(exc))
        raise SpecError(f"{name}: line {line}: not valid TOML ({str(exc).split(' (at ')[0]})") from None


def _line_of(message: str) -> str:
    """The line number tomllib writes into its message: '... (at line 3, column 5)'."""
    marker = "(at line "
    return message.split(marker)[1].split(",")[0] if marker in message else "?"


def _clip(name: str, base: Path, raw: dict[str, Any], where: str) -> ClipEntry:
    check = _Checker(name)
    values = check.table(raw, CLIP, where)
    source = base / values["source"]
    if not source.is_file():
        raise SpecError(f"{name}: {where}.source: {values['source']} not found (looked for {source})")
    overlays = [check.overlay(base, o, f"{where}.overlays[{i}]") for i, o in enumerate(values.get("overlays") or [])]
    return ClipEntry(source, values["trim"], values["crop"], overlays)


class _Checker:
    """Walks a spec's tables against the declaration; the first problem raises."""

    def __init__(self, name: str) -> None:
        self.name = name

    def fail(self, where: str, problem: str) -> SpecError:
        return SpecError(f"{self.name}: {where}: {problem}")

    def table(self, raw: Any, fields: dict[str, Field], where: str) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise self.fail(where or "spec", f"expected a table, got {_shown(raw)}")
        prefix = f"{where}." if where else ""
        for key in raw:
            if key not in fields:
                raise self.fail(prefix + key, f"unknown key; known keys: {', '.join(fields)}")
        out = {}
        for key, f in fields.items():
            if key not in raw:
                if f.required:
                    raise self.fail(prefix + key, "missing")
                out[key] = f.default
                continue
            out[key] = self.value(raw[key], f, prefix + key)
        return out

    def value(self, value: Any, f: Field, where: str) -> Any:
        if not _is_type(value, f.type):
            raise self.fail(where, f"expected {_TYPE_NAMES[f.type]}, got {_shown(value)}")
        if f.choices is not None and value not in f.choices:
            raise self.fail(where, f"{value!r} is not one of {', '.join(map(str, f.choices))}")
        for bad, problem in ((f.minimum is not None and value < f.minimum, f"must be at least {f.minimum}"),
                             (f.above is not None and value <= f.above, f"must be more than {f.above}"),
                             (f.maximum is not None and value > f.maximum, f"must be at most {f.maximum}")):
            if bad:
                raise self.fail(where, f"{value!r} {problem}")
        if f.check is not None:
            try:
                f.check(value)
            except (ValueError, UsageError) as exc:
                raise self.fail(where, str(exc)) from None
        if f.type == "array" and f.items is not None:
            return [self.table(item, f.items, f"{where}[{i}]") for i, item in enumerate(value)]
        return value

    def overlay(self, base: Path, raw: Any, where: str) -> dict[str, Any]:
        """An overlay completed: defaults filled, keyframes checked, an image read in."""
        if not isinstance(raw, dict):
            raise self.fail(where, f"expected a table, got {_shown(raw)}")
        kind = self.value(raw.get("kind"), _TIMING["kind"], f"{where}.kind") if "kind" in raw else None
        if kind is None:
            raise self.fail(f"{where}.kind", f"missing; one of {', '.join(KINDS)}")
        values = self.table(raw, OVERLAYS[kind], where)
        if values["end"] is not None and values["end"] <= values["start"]:
            raise self.fail(f"{where}.end", f"{values['end']} is not after start {values['start']}")
        values["keyframes"] = [{k: v for k, v in key.items() if v is not None} for key in values["keyframes"] or []]
        times = [k["t"] for k in values["keyframes"]]
        for i, (a, b) in enumerate(zip(times, times[1:])):
            if b <= a:
                raise self.fail(f"{where}.keyframes[{i + 1}].t", f"{b} does not come after {a}: t must increase")
        if kind == "image":
            values.update(self.image(base, values["path"], f"{where}.path"))
        return {k: v for k, v in values.items() if v is not None}

    def image(self, base: Path, relative: str, where: str) -> dict[str, Any]:
        path = base / relative
        if not path.is_file():
            raise self.fail(where, f"{relative} not found (looked for {path})")
        data = path.read_bytes()
        if len(data) > MAX_IMAGE_BYTES:
            raise self.fail(where, f"{relative} is over {MAX_IMAGE_BYTES // 2**20} MiB")
        png = base64.b64encode(data).decode("ascii")
        try:
            decode_png(png)
        except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a bad image
            raise self.fail(where, f"{relative} is not an image Pillow can read ({type(exc).__name__})") from None
        return {"path": str(path), "png": png, "sha256": hashlib.sha256(data).hexdigest()}


_TYPE_NAMES = {"number": "a number", "integer": "a whole number", "string": "a string", "array": "a list"}


def _is_type(value: Any, kind: str) -> bool:
    if isinstance(value, bool):
        return False
    if kind == "number":
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, {"integer": int, "string": str, "array": list}[kind])


def _shown(value: Any) -> str:
    return {dict: "a table", list: "a list", bool: "a boolean"}.get(type(value), repr(value))


# -- step 2: against the media ------------------------------------------------


def check_media(reel: Reel, infos: list[ClipInfo], scale: int) -> None:
    """Crop and trim against each clip; overlay times and places against the output."""
    trims = [None if c.trim is None else parse_trim(c.trim) for c in reel.clips]
    crops = [None if c.crop is None else parse_crop(c.crop) for c in reel.clips]
    for i, info in enumerate(infos):
        for key, trim in (("crop", None), ("trim", trims[i])):
            try:
                plan_clips([info], [trim], [crops[i]])
            except UsageError as exc:
                raise SpecError(f"{reel.name}: clips[{i}].{key}: {str(exc).removeprefix(f'{info.path}: ')}") from None
    plans = plan_clips(infos, trims, crops)
    width, height = plans[0].size[0] * scale, plans[0].size[1] * scale
    for i, (clip, plan) in enumerate(zip(reel.clips, plans)):
        for j, overlay in enumerate(clip.overlays):
            where = f"{reel.name}: clips[{i}].overlays[{j}]"
            _check_times(overlay, plan.duration, plan.fps, where)
            _check_on_screen(overlay, width, height, where)


def _check_times(overlay: dict[str, Any], duration: Fraction, fps: Fraction, where: str) -> None:
    limit = float(duration + Fraction(1, 2) / fps)  # half a frame: a trim's end snaps to frames
    shown = f"the clip lasts {float(duration):g} s"
    if overlay["start"] >= float(duration):
        raise SpecError(f"{where}.start: {overlay['start']} is past the clip's end ({shown})")
    if overlay.get("end") is not None and overlay["end"] > limit:
        raise SpecError(f"{where}.end: {overlay['end']} is past the clip's end ({shown})")
    for k, key in enumerate(overlay.get("keyframes", [])):
        if key["t"] > limit:
            raise SpecError(f"{where}.keyframes[{k}].t: {key['t']} is past the clip's end ({shown})")


def _check_on_screen(overlay: dict[str, Any], width: int, height: int, where: str) -> None:
    image = decode_png(overlay["png"]) if overlay["kind"] == "image" else None
    keyframes = overlay.get("keyframes") or []
    for k, t in enumerate([key["t"] for key in keyframes] or [overlay["start"]]):  # held before the first
        box = footprint(overlay, geometry_at(overlay, t), width, height, image)
        if not on_screen(box, width, height):
            at = f" at keyframes[{k}] (t={t})" if keyframes else ""
            raise SpecError(f"{where}: leaves no pixel on the {width}x{height} output{at}: "
                            f"it covers pixels x {box[0]}..{box[2]}, y {box[1]}..{box[3]}")
