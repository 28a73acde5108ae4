"""Recording programs as they are: ``firetitan-track record -- COMMAND`` and ``autolog()``.

Zero-code instrumentation, the way ``opentelemetry-instrument`` and MLflow's autologging
work. A program that uses ``fireworks.training.sdk`` (the cookbook's recipes, which build
their service inside ``training/utils/`` where ``track()`` cannot reach) is recorded with
no change to it:

- ``record`` (command.py) runs the program with the recorder's ``sitecustomize``
  (boot.py) first on its ``PYTHONPATH``; that runs the ``sitecustomize`` it shadows
  (Debian's, the user's) and installs an import hook. ``autolog(run_id=...)`` does the same
  from one line inside a program, and leaves the same environment for the processes the
  program starts;
- when the program imports the SDK, its public classes are wrapped (patches.py): the
  wrappers record through the same ``CallRecorder`` as ``track()`` (firetitan_track/
  tracking.py), and whatever they need of the SDK beyond its public API is in
  ``firetitan_track/sdk_adapter.py``, tested against fireworks-ai 1.2.24 and 1.2.30;
- each process that makes a recorded call writes to the run itself (program.py), and the
  processes' events interleave in commit order (``Recorder(interleave=True)``): each event
  is a fact about that process's own call, in its own order, and none depends on another
  process's last event, so an append that finds the stream moved on re-reads the head and
  goes after it. (One writer for all would need every call shipped to it, and a trainer
  killed with SIGKILL would take its unsent intents along);
- every trained datum is matched to the recorded sample it came from, and each step says
  how stale its data were in weight versions (provenance.py); the program's own metrics
  come from its metrics file and ``wandb.log``, tied to the snapshot the deployment served
  (metrics.py);
- the run begins with RunStarted (the program's command line, working directory, entry
  script digest, SDK releases, backend) and ends with the program's outcome (run.py).

An SDK call the recorder does not know passes through untouched; a failure inside the
recorder is reported once and the program goes on.
"""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypedDict

if TYPE_CHECKING:
    from firetitan_track.recording.run import ProgramRun

__all__ = ["autolog"]


class _Started(TypedDict, total=False):
    """This process's autolog: its run, and the record folder its processes leave notes in."""

    run_id: str
    run: ProgramRun
    record_dir: Path


_started: _Started = {}


def autolog(run_id: str | None = None, *, ledger_url: str | None = None) -> str:
    """Record this program from here on, as ``firetitan-track record`` would; returns the run id.

    Call it once, near the top of the program (before it builds its service). Recording
    into an existing run id continues that run. Under ``record`` the program is already
    recorded, and this returns that run's id. The program's outcome is recorded when it
    exits: finished, or failed with an uncaught exception.
    """
    from firetitan_track.recording import boot, program

    if os.environ.get(boot.ENV_RUN):  # recorded by `record`, or autolog ran already
        if run_id is not None and run_id != os.environ[boot.ENV_RUN]:
            print(f"firetitan-track: this program is recorded as run {os.environ[boot.ENV_RUN]}; "
                  f"autolog(run_id={run_id!r}) leaves it so", file=sys.stderr)
        boot.start(None)
        program.active()
        return os.environ[boot.ENV_RUN]

    from firetitan_track.ids import check_run_id
    from firetitan_track.ledger import Ledger
    from firetitan_track.recording.command import program_environment
    from firetitan_track.recording.run import begin, end, running_python
    from firetitan_track.urls import absolute_url, default_ledger_url

    url = absolute_url(ledger_url) if ledger_url else default_ledger_url()
    rid = run_id or f"rec-{uuid.uuid4().hex[:10]}"
    check_run_id(rid)
    ledger = Ledger.open(url)
    run = begin(ledger, rid, command=running_python(), cwd=os.getcwd(), started_by="autolog",
                interpreter=sys.executable, pid=os.getpid())
    record_dir = Path(tempfile.mkdtemp(prefix="firetitan-autolog-"))
    os.environ.update(program_environment(rid, url, record_dir))  # for the program's children
    boot.mark_begun(str(record_dir), attempt=run.attempt)
    _started.update({"run_id": rid, "run": run, "record_dir": record_dir})
    atexit.register(_exited, end)  # registered before the recording's own flush, so it runs after it
    boot.start(None)  # also keeps the program's uncaught exception in the record folder
    program.configure(run_id=rid, ledger_url=url, attempt=run.attempt, record_dir=str(record_dir))
    return rid


def _exited(end: Callable[..., None]) -> None:
    """The program's end, as far as a process can see its own: finished, or failed with the
    uncaught exception its excepthook kept."""
    import shutil

    try:
        end(_started["run"], exit_status=None, record_dir=_started["record_dir"], pid=os.getpid())
    except Exception as exc:  # the program is done; say why its end is missing
        print(f"firetitan-track: could not record how the program ended: {exc}", file=sys.stderr)
    shutil.rmtree(_started["record_dir"], ignore_errors=True)
