"""TrackedService: the FireTitan SDK service, with every consequential call recorded.

Wrap a ``FiretitanServiceClient`` and use it as before. Provisioning, DCP saves,
sampler snapshots, weight syncs, evals and cleanup each append an intent event
before the SDK call and an outcome event after it, so a crash between the two is
visible in the ledger. From your own loop::

    from firetitan_track import track
    service = track(FiretitanServiceClient.from_firetitan_config(...), run_id="my-run")

The SDK is imported lazily: this module stays importable without torch.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from firetitan_track.events import RecordedEvent, new_event
from firetitan_track.ledger import Ledger
from firetitan_track.redact import redact_text

__all__ = ["Recorder", "TrackedService", "TrackedTrainingClient", "EvalResult", "track", "adam_params",
           "code_version", "error_text"]


class Recorder:
    """The one event writer of a run: appends at the expected version, so a second
    writer on the same run fails with ConcurrencyError instead of interleaving.

    ``defer=True`` lets an event wait (at most ``max_delay_s``) to be written in one
    transaction with the next one. Only StepCompleted uses it: a resume redoes every
    step after the last saved state, so a step lost in a crash is redone either way,
    while each intent and outcome is durable before the call that follows it.
    """

    def __init__(self, ledger: Ledger, run_id: str, version: int | None = None, *, max_delay_s: float = 1.0):
        self.ledger = ledger
        self.run_id = run_id
        self.version = ledger.stream_version(run_id) if version is None else version
        self.step = 0  # the training step the events being recorded belong to
        self.max_delay_s = max_delay_s
        self._pending: list[Any] = []
        self._pending_since = 0.0

    def record(self, type: str, *, defer: bool = False, **data: Any) -> RecordedEvent | None:
        """Append one event (with any deferred ones before it); None while it is deferred."""
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(new_event(type, **data))
        if defer and time.monotonic() - self._pending_since < self.max_delay_s:
            return None
        return self.flush()[-1]

    def flush(self) -> list[RecordedEvent]:
        if not self._pending:
            return []
        from firetitan_track.ledger import ConcurrencyError

        try:
            events = self.ledger.append(self.run_id, self._pending, expected_version=self.version)
        except ConcurrencyError:
            # An interrupt (Ctrl-C, SIGTERM) can land after a commit but before we saw it:
            # those events are ours, by id, and stand in the stream already.
            stored = self._own_events_already_stored()
            if stored is None:
                raise  # another writer: this one must stop
            events = stored + (self.ledger.append(self.run_id, self._pending, expected_version=self.version)
                               if self._pending else [])
        self._pending = []
        self.version = events[-1].version + 1
        return events

    def _own_events_already_stored(self) -> list[RecordedEvent] | None:
        stored = self.ledger.read(self.run_id, from_version=self.version)
        ids = [ev.event_id for ev in stored]
        if not ids or ids != [ev.event_id for ev in self._pending[:len(ids)]]:
            return None
        self._pending = self._pending[len(ids):]
        self.version += len(ids)
        return stored

    def put_json(self, obj: Any) -> str:
        return self.ledger.put_json(obj)


def adam_params(params: Any) -> Any:
    """The SDK's AdamParams from any AdamParams-like object or dict.

    The seed recipe passes Thinking Machines' ``tinker.AdamParams``, which
    fireworks-ai 1.2.30's optim_step rejects; the fields are the same. Before 1.2.25 the
    SDK had no class of its own and took tinker's (the cookbook's 1.2.24).
    """
    try:
        from fireworks.training.sdk import AdamParams
    except ImportError:
        from tinker.types import AdamParams

    if isinstance(params, AdamParams):
        return params
    if isinstance(params, dict):
        fields = params
    elif hasattr(params, "model_dump"):
        fields = params.model_dump()
    else:
        fields = vars(params)
    return AdamParams(**{k: v for k, v in fields.items() if k in AdamParams.model_fields and v is not None})


@dataclass
class EvalResult:
    eval_id: str
    score: float
    completions: list[dict[str, Any]]
    prompt_set_digest: str


class Resolved:
    """An already-finished future: tracked calls wait for the outcome so they can record it,
    and hand the SDK's result back in the shape the SDK does (``.result().path``)."""

    def __init__(self, value: Any):
        self._value = value

    def result(self, timeout: float | None = None) -> Any:
        return self._value


class _StepFuture:
    """optim_step's future; in a researcher's own loop its result is recorded as the step."""

    def __init__(self, future: Any, on_result: Callable[[Any], None]):
        self._future = future
        self._on_result: Callable[[Any], None] | None = on_result

    def result(self, timeout: float | None = None) -> Any:
        value = self._future.result(timeout)
        if self._on_result is not None:
            on_result, self._on_result = self._on_result, None
            on_result(value)
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._future, name)


class TrackedTrainingClient:
    """A FiretitanTrainingClient whose saves are recorded; everything else passes through.

    With ``auto_steps`` (a researcher's own loop) every optim_step is recorded as a
    StepCompleted with the micro-batches accumulated since the previous one; the
    caller records its steps itself, with the data cursor.
    """

    def __init__(self, client: Any, recorder: Recorder, *, lora_rank: int, trainer_job_id: str | None = None,
                 auto_steps: bool = False):
        self._client = client
        self._job_id = trainer_job_id
        self._rec = recorder
        self._lora_rank = lora_rank
        self._auto_steps = auto_steps
        self._micro_batches = 0
        self._base_path: str | None = None  # the base the next delta applies to (this session)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    @property
    def raw(self) -> Any:
        return self._client

    def forward_backward(self, *args: Any, **kwargs: Any) -> Any:
        self._micro_batches += 1
        return self._client.forward_backward(*args, **kwargs)

    def forward_backward_custom(self, *args: Any, **kwargs: Any) -> Any:
        self._micro_batches += 1
        return self._client.forward_backward_custom(*args, **kwargs)

    def optim_step(self, params: Any, *args: Any, **kwargs: Any) -> Any:
        adam = adam_params(params)
        future = self._client.optim_step(adam, *args, **kwargs)
        micro_batches, self._micro_batches = self._micro_batches, 0
        if not self._auto_steps:
            return future

        def record(response: Any) -> None:
            self._rec.step += 1
            metrics = {k: float(v) for k, v in (getattr(response, "metrics", None) or {}).items()
                       if isinstance(v, (int, float))}
            self._rec.record("StepCompleted", defer=True, step=self._rec.step, data_cursor=None,
                             micro_batches=micro_batches,
                             metrics=metrics, optimizer=adam.model_dump(exclude_none=True))

        return _StepFuture(future, record)

    def save_state(self, name: str, *args: Any, data_cursor: Any = None, **kwargs: Any) -> Resolved:
        """Save DCP state (weights + optimizer), recorded with the step and data cursor."""
        step = self._rec.step
        self._rec.record("StateSaveRequested", step=step, name=name, data_cursor=data_cursor)
        result = self._client.save_state(name, *args, **kwargs).result()
        self._rec.record("StateSaved", step=step, name=name, path=result.path, data_cursor=data_cursor,
                         trainer_job_id=self._job_id)
        return Resolved(result)

    def load_state_with_optimizer(self, path: str, *, source_job_id: str | None = None) -> Resolved:
        """Load DCP state; a state saved by another trainer job is named by a cross-job reference."""
        if source_job_id and source_job_id != self._job_id:
            path = self._client.resolve_checkpoint_path(path, source_job_id=source_job_id)
        return Resolved(self._client.load_state_with_optimizer(path).result())

    def save_weights_for_sampler(self, name: str, *args: Any, checkpoint_type: str | None = None,
                                 **kwargs: Any) -> Resolved:
        """Save a sampler snapshot: a full base first in a session, deltas against it after."""
        kind = checkpoint_type or ("base" if (self._base_path is None or self._lora_rank > 0) else "delta")
        step = self._rec.step
        self._rec.record("SnapshotRequested", step=step, name=name)
        result = self._client.save_weights_for_sampler(name, *args, checkpoint_type=kind, **kwargs).result()
        base_path = None if kind == "base" else self._base_path
        if kind == "base":
            self._base_path = result.path
        self._rec.record("SnapshotSaved", step=step, name=name, path=result.path, kind=kind, base_path=base_path)
        return Resolved(result)


class TrackedSampler:
    """A deployment sampler in a researcher's own loop: its samples are kept until
    ``TrackedService.log_score`` ties them, with their prompts, to a score."""

    def __init__(self, sampler: Any, pending: list[dict[str, Any]]):
        self._sampler = sampler
        self._pending = pending

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sampler, name)

    async def sample_with_tokens(self, messages: list[dict[str, str]], n: int = 1, max_tokens: int = 1024,
                                 temperature: float = 1.0, **kwargs: Any) -> Any:
        outs = await self._sampler.sample_with_tokens(messages=messages, n=n, max_tokens=max_tokens,
                                                      temperature=temperature, **kwargs)
        self._pending.append({"messages": messages, "sampling": {"n": n, "max_tokens": max_tokens,
                                                                 "temperature": temperature},
                              "completions": [{"text": c.text, "finish_reason": c.finish_reason,
                                               "completion_len": c.completion_len} for c in outs]})
        return outs


class TrackedService:
    """A FiretitanServiceClient whose provisioning, syncs, evals and cleanup are recorded."""

    def __init__(self, service: Any, recorder: Recorder, *, base_model: str, shape: str | None,
                 lora_rank: int, deployment_id: str | None, reused_trainer_job_id: str | None = None,
                 reused_deployment_id: str | None = None, base_url: str | None = None, auto_steps: bool = False,
                 owns_reattached: bool = False):
        self._service = service
        self._rec = recorder
        self._base_model = base_model
        self._shape = shape
        self._lora_rank = lora_rank
        self._deployment_id = deployment_id
        self._reused_trainer = reused_trainer_job_id
        self._reused_deployment = reused_deployment_id
        self._base_url = base_url
        self._owns_reattached = owns_reattached
        self._auto_steps = auto_steps  # a researcher's own loop: steps and samples recorded as they happen
        self._pending: list[dict[str, Any]] = []  # own-loop samples awaiting log_score
        self._synced: str | None = None  # the snapshot the deployment serves
        self._closed = False
        self.cleanup: dict[str, str] = {}  # what close() recorded

    def __getattr__(self, name: str) -> Any:
        return getattr(self._service, name)

    @property
    def raw(self) -> Any:
        return self._service

    # -- provisioning ------------------------------------------------------------

    def create_training_client(self, *args: Any, **kwargs: Any) -> TrackedTrainingClient:
        self._rec.record("ProvisionRequested", role="policy", base_model=self._base_model, shape=self._shape,
                         lora_rank=self._lora_rank, deployment_id=self._deployment_id,
                         trainer_job_id=self._reused_trainer, base_url=self._base_url)
        client = self._service.create_training_client(*args, **kwargs)
        job_id = self._service.trainer_job_id
        deployment_id = self._service.deployment_id
        if self._reused_trainer:
            self._rec.record("Reconnected", role="policy", trainer_job_id=job_id,
                             reused=job_id == self._reused_trainer, deployment_id=deployment_id)
        self._rec.record("TrainerProvisioned", role="policy", trainer_job_id=job_id, base_model=self._base_model,
                         shape=self._shape, lora_rank=self._lora_rank, created=job_id != self._reused_trainer)
        self._rec.record("DeploymentProvisioned", deployment_id=deployment_id, base_model=self._base_model,
                         created=deployment_id != self._reused_deployment)
        return TrackedTrainingClient(client, self._rec, lora_rank=self._lora_rank, trainer_job_id=job_id,
                                     auto_steps=self._auto_steps)

    def create_reference_client(self, *args: Any, **kwargs: Any) -> Any:
        self._rec.record("ProvisionRequested", role="reference", base_model=self._base_model, shape=self._shape,
                         lora_rank=0)
        client = self._service.create_reference_client(*args, **kwargs)
        # The SDK names a separate reference trainer; None means the reference reuses the
        # policy's session with its adapters disabled (a LoRA policy): no job of its own.
        job_id = self._service.reference_job_id
        if job_id is None:
            self._rec.record("ReferenceProvisioned", trainer_job_id=self._service.trainer_job_id,
                             shared_with_policy=True, created=False)
        else:
            self._rec.record("ReferenceProvisioned", trainer_job_id=job_id, shared_with_policy=False,
                             created=True)
        return client

    # -- weight sync ---------------------------------------------------------------

    def create_deployment_sampler(self, model_path: str | None = None, **kwargs: Any) -> Any:
        """Hot-load ``model_path`` onto the deployment (recorded as a sync) and return its sampler."""
        if model_path is None:
            return self._own_loop(self._service.create_deployment_sampler(**kwargs))
        step = self._rec.step
        self._rec.record("SyncRequested", step=step, deployment_id=self._service.deployment_id,
                         snapshot_path=model_path)
        t0 = time.perf_counter()
        sampler = self._service.create_deployment_sampler(model_path=model_path, **kwargs)
        self._rec.record("WeightsSynced", step=step, deployment_id=self._service.deployment_id,
                         snapshot_path=model_path, duration_s=round(time.perf_counter() - t0, 6))
        self._synced = model_path
        return self._own_loop(sampler)

    def _own_loop(self, sampler: Any) -> Any:
        return TrackedSampler(sampler, self._pending) if self._auto_steps else sampler

    # -- evaluation --------------------------------------------------------------------

    async def evaluate(self, sampler: Any, prompts: Sequence[Any], *, snapshot_path: str | None,
                       sampling: dict[str, Any], grade: Callable[[Any, str], float],
                       controller: Any = None) -> EvalResult:
        """Sample every prompt through the deployment, grade, and record the eval.

        ``prompts`` are objects with ``chat()`` (the messages) and ``to_json()`` (the stored form);
        the exact prompt set is stored as a blob and the score is tied to it and to
        ``snapshot_path``.
        """
        eval_id = self._eval_started([p.to_json() for p in prompts], snapshot_path, sampling)

        async def one(i: int, p: Any) -> list[dict[str, Any]]:
            outs = await sampler.sample_with_tokens(messages=p.chat(), n=sampling["n"],
                                                    max_tokens=sampling["max_tokens"],
                                                    temperature=sampling["temperature"])
            return [{"prompt": i, "text": c.text, "finish_reason": c.finish_reason,
                     "completion_len": c.completion_len, "score": grade(p, c.text)} for c in outs]

        groups: list[list[dict[str, Any]]] = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        completions = [c for g in groups for c in g]
        server = controller.step_completed() if controller is not None and hasattr(controller, "step_completed") else {}
        score = sum(c["score"] for c in completions) / max(1, len(completions))
        self._eval_finished(eval_id, completions, score, server, getattr(controller, "window_size", None),
                            {"completions": len(completions), "correct": sum(c["score"] for c in completions)})
        return EvalResult(eval_id, score, completions, self._eval_digest)

    def log_score(self, score: float, metrics: dict[str, float] | None = None) -> str:
        """Own loop: tie ``score`` to the samples drawn since the last score (their prompts
        become the eval's prompt set) and to the snapshot the deployment serves."""
        pending, self._pending[:] = list(self._pending), []
        sampling = pending[0]["sampling"] if pending else {}
        eval_id = self._eval_started([{"messages": p["messages"]} for p in pending], self._synced, sampling)
        completions = [{"prompt": i, **c} for i, p in enumerate(pending) for c in p["completions"]]
        self._eval_finished(eval_id, completions, float(score), {}, None, dict(metrics or {}))
        return eval_id

    def _eval_started(self, prompt_set: list[Any], snapshot_path: str | None, sampling: dict[str, Any]) -> str:
        self._eval_digest = self._rec.put_json(prompt_set)
        self._eval_snapshot = snapshot_path
        eval_id = uuid.uuid4().hex[:12]
        self._rec.record("EvalStarted", eval_id=eval_id, step=self._rec.step, snapshot_path=snapshot_path,
                         prompt_set_digest=self._eval_digest, prompt_count=len(prompt_set), sampling=dict(sampling))
        return eval_id

    def _eval_finished(self, eval_id: str, completions: list[dict[str, Any]], score: float,
                       server_metrics: dict[str, Any], window: Any, metrics: dict[str, Any]) -> None:
        self._rec.record("SamplesRecorded", eval_id=eval_id, completions_digest=self._rec.put_json(completions),
                         server_metrics={k: float(v) for k, v in (server_metrics or {}).items()},
                         concurrency_window=window)
        self._rec.record("EvalScored", eval_id=eval_id, step=self._rec.step, snapshot_path=self._eval_snapshot,
                         prompt_set_digest=self._eval_digest, score=score, metrics=metrics)

    # -- cleanup --------------------------------------------------------------------------

    def close(self, *, backend_lost: str | None = None) -> dict[str, str]:
        """Apply the cleanup policies and record what was confirmed done.

        The SDK's close cleans up only what this session created. A run that reattached
        to its own trainer or deployment (``owns_reattached``: a loop continuing
        after a crash) applies the same policy to those too, so a finished run leaves what
        its spec says however many attempts it took.

        The SDK's delete and scale-to-zero log a failure and carry on, so each action
        is confirmed by asking the service afterwards: ``failed`` when the resource is
        still there, ``unknown`` when the service cannot say. ``backend_lost`` (the
        service stopped answering) skips the attempt: each SDK call would retry for
        minutes, and nothing could be confirmed. Returns what was recorded.
        """
        if self._closed:
            return self.cleanup
        self._closed = True
        handle = getattr(self._service, "_managed_handle", None)
        wanted = cleanup_policy(getattr(self._service, "_managed_config", None))
        done = {"trainer": "kept", "deployment": "kept"}
        errors: list[str] = []
        try:
            if backend_lost is not None:
                done = _unconfirmed(wanted)
                errors.append(f"not attempted: {backend_lost}")
                return done
            if handle is not None:  # what the SDK's close will do
                done = cleanup_policy(handle)

            def attempt() -> dict[str, str]:
                self._service.close()
                if handle is not None and self._owns_reattached:
                    return _clean_reattached(handle, wanted, done)
                return done

            try:
                done = _bounded(attempt, CLEANUP_TIMEOUT_S)
            except BaseException as exc:  # recorded, then raised: the run's failure names it too
                errors.append(redact_text(f"{type(exc).__name__}: {exc}") if isinstance(exc, Exception)
                              else "interrupted while cleaning up")
                # whatever was attempted may or may not have happened
                attempted = {k: done[k] if done[k] != "kept" or not self._owns_reattached else wanted[k]
                             for k in done}
                if isinstance(exc, Exception) and not isinstance(exc, TimeoutError) and handle is not None:
                    done, unconfirmed = _confirmed(handle, attempted)  # the service still answers: ask it
                    errors += unconfirmed
                else:
                    done = _unconfirmed(attempted)
                raise
            if handle is not None:
                done, unconfirmed = _confirmed(handle, done)
                errors += unconfirmed
            return done
        finally:
            self.cleanup = done
            self._rec.record("CleanupApplied", **done, **({"error": "; ".join(errors)} if errors else {}))


def _unconfirmed(actions: dict[str, str]) -> dict[str, str]:
    """What a cleanup that could not be confirmed records: ``unknown`` for each action
    meant to happen (kept stays kept)."""
    return {k: "kept" if v == "kept" else "unknown" for k, v in actions.items()}


CLEANUP_TIMEOUT_S = 60.0  # the SDK's own calls retry for up to 5 minutes each
CONFIRM_TIMEOUT_S = 20.0
_GONE_JOB_STATES = ("JOB_STATE_DELETED", "JOB_STATE_DELETING")


def _bounded(fn: Callable[[], Any], timeout_s: float) -> Any:
    """``fn()`` in a daemon thread, given up on (TimeoutError) after ``timeout_s``: a call
    to a service that stopped answering must not hold the run's stop for minutes."""
    import threading

    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    worker = threading.Thread(target=run, name="firetitan-cleanup", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"no answer from the service within {timeout_s:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _confirmed(handle: Any, done: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """``done`` as the service confirms it: an action whose resource is still there is
    ``failed``; one the service cannot confirm is ``unknown``. Also the reasons."""
    out, why = dict(done), []
    job_id = getattr(getattr(handle, "trainer_endpoint", None), "job_id", None)
    if done["trainer"] == "deleted" and job_id and handle.trainer_manager is not None:
        try:
            job = _bounded(lambda: handle.trainer_manager.try_get(job_id), CONFIRM_TIMEOUT_S)
            state = str(job.get("state", "")) if isinstance(job, dict) else ""
            if job is not None and state not in _GONE_JOB_STATES:
                out["trainer"] = "failed"
                why.append(f"trainer {job_id} is still {state or 'there'} after its delete")
        except Exception as exc:
            out["trainer"] = "unknown"
            why.append(redact_text(f"trainer {job_id} delete unconfirmed: {type(exc).__name__}: {exc}"))
    deployment = getattr(handle, "deployment", None)
    if done["deployment"] in ("scaled_to_zero", "deleted") and deployment is not None \
            and handle.deployment_manager is not None:
        dep_id = deployment.deployment_id
        try:
            # the raw record: DeploymentInfo does not carry the replica counts
            record = _bounded(lambda: handle.deployment_manager._get_deployment(dep_id), CONFIRM_TIMEOUT_S)
            if record is None:
                out["deployment"] = "deleted"
            elif int(record.get("maxReplicaCount", 1) or 0) == 0:
                out["deployment"] = "scaled_to_zero"
            else:
                out["deployment"] = "failed"
                why.append(f"deployment {dep_id} still allows {record.get('maxReplicaCount')} replica(s) "
                           f"after its {done['deployment'].replace('_', ' ')}")
        except Exception as exc:
            out["deployment"] = "unknown"
            why.append(redact_text(f"deployment {dep_id} {done['deployment']} unconfirmed: "
                                   f"{type(exc).__name__}: {exc}"))
    return out, why


def cleanup_policy(config: Any) -> dict[str, str]:
    """A provisioning config's (or the SDK handle's) cleanup flags, in the ledger's words."""
    trainer = "deleted" if getattr(config, "cleanup_trainer_on_close", False) else "kept"
    deployment = {"scale_to_zero": "scaled_to_zero", "delete": "deleted"}.get(
        str(getattr(config, "cleanup_deployment_on_close", None) or ""), "kept")
    return {"trainer": trainer, "deployment": deployment}


def _clean_reattached(handle: Any, wanted: dict[str, str], done: dict[str, str]) -> dict[str, str]:
    done = dict(done)
    if wanted["trainer"] == "deleted" and done["trainer"] == "kept" and handle.trainer_manager is not None:
        handle.trainer_manager.delete(handle.trainer_endpoint.job_id)
        done["trainer"] = "deleted"
    deployment = getattr(handle, "deployment", None)
    if wanted["deployment"] != "kept" and done["deployment"] == "kept" and deployment is not None \
            and handle.deployment_manager is not None:
        if wanted["deployment"] == "scaled_to_zero":
            handle.deployment_manager.scale_to_zero(deployment.deployment_id)
        else:
            handle.deployment_manager.delete(deployment.deployment_id)
        done["deployment"] = wanted["deployment"]
    return done


def track(service: Any, *, run_id: str | None = None, ledger_url: str | None = None, spec: dict | None = None,
          seed: int = 0, backend: str = "fireworks") -> TrackedService:
    """Record a researcher's own loop: wrap the service, start (or continue) a ledger run."""
    import dataclasses
    import json

    from firetitan_track.ledger import Ledger, default_ledger_url
    from firetitan_track.redact import redact

    ledger = Ledger.open(ledger_url or default_ledger_url())
    rid = run_id or f"run-{uuid.uuid4().hex[:10]}"
    rec = Recorder(ledger, rid)
    cfg = getattr(service, "_managed_config", None)
    if rec.version == 0:
        if spec is None and dataclasses.is_dataclass(cfg):
            spec = {"provisioning": dataclasses.asdict(cfg)}  # what the service was built from
        body = redact(json.loads(json.dumps(spec or {}, default=str)))
        from firetitan_track.code_identity import program_identity

        rec.record("RunStarted", spec=body, spec_digest=rec.put_json(body), code_version=code_version(),
                   code=program_identity(ledger.put_blob), seed=seed, backend=backend)
    return TrackedService(service, rec, base_model=getattr(cfg, "base_model", ""),
                          shape=getattr(cfg, "training_shape_id", None), lora_rank=getattr(cfg, "lora_rank", 0),
                          deployment_id=getattr(cfg, "deployment_id", None), auto_steps=True,
                          base_url=getattr(service, "_managed_base_url", None))


def code_version() -> str:
    """The installed firetitan-track version, recorded in RunStarted."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("firetitan-track")
    except PackageNotFoundError:
        return "unknown"


def error_text(exc: BaseException) -> str:
    return redact_text(f"{type(exc).__name__}: {exc}")


_code_version = code_version  # the earlier private name
