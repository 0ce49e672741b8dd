"""Media: probe clips, plan segments, decode frames, encode segments, concat and mux.

Everything here uses PyAV (FFmpeg in-process); no ``ffmpeg`` binary, no torch.
Every PyAV error is translated at this boundary into a :mod:`clipexport.errors`
exception whose message is one line naming the file:

* problems with an input clip -> :class:`~clipexport.errors.InputError`;
* problems writing a segment or the output -> :class:`~clipexport.errors.OutputError`;
* an unreadable or mismatched segment file handed to :func:`concat_and_mux`
  -> :class:`SegmentError` (a :class:`~clipexport.errors.ClipexportError`).

Conventions used throughout
---------------------------

*Time origin.* A clip's time 0 is the presentation time of its first video
frame (``stream.start_time``); audio is aligned on the same container clock.

*Frame rate, VFR.* ``ClipInfo.fps`` is the stream's *average* rate. Output is
always constant frame rate at the first clip's average rate (its
``ClipInfo.pace`` where pauses pull the average below its usual spacing): output frame
``k`` of a clip shows the source frame on screen at source time
``T0 + k / fps_target`` (the last frame whose pts is at or before that time,
with a tolerance of min(1/4 source frame, one time-base tick) for pts
rounding in containers such as Matroska). Frames are chosen by their pts,
never by counting, so variable-frame-rate input becomes CFR by duplicating
frames, and a clip at a higher rate is resampled (dropping frames) the same
way. A *crowded* clip (``ClipInfo.crowded``: some frames closer together than
one frame at its average rate) rendered at or above its own rate loses no
frame: :func:`~clipexport.media.plan.pushed_slots` moves a frame whose slot
is taken to the next free one, and the plan counts the slots that needs.

*Timestamps.* Leading frames without a pts come one frame apart before the
first that has one (:func:`~clipexport.media.probe.video_origin`); a stream
with none at all (raw H.264) runs at the rate its codec headers give, 25 fps
if none, frames in decode order, and is never sought into.

*Rotation.* ``ClipInfo.rotation`` is the clockwise rotation (0/90/180/270)
needed to display the frame upright, read from the display matrix (what the
legacy ``rotate`` tag meant; FFmpeg's ``av_display_rotation_get`` returns the
negative of it). Width/height in :class:`ClipInfo` are display sizes, crops
are given in display coordinates, and :func:`read_frames` returns upright frames.
Non-square sample aspect ratios are not corrected (pixels are taken as square).

*Odd sizes.* Crops and planned sizes may be odd (the upscaler multiplies them
by 2 or 4, which makes them even). :class:`VideoWriter` needs even sizes for
yuv420p: given an odd width or height it drops the last column/row (documented
on the class) instead of failing.

Where things are
----------------

Each module imports only those above it: ``_util`` (the PyAV errors caught
here, one-line messages) <- ``probe`` (:class:`ClipInfo`, :func:`probe`) <-
``plan`` (:class:`Crop`, :func:`parse_crop`, :func:`parse_trim`,
:class:`ClipPlan`, :func:`plan_clips`, :class:`Segment`, :func:`plan_segments`)
<- ``decode`` (:func:`read_frames`) and ``mux`` (:func:`concat_and_mux`,
:func:`join_video`, :class:`SegmentError`: containers, audio copy vs AAC); ``encode``
(:class:`VideoWriter`) needs only ``_util``.
"""

from .decode import read_frames
from .encode import VideoWriter
from .mux import SegmentError, concat_and_mux, join_video
from .plan import ClipPlan, Crop, Segment, parse_crop, parse_trim, plan_clips, plan_segments
from .probe import ClipInfo, probe

__all__ = [
    "ClipInfo",
    "ClipPlan",
    "Crop",
    "Segment",
    "SegmentError",
    "VideoWriter",
    "concat_and_mux",
    "join_video",
    "parse_crop",
    "parse_trim",
    "plan_clips",
    "plan_segments",
    "probe",
    "read_frames",
]
