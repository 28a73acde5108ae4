"""``firetitan-track record [--run-id ID] [--ledger URL] [--export-mlflow [URI]] -- COMMAND [ARGS...]``.

Runs COMMAND as it is, recorded: this process is its parent. It writes RunStarted (what
the program is) and ProgramStarted, starts the program with the recorder's
``sitecustomize`` first on its ``PYTHONPATH`` (``boot.py``) and the run named in its
environment, and, when the program ends, ProgramExited and RunCompleted or RunFailed.
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
from typing import Any

import click

from firetitan_track.cli import absolute_uri, ledger_url, user_errors
from firetitan_track.errors import UserError
from firetitan_track.ledger import Ledger, check_run_id
from firetitan_track.recording import boot
from firetitan_track.recording.run import begin, end, python_of

__all__ = ["record", "run_program", "program_environment"]


def program_environment(run_id: str, ledger: str, record_dir: Path, attempt: int,
                        base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a recorded program runs in: its own, plus the recorder's boot folder
    first on PYTHONPATH and the run to record into; a metrics file in the record folder
    when the program names none (the cookbook writes its metrics there when one is named)."""
    env = dict(os.environ if base is None else base)
    boot_dir = record_dir / "boot"
    boot_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(boot.__file__, boot_dir / "sitecustomize.py")
    env["PYTHONPATH"] = os.pathsep.join([str(boot_dir), *filter(None, [env.get("PYTHONPATH")])])
    env[boot.ENV_RUN] = run_id
    env[boot.ENV_LEDGER] = ledger
    env[boot.ENV_DIR] = str(record_dir)
    env[boot.ENV_ATTEMPT] = str(attempt)
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
    ledger = Ledger.open(ledger_url)
    cwd = os.getcwd()
    run = begin(ledger, run_id, command=command, cwd=cwd, started_by="record", interpreter=python_of(command))
    click.echo(f"firetitan-track: recording {command[0]} as run {run_id} (attempt {run.attempt}) "
               f"in {ledger.url}", err=True)
    exporter = _start_exporter(ledger, run_id, export_mlflow)
    record_dir = Path(tempfile.mkdtemp(prefix="firetitan-record-"))
    forwarded: list[str] = []
    try:
        env = program_environment(run_id, ledger_url, record_dir, run.attempt)
        try:
            proc = subprocess.Popen(command, env=env)
        except OSError as exc:
            end(run, exit_status=None, error=f"could not start: {exc}")
            raise UserError(f"cannot run {command[0]!r}: {exc}") from None

        def pass_on(signum: int, _frame: Any) -> None:
            forwarded.append(f"after firetitan-track record passed on {signal.Signals(signum).name}")
            proc.send_signal(signum)

        previous = {s: signal.signal(s, pass_on) for s in (signal.SIGTERM, signal.SIGHUP)}
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal told the program
        try:
            status = proc.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        end(run, exit_status=status, record_dir=record_dir, pid=proc.pid, forwarded=forwarded[-1] if forwarded else None)
    finally:
        if exporter is not None:
            exporter.stop()
        shutil.rmtree(record_dir, ignore_errors=True)
        ledger.close()
    return status


def _start_exporter(ledger: Ledger, run_id: str, tracking_uri: str | None) -> Any:
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
    sys.exit(status)
