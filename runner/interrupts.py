"""Ctrl-C and SIGTERM: a run stops through its cleanup path, however the signal lands.

A signal can surface in four broken ways: wrapped in the SDK's exception groups,
replaced by the SDK's own cleanup error, re-raised by pending asyncio tasks, or
swallowed inside a finalizer. ``StopSignals`` remembers the request so the loop can
check it every step and name it as the cause; ``root_cause`` digs it out of a group;
``close_loop`` drops the echo that cancelled tasks would raise again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import FrameType

__all__ = ["Terminated", "RunInterrupted", "StopSignals", "root_cause", "close_loop", "is_interrupt"]


class Terminated(BaseException):
    """SIGTERM, turned into an exception so cleanup runs as it does for SIGINT."""


class RunInterrupted(BaseException):
    """A run stopped by Ctrl-C or SIGTERM, after its cleanup and RunFailed were recorded."""

    def __init__(self, run_id: str, reason: str, signum: int = signal.SIGINT):
        super().__init__(f"run {run_id} stopped: {reason}")
        self.run_id = run_id
        self.reason = reason
        self.signum = signum


def is_interrupt(exc: BaseException) -> bool:
    return isinstance(exc, (KeyboardInterrupt, Terminated))


def root_cause(exc: BaseException) -> BaseException:
    """The exception that matters inside an exception group (the SDK's async task groups
    wrap a Ctrl-C or SIGTERM that lands while they run): an interrupt if there is one,
    else the first leaf."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = [root_cause(e) for e in exc.exceptions]
    return next((e for e in leaves if is_interrupt(e)), leaves[0])


class StopSignals:
    """Ctrl-C and SIGTERM stop the run through its cleanup path. The handler raises where
    the signal lands; Python drops an exception raised inside a finalizer, so the request
    is also remembered and checked again at every step. Installed only on the main
    thread (sweep workers in threads keep the process's handlers)."""

    def __init__(self) -> None:
        self.requested: BaseException | None = None
        self.finished = False
        self.after_finish: int | None = None  # a signal that came once the run had finished
        self._raised = False  # the request was raised (by the handler or by check)
        self._redelivery: threading.Timer | None = None
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        redelivered, self._redelivery = self._redelivery is not None, None
        if self.finished:  # nothing left to stop: the run completed, its cleanup is done
            self.after_finish = signum
            return
        if redelivered and self._raised:
            return  # the deferred signal was acted on meanwhile (check raised it): not a second one
        self.requested = Terminated("terminated by SIGTERM") if signum == signal.SIGTERM else KeyboardInterrupt()
        if _writing(frame):
            # raised inside the database driver or its pool, the exception could leave a
            # connection mid-transaction, holding the write lock the cleanup's own record then
            # waits for: the signal is delivered again in a moment, past the write
            self._redelivery = threading.Timer(_REDELIVER_S, os.kill, (os.getpid(), signum))
            self._redelivery.daemon = True
            self._redelivery.start()
            return
        self._raised = True
        raise self.requested

    def check(self) -> None:
        if self.requested is not None:
            self._raised = True
            raise self.requested

    def cause(self, exc: BaseException) -> BaseException:
        """What stopped the run: the signal if one came (it can surface as another
        exception, the SDK's cleanup of the call it cut short), else ``exc``'s root."""
        return self.requested if self.requested is not None else root_cause(exc)

    def restore(self) -> None:
        if self._redelivery is not None:
            self._redelivery.cancel()
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def finish(self) -> None:
        """The run has cleaned up and is recording its end: a signal from here on stops nothing
        (a completed run is not turned into a failed one, and its process exits 0)."""
        self.finished = True


_REDELIVER_S = 0.05
_WRITE_CODE = (f"{os.sep}sqlalchemy{os.sep}", f"{os.sep}psycopg{os.sep}", f"firetitan_track{os.sep}ledger.py",
               f"firetitan_track{os.sep}store.py", f"firetitan_track{os.sep}blobs.py")


def _writing(frame: FrameType | None) -> bool:
    """Whether ``frame`` (where a signal landed) is inside the ledger's database code."""
    while frame is not None:
        name = frame.f_code.co_filename
        if any(part in name for part in _WRITE_CODE):
            return True
        frame = frame.f_back
    return False


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Close the run's event loop. A Ctrl-C or SIGTERM that landed inside a task leaves the
    task's siblings pending; running them out would raise the interrupt a second time, past
    the cleanup already recorded, so they are cancelled and that echo is dropped."""
    async def drain(tasks: set[asyncio.Task[object]]) -> None:
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(drain(pending))
        loop.run_until_complete(loop.shutdown_asyncgens())
    except (KeyboardInterrupt, Terminated):
        pass
    finally:
        loop.close()
