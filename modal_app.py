"""clipexport on Modal GPUs: `modal deploy modal_app.py` deploys the app `clipexport`.

What it holds:

- an image: slim Debian, Python 3.11, CUDA torch, PyAV (FFmpeg inside),
  boto3, Pillow (overlays are drawn in the container), the `clipexport` package from this checkout, and the official
  Real-ESRGAN weights downloaded at build time by the package's own download
  code (pinned sha256, verified; the image build fails on a mismatch);
- the class `Upscaler`, parameterized by model and scale: `@modal.enter`
  loads the model once per container; `run` (a plain method, so it can be
  spawned and re-attached) drives the same worker generator the local
  backend runs (`clipexport.remote`); `warm_up` only starts a container.

Set at deploy time (environment of `modal deploy`):

    CLIPEXPORT_MODAL_GPUS   GPU types, first choice first: "L4,A10G,T4" (default);
                            Modal takes the first it can get
    CLIPEXPORT_TIMEOUT_S    time limit of one call (one segment), default 1800
    CLIPEXPORT_STARTUP_S    time limit of a container's start (image, `@modal.enter`
                            model load), apart from the call's, default 300
    CLIPEXPORT_SCALEDOWN_S  seconds an idle container stays warm (and billed), default 120
    CLIPEXPORT_MODAL_CPU    CPU cores per container, default 4 (decoding and x264
                            encoding of the upscaled frames run on the CPU)
    CLIPEXPORT_MODAL_MEMORY memory per container in MiB, default 8192
    CLIPEXPORT_MODAL_SECRET the Modal Secret with the bucket credentials,
                            default "clipexport-r2" (AWS_ACCESS_KEY_ID,
                            AWS_SECRET_ACCESS_KEY, R2_ACCOUNT_ID)

The client may pin one GPU type per job with `--gpu` (Modal's `with_options`;
`CLIPEXPORT_GPU` is that client setting, which is why the deploy-time list has
its own name). Importing this file needs no token and no network.

One retry layer: the client's. Modal retries nothing here (no `retries=`):
its `Retries` would re-run a timed-out call with a fresh time limit, and the
client, which sees every failure, spawns a crashed segment once more (never a
timed-out one). A preempted container is rescheduled by Modal on the same
input whatever the policy; the body redoes only a segment not stored yet.
No exception but clipexport's leaves a container (`clipexport.remote.contained`).
"""

import os
import time

import modal

APP_NAME = "clipexport"
DEFAULT_GPUS = "L4,A10G,T4"
CACHE_DIR = "/opt/clipexport/cache"


def _gpus() -> list[str]:
    gpus = [g.strip() for g in os.environ.get("CLIPEXPORT_MODAL_GPUS", DEFAULT_GPUS).split(",") if g.strip()]
    return gpus or DEFAULT_GPUS.split(",")


def _seconds(name: str, default: int) -> int:
    """A positive whole number from the environment (seconds, cores, MiB)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return max(1, int(value))
    except ValueError:
        raise SystemExit(f"{name}={value!r}: expected a positive whole number") from None


def fetch_weights() -> None:
    """Image build step: every pinned model's official weights into the cache, sha256-checked."""
    from clipexport.upscale.registry import MODELS
    from clipexport.upscale.weights import cached_official, download

    for spec in MODELS.values():
        if spec.sha256 and cached_official(spec) is None:
            path = download(spec)
            print(f"{spec.name}: {path} ({path.stat().st_size} bytes, sha256 {spec.sha256[:12]}...)")


def _gpu_name() -> str | None:
    """The GPU this container got (with a fallback list, the client cannot know it)."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install("torch==2.13.0", "av>=12", "numpy>=1.26", "platformdirs>=4", "boto3>=1.36", "safetensors>=0.4",
                 "pillow>=10.1")
    .env(
        {
            "CLIPEXPORT_CACHE_DIR": CACHE_DIR,
            # the weights are in the image; never fall back to anything unverified
            "CLIPEXPORT_WEIGHTS_SOURCE": "download",
            "CLIPEXPORT_WORK_DIR": "/tmp/clipexport",
        }
    )
    .add_local_python_source("clipexport", copy=True)
    .run_function(fetch_weights)
)

app = modal.App(APP_NAME)


@app.cls(
    image=image,
    gpu=_gpus(),
    timeout=_seconds("CLIPEXPORT_TIMEOUT_S", 1800),
    startup_timeout=_seconds("CLIPEXPORT_STARTUP_S", 300),
    scaledown_window=_seconds("CLIPEXPORT_SCALEDOWN_S", 120),
    cpu=float(_seconds("CLIPEXPORT_MODAL_CPU", 4)),
    memory=_seconds("CLIPEXPORT_MODAL_MEMORY", 8192),
    secrets=[modal.Secret.from_name(os.environ.get("CLIPEXPORT_MODAL_SECRET", "clipexport-r2"))],
)
class Upscaler:
    model: str = modal.parameter(default="realesr-animevideov3")
    scale: int = modal.parameter(default=4)

    @modal.enter()
    def load(self) -> None:
        from clipexport.remote import Container, contained
        from clipexport.upscale import load_upscaler

        started = time.monotonic()
        with contained():
            device = os.environ.get("CLIPEXPORT_DEVICE", "auto")
            self.upscaler = load_upscaler(self.model, scale=self.scale, device=device)
            self.container = Container.loaded(time.monotonic() - started, gpu=_gpu_name())
        print(f"loaded {self.upscaler!r} on {self.container.gpu} in {self.container.load_s} s", flush=True)

    @modal.method()
    def run(self, task_dicts: list, storage_url: str, endpoint_url: str = None) -> dict:  # noqa: RUF013
        """Upscale the segments `task_dicts` (see `clipexport.remote`); spawned, never streamed."""
        from clipexport.remote import run_remote

        result = run_remote(task_dicts, storage_url, endpoint_url, self.upscaler, self.container,
                            call_id=modal.current_function_call_id())
        for seg in result["segments"]:
            how = "already stored" if seg["skipped"] else f"{seg['frames']} frames in {seg['elapsed']} s"
            print(f"{seg['part']} attempt {seg['attempt']}: {seg['key']} {how}", flush=True)
        if result.get("error"):
            print(f"error: {result['error']} (resumable: {result.get('resumable')})", flush=True)
        return result

    @modal.method()
    def warm_up(self) -> dict:
        """Nothing but a started container with its model loaded (sent while inputs upload)."""
        cold, load_s = self.container.take_cold()
        return {"container": self.container.id, "cold": cold, "load_s": load_s, "gpu": self.container.gpu,
                "call": modal.current_function_call_id()}
