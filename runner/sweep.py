"""Sweeps on Optuna: each trial a ledger run linked to the sweep, on as many machines as join.

``sweep SPEC --search grid|random|tpe --trials N --param KEY=DIST ...`` records the
sweep once in its own stream (``SweepStarted``: the spec, search, space, N, pruner),
then works: a worker takes the sweep's lock (a lease on the sweep's stream), and
either picks up a trial whose worker died (its run unfinished and its run lease
free: it is resumed from its ledger state, not restarted) or, while fewer than N
trials exist, asks the Optuna study for the next params and records them
(``TrialAssigned``). Taking work under the lock is what makes it N trials in all,
none twice, however many machines run the same command with the same
``--sweep-id``. Each trial runs with its own run lease, is told to the study when
it ends, and may be pruned by the median rule on its eval scores (``TrialPruned``).

Running the same command again finishes only unfinished trials. Compare and the
MLflow parent/children read the ledger, never the study.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import signal
import sys
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypedDict

import click

from firetitan_track import ConcurrencyError, Ledger, new_event
from firetitan_track.cli import ledger_url, user_errors
from firetitan_track.errors import UserError
from firetitan_track.events import RecordedEvent, SweepStarted, TrialAssigned, sweep_trials
from firetitan_track.extras import require
from firetitan_track.ids import sweep_stream
from firetitan_track.projections.run_state import FINISHED, fold
from firetitan_track.lease import Lease, LeaseHeld, acquire, try_acquire
from runner.search import (DISTRIBUTIONS, PRUNERS, SEARCHES, Dist, SweepError, grid_size, open_study,
                           parse_grid, parse_params, sampler_for)
from runner.spec import Spec

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    import optuna
    from optuna.distributions import BaseDistribution

    from firetitan_track.projections.mlflow import LiveExporter

# A spec as a dict (``Spec.to_dict``, or the one a sweep stored) stays ``dict[str, Any]``: its
# values are whatever each spec key holds.

__all__ = ["Trial", "TrialOutcome", "SweepError", "SweepPlan", "plan_sweep", "record_sweep", "work",
           "run_sweep", "trial_run_id", "default_sweep_id", "sweep"]

_LOCK_WAIT_S = 120.0
_POLL_S = 1.0  # how often a worker with nothing to take looks again


@dataclass(frozen=True)
class Trial:
    trial: int
    run_id: str
    params: dict[str, Any]
    optuna_trial: int | None = None  # None for a trial planned before sweeps ran on Optuna


@dataclass(frozen=True)
class TrialOutcome:
    trial: int
    run_id: str
    action: str  # started | resumed | error
    status: str  # the run's status afterwards
    final_step: int | None = None
    last_score: float | None = None
    error: str | None = None


class SweepDefinition(TypedDict):
    """What SweepStarted records of the search, and another worker must match to join."""

    search: str
    space: dict[str, str]  # spec key -> its distribution as the command line spells it
    n_trials: int
    prune: str


@dataclass(frozen=True)
class SweepPlan:
    """What defines a sweep: the same command with the same --sweep-id must give the same plan."""

    sweep_id: str
    search: str
    space: dict[str, Dist]
    n_trials: int
    prune: str
    overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def definition(self) -> SweepDefinition:
        """The recorded fields that must match when another worker joins."""
        return {"search": self.search, "space": {k: d.text() for k, d in self.space.items()},
                "n_trials": self.n_trials, "prune": self.prune}

    def distributions(self) -> dict[str, BaseDistribution]:
        return {k: d.optuna() for k, d in self.space.items()}


def trial_run_id(sweep_id: str, trial: int) -> str:
    return f"{sweep_id}-t{trial}"


def _canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# -- what a sweep shares, and what each machine keeps -------------------------------------------

# Backend settings that belong to the machine a worker runs on: where its local service keeps
# its state, the device it trains on, and the address of the local service it uses. Workers on
# several machines join one sweep each with its own values (each trial records them in its
# RunStarted), so they never decide whether two workers run the same sweep.
MACHINE_LOCAL_KEYS = ("backend.state_dir", "backend.device")
LOCAL_SERVICE_KEYS = ("backend.base_url",)  # machine-local only for the local backend


def machine_local_keys(spec: dict[str, Any]) -> tuple[str, ...]:
    local = (spec.get("backend") or {}).get("kind", "local") == "local"
    return MACHINE_LOCAL_KEYS + (LOCAL_SERVICE_KEYS if local else ())


def shared_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec as every worker of a sweep must share it: the machine-local settings set to
    their defaults (so a spec that keeps the defaults is unchanged)."""
    from dataclasses import asdict

    from runner.spec import BackendSection

    defaults = asdict(BackendSection())
    out = {section: dict(values) for section, values in spec.items()}
    backend = out.setdefault("backend", {})
    for key in machine_local_keys(spec):
        backend[key.split(".", 1)[1]] = defaults[key.split(".", 1)[1]]
    return out


def default_sweep_id(spec: Spec, definition: SweepDefinition) -> str:
    """The same spec and search give the same id, so repeating a sweep command resumes it, on
    any machine: the machine-local settings do not count."""
    from firetitan_track.blobs import json_digest

    h = hashlib.sha256(f"{json_digest(shared_spec(spec.to_dict()))}|{_canonical(definition)}".encode()).hexdigest()[:8]
    return f"{spec.run.name}-sweep-{h}"


def plan_sweep(spec: Spec, *, grid_items: Sequence[str] = (), param_items: Sequence[str] = (),
               search: str | None = None, trials: int | None = None, prune: str = "none",
               set_items: Sequence[str] = (), sweep_id: str | None = None) -> tuple[Spec, SweepPlan]:
    """Check everything the command was given, against the spec, before anything is written.
    Returns the spec with ``--set`` applied and the sweep's plan."""
    from runner.loop import check_run_id
    from runner.spec import parse_overrides

    overrides = parse_overrides(list(set_items)) if set_items else {}
    spec = spec.with_overrides(overrides) if overrides else spec
    if grid_items and search not in (None, "grid"):
        raise SweepError(f"--grid means --search grid; use --param KEY=choice:A,B for --search {search}")
    search = search or ("grid" if grid_items else None)
    if search is None:
        raise SweepError("say what to search: --grid KEY=V1,V2, or --search grid|random|tpe with --param KEY=DIST")
    space = parse_grid(grid_items)
    for key, dist in parse_params(param_items).items():
        if key in space:
            raise SweepError(f"{key} is given by both --grid and --param")
        space[key] = dist
    if not space:
        raise SweepError(f"a sweep needs at least one --param KEY=DIST (DIST one of "
                         f"{', '.join(DISTRIBUTIONS)}) or --grid KEY=V1,V2")
    for key, dist in space.items():
        for value in dist.examples():  # a key the spec lacks, or a value it refuses, fails now
            spec.with_overrides({key: value})
    if search == "grid":
        not_finite = [k for k, d in space.items() if d.kind != "choice"]
        if not_finite:
            raise SweepError(f"--search grid needs a finite list of values: give {', '.join(not_finite)} "
                             "as --grid KEY=V1,V2 or --param KEY=choice:V1,V2")
        size = grid_size(space)
        if trials is not None and trials > size:
            raise SweepError(f"--trials {trials}: the grid has only {size} points")
        trials = trials or size
    elif trials is None:
        raise SweepError(f"--search {search} needs --trials N")
    if trials < 1:
        raise SweepError(f"--trials {trials}: a sweep needs at least one trial")
    plan = SweepPlan("", search, space, trials, prune, overrides, spec.run.seed)
    sweep_id = sweep_id or default_sweep_id(spec, plan.definition())
    try:
        check_run_id(trial_run_id(sweep_id, trials - 1))
    except UserError as e:
        raise SweepError(f"--sweep-id {sweep_id!r}: its trial runs would be named like "
                         f"{trial_run_id(sweep_id, trials - 1)!r}, and {e}") from None
    return spec, SweepPlan(sweep_id, search, space, trials, prune, overrides, spec.run.seed)


def record_sweep(ledger: Ledger, spec: Spec, plan: SweepPlan) -> None:
    """Record the sweep (once); refuse a sweep id already used for another spec or search,
    naming each key that differs with both values. A worker joining with its own
    machine-local settings (:data:`MACHINE_LOCAL_KEYS`) runs the same sweep."""
    stream = sweep_stream(plan.sweep_id)
    mine = plan.definition()
    if ledger.stream_version(stream) == 0:
        ledger.put_json(spec.to_dict())  # stored redacted, under spec.digest(): `blob` shows it
        grid = ({k: list(d.choices) for k, d in plan.space.items()} if plan.search == "grid" else {})
        event = new_event(SweepStarted(sweep_id=plan.sweep_id, grid=grid, trials=[], overrides=plan.overrides,
                                       spec_digest=spec.digest(), **mine))
        try:
            ledger.append(stream, [event], expected_version=0)
            return
        except ConcurrencyError:
            pass  # recorded meanwhile by another worker: check it matches below
    recorded = next(ev.fact for ev in ledger.read(stream) if isinstance(ev.fact, SweepStarted))
    theirs = {"search": "grid" if recorded.search is None else recorded.search,
              "space": recorded.space or {k: Dist("choice", choices=tuple(v)).text() for k, v in recorded.grid.items()},
              "n_trials": len(recorded.trials) if recorded.n_trials is None else recorded.n_trials,
              "prune": "none" if recorded.prune is None else recorded.prune}
    differ = _spec_differences(ledger, recorded.spec_digest, spec)
    differ += [(k, theirs[k], ours) for k, ours in mine.items() if _canonical(ours) != _canonical(theirs[k])]
    if differ:
        raise SweepError(f"sweep {plan.sweep_id} was started with another spec or search: "
                         + "; ".join(f"{key} is {_shown(a)} in the sweep, {_shown(b)} here" for key, a, b in differ)
                         + ". Use another --sweep-id (or none, to derive one from the spec and search)")


def _spec_differences(ledger: Ledger, recorded_digest: str, spec: Spec) -> list[tuple[str, object, object]]:
    """(key, the sweep's value, this worker's value) for each spec key that differs, machine-local
    settings left out; compared through the spec the sweep stored (redacted, like this one)."""
    from firetitan_track import NotFound
    from firetitan_track.projections.mlflow.keys import flatten
    from firetitan_track.redact import redact

    if recorded_digest == spec.digest():
        return []
    try:
        theirs = ledger.get_json(recorded_digest)
    except NotFound:
        return [("spec (the sweep's is not in this ledger)", recorded_digest[:12], spec.digest()[:12])]
    a, b = flatten(shared_spec(theirs)), flatten(shared_spec(redact(spec.to_dict())))
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def _shown(value: object) -> str:
    return "unset" if value is None else json.dumps(value) if not isinstance(value, str) else repr(value)


# -- working on a sweep ---------------------------------------------------------------------------


@dataclass
class _Job:
    trial: Trial
    lease: Lease
    resume: bool


def work(spec: Spec, plan: SweepPlan, *, ledger_url: str, steps: int | None = None, progress: bool = True,
         on_outcome: Callable[[TrialOutcome], None] | None = None) -> list[TrialOutcome]:
    """Take and run the sweep's trials until every one is finished. While the only unfinished
    trials are held by other workers, wait: one of them may die, and its trial is then
    taken over here once its lease expires."""
    ledger = Ledger.open(ledger_url)
    study = open_study(ledger_url, plan.sweep_id, plan.search, plan.space, plan.seed, plan.prune)
    tried: set[int] = set()  # a trial that failed here is left for the next command (or another worker)
    outcomes: list[TrialOutcome] = []
    try:
        while True:
            job, held_elsewhere = _next_job(ledger, study, plan, tried)
            if job is None:
                if not held_elsewhere:
                    break
                time.sleep(_POLL_S)
                continue
            tried.add(job.trial.trial)
            outcomes.append(_run_job(spec, plan, job, study, ledger_url=ledger_url, steps=steps, progress=progress))
            if on_outcome is not None:
                on_outcome(outcomes[-1])
        _settle_study(ledger, study, plan)
    finally:
        ledger.close()
    return outcomes


def _next_job(ledger: Ledger, study: optuna.Study, plan: SweepPlan, tried: set[int]) -> tuple[_Job | None, bool]:
    """The next trial to run (with its lease taken), and whether other workers hold unfinished ones."""
    stream = sweep_stream(plan.sweep_id)
    held_elsewhere = False
    with _sweep_lock(ledger, plan.sweep_id):
        events = ledger.read(stream)
        trials = _trials(events)
        for t in trials:  # first, an unfinished trial no worker drives (its worker died)
            if t.trial in tried or _status(ledger, t.run_id) in FINISHED:
                continue
            lease, _ = try_acquire(ledger, t.run_id)
            if lease is not None:
                return _Job(t, lease, resume=ledger.stream_version(t.run_id) > 0), False
            held_elsewhere = True
        if len(trials) >= plan.n_trials:
            return None, held_elsewhere
        if plan.search != "grid":
            # seeded per trial, not per worker: workers that each seeded theirs alike would ask for
            # the same params, and trial k's params do not depend on which worker asks. (A grid
            # keeps the sweep's seed everywhere: it maps trial number k to the k-th point of its
            # seeded order, so one seed on every worker is what keeps the points distinct.)
            study.sampler = sampler_for(plan.search, plan.space, seed=plan.seed * 100_003 + len(trials))
        asked = study.ask(plan.distributions())
        trial = Trial(len(trials), trial_run_id(plan.sweep_id, len(trials)), dict(asked.params), asked.number)
        lease = acquire(ledger, trial.run_id)
        try:
            ledger.append(stream, [new_event(TrialAssigned(trial=trial.trial, run_id=trial.run_id, params=trial.params,
                                                           optuna_trial=trial.optuna_trial))],
                          expected_version=len(events))
        except BaseException:
            lease.release()
            raise
        return _Job(trial, lease, resume=False), False


class _sweep_lock:
    """The sweep's lock: a lease on its stream, waited for (workers hold it for a moment)."""

    def __init__(self, ledger: Ledger, sweep_id: str) -> None:
        self.ledger, self.stream = ledger, sweep_stream(sweep_id)
        self.lease: Lease | None = None

    def __enter__(self) -> None:
        deadline = time.monotonic() + _LOCK_WAIT_S
        while True:
            self.lease, holder = try_acquire(self.ledger, self.stream)
            if self.lease is not None:
                return
            if time.monotonic() > deadline:
                raise SweepError(f"the sweep's lock has been held by {holder} for {_LOCK_WAIT_S:.0f}s; "
                                 "is a worker stuck?")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.lease is not None:
            self.lease.release()


def _trials(events: list[RecordedEvent]) -> list[Trial]:
    numbers = {ev.fact.trial: ev.fact.optuna_trial for ev in events if isinstance(ev.fact, TrialAssigned)}
    return [Trial(t["trial"], t["run_id"], t["params"], numbers.get(t["trial"])) for t in sweep_trials(events)]


def _status(ledger: Ledger, run_id: str) -> str:
    return fold(ledger.read_or_empty(run_id), run_id).status


def trial_spec(spec: Spec, trial: Trial) -> Spec:
    """The trial's spec: its params, and a deployment of its own so parallel trials never
    hot-load each other's weights (unless the search names the deployment itself)."""
    params = dict(trial.params)
    params.setdefault("model.deployment_id", f"{spec.model.deployment_id}-t{trial.trial}")
    return spec.with_overrides(params)


def _run_job(spec: Spec, plan: SweepPlan, job: _Job, study: optuna.Study, *, ledger_url: str, steps: int | None,
             progress: bool) -> TrialOutcome:
    """Bring one trial to its end (start it or resume it), then tell the study."""
    import runner.loop as loop
    from firetitan_track import LedgerError
    from firetitan_track.redact import redact_text
    from runner.spec import SpecError

    t = job.trial
    on_eval = _pruning(study, t) if plan.prune != "none" else None
    try:
        if job.resume:
            result = loop.resume_run(t.run_id, ledger_url=ledger_url, steps=steps, progress=progress,
                                     lease=job.lease, on_eval=on_eval)
        else:
            result = loop.run_spec(trial_spec(spec, t), ledger_url=ledger_url, run_id=t.run_id, steps=steps,
                                   sweep_id=plan.sweep_id, trial_params=t.params, progress=progress,
                                   lease=job.lease, on_eval=on_eval)
    except Exception as exc:  # one failed trial must not stop the others; it stays resumable
        known = isinstance(exc, (loop.RunError, SpecError, LedgerError, LeaseHeld))
        why = str(exc) if known else f"{type(exc).__name__}: {exc}"
        return TrialOutcome(t.trial, t.run_id, "error", "failed", error=redact_text(why))
    finally:
        job.lease.release()  # (the run released it already when it ended normally)
    _tell(study, t, result.status, result.last_score)
    return TrialOutcome(t.trial, t.run_id, "resumed" if job.resume else "started", result.status,
                        result.final_step, result.last_score)


def _pruning(study: optuna.Study, t: Trial) -> Callable[[int, float], str | None] | None:
    """The loop's eval hook: report the score to the study; a reason to stop when the median rule prunes."""
    if t.optuna_trial is None:
        return None
    found = running_trial(study, t.optuna_trial)
    if found is None:
        return None
    trial, reported = found

    def on_eval(step: int, score: float) -> str | None:
        if step in reported:
            return None  # reported by an earlier attempt (a resumed trial redoes its steps)
        trial.report(score, step)
        reported.add(step)
        if trial.should_prune():
            return f"pruned at step {step}: eval score {score:.3f} is below the median of earlier trials"
        return None

    return on_eval


def running_trial(study: optuna.Study, number: int) -> tuple[optuna.trial.Trial, set[int]] | None:
    """The study's running trial ``number`` as an ``optuna.trial.Trial`` that reports to it,
    and the steps already reported on it; None when the trial is no longer running.

    The sweep's one access past Optuna's public API: a ``Trial`` for a trial that already
    exists (asked by this worker or one that died) is built from the trial's storage id,
    which Optuna keeps private on the FrozenTrial (``_trial_id``); ``study.ask`` only hands
    out new or enqueued trials, and ``study.tell`` (public, by number) reports no
    intermediate values. Checked against the installed Optuna by tests/projections/test_sweep.py.
    Only the trial's own run reports on it (the run lease), so the steps reported are those
    stored now plus those reported through the returned trial."""
    import optuna

    match = [ft for ft in study.get_trials(deepcopy=False) if ft.number == number]
    if not match or match[0].state != optuna.trial.TrialState.RUNNING:
        return None
    return optuna.trial.Trial(study, match[0]._trial_id), set(match[0].intermediate_values)


def _tell(study: optuna.Study, t: Trial, status: str, score: float | None) -> None:
    import optuna

    if t.optuna_trial is None or status not in FINISHED:
        return  # an unfinished trial stays running in the study until a worker finishes it
    state = optuna.trial.TrialState.PRUNED if status == "pruned" or score is None else optuna.trial.TrialState.COMPLETE
    try:
        study.tell(t.optuna_trial, score if state == optuna.trial.TrialState.COMPLETE else None, state=state,
                   skip_if_finished=True)
    except (ValueError, RuntimeError):
        pass  # told meanwhile by another worker


def _settle_study(ledger: Ledger, study: optuna.Study, plan: SweepPlan) -> None:
    """Tell the study about trials the ledger shows finished but a worker died before telling
    (the ledger is the source of truth)."""
    import optuna

    running = {ft.number for ft in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
    for t in _trials(ledger.read(sweep_stream(plan.sweep_id))):
        if t.optuna_trial in running:
            st = fold(ledger.read_or_empty(t.run_id), t.run_id)
            if st.status in FINISHED:
                _tell(study, t, st.status, st.last_score.score if st.last_score else None)


def run_sweep(spec: Spec, plan: SweepPlan, *, ledger_url: str, workers: int = 1, tracking_uri: str | None = None,
              steps: int | None = None, experiment: str | None = None, progress: bool = True,
              on_outcome: Callable[[TrialOutcome], None] | None = None) -> list[TrialOutcome]:
    """Record the sweep, then work on it with ``workers`` processes (this one when 1)."""
    ledger = Ledger.open(ledger_url)
    try:
        record_sweep(ledger, spec, plan)
    finally:
        ledger.close()
    exporter = _start_export(ledger_url, tracking_uri, experiment, plan)
    outcomes: list[TrialOutcome] = []
    try:
        if workers <= 1:
            outcomes = work(spec, plan, ledger_url=ledger_url, steps=steps, progress=progress, on_outcome=on_outcome)
        else:
            outcomes = _run_workers(spec, plan, ledger_url=ledger_url, workers=workers, steps=steps,
                                    on_outcome=on_outcome)
    finally:
        if exporter is not None:
            exporter.stop()
    return sorted(outcomes, key=lambda o: o.trial)


def _run_workers(spec: Spec, plan: SweepPlan, *, ledger_url: str, workers: int, steps: int | None,
                 on_outcome: Callable[[TrialOutcome], None] | None) -> list[TrialOutcome]:
    """``workers`` processes, each running ``work`` until the sweep is done, each on its own pipe.

    A worker that dies (``kill -9``, the OOM killer) takes nothing with it: the others run on
    untouched, its trial's run lease frees (at once on this host), and that trial is resumed
    from its ledger state by a surviving worker or by the replacement started here. (A process
    pool would not do: one dead worker breaks the pool and stops every other with it.)
    """
    from multiprocessing.connection import wait

    ctx = get_context("spawn")  # not fork: each worker starts clean (no inherited engines, threads or loops)
    running: dict[Any, Any] = {}  # the parent's end of a worker's pipe -> the worker
    outcomes: list[TrialOutcome] = []
    errors: list[str] = []
    failed: set[Any] = set()  # workers that reported an error: they ended, they did not die
    replacements = 0

    def start() -> None:
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(spec, plan, ledger_url, steps, send), name="firetitan-sweep-worker")
        proc.start()
        send.close()  # the worker holds the only sending end: its death closes the pipe
        running[receive] = proc

    for _ in range(workers):
        start()
    try:
        while running:
            for conn in wait(list(running)):
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError, pickle.UnpicklingError):  # the worker is gone (mid-message, perhaps)
                    proc = running.pop(conn)
                    proc.join()
                    conn.close()
                    if proc.exitcode != 0 and conn not in failed and replacements < plan.n_trials:
                        # its trial is resumed by a surviving worker, or by this replacement
                        click.echo(f"sweep {plan.sweep_id}: worker {proc.pid} died ({_exit_reason(proc.exitcode)}); "
                                   "the trial it held is resumed from the ledger by another worker", err=True)
                        replacements += 1
                        start()
                    continue
                if kind == "outcome":
                    outcomes.append(payload)
                    if on_outcome is not None:
                        on_outcome(payload)
                else:
                    errors.append(payload)
                    failed.add(conn)
    finally:
        for proc in running.values():  # an interrupt here reached the workers too: let them clean up
            proc.join(timeout=CLEANUP_WAIT_S)
            if proc.is_alive():
                proc.terminate()
    if errors:
        raise SweepError(errors[0])
    return outcomes


CLEANUP_WAIT_S = 120.0  # a worker stopped by Ctrl-C applies its run's cleanup before it exits


def _worker(spec: Spec, plan: SweepPlan, ledger_url: str, steps: int | None, send: Connection) -> None:
    """One worker process: ``work`` with each outcome sent to the parent as it comes."""
    from firetitan_track.redact import guard_output

    guard_output()
    try:
        work(spec, plan, ledger_url=ledger_url, steps=steps, progress=False,
             on_outcome=lambda o: send.send(("outcome", o)))
    except BaseException as exc:  # the parent reports it once the other workers end (as text: not
        # every exception survives pickling)
        from firetitan_track.redact import redact_text

        why = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        send.send(("error", redact_text(f"a sweep worker stopped: {why}")))
        raise SystemExit(1) from None
    finally:
        send.close()


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _start_export(ledger_url: str, tracking_uri: str | None, experiment: str | None,
                  plan: SweepPlan) -> LiveExporter | None:
    if not tracking_uri:
        return None
    from firetitan_track.projections.mlflow import DEFAULT_EXPERIMENT, LiveExporter

    # one follower for this command (one MLflow writer however many workers): the parent run
    # from the sweep's stream, the nested trial runs from theirs (their ids are known up front)
    runs = [sweep_stream(plan.sweep_id)] + [trial_run_id(plan.sweep_id, k) for k in range(plan.n_trials)]
    return LiveExporter(ledger_url, tracking_uri, runs[0], run_ids=runs[1:],
                        experiment=experiment or DEFAULT_EXPERIMENT).start()


@click.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--search", type=click.Choice(SEARCHES), default=None,
              help="Optuna's sampler: grid, random or tpe (default: grid when --grid is given).")
@click.option("--trials", type=int, default=None, metavar="N",
              help="Trials in all, over every worker and machine (grid: default every point).")
@click.option("--param", "param_items", multiple=True, metavar="KEY=DIST",
              help="A spec key and how to search it: log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH or choice:A,B,C.")
@click.option("--grid", "grid_items", multiple=True, metavar="KEY=V1,V2",
              help="A spec key and its values, e.g. optim.learning_rate=1e-3,3e-3 (means --search grid).")
@click.option("--prune", type=click.Choice(PRUNERS), default="none", show_default=True,
              help="Stop a trial early when its eval score is below the median of earlier trials at that step.")
@click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE", help="Override a spec key for every trial.")
@click.option("--sweep-id", default=None,
              help="Name the sweep (default: derived from the spec and search). The same command with the "
                   "same id on other machines joins the sweep.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes on this machine, each running one trial at a time.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override run.steps for every trial.")
@click.option("--tracking-uri", default=None, metavar="URI",
              help="MLflow tracking URI (default: the project's store, .firetitan/mlflow.db).")
@click.option("--experiment", default=None, help="MLflow experiment (default: firetitan-track).")
@click.option("--no-mlflow", is_flag=True, help="Record in the ledger only; export later with `export mlflow`.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def sweep(ctx: click.Context, spec_path: str, search: str | None, trials: int | None, param_items: tuple[str, ...],
          grid_items: tuple[str, ...], prune: str, set_items: tuple[str, ...], sweep_id: str | None, workers: int,
          steps: int | None, tracking_uri: str | None, experiment: str | None, no_mlflow: bool,
          quiet: bool) -> None:
    """Run SPEC over a search space, each trial a ledger run linked to the sweep.

    Running the same command again (or on another machine, with the same --sweep-id)
    joins the sweep: it finishes unfinished trials and runs new ones until there are N.
    """
    from firetitan_track.projections.cli import compare
    from firetitan_track.projections.mlflow.store import resolve_tracking_uri
    from runner.spec import load_spec

    tracking_uri = resolve_tracking_uri(tracking_uri)  # the project's store unless one is named

    url = ledger_url(ctx)
    with user_errors():
        if not no_mlflow:
            require("mlflow", "a sweep's MLflow export (--no-mlflow skips it)")
        spec, plan = plan_sweep(load_spec(spec_path), grid_items=grid_items, param_items=param_items,
                                search=search, trials=trials, prune=prune, set_items=set_items, sweep_id=sweep_id)
        run_sweep(spec, plan, ledger_url=url, workers=workers, steps=steps,
                  tracking_uri=None if no_mlflow else tracking_uri, experiment=experiment,
                  progress=not quiet and workers == 1, on_outcome=_report_outcome)

    click.echo(f"\nsweep {plan.sweep_id}:")
    from firetitan_track.projections.mlflow import DEFAULT_EXPERIMENT

    # compare links to the store this sweep exported to, not the default one
    ctx.invoke(compare, sweep_id=plan.sweep_id, as_json=False, tracking_uri=tracking_uri,
               experiment=experiment or DEFAULT_EXPERIMENT)
    if not no_mlflow:
        click.echo(f"\nopen it in MLflow: firetitan-track ui --sweep {plan.sweep_id}   "
                   f"(tracking store {tracking_uri})")
    with user_errors():
        _check_finished(url, plan)


def _check_finished(url: str, plan: SweepPlan) -> None:
    """Exit 1 when a trial is unfinished and no worker drives it (failed, or never started)."""
    with Ledger.open(url) as ledger:
        trials = _trials(ledger.read(sweep_stream(plan.sweep_id)))
        elsewhere, stuck = [], []
        for t in trials:
            if _status(ledger, t.run_id) in FINISHED:
                continue
            lease, _ = try_acquire(ledger, t.run_id)
            if lease is None:
                elsewhere.append(t.run_id)
            else:
                lease.release()
                stuck.append(t.run_id)
    if elsewhere:
        click.echo(f"{len(elsewhere)} trial(s) still running on other workers: {', '.join(elsewhere)}")
    if stuck:
        raise SweepError(f"{len(stuck)} of {plan.n_trials} trials did not complete ({', '.join(stuck)}); "
                         "run the same command again to resume them")


def _report_outcome(o: TrialOutcome) -> None:
    score = "-" if o.last_score is None else f"{o.last_score:.3f}"
    detail = f": {o.error}" if o.error else ""
    step = "-" if o.final_step is None else o.final_step
    click.echo(f"trial {o.trial} ({o.run_id}): {o.action}, {o.status} at step {step}, "
               f"last eval score {score}{detail}", err=o.action == "error")
    sys.stdout.flush()
