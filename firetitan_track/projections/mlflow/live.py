"""Live export: the exporter following a run while it trains, and ``export mlflow --follow``.

A process, not a thread: MLflow's client work then never competes with the
training loop for the GIL, and the loop's process never imports MLflow. The
process runs :class:`MlflowExporter` itself (no command line in between), with
its own ledger connection.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Iterable

from firetitan_track.ledger import Ledger
from firetitan_track.projections.mlflow.exporter import ExportReport, MlflowExporter
from firetitan_track.projections.mlflow.store import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI, resolve_tracking_uri

# spawn, not fork: the training process holds threads (torch, HTTP pools) and open
# database connections that a forked child must not inherit
_SPAWN = multiprocessing.get_context("spawn")


class LiveExporter:
    """Exports runs to MLflow while they run, from a separate process.

    ``stop()`` asks the follower to flush what is left and waits for it. The cue is
    the end of a pipe: it cannot arrive before the follower is ready to hear it (a
    signal can), and it also comes when the training process dies, even by SIGKILL,
    so a follower never outlives its run.
    """

    def __init__(self, ledger: Ledger | str, tracking_uri: str = DEFAULT_TRACKING_URI, run_id: str | None = None,
                 *, run_ids: Iterable[str] = (), experiment: str = DEFAULT_EXPERIMENT,
                 poll_s: float = 1.0) -> None:
        """``ledger``: its URL, or an open Ledger (the follower opens its own connection)."""
        if not isinstance(ledger, str):
            ledger = ledger.engine.url.render_as_string(hide_password=False)
        self.ledger_url = ledger  # handed to the child through a pipe: a password never shows in `ps`
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.run_ids = ([run_id] if run_id else []) + list(run_ids)
        self.experiment = experiment
        self.poll_s = poll_s
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._stop: Connection | None = None
        self._log_path: str | None = None

    def start(self) -> LiveExporter:
        fd, self._log_path = tempfile.mkstemp(prefix="firetitan-live-export-", suffix=".log")
        os.close(fd)
        until, self._stop = _SPAWN.Pipe(duplex=False)
        self._proc = _SPAWN.Process(
            target=_follow, name="firetitan-mlflow-export", daemon=True,
            args=(self.ledger_url, self.tracking_uri, self.experiment, self.run_ids, self.poll_s, until,
                  self._log_path))
        self._proc.start()
        until.close()  # the child holds the reading end; ours would keep nothing open
        return self

    def stop(self, timeout: float = 300.0) -> bool:
        """Flush everything recorded so far to MLflow and end the follower; False if it failed.

        A failed export never fails the run: the ledger holds every event, and
        ``firetitan-track export mlflow RUN_ID`` finishes the job later.
        """
        if self._proc is None:
            return True
        proc, self._proc = self._proc, None
        assert self._stop is not None and self._log_path is not None
        self._stop.close()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
        with open(self._log_path, errors="replace") as log:
            output = log.read()
        os.unlink(self._log_path)
        if proc.exitcode == 0:
            return True
        print(f"MLflow live export failed (exit {proc.exitcode}); the ledger has everything: run "
              f"`firetitan-track export mlflow {' '.join(self.run_ids)}` to finish it.\n{output[-2000:]}",
              file=sys.stderr)
        return False

    def __enter__(self) -> LiveExporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _follow(ledger_url: str, tracking_uri: str, experiment: str, run_ids: list[str], poll_s: float,
            until: Connection, log_path: str) -> None:
    """The follower process: export until the pipe ends, then flush and exit (1 on error)."""
    # Ctrl-C reaches the whole process group; the run decides when export ends, after it
    # has recorded its own cleanup, so that too reaches MLflow
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def wait_for_end() -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                until.recv()
        stop.set()

    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            threading.Thread(target=wait_for_end, daemon=True).start()
            with Ledger.open(ledger_url, create=False) as ledger:
                MlflowExporter(ledger, tracking_uri, experiment=experiment, run_ids=run_ids).follow(stop, poll_s)
        except BaseException:
            traceback.print_exc()
            log.flush()
            os._exit(1)


def follow_until_stopped(exporter: MlflowExporter, poll_s: float = 1.0) -> ExportReport:
    """Run ``exporter.follow`` until SIGTERM or SIGINT, then flush and return (``export --follow``)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return exporter.follow(stop, poll_s)
