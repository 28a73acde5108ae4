"""The resumable research loop.

One run goes: provision (trainer + deployment), eval the initial weights, save
state 0, then per step: train, [snapshot + sync + eval], [save state]. Every
consequential call is recorded through TrackedService. A run can be resumed
from its ledger alone: the last StateSaved gives the step, the DCP path and the
data cursor; the events recorded after it are marked superseded and redone, so
the authoritative history equals that of an uninterrupted run.

The entry points (run, resume, rerun) fix a run's inputs and record its start;
an ``Attempt`` then sets up, trains and closes; a failure ends it as ``classify``
sorts it (what is cleaned up, the event that ends the record, what the caller gets).

Provisioning and reconnection live in runner.provision, signals in
runner.interrupts, what a step does in runner.recipes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import math
import os
import re
import signal
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from firetitan_track import ConcurrencyError, Ledger
from firetitan_track.errors import UserError
from firetitan_track.projections.run_state import FINISHED, RunState, continue_command, fold, to_supersede
from firetitan_track.redact import redact, redact_text
from firetitan_track.tracking import Recorder, TrackedService, adam_params, code_version, error_text
from firetitan_track.events import (CodeIdentity, Event, InvalidEvent, RunCompleted, RunFailed, RunResumed,
                                    RunStarted, StepCompleted, TrialPruned, Upstream, first_of)
from firetitan_track.ids import check_run_id
from firetitan_track.ledger import StoreFailure
from runner.backend_watch import BackendLost, BackendWatch
from runner.interrupts import RunInterrupted, StopSignals, Terminated, close_loop, is_interrupt
from runner.chain import load_upstream, resolve_upstream
from firetitan_track.lease import Lease, LeaseLost, acquire
from runner.promote import resolve_pending
from runner.preflight import check_against_service
from runner.provision import Endpoint, api_key, connect, endpoint
from runner.recipes import RECIPES, Recipe, StepContext
from runner.recipes.base import visible_text
from runner.spec import BackendSection, ConcurrencySection, Spec
from runner.startup import lasting
from runner.tasks import DataError, Example, eval_prompts, grade
from runner.tasks.preference import Pair
from runner.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from fireworks.training.sdk import SamplingConcurrencyController

    from firetitan_track.projections.mlflow import LiveExporter

# Any stays for what the recipes leave open (a batch's items: Examples or Pairs, as the recipe's
# TrainingData says) and a sweep trial's params (spec values, each key's own type).

__all__ = ["RunResult", "RunError", "RunInterrupted", "run_spec", "resume_run", "rerun"]


_RUN_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")  # what a spec's run.name loses in a generated run id


class RunError(UserError, RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class NotResumable(RunError):
    """A failure that resuming cannot fix: the recorded spec would fail the same way."""


class ServiceLost(RunError):
    """The service stopped answering mid-run; the run's record is complete. The SDK's
    clients still hold calls to the dead service: their thread pools and finalizers wait on
    it when the interpreter exits (seconds to minutes), so the command line exits at once."""


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
    init_from: Upstream | None = None  # a chained run's upstream state (runner.chain)

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.spec.recipe.kind]

    @classmethod
    def read(cls, spec: Spec) -> "Inputs":
        """The spec's data and prompt files (or its task's built-in sets), and the API key."""
        key = _api_key(spec)
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
        return cls(spec, evals, train, key)

    def masked(self) -> dict[str, int]:
        """Per prompt set, how many strings the ledger stores masked (a secret pasted into the data)."""
        from firetitan_track.redact import count_masked

        sets = {"eval": self.eval_set, "train": self.train_data or []}
        counts = {name: count_masked([e.to_json() for e in items]) for name, items in sets.items()}
        return {name: n for name, n in counts.items() if n}

    @classmethod
    def recorded(cls, ledger: Ledger, spec: Spec, st: RunState) -> "Inputs":
        """The prompt sets exactly as the run recorded them (files may have changed since)."""
        evals = [Example.from_json(o) for o in ledger.get_json(st.prompt_sets["eval"])]
        item = RECIPES[spec.recipe.kind].data.from_json
        train = [item(o) for o in ledger.get_json(st.prompt_sets["train"])] if "train" in st.prompt_sets else None
        return cls(spec, evals, train, _api_key(spec), st.init_from)


def _api_key(spec: Spec) -> str:
    key = api_key(spec.backend)
    if key is None:
        raise RunError(f"{spec.source}: backend.kind = \"fireworks\" needs FIREWORKS_API_KEY in the environment")
    return key


@dataclass(frozen=True)
class Driving:
    """What the caller asks of every attempt of a run."""

    export_mlflow: str | None = None  # an MLflow tracking URI to export to as the run goes
    progress: bool = True  # a progress bar
    lease: Lease | None = None  # the run's lease, when the caller (a sweep worker) holds it already
    on_eval: OnEval | None = None  # a sweep's pruner


@dataclass(frozen=True)
class Origin:
    """Where a new run comes from, as its RunStarted records it."""

    sweep_id: str | None = None
    trial_params: dict[str, Any] | None = None
    rerun_of: str | None = None  # the recorded run a rerun repeats


# -- entry points --------------------------------------------------------------------------


def run_spec(spec: Spec, *, ledger_url: str, run_id: str | None = None, steps: int | None = None,
             sweep_id: str | None = None, trial_params: dict[str, Any] | None = None,
             export_mlflow: str | None = None, progress: bool = True, lease: Lease | None = None,
             on_eval: OnEval | None = None) -> RunResult:
    """Start a new run of ``spec`` and drive it to the end."""
    if steps is not None:
        spec = spec.with_overrides({"run.steps": steps})
    return _start(spec, None, ledger_url=ledger_url, run_id=run_id, origin=Origin(sweep_id, trial_params),
                  driving=Driving(export_mlflow, progress, lease, on_eval))


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
        inputs = Inputs.recorded(ledger, spec, st)
        rec = Recorder(ledger, run_id, version=st.version)
        try:
            rec.record(RunResumed(from_step=st.resume_step, state_path=st.last_state.path if st.last_state else None,
                                  superseded=to_supersede(events), attempt=st.attempts + 1))
        except ConcurrencyError:
            raise RunError(f"run {run_id} is being resumed by another process; this one stops") from None
        st = fold(ledger.read(run_id), run_id)
        return Attempt(rec, inputs, st, Driving(export_mlflow, progress, lease, on_eval)).run()


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
    inputs = Inputs.recorded(ledger, spec, st)
    if new_run_id is None:
        new_run_id = f"{run_id}-rerun-{uuid.uuid4().hex[:6]}"
    return _start(spec, inputs, ledger_url=ledger_url, run_id=new_run_id, origin=Origin(rerun_of=run_id),
                  driving=Driving(export_mlflow, progress))


def _start(spec: Spec, inputs: Inputs | None, *, ledger_url: str, run_id: str | None, origin: Origin,
           driving: Driving) -> RunResult:
    """Check a new run (its inputs: ``inputs``, or read from the spec's files) against the
    ledger and the service, record its start, and drive its first attempt."""
    if run_id is None:  # an empty --run-id is refused below, not replaced
        run_id = f"{_RUN_ID_UNSAFE.sub('-', spec.run.name)}-{uuid.uuid4().hex[:8]}"
    check_run_id(run_id)
    inputs = inputs or Inputs.read(spec)
    ledger = _run_ledger(ledger_url)
    if ledger.stream_version(run_id) > 0:
        raise RunError(f"run {run_id} already exists in the ledger: use `firetitan-track resume {run_id}`")
    where = _endpoint(spec)  # resolved once a run: the preflight asks it, the attempt drives it
    _preflight(inputs, where)
    inputs.init_from = resolve_upstream(ledger, spec.model, spec.bad)
    with _lease(ledger, run_id, driving.lease) as lease:
        rec = Recorder(ledger, run_id, version=0)
        prompt_sets = {"eval": ledger.put_json([e.to_json() for e in inputs.eval_set])}
        if inputs.train_data is not None:
            prompt_sets["train"] = ledger.put_json([e.to_json() for e in inputs.train_data])
        masked = inputs.masked()
        recorded = spec.to_dict()
        try:
            rec.record(RunStarted(spec=redact(recorded), spec_digest=ledger.put_json(recorded),
                                  code_version=code_version(), code=_code_identity(ledger, spec.backend),
                                  seed=spec.run.seed, backend=spec.backend.kind, sweep_id=origin.sweep_id,
                                  trial_params=origin.trial_params, rerun_of=origin.rerun_of, prompt_sets=prompt_sets,
                                  prompt_sets_masked=masked or None,
                                  rerun_data_differs=_rerun_differs(ledger, origin.rerun_of),
                                  init_from=inputs.init_from))
        except ConcurrencyError:
            raise RunError(f"run {run_id} was started by another process at the same time") from None
        return Attempt(rec, inputs, RunState(run_id=run_id, version=rec.version),
                       dataclasses.replace(driving, lease=lease), where).run()


def _refuse_recorded_program(st: RunState, what: str) -> None:
    """A recorded program's run has no spec to run from: the program itself continues it."""
    if st.program is not None:
        raise RunError(f"run {st.run_id} was recorded from a program, not run from a spec, so the runner "
                       f"cannot {'rerun' if what == 'rerun' else 'resume'} it; continue it with: "
                       f"{continue_command(st)}")


def _code_identity(ledger: Ledger, backend: BackendSection) -> CodeIdentity:
    """The code this run executes (RunStarted.code): the runner's and the ledger's source
    folders (the project's checkout, or the installed packages), and the device the embedded
    local service trains on (unknown for a service the spec only names by URL)."""
    import firetitan_track
    import runner
    from firetitan_track.code_identity import code_identity

    device = ({"local": backend.device if not backend.base_url else None, "fireworks": "fireworks"}.get(backend.kind))
    return code_identity(ledger.put_blob, [os.path.dirname(runner.__file__), os.path.dirname(firetitan_track.__file__)],
                         device=device)


# -- an attempt ------------------------------------------------------------------------------------


class Attempt:
    """One attempt of a run, from its state ``st``: set up (the service, the clients, the
    step context, the weights it starts from), train to the last step, close. Whatever
    stops it cleans up and leaves a resumable run, as ``classify`` sorts it."""

    def __init__(self, rec: Recorder, inputs: Inputs, st: RunState, driving: Driving,
                 where: Endpoint | None = None) -> None:
        self.rec, self.inputs, self.st, self.driving = rec, inputs, st, driving
        self.spec, self.recipe = inputs.spec, inputs.recipe
        self.batch = _batches(inputs)
        self.where = where  # the endpoint a new run's preflight resolved (resolved once a run)
        self.result = RunResult(rec.run_id, "failed", st.step, st.last_score.score if st.last_score else None)
        self.tracked: TrackedService | None = None
        self.watch: BackendWatch | None = None
        self.loop: asyncio.AbstractEventLoop  # run() makes these, set_up() the context
        self.stop: StopSignals
        self.ctx: StepContext

    def run(self) -> RunResult:
        exporter = _start_exporter(self.rec, self.driving.export_mlflow)
        self.loop = asyncio.new_event_loop()
        self.stop = StopSignals()
        try:
            # connecting imports the SDK (and transformers, for a tokenizer other than the local
            # service's own: runner.tokenizer), and what is set up lives through the attempt: the
            # collector's passes skip it (runner.startup)
            with lasting():
                start = self.set_up()
            self.train(start)
            return self.close()
        except BaseException as exc:  # exceptions, Ctrl-C and SIGTERM all clean up and leave a resumable run
            outcome = self.end(exc)
            if outcome.pruned is not None:
                self.result.status, self.result.final_step = "pruned", outcome.pruned.step
                return self.result
            if outcome.error is not None:
                raise outcome.error from None
            exc.add_note(f"run {self.rec.run_id} is recorded as failed; after fixing the cause, continue it with "
                         f"`firetitan-track resume {self.rec.run_id}`")
            raise
        finally:
            gc.unfreeze()  # and see it again from here on, whatever of it is garbage by now included
            self.stop.restore()
            if self.watch is not None:
                self.watch.stop()
            close_loop(self.loop)
            if exporter is not None:
                exporter.stop()

    def set_up(self) -> int:
        """Provision or reattach, restore the saved state (or eval the initial weights and save
        state 0); the step it trains from."""
        rec, st, spec = self.rec, self.st, self.spec
        rec.step = st.resume_step
        where = self.where or _endpoint(spec)
        tokenizer = load_tokenizer(where.tokenizer_path, named=bool(spec.model.tokenizer), bad=spec.bad)
        self.watch = BackendWatch(where.base_url).start()
        session = connect(spec.model, spec.cleanup, where, st, rec, self.inputs.api_key,
                          learning_rate=spec.optim.learning_rate, seed=spec.run.seed,
                          needs_reference=spec.recipe.settings.needs_reference())
        self.tracked, policy = session.tracked, session.policy
        # the context's callbacks hold no reference to the attempt: a cycle through it would leave
        # the SDK's clients to the garbage collector, whose finalizers then run inside whichever
        # event loop is running (a sweep worker's next trial's) instead of when the attempt ends
        concurrency, batch = spec.concurrency, self.batch
        self.ctx = StepContext(spec, self.tracked, policy, session.reference, tokenizer,
                               adam=adam_params(dataclasses.asdict(spec.optim)), loop=self.loop,
                               new_controller=lambda: _controller(concurrency), rec=rec,
                               batch_of=lambda s: batch(s)[0])
        self.ctx.controller = self.ctx.new_controller()
        if st.last_state is not None:
            policy.load_state_with_optimizer(st.last_state.path, source_job_id=st.last_state.trainer_job_id)
            return st.resume_step
        # nothing trained yet: the baseline eval, then the state every resume can fall back to
        if self.inputs.init_from is not None:  # a chained run starts from its upstream's weights
            load_upstream(policy, session.reference, self.inputs.init_from, shared_reference=spec.model.lora_rank > 0)
        self.result.last_score = self.evaluate()
        policy.save_state("step-0", data_cursor=None).result()
        return 0

    def train(self, start: int) -> None:
        """The steps after ``start``, each checked first for a stop, a lost service, a lost lease."""
        last = self.spec.run.steps
        with Progress(self.driving.progress, start, last) as progress:
            for step in range(start + 1, last + 1):
                self.stop.check()
                self.watch.check()
                self.driving.lease.check()  # a writer whose lease was taken over stops before it trains or writes again
                metrics = self.step(step)
                progress.advance(metrics, self.result.last_score)
                self.result.final_step = step

    def step(self, step: int) -> dict[str, float]:
        """Train one step and record it; then, on schedule, eval (and ask ``on_eval``) and save state."""
        ctx, spec, schedule = self.ctx, self.spec, self.spec.schedule
        ctx.begin_step(step)
        batch, cursor = self.batch(step)
        metrics = self.recipe.train_step(ctx, batch)
        _check_finite(metrics, step, spec.optim.learning_rate)
        self.rec.record(StepCompleted(step=step, data_cursor=cursor, micro_batches=spec.recipe.micro_batches,
                                      metrics=metrics, optimizer=dataclasses.asdict(spec.optim), **ctx.step_record),
                        defer=True)
        if self.recipe.publish is not None:
            self.recipe.publish(ctx)
        last = step == spec.run.steps
        if step % schedule.eval_every == 0 or last:
            score = self.result.last_score = self.evaluate()
            reason = self.driving.on_eval(step, score) if self.driving.on_eval is not None else None
            if reason:
                raise StopEarly(reason, step, score)
        if step % schedule.save_every == 0 or last:
            ctx.policy.save_state(f"step-{step}", data_cursor=cursor).result()
        return metrics

    def evaluate(self) -> float:
        """Sample the eval prompts from the current weights and score them."""
        ctx = self.ctx
        # weights this step already published (async_grpo's sync after its optimizer step) are
        # evaluated where they are served: a second sync would publish the same weights again
        reuse = ctx.sampler is not None and ctx.serves == ctx.step
        sampler = ctx.sampler if reuse else ctx.sync_policy(f"eval-{ctx.step}")
        s = self.spec.sampling
        play = self.recipe.play_eval  # a multi-turn recipe plays episodes
        res = ctx.run_async(ctx.tracked.evaluate(
            sampler, self.inputs.eval_set, snapshot_path=ctx.last_snapshot,
            sampling={"n": s.n, "max_tokens": s.max_tokens, "temperature": s.temperature},
            grade=lambda ex, text: grade(ex.answer, visible_text(ctx.tokenizer, text)), controller=ctx.controller,
            play=(lambda smp, i, ex, sampling: play(ctx, smp, i, ex, sampling)) if play is not None else None))
        return res.score

    def close(self) -> RunResult:
        """Every step trained: clean up, then record the run completed."""
        self.result.status = "completed"
        self.watch.stop()
        _close(self.tracked)
        self.stop.finish()  # a SIGTERM from here on lands on a finished run: it completes, exit status 0
        self.rec.record(RunCompleted(final_step=self.spec.run.steps, final_snapshot=self.ctx.last_snapshot))
        return self.result

    def end(self, exc: BaseException) -> "Outcome":
        """A failed attempt: clean up and record its end as ``classify`` sorts what stopped it."""
        rec = self.rec
        if self.watch is not None:
            self.watch.stop()
        cause = self.stop.cause(exc)
        # a call that gave up on a dead service before the watch's window: lost all the same
        # (not asked where the ledger refused this process: it records nothing more)
        lost = self.watch.settle() if self.watch is not None and not isinstance(cause, (StoreFailure, LeaseLost)) \
            else None
        cause = lost or cause
        outcome = classify(cause, run_id=rec.run_id, step=rec.step, backend=self.spec.backend)
        if outcome.cleanup == "unrecorded":
            raise _unrecorded_stop(rec, self.tracked, cause) from None
        if outcome.cleanup == "none":
            return outcome
        try:
            try:
                _close(self.tracked, lost)
            finally:
                rec.record(outcome.last_event)
        except (KeyboardInterrupt, Terminated) as again:  # a second Ctrl-C (or SIGTERM) during cleanup
            stopped = RunInterrupted(rec.run_id, f"{str(cause) or 'interrupted (Ctrl-C)'}, then interrupted again "
                                     "while cleaning up (its cleanup is recorded as far as it got)",
                                     signal.SIGTERM if isinstance(again, Terminated) else signal.SIGINT)
            stopped.cleanup_done = False
            raise stopped from None
        return outcome


# -- how a failed attempt ends --------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How a failed attempt ends: its cleanup, the event that ends its record, and what its
    caller gets (``error`` raised; ``pruned``: a pruned result; neither: the exception itself)."""

    # recorded: clean up, recording it, then the last event; unrecorded: the ledger refused a
    # write, clean up all the same; none: the run is no longer this process's
    cleanup: Literal["recorded", "unrecorded", "none"]
    last_event: Event | None = None
    error: BaseException | None = None
    pruned: StopEarly | None = None


def classify(cause: BaseException, *, run_id: str, step: int, backend: BackendSection) -> Outcome:
    """What ``cause`` (what stopped an attempt at ``step``) leaves: pure, it records nothing."""
    if isinstance(cause, StoreFailure):
        return Outcome("unrecorded")
    if isinstance(cause, LeaseLost):
        # another writer drives the run now: the trainer and deployment are its own,
        # and the ledger takes nothing more from this process
        return Outcome("none", error=RunError(str(cause)))
    if isinstance(cause, StopEarly):
        return Outcome("recorded", TrialPruned(step=cause.step, score=cause.score, reason=cause.reason), pruned=cause)
    failed = RunFailed(error=error_text(cause), step=step)
    if isinstance(cause, BackendLost):
        return Outcome("recorded", failed, ServiceLost(
            f"run {run_id} stopped: {cause}. Its cleanup could be neither done nor confirmed (recorded as "
            f"unknown). {_restart_hint(backend)}continue it with: firetitan-track resume {run_id}"))
    if isinstance(cause, (NotResumable, InvalidEvent)) or _status_code(cause) in (400, 422):
        # a request the service refused as malformed is refused again on every resume
        return Outcome("recorded", failed, RunError(
            f"run {run_id} failed: {_refusal(cause)}. Resume replays the recorded spec and would fail the same "
            "way: start a new run with the spec changed"))
    if is_interrupt(cause):
        return Outcome("recorded", failed, RunInterrupted(
            run_id, str(cause) or "interrupted (Ctrl-C)",
            signal.SIGTERM if isinstance(cause, Terminated) else signal.SIGINT))
    return Outcome("recorded", failed)  # the exception itself, with how to resume


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


def _restart_hint(backend: BackendSection) -> str:
    if backend.kind == "local" and not backend.base_url:
        return ("Resume starts the local service again (or start it yourself: firetitan-track local up "
                f"--state-dir {backend.state_dir}); ")
    return "When the service answers again, "


def _unrecorded_stop(rec: Recorder, tracked: TrackedService | None, cause: BaseException) -> RunError:
    """The ledger refused a write: clean up anyway, and say what could not be recorded."""
    try:
        _close(tracked)
    except Exception:  # the cleanup ran; only its record failed
        pass
    if tracked is not None:
        cleanup = tracked.cleanup
    else:  # a provisioning the refusal cut short cleaned up what it had made
        cleanup = cause.cleanup if isinstance(cause, StoreFailure) else None
    done = ", ".join(f"{k} {v}" for k, v in (cleanup or {}).items())
    return RunError(f"run {rec.run_id} stopped: {cause}. Its cleanup ran ({done or 'nothing to clean up'}) "
                    "but could not be recorded; once the ledger can be written again, continue it with: "
                    f"firetitan-track resume {rec.run_id}")


# -- helpers -----------------------------------------------------------------------------------------


def _close(tracked: TrackedService | None, lost: BackendLost | None = None) -> None:
    if tracked is not None:
        tracked.close(backend_lost=str(lost) if lost is not None else None)


def _check_finite(metrics: dict[str, float], step: int, learning_rate: float) -> None:
    """A non-finite loss is a diverged run, not a number to record (the ledger refuses it)."""
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise NotResumable(f"step {step}: {', '.join(f'{k} = {v}' for k, v in bad.items())}: training diverged "
                           f"(optim.learning_rate = {learning_rate})")


def _endpoint(spec: Spec) -> Endpoint:
    return endpoint(spec.backend, spec.model.tokenizer, spec.bad)


def _run_ledger(url: str) -> Ledger:
    """The ledger a run writes: never an in-memory one, whose record ends with the process."""
    from firetitan_track.store import sqlite_path

    if url.startswith("sqlite") and sqlite_path(url) is None:
        raise RunError(f"ledger {url!r} is in memory: the run's record would be lost when it ends; "
                       "use sqlite:///PATH (or postgresql+psycopg://...)")
    return Ledger.open(url)


def _preflight(inputs: Inputs, where: Endpoint) -> None:
    """Ask the service at ``where`` about everything the spec names, before anything is written."""
    check_against_service(inputs.spec, base_url=where.base_url, api_key=inputs.api_key,
                          tokenizer_path=where.tokenizer_path, eval_set=inputs.eval_set,
                          train_data=inputs.train_data)


def _rerun_differs(ledger: Ledger, rerun_of: str | None) -> dict[str, float] | None:
    """A rerun trains on the original's stored prompt sets: where secrets were masked in
    them, the rerun's data differ from what the original saw; say so, in its RunStarted."""
    if rerun_of is None:
        return None
    started = first_of(ledger.read(rerun_of), RunStarted)
    return (started.prompt_sets_masked or None) if started is not None else None


def _batches(inputs: Inputs) -> Callable[[int], tuple[list[Any], dict[str, int]]]:
    """A step's training batch and the data cursor after it (a pure function of the step)."""
    spec, data = inputs.spec, inputs.recipe.data
    size = spec.recipe.batch_size * spec.recipe.micro_batches
    return lambda step: data.batch(spec.task.name, inputs.train_data, seed=spec.run.seed, step=step, size=size,
                                   digits=spec.task.digits)


def _controller(c: ConcurrencySection) -> SamplingConcurrencyController:
    from fireworks.training.sdk.concurrency import AdaptiveConcurrencyController, FixedConcurrencyController

    if c.mode == "fixed":
        return FixedConcurrencyController(c.initial)
    return AdaptiveConcurrencyController(initial_window=c.initial, max_window=c.max)


def _start_exporter(rec: Recorder, tracking_uri: str | None) -> LiveExporter | None:
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


class Progress:
    """An attempt's progress bar (when ``enabled``): a step at a time, with its loss and the last score."""

    def __init__(self, enabled: bool, start: int, total: int) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def advance(self, metrics: dict[str, float], score: float | None) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                                 score="-" if score is None else f"{score:.2f}", refresh=False)
            self.bar.update(1)
