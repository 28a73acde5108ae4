"""The resumable research loop.

One run goes: provision (trainer + deployment), eval the initial weights, save
state 0, then per step: train, [snapshot + sync + eval], [save state]. Every
consequential call is recorded through TrackedService. A run can be resumed
from its ledger alone: the last StateSaved gives the step, the DCP path and the
data cursor; the events recorded after it are marked superseded and redone, so
the authoritative history equals that of an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

from firetitan_track import ConcurrencyError, Ledger
from firetitan_track.errors import UserError
from firetitan_track.projections.run_state import TRAINING_HISTORY, RunState, authoritative, fold
from firetitan_track.redact import redact
from firetitan_track.tracking import Recorder, TrackedService, error_text
from runner.lease import RunLease
from runner.spec import Spec
from runner.tasks import DataError, Example, eval_examples, grade, load_jsonl, train_batch

__all__ = ["RunResult", "RunError", "RunInterrupted", "run_spec", "resume_run", "rerun"]


# Run ids travel into MLflow filters, file names and URLs: keep them plain.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RUN_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class RunError(UserError, RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class Terminated(BaseException):
    """SIGTERM, turned into an exception so cleanup runs as it does for SIGINT."""


class RunInterrupted(BaseException):
    """A run stopped by Ctrl-C or SIGTERM, after its cleanup and RunFailed were recorded."""

    def __init__(self, run_id: str, reason: str):
        super().__init__(f"run {run_id} stopped: {reason}")
        self.run_id = run_id
        self.reason = reason


def root_cause(exc: BaseException) -> BaseException:
    """The exception that matters inside an exception group (the SDK's async task groups
    wrap a Ctrl-C or SIGTERM that lands while they run): an interrupt if there is one,
    else the first leaf."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = [root_cause(e) for e in exc.exceptions]
    return next((e for e in leaves if isinstance(e, (KeyboardInterrupt, Terminated))), leaves[0])


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
    train_data: list[Example] | None
    api_key: str


# -- entry points --------------------------------------------------------------------------


def run_spec(spec: Spec, *, ledger_url: str, run_id: str | None = None, steps: int | None = None,
             sweep_id: str | None = None, trial_params: dict[str, Any] | None = None,
             export_mlflow: str | None = None, progress: bool = True, rerun_of: str | None = None,
             inputs: Inputs | None = None) -> RunResult:
    """Start a new run of ``spec`` and drive it to the end."""
    if steps is not None:
        spec = spec.with_overrides({"run.steps": steps})
    run_id = run_id or f"{_RUN_ID_UNSAFE.sub('-', spec.run.name)}-{uuid.uuid4().hex[:8]}"
    if not _RUN_ID.fullmatch(run_id):
        raise RunError(f"run id {run_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    inputs = inputs or _read_inputs(spec)
    ledger = Ledger.open(ledger_url)
    if ledger.stream_version(run_id) > 0:
        raise RunError(f"run {run_id} already exists in the ledger: use `firetitan-track resume {run_id}`")
    with _lease(ledger_url, run_id):
        rec = Recorder(ledger, run_id, version=0)
        prompt_sets = {"eval": ledger.put_json([e.to_json() for e in inputs.eval_set])}
        if inputs.train_data is not None:
            prompt_sets["train"] = ledger.put_json([e.to_json() for e in inputs.train_data])
        try:
            rec.record("RunStarted", spec=redact(spec.to_dict()), spec_digest=spec.digest(),
                       code_version=_code_version(), seed=spec.run.seed, backend=spec.backend.kind,
                       sweep_id=sweep_id, trial_params=trial_params, rerun_of=rerun_of, prompt_sets=prompt_sets)
        except ConcurrencyError:
            raise RunError(f"run {run_id} was started by another process at the same time") from None
        return _drive(rec, inputs, RunState(run_id=run_id, version=rec.version), export_mlflow, progress)


def resume_run(run_id: str, *, ledger_url: str, export_mlflow: str | None = None, progress: bool = True,
               steps: int | None = None) -> RunResult:
    """Continue a run from its last saved state, as recorded in the ledger."""
    ledger = Ledger.open(ledger_url)
    with _lease(ledger_url, run_id):
        events = ledger.read(run_id)  # NotFound names the run
        st = fold(events, run_id)
        if st.status == "completed":
            raise RunError(f"run {run_id} already completed at step {st.step}; nothing to resume")
        if st.spec is None:
            raise RunError(f"run {run_id} has no RunStarted event; it cannot be resumed")
        spec = Spec.from_dict(st.spec, source=f"run {run_id}")
        if steps is not None:
            spec = spec.with_overrides({"run.steps": steps})
        inputs = _recorded_inputs(ledger, spec, st)
        cut = st.last_state["version"] if st.last_state else -1
        superseded = [ev.version for ev in authoritative(events)
                      if ev.version > cut and ev.type in TRAINING_HISTORY]
        rec = Recorder(ledger, run_id, version=st.version)
        try:
            rec.record("RunResumed", from_step=st.resume_step,
                       state_path=st.last_state["path"] if st.last_state else None,
                       superseded=superseded, attempt=st.attempts + 1)
        except ConcurrencyError:
            raise RunError(f"run {run_id} is being resumed by another process; this one stops") from None
        st = fold(ledger.read(run_id), run_id)
        return _drive(rec, inputs, st, export_mlflow, progress)


def rerun(run_id: str, *, ledger_url: str, new_run_id: str | None = None, progress: bool = True,
          export_mlflow: str | None = None) -> RunResult:
    """A new run from a recorded run's spec and prompt sets, linked to it."""
    ledger = Ledger.open(ledger_url)
    st = fold(ledger.read(run_id), run_id)
    if st.spec is None:
        raise RunError(f"run {run_id} has no RunStarted event; nothing to rerun")
    spec = Spec.from_dict(st.spec, source=f"run {run_id}")
    inputs = _recorded_inputs(ledger, spec, st)
    return run_spec(spec, ledger_url=ledger_url, run_id=new_run_id or f"{run_id}-rerun-{uuid.uuid4().hex[:6]}",
                    rerun_of=run_id, inputs=inputs, progress=progress, export_mlflow=export_mlflow)


# -- inputs -------------------------------------------------------------------------------------


def _read_inputs(spec: Spec) -> Inputs:
    api_key = _api_key(spec)
    try:
        train = load_jsonl(spec.resolve_path(spec.task.data), what="data file") if spec.task.data else None
        if spec.eval.prompts == "builtin":
            if train is not None:
                raise RunError(f"{spec.source}: eval.prompts: a JSONL data set needs a JSONL prompt file "
                               "(there is no built-in held-out set for it)")
            evals = eval_examples(spec.task.name, seed=spec.run.seed, count=spec.eval.count, digits=spec.task.digits)
        else:
            evals = load_jsonl(spec.resolve_path(spec.eval.prompts), what="prompt file")
    except DataError as e:
        raise RunError(str(e)) from None
    return Inputs(spec, evals, train, api_key)


def _recorded_inputs(ledger: Any, spec: Spec, st: RunState) -> Inputs:
    """The prompt sets exactly as the run recorded them (files may have changed since)."""
    evals = [Example.from_json(o) for o in ledger.get_json(st.prompt_sets["eval"])]
    train = [Example.from_json(o) for o in ledger.get_json(st.prompt_sets["train"])] if "train" in st.prompt_sets else None
    return Inputs(spec, evals, train, _api_key(spec))


def _api_key(spec: Spec) -> str:
    if spec.backend.kind == "fireworks":
        key = os.environ.get("FIREWORKS_API_KEY", "")
        if not key:
            raise RunError(f"{spec.source}: backend.kind = \"fireworks\" needs FIREWORKS_API_KEY in the environment")
        return key
    # The local service accepts any key; a key in the environment is used as-is, so the
    # secret-scanning tests exercise the same path as the managed service.
    return os.environ.get("FIREWORKS_API_KEY") or "local"


# -- the loop -------------------------------------------------------------------------------------


class StepContext:
    """What a recipe's train_step may use."""

    def __init__(self, spec: Spec, tracked: TrackedService, policy: Any, tokenizer: Any, loop: asyncio.AbstractEventLoop,
                 controller_factory: Any):
        from firetitan_track.tracking import adam_params

        self.spec = spec
        self.tracked = tracked
        self.policy = policy
        self.reference = None
        self.tokenizer = tokenizer
        self.micro_batches = spec.recipe.micro_batches
        self.adam = adam_params(dataclasses.asdict(spec.optim))
        self.step = 0
        self._loop = loop
        self._controller_factory = controller_factory
        self.controller = controller_factory()
        self.last_snapshot: str | None = None

    def run_async(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    def sync_policy(self, name: str) -> Any:
        """Snapshot the policy and hot-load it onto the deployment; return its sampler."""
        self.last_snapshot = self.policy.save_weights_for_sampler(name).result().path
        self.controller = self._controller_factory()
        return self.tracked.create_deployment_sampler(model_path=self.last_snapshot, tokenizer=self.tokenizer,
                                                      concurrency_controller=self.controller)


def _drive(rec: Recorder, inputs: Inputs, st: RunState, export_mlflow: str | None, progress: bool) -> RunResult:
    from fireworks.training.sdk import FiretitanServiceClient
    from transformers import AutoTokenizer

    spec = inputs.spec
    resuming = st.resume_step > 0 or st.attempts > 1
    exporter = _start_exporter(rec, export_mlflow)
    loop = asyncio.new_event_loop()
    tracked: TrackedService | None = None
    result = RunResult(rec.run_id, "failed", st.step, st.last_score["score"] if st.last_score else None)
    stop = _StopSignals() if _main_thread() else None
    try:
        endpoint = _endpoint(spec)
        tokenizer = AutoTokenizer.from_pretrained(spec.model.tokenizer or endpoint["tokenizer_path"])
        shape = _shape_ref(spec.model.training_shape)
        trainer_id = st.trainer_job_id if resuming and _trainer_alive(endpoint, inputs.api_key, st.trainer_job_id) else None
        deployment_id = st.deployment_id or spec.model.deployment_id
        existing_deployment = deployment_id if _deployment_exists(endpoint, inputs.api_key, deployment_id) else None
        service = FiretitanServiceClient.from_firetitan_config(
            api_key=inputs.api_key, base_url=endpoint["base_url"], base_model=spec.model.base_model,
            tokenizer_model=spec.model.tokenizer or endpoint["tokenizer_path"], lora_rank=spec.model.lora_rank,
            training_shape_id=shape, deployment_id=deployment_id,
            learning_rate=spec.optim.learning_rate, replica_count=1, trainer_job_id=trainer_id,
            gradient_accumulation_steps=None,  # the SDK's default (1) only logs a deprecation; micro-batches are ours
            cleanup_trainer_on_close=spec.cleanup.trainer == "delete",
            cleanup_deployment_on_close=None if spec.cleanup.deployment == "keep" else spec.cleanup.deployment,
        )
        tracked = TrackedService(
            service, rec, base_model=spec.model.base_model, shape=shape,
            lora_rank=spec.model.lora_rank, deployment_id=spec.model.deployment_id,
            reused_trainer_job_id=trainer_id, reused_deployment_id=existing_deployment,
            base_url=endpoint["base_url"], owns_reattached=True)
        rec.step = st.resume_step
        policy = tracked.create_training_client(base_model=spec.model.base_model, lora_rank=spec.model.lora_rank,
                                                seed=spec.run.seed)
        ctx = StepContext(spec, tracked, policy, tokenizer, loop, lambda: _controller(spec))
        if spec.recipe.kind == "grpo" and spec.recipe.kl_coef > 0:
            ctx.reference = tracked.create_reference_client(base_model=spec.model.base_model, lora_rank=0)
            if st.reference_job_id and spec.cleanup.trainer == "delete":
                _retire_reference(endpoint, inputs.api_key, st.reference_job_id, rec)

        if st.last_state is not None:
            policy.load_state_with_optimizer(st.last_state["path"],
                                             source_job_id=st.last_state.get("trainer_job_id"))
            start = st.resume_step
        else:  # nothing trained yet: the baseline eval, then the state every resume can fall back to
            start = 0
            result.last_score = _evaluate(ctx, inputs)
            policy.save_state("step-0", data_cursor=None).result()

        from runner.recipes import RECIPES

        recipe = RECIPES[spec.recipe.kind]
        for step in _progress(range(start + 1, spec.run.steps + 1), progress, start, spec.run.steps):
            if stop is not None:
                stop.check()
            rec.step = ctx.step = step
            batch, cursor = train_batch(spec.task.name, inputs.train_data, seed=spec.run.seed, step=step,
                                        size=spec.recipe.batch_size * spec.recipe.micro_batches,
                                        digits=spec.task.digits)
            metrics = recipe.train_step(ctx, batch)
            rec.record("StepCompleted", defer=True, step=step, data_cursor=cursor,
                       micro_batches=spec.recipe.micro_batches, metrics=metrics,
                       optimizer=dataclasses.asdict(spec.optim))
            last = step == spec.run.steps
            if step % spec.schedule.eval_every == 0 or last:
                result.last_score = _evaluate(ctx, inputs)
            if step % spec.schedule.save_every == 0 or last:
                policy.save_state(f"step-{step}", data_cursor=cursor).result()
            _show(progress, metrics, result.last_score)
            result.final_step = step
        result.status = "completed"
        _close(tracked)
        rec.record("RunCompleted", final_step=spec.run.steps, final_snapshot=ctx.last_snapshot)
        return result
    except BaseException as exc:  # exceptions, Ctrl-C and SIGTERM all clean up and leave a resumable run
        # a signal can surface as another exception (the SDK's cleanup of the call it cut short)
        cause = stop.requested if stop is not None and stop.requested is not None else root_cause(exc)
        try:
            _close(tracked)
        finally:
            rec.record("RunFailed", error=error_text(cause), step=rec.step)
        if isinstance(cause, (KeyboardInterrupt, Terminated)):
            raise RunInterrupted(rec.run_id, str(cause) or "interrupted (Ctrl-C)") from None
        exc.add_note(f"run {rec.run_id} is recorded as failed; after fixing the cause, continue it with "
                     f"`firetitan-track resume {rec.run_id}`")
        raise
    finally:
        if stop is not None:
            stop.restore()
        _close_loop(loop)
        if exporter is not None:
            exporter.stop()


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Close the run's event loop. A Ctrl-C or SIGTERM that landed inside a task leaves the
    task's siblings pending; running them out would raise the interrupt a second time, past
    the cleanup already recorded, so they are cancelled and that echo is dropped."""
    async def drain(tasks: set[asyncio.Task[Any]]) -> None:
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(drain(pending))
        loop.run_until_complete(loop.shutdown_asyncgens())
    except (KeyboardInterrupt, Terminated):
        pass
    finally:
        loop.close()


def _evaluate(ctx: StepContext, inputs: Inputs) -> float:
    sampler = ctx.sync_policy(f"eval-{ctx.step}")
    s = inputs.spec.sampling
    res = ctx.run_async(ctx.tracked.evaluate(
        sampler, inputs.eval_set, snapshot_path=ctx.last_snapshot,
        sampling={"n": s.n, "max_tokens": s.max_tokens, "temperature": s.temperature},
        grade=lambda ex, text: grade(ex.answer, _visible(ctx.tokenizer, text)), controller=ctx.controller))
    return res.score


def _visible(tokenizer: Any, text: str) -> str:
    """The completion as a reader sees it: special tokens (the end-of-turn marker) removed."""
    for special in tokenizer.all_special_tokens:
        text = text.replace(special, "")
    return text


def _close(tracked: TrackedService | None) -> None:
    if tracked is not None:
        tracked.close()


# -- helpers -----------------------------------------------------------------------------------------


def _endpoint(spec: Spec) -> dict[str, str]:
    if spec.backend.kind == "fireworks":
        return {"base_url": spec.backend.base_url or None, "tokenizer_path": spec.model.tokenizer}
    from runner.local.service import ensure_running

    if spec.backend.base_url:
        from runner.local.catalogue import tokenizer_path

        return {"base_url": spec.backend.base_url, "tokenizer_path": tokenizer_path()}
    info = ensure_running(spec.backend.state_dir, device=spec.backend.device)
    return {"base_url": info.base_url, "tokenizer_path": info.tokenizer_path}


def _shape_ref(shape: str) -> str:
    """The SDK wants a resource name; a bare shape id means one of the public shapes."""
    return shape if "/" in shape else f"accounts/fireworks/trainingShapes/{shape}"


def _trainer_alive(endpoint: dict[str, str], api_key: str, job_id: str | None) -> bool:
    """Whether the recorded trainer job can be reconnected to (else provision anew and load the state)."""
    if not job_id:
        return False
    from fireworks.training.sdk import TrainerJobManager

    try:
        job = TrainerJobManager(api_key=api_key, base_url=endpoint["base_url"]).get(job_id)
    except Exception:
        return False
    state = str(job.get("state", "")) if isinstance(job, dict) else ""
    return state not in ("", "JOB_STATE_DELETED", "JOB_STATE_DELETING", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED")


def _deployment_exists(endpoint: dict[str, str], api_key: str, deployment_id: str) -> bool:
    """Whether provisioning will reattach to this deployment (an earlier attempt's, or another run's)."""
    from fireworks.training.sdk import DeploymentManager

    try:
        return DeploymentManager(api_key=api_key, base_url=endpoint["base_url"]).get(deployment_id) is not None
    except Exception:
        return False


def _retire_reference(endpoint: dict[str, str], api_key: str, job_id: str, rec: Recorder) -> None:
    """A crashed attempt's frozen reference trainer: the SDK that made it died before its
    close, and the resumed run has a new one, so the spec's cleanup applies to it now."""
    if not _trainer_alive(endpoint, api_key, job_id):
        return
    from fireworks.training.sdk import TrainerJobManager

    TrainerJobManager(api_key=api_key, base_url=endpoint["base_url"]).delete(job_id)
    rec.record("CleanupApplied", trainer="deleted", deployment="kept", role="reference", trainer_job_id=job_id)


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


def _lease(ledger_url: str, run_id: str) -> RunLease:
    lease = RunLease(ledger_url, run_id)
    if not lease.acquire():
        raise RunError(f"run {run_id} is being written by another process (pid {lease.holder() or '?'}); "
                       "only one writer may drive a run at a time")
    return lease


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


class _StopSignals:
    """Ctrl-C and SIGTERM stop the run through its cleanup path. The handler raises where
    the signal lands; Python drops an exception raised inside a finalizer, so the request
    is also remembered and checked again at every step."""

    def __init__(self) -> None:
        self.requested: BaseException | None = None
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = Terminated("terminated by SIGTERM") if signum == signal.SIGTERM else KeyboardInterrupt()
        raise self.requested

    def check(self) -> None:
        if self.requested is not None:
            raise self.requested

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _code_version() -> str:
    from firetitan_track.tracking import _code_version as v

    return v()
