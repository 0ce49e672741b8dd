"""Clean stops: the first SIGINT, SIGTERM or SIGHUP stops a job; the ones after it are ignored.

Two things went wrong before this module. Python runs signal handlers only
in the main thread, between bytecodes, so while that thread was inside a
long torch call a Ctrl-C was silent for seconds. And a second signal (a
second Ctrl-C, or SIGHUP as the terminal closes) raised again inside the
first stop's cleanup, so the process exited with torch's threads still at
work and the C++ runtime aborted it (exit 134).

So the C-level handler's wakeup fd is watched by a thread that announces
the stop at once ("Stopping…", rows drawn as interrupted), and the Python
handler acts on the first signal only: SIGINT raises KeyboardInterrupt,
SIGTERM and SIGHUP raise `Interrupted` with their exit codes, and every
later signal is a no-op until the command ends.

A stop's exception can still land at any bytecode of the main thread. The
steps that must not be cut in half hold it with `deferred()` until they are
done: every `threading.Thread.start()` while a command runs, whoever starts
the thread (this tool, Rich, a thread pool), since cut there start() raises
with the thread running anyway, or fails in its own cleanup (`KeyError:
<Thread ...>` from its limbo table); and starting a pair of threads whose
cleanup assumes both run.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from clipexport.errors import EXIT_RESUMABLE, EXIT_SIGTERM, Interrupted

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


_signalled = threading.Event()  # a stop signal was acted on since `reset()`


_ignore_after = False  # the CLI process: after a command's body, stop signals are ignored


def ignore_signals_after_commands() -> None:
    """For the CLI's own process: once a command's body has ended, its outcome stands.

    Restoring the default handlers there let a Ctrl-C or hang-up that came
    just as a job finished kill the process on its way out (exit -2 or -1
    after "done"). In-process callers (tests) keep getting their handlers back.
    """
    global _ignore_after
    _ignore_after = True


def reset() -> None:
    """Forget an earlier stop: a new command starts (the CLI's entry point calls this)."""
    _signalled.clear()


_deferring = 0  # depth of `deferred()` blocks in the main thread
_held: list[BaseException] = []  # a stop's exception that came inside one


@contextmanager
def deferred() -> Iterator[None]:
    """Hold a stop's exception until the block ends, then raise it there.

    For steps that a stop must not cut in half: an exception raised inside
    `Thread.start()` leaves a thread running that no `finally` will join, and
    closing the generator it reads then fails ("generator already executing").
    Only the main thread runs signal handlers, so elsewhere this does nothing.
    """
    global _deferring
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if _deferring == 0 and _held:
            raise _held.pop()


def signalled() -> bool:
    """Whether a stop signal was acted on since `reset()`: the process must then leave by `os._exit`."""
    return _signalled.is_set()


class Stop:
    """One command's stop: announced once, acted on once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._announced = False
        self.acting = False
        self.ignored = 0  # signals that came while stopping
        #: Shows the stop ("Stopping…" and interrupted rows); until a display exists, a plain line.
        self.announcer: Callable[[], None] = lambda: print("clipexport: Stopping…", file=sys.stderr, flush=True)

    def announce(self) -> None:
        with self._lock:
            if self._announced:
                return
            self._announced = True
        try:
            self.announcer()
        except OSError:  # the terminal is gone (SIGHUP): nothing to tell
            pass

    def handle(self, signum: int, _frame: Any) -> None:
        """The Python-level handler, in the main thread."""
        if self.acting:
            self.ignored += 1  # the first stop is under way: let its cleanup finish
            return
        self.acting = True
        _signalled.set()
        self.announce()
        exc = _stop_exception(signum)
        if _deferring:
            _held.append(exc)
            return
        raise exc


def stop_within(exc: BaseException) -> BaseException | None:
    """The stop's own exception where Python raised another from it, else None.

    A stop that cuts a class body being created (a module imported late)
    comes out as "RuntimeError: Error calling __set_name__ ...", raised from
    it: that is still the stop, not a failure.
    """
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, (KeyboardInterrupt, Interrupted)):
            return cause
        cause = cause.__cause__
    return None


def _stop_exception(signum: int) -> BaseException:
    """What a stop signal raises: KeyboardInterrupt for SIGINT, `Interrupted` with its exit code else."""
    if signum == signal.SIGINT:
        return KeyboardInterrupt()
    code = EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_RESUMABLE
    return Interrupted("stopped by signal", exit_code=code)


@contextmanager
def stop_on_signals() -> Iterator[Stop]:
    """Handle the stop signals for the body of a command; put back what was there after."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    with _starts_whole():
        previous = {sig: signal.signal(sig, stop.handle) for sig in STOP_SIGNALS}
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        watcher = threading.Thread(target=watch_wakeup_fd, args=(read_fd, stop), name="clipexport-stop",
                                   daemon=True)
        watcher.start()
        try:
            yield stop
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_IGN if _ignore_after else handler)
            os.close(write_fd)  # the watcher reads end-of-file and returns
            watcher.join(timeout=1.0)
            os.close(read_fd)


@contextmanager
def _starts_whole() -> Iterator[None]:
    """`threading.Thread.start()` runs under `deferred()`: a stop is raised once it has returned."""
    original = threading.Thread.start

    def start(self: threading.Thread) -> None:
        with deferred():
            original(self)

    threading.Thread.start = start  # type: ignore[method-assign]
    try:
        yield
    finally:
        threading.Thread.start = original  # type: ignore[method-assign]


def watch_wakeup_fd(read_fd: int, stop: Stop) -> None:
    """Announce a stop the moment the C-level handler records a stop signal."""
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        if any(byte in STOP_SIGNALS for byte in data):
            stop.announce()
