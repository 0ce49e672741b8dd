"""The command line: parse, choose a display, run, turn errors into exit codes.

This module and `progress/display` are the only ones that know about Typer
or Rich. Every failure arrives here as a `ClipexportError` and leaves as one
line on stderr and an exit code (see `EXIT_CODES_HELP`); no traceback reaches
a user.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from clipexport import __version__, config, events
from clipexport.errors import (
    EXIT_RESUMABLE,
    EXIT_SIGTERM,
    ClipexportError,
    Interrupted,
    JobLookupError,
    UsageError,
)
from clipexport.jobs import RESUMABLE, JobRecord, JobSpec, JobState, JobStore

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 failed; 2 bad usage or input (nothing started); "
    "75 stopped and resumable; 130 interrupted by Ctrl-C; 143 stopped by SIGTERM."
)

app = typer.Typer(
    name="clipexport",
    help="Upscale and export video clips with Real-ESRGAN, with progress you can trust.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
eta_app = typer.Typer(help="Fit and check the timing model behind the ETA.", no_args_is_help=True)
app.add_typer(eta_app, name="eta")


def _say(message: str) -> None:
    print(f"clipexport: {message}", file=sys.stderr, flush=True)


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
            message += " (resumable)"
        _say(f"error: {message}")
        code = EXIT_RESUMABLE if exc.resumable and not isinstance(exc, UsageError) else exc.exit_code
        raise typer.Exit(code) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _on_signal(signum: int, _frame: Any) -> None:
    code = EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_RESUMABLE
    raise Interrupted("stopped by signal", exit_code=code)


def _install_signal_handlers() -> None:
    """SIGTERM and SIGHUP stop a job as Ctrl-C does, with their own codes."""
    signal.signal(signal.SIGTERM, _on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _on_signal)


def _store() -> JobStore:
    return JobStore(config.state_dir())


ProgressOpt = Annotated[
    str,
    typer.Option("--progress", help="auto (rich on a terminal, plain lines otherwise), rich, plain, json, none."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the job's events as NDJSON on stdout.")]


@app.command()
def render(
    inputs: Annotated[list[Path], typer.Argument(help="Input clips, joined in this order into one output.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file (.mp4, .mov or .mkv).")],
    scale: Annotated[Optional[int], typer.Option(help="Output scale, 2 or 4 (default: the model's own).")] = None,
    model: Annotated[Optional[str], typer.Option(help="realesr-animevideov3 (default), realesrgan-x4plus, "
                                                      "realesrgan-x2plus, realesr-general-x4v3.")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="A checkpoint (.safetensors or .pth) for the model's "
                                                         "architecture, instead of the official weights.")] = None,
    trim: Annotated[Optional[list[str]], typer.Option(
        help="START-END in seconds or timecodes (1.5-4, 00:01-00:04.5, 2-). Given once: applies to every "
             "input; given once per input: pairs with the inputs in order; '-' alone leaves that input whole.")] = None,
    crop: Annotated[Optional[list[str]], typer.Option(
        help="W:H:X:Y before upscaling; pairs with inputs like --trim. Inputs of another size or frame rate "
             "are resized and resampled to the first input's (after its crop).")] = None,
    codec: Annotated[Optional[str], typer.Option(help="h264 (default) or hevc.")] = None,
    crf: Annotated[Optional[int], typer.Option(help="Constant rate factor (default 18 for h264, 20 for hevc).")] = None,
    segment_frames: Annotated[Optional[int], typer.Option(help="Frames per segment, the unit of work and resume.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda (local backend).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    estimate: Annotated[bool, typer.Option("--estimate", help="Print the estimated time per phase; run nothing.")] = False,
    json_out: JsonOpt = False,
    progress: ProgressOpt = "auto",
) -> None:
    """Upscale INPUT... into one OUTPUT with the original audio.

    Progress goes to stderr; at the end the output path alone goes to stdout
    (with --json, the events go to stdout instead).
    """
    with _errors_to_exit():
        settings = config.load_settings(
            {"model": model, "scale": scale, "codec": codec, "crf": crf,
             "segment_frames": segment_frames, "device": device}
        )
        spec = _spec(inputs, output, settings, weights, trim, crop)
        from clipexport.orchestrator import prepare_job

        prepared = prepare_job(spec, force=force)
        if estimate:
            _print_estimate(prepared, spec)
            return
        store = _store()
        record = store.create(spec)
        store.set_fact(record.id, "force", force)
        _say(f"job {record.id} started (resume with `clipexport resume {record.id}`)")
        _run(store, record, prepared, mode="json" if json_out else progress, fresh=True, force=False)


def _spec(inputs: list[Path], output: Path, settings: config.Settings, weights: Path | None,
          trims: list[str] | None, crops: list[str] | None) -> JobSpec:
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
        device=settings.device,
    )


def _print_estimate(prepared: Any, spec: JobSpec) -> None:
    from clipexport.orchestrator import build_plan
    from clipexport.progress import estimate_plan, load_model

    total_bytes = sum(i.size_bytes for i in prepared.infos)
    plan = build_plan(prepared, input_bytes=total_bytes, backend=spec.backend, device=spec.device)
    plan.update(v=events.VERSION, job="estimate", seq=0, t=time.time())
    estimate = estimate_plan(plan, load_model())
    for phase, seconds in estimate["phases"].items():
        print(f"{phase:<12} {_duration(seconds)}")
    print(f"{'total':<12} {_duration(estimate['total_s'])}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _run(store: JobStore, record: JobRecord, prepared: Any, *, mode: str, fresh: bool, force: bool) -> None:
    """Run a job under a display; print the output path when done."""
    from clipexport.backends import create_backend
    from clipexport.orchestrator import JobRunner
    from clipexport.progress import Tracker, load_model
    from clipexport.progress.display import choose_mode, make_display

    _install_signal_handlers()
    tracker = Tracker(load_model(), floor=record.fraction)
    if not fresh:
        for event in events.read_events(store.log_path(record.id)):
            tracker.feed(event)
    mode = choose_mode(mode, sys.stderr.isatty())
    segment_root = config.data_dir() / "store"
    with make_display(mode, tracker=tracker) as display:
        runner = JobRunner(
            store, record,
            segment_root=segment_root,
            backend_factory=lambda spec: create_backend(spec, segment_root),
            sinks=[display.handle],
            accept_changed_inputs=force,
            fraction=lambda: tracker.snapshot(time.time()).fraction,
        )
        if fresh:
            runner.emit_plan(prepared, backend=record.spec.backend, device=record.spec.device)
        try:
            out = runner.run(prepared)
        except Interrupted as exc:
            display.close()
            if exc.exit_code != EXIT_RESUMABLE:
                _say(f"stopped; job {record.id} is kept. Resume: `clipexport resume {record.id}`; "
                     f"cancel: `clipexport cancel {record.id}`")
            raise
    if mode != "json":
        print(out, flush=True)


@app.command()
def resume(
    job: Annotated[str, typer.Argument(help="The job id (see `clipexport jobs`).")],
    force: Annotated[bool, typer.Option("--force", help="Accept inputs changed since the job started.")] = False,
    json_out: JsonOpt = False,
    progress: ProgressOpt = "auto",
) -> None:
    """Continue an interrupted or failed job, skipping finished work."""
    with _errors_to_exit():
        from clipexport.orchestrator import prepare_job

        store = _store()
        record = store.get(job)
        _check_resumable(record)
        output_forced = bool(store.fact(record.id, "force")) or force
        prepared = prepare_job(record.spec, force=output_forced)
        record = store.transition(record.id, JobState.RUNNING)
        _say(f"resuming job {record.id}")
        _run(store, record, prepared, mode="json" if json_out else progress, fresh=False, force=force)


def _check_resumable(record: JobRecord) -> None:
    if record.state not in RESUMABLE:
        raise JobLookupError(f"job {record.id} is {record.state.value}; nothing to resume")
    if record.state == JobState.RUNNING and _alive(record.pid):
        raise JobLookupError(f"job {record.id} is running in process {record.pid}")


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


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=os.environ.get("CLIPEXPORT_LOG_LEVEL", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(message)s")
    app()


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


def _json_line(value: Any) -> None:
    print(json.dumps(value, separators=(",", ":")), flush=True)
