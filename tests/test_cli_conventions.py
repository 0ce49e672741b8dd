"""The command line as other tools have taught people to expect it:
-h, --version, -q, -v, readable help with groups and examples."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipexport import __version__, events
from clipexport.cli import app
from tests.clips import make_clip

runner = CliRunner()
COMMANDS = [["render"], ["spec"], ["resume"], ["status"], ["jobs"], ["cancel"], ["logs"], ["eta", "fit"], ["eta", "replay"]]


def help_of(*command: str, flag: str = "-h") -> str:
    result = runner.invoke(app, [*command, flag], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    return result.stdout


def test_version_and_short_help_on_the_root():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"clipexport {__version__}\n"
    assert help_of(flag="-h") == help_of(flag="--help")
    assert "--version" in help_of() and "Examples" in help_of()


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_short_help_plain_metavars_and_examples(command):
    text = help_of(*command)
    assert text == help_of(*command, flag="--help")
    for noise in ("<bool>", "<list[", "<str>", "<path>", "{job}", "{INPUT}"):
        assert noise not in text, (noise, text)
    assert "Examples" in text and f"clipexport {' '.join(command)}" in text.split("Examples", 1)[1]


def test_render_help_is_grouped():
    text = help_of("render")
    panels = re.findall(r"╭─ (.+?) ─", text)
    assert panels == ["Arguments", "Input", "Output", "Model and quality", "Cloud", "Display and scripting"]
    for metavar in ("INPUT...", "FILE", "START-END", "W:H:X:Y", "NAME", "URL", "SECONDS"):
        assert metavar in text, metavar
    assert "Usage: clipexport render [OPTIONS] [INPUT...]" in text  # optional: --spec names the clips instead
    assert "Usage: clipexport resume [OPTIONS] JOB" in help_of("resume")
    assert "[JOB]" in help_of("status")


def test_json_help_says_what_each_command_prints():
    assert "fraction, elapsed, remaining_s" in help_of("status")
    assert "job, state, created" in help_of("jobs")
    assert "snapshot" in help_of("render") and "interrupted" in help_of("render")
    assert "docs/progress-events.md" in help_of("logs")


def test_verbose_json_render_then_quiet_render(tmp_path):
    """-v: the [Progress Event] lines on stderr; --json: snapshots among the events on stdout;
    -q: nothing on stderr, the path alone on stdout."""
    clip = make_clip(tmp_path / "clip.mp4", frames=8, width=32, height=18, fps=24)
    loud = runner.invoke(app, ["render", str(clip), "-o", str(tmp_path / "a.mp4"), "--scale", "2", "--json",
                               "--progress-interval", "0.1", "-v"])
    assert loud.exit_code == 0, loud.stderr
    assert re.search(r"\[Progress Event\] job=cx-\w+ phase=upscale event=phase_end", loud.stderr)
    assert re.search(r"job cx-\w+: event log .+\.jsonl; segments in .+; backend local, device cpu", loud.stderr)
    lines = [json.loads(line) for line in loud.stdout.splitlines()]
    for event in lines:
        events.validate_event(event)
    assert [e["seq"] for e in lines] == list(range(len(lines)))
    assert "snapshot" in {e["type"] for e in lines} and lines[-1]["type"] == "done"

    quiet = runner.invoke(app, ["render", str(clip), "-o", str(tmp_path / "b.mp4"), "--scale", "2", "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == f"{tmp_path / 'b.mp4'}\n"


def test_quiet_and_verbose_together_are_refused(tmp_path):
    result = runner.invoke(app, ["render", "x.mp4", "-o", str(tmp_path / "o.mp4"), "-q", "-v"])
    assert result.exit_code == 2 and "contradict" in result.output
    assert not Path(tmp_path / "o.mp4").exists()
