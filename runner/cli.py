"""The ``firetitan-track`` command: its root, and the runner's own commands.

The root sits here, above both packages it serves. Commands live in the modules that
own their behaviour and are loaded when named, so ``firetitan-track runs`` never
imports torch or MLflow:

- the ledger (``runs``, ``events``, ``verify``, ``blob``, ``db``): firetitan_track.cli
- its views (``audit``, ``lineage``, ``replay``, ``export``, ``compare``, ``ui``):
  firetitan_track.projections.cli
- the runner (``run``, ``resume``, ``status``, ``rerun``): this module; ``sweep``: runner.sweep
- the local service (``local up|down|info``): runner.local.cli
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from typing import Any, Iterator

import click

from firetitan_track.cli import absolute_uri, ledger_url, reading_ledger, user_errors

# command name -> "module:attribute"
COMMANDS: dict[str, str] = {
    "runs": "firetitan_track.cli:runs",
    "events": "firetitan_track.cli:events",
    "verify": "firetitan_track.cli:verify",
    "blob": "firetitan_track.cli:blob",
    "db": "firetitan_track.cli:db",
    "bundle": "firetitan_track.cli:bundle",
    "import": "firetitan_track.cli:import_",
    "audit": "firetitan_track.projections.cli:audit",
    "lineage": "firetitan_track.projections.cli:lineage",
    "replay": "firetitan_track.projections.cli:replay",
    "export": "firetitan_track.projections.cli:export",
    "compare": "firetitan_track.projections.cli:compare",
    "diff": "firetitan_track.projections.cli:diff",
    "ui": "firetitan_track.projections.cli:ui",
    "run": "runner.cli:run",
    "resume": "runner.cli:resume",
    "status": "runner.cli:status",
    "rerun": "runner.cli:rerun",
    "sweep": "runner.sweep:sweep",
    "promote": "runner.promote:promote_command",
    "local": "runner.local.cli:local",
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command runs. A module that fails to
    import (a missing dependency) raises its ImportError instead of hiding as
    "No such command"."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in COMMANDS:
            return cmd
        module, attr = COMMANDS[name].split(":")
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command


@click.group(cls=LazyGroup)
@click.option("--ledger", "ledger", metavar="URL", default=None, callback=absolute_uri,
              help="Ledger URL (sqlite:///PATH or postgresql+psycopg://...). "
                   "Default: $FIRETITAN_LEDGER, else sqlite:///.firetitan/ledger.db")
@click.version_option(package_name="firetitan-track")
@click.pass_context
def main(ctx: click.Context, ledger: str | None) -> None:
    """Run FireTitan research loops and keep an auditable record of them."""
    ctx.ensure_object(dict)
    ctx.obj["ledger_url"] = ledger


@contextlib.contextmanager
def _reporting() -> Iterator[None]:
    """Bad input and known failures as a message and exit 1; an interrupted run as exit 130
    with the command that continues it."""
    from runner.interrupts import RunInterrupted

    try:
        with user_errors():
            yield
    except RunInterrupted as e:
        done = "; its cleanup is done" if getattr(e, "cleanup_done", True) else ""
        click.echo(f"{e}{done}. Continue it with: firetitan-track resume {e.run_id}", err=True)
        sys.exit(128 + e.signum)  # 130 for Ctrl-C, 143 for SIGTERM, as the shell reports them
    except KeyboardInterrupt:  # one more Ctrl-C, after the run's own handling gave up the signal
        click.echo("interrupted; a run that had started keeps the record of how far it got (find it with "
                   "`firetitan-track runs`): continue it with: firetitan-track resume RUN_ID", err=True)
        sys.exit(130)


def _finish(result: Any) -> None:
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
    from runner.loop import rerun as do_rerun

    with _reporting():
        result = do_rerun(run_id, ledger_url=ledger_url(ctx), new_run_id=new_run_id, progress=not quiet)
    _finish(result)


@click.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def status(ctx: click.Context, run_id: str, as_json: bool) -> None:
    """Where RUN_ID stands: status, step, trainer, deployment, last state, snapshot and score."""
    from firetitan_track.projections.run_state import fold, pending_promotion_text

    with reading_ledger(ctx) as ledger:
        st = fold(ledger.read(run_id), run_id)
    row = {
        "run_id": st.run_id, "status": st.status, "step": st.step, "version": st.version,
        "attempts": st.attempts, "trainer_job_id": st.trainer_job_id, "deployment_id": st.deployment_id,
        "last_state": st.last_state and {k: st.last_state[k] for k in ("step", "path")},
        "last_snapshot": st.last_snapshot and {k: st.last_snapshot[k] for k in ("step", "path", "kind")},
        "last_score": st.last_score and {k: st.last_score[k] for k in ("step", "score", "snapshot_path")},
        "pending_intent": st.open_intent, "error": st.error,
        "pending_promotion": pending_promotion_text(st),
    }
    if as_json:
        click.echo(json.dumps(row, indent=2))
        return
    width = max(map(len, row))
    for key, value in row.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        click.echo(f"{key:<{width}}  {'-' if value is None else value}")


def _tracking_uri(flag: str | None) -> str | None:
    """--export-mlflow's store: none, the project's (``default``), or the URI given."""
    if flag is None:
        return None
    from firetitan_track.projections.mlflow.store import resolve_tracking_uri

    return resolve_tracking_uri(None if flag == "default" else flag)


if __name__ == "__main__":  # pragma: no cover
    main()
