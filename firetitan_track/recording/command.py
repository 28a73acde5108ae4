"""``firetitan-track record [--run-id ID] [--ledger URL] [--export-mlflow [URI]] -- COMMAND [ARGS...]``.

Runs COMMAND as it is, recorded: this process is its parent. It starts the program with the
recorder's ``sitecustomize`` first on its ``PYTHONPATH`` (``boot.py``) and the run named in
its environment, then, while the program starts up, opens the ledger and writes RunStarted
(what the program is) and ProgramStarted, and leaves the run's begin note: the program's
first recorded call waits for it, so the record starts before anything the program does
with the SDK, and the program's start-up does not wait on the ledger. When the run cannot
begin (the ledger is unreachable, the run id belongs to a runner run), the program is stopped
before its first recorded call and ``record`` says why. When the program ends, ``record``
writes ProgramExited and RunCompleted or RunFailed.
The program's stdin, stdout and stderr are its own (inherited, not piped), and
``record`` exits with the program's exit status, or dies of the signal that killed it.

Ctrl-C reaches the program from the terminal as it would without ``record`` (this
process waits it out); a SIGTERM or SIGHUP sent to ``record`` is passed on to it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import click

from firetitan_track.cli import absolute_uri, ledger_url, user_errors
from firetitan_track.errors import UserError
from firetitan_track.ids import check_run_id
from firetitan_track.recording import boot

if TYPE_CHECKING:
    from types import FrameType

    from firetitan_track.ledger import Ledger
    from firetitan_track.projections.mlflow import LiveExporter

__all__ = ["record", "run_program", "program_environment"]


def program_environment(run_id: str, ledger: str, record_dir: Path,
                        base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a recorded program runs in: its own, plus the recorder's boot folder
    first on PYTHONPATH and the run to record into (this process begins it: the begin note
    in ``record_dir`` says when); a metrics file in the record folder when the program names
    none (the cookbook writes its metrics there when one is named)."""
    env = dict(os.environ if base is None else base)
    boot_dir = record_dir / "boot"
    boot_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(boot.__file__, boot_dir / "sitecustomize.py")
    env["PYTHONPATH"] = os.pathsep.join([str(boot_dir), *filter(None, [env.get("PYTHONPATH")])])
    env[boot.ENV_RUN] = run_id
    env[boot.ENV_LEDGER] = ledger
    env[boot.ENV_DIR] = str(record_dir)
    env[boot.ENV_BEGINNER] = str(os.getpid())
    env.setdefault(boot.METRICS_FILE_ENV, str(record_dir / "metrics.jsonl"))
    return env


def _runnable(command: list[str]) -> None:
    exe = command[0]
    if os.sep in exe:
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            raise UserError(f"cannot run {exe!r}: no such executable file")
    elif shutil.which(exe) is None:
        raise UserError(f"cannot run {exe!r}: no such command on PATH")


def run_program(command: list[str], *, ledger_url: str, run_id: str | None = None,
                export_mlflow: str | None = None) -> int:
    """Run ``command`` recorded into ``run_id`` (a new run id when None); returns its exit
    status as ``subprocess`` reports it (negative: killed by that signal)."""
    if not command:
        raise UserError("record needs a command to run: firetitan-track record -- COMMAND [ARGS...]")
    _runnable(command)
    run_id = run_id or f"rec-{uuid.uuid4().hex[:10]}"
    check_run_id(run_id)
    record_dir = Path(tempfile.mkdtemp(prefix="firetitan-record-"))
    forwarded: list[str] = []
    ledger = exporter = None

    def pass_on(signum: int, _frame: FrameType | None) -> None:
        forwarded.append(f"after firetitan-track record passed on {signal.Signals(signum).name}")
        proc.send_signal(signum)

    try:
        try:  # the program first: its start-up overlaps the ledger's below
            proc = subprocess.Popen(command, env=program_environment(run_id, ledger_url, record_dir))
        except OSError as exc:
            raise UserError(f"cannot run {command[0]!r}: {exc}") from None
        previous = {s: signal.signal(s, pass_on) for s in (signal.SIGTERM, signal.SIGHUP)}
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal told the program
        try:
            try:
                from firetitan_track.ledger import Ledger
                from firetitan_track.recording.run import begin

                ledger = Ledger.open(ledger_url)
                run = begin(ledger, run_id, command=command, cwd=os.getcwd(), started_by="record")
            except BaseException as exc:
                _stop_unbegun(proc, record_dir, exc)
                raise
            boot.mark_begun(str(record_dir), attempt=run.attempt)
            click.echo(f"firetitan-track: recording {command[0]} as run {run_id} (attempt {run.attempt}) "
                       f"in {ledger.url}", err=True)
            exporter = _start_exporter(ledger, run_id, export_mlflow)
            status = proc.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        from firetitan_track.recording.run import end

        end(run, exit_status=status, record_dir=record_dir, pid=proc.pid, forwarded=forwarded[-1] if forwarded else None)
    finally:
        if exporter is not None:
            exporter.stop()
        shutil.rmtree(record_dir, ignore_errors=True)
        if ledger is not None:
            ledger.close()
    return status


def _stop_unbegun(proc: subprocess.Popen, record_dir: Path, why: BaseException) -> None:
    """The run could not begin: stop the program, whose first recorded call is waiting for the
    begin note, so it makes none. The note then says why, so that what a SIGTERM handler of the
    program calls goes through unrecorded instead of waiting for a run that never begins."""
    if proc.poll() is None:
        proc.terminate()
    try:
        boot.mark_begun(str(record_dir), error=f"{type(why).__name__}: {why}")
    except OSError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _start_exporter(ledger: Ledger, run_id: str, tracking_uri: str | None) -> LiveExporter | None:
    if not tracking_uri:
        return None
    from firetitan_track.projections.mlflow import LiveExporter
    from firetitan_track.projections.mlflow.store import resolve_tracking_uri

    exporter = LiveExporter(ledger, resolve_tracking_uri(None if tracking_uri == "default" else tracking_uri),
                            run_id)
    exporter.start()
    return exporter


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--run-id", default=None, help="Record into this run (default: a new run id). Recording into a "
                                             "run id again continues that run: attempt n+1.")
@click.option("--ledger", "ledger", metavar="URL", default=None, callback=absolute_uri,
              help="Ledger URL (default: the root --ledger, $FIRETITAN_LEDGER, or sqlite:///.firetitan/ledger.db).")
@click.option("--export-mlflow", "export_mlflow", is_flag=False, flag_value="default", default=None,
              metavar="[URI]", help="Export to MLflow as the program runs (the project's store when no URI).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def record(ctx: click.Context, run_id: str | None, ledger: str | None, export_mlflow: str | None,
           command: tuple[str, ...]) -> None:
    """Run COMMAND (a program using fireworks.training.sdk, unmodified) and record it.

    Its exit status, stdout and stderr are the program's own. The SDK and firetitan-track
    must both be installed where the program's Python runs.
    """
    with user_errors():
        status = run_program(list(command), ledger_url=ledger or ledger_url(ctx), run_id=run_id,
                             export_mlflow=export_mlflow)
    sys.stdout.flush()
    sys.stderr.flush()
    if status < 0:  # die of the same signal, so the shell sees what it would have seen
        if -status not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler to reset
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    # The record is committed and the ledger closed: leave without the interpreter's teardown
    # (a tenth of a second of module and pool finalizers), which the program's user would
    # otherwise wait for after the program itself has ended.
    os._exit(status)
