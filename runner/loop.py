"""The resumable research loop.

One run goes: provision (trainer + deployment), eval the initial weights, save
state 0, then per step: train, [snapshot + sync + eval], [save state]. Every
consequential call is recorded through TrackedService. A run can be resumed
from its ledger alone: the last StateSaved gives the step, the DCP path and the
data cursor; the events recorded after it are marked superseded and redone, so
the authoritative history equals that of an uninterrupted run.

Provisioning and reconnection live in runner.provision, signals in
runner.interrupts, what a step does in runner.recipes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import re
import signal
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from firetitan_track import ConcurrencyError, Ledger
from firetitan_track.errors import UserError
from firetitan_track.projections.run_state import FINISHED, RunState, continue_command, fold, to_supersede
from firetitan_track.redact import redact, redact_text
from firetitan_track.tracking import Recorder, TrackedService, adam_params, code_version, error_text
from firetitan_track.events import (InvalidEvent, RunCompleted, RunFailed, RunResumed, RunStarted, StepCompleted,
                                    TrialPruned)
from firetitan_track.ids import check_run_id
from firetitan_track.ledger import StoreFailure
from runner.backend_watch import BackendLost, BackendWatch
from runner.interrupts import RunInterrupted, StopSignals, Terminated, close_loop, is_interrupt
from runner.chain import load_upstream, resolve_upstream
from runner.lease import Lease, LeaseLost, acquire
from runner.promote import resolve_pending
from runner.provision import api_key, connect, endpoint
from runner.recipes import RECIPES, StepContext
from runner.recipes.base import visible_text
from runner.spec import Spec
from runner.tasks import DataError, Example, eval_prompts, grade
from runner.tasks.preference import Pair

__all__ = ["RunResult", "RunError", "RunInterrupted", "run_spec", "resume_run", "rerun"]


_RUN_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")  # what a spec's run.name loses in a generated run id


class RunError(UserError, RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class StopEarly(Exception):
    """Raised by the loop when ``on_eval`` asks it to stop (a sweep's pruner): the run
    cleans up and records TrialPruned, finished rather than failed."""

    def __init__(self, reason: str, step: int, score: float) -> None:
        super().__init__(reason)
        self.reason, self.step, self.score = reason, step, score


# Called after each eval of the loop with (step, score); a reason returned stops the run early.
OnEval = Callable[[int, float], "str | None"]


@dataclass
class RunResult:
    run_id: str
    status: str
    final_step: int
    last_score: float | None


@dataclass
class Inputs:
    """Everything a run reads, fixed before anything is written."""

    spec: Spec
    eval_set: list[Example]
    train_data: list[Example] | list[Pair] | None
    api_key: str
    init_from: dict[str, Any] | None = None  # a chained run's upstream state (runner.chain)


# -- entry points --------------------------------------------------------------------------


def run_spec(spec: Spec, *, ledger_url: str, run_id: str | None = None, steps: int | None = None,
             sweep_id: str | None = None, trial_params: dict[str, Any] | None = None,
             export_mlflow: str | None = None, progress: bool = True, rerun_of: str | None = None,
             inputs: Inputs | None = None, lease: Lease | None = None, on_eval: OnEval | None = None) -> RunResult:
    """Start a new run of ``spec`` and drive it to the end."""
    if steps is not None:
        spec = spec.with_overrides({"run.steps": steps})
    if run_id is None:  # an empty --run-id is refused below, not replaced
        run_id = f"{_RUN_ID_UNSAFE.sub('-', spec.run.name)}-{uuid.uuid4().hex[:8]}"
    check_run_id(run_id)
    inputs = inputs or _read_inputs(spec)
    ledger = _run_ledger(ledger_url)
    if ledger.stream_version(run_id) > 0:
        raise RunError(f"run {run_id} already exists in the ledger: use `firetitan-track resume {run_id}`")
    _preflight(inputs)
    inputs.init_from = resolve_upstream(ledger, spec)
    with _lease(ledger, run_id, lease) as lease:
        rec = Recorder(ledger, run_id, version=0)
        prompt_sets = {"eval": ledger.put_json([e.to_json() for e in inputs.eval_set])}
        if inputs.train_data is not None:
            prompt_sets["train"] = ledger.put_json([e.to_json() for e in inputs.train_data])
        masked = _masked(inputs)
        try:
            rec.record(RunStarted(spec=redact(spec.to_dict()), spec_digest=ledger.put_json(spec.to_dict()),
                                  code_version=code_version(), code=_code_identity(ledger, spec), seed=spec.run.seed,
                                  backend=spec.backend.kind, sweep_id=sweep_id, trial_params=trial_params,
                                  rerun_of=rerun_of, prompt_sets=prompt_sets, prompt_sets_masked=masked or None,
                                  rerun_data_differs=_rerun_differs(ledger, rerun_of), init_from=inputs.init_from))
        except ConcurrencyError:
            raise RunError(f"run {run_id} was started by another process at the same time") from None
        return _drive(rec, inputs, RunState(run_id=run_id, version=rec.version), export_mlflow, progress,
                      lease, on_eval)


def resume_run(run_id: str, *, ledger_url: str, export_mlflow: str | None = None, progress: bool = True,
               steps: int | None = None, lease: Lease | None = None, on_eval: OnEval | None = None) -> RunResult:
    """Continue a run from its last saved state, as recorded in the ledger."""
    ledger = _run_ledger(ledger_url)
    with _lease(ledger, run_id, lease) as lease:
        events = ledger.read(run_id)  # NotFound names the run
        st = fold(events, run_id)
        # a promotion whose outcome a crash left unrecorded is settled first (a finished run too)
        if resolve_pending(Recorder(ledger, run_id, version=st.version), events, spec_dict=st.spec):
            events = ledger.read(run_id)
            st = fold(events, run_id)
        if st.status in FINISHED:
            raise RunError(f"run {run_id} already {st.status} at step {st.step}; nothing to resume")
        if st.spec is None:
            raise RunError(f"run {run_id} has no RunStarted event; it cannot be resumed")
        _refuse_recorded_program(st, "resumed")
        spec = Spec.from_dict(st.spec, source=f"run {run_id}")
        if steps is not None:
            spec = spec.with_overrides({"run.steps": steps})
        inputs = _recorded_inputs(ledger, spec, st)
        rec = Recorder(ledger, run_id, version=st.version)
        try:
            rec.record(RunResumed(from_step=st.resume_step, state_path=st.last_state.path if st.last_state else None,
                                  superseded=to_supersede(events), attempt=st.attempts + 1))
        except ConcurrencyError:
            raise RunError(f"run {run_id} is being resumed by another process; this one stops") from None
        st = fold(ledger.read(run_id), run_id)
        return _drive(rec, inputs, st, export_mlflow, progress, lease, on_eval)


def rerun(run_id: str, *, ledger_url: str, new_run_id: str | None = None, progress: bool = True,
          export_mlflow: str | None = None) -> RunResult:
    """A new run from a recorded run's spec and prompt sets, linked to it."""
    if new_run_id is not None:
        check_run_id(new_run_id)  # an empty --run-id is refused, not replaced
    ledger = Ledger.open(ledger_url)
    st = fold(ledger.read(run_id), run_id)
    if st.spec is None:
        raise RunError(f"run {run_id} has no RunStarted event; nothing to rerun")
    _refuse_recorded_program(st, "rerun")
    spec = Spec.from_dict(st.spec, source=f"run {run_id}")
    inputs = _recorded_inputs(ledger, spec, st)
    if new_run_id is None:
        new_run_id = f"{run_id}-rerun-{uuid.uuid4().hex[:6]}"
    return run_spec(spec, ledger_url=ledger_url, run_id=new_run_id, rerun_of=run_id, inputs=inputs,
                    progress=progress, export_mlflow=export_mlflow)


def _refuse_recorded_program(st: RunState, what: str) -> None:
    """A recorded program's run has no spec to run from: the program itself continues it."""
    if st.program is not None:
        raise RunError(f"run {st.run_id} was recorded from a program, not run from a spec, so the runner "
                       f"cannot {'rerun' if what == 'rerun' else 'resume'} it; continue it with: "
                       f"{continue_command(st)}")


def _code_identity(ledger: Ledger, spec: Spec) -> dict[str, Any]:
    """The code this run executes (RunStarted.code): the runner's and the ledger's source
    folders (the project's checkout, or the installed packages), and the device the embedded
    local service trains on (unknown for a service the spec only names by URL)."""
    import firetitan_track
    import runner
    from firetitan_track.code_identity import code_identity

    device = ({"local": spec.backend.device if not spec.backend.base_url else None,
               "fireworks": "fireworks"}.get(spec.backend.kind))
    return code_identity(ledger.put_blob, [os.path.dirname(runner.__file__), os.path.dirname(firetitan_track.__file__)],
                         device=device)


# -- inputs -------------------------------------------------------------------------------------


def _read_inputs(spec: Spec) -> Inputs:
    api_key = _api_key(spec)
    try:
        data = RECIPES[spec.recipe.kind].data
        train = data.load(spec.resolve_path(spec.task.data), what="data file") if spec.task.data else None
        if spec.eval.prompts == "builtin":
            if train is not None:
                raise RunError(f"{spec.source}: eval.prompts: a JSONL data set needs a JSONL prompt file "
                               "(there is no built-in held-out set for it)")
            evals = eval_prompts(spec.task.name, None, seed=spec.run.seed, count=spec.eval.count,
                                 digits=spec.task.digits)
        else:
            evals = eval_prompts(spec.task.name, spec.resolve_path(spec.eval.prompts), seed=spec.run.seed,
                                 count=spec.eval.count, digits=spec.task.digits)
    except DataError as e:
        raise RunError(str(e)) from None
    return Inputs(spec, evals, train, api_key)


def _recorded_inputs(ledger: Ledger, spec: Spec, st: RunState) -> Inputs:
    """The prompt sets exactly as the run recorded them (files may have changed since)."""
    evals = [Example.from_json(o) for o in ledger.get_json(st.prompt_sets["eval"])]
    item = RECIPES[spec.recipe.kind].data.from_json
    train = [item(o) for o in ledger.get_json(st.prompt_sets["train"])] if "train" in st.prompt_sets else None
    return Inputs(spec, evals, train, _api_key(spec), st.init_from)


def _api_key(spec: Spec) -> str:
    key = api_key(spec)
    if key is None:
        raise RunError(f"{spec.source}: backend.kind = \"fireworks\" needs FIREWORKS_API_KEY in the environment")
    return key


# -- the loop -------------------------------------------------------------------------------------


def _drive(rec: Recorder, inputs: Inputs, st: RunState, export_mlflow: str | None, progress: bool,
           lease: Lease, on_eval: OnEval | None = None) -> RunResult:
    spec = inputs.spec
    recipe = RECIPES[spec.recipe.kind]
    next_batch = recipe.data.batch
    exporter = _start_exporter(rec, export_mlflow)
    loop = asyncio.new_event_loop()
    tracked: TrackedService | None = None
    result = RunResult(rec.run_id, "failed", st.step, st.last_score.score if st.last_score else None)
    stop = StopSignals()
    watch: BackendWatch | None = None
    try:
        rec.step = st.resume_step
        where = endpoint(spec)
        watch = BackendWatch(where.base_url).start()
        session = connect(spec, where, st, rec, inputs.api_key, needs_reference=spec.recipe.settings.needs_reference())
        tracked, policy = session.tracked, session.policy
        size = spec.recipe.batch_size * spec.recipe.micro_batches
        ctx = StepContext(spec, tracked, policy, session.reference, session.tokenizer,
                          adam=adam_params(dataclasses.asdict(spec.optim)), loop=loop,
                          new_controller=lambda: _controller(spec), rec=rec,
                          batch_of=lambda s: next_batch(spec.task.name, inputs.train_data, seed=spec.run.seed, step=s,
                                                        size=size, digits=spec.task.digits)[0])
        ctx.controller = ctx.new_controller()

        if st.last_state is not None:
            policy.load_state_with_optimizer(st.last_state.path, source_job_id=st.last_state.trainer_job_id)
            start = st.resume_step
        else:  # nothing trained yet: the baseline eval, then the state every resume can fall back to
            start = 0
            if inputs.init_from is not None:  # a chained run starts from its upstream's weights
                load_upstream(policy, session.reference, inputs.init_from,
                              shared_reference=spec.model.lora_rank > 0)
            result.last_score = _evaluate(ctx, inputs)
            policy.save_state("step-0", data_cursor=None).result()

        for step in _progress(range(start + 1, spec.run.steps + 1), progress, start, spec.run.steps):
            stop.check()
            watch.check()
            lease.check()  # a writer whose lease was taken over stops before it trains or writes again
            rec.step = ctx.step = step
            batch, cursor = next_batch(spec.task.name, inputs.train_data, seed=spec.run.seed, step=step,
                                        size=size, digits=spec.task.digits)
            ctx.step_record = {}
            metrics = recipe.train_step(ctx, batch)
            _check_finite(metrics, step, spec)
            rec.record(StepCompleted(step=step, data_cursor=cursor, micro_batches=spec.recipe.micro_batches,
                                     metrics=metrics, optimizer=dataclasses.asdict(spec.optim), **ctx.step_record),
                       defer=True)
            if recipe.publish is not None:
                recipe.publish(ctx)
            last = step == spec.run.steps
            if step % spec.schedule.eval_every == 0 or last:
                result.last_score = _evaluate(ctx, inputs)
                reason = on_eval(step, result.last_score) if on_eval is not None else None
                if reason:
                    raise StopEarly(reason, step, result.last_score)
            if step % spec.schedule.save_every == 0 or last:
                policy.save_state(f"step-{step}", data_cursor=cursor).result()
            _show(progress, metrics, result.last_score)
            result.final_step = step
        result.status = "completed"
        watch.stop()
        _close(tracked)
        stop.finish()  # a SIGTERM from here on lands on a finished run: it completes, exit status 0
        rec.record(RunCompleted(final_step=spec.run.steps, final_snapshot=ctx.last_snapshot))
        return result
    except BaseException as exc:  # exceptions, Ctrl-C and SIGTERM all clean up and leave a resumable run
        lost = watch.lost if watch is not None else None
        if watch is not None:
            watch.stop()
        cause = lost or stop.cause(exc)
        if isinstance(cause, StoreFailure):
            raise _unrecorded_stop(rec, tracked, cause) from None
        if isinstance(cause, LeaseLost):
            # another writer drives the run now: the trainer and deployment are its own,
            # and the ledger takes nothing more from this process
            raise RunError(str(cause)) from None
        try:
            try:
                _close(tracked, lost)
            finally:
                if isinstance(cause, StopEarly):
                    rec.record(TrialPruned(step=cause.step, score=cause.score, reason=cause.reason))
                else:
                    rec.record(RunFailed(error=error_text(cause), step=rec.step))
        except (KeyboardInterrupt, Terminated) as again:  # a second Ctrl-C (or SIGTERM) during cleanup
            stopped = RunInterrupted(rec.run_id, f"{str(cause) or 'interrupted (Ctrl-C)'}, then interrupted again "
                                     "while cleaning up (its cleanup is recorded as far as it got)",
                                     signal.SIGTERM if isinstance(again, Terminated) else signal.SIGINT)
            stopped.cleanup_done = False
            raise stopped from None
        if isinstance(cause, StopEarly):
            result.status, result.final_step = "pruned", cause.step
            return result
        if lost is not None:
            raise ServiceLost(f"run {rec.run_id} stopped: {lost}. Its cleanup could be neither done nor confirmed "
                           f"(recorded as unknown). {_restart_hint(spec)}continue it with: "
                           f"firetitan-track resume {rec.run_id}") from None
        if isinstance(cause, (NotResumable, InvalidEvent)) or _status_code(cause) in (400, 422):
            # a request the service refused as malformed is refused again on every resume
            raise RunError(f"run {rec.run_id} failed: {_refusal(cause)}. Resume replays the recorded spec "
                           "and would fail the same way: start a new run with the spec changed") from None
        if is_interrupt(cause):
            raise RunInterrupted(rec.run_id, str(cause) or "interrupted (Ctrl-C)",
                                 signal.SIGTERM if isinstance(cause, Terminated) else signal.SIGINT) from None
        exc.add_note(f"run {rec.run_id} is recorded as failed; after fixing the cause, continue it with "
                     f"`firetitan-track resume {rec.run_id}`")
        raise
    finally:
        stop.restore()
        if watch is not None:
            watch.stop()
        close_loop(loop)
        if exporter is not None:
            exporter.stop()


def _status_code(exc: BaseException) -> int | None:
    """The HTTP status of a refused request: the SDK's errors carry it, httpx's on their response."""
    code = getattr(exc, "status_code", None)
    return code if code is not None else getattr(getattr(exc, "response", None), "status_code", None)


def _refusal(exc: BaseException) -> str:
    """An error as a person reads it: for an HTTP refusal, the service's own reason, first line."""
    response = getattr(exc, "response", None)
    if response is None or _status_code(exc) is None:
        return error_text(exc)
    from fireworks.training.sdk.errors import parse_api_error

    try:
        what = f"{response.request.method} {response.request.url.path}"
        reason = (parse_api_error(response).strip().splitlines() or [""])[0]
    except Exception:  # a response without its request, or an unreadable body
        return error_text(exc)
    return redact_text(f"the service refused {what} (HTTP {_status_code(exc)}): {reason}")


def _evaluate(ctx: StepContext, inputs: Inputs) -> float:
    # weights this step already published (async_grpo's sync after its optimizer step) are
    # evaluated where they are served: a second sync would publish the same weights again
    reuse = ctx.sampler is not None and ctx.serves == ctx.step
    sampler = ctx.sampler if reuse else ctx.sync_policy(f"eval-{ctx.step}")
    s = inputs.spec.sampling
    play = RECIPES[inputs.spec.recipe.kind].play_eval  # a multi-turn recipe plays episodes
    res = ctx.run_async(ctx.tracked.evaluate(
        sampler, inputs.eval_set, snapshot_path=ctx.last_snapshot,
        sampling={"n": s.n, "max_tokens": s.max_tokens, "temperature": s.temperature},
        grade=lambda ex, text: grade(ex.answer, visible_text(ctx.tokenizer, text)), controller=ctx.controller,
        play=(lambda smp, i, ex, sampling: play(ctx, smp, i, ex, sampling)) if play is not None else None))
    return res.score


def _close(tracked: TrackedService | None, lost: BackendLost | None = None) -> None:
    if tracked is not None:
        tracked.close(backend_lost=str(lost) if lost is not None else None)


class NotResumable(RunError):
    """A failure that resuming cannot fix: the recorded spec would fail the same way."""


class ServiceLost(RunError):
    """The service stopped answering mid-run; the run's record is complete. The SDK's
    clients still hold calls to the dead service: their thread pools and finalizers wait on
    it when the interpreter exits (seconds to minutes), so the command line exits at once."""


def _check_finite(metrics: dict[str, float], step: int, spec: Spec) -> None:
    """A non-finite loss is a diverged run, not a number to record (the ledger refuses it)."""
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise NotResumable(f"step {step}: {', '.join(f'{k} = {v}' for k, v in bad.items())}: training diverged "
                           f"(optim.learning_rate = {spec.optim.learning_rate})")


def _run_ledger(url: str) -> Ledger:
    """The ledger a run writes: never an in-memory one, whose record ends with the process."""
    from firetitan_track.store import sqlite_path

    if url.startswith("sqlite") and sqlite_path(url) is None:
        raise RunError(f"ledger {url!r} is in memory: the run's record would be lost when it ends; "
                       "use sqlite:///PATH (or postgresql+psycopg://...)")
    return Ledger.open(url)


def _preflight(inputs: Inputs) -> None:
    """Ask the service about everything the spec names, before anything is written."""
    from runner.preflight import check_against_service

    spec = inputs.spec
    where = endpoint(spec)
    check_against_service(spec, base_url=where.base_url, api_key=inputs.api_key,
                          tokenizer_path=where.tokenizer_path, eval_set=inputs.eval_set,
                          train_data=inputs.train_data)


def _masked(inputs: Inputs) -> dict[str, int]:
    """Per prompt set, how many strings the ledger stores masked (a secret pasted into the data)."""
    from firetitan_track.redact import count_masked

    sets = {"eval": inputs.eval_set, "train": inputs.train_data or []}
    counts = {name: count_masked([e.to_json() for e in items]) for name, items in sets.items()}
    return {name: n for name, n in counts.items() if n}


def _rerun_differs(ledger: Ledger, rerun_of: str | None) -> dict[str, float] | None:
    """A rerun trains on the original's stored prompt sets: where secrets were masked in
    them, the rerun's data differ from what the original saw; say so, in its RunStarted."""
    if rerun_of is None:
        return None
    started = next((ev.fact for ev in ledger.read(rerun_of) if isinstance(ev.fact, RunStarted)), None)
    return (started.prompt_sets_masked or None) if started is not None else None


def _restart_hint(spec: Spec) -> str:
    if spec.backend.kind == "local" and not spec.backend.base_url:
        return ("Resume starts the local service again (or start it yourself: firetitan-track local up "
                f"--state-dir {spec.backend.state_dir}); ")
    return "When the service answers again, "


def _unrecorded_stop(rec: Recorder, tracked: TrackedService | None, cause: BaseException) -> RunError:
    """The ledger refused a write: clean up anyway, and say what could not be recorded."""
    try:
        _close(tracked)
    except Exception:  # the cleanup ran; only its record failed
        pass
    done = ", ".join(f"{k} {v}" for k, v in (tracked.cleanup if tracked is not None else {}).items())
    return RunError(f"run {rec.run_id} stopped: {cause}. Its cleanup ran ({done or 'nothing to clean up'}) "
                    "but could not be recorded; once the ledger can be written again, continue it with: "
                    f"firetitan-track resume {rec.run_id}")


# -- helpers -----------------------------------------------------------------------------------------


def _controller(spec: Spec) -> Any:
    from fireworks.training.sdk.concurrency import AdaptiveConcurrencyController, FixedConcurrencyController

    c = spec.concurrency
    if c.mode == "fixed":
        return FixedConcurrencyController(c.initial)
    return AdaptiveConcurrencyController(initial_window=c.initial, max_window=c.max)


def _start_exporter(rec: Recorder, tracking_uri: str | None) -> Any:
    if not tracking_uri:
        return None
    from firetitan_track.projections.mlflow import LiveExporter

    exporter = LiveExporter(rec.ledger, tracking_uri, rec.run_id)
    exporter.start()
    return exporter


def _lease(ledger: Ledger, run_id: str, given: Lease | None) -> Lease:
    """The run's lease (one a sweep worker already took, or a new one), fencing ``ledger``'s appends."""
    if given is None:
        return acquire(ledger, run_id)
    given.attach(ledger)
    return given


_bar: Any = None


def _progress(steps: range, enabled: bool, start: int, total: int) -> Iterator[int]:
    global _bar
    if not enabled:
        yield from steps
        return
    from tqdm import tqdm

    with tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True) as bar:
        _bar = bar
        for step in steps:
            yield step
            bar.update(1)
        _bar = None


def _show(enabled: bool, metrics: dict[str, float], score: float | None) -> None:
    if enabled and _bar is not None:
        _bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                         score="-" if score is None else f"{score:.2f}", refresh=False)
