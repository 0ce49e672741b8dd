"""`render --spec`: overlays burnt in at output resolution, framing, --each, and bad specs.

Pixel checks decode real renders (64x36 clips upscaled x2 by the real model,
x264 at CRF 0) and compare them with a render of the same clip without
overlays, so what an overlay changed, and only that, shows up.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipexport.cli import app
from clipexport.overlay import KINDS
from clipexport.remote import task_from_dict, task_to_dict
from clipexport.spec import SpecError, load_spec
from tests.clips import make_clip, read_index

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# 48 frames at 24 fps, segments of 12: each overlay's time window picks its segments.
TIMELINE = """
[[clips.overlays]]  # frames 6-11: seg-0001 only
kind = "box"
start = 0.25
end = 0.5
x = 0.05
y = 0.1
w = 0.15
h = 0.25
color = "{box_color}"

[[clips.overlays]]  # frames 0-23, moving right: x 0.1 at t=0 -> 0.7 at t=1
kind = "ellipse"
end = 1.0
x = 0.1
y = 0.55
w = 0.1
h = 0.2
color = "#0000ff"
keyframes = [{{t = 0.0, x = 0.1}}, {{t = 1.0, x = 0.7}}]

[[clips.overlays]]  # frames 0-23, top right, half transparent
kind = "image"
end = 1.0
path = "logo.png"
x = 0.75
y = 0.05
w = 0.2
opacity = 0.5

[[clips.overlays]]  # frames 24-35, alone
kind = "text"
start = 1.0
end = 1.5
text = "Hi"
x = 0.1
y = 0.3
size = 0.3

[[clips.overlays]]  # frames 36-47, alone
kind = "spotlight"
start = 1.5
x = 0.35
y = 0.25
w = 0.3
h = 0.5
dim = 0.5
"""


def frames_of(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24").astype(int) for f in container.decode(video=0)]


def write_spec(directory: Path, body: str, name: str = "reel.toml", **settings: object) -> Path:
    head = "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    path = directory / name
    path.write_text(head + body)
    return path


def render(*args: str):
    return runner.invoke(app, ["render", *args, "--progress", "none"])


def computed_parts(result) -> set[str]:
    """The segments a --json render actually ran (skipped ones have no part phase_start)."""
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    return {e["part"] for e in lines if e["type"] == "phase_start" and e.get("phase") == "upscale" and "part" in e}


@pytest.fixture(scope="module")
def overlaid(tmp_path_factory: pytest.TempPathFactory):
    """A grey clip rendered without overlays and with the TIMELINE's (once for the module).

    Returns the folder, both renders' frames, the --json result of the
    second and the clipexport home holding their segments.
    """
    tmp_path = tmp_path_factory.mktemp("overlaid")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLIPEXPORT_HOME", str(tmp_path / "home"))
        make_clip(tmp_path / "grey.mp4", frames=48, width=64, height=36, fps=24, solid=128, audio=False)
        Image.new("RGBA", (20, 10), (255, 0, 0, 255)).save(tmp_path / "logo.png")
        clip = '[[clips]]\nsource = "grey.mp4"\n'
        common = dict(scale=2, crf=0, segment_frames=12)
        plain = write_spec(tmp_path, clip, "plain.toml", output="plain.mp4", **common)
        assert render("--spec", str(plain)).exit_code == 0
        spec = write_spec(tmp_path, clip + TIMELINE.format(box_color="#ff0000"), output="reel.mp4", **common)
        result = runner.invoke(app, ["render", "--spec", str(spec), "--json"])
    assert result.exit_code == 0, result.stderr
    return tmp_path, frames_of(tmp_path / "plain.mp4"), frames_of(tmp_path / "reel.mp4"), result


def test_overlays_are_drawn_where_and_when_the_spec_says(overlaid):
    _, base, out, _ = overlaid
    assert len(out) == len(base) == 48 and out[0].shape == (72, 128, 3)
    grey = base[0][36, 64]
    assert abs(grey - 128).max() <= 8

    # a timed box: present in exactly frames 6..11, nowhere else
    red_box = [f[16, 12] for f in out]  # inside the box (x 6..26, y 7..25)
    shown = [i for i, p in enumerate(red_box) if p[0] > 200 and p[1] < 60 and p[2] < 60]
    assert shown == list(range(6, 12))

    # keyframed ellipse: at t=0.5 (frame 12) its box starts at x = 0.4 * 128 = 51.2 px
    blue = (out[12][..., 2] - out[12][..., 0] > 80) & (np.arange(72)[:, None] > 36)
    xs = np.nonzero(blue)[1]
    assert xs.size and abs(xs.mean() - (0.4 + 0.05) * 128) <= 1.5
    assert not blue[:, :40].any()  # nothing left where it started

    # image at opacity 0.5: red over grey 128 gives about (192, 64, 64)
    logo = out[6][9, 108]  # inside x 96..122, y 4..17
    assert abs(logo - np.array([192, 64, 64])).max() <= 14

    # text changes pixels only inside its box: x from 12.8, y from 21.6, 21.6 px high
    changed = np.abs(out[30] - base[30]).max(axis=2) > 24
    ys, xs = np.nonzero(changed)
    assert ys.size > 30
    assert xs.min() >= 12 and xs.max() <= 13 + 2 * 22 and ys.min() >= 21 and ys.max() <= 22 + 22 * 1.5

    # spotlight dims outside its ellipse (centre 64, 36) and not inside
    frame = out[40]
    assert abs(frame[36, 64] - base[40][36, 64]).max() <= 6
    assert abs(frame[3, 3] - base[40][3, 3] / 2).max() <= 6 and abs(frame[68, 124] - base[40][68, 124] / 2).max() <= 6
    assert np.abs(out[20] - base[20])[60:, :].max() <= 6  # before the spotlight: the bottom band untouched


def test_changing_one_overlay_renders_only_the_segments_it_touches(overlaid, monkeypatch):
    tmp_path, _, _, first = overlaid
    monkeypatch.setenv("CLIPEXPORT_HOME", str(tmp_path / "home"))  # where the first render left its segments
    assert computed_parts(first) == {"seg-0001", "seg-0002", "seg-0003", "seg-0004"}
    clip = '[[clips]]\nsource = "grey.mp4"\n'
    spec = write_spec(tmp_path, clip + TIMELINE.format(box_color="#00ff00"), "green.toml", output="green.mp4",
                      scale=2, crf=0, segment_frames=12)
    result = runner.invoke(app, ["render", "--spec", str(spec), "--json"])
    assert result.exit_code == 0, result.stderr
    assert computed_parts(result) == {"seg-0001"}
    green = frames_of(tmp_path / "green.mp4")
    assert green[8][16, 12][1] > 200 and green[8][16, 12][0] < 60


def test_trim_crop_and_each_give_the_right_frames_per_file(tmp_path):
    make_clip(tmp_path / "a.mp4", frames=48, width=64, height=36, fps=24)
    make_clip(tmp_path / "b.mp4", frames=24, width=64, height=36, fps=24)
    body = ('[[clips]]\nsource = "a.mp4"\ntrim = "0.5-1"\ncrop = "64:18:0:9"\n'
            '[[clips]]\nsource = "b.mp4"\ncrop = "64:18:0:18"\n')
    spec = write_spec(tmp_path, body, output="joined.mp4", scale=2, segment_frames=8)
    result = render("--spec", str(spec), "--each", str(tmp_path / "each"))
    assert result.exit_code == 0, result.stderr
    first, second = tmp_path / "each" / "01-a.mp4", tmp_path / "each" / "02-b.mp4"
    assert result.stdout.split() == [str(first), str(second)]
    for path, expected in ((first, list(range(12, 24))), (second, list(range(24)))):
        frames = frames_of(path)
        assert [read_index(f) for f in frames] == expected
        assert frames[0].shape == (36, 128, 3)
    result = render("--spec", str(spec))  # without --each: joined into the spec's output, segments reused
    assert result.exit_code == 0, result.stderr
    assert [read_index(f) for f in frames_of(tmp_path / "joined.mp4")] == list(range(12, 24)) + list(range(24))


def test_estimate_with_a_spec_runs_nothing(tmp_path, clipexport_home):
    make_clip(tmp_path / "a.mp4", frames=12, width=64, height=36, fps=24)
    spec = write_spec(tmp_path, '[[clips]]\nsource = "a.mp4"\n', output="out.mp4", scale=2)
    result = runner.invoke(app, ["render", "--spec", str(spec), "--estimate"])
    assert result.exit_code == 0, result.stderr
    assert "upscale" in result.stdout and "total" in result.stdout
    assert not (tmp_path / "out.mp4").exists() and not (clipexport_home / "state" / "jobs").exists()


def test_overlays_travel_in_a_remote_task_and_the_container_draws_them(tmp_path):
    """What a Modal container runs (`remote.run_segments`), given a task as JSON, on the real model."""
    from clipexport.media import plan_clips, plan_segments, probe
    from clipexport.remote import Container, run_segments
    from clipexport.storage import LocalStorage, hash_file
    from clipexport.upscale import load_upscaler
    from clipexport.worker import SegmentTask

    clip = make_clip(tmp_path / "grey.mp4", frames=6, width=64, height=36, fps=24, solid=128, audio=False)
    store = LocalStorage(tmp_path / "store")
    input_key = f"inputs/{hash_file(clip)}.mp4"
    store.put_file(input_key, clip)
    plan = plan_clips([probe(clip)], [None], [None])[0]
    box = {"kind": "box", "start": 0.1, "x": 0.25, "y": 0.25, "w": 0.5, "h": 0.5, "color": "#ff0000"}
    task = SegmentTask("cx-000001", plan_segments([6], 6)[0], plan, "segments/boxed.mp4", crf=0,
                       input_key=input_key, overlays=(box,))
    as_sent = json.loads(json.dumps(task_to_dict(task)))
    assert task_from_dict(as_sent).overlays == (box,)
    result = run_segments([as_sent], store, load_upscaler("realesr-animevideov3", scale=2, device="cpu"),
                          Container.loaded(0.1), cache=tmp_path / "cache")
    assert "error" not in result, result
    store.get_file("segments/boxed.mp4", tmp_path / "boxed.mp4")
    red = [f[36, 64, 0] > 200 and f[36, 64, 1] < 60 for f in frames_of(tmp_path / "boxed.mp4")]
    assert red == [False, False, False, True, True, True]  # from t = 0.1 s: frame 3 (0.125 s) on


def test_the_schema_comes_from_the_declaration_and_the_example_passes():
    result = runner.invoke(app, ["spec", "--schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    variants = schema["properties"]["clips"]["items"]["properties"]["overlays"]["items"]["oneOf"]
    assert [v["properties"]["kind"]["const"] for v in variants] == list(KINDS)
    reel = load_spec(EXAMPLES / "reel.toml")
    assert {o["kind"] for c in reel.clips for o in c.overlays} == set(KINDS)


SOURCE = '[[clips]]\nsource = "a.mp4"\n'
BAD_SPECS = [
    ("toml syntax", "reel.toml", 'clips = [\n  {source = "a.mp4"\n', "reel.toml: line 3: not valid TOML"),
    ("json syntax", "reel.json", '{\n "clips": [}\n', "reel.json: line 2: not valid JSON"),
    ("unknown setting", "reel.toml", 'colour = "red"\n' + SOURCE, "reel.toml: colour: unknown key"),
    ("unknown kind", "reel.toml", SOURCE + '[[clips.overlays]]\nkind = "sparkle"\n',
     "reel.toml: clips[0].overlays[0].kind: 'sparkle' is not one of text, box, ellipse, spotlight, image"),
    ("unknown overlay key", "reel.toml", SOURCE + '[[clips.overlays]]\nkind = "box"\nx=0\ny=0\nw=1\nh=1\nfill=1\n',
     "reel.toml: clips[0].overlays[0].fill: unknown key"),
    ("missing field", "reel.toml", SOURCE + '[[clips.overlays]]\nkind = "box"\nx=0\ny=0\nw=1\n',
     "reel.toml: clips[0].overlays[0].h: missing"),
    ("wrong type", "reel.toml", SOURCE + '[[clips.overlays]]\nkind = "text"\ntext="a"\nx="left"\ny=0\n',
     "reel.toml: clips[0].overlays[0].x: expected a number"),
    ("missing source", "reel.toml", '[[clips]]\nsource = "nope.mp4"\n', "reel.toml: clips[0].source: nope.mp4 not found"),
    ("missing image", "reel.toml", SOURCE + '[[clips.overlays]]\nkind = "image"\npath = "logo.png"\nx=0\ny=0\nw=0.1\n',
     "reel.toml: clips[0].overlays[0].path: logo.png not found"),
    ("bad trim", "reel.toml", '[[clips]]\nsource = "a.mp4"\ntrim = "a-b"\n', "reel.toml: clips[0].trim: bad trim 'a-b'"),
    ("bad crop", "reel.toml", '[[clips]]\nsource = "a.mp4"\ncrop = "64x36"\n', "reel.toml: clips[0].crop: bad crop"),
    ("trim past the end", "reel.toml", '[[clips]]\nsource = "a.mp4"\ntrim = "2-3"\n',
     "reel.toml: clips[0].trim: trim start 2s is past the end"),
    ("crop outside", "reel.toml", '[[clips]]\nsource = "a.mp4"\ncrop = "64:36:8:0"\n',
     "reel.toml: clips[0].crop: crop 64:36:8:0 lies outside"),
    ("start past the end", "reel.toml", SOURCE + '[[clips.overlays]]\nkind = "box"\nstart=0.6\nx=0\ny=0\nw=1\nh=1\n',
     "reel.toml: clips[0].overlays[0].start: 0.6 is past the clip's end"),
    ("end past the end", "reel.toml", SOURCE + '[[clips.overlays]]\nkind = "box"\nend=0.7\nx=0\ny=0\nw=1\nh=1\n',
     "reel.toml: clips[0].overlays[0].end: 0.7 is past the clip's end"),
    ("end before start", "reel.toml", SOURCE + '[[clips.overlays]]\nkind = "box"\nstart=0.3\nend=0.2\nx=0\ny=0\nw=1\nh=1\n',
     "reel.toml: clips[0].overlays[0].end: 0.2 is not after start 0.3"),
    ("keyframes out of order", "reel.toml",
     SOURCE + '[[clips.overlays]]\nkind = "box"\nx=0\ny=0\nw=0.5\nh=0.5\nkeyframes=[{t=0.4,x=0.1},{t=0.2,x=0.3}]\n',
     "reel.toml: clips[0].overlays[0].keyframes[1].t: 0.2 does not come after 0.4"),
    ("off screen", "reel.toml", SOURCE + '[[clips.overlays]]\nkind = "ellipse"\nx=1.2\ny=0\nw=0.1\nh=0.1\n',
     "reel.toml: clips[0].overlays[0]: leaves no pixel on the 128x72 output"),
    ("off screen at a keyframe", "reel.toml",
     SOURCE + '[[clips.overlays]]\nkind = "box"\nx=0\ny=0\nw=0.1\nh=0.1\nkeyframes=[{t=0.1,y=-0.5}]\n',
     "reel.toml: clips[0].overlays[0]: leaves no pixel on the 128x72 output at keyframes[0]"),
    ("bad colour", "reel.toml", SOURCE + '[[clips.overlays]]\nkind = "box"\nx=0\ny=0\nw=1\nh=1\ncolor="#ggg"\n',
     "reel.toml: clips[0].overlays[0].color: '#ggg' is not a colour"),
    ("bad scale", "reel.toml", "scale = 3\n" + SOURCE, "reel.toml: scale: 3 is not one of 2, 4"),
    ("output and each", "reel.toml", 'each = "clips"\n' + SOURCE, "reel.toml: each: give output"),
]


@pytest.mark.parametrize("name, file, body, message", BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_a_bad_spec_is_one_line_and_exit_2(tmp_path, clipexport_home, monkeypatch, name, file, body, message):
    make_clip(tmp_path / "a.mp4", frames=12, width=64, height=36, fps=24, audio=False)
    (tmp_path / file).write_text('output = "out.mp4"\n' * (file == "reel.toml") + body)
    monkeypatch.chdir(tmp_path)
    result = render("--spec", file, "--scale", "2")
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipexport: error: " + message), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "out.mp4").exists() and not (clipexport_home / "state" / "jobs").exists()


def test_spec_with_inputs_is_refused(tmp_path):
    make_clip(tmp_path / "a.mp4", frames=6, width=64, height=36, fps=24, audio=False)
    spec = write_spec(tmp_path, SOURCE, output="out.mp4")
    result = render(str(tmp_path / "a.mp4"), "--spec", str(spec))
    assert result.exit_code == 2 and "give no INPUT" in result.stderr


def test_load_spec_reports_the_field(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"clips": [{"source": "x.mp4"}], "scale": True}))
    with pytest.raises(SpecError, match=r"r\.json: scale: expected a whole number, got a boolean"):
        load_spec(tmp_path / "r.json")


def test_a_stopped_spec_job_resumes_to_every_file(tmp_path, monkeypatch):
    from clipexport.backends.local import LocalBackend
    from clipexport.errors import Interrupted

    make_clip(tmp_path / "a.mp4", frames=12, width=64, height=36, fps=24, audio=False)
    make_clip(tmp_path / "b.mp4", frames=12, width=64, height=36, fps=24, audio=False)
    body = ('[[clips]]\nsource = "a.mp4"\n[[clips]]\nsource = "b.mp4"\n'
            '[[clips.overlays]]\nkind = "box"\nx = 0.3\ny = 0.3\nw = 0.1\nh = 0.4\ncolor = "#ff0000"\n')
    spec = write_spec(tmp_path, body, each="out", scale=2, segment_frames=6)
    run = LocalBackend.run

    def one_segment_then_stop(self, tasks, emit, stop):  # forces the stop between segments
        run(self, tasks[:1], emit, stop)
        raise Interrupted("stopped by the test")

    monkeypatch.setattr(LocalBackend, "run", one_segment_then_stop)
    stopped = render("--spec", str(spec))
    assert stopped.exit_code == 75, stopped.stderr
    job = next(w for w in stopped.stderr.split() if w.startswith("cx-"))
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(LocalBackend, "run", run)
    resumed = runner.invoke(app, ["resume", job, "--json"])
    assert resumed.exit_code == 0, resumed.stderr
    assert computed_parts(resumed) == {"seg-0002", "seg-0003", "seg-0004"}
    first, second = frames_of(tmp_path / "out" / "01-a.mp4"), frames_of(tmp_path / "out" / "02-b.mp4")
    assert [read_index(f) for f in first] == list(range(12))
    assert all(f[28, 44, 0] > 200 and f[28, 44, 1] < 60 for f in second)  # the box, on every frame of b
    again = runner.invoke(app, ["resume", job])  # done: its outputs again, one a line, as render prints them
    assert again.exit_code == 0, again.stderr
    assert again.stdout.splitlines() == [str(tmp_path / "out" / "01-a.mp4"), str(tmp_path / "out" / "02-b.mp4")]
    scripted = runner.invoke(app, ["resume", job, "--json"])  # and for a script: the job's own done event
    assert scripted.exit_code == 0, scripted.stderr
    (line,) = scripted.stdout.splitlines()
    assert json.loads(line)["type"] == "done" and json.loads(line)["job"] == job
