"""The ``firetitan-track`` command: its root, and the runner's own commands.

The root sits here, above both packages it serves. Commands live in the modules that
own their behaviour and are loaded when named, so ``firetitan-track runs`` never
imports torch or MLflow:

- the ledger (``runs``, ``events``, ``verify``, ``blob``, ``db``, ``bundle``, ``import``):
  firetitan_track.cli
- its views (``audit``, ``lineage``, ``replay``, ``status``, ``compare``, ``diff``; ``export``
  and ``ui`` with the [mlflow] extra): firetitan_track.projections.cli
- the runner (``run``, ``resume``, ``rerun``: this module; ``sweep``: runner.sweep;
  ``promote``: runner.promote), with the [runner] extra
- the local service (``local up|down|info``): runner.local.cli; starting it needs the
  [local] extra (runner.local.supervisor says so)

A command whose extra is not installed stays listed and, when run, exits 1 with the line
that installs it (firetitan_track.extras).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import TYPE_CHECKING, Iterator, NoReturn

import click

from firetitan_track.cli import absolute_uri, ledger_url, user_errors
from firetitan_track.extras import MissingExtra, install_line, missing, require
from firetitan_track.redact import guard_output, redact_text
from runner.startup import lasting

if TYPE_CHECKING:
    from runner.loop import RunResult  # the loop imports torch: for its type only

# command name -> ("module:attribute", the extra it needs beyond the core, or None)
COMMANDS: dict[str, tuple[str, str | None]] = {
    "runs": ("firetitan_track.cli:runs", None),
    "events": ("firetitan_track.cli:events", None),
    "verify": ("firetitan_track.cli:verify", None),
    "key": ("firetitan_track.cli:key", None),
    "blob": ("firetitan_track.cli:blob", None),
    "db": ("firetitan_track.cli:db", None),
    "bundle": ("firetitan_track.cli:bundle", None),
    "import": ("firetitan_track.cli:import_", None),
    "audit": ("firetitan_track.projections.cli:audit", None),
    "lineage": ("firetitan_track.projections.cli:lineage", None),
    "replay": ("firetitan_track.projections.cli:replay", None),
    "status": ("firetitan_track.projections.cli:status", None),
    "compare": ("firetitan_track.projections.cli:compare", None),
    "diff": ("firetitan_track.projections.cli:diff", None),
    "export": ("firetitan_track.projections.cli:export", "mlflow"),
    "ui": ("firetitan_track.projections.cli:ui", "mlflow"),
    "run": ("runner.cli:run", "runner"),
    "resume": ("runner.cli:resume", "runner"),
    "rerun": ("runner.cli:rerun", "runner"),
    "sweep": ("runner.sweep:sweep", "runner"),
    "promote": ("runner.promote:promote_command", "runner"),
    "local": ("runner.local.cli:local", None),
    "record": ("firetitan_track.recording.command:record", None),
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command runs.

    A command whose extra is missing (by the installed metadata, or by the import that
    fails) becomes a stand-in that exits 1 with the line installing it. A core module that
    fails to import raises its ImportError: that is a broken install or a bug, not a choice.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in COMMANDS:
            return cmd
        target, extra = COMMANDS[name]
        if extra is not None and (gone := missing(extra)):
            return _unavailable(name, MissingExtra(extra, f"`firetitan-track {name}`", gone))
        module, attr = target.split(":")
        try:
            loaded = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if extra is None or (e.name or "").partition(".")[0] in ("firetitan_track", "runner"):
                raise
            return _unavailable(name, MissingExtra(extra, f"`firetitan-track {name}`", [e.name or str(e)]))
        command: click.Command = getattr(loaded, attr)
        return command


def _unavailable(name: str, error: MissingExtra) -> click.Command:
    """A stand-in for a command whose extra is missing: listed, and when run (with any
    arguments, --help included) it says which extra to install and exits 1."""

    @click.command(name, help=str(error), short_help=f"(needs: {install_line(error.extra)})",
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                     "help_option_names": []})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def unavailable(args: tuple[str, ...]) -> None:
        with user_errors():
            raise error

    return unavailable


@click.group(cls=LazyGroup)
@click.option("--ledger", "ledger", metavar="URL", default=None, callback=absolute_uri,
              help="Ledger URL (sqlite:///PATH or postgresql+psycopg://...). "
                   "Default: $FIRETITAN_LEDGER, else sqlite:///.firetitan/ledger.db")
@click.version_option(package_name="firetitan-track")
@click.pass_context
def main(ctx: click.Context, ledger: str | None) -> None:
    """Run FireTitan research loops and keep an auditable record of them."""
    guard_output()  # a traceback or log line never prints a secret
    ctx.ensure_object(dict)
    ctx.obj["ledger_url"] = ledger


@contextlib.contextmanager
def _reporting() -> Iterator[None]:
    """Bad input and known failures as a message and exit 1; an interrupted run as exit 130
    with the command that continues it."""
    from runner.interrupts import RunInterrupted
    from runner.loop import ServiceLost

    try:
        with user_errors():
            try:
                yield
            except ServiceLost as e:
                _exit_now(click.ClickException(redact_text(str(e))))
    except RunInterrupted as e:
        done = "; its cleanup is done" if getattr(e, "cleanup_done", True) else ""
        click.echo(f"{e}{done}. Continue it with: firetitan-track resume {e.run_id}", err=True)
        sys.exit(128 + e.signum)  # 130 for Ctrl-C, 143 for SIGTERM, as the shell reports them
    except KeyboardInterrupt:  # one more Ctrl-C, after the run's own handling gave up the signal
        click.echo("interrupted; a run that had started keeps the record of how far it got (find it with "
                   "`firetitan-track runs`): continue it with: firetitan-track resume RUN_ID", err=True)
        sys.exit(130)


def _exit_now(error: click.ClickException) -> NoReturn:
    """Print ``error`` and exit 1 without the interpreter's shutdown (see loop.ServiceLost):
    what the run wrote is committed; only the SDK's calls to a dead service are abandoned."""
    error.show()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(error.exit_code)


def _finish(result: RunResult) -> None:
    score = "-" if result.last_score is None else f"{result.last_score:.3f}"
    click.echo(f"run {result.run_id}: {result.status} at step {result.final_step}, last eval score {score}")


@click.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--run-id", default=None, help="Name the run (default: the spec's run.name + a random suffix).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override run.steps.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec key, e.g. optim.learning_rate=1e-3.")
@click.option("--export-mlflow", "export_mlflow", is_flag=False, flag_value="default", default=None, metavar="[URI]",
              help="Export to MLflow as the run goes (default tracking store when no URI is given).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def run(ctx: click.Context, spec_path: str, run_id: str | None, steps: int | None, overrides: tuple[str, ...],
        export_mlflow: str | None, quiet: bool) -> None:
    """Run the research loop described by SPEC (a TOML file)."""
    with lasting():  # the loop imports torch (runner.startup)
        from runner.loop import run_spec
    from runner.spec import load_spec, parse_overrides

    with _reporting():
        spec = load_spec(spec_path)
        if overrides:
            spec = spec.with_overrides(parse_overrides(list(overrides)))
        result = run_spec(spec, ledger_url=ledger_url(ctx), run_id=run_id, steps=steps,
                          export_mlflow=_tracking_uri(export_mlflow), progress=not quiet)
    _finish(result)


@click.command()
@click.argument("run_id")
@click.option("--export-mlflow", "export_mlflow", is_flag=False, flag_value="default", default=None, metavar="[URI]")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def resume(ctx: click.Context, run_id: str, export_mlflow: str | None, quiet: bool) -> None:
    """Continue RUN_ID from its last saved state, as its ledger records it."""
    with lasting():
        from runner.loop import resume_run

    with _reporting():
        result = resume_run(run_id, ledger_url=ledger_url(ctx), export_mlflow=_tracking_uri(export_mlflow),
                            progress=not quiet)
    _finish(result)


@click.command()
@click.argument("run_id")
@click.option("--run-id", "new_run_id", default=None, help="Name the new run.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def rerun(ctx: click.Context, run_id: str, new_run_id: str | None, quiet: bool) -> None:
    """Start a new run from RUN_ID's recorded spec and prompt sets, linked to it."""
    with lasting():
        from runner.loop import rerun as do_rerun

    with _reporting():
        result = do_rerun(run_id, ledger_url=ledger_url(ctx), new_run_id=new_run_id, progress=not quiet)
    _finish(result)


def _tracking_uri(flag: str | None) -> str | None:
    """--export-mlflow's store: none, the project's (``default``), or the URI given."""
    if flag is None:
        return None
    require("mlflow", "--export-mlflow")  # called inside the command's _reporting()
    from firetitan_track.projections.mlflow.store import resolve_tracking_uri

    return resolve_tracking_uri(None if flag == "default" else flag)


if __name__ == "__main__":  # pragma: no cover
    main()
