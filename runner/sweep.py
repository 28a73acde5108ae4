"""Sweeps: a grid of spec overrides, each trial a ledger run linked to the sweep.

The sweep is recorded in its own stream (``sweep:<id>``) by one ``SweepStarted``
event listing every trial and the run id it will use. Trial run ids follow from
the sweep id, and the default sweep id from the spec and grid, so running the
same ``sweep`` command again finds the same runs: finished trials are left
alone, crashed or interrupted ones are resumed from their last saved state, and
trials never started are started.

With MLflow export on, one follower in this process writes the sweep's parent
run and its nested trial runs as they go (one writer, however many workers).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from typing import Any, Sequence

import click

from firetitan_track.cli import ledger_url, user_errors
from firetitan_track.errors import UserError

__all__ = ["Trial", "TrialOutcome", "SweepError", "parse_grid", "expand_grid", "default_sweep_id",
           "plan_sweep", "run_trial", "run_sweep", "sweep"]


class SweepError(UserError, ValueError):
    """A sweep that cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class Trial:
    trial: int
    run_id: str
    params: dict[str, Any]


@dataclass(frozen=True)
class TrialOutcome:
    trial: int
    run_id: str
    action: str  # started | resumed | skipped (already completed) | error
    status: str  # the run's status afterwards
    final_step: int | None = None
    last_score: float | None = None
    error: str | None = None


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``KEY=V1,V2`` strings to {KEY: [V1, V2]}; values read as TOML (numbers, booleans), else text."""
    from runner.spec import parse_overrides

    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise SweepError(f"--grid {item!r}: expected KEY=V1,V2,...")
        if key in grid:
            raise SweepError(f"--grid {key} is given twice; list all its values in one --grid")
        grid[key] = [parse_overrides([f"{key}={v}"])[key] for v in values.split(",") if v.strip()]
    if not grid:
        raise SweepError("a sweep needs at least one --grid KEY=V1,V2")
    return grid


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def default_sweep_id(spec: Any, grid: dict[str, list[Any]]) -> str:
    """The same spec and grid give the same id, so repeating a sweep command resumes it."""
    h = hashlib.sha256(f"{spec.digest()}|{_canonical(grid)}".encode()).hexdigest()[:8]
    return f"{spec.run.name}-sweep-{h}"


def trial_run_id(sweep_id: str, trial: int) -> str:
    return f"{sweep_id}-t{trial}"


def plan_sweep(ledger: Any, spec: Any, grid: dict[str, list[Any]], sweep_id: str) -> list[Trial]:
    """Record the sweep (once) and return its trials; refuse a sweep id used for another grid."""
    from firetitan_track import ConcurrencyError, new_event
    from firetitan_track.projections.audit import sweep_stream
    from firetitan_track.redact import redact

    for params in expand_grid(grid):
        spec.with_overrides(params)  # a bad key or value fails now, before anything is written
    trials = [Trial(i, trial_run_id(sweep_id, i), params) for i, params in enumerate(expand_grid(grid))]
    spec_digest = ledger.put_json(redact(spec.to_dict()))
    stream = sweep_stream(sweep_id)
    if ledger.stream_version(stream) == 0:
        event = new_event("SweepStarted", sweep_id=sweep_id, spec_digest=spec_digest, grid=grid,
                          trials=[asdict(t) for t in trials])
        try:
            ledger.append(stream, [event], expected_version=0)
            return trials
        except ConcurrencyError:
            pass  # recorded meanwhile by another process: check it matches below
    recorded = next(ev for ev in ledger.read(stream) if ev.type == "SweepStarted").data
    if recorded["spec_digest"] != spec_digest or _canonical(recorded["grid"]) != _canonical(grid):
        raise SweepError(f"sweep {sweep_id} was started with another spec or grid; "
                         "use another --sweep-id (or none, to derive one from the spec and grid)")
    return [Trial(t["trial"], t["run_id"], t["params"]) for t in recorded["trials"]]


def trial_spec(spec: Any, trial: Trial) -> Any:
    """The trial's spec: the grid's values, and a deployment of its own so parallel trials
    never hot-load each other's weights (unless the grid names the deployment itself)."""
    params = dict(trial.params)
    params.setdefault("model.deployment_id", f"{spec.model.deployment_id}-t{trial.trial}")
    return spec.with_overrides(params)


def run_trial(spec: Any, trial: Trial, sweep_id: str, *, ledger_url: str, steps: int | None = None,
              progress: bool = True) -> TrialOutcome:
    """Bring one trial to its end: start it, resume it, or leave it when already completed."""
    from firetitan_track import Ledger, LedgerError
    from firetitan_track.projections.run_state import fold
    from runner.loop import RunError, resume_run, run_spec
    from runner.spec import SpecError

    ledger = Ledger.open(ledger_url)
    try:
        events = ledger.read(trial.run_id) if ledger.stream_version(trial.run_id) else []
    finally:
        ledger.close()
    state = fold(events, trial.run_id)
    if state.status == "completed":
        score = state.last_score["score"] if state.last_score else None
        return TrialOutcome(trial.trial, trial.run_id, "skipped", "completed", state.step, score)
    action = "resumed" if events else "started"
    try:
        if events:
            result = resume_run(trial.run_id, ledger_url=ledger_url, steps=steps, progress=progress)
        else:
            result = run_spec(trial_spec(spec, trial), ledger_url=ledger_url, run_id=trial.run_id,
                              steps=steps, sweep_id=sweep_id, trial_params=trial.params, progress=progress)
    except Exception as exc:  # one failed trial must not stop the others; it stays resumable
        from firetitan_track.redact import redact_text

        known = isinstance(exc, (RunError, SpecError, LedgerError))
        why = str(exc) if known else f"{type(exc).__name__}: {exc}"
        return TrialOutcome(trial.trial, trial.run_id, "error", "failed", error=redact_text(why))
    return TrialOutcome(trial.trial, trial.run_id, action, result.status, result.final_step, result.last_score)


def run_sweep(spec: Any, grid: dict[str, list[Any]], *, ledger_url: str, sweep_id: str | None = None,
              workers: int = 1, tracking_uri: str | None = None, steps: int | None = None,
              experiment: str | None = None, progress: bool = True,
              on_outcome: Any = None) -> tuple[str, list[TrialOutcome]]:
    """Run every unfinished trial (``workers`` at a time, each in its own process)."""
    from firetitan_track import Ledger

    sweep_id = sweep_id or default_sweep_id(spec, grid)
    ledger = Ledger.open(ledger_url)
    try:
        trials = plan_sweep(ledger, spec, grid, sweep_id)
    finally:
        ledger.close()

    exporter = _start_export(ledger_url, tracking_uri, experiment, sweep_id, trials)
    outcomes: list[TrialOutcome] = []
    try:
        if workers <= 1:
            for t in trials:
                outcomes.append(run_trial(spec, t, sweep_id, ledger_url=ledger_url, steps=steps, progress=progress))
                if on_outcome:
                    on_outcome(outcomes[-1])
        else:
            # spawn, not fork: each trial starts clean (no inherited engines, threads or event loops)
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(run_trial, spec, t, sweep_id, ledger_url=ledger_url, steps=steps,
                                       progress=False) for t in trials]
                for fut, t in _completed(futures, trials):
                    try:
                        outcomes.append(fut.result())
                    except Exception as exc:  # a crashed worker: the trial stays resumable
                        outcomes.append(TrialOutcome(t.trial, t.run_id, "error", "failed", error=str(exc)))
                    if on_outcome:
                        on_outcome(outcomes[-1])
    finally:
        if exporter is not None:
            exporter.stop()
    return sweep_id, sorted(outcomes, key=lambda o: o.trial)


def _completed(futures: list[Any], trials: list[Trial]) -> Any:
    trial_of = dict(zip(futures, trials))
    for fut in as_completed(futures):
        yield fut, trial_of[fut]


def _start_export(ledger_url: str, tracking_uri: str | None, experiment: str | None, sweep_id: str,
                  trials: list[Trial]) -> Any:
    if not tracking_uri:
        return None
    from firetitan_track.projections.audit import sweep_stream
    from firetitan_track.projections.mlflow import DEFAULT_EXPERIMENT, LiveExporter

    # one follower for the whole sweep (one MLflow writer however many workers): the parent
    # run from the sweep's stream, the nested trial runs from theirs
    return LiveExporter(ledger_url, tracking_uri, sweep_stream(sweep_id), run_ids=[t.run_id for t in trials],
                        experiment=experiment or DEFAULT_EXPERIMENT).start()


@click.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--grid", "grid_items", multiple=True, metavar="KEY=V1,V2",
              help="A spec key and its values, e.g. optim.learning_rate=1e-3,3e-3 (repeat for more keys).")
@click.option("--sweep-id", default=None, help="Name the sweep (default: derived from the spec and grid).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trials run at once, each in its own process.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override run.steps for every trial.")
@click.option("--tracking-uri", default=None, metavar="URI",
              help="MLflow tracking URI (default: the project's store, .firetitan/mlflow.db).")
@click.option("--experiment", default=None, help="MLflow experiment (default: firetitan-track).")
@click.option("--no-mlflow", is_flag=True, help="Record in the ledger only; export later with `export mlflow`.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def sweep(ctx: click.Context, spec_path: str, grid_items: tuple[str, ...], sweep_id: str | None, workers: int,
          steps: int | None, tracking_uri: str | None, experiment: str | None, no_mlflow: bool,
          quiet: bool) -> None:
    """Run SPEC once per combination of --grid values, each trial a run linked to the sweep.

    Running the same command again finishes only the unfinished trials.
    """
    from firetitan_track.projections.mlflow import DEFAULT_TRACKING_URI
    from runner.spec import load_spec

    url = ledger_url(ctx)
    with user_errors():
        spec = load_spec(spec_path)
        grid = parse_grid(grid_items)
        sweep_id, outcomes = run_sweep(
            spec, grid, ledger_url=url, sweep_id=sweep_id, workers=workers, steps=steps,
            tracking_uri=None if no_mlflow else (tracking_uri or DEFAULT_TRACKING_URI), experiment=experiment,
            progress=not quiet and workers == 1, on_outcome=_report_outcome)

    from firetitan_track.projections.cli import compare

    click.echo(f"\nsweep {sweep_id}:")
    ctx.invoke(compare, sweep_id=sweep_id, as_json=False)
    if not no_mlflow:
        click.echo(f"\nopen it in MLflow: firetitan-track ui   (tracking store {tracking_uri or DEFAULT_TRACKING_URI})")
    failed = [o for o in outcomes if o.status != "completed"]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(outcomes)} trials did not complete; "
                                   "run the same command again to resume them")


def _report_outcome(o: TrialOutcome) -> None:
    score = "-" if o.last_score is None else f"{o.last_score:.3f}"
    detail = f": {o.error}" if o.error else ""
    step = "-" if o.final_step is None else o.final_step
    click.echo(f"trial {o.trial} ({o.run_id}): {o.action}, {o.status} at step {step}, "
               f"last eval score {score}{detail}", err=o.action == "error")
    sys.stdout.flush()
