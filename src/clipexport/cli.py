"""The command line: parse, choose a display, run, turn errors into exit codes.

This module and `progress/display` are the only ones that know about Typer
or Rich. Every failure arrives here as a `ClipexportError` and leaves as one
line on stderr and an exit code (see `EXIT_CODES_HELP`); no traceback reaches
a user.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from clipexport import __version__, config, events, options, stopping
from clipexport.errors import (
    EXIT_RESUMABLE,
    ClipexportError,
    Interrupted,
    JobLookupError,
    UsageError,
)
from clipexport.facts import JobFacts
from clipexport.jobs import RESUMABLE, JobRecord, JobSpec, JobState, JobStore, new_job_id
from clipexport.locks import lock_job, lock_output
from clipexport.stopping import Stop, stop_on_signals

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 failed; 2 bad usage or input (nothing started); "
    "3 busy: the job is already running, or another job writes the output; "
    "4 cancelled from another shell; 5 damaged state directory or job store; "
    "75 stopped and resumable; 130 interrupted by Ctrl-C; 143 stopped by SIGTERM."
)

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


class _Argument(TyperArgument):
    """An argument in help as other tools write it: INPUT..., JOB, [JOB]; no `<list[Path]>`, no `{job}`."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def _rich_display_name(self) -> str:
        return self.display_name_raw + ("..." if self.nargs != 1 else "")

    def _usage_display_name(self) -> str:
        name = self._rich_display_name()
        return name if self.required else f"[{name}]"


def _plain_help(params: list[Any]) -> None:
    """Arguments by name alone, flags with no `<bool>`."""
    for param in params:
        if isinstance(param, TyperArgument):
            param.__class__ = _Argument
        elif isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""


class _PlainHelp:
    """Conventional help for a command or group (see `_plain_help`)."""

    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _plain_help(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            _plain_help([option])
            if any(getattr(p, "rich_help_panel", None) for p in self.params):
                option.rich_help_panel = DISPLAY  # not alone in an "Options" panel
        return option


class _Command(_PlainHelp, TyperCommand):
    """Every command."""


class _Group(_PlainHelp, TyperGroup):
    """The root and `eta`."""


app = typer.Typer(
    name="clipexport",
    cls=_Group,
    help="Upscale and export video clips with Real-ESRGAN, with progress you can trust.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=HELP_OPTIONS,
)
eta_app = typer.Typer(cls=_Group, help="Fit and check the timing model behind the ETA.", no_args_is_help=True,
                      context_settings=HELP_OPTIONS)
app.add_typer(eta_app, name="eta")


def _print_version(value: bool) -> None:
    if value:
        print(f"clipexport {__version__}")
        raise typer.Exit()


@app.callback(epilog="Examples\n\n  clipexport render clip.mp4 -o clip-x4.mp4\n\n"
                     "  clipexport render --help\n\n  clipexport jobs")
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Upscale and export video clips with Real-ESRGAN, with progress you can trust."""


def _say(message: str) -> None:
    _print(f"clipexport: {message}", sys.stderr)


def _print(text: str, stream: Any) -> None:
    """One line; a reader gone (`| head -1`) silences the stream instead of failing the command."""
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        from clipexport.progress.display import silence_closed_pipes

        silence_closed_pipes()


_QUIET = False  # -q: errors only on stderr
_VERBOSE = False  # -v: the [Progress Event] lines and debug detail


def _chatty(quiet: bool, verbose: bool) -> None:
    """Set how much render and resume say (each command sets both)."""
    global _QUIET, _VERBOSE
    if quiet and verbose:
        raise typer.BadParameter("--quiet and --verbose contradict each other")
    _QUIET, _VERBOSE = quiet, verbose


def _note(message: str) -> None:
    """A line that is not an error: left out with --quiet. On a terminal it is
    broken between words to the terminal's width (errors stay one line, for logs)."""
    if _QUIET:
        return
    line = f"clipexport: {message}"
    if sys.stderr.isatty():
        from clipexport.progress.text import fold

        line = "\n".join(fold(line, shutil.get_terminal_size().columns))
    _print(line, sys.stderr)


def _quiet_if_asked(stop: Stop) -> Stop:
    """With --quiet, a stop is not announced ("Stopping…" is not an error); its outcome line still is."""
    if _QUIET:
        stop.announcer = lambda: None
    return stop


def _mode(json_out: bool, quiet: bool, progress: str) -> str:
    """The display: --json wins, then --quiet (nothing), then --progress."""
    return "json" if json_out else "none" if quiet else progress


@contextmanager
def _verbose_logs(display: Any) -> Iterator[None]:
    """With -v, clipexport's log records (DEBUG and up) go through the display,
    above a live view; with -q, only errors. Restored afterwards."""
    logger = logging.getLogger("clipexport")
    saved = logger.level, logger.propagate
    handler = display.log_handler() if _VERBOSE else None
    if handler is not None:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    elif _QUIET:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        if handler is not None:
            logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


@contextmanager
def _errors_to_exit() -> Iterator[None]:
    """One line on stderr and the error's exit code; never a traceback."""
    try:
        yield
    except Interrupted as exc:
        raise typer.Exit(exc.exit_code) from None
    except ClipexportError as exc:
        message = str(exc)
        if exc.resumable and not isinstance(exc, UsageError):
            job = getattr(exc, "job", None)
            message += f" (resumable: `clipexport resume {job}`)" if job else " (resumable)"
        _say(f"error: {message}")
        code = EXIT_RESUMABLE if exc.resumable and not isinstance(exc, UsageError) else exc.exit_code
        raise typer.Exit(code) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:
        stop = stopping.stop_within(exc)  # a stop Python raised another exception from
        if stop is None:
            raise
        raise typer.Exit(stop.exit_code if isinstance(stop, Interrupted) else 130) from None


def _store() -> JobStore:
    return JobStore(config.state_dir())


DISPLAY = "Display and scripting"
ProgressOpt = Annotated[
    str,
    typer.Option("--progress", metavar="MODE", rich_help_panel=DISPLAY,
                 help="auto (rich on a terminal with cursor control, plain lines otherwise or with TERM=dumb), "
                      "rich, plain, json, none."),
]
JsonOpt = Annotated[bool, typer.Option(
    "--json", rich_help_panel=DISPLAY,
    help="Print the job's events as NDJSON on stdout, with a periodic `snapshot` line (fraction, remaining_s), "
         "and an `interrupted` line on Ctrl-C; see docs/progress-events.md. Nothing else goes to stdout.")]
IntervalOpt = Annotated[Optional[float], typer.Option(
    "--progress-interval", metavar="SECONDS", min=0.1, rich_help_panel=DISPLAY,
    help="Seconds between plain status lines and --json snapshots (default: every 5 s at first, then about "
         "1 % of the job, at most one every 30 s).")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", rich_help_panel=DISPLAY,
                                        help="Errors only on stderr (the output path still goes to stdout).")]
VerboseOpt = Annotated[bool, typer.Option("-v", "--verbose", rich_help_panel=DISPLAY,
                                          help="Also print the [Progress Event] lines and debug detail.")]
JobArg = Annotated[str, typer.Argument(metavar="JOB", help="The job id (see `clipexport jobs`).")]
INPUT, OUTPUT, MODEL, CLOUD = "Input", "Output", "Model and quality", "Cloud"


def _examples(*examples: str) -> str:
    """An Examples section for a command's help (its epilog): each example a
    command, with a `# comment` line above it where it needs one."""
    return "Examples\n\n" + "\n\n".join("\n".join(f"  {line}" for line in e.split("\n")) for e in examples)


@app.command(cls=_Command, epilog=_examples(
    "# 4x with the default model, on this machine\nclipexport render clip.mp4 -o clip-x4.mp4",
    "# the first 10 s of each, joined, at 2x\nclipexport render a.mp4 b.mp4 -o out.mp4 --scale 2 --trim 0-10",
    "# how long it would take; nothing runs\nclipexport render clip.mp4 -o out.mp4 --estimate",
    "# clips, framing and overlays from a spec file, each clip to its own file\n"
    "clipexport render --spec reel.toml --each clips/",
    "# on Modal GPUs, through an R2 bucket\nclipexport render clip.mp4 -o out.mp4 --backend modal \\\n"
    "    --storage r2://bucket/clipexport",
    "# progress for a script\nclipexport render clip.mp4 -o out.mp4 --json | jq 'select(.type==\"snapshot\")'"))
def render(
    inputs: Annotated[Optional[list[Path]], typer.Argument(
        metavar="INPUT", show_default=False,
        help="Input clips, joined in this order into one output (or --spec FILE instead).")] = None,
    spec_file: Annotated[Optional[Path], typer.Option(
        "--spec", metavar="FILE", rich_help_panel=INPUT,
        help="A spec file (TOML or JSON; `clipexport spec --schema`): clips, framing, overlays and settings, "
             "paths relative to it. Flags win over its settings.")] = None,
    trim: Annotated[Optional[list[str]], typer.Option(
        metavar="START-END", rich_help_panel=INPUT,
        help="In seconds or timecodes (1.5-4, 00:01-00:04.5, 2-). Given once: applies to every "
             "input; given once per input: pairs with the inputs in order; '-' alone leaves that input whole.")] = None,
    crop: Annotated[Optional[list[str]], typer.Option(
        metavar="W:H:X:Y", rich_help_panel=INPUT,
        help="Before upscaling; pairs with inputs like --trim. Inputs of another size or frame rate "
             "are resized and resampled to the first input's (after its crop).")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", metavar="FILE", rich_help_panel=OUTPUT,
                                                   help="Output file (.mp4, .mov or .mkv).")] = None,
    each: Annotated[Optional[Path], typer.Option(
        "--each", metavar="DIR", rich_help_panel=OUTPUT,
        help="Write each clip to its own file DIR/01-<stem>.mp4, ... instead of joining them.")] = None,
    codec: Annotated[Optional[str], typer.Option(metavar="h264|hevc", rich_help_panel=OUTPUT,
                                                 help="Video codec (default h264).")] = None,
    crf: Annotated[Optional[int], typer.Option(metavar="N", rich_help_panel=OUTPUT,
                                               help="Constant rate factor (default 18 for h264, 20 for hevc).")] = None,
    force: Annotated[bool, typer.Option("--force", rich_help_panel=OUTPUT, help="Replace an existing output.")] = False,
    model: Annotated[Optional[str], typer.Option(metavar="NAME", rich_help_panel=MODEL,
                                                 help="realesr-animevideov3 (default), realesrgan-x4plus, "
                                                      "realesrgan-x2plus, realesr-general-x4v3.")] = None,
    scale: Annotated[Optional[int], typer.Option(metavar="2|4", rich_help_panel=MODEL,
                                                 help="Output scale (default: the model's own).")] = None,
    weights: Annotated[Optional[Path], typer.Option(metavar="FILE", rich_help_panel=MODEL,
                                                    help="A checkpoint (.safetensors or .pth) for the model's "
                                                         "architecture, instead of the official weights.")] = None,
    device: Annotated[Optional[str], typer.Option(metavar="auto|cpu|cuda", rich_help_panel=MODEL,
                                                  help="Where the local backend upscales.")] = None,
    precision: Annotated[Optional[str], typer.Option(
        metavar="auto|fp32|bf16|fp16|int8", rich_help_panel=MODEL,
        help="auto (default): fp16 on CUDA, bf16 on CPUs with AMX, int8 on CPUs with VNNI "
             "(realesr-animevideov3), else fp32.")] = None,
    segment_frames: Annotated[Optional[int], typer.Option(metavar="N", rich_help_panel=MODEL,
                                                          help="Frames per segment, the unit of work and resume.")] = None,
    backend: Annotated[Optional[str], typer.Option(metavar="local|modal", rich_help_panel=CLOUD,
                                                   help="local (default: this machine) or modal (cloud GPUs; "
                                                        "needs --storage).")] = None,
    storage: Annotated[Optional[str], typer.Option(metavar="URL", rich_help_panel=CLOUD,
                                                   help="r2://bucket/prefix, s3://bucket/prefix or file:///dir: "
                                                        "upload inputs there and fetch segments back.")] = None,
    endpoint_url: Annotated[Optional[str], typer.Option(metavar="URL", rich_help_panel=CLOUD,
                                                        help="S3 endpoint (else CLIPEXPORT_S3_ENDPOINT, "
                                                             "or R2_ACCOUNT_ID for r2://).")] = None,
    parallel: Annotated[Optional[int], typer.Option(metavar="N", rich_help_panel=CLOUD,
                                                    help="Containers at once (modal backend).")] = None,
    gpu: Annotated[Optional[str], typer.Option(metavar="TYPE", rich_help_panel=CLOUD,
                                               help="Pin one GPU type for the modal backend (default: the "
                                                    "deployment's list, L4 then A10G then T4).")] = None,
    strict: Annotated[bool, typer.Option("--strict", rich_help_panel=INPUT,
                                         help="Fail if any input frame cannot be decoded (by default it is "
                                              "repeated from the previous frame, with a warning).")] = False,
    estimate: Annotated[bool, typer.Option("--estimate", rich_help_panel=DISPLAY,
                                           help="Print the estimated time per phase; run nothing.")] = False,
    json_out: JsonOpt = False,
    progress: ProgressOpt = "auto",
    progress_interval: IntervalOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Upscale INPUT... (or the clips of --spec) into one OUTPUT with every audio track of the inputs.
    Audio: every track is kept (.mp4, .mov and .mkv all hold several),
    copied when one whole clip's track fits the container, else encoded as
    AAC; where one input has fewer tracks than another, its part of the
    missing track is silence. Non-square pixels come out square at the
    display aspect (a 720x480 clip with 32:27 pixels renders as 853x480
    before scaling).

    Progress goes to stderr; at the end the output path alone goes to stdout
    (with --json, the events go to stdout instead).
    """
    _chatty(quiet, verbose)
    with _errors_to_exit():
        options.check("progress", progress)
        flags = {"model": model, "scale": scale, "codec": codec, "crf": crf, "segment_frames": segment_frames,
                 "device": device, "backend": backend, "storage": storage, "endpoint_url": endpoint_url,
                 "parallel": parallel, "gpu": gpu, "weights": weights, "output": output, "each": each,
                 "precision": precision}
        reel = None if spec_file is None else _load_reel(spec_file, inputs, trim, crop)
        if reel is not None:
            inputs, trim, crop, flags = _from_reel(reel, flags)
        output, each, weights = _outputs(inputs, flags)
        settings = config.load_settings({k: v for k, v in flags.items() if k not in ("weights", "output", "each")})
        spec = _spec(inputs or [], output, settings, weights, trim, crop,
                     overlays=None if reel is None else [c.overlays for c in reel.clips], each=each)
        spec = dataclasses.replace(spec, strict=strict)
        from clipexport.orchestrator import check_output, prepare_job

        if reel is not None:
            _check_reel_media(reel, spec)
        if not estimate:  # an estimate needs no token and no network
            _preflight(spec)
        if estimate:
            _print_estimate(prepare_job(spec, force=True), spec, settings.prices, as_json=json_out)  # writes nothing
            return
        prepared = prepare_job(spec, force=force)  # bad input is refused before the state dir is touched
        store = _store()
        job_id = new_job_id()
        with ExitStack() as held:
            stop = _quiet_if_asked(held.enter_context(stop_on_signals()))  # from before the job id is shown
            held.callback(lock_output(store.root, spec.output, job=job_id, force=force, on_wait=_note).release)
            check_output(spec, force)  # again, now that no other job can be finishing a file there
            held.callback(lock_job(store.root, job_id).release)
            record = store.create(spec, job_id)
            JobFacts(store, record.id).set_force(force)
            _note(f"job {record.id} started (resume with `clipexport resume {record.id}`)")
            _run(store, record, prepared, mode=_mode(json_out, quiet, progress), fresh=True, force=False,
                 interval=progress_interval, stop=stop)


def _load_reel(path: Path, inputs: list[Path] | None, trim: list[str] | None, crop: list[str] | None) -> Any:
    """A spec file read and checked; its clips replace INPUT, --trim and --crop."""
    if inputs or trim or crop:
        raise UsageError("--spec names the clips and their framing: give no INPUT, --trim or --crop with it")
    from clipexport.spec import load_spec

    return load_spec(path)


def _from_reel(reel: Any, flags: dict[str, Any]) -> tuple[list[Path], list[str], list[str], dict[str, Any]]:
    """Inputs, trims, crops and settings from a spec; a flag given wins over the spec's setting."""
    merged = {k: v if v is not None else reel.settings.get(k) for k, v in flags.items()}
    if flags["output"] is not None or flags["each"] is not None:  # a flag's choice of output beats the spec's
        merged.update(output=flags["output"], each=flags["each"])
    merged.update({k: Path(merged[k]) for k in ("output", "each", "weights") if merged[k] is not None})
    return ([c.source for c in reel.clips], [c.trim or "-" for c in reel.clips],
            [c.crop or "-" for c in reel.clips], merged)


def _outputs(inputs: list[Path] | None, flags: dict[str, Any]) -> tuple[Path, Path | None, Path | None]:
    """(output, each, weights); with --each the output is that directory."""
    if not inputs:
        raise UsageError("give INPUT... or --spec FILE")
    output, each = flags["output"], flags["each"]
    if output is not None and each is not None:
        raise UsageError("-o and --each exclude each other: join the clips into one file, or write each apart")
    if output is None and each is None:
        raise UsageError("give -o OUTPUT (or --each DIR)")
    return (output if each is None else each), each, flags["weights"]


def _check_reel_media(reel: Any, spec: JobSpec) -> None:
    """A spec's trims, crops and overlays against its probed clips, before any job exists."""
    from clipexport.media import probe
    from clipexport.spec import check_media

    check_media(reel, [probe(Path(p)) for p in spec.inputs], spec.scale)


def _spec(inputs: list[Path], output: Path, settings: config.Settings, weights: Path | None,
          trims: list[str] | None, crops: list[str] | None, *,
          overlays: list[list[dict[str, Any]]] | None = None, each: Path | None = None) -> JobSpec:
    from clipexport.media import parse_crop, parse_trim

    def paired(values: list[str] | None, parse: Any, flag: str) -> list[Any]:
        values = values or []
        if len(values) not in (0, 1, len(inputs)):
            raise UsageError(f"{flag} given {len(values)} times for {len(inputs)} inputs: give it once or once per input")
        if len(values) == 1:
            values = values * len(inputs)
        parsed = [None if v == "-" else parse(v) for v in values]
        return parsed or [None] * len(inputs)

    if settings.codec not in ("h264", "hevc"):
        raise UsageError(f"unknown codec {settings.codec!r}: use h264 or hevc")
    if settings.segment_frames < 1:
        raise UsageError("--segment-frames must be at least 1")
    if settings.parallel < 1:
        raise UsageError("--parallel must be at least 1")
    if settings.backend not in ("local", "modal"):
        raise UsageError(f"unknown backend {settings.backend!r}: use local or modal")
    from clipexport.upscale.precision import normalise

    precision = normalise(settings.precision)
    from clipexport.storage.config import refuse_credentials

    refuse_credentials(settings.endpoint_url, "the S3 endpoint (--endpoint-url, CLIPEXPORT_S3_ENDPOINT)")
    refuse_credentials(settings.storage, "--storage")
    from clipexport.upscale.registry import MODELS

    native = MODELS[settings.model].native_scale if settings.model in MODELS else 4
    crops_parsed = paired(crops, parse_crop, "--crop")
    return JobSpec(
        inputs=[str(p.absolute()) for p in inputs],
        output=str(output.absolute()),
        model=settings.model,
        scale=settings.scale or native,
        weights=None if weights is None else str(weights.absolute()),
        trims=[None if t is None else list(t) for t in paired(trims, parse_trim, "--trim")],
        crops=[None if c is None else [c.width, c.height, c.x, c.y] for c in crops_parsed],
        codec=settings.codec,
        crf=settings.crf,
        segment_frames=settings.segment_frames,
        backend=settings.backend,
        storage=settings.storage,
        endpoint_url=settings.endpoint_url if settings.storage else None,  # unused without a store: not kept
        parallel=settings.parallel,
        gpu=settings.gpu if settings.backend != "local" else None,  # None: the deployment's fallback list
        device=settings.device,
        overlays=overlays or [],
        each=None if each is None else str(each.absolute()),
        precision=precision,
    )


def _preflight(spec: JobSpec) -> None:
    """What a run can check before a job exists (a store, a token; the local model's weights,
    fetched now if they must be), fastest first."""
    from clipexport.validate import check_backend, check_weights

    check_backend(spec)
    if spec.backend == "local":
        check_weights(spec, on_download=lambda size: _note(
            f"downloading the {spec.model} weights{f' ({size / 1e6:.0f} MB)' if size else ''}…"))


def _print_estimate(prepared: Any, spec: JobSpec, prices: dict[str, float] | None = None, *,
                    as_json: bool = False) -> None:
    """What `render` would take: the same plan, device and model (a probe kept from an earlier job included);
    on Modal also the predicted container time and its cost."""
    from clipexport import cost
    from clipexport.orchestrator import build_plan
    from clipexport.progress import estimate_plan, load_model
    from clipexport.progress.text import clock

    total_bytes = sum(i.size_bytes for i in prepared.infos)
    plan = build_plan(prepared, input_bytes=total_bytes, backend=spec.backend, device=_device_name(spec))
    plan.update(v=events.VERSION, job="estimate", seq=0, t=time.time())
    timing = load_model()
    estimate = estimate_plan(plan, timing)
    if spec.backend == "modal":
        predicted = cost.estimate(plan["features"], timing, cost.rate(spec.gpu, prices), cost.scaledown_s())
        estimate["cost"] = predicted.to_json()
    if as_json:
        print(json.dumps({**estimate, "features": plan["features"]}))
        return
    print(f"{'precision':<12} {prepared.precision}")
    for phase, seconds in estimate["phases"].items():
        print(f"{phase:<12} {clock(seconds)}")
    print(f"{'total':<12} {clock(estimate['total_s'])}")
    if "total_lo_s" in estimate:
        print(f"{'80 % range':<12} {clock(estimate['total_lo_s'])} to {clock(estimate['total_hi_s'])}")
    for line in cost.lines(estimate["cost"], billed_=False) if "cost" in estimate else []:
        print(line)


def _device_name(spec: JobSpec) -> str:
    """What does the upscaling, for the ETA's features: a GPU type, or "cpu"."""
    if spec.backend != "local":
        return spec.gpu or "auto"
    from clipexport.backends.local import device_name

    return device_name(spec.device)


LIVE_REUSE_S = 1.0  # a live view estimates at most once a second (`Tracker.reuse_s`)


def _run(store: JobStore, record: JobRecord, prepared: Any, *, mode: str, fresh: bool, force: bool,
         stop: Stop, interval: float | None = None) -> None:
    """Run a job under a display; print the output path when done."""
    from clipexport.backends import create_backend
    from clipexport.orchestrator import JobRunner
    from clipexport.progress import Tracker, load_model
    from clipexport.progress.display import choose_mode, make_display
    from clipexport.storage import open_storage

    spec = record.spec
    storage = None if spec.storage is None else open_storage(spec.storage, endpoint_url=spec.endpoint_url)
    tracker = Tracker(load_model(), floor=record.fraction, reuse_s=LIVE_REUSE_S)
    planned = False
    if not fresh:
        for event in events.read_events(store.log_path(record.id)):
            planned = planned or event.get("type") == "plan"
            tracker.feed(event)
    mode = choose_mode(mode, sys.stderr.isatty(), os.environ.get("TERM"))
    segment_root = config.data_dir() / "store"
    with make_display(mode, tracker=tracker, interval=interval) as display, _verbose_logs(display):
        logging.getLogger(__name__).debug(
            "job %s: event log %s; segments in %s; backend %s, device %s, model %s x%s, %s frames a segment",
            record.id, store.log_path(record.id), segment_root, spec.backend, _device_name(spec), spec.model,
            spec.scale, spec.segment_frames)
        if not _QUIET:
            stop.announcer = display.stopping
        runner = JobRunner(
            store, record,
            segment_root=segment_root,
            backend_factory=lambda spec, job: create_backend(spec, segment_root, storage, store, job),
            sinks=[display.handle],
            accept_changed_inputs=force,
            fraction=lambda: tracker.snapshot(time.time()).fraction,
            storage=storage,
        )
        display.attach(runner.emitter.emit)
        if not planned:  # a new job, or a log lost or cut short: the job's store has the rest
            runner.emit_plan(prepared, backend=spec.backend, device=_device_name(spec))
        try:
            runner.run(prepared)
        except Interrupted as exc:
            display.close()
            if exc.exit_code != EXIT_RESUMABLE:
                _say(f"stopped; job {record.id} is kept. Resume: `clipexport resume {record.id}`; "
                     f"cancel: `clipexport cancel {record.id}`")
            raise
        except ClipexportError as exc:
            exc.job = record.id  # type: ignore[attr-defined]  # names the job in the one-line message
            raise
    if runner.damage is not None:
        _note(f"warning: {runner.damage}")
    if mode != "json":
        from clipexport.orchestrator import output_paths

        _note(f"job {record.id} done: {_device_name(spec)}, {prepared.precision}")
        for path in output_paths(spec):
            _print(str(path), sys.stdout)
    _refit_timing_model(store)


def _refit_timing_model(store: JobStore, keep: int = 200) -> None:
    """Learn from the user's own finished jobs, so the next ETA starts closer.

    Best effort: a fit that fails leaves the previous model in place.
    """
    from clipexport.progress import fit_logs, user_model_path

    done = [r for r in store.all() if r.state == JobState.DONE][-keep:]
    paths = [p for p in (store.log_path(r.id) for r in done) if p.is_file()]
    try:
        target = user_model_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        fit_logs(paths).save(target)
    except Exception as exc:  # noqa: BLE001 - the job itself is done; never fail it here
        logging.getLogger(__name__).warning("could not refit the timing model: %s", exc)


@app.command(cls=_Command, epilog=_examples(
    "clipexport resume cx-3f9a1c",
    "# an input changed since: re-render only what it affects\nclipexport resume cx-3f9a1c --force"))
def resume(
    job: JobArg,
    force: Annotated[bool, typer.Option("--force", help="Accept inputs changed since the job started.")] = False,
    json_out: JsonOpt = False,
    progress: ProgressOpt = "auto",
    progress_interval: IntervalOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Continue an interrupted or failed job, skipping finished work."""
    _chatty(quiet, verbose)
    with _errors_to_exit():
        from clipexport.orchestrator import prepare_job

        options.check("progress", progress)
        store = _store()
        store.get(job)  # an unknown job is named before anything is locked
        with ExitStack() as held:
            stop = _quiet_if_asked(held.enter_context(stop_on_signals()))
            held.callback(lock_job(store.root, job).release)
            record = store.get(job)  # as it stands now that no other process runs it
            if record.state == JobState.DONE:
                _already_done(store, record, json_out)
                return
            _check_resumable(record)
            held.callback(lock_output(store.root, record.spec.output, job=job, force=False).release)
            from clipexport.orchestrator import owns_output

            output_forced = JobFacts(store, record.id).force() or force or owns_output(store, record.id)
            _preflight(record.spec)
            prepared = prepare_job(record.spec, force=output_forced)
            record = store.transition(record.id, JobState.RUNNING)
            _note(f"resuming job {record.id}")
            _run(store, record, prepared, mode=_mode(json_out, quiet, progress), fresh=False, force=force,
                 interval=progress_interval, stop=stop)


def _already_done(store: JobStore, record: JobRecord, json_out: bool) -> None:
    """A finished job resumed, as `make` on a built target: its outputs again (one path a line, as
    `render` prints them, --each included), or with --json the job's own `done` event."""
    if json_out:
        done = [e for e in events.read_events(store.log_path(record.id)) if e.get("type") == "done"]
        if done:
            _print(json.dumps(done[-1]), sys.stdout)
        return
    from clipexport.orchestrator import output_paths

    _note(f"job {record.id} is done")
    for path in output_paths(record.spec):
        _print(str(path), sys.stdout)


def _check_resumable(record: JobRecord) -> None:
    """A job this process holds the lock of: `running` only means its runner died."""
    if record.state not in RESUMABLE:
        raise JobLookupError(f"job {record.id} is {record.state.value}; nothing to resume")
    if record.spec.unknown:
        raise JobLookupError(f"job {record.id} was started by a newer clipexport (it sets "
                             f"{', '.join(record.spec.unknown)}); resume it with that version, or cancel it")


def _alive(pid: int | None) -> bool:
    if not pid or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _snapshot(store: JobStore, record: JobRecord, now: float) -> Any:
    """A job's progress snapshot, rebuilt from its event log."""
    from clipexport.progress import Tracker, load_model

    tracker = Tracker(load_model(), floor=record.fraction)
    path = store.log_path(record.id)
    if path.exists():
        for event in events.read_events(path):
            tracker.feed(event)
    snap = tracker.snapshot(now)
    state = _state(record)
    if state in ("interrupted", "failed"):  # nothing runs: no time remains to count down
        hint = f"{state}: `clipexport resume {record.id}`"
        return dataclasses.replace(snap, remaining_s=None, eta_text=hint)
    if state == "cancelled":
        return dataclasses.replace(snap, remaining_s=None, eta_text="cancelled")
    return snap


def _state(record: JobRecord) -> str:
    """The state to show: a running job whose client died is interrupted."""
    if record.state == JobState.RUNNING and not _alive(record.pid) and record.pid != os.getpid():
        return "interrupted"
    return record.state.value


def _active(store: JobStore) -> list[JobRecord]:
    return [r for r in store.all() if _state(r) == "running"]


def _status_line(record: JobRecord, snap: Any) -> str:
    from clipexport.progress.display import status_line

    return f"{record.id}  {status_line(snap)}"


def _print_expanded(record: JobRecord, snap: Any) -> None:
    """The multi-phase view of one job: the same rows a live render draws."""
    from rich.console import Console

    from clipexport.progress.display import render_snapshot
    from clipexport.progress.text import clock

    console = Console(highlight=False)
    console.print(f"job {record.id}  {_state(record)}  {snap.fraction * 100:.1f}%  "
                  f"elapsed {clock(snap.elapsed)}  {snap.eta_text}\n  output {record.spec.output}")
    console.print(render_snapshot(snap))


def _snapshot_json(record: JobRecord, snap: Any) -> dict[str, Any]:
    from clipexport.progress.display import snapshot_fields

    return {"job": record.id, "state": _state(record), **snapshot_fields(snap), "output": record.spec.output}


@app.command(cls=_Command, epilog=_examples("clipexport status", "clipexport status cx-3f9a1c --watch",
                                            "clipexport status --json | jq .fraction"))
def status(
    job: Annotated[Optional[str], typer.Argument(metavar="JOB",
                                                 help="A job id; without it, every running job, a line each.")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Keep the view live until no job runs.")] = False,
    interval: Annotated[float, typer.Option(metavar="SECONDS", help="Seconds between refreshes with --watch.")] = 1.0,
    json_out: Annotated[bool, typer.Option(
        "--json", help="One JSON object per job and refresh: job, state, fraction, elapsed, remaining_s, eta_text, "
                       "output, phases.")] = False,
) -> None:
    """Show the progress of running jobs (or of one job, expanded)."""
    with _errors_to_exit():
        interval = options.check("interval", interval)
        store = _store()
        if watch and not json_out and sys.stdout.isatty():
            _watch_live(store, job, interval)
            return
        while True:
            records = [store.get(job)] if job else _active(store)
            _print_status(store, records, expanded=job is not None, as_json=json_out)
            if not watch or not any(_state(r) == "running" for r in records):
                return
            time.sleep(interval)


def _watch_live(store: JobStore, job: str | None, interval: float) -> None:
    """Redraw in place on a terminal until no job watched is running."""
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    from clipexport.progress.display import render_snapshot

    def view() -> tuple[Any, bool]:
        records = [store.get(job)] if job else _active(store)
        now = time.time()
        parts: list[Any] = []
        for record in records:
            snap = _snapshot(store, record, now)
            if job:
                parts += [Text(f"job {record.id}  {_state(record)}  {snap.eta_text}"), render_snapshot(snap)]
            else:
                parts.append(Text(_status_line(record, snap)))
        running = any(_state(r) == "running" for r in records)
        return Group(*(parts or [Text("no running jobs")])), running

    with Live(console=Console(), auto_refresh=False) as live:
        while True:
            renderable, running = view()
            live.update(renderable, refresh=True)
            if not running:
                return
            time.sleep(interval)


def _print_status(store: JobStore, records: list[JobRecord], *, expanded: bool, as_json: bool) -> None:
    now = time.time()
    snaps = [(r, _snapshot(store, r, now)) for r in records]
    if as_json:
        for record, snap in snaps:
            _json_line(_snapshot_json(record, snap))
        return
    if not snaps:
        print("no running jobs", flush=True)
    for record, snap in snaps:
        if expanded:
            _print_expanded(record, snap)
        else:
            print(_status_line(record, snap), flush=True)


@app.command(name="jobs", cls=_Command, epilog=_examples("clipexport jobs", "clipexport jobs --json | jq -r .job"))
def list_jobs(json_out: Annotated[bool, typer.Option(
        "--json", help="One JSON object per job: job, state, created, fraction, inputs, output, message.")] = False,
) -> None:
    """List every job: id, state, age, inputs, output."""
    with _errors_to_exit():
        now = time.time()
        for record in _store().all():
            if json_out:
                _json_line({"job": record.id, "state": _state(record), "created": record.created,
                            "fraction": round(record.fraction, 4), "inputs": record.spec.inputs,
                            "output": record.spec.output, "message": record.message})
                continue
            inputs = Path(record.spec.inputs[0]).name + (
                f" +{len(record.spec.inputs) - 1}" if len(record.spec.inputs) > 1 else "")
            print(f"{record.id}  {_state(record):<11}  {_age(now - record.created):>5}  {inputs}  ->  "
                  f"{record.spec.output}", flush=True)


def _age(seconds: float) -> str:
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


@app.command(cls=_Command, epilog=_examples("clipexport cancel cx-3f9a1c", "clipexport cancel cx-3f9a1c --purge"))
def cancel(
    job: JobArg,
    purge: Annotated[bool, typer.Option("--purge", help="Also delete the job's finished segments.")] = False,
) -> None:
    """Stop a job's work, remove its temporary files and mark it cancelled."""
    with _errors_to_exit():
        from clipexport.orchestrator import cancel_job

        _, kept = cancel_job(_store(), job, segment_root=config.data_dir() / "store", purge=purge)
        shared = f" ({kept} kept: other unfinished jobs share them)" if kept else ""
        _say(f"job {job} cancelled" + (f" and its segments deleted{shared}" if purge else ""))


@app.command(cls=_Command, epilog=_examples("clipexport logs cx-3f9a1c -f", "clipexport logs cx-3f9a1c --json"))
def logs(
    job: JobArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events until the job ends.")] = False,
    json_out: Annotated[bool, typer.Option(
        "--json", help="The events as they are in the log, one JSON object a line (docs/progress-events.md).")] = False,
) -> None:
    """Print a job's event log."""
    with _errors_to_exit():
        store = _store()
        record = store.get(job)
        path = store.log_path(record.id)
        for event in _tail(store, record.id, path, follow):
            if json_out:
                _json_line(event)
            else:
                print(_human(event), flush=True)


def _tail(store: JobStore, job_id: str, path: Path, follow: bool) -> Iterator[dict[str, Any]]:
    """Events of a log; with `follow`, wait for more until the job stops."""
    seen = -1
    while True:
        for event in (events.read_events(path) if path.exists() else ()):
            if event.get("seq", -1) > seen:
                seen = event["seq"]
                yield event
                if event["type"] in events.TERMINAL_TYPES:
                    return
        if not follow or _state(store.get(job_id)) != "running":
            return
        time.sleep(0.5)


def _human(event: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event["t"]))
    parts = [stamp, f"#{event['seq']}", event["type"]]
    for field in ("phase", "part", "detail", "message", "output"):
        if field in event:
            parts.append(str(event[field]))
    if "done" in event:
        from clipexport.progress.text import amount

        parts.append(amount(event["done"], event.get("total"), event.get("unit")))
    return "  ".join(parts)


@app.command(name="spec", cls=_Command, epilog=_examples(
    "# the JSON Schema of spec files, for an editor\nclipexport spec --schema > clipexport-spec.schema.json"))
def spec_command(
    schema: Annotated[bool, typer.Option("--schema", help="Print the JSON Schema of spec files.")] = False,
) -> None:
    """About spec files (`render --spec FILE`): --schema prints their JSON Schema, for editors."""
    with _errors_to_exit():
        if not schema:
            raise UsageError("nothing to do: give --schema")
        from clipexport.spec import json_schema

        print(json.dumps(json_schema(), indent=2), flush=True)


@eta_app.command("fit", cls=_Command, epilog=_examples("clipexport eta fit", "clipexport eta fit a.jsonl b.jsonl -o model.json"))
def eta_fit(
    logs_: Annotated[Optional[list[Path]], typer.Argument(
        metavar="LOG", help="Event logs; without them, the logs of your finished jobs.")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", metavar="FILE",
                                                   help="Where to write the model JSON "
                                                   "(default: your model, used by every render).")] = None,
) -> None:
    """Fit the timing model from event logs."""
    with _errors_to_exit():
        from clipexport.progress import fit_logs, user_model_path

        from clipexport.validate import check_event_logs

        store = _store()
        paths = logs_ or [store.log_path(r.id) for r in store.all() if r.state == JobState.DONE]
        check_event_logs(paths)
        if not paths:
            raise UsageError("no finished jobs to fit from; give LOG files")
        target = output or user_model_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        fit_logs(paths).save(target)
        _say(f"fitted {len(paths)} logs into {target}")


@eta_app.command("replay", cls=_Command, epilog=_examples("clipexport eta replay job.jsonl --model model.json"))
def eta_replay(
    traces: Annotated[list[Path], typer.Argument(metavar="TRACE", help="Event logs to replay.")],
    model: Annotated[Optional[Path], typer.Option("--model", metavar="FILE",
                                                  help="A timing model JSON (default: yours).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON line per input event (the default).")] = True,
) -> None:
    """Replay traces through the live estimator; print its prediction at each event."""
    with _errors_to_exit():
        from clipexport.progress import load_model, replay_traces
        from clipexport.validate import check_event_logs, check_timing_model

        check_event_logs(traces, "trace")
        timing = load_model() if model is None else check_timing_model(model)
        for line in replay_traces(traces, timing):
            _json_line(line)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: every outcome is an exit code and at most one line on stderr."""
    if sys.stderr is None:  # started with stderr closed (`2>&-`): messages go nowhere, never to stdout
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    try:
        level = options.env_value("CLIPEXPORT_LOG_LEVEL")
    except UsageError as exc:
        _say(f"error: {exc}")
        sys.exit(2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(message)s")
    stopping.reset()
    if argv is None:  # this process is the command (not a caller passing its own argv)
        stopping.ignore_signals_after_commands()
    code = _invoke(argv)
    if stopping.signalled():
        _leave_at_once(code)
    sys.exit(code)


def _leave_at_once(code: int) -> None:
    """Exit after a stop signal without the interpreter's finalisation.

    A stopped job has written all it keeps (the store commits each fact, the
    log each line) by now, but torch's worker threads may still be inside a
    kernel: finalisation then runs C++ destructors under them, and the
    runtime aborts the process ("terminate called without an active
    exception", exit 134) in about half of early stops. `os._exit` skips
    that; the OS releases the job's locks as for any exit.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more to say
            pass
    os._exit(code)


def _invoke(argv: list[str] | None) -> int:
    """Run the command; Click's own parse errors become one line too, not a box."""
    from typer._click import exceptions as click_errors

    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="clipexport", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help(), file=sys.stderr)
        return 2
    except click_errors.ClickException as exc:
        _say(f"error: {exc.format_message()}{_command_hint(exc)}")
        return exc.exit_code
    except typer.Abort:
        return 130
    except Exception as exc:  # a bug: still one line, the traceback only on request
        if os.environ.get("CLIPEXPORT_DEBUG"):
            raise
        _say(f"internal error: {type(exc).__name__}: {exc} (CLIPEXPORT_DEBUG=1 shows the traceback)")
        return 1
    return code if isinstance(code, int) else 0


def _command_hint(exc: Exception) -> str:
    """Where to read more: the failing command's --help."""
    ctx = getattr(exc, "ctx", None)
    return f" (see `{ctx.command_path} --help`)" if ctx is not None else ""


@app.command(cls=_Command)
def version() -> None:
    """Print the version."""
    print(__version__)


def _json_line(value: Any) -> None:
    print(json.dumps(value, separators=(",", ":")), flush=True)
