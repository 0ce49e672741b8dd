"""A durable progress channel through the store itself.

A worker that runs elsewhere (a Modal container) cannot call the client; it
writes its cumulative progress to the store instead, one small JSON object
per part under the job's prefix, rewritten about once a second::

    jobs/<job>/progress/<part>.json   {"part", "writer", "wseq", "snapshot": {...}}

The client follows by listing the prefix and reading the objects whose etag
changed since its last look. Snapshots are cumulative (a partial contract
event: `phase`, `part`, `done`, `total`, `attempt`, ...), so a missed or
repeated write is harmless, and a client that starts late, or resumes,
finds the latest state of every part at once. Any backend can be followed
this way, and the local one may use it too.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from clipexport.errors import StorageError
from clipexport.storage.base import Storage, check_key

logger = logging.getLogger("clipexport.storage")

PUBLISH_INTERVAL_S = 1.0
SUFFIX = ".json"
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ProgressChannel:
    """Both ends of one job's channel: `publish` (worker) and `poll` (client).

    `publish` throttles itself to one write per part per `interval` seconds;
    `force=True` (phase ends, the last snapshot) always writes, and `flush()`
    writes whatever a throttled call held back. The clock is injected.
    """

    def __init__(
        self,
        storage: Storage,
        prefix: str,
        *,
        interval: float = PUBLISH_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        check_key(prefix, prefix=True)
        self.storage = storage
        self.prefix = prefix
        self.interval = interval
        self._clock = clock
        self._writer = uuid.uuid4().hex[:12]
        self._wseq = 0
        self._last_write: dict[str, float] = {}
        self._held: dict[str, dict[str, Any]] = {}
        self._seen: dict[str, str | None] = {}

    def key(self, part: str) -> str:
        if not _PART.match(part):
            raise ValueError(f"progress part name must be [A-Za-z0-9._-], not {part!r}")
        return f"{self.prefix}{part}{SUFFIX}"

    # -- worker side --------------------------------------------------------

    def publish(self, part: str, snapshot: dict[str, Any], *, force: bool = False) -> bool:
        """Write `part`'s cumulative snapshot, at most once per interval.

        Returns whether it was written. A throttled snapshot is held and
        written by the next call or `flush()`. A failed throttled write is
        logged and held (progress is best effort); a failed forced write
        raises StorageError.
        """
        key = self.key(part)
        now = self._clock()
        if not force and now - self._last_write.get(part, float("-inf")) < self.interval:
            self._held[part] = snapshot
            return False
        self._wseq += 1
        doc = {"part": part, "writer": self._writer, "wseq": self._wseq, "snapshot": snapshot}
        try:
            self.storage.put_bytes(key, json.dumps(doc, separators=(",", ":")).encode())
        except StorageError:
            if force:
                raise
            logger.warning("progress of %s not published; will try again", part, exc_info=True)
            self._held[part] = snapshot
            return False
        self._last_write[part] = now
        self._held.pop(part, None)
        return True

    def flush(self) -> None:
        """Write every snapshot a throttled `publish` held back."""
        for part, snapshot in list(self._held.items()):
            self.publish(part, snapshot, force=True)

    # -- client side --------------------------------------------------------

    def poll(self) -> list[dict[str, Any]]:
        """The latest snapshot of every part that changed since the last poll."""
        changed = []
        for info in self.storage.list(self.prefix):
            if not info.key.endswith(SUFFIX) or self._seen.get(info.key) == info.etag and info.etag:
                continue
            raw = self.storage.get_bytes(info.key)
            if raw is None:
                continue  # deleted since the listing
            try:
                doc = json.loads(raw)
                snapshot = doc["snapshot"]
            except (ValueError, KeyError, TypeError):
                logger.warning("ignoring unreadable progress object %s", info.key)
                continue
            self._seen[info.key] = info.etag
            if isinstance(snapshot, dict):
                changed.append(snapshot)
        return changed

    def clear(self) -> int:
        """Delete the channel's objects (the job is over)."""
        return self.storage.delete_prefix(self.prefix) if self.prefix else 0
