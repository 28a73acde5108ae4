"""Commands for the ledger's views: audit, lineage, replay, status, export, compare, diff, ui.

Each opens the ledger named by the root command and prints a view of it; the
views themselves live beside this module, one module per view.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import click

from firetitan_track.cli import absolute_uri, reading_ledger, table, user_errors
from firetitan_track.ledger import NotFound
from firetitan_track.projections.audit import EvalRow
from firetitan_track.projections.audit import audit as audit_view
from firetitan_track.projections.audit import code_line
from firetitan_track.projections.audit import upstream as upstream_of
from firetitan_track.projections.compare import compare_sweep
from firetitan_track.projections.lineage import lineage as lineage_view
from firetitan_track.projections.mlflow.store import (DEFAULT_ARTIFACT_ROOT, DEFAULT_EXPERIMENT,
                                                      DEFAULT_TRACKING_URI, local_artifact_root, store_exists)
from firetitan_track.projections.replay import replay as replay_view
from firetitan_track.projections.run_state import fold, status_row

if TYPE_CHECKING:
    from firetitan_track.events import Upstream
    from firetitan_track.projections.lineage import StepRow


def _echo_json(obj: object) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _sampling(params: Mapping[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()))


def _eval_table(rows: list[EvalRow]) -> None:
    click.echo(table(["step", "snapshot", "kind", "prompt set", "prompts", "sampling", "score", "sync s",
                      "promoted as"],
                     [[_fmt(r.step), _fmt(r.snapshot_path), _fmt(r.snapshot_kind), _fmt(r.prompt_set_digest)[:12],
                       _fmt(r.prompt_count), _sampling(r.sampling) or "-", _score(r),
                       _fmt(r.sync_duration_s, 3), ", ".join(r.promoted_as) or "-"]
                      for r in rows]))


def _score(row: EvalRow) -> str:
    """The eval's score; a recorded program's own eval metrics, and what they measured."""
    if row.source == "eval":
        return _fmt(row.score)
    if row.source == "snapshot":
        return "(no eval logged)"
    on = "served" if row.measured_on == "deployment" else "trainer weights"
    return " ".join(f"{k}={_fmt(v)}" for k, v in sorted(row.metrics.items())) + f" ({on})"


def _upstream_line(up: Upstream | None) -> str:
    """Where a chained run started (empty for a run from scratch)."""
    if not up:
        return ""
    return f"started from run {up['run_id']} at step {up['step']} (state {up['state_path']})"


@click.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def audit(ctx: click.Context, run_id: str, as_json: bool) -> None:
    """One row per eval of RUN_ID: the snapshot, prompt set and sampling behind each score."""
    with reading_ledger(ctx) as ledger:
        rows = audit_view(ledger, run_id)
        events = ledger.read(run_id)
        started_from = _upstream_line(upstream_of(events))
    if as_json:
        _echo_json([r.to_dict() for r in rows])
        return
    click.echo(code_line(events))
    if started_from:
        click.echo(started_from)
    if rows:
        _eval_table(rows)
    else:
        click.echo(f"run {run_id} has no evals yet")


@click.command()
@click.argument("snapshot_path")
@click.option("--run", "run_id", metavar="RUN_ID", help="Look only in this run (faster on a large ledger).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def lineage(ctx: click.Context, snapshot_path: str, run_id: str | None, as_json: bool) -> None:
    """Where SNAPSHOT_PATH came from: its run, steps, data cursors, base chain and evals."""
    with reading_ledger(ctx) as ledger:
        found = lineage_view(ledger, snapshot_path, run_id)
    if as_json:
        _echo_json(found.to_dict())
        return
    snap = found.snapshot
    click.echo(f"snapshot  {snap['path']}  ({snap['kind']}, step {snap['step']}, name {snap['name']})")
    click.echo(f"run       {found.run_id}")
    if found.upstream:
        click.echo(f"          {_upstream_line(found.upstream)}")
    click.echo(f"steps     {_step_span(found.steps)} from the start")
    since = found.previous_snapshot or "the start"
    click.echo(f"          {_step_span(found.since_previous)} since {since}")
    click.echo("base chain")
    for link in found.base_chain:
        click.echo(f"  {link['path']}  ({_fmt(link['kind'])}, step {_fmt(link['step'])})")
    if found.drawn_on:
        click.echo("data      trained on samples drawn on: "
                   + ", ".join(f"{path} ({n})" for path, n in found.drawn_on.items()))
        for row in found.data:
            if "trajectories" in row:  # a runner's multi-turn recipe
                click.echo(f"  step {row['step']}: {row['trajectories']} trajectories ({row['turns']} turns) "
                           "sampled from: " + ", ".join(f"{path} ({n})" for path, n in row["drawn_on"].items()))
                continue
            offsets = row.get("version_offsets")
            stale = f", version offsets {_fmt(offsets['min'])}..{_fmt(offsets['max'])}" if offsets else ""
            click.echo(f"  step {row['step']}: {row['matched']} of {row['datums']} datums from samples{stale}: "
                       + ", ".join(f"{path} ({n})" for path, n in row["drawn_on"].items()))
    if found.evals:
        click.echo("evals")
        _eval_table(found.evals)
    else:
        click.echo("evals     none used this snapshot")


def _step_span(steps: list[StepRow]) -> str:
    if not steps:
        return "no steps"
    first, last = steps[0], steps[-1]
    return (f"steps {first['step']}..{last['step']} "
            f"(data cursor {json.dumps(first['data_cursor'])}..{json.dumps(last['data_cursor'])})")


@click.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def replay(ctx: click.Context, run_id: str, as_json: bool) -> None:
    """Rebuild RUN_ID's views from its events alone and verify its hash chain.

    Exits 1 when the chain is broken.
    """
    with reading_ledger(ctx) as ledger:
        result = replay_view(ledger, run_id)
    if as_json:
        _echo_json({"run_id": run_id, "events": result.events, "superseded": result.superseded,
                    "intact": result.intact, "problems": [str(p) for p in result.problems],
                    "state": result.state.to_dict(), "evals": [r.to_dict() for r in result.evals]})
    else:
        st = result.state
        click.echo(f"run {run_id}: {result.events} events, {result.superseded} superseded; "
                   f"chain {'intact' if result.intact else 'BROKEN'}")
        for p in result.problems:
            click.echo(f"  {p}")
        for name in ("status", "step", "data_cursor", "attempts", "trainer_job_id", "deployment_id",
                     "backend", "sweep_id", "open_intent", "error"):
            click.echo(f"  {name:15} {_fmt(getattr(st, name))}")
        click.echo(f"  {'last state':15} {_fmt(st.last_state and st.last_state.path)}")
        click.echo(f"  {'last snapshot':15} {_fmt(st.last_snapshot and st.last_snapshot.path)}")
        last = st.last_score
        click.echo(f"  {'last score':15} {_fmt(last and last.score)} (step {_fmt(last and last.step)})")
        click.echo(f"  {'evals':15} {len(result.evals)}")
    if not result.intact:
        ctx.exit(1)


@click.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def status(ctx: click.Context, run_id: str, as_json: bool) -> None:
    """Where RUN_ID stands: status, step, trainer, deployment, last state, snapshot and score."""
    with reading_ledger(ctx) as ledger:
        row = status_row(fold(ledger.read(run_id), run_id))
    if as_json:
        click.echo(json.dumps(row, indent=2))
        return
    width = max(map(len, row))
    for key, value in row.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        click.echo(f"{key:<{width}}  {'-' if value is None else value}")



@click.group()
def export() -> None:
    """Project the ledger into other tools."""


@export.command("mlflow")
@click.argument("run_ids", nargs=-1)
@click.option("--tracking-uri", default=DEFAULT_TRACKING_URI, show_default=True, metavar="URI",
              callback=absolute_uri,
              help="MLflow tracking URI (a server's http://... or a sqlite:/// store).")
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True)
@click.option("--follow", is_flag=True, help="Keep exporting new events until interrupted.")
@click.option("--poll", default=1.0, show_default=True, help="Seconds between polls with --follow.")
@click.option("--no-artifacts", is_flag=True, help="Skip the spec, prompt sets, completions and plot.")
@click.option("--quiet", is_flag=True, help="Print nothing on success.")
@click.pass_context
def export_mlflow(ctx: click.Context, run_ids: tuple[str, ...], tracking_uri: str, experiment: str,
                  follow: bool, poll: float, no_artifacts: bool, quiet: bool) -> None:
    """Export RUN_IDS (default: every run) to MLflow, resuming where the last export stopped."""
    from firetitan_track.projections.mlflow import MlflowExporter, follow_until_stopped

    with reading_ledger(ctx) as ledger:
        for run_id in run_ids:
            if ledger.stream_version(run_id) == 0 and not follow:
                raise click.ClickException(f"no run {run_id!r} in the ledger")
        exporter = MlflowExporter(ledger, tracking_uri, experiment=experiment,
                                  run_ids=list(run_ids) or None, artifacts=not no_artifacts)
        report = follow_until_stopped(exporter, poll) if follow else exporter.export()
    if not quiet:
        rebuilt = f", {len(report.rebuilt)} rebuilt after a resume" if report.rebuilt else ""
        click.echo(f"exported {report.events} events of {len(report.runs)} runs "
                   f"({report.metrics} metric points{rebuilt}) to {tracking_uri}, experiment {experiment!r}")


@click.command()
@click.argument("sweep_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--tracking-uri", default=DEFAULT_TRACKING_URI, show_default=True, metavar="URI",
              callback=absolute_uri,
              help="The MLflow store to link to (the sweep's view in the UI).")
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True)
@click.pass_context
def compare(ctx: click.Context, sweep_id: str, as_json: bool, tracking_uri: str, experiment: str) -> None:
    """Per trial of SWEEP_ID: its params, status, best score and the snapshot behind it,
    then the link that opens the sweep's view in the MLflow UI (every trial's eval/score by step,
    the swept params against the score, what the trials differ in)."""
    with reading_ledger(ctx) as ledger:
        trials = compare_sweep(ledger, sweep_id)
    if as_json:
        _echo_json([t.to_dict() for t in trials])
        return
    keys = sorted({k for t in trials for k in t.params})
    ranked = sorted(trials, key=lambda t: (t.best_score is None, -(t.best_score or 0.0), t.trial))
    click.echo(table(["trial", *keys, "status", "step", "best score", "at step", "snapshot", "run"],
                     [[str(t.trial), *(_fmt(t.params.get(k)) for k in keys), t.status, str(t.step),
                       _fmt(t.best_score), _fmt(t.best_step), _fmt(t.best_snapshot), t.run_id] for t in ranked]))
    _echo_link(tracking_uri, experiment, sweep_id=sweep_id)


def _echo_link(tracking_uri: str, experiment: str, **which: str) -> None:
    """The MLflow UI link for a sweep or run, or why there is none yet (the ledger view stands alone)."""
    from firetitan_track.extras import install_line, missing
    from firetitan_track.projections.mlflow.ui import link, ui_base_url

    if missing("mlflow"):
        click.echo(f"\nin MLflow: not here (the export and UI are the [mlflow] extra: {install_line('mlflow')})")
        return
    serve = "" if tracking_uri.startswith(("http://", "https://")) else "  (serve it: firetitan-track ui)"
    try:
        click.echo(f"\nin MLflow: {link(tracking_uri, experiment, ui_base_url(tracking_uri), **which)}{serve}")
    except NotFound as e:
        click.echo(f"\nin MLflow: not yet ({e})")


@click.command()
@click.option("--sweep", "sweep_id", metavar="SWEEP_ID",
              help="Print the link to this sweep's view: its trials' scores by step and what they differ in.")
@click.option("--run", "run_id", metavar="RUN_ID", help="Print the link to this run's page.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--backend-store-uri", default=DEFAULT_TRACKING_URI, show_default=True, metavar="URI",
              callback=absolute_uri)
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True)
def ui(sweep_id: str | None, run_id: str | None, host: str, port: int, backend_store_uri: str,
       experiment: str) -> None:
    """Serve the project's MLflow tracking store in the MLflow UI, first printing the link
    that opens the experiment's runs, a sweep's view (--sweep) or a run (--run)."""
    from firetitan_track.projections.mlflow.ui import link

    if sweep_id and run_id:
        raise click.UsageError("give --sweep or --run, not both")
    base = f"http://{host}:{port}"
    opened = base
    if sweep_id or run_id or store_exists(backend_store_uri):
        with user_errors():  # asked for a sweep or run the store lacks: say so, serve nothing
            try:
                opened = link(backend_store_uri, experiment, base, sweep_id=sweep_id, run_id=run_id)
            except NotFound:
                if sweep_id or run_id:
                    raise
    artifacts = local_artifact_root(backend_store_uri) or Path(DEFAULT_ARTIFACT_ROOT).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)  # beside the sqlite file: its folder too
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
           "--default-artifact-root", artifacts.as_uri(), "--host", host, "--port", str(port),
           "--workers", "1"]
    click.echo(f"MLflow UI for {backend_store_uri}: {base}  (Ctrl-C to stop)")
    click.echo(f"open {opened}", nl=True)
    sys.stdout.flush()  # the link shows before the server's own output
    # MLflow's job runner (five huey consumers polling for GenAI jobs) serves nothing this view
    # uses and keeps a core busy; a user who wants it sets MLFLOW_SERVER_ENABLE_JOB_EXECUTION
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_TRACKING_URI": backend_store_uri}
    proc = subprocess.Popen(cmd, env=env)
    # a SIGTERM to this command must stop the server too, not orphan it
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        code = proc.wait()
    if code not in (0, -15, 130):
        raise click.ClickException(f"mlflow server exited with status {code}")


@click.command()
@click.argument("run_a", metavar="A")
@click.argument("run_b", metavar="B")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def diff(ctx: click.Context, run_a: str, run_b: str, as_json: bool) -> None:
    """How run B differs from run A: spec, prompt sets, code version, the first step their
    training differs, and scores."""
    from firetitan_track.projections.diff import diff_runs, report

    with reading_ledger(ctx) as ledger:
        found = diff_runs(ledger, run_a, run_b)
    if as_json:
        _echo_json(found.to_dict())
    else:
        click.echo(report(found))
