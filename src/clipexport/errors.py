"""clipexport's own exception tree.

Errors of the libraries underneath (PyAV, torch, boto3, Modal, sqlite) are
translated into these at the module boundary where they happen, so that the
CLI can turn any of them into one line on stderr and an exit code without
knowing which library failed::

    ClipexportError                 exit 1, a job failed
    ├── UsageError                  exit 2, nothing was started
    │   ├── InputError              a clip is missing, unreadable, empty, ...
    │   ├── ModelError              unknown model, bad weights, bad scale
    │   ├── OutputError             output exists, directory missing/unwritable
    │   └── JobLookupError          unknown job, job already finished
    ├── StorageError                the store failed (resumable)
    │   ├── StorageAuthError        credentials rejected (not resumable)
    │   ├── StorageNotFoundError    bucket or key missing
    │   ├── StorageUnreachableError endpoint did not answer
    │   └── PreconditionFailedError object changed under a resumed download
    ├── BackendError                the compute backend failed
    │   └── RemoteFailure           an exception inside a container, as type and message
    ├── BusyError                   exit 3, another process runs this job or writes this output
    ├── Cancelled                   exit 4, the job was cancelled from another shell
    ├── StateError                  exit 5, the state directory or job store is damaged
    ├── WriteFailed                 exit 75, disk full or directory gone after work started
    ├── DamagedInput                frames could not be decoded and --strict was given
    └── Interrupted                 exit 75, stopped and resumable

Messages never contain credentials: they name the file, endpoint or job.
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUSY = 3
EXIT_CANCELLED = 4
EXIT_STATE = 5
EXIT_RESUMABLE = 75
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class ClipexportError(Exception):
    """Base of every error the CLI reports as one line."""

    exit_code: int = EXIT_FAILED
    resumable: bool = False


class UsageError(ClipexportError):
    """The request cannot be carried out as given; nothing was started."""

    exit_code = EXIT_USAGE


class InputError(UsageError):
    """An input clip is missing, not a video, empty or corrupt."""


class ModelError(UsageError):
    """Unknown model, weights that fail their hash or architecture, bad scale."""


class OutputError(UsageError):
    """The output cannot be written where asked."""


class JobLookupError(UsageError):
    """The job named does not exist or cannot be acted on."""


class StorageError(ClipexportError):
    """The object store failed; the job can usually be resumed."""

    resumable = True


class StorageAuthError(StorageError):
    """The store rejected the credentials."""

    resumable = False


class StorageNotFoundError(StorageError):
    """A bucket or object does not exist."""

    resumable = False


class StorageUnreachableError(StorageError):
    """The endpoint did not answer in time."""


class PreconditionFailedError(StorageError):
    """An object changed between a transfer and its resume."""


class BackendError(ClipexportError):
    """The compute backend failed to run a segment."""

    def __init__(self, message: str, *, resumable: bool = True) -> None:
        super().__init__(message)
        self.resumable = resumable


class RemoteFailure(BackendError):
    """A non-clipexport exception raised inside a remote container, carried by name and message.

    Modal re-raises a container's exception object as-is in the client, where
    a bare builtin `TimeoutError` means "still running" and an `OSError` looks
    like a local network failure; wrapping keeps the two apart (docs/modal.md).
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind, resumable=True)
        self.kind, self.detail = kind, detail

    def __reduce__(self) -> tuple[type[RemoteFailure], tuple[str, str]]:
        return (RemoteFailure, (self.kind, self.detail))


class BusyError(ClipexportError):
    """Another live process holds the job or the output; nothing was started."""

    exit_code = EXIT_BUSY


class Cancelled(ClipexportError):
    """`clipexport cancel` stopped this job from another shell; it cannot be resumed."""

    exit_code = EXIT_CANCELLED


class StateError(ClipexportError):
    """The state directory, the job store or an event log cannot be used as it is.

    The message names the file and what to do. Raised mid-render it is
    resumable: the work done so far is in the segment files.
    """

    exit_code = EXIT_STATE

    def __init__(self, message: str, *, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable


class WriteFailed(ClipexportError):
    """Writing failed after work started (disk full, the directory gone); `resume` can finish.

    The message names the user's path (the output, or the segment store), never a
    temporary file.
    """

    exit_code = EXIT_RESUMABLE
    resumable = True


class DamagedInput(ClipexportError):
    """`--strict`: some input frames could not be decoded; no output is written."""


class Interrupted(ClipexportError):
    """The job was stopped by a signal; its state is kept for `resume`."""

    exit_code = EXIT_RESUMABLE
    resumable = True

    def __init__(self, message: str, *, exit_code: int = EXIT_RESUMABLE) -> None:
        super().__init__(message)
        self.exit_code = exit_code
