"""Compute backends: where segments are upscaled (this machine, or Modal)."""

from __future__ import annotations

from pathlib import Path

from clipexport.backends.base import Backend, EmitFn
from clipexport.errors import UsageError
from clipexport.jobs import JobSpec, JobStore
from clipexport.storage import Storage

__all__ = ["Backend", "EmitFn", "create_backend"]


def create_backend(
    spec: JobSpec, segment_root: Path, storage: Storage | None, store: JobStore, job_id: str
) -> Backend:
    """The backend a spec names; torch and modal are imported only here, lazily."""
    if spec.backend == "local":
        from clipexport.backends.local import LocalBackend
        from clipexport.upscale import load_upscaler

        weights = None if spec.weights is None else Path(spec.weights)

        def loader(on_bytes):  # type: ignore[no-untyped-def]
            return load_upscaler(spec.model, scale=spec.scale, weights=weights, device=spec.device, progress=on_bytes,
                                 precision=spec.precision)

        return LocalBackend(loader, segment_root, storage)
    if spec.backend == "modal":
        from clipexport.backends.modal import ModalBackend, preflight

        from clipexport.config import load_settings

        client = preflight(spec.storage, weights=spec.weights, gpu=spec.gpu)
        return ModalBackend(client, storage, store=store, job_id=job_id, model=spec.model,  # type: ignore[arg-type]
                            scale=spec.scale, parallel=spec.parallel, gpu=spec.gpu, endpoint_url=spec.endpoint_url,
                            prices=load_settings().prices)
    raise UsageError(f"unknown backend {spec.backend!r}: use local or modal")
