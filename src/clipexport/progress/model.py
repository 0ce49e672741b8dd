"""The timing model: what past jobs say about how long each phase takes.

A `TimingModel` is a small JSON document (written by `fit.fit_logs`) read
through a handful of prediction methods. Every method has a generic fallback,
so a model fitted on a few jobs, or on jobs of another kind, still answers:
an unknown GPU gets the typical GPU's speed with a wide uncertainty (the
job's observed rate then takes over quickly), an unknown model gets the
average model.

Rates are log-normal: each prior is `(log_mu, sd)` of the natural log, so the
estimator can weigh it against what the running job shows.

Waiting times (queue, cold start, model load) are kept as distributions
(`Dist`, 21 quantiles) so the remaining wait can be conditioned on the time
already waited.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

FORMAT = "clipexport-timing-model"
VERSION = 1
MODEL_FILENAME = "timing-model.json"


class Dist:
    """A distribution given by sorted quantiles at p = 0, 1/(n-1), ..., 1.

    Between quantiles the CDF is linear, so conditional expectations move
    smoothly as the time waited grows. Past the last quantile the remaining
    wait is taken as a share of the time already waited (nothing is known
    there, and "a bit longer" is the honest answer).
    """

    TAIL_SHARE = 0.2

    def __init__(self, quantiles: Sequence[float]) -> None:
        qs = sorted(float(q) for q in quantiles if math.isfinite(float(q)))
        if not qs:
            qs = [0.0]
        if len(qs) == 1:
            qs = [qs[0], qs[0]]
        self.q = qs
        n = len(qs) - 1
        # integral of the survival function from q[k] to the end, for each k
        tail = [0.0] * (n + 1)
        for k in range(n - 1, -1, -1):
            s0, s1 = 1.0 - k / n, 1.0 - (k + 1) / n
            tail[k] = tail[k + 1] + (s0 + s1) / 2.0 * (qs[k + 1] - qs[k])
        self._tail = tail
        self._n = n

    @classmethod
    def from_samples(cls, samples: Sequence[float], points: int = 21) -> Dist:
        xs = sorted(float(x) for x in samples)
        if not xs:
            return cls([0.0])
        out = []
        for i in range(points):
            pos = i / (points - 1) * (len(xs) - 1)
            lo = int(math.floor(pos))
            hi = min(lo + 1, len(xs) - 1)
            out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
        return cls(out)

    def to_json(self) -> list[float]:
        return [round(q, 4) for q in self.q]

    def mean(self) -> float:
        return self.q[0] + self._tail[0]

    def quantile(self, p: float) -> float:
        pos = min(max(p, 0.0), 1.0) * self._n
        lo = int(math.floor(pos))
        hi = min(lo + 1, self._n)
        return self.q[lo] + (self.q[hi] - self.q[lo]) * (pos - lo)

    def survival(self, w: float) -> float:
        q, n = self.q, self._n
        if w < q[0]:
            return 1.0
        if w >= q[-1]:
            return 0.0
        k = bisect.bisect_right(q, w) - 1
        width = q[k + 1] - q[k]
        frac = (w - q[k]) / width if width > 0 else 1.0
        return 1.0 - (k + frac) / n

    def _excess(self, w: float) -> float:
        """E[(T - w)+]."""
        q, n = self.q, self._n
        if w < q[0]:
            return q[0] - w + self._tail[0]
        if w >= q[-1]:
            return 0.0
        k = bisect.bisect_right(q, w) - 1
        width = q[k + 1] - q[k]
        s_k, s_k1 = 1.0 - k / n, 1.0 - (k + 1) / n
        s_w = s_k + (s_k1 - s_k) * ((w - q[k]) / width if width > 0 else 1.0)
        return (s_w + s_k1) / 2.0 * (q[k + 1] - w) + self._tail[k + 1]

    def remaining(self, waited: float) -> float:
        """Expected time still to wait, given `waited` seconds already."""
        waited = max(0.0, waited)
        s = self.survival(waited)
        floor = self.TAIL_SHARE * waited
        if s <= 1e-9:
            return max(floor, 0.5)
        return max(self._excess(waited) / s, floor)


def _lognormal(entry: Mapping[str, Any] | None, mu: float, sd: float) -> tuple[float, float]:
    if not entry:
        return mu, sd
    return float(entry.get("mu", mu)), float(entry.get("sd", sd))


# Generic values, used when a fitted model lacks a section (a user model fitted
# on few jobs, or an older file). Rough medians of ordinary jobs.
GENERIC: dict[str, Any] = {
    "prepare": {"log_rate": {"mu": math.log(300e6), "sd": 1.0}, "base_s": 0.1},
    "upload": {"log_rate": {"a": math.log(2e6), "b": 0.0, "ref": math.log(50e6), "sd": 1.0}, "gap_s": 0.1},
    "download": {
        "log_rate": {"mu": math.log(8e6), "sd": 1.0},
        "vs_upload": {"a": math.log(8e6), "b": 0.0, "ref": math.log(2e6), "sd": 1.0},
        "latency_s": 0.6,
    },
    "output": {"log_bytes_per_px": {"mu": math.log(0.012), "sd": 0.6}},
    "queue": {
        "p_warm": [0.75, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15],
        "warm_s": [0.5, 3.0],
        "cold_s": [15.0, 20.0, 25.0, 30.0, 40.0, 60.0, 90.0],
        "stagger_s": 0.3,
        "gap_s": 0.25,
    },
    "load_model": {"*": [2.0, 4.0, 6.0, 8.0, 11.0]},
    "upscale": {
        "mu": math.log(150e-9),
        "sd": 0.3,
        "sd_unknown": 0.9,
        "gpu": {},
        "model": {},
        "model_scale": {},
        "cell": {},
        "overhead_s": 0.3,
        "gap_s": 0.1,
        "settle_frames": 15,
        "warmup_frames": 3.5,
        "warmup": {"a": 2.1, "b": 0.6},
        "probe_log_ratio": 0.0,
        "probe_sd": 0.25,
    },
    "encode": {"flush_s": 0.75},
    "finalize": {"*": {"base_s": 0.3, "s_per_gb": 2.5, "max_s": 30.0}},
}


class TimingModel:
    """Priors for every phase, read from a fitted JSON document."""

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self.data: dict[str, Any] = dict(data or {})
        self._dists: dict[tuple[str, ...], Dist] = {}

    # -- files -------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> TimingModel:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a clipexport timing model")
        if int(data.get("version", 0)) > VERSION:
            raise ValueError(f"{path}: timing model version {data.get('version')} is newer than this clipexport")
        return cls(data)

    @classmethod
    def default(cls) -> TimingModel:
        """The built-in model, fitted on the reference traces.

        Except the CPU's speed: the traces' CPU jobs are simulated, and 2.4x
        slower than real renders. `upscale.gpu.cpu`, the two
        `cpu|realesr-animevideov3` cells, `cpu_threads` (2) and
        `load_model.local|cpu` (the weights' read, without the probe) were
        set from real renders on a 2-core machine (the sample clip at x2; 48
        frames of 320x180 at x4 from `bench/upscale_fps.py`), in fp32;
        `upscale.precision` `cpu|int8` is log(int8's time / fp32's) for the
        whole upscale phase (decode and encode included) of 240 frames of
        160x96 at x2 and x4, same machine; keep them when refitting.
        """
        text = resources.files("clipexport.progress").joinpath("default_model.json").read_text(encoding="utf-8")
        return cls(json.loads(text))

    @classmethod
    def generic(cls) -> TimingModel:
        """A model with no fitted section: every prior is the generic one."""
        return cls({"format": FORMAT, "version": VERSION, "jobs": 0})

    def save(self, path: str | Path) -> None:
        """Write atomically (a private temporary file renamed into place) under a lock.

        Two jobs finishing at once both refit: the lock keeps their writes
        one after the other, the rename keeps a reader from seeing half a file.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.with_name(path.name + ".lock")):
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                tmp.write_text(dumps(self.data), encoding="utf-8")
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    def to_json(self) -> dict[str, Any]:
        return self.data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TimingModel) and self.data == other.data

    # -- sections ----------------------------------------------------------

    def section(self, name: str) -> dict[str, Any]:
        merged = dict(GENERIC.get(name, {}))
        merged.update(self.data.get(name) or {})
        return merged

    def _dist(self, *key: str, quantiles: Sequence[float]) -> Dist:
        dist = self._dists.get(key)
        if dist is None:
            dist = self._dists[key] = Dist(quantiles)
        return dist

    # -- predictions -------------------------------------------------------

    def prepare_rate(self) -> tuple[float, float]:
        sec = self.section("prepare")
        return _lognormal(sec.get("log_rate"), math.log(300e6), 1.0)

    def upload_rate(self, size_bytes: float | None) -> tuple[float, float]:
        """Prior of the upload throughput (bytes/s) for an upload of this size."""
        lr = self.section("upload")["log_rate"]
        mu = float(lr["a"])
        if size_bytes and size_bytes > 0:
            mu += float(lr.get("b", 0.0)) * (math.log(size_bytes) - float(lr.get("ref", 0.0)))
        return mu, float(lr["sd"])

    def download_rate(self, upload_rate: float | None = None, upload_weight: float = 1.0) -> tuple[float, float]:
        """Prior of the download throughput; a known upload rate informs it."""
        sec = self.section("download")
        mu, sd = _lognormal(sec.get("log_rate"), math.log(8e6), 1.0)
        vs = sec.get("vs_upload")
        if upload_rate and upload_rate > 0 and vs:
            mu_u = float(vs["a"]) + float(vs["b"]) * (math.log(upload_rate) - float(vs.get("ref", 0.0)))
            w = min(max(upload_weight, 0.0), 1.0)
            mu = w * mu_u + (1.0 - w) * mu
            sd = w * float(vs["sd"]) + (1.0 - w) * sd
        return mu, sd

    def bytes_per_frame(self, features: Mapping[str, Any]) -> tuple[float, float]:
        """Prior of the encoded size of one output frame (log bytes, sd).

        From the input's own bytes per pixel and the scale where the model
        fitted that (a busy clip encodes to a busy output), else the mean.
        """
        sec = self.section("output")
        mu, sd = _lognormal(sec.get("log_bytes_per_px"), math.log(0.012), 0.6)
        vs, x, scale = sec.get("vs_input"), input_bytes_per_px(features), features.get("scale")
        if vs and x is not None and isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
            mu = float(vs["a"]) + float(vs["b_in"]) * (x - float(vs["ref_in"])) \
                + float(vs["b_scale"]) * (math.log(scale) - float(vs["ref_scale"]))
            sd = float(vs["sd"])
        return mu + math.log(max(out_pixels(features), 1.0)), sd

    def p_warm(self, k: int) -> float:
        """P(the k-th container, 1-based, finds a warm GPU)."""
        p = self.section("queue")["p_warm"]
        if not p:
            return 0.5
        return float(p[min(k, len(p)) - 1]) if k >= 1 else 1.0

    def warm_wait(self) -> Dist:
        return self._dist("warm", quantiles=self.section("queue")["warm_s"])

    def cold_wait(self) -> Dist:
        return self._dist("cold", quantiles=self.section("queue")["cold_s"])

    def load_time(self, features: Mapping[str, Any]) -> Dist:
        sec = self.section("load_model")
        backend = str(features.get("backend", ""))
        model = str(features.get("model", ""))
        if backend == "local" and features.get("gpu") == "cpu" and "local|cpu" in sec:
            return self._cpu_load_time(features, sec["local|cpu"])
        for key in (f"{backend}|{model}", backend, model, "*"):
            if key in sec:
                return self._dist("load", key, quantiles=sec[key])
        return self._dist("load", "generic", quantiles=GENERIC["load_model"]["*"])

    def _cpu_load_time(self, features: Mapping[str, Any], base: Sequence[float]) -> Dist:
        """The built-in model's local CPU load: reading the weights (`base`, measured), then the speed probe.

        The probe is most of it and goes with the frame size: 0.3 s for a
        160x90 clip on 2 cores, seconds at 480p. A model fitted from the
        user's own jobs has no `local|cpu` entry: its load times are real.
        """
        key = ("load", "local|cpu", *(str(features.get(k)) for k in (*_PROBE_FEATURES, "cpu_busy", "int8_first")))
        dist = self._dists.get(key)  # asked on every snapshot: the shift is fixed for a job
        if dist is None:
            shift = probe_seconds(math.exp(self.spf(features)[0])) + _int8_first_s(features)
            dist = self._dists[key] = Dist([q + shift for q in base])
        return dist

    def finalize_time(self, features: Mapping[str, Any], out_bytes: float | None) -> float:
        sec = self.section("finalize")
        entry = sec.get(str(features.get("backend", ""))) or sec.get("*") or GENERIC["finalize"]["*"]
        gb = (out_bytes or 0.0) / 1e9
        return min(float(entry["base_s"]) + float(entry["s_per_gb"]) * gb, float(entry.get("max_s", 60.0)))

    def spf(self, features: Mapping[str, Any], probe: Mapping[str, Any] | None = None) -> tuple[float, float]:
        """Prior of the seconds per frame of one container: (log_mu, sd).

        A speed probe of this job (`probe`), else one kept from an earlier
        job on this device, wins: it measured this very machine. Otherwise
        log(spf / input pixels) = mu + gpu + model + model@scale + cell,
        each term fitted with shrinkage; a GPU the model has not seen gets
        the generic GPU term and a wide sd.
        """
        probed = self._probed_spf(features, probe)
        if probed is not None:
            return probed
        sec = self.section("upscale")
        gpu = match_gpu(str(features.get("gpu", "")), sec.get("gpu") or {}, (sec.get("fallback") or {}).get("gpu") or {})
        model = str(features.get("model", ""))
        ms = f"{model}@x{features.get('scale', '')}"
        cell = f"{gpu}|{ms}"
        mu = float(sec["mu"])
        known = True
        gpus = sec.get("gpu") or {}
        fallback = sec.get("fallback")
        if gpu not in gpus and isinstance(fallback, dict) and gpu in (fallback.get("gpu") or {}):
            return TimingModel({"upscale": fallback}).spf(features)
        if gpu in gpus:
            mu += float(gpus[gpu]) + _cpu_threads_term(sec, gpu, features) + cpu_load_term(features)
            mu += float((sec.get("precision") or {}).get(f"{gpu}|{features.get('precision')}", 0.0))
        else:
            known = False
            mu += float(sec.get("generic_gpu", 0.0))
        mu += float((sec.get("model") or {}).get(model, 0.0))
        mu += float((sec.get("model_scale") or {}).get(ms, 0.0))
        mu += float((sec.get("cell") or {}).get(cell, 0.0))
        mu += math.log(max(in_pixels(features), 1.0))
        sd = float(sec["sd"] if known else sec.get("sd_unknown", 0.9))
        return mu, sd

    def _probed_spf(self, features: Mapping[str, Any], probe: Mapping[str, Any] | None) -> tuple[float, float] | None:
        """(log spf, sd) from a probe's seconds per pixel, times the pipeline's share beyond the model."""
        sec = self.section("upscale")
        s_per_px = _probe_speed(probe, features) if probe else None
        load = 0.0  # this job's probe ran under today's load already; a kept one did not
        if s_per_px is None:
            s_per_px, load = self.kept_probe(features), cpu_load_term(features)
        if s_per_px is None:
            return None
        return math.log(s_per_px * in_pixels(features)) + float(sec["probe_log_ratio"]) + load, float(sec["probe_sd"])

    def kept_probe(self, features: Mapping[str, Any]) -> float | None:
        """Seconds per pixel an earlier job's probe measured for this device, model, scale (and precision)."""
        probes = self.data.get("probes") or {}
        key = probe_key(features.get("gpu"), features.get("model"), features.get("scale"), features.get("precision"))
        if key in probes:
            return _positive(probes[key])
        if features.get("precision") is None:  # any precision of this device and model
            prefix = key.rsplit("|", 1)[0] + "|"
            found = sorted(_positive(v) or 0.0 for k, v in probes.items() if k.startswith(prefix))
            return found[len(found) // 2] or None if found else None
        return None

    def constant(self, section: str, name: str) -> float:
        return float(self.section(section)[name])


# What the probe's time (through `spf`) depends on: a job's features that are fixed for it.
_PROBE_FEATURES = ("gpu", "model", "scale", "precision", "in_width", "in_height", "threads")
PROBE_RUNS, PROBE_BUDGET_S = 3, 1.0  # the speed probe (backends/probe.py): timed runs, at most this many or seconds


def probe_seconds(spf: float) -> float:
    """How long the speed probe takes at `spf` seconds a frame: an untimed warm-up, then timed runs."""
    runs = min(PROBE_RUNS, max(1, math.ceil(PROBE_BUDGET_S / max(spf, 1e-9))))
    return spf * (1 + runs)


def _cpu_threads_term(sec: Mapping[str, Any], gpu: str, features: Mapping[str, Any]) -> float:
    """log(threads the CPU term was measured with / this job's threads): convolutions scale with cores.

    The built-in CPU term was measured on real renders with `cpu_threads`
    cores; a 16-core machine would otherwise be predicted 8x too slow. A
    model fitted from the user's own jobs has no `cpu_threads`: its term is
    already this machine's.
    """
    ref, threads = _positive(sec.get("cpu_threads")), _positive(features.get("threads"))
    return math.log(ref / threads) if gpu == "cpu" and ref and threads else 0.0


INT8_FIRST_S = 7.5  # seconds, on 2 cores: GPTQ rounds the weights (4.2 s) and numba compiles the kernels (3.3 s)


def _int8_first_s(features: Mapping[str, Any]) -> float:
    """The first int8 load's one-off work on this machine (`int8_first` in the plan): CPU work, so it goes
    with the cores the job gets and what other processes leave of them, as the model's speed does."""
    if not features.get("int8_first"):
        return 0.0
    threads = _positive(features.get("threads"))
    return INT8_FIRST_S * (2.0 / threads if threads else 1.0) * math.exp(cpu_load_term(features))


def _probe_speed(probe: Mapping[str, Any], features: Mapping[str, Any]) -> float | None:
    """This job's probe: its fastest run, or its median one where the plan saw the CPU busy
    (runs then take turns with other processes, and the fastest is the one that was not kept waiting)."""
    fastest = _positive(probe.get("s_per_px"))
    if cpu_load_term(features) > 0:
        return _positive(probe.get("s_per_px_median")) or fastest
    return fastest


def cpu_load_term(features: Mapping[str, Any]) -> float:
    """log(this job's cores / the cores other processes leave it), on a CPU the plan saw busy (`cpu_busy`).

    Torch's threads wait for each other at every layer, so the job runs at
    the pace of the thread that shares a core: with one of two cores taken,
    half the speed (measured: 2.6x slower), not the two thirds a fair share
    of the CPU would give.
    """
    threads, busy = _positive(features.get("threads")), _positive(features.get("cpu_busy"))
    if features.get("gpu") != "cpu" or not threads or not busy:
        return 0.0
    return math.log(threads / max(threads - busy, MIN_FREE_SHARE * threads))


MIN_FREE_SHARE = 0.25  # a machine busy on every core still gives the job about its fair share


def probe_key(device: Any, model: Any, scale: Any, precision: Any) -> str:
    """Where a probe is kept in a model: device, model and scale, precision ('*' when unknown)."""
    return f"{device}|{model}@x{scale}|{precision or '*'}"


def _positive(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `lock_path` (POSIX flock; elsewhere the rename alone)."""
    with open(lock_path, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def _canonical_gpu(name: str) -> str:
    tokens = [t for t in re.split(r"[\s_\-:/]+", name.lower()) if t]
    kept = [t for t in tokens if not re.fullmatch(r"\d+gb|sxm\d*|pcie|nvl", t)] or tokens
    return re.sub(r"[^a-z0-9]", "", "".join(kept))


def match_gpu(name: str, *tables: Mapping[str, Any]) -> str:
    """The key a GPU is known by: 'h100-80gb' and 'H100 SXM' are 'H100', 'A10G' is 'A10'."""
    for table in tables:
        if name in table:
            return name
    want = _canonical_gpu(name)
    for candidate in (want, want[:-1] if want.endswith("g") else None):
        for table in tables:
            for key in table:
                if candidate and _canonical_gpu(key) == candidate:
                    return key
    return name


def dumps(data: Mapping[str, Any]) -> str:
    """JSON with one key a line and number lists kept on one line (small, diffable)."""
    text = json.dumps(data, indent=1, sort_keys=True)
    return re.sub(r"\[\s+([-0-9.eE,\s]+?)\s+\]", lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def in_pixels(features: Mapping[str, Any]) -> float:
    try:
        return float(features["in_width"]) * float(features["in_height"])
    except (KeyError, TypeError, ValueError):
        return 1280.0 * 720.0


def input_bytes_per_px(features: Mapping[str, Any]) -> float | None:
    """log of the input's bytes per pixel per frame (how busy the clip is), when the plan says."""
    try:
        value = float(features["input_bytes"]) / (float(features["in_width"]) * float(features["in_height"])
                                                   * float(features["frames"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return math.log(value) if math.isfinite(value) and value > 0 else None


def out_pixels(features: Mapping[str, Any]) -> float:
    try:
        return float(features["out_width"]) * float(features["out_height"])
    except (KeyError, TypeError, ValueError):
        scale = features.get("scale", 4)
        scale = float(scale) if isinstance(scale, (int, float)) else 4.0
        return in_pixels(features) * scale * scale


def user_model_path() -> Path:
    """Where `eta fit` keeps the model refitted from the user's own jobs: the data dir (`CLIPEXPORT_HOME` moves it)."""
    from clipexport.config import data_dir

    return data_dir() / MODEL_FILENAME


def load_model(path: str | Path | None = None) -> TimingModel:
    """`path` if given; else the user's refitted model if present; else the built-in one."""
    if path is not None:
        return TimingModel.load(path)
    user = user_model_path()
    if user.is_file():
        try:
            return TimingModel.load(user)
        except (OSError, ValueError):
            pass  # a damaged user model must not stop a job: fall back
    return TimingModel.default()
