"""Recording SDK calls into a run: the event writer, what each consequential call records,
and TrackedService, the FireTitan SDK service with every such call recorded.

Provisioning, DCP saves, sampler snapshots, weight syncs, evals and cleanup each append
an intent event before the SDK call and an outcome event after it, so a crash between the
two is visible in the ledger. :class:`CallRecorder` is the one place that says what each
call records; two kinds of wrapper go through it:

- :class:`TrackedService` wraps one service instance: the runner's loop, and a
  researcher's own loop with two added lines::

      from firetitan_track import track
      service = track(FiretitanServiceClient.from_firetitan_config(...), run_id="my-run")

- the class-level wrappers of ``firetitan_track.recording`` (``firetitan-track record --
  COMMAND``, ``autolog()``), which record programs that build their service where no
  instance can be wrapped (the cookbook's recipes).

Whatever these need of the SDK beyond its public API is in ``sdk_adapter``. The SDK is
imported lazily: this module stays importable without torch.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass
from typing import (TYPE_CHECKING, Any, Awaitable, Callable, Generic, Mapping, Protocol, Sequence, TypedDict, TypeVar,
                    overload)

from firetitan_track import sdk_adapter
from firetitan_track.events import (CallFailed, CleanupAction, CleanupApplied, CleanupOutcome, DeploymentProvisioned,
                                    EvalScored, EvalStarted, Event, NewEvent, ProvisionRequested, Reconnected,
                                    RecordedEvent, ReferenceProvisioned, RunStarted, SamplesRecorded,
                                    SnapshotRequested, SnapshotSaved, StateSaved, StateSaveRequested, StepCompleted,
                                    SyncRequested, TrainerProvisioned, WeightsSynced, new_event)
from firetitan_track.ledger import Ledger
from firetitan_track.redact import redact_text

if TYPE_CHECKING:
    import tinker
    from fireworks.training.sdk import (APIFuture, DeploymentSampler, FiretitanServiceClient, FiretitanTrainingClient,
                                        ForwardBackwardOutput, SampledCompletion)

    from firetitan_track.blobs import Json

__all__ = ["Recorder", "CallRecorder", "TrackedService", "TrackedTrainingClient", "EvalResult", "track",
           "adam_params", "code_version", "error_text", "close_and_confirm", "cleanup_policy", "clean_up",
           "Cleanup"]

adam_params = sdk_adapter.adam_params  # the seed's tinker.AdamParams, as the installed SDK takes it

# The SDK is imported here only for its types (under TYPE_CHECKING): the wrappers name the SDK's
# public classes they wrap. Any stays where a value is the SDK's business and differs with how the
# wrapper is used: arguments forwarded to the SDK as given, attributes passed through
# (``__getattr__``), optim_step's untyped future, a sampler that is the SDK's or a TrackedSampler
# (a researcher's own loop), and the cleanup handles (the SDK's or one built for a failed
# provisioning, read by duck typing).

T = TypeVar("T")


class Saved(Protocol):
    """What an SDK save (sampler snapshot, DCP state) gives back: where it put what it saved."""

    @property
    def path(self) -> str: ...


S = TypeVar("S", bound=Saved)


class EvalPrompt(Protocol):
    """What ``TrackedService.evaluate`` needs of a prompt: its messages, and the form the prompt set stores."""

    def chat(self) -> list[dict[str, str]]: ...

    def to_json(self) -> object: ...


P = TypeVar("P", bound=EvalPrompt)


class OwnSample(TypedDict):
    """A sampling call in a researcher's own loop, kept until ``log_score`` ties it to a score."""

    messages: list[dict[str, str]]
    sampling: dict[str, object]  # n, max_tokens, temperature
    completions: list[dict[str, object]]  # text, finish_reason, completion_len


class Recorder:
    """The one event writer of a run: appends at the expected version, so a second
    writer on the same run fails with ConcurrencyError instead of interleaving.

    ``defer=True`` lets an event wait (at most ``max_delay_s``) to be written in one
    transaction with the next one. The runner defers only StepCompleted: a resume redoes
    every step after the last saved state, so a step lost in a crash is redone either way,
    while each intent and outcome is durable before the call that follows it.

    ``interleave=True`` is for the processes of one recorded program (a trainer, its
    rollout workers, a subprocess), which write to one run at once: their events are
    facts about separate calls, each process's in its own order, so an append that finds
    the stream moved on (ConcurrencyError) re-reads the head, keeps what of its own is
    already stored (by event id) and appends the rest after it. The stream then holds
    every process's events in commit order. Appends are serialised by a lock, so the
    program's threads can share one Recorder.
    """

    def __init__(self, ledger: Ledger, run_id: str, version: int | None = None, *, max_delay_s: float = 1.0,
                 interleave: bool = False):
        self.ledger = ledger
        self.run_id = run_id
        self.version = ledger.stream_version(run_id) if version is None else version
        self.step = 0  # the training step the events being recorded belong to
        self.max_delay_s = max_delay_s
        self.interleave = interleave
        self.lock = threading.RLock()
        self._pending: list[NewEvent] = []
        self._pending_since = 0.0

    def record(self, event: Event, *, defer: bool = False, event_id: str | None = None) -> RecordedEvent | None:
        """Append one event (with any deferred ones before it); None while it is deferred. ``event_id``:
        one chosen before (a fact other records name before it is written)."""
        new = new_event(event, event_id=event_id)
        with self.lock:
            wait = defer and self.defers_now()
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.append(new)
            return None if wait else self.flush()[-1]

    def defers_now(self) -> bool:
        """Whether an event recorded now with ``defer=True`` waits (``record`` returns None)
        rather than being written with what waits before it: nothing waits yet, or what
        waits has waited less than ``max_delay_s``."""
        with self.lock:
            waited = time.monotonic() - self._pending_since if self._pending else 0.0
            return waited < self.max_delay_s

    def flush(self) -> list[RecordedEvent]:
        with self.lock:
            if not self._pending:
                return []
            from firetitan_track.ledger import ConcurrencyError

            try:
                events = self.ledger.append(self.run_id, self._pending, expected_version=self.version)
            except ConcurrencyError:
                if self.interleave:
                    events = self._append_after_others()
                else:
                    # An interrupt (Ctrl-C, SIGTERM) can land after a commit but before we saw it:
                    # those events are ours, by id, and stand in the stream already.
                    stored = self._own_events_already_stored()
                    if stored is None:
                        raise  # another writer: this one must stop
                    events = stored + (self.ledger.append(self.run_id, self._pending, expected_version=self.version)
                                       if self._pending else [])
            self._pending = []
            self.version = max(self.version, events[-1].version + 1)
            return events

    def _own_events_already_stored(self) -> list[RecordedEvent] | None:
        stored = self.ledger.read(self.run_id, from_version=self.version)
        ids = [ev.event_id for ev in stored]
        if not ids or ids != [ev.event_id for ev in self._pending[:len(ids)]]:
            return None
        self._pending = self._pending[len(ids):]
        self.version += len(ids)
        return stored

    def _append_after_others(self, attempts: int = 50) -> list[RecordedEvent]:
        from firetitan_track.ledger import ConcurrencyError

        ours: list[RecordedEvent] = []
        for _ in range(attempts):
            stored = self.ledger.read(self.run_id, from_version=self.version)
            mine = {ev.event_id for ev in self._pending}
            ours += [ev for ev in stored if ev.event_id in mine]
            self._pending = [ev for ev in self._pending if ev.event_id not in {s.event_id for s in stored}]
            self.version = stored[-1].version + 1 if stored else self.version
            if not self._pending:
                return ours
            try:
                return ours + self.ledger.append(self.run_id, self._pending, expected_version=self.version)
            except ConcurrencyError:
                continue  # yet another writer got in first: read the head again
        raise ConcurrencyError(self.run_id, self.version, self.ledger.stream_version(self.run_id))

    def put_json(self, obj: object) -> str:
        return self.ledger.put_json(obj)

    def queue(self, events: Sequence[NewEvent]) -> None:
        """Events built elsewhere (``new_event``), to be written before the next one recorded."""
        with self.lock:
            if events and not self._pending:
                self._pending_since = time.monotonic()
            self._pending.extend(events)


class CallRecorder:
    """What each consequential SDK call records: an intent before it, the outcome after.

    ``TrackedService`` and the class-level wrappers of recorded programs call these with the
    SDK call itself (``call``), so a service, trainer, snapshot, sync, state or cleanup reads
    the same in the ledger however the program was recorded. Also keeps what the deployments
    serve: the snapshot each one has loaded and how many weight versions were published to
    it (syncs and hotloads), which samples and program metrics are tied to.

    ``record_failures``: a call that raises after its intent records CallFailed (recorded
    programs; the runner records its run's failure itself).
    """

    def __init__(self, rec: Recorder, *, record_failures: bool = False):
        self.rec = rec
        self.record_failures = record_failures
        self.loaded: dict[str, str | None] = {}  # deployment -> snapshot path it serves
        self.published: dict[str, int] = {}  # deployment -> weight versions published to it

    def _call(self, intent: type[Event], name: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except Exception as exc:
            if self.record_failures:
                self.rec.record(CallFailed(call=name, intent=intent.type_name, error=error_text(exc),
                                           step=self.rec.step))
            raise

    # -- provisioning ----------------------------------------------------------------------

    def provision_policy(self, service: object, call: Callable[[], T], *, base_model: str, shape: str | None,
                         lora_rank: int, deployment_id: str | None, reused_trainer: str | None = None,
                         deployment_created: Callable[[str], bool | None] | None = None,
                         base_url: str | None = None, sdk: dict[str, str] | None = None) -> T:
        """A policy trainer (and the deployment the service brings): ProvisionRequested, then
        Reconnected (when reattaching), TrainerProvisioned and DeploymentProvisioned.
        ``deployment_created(id)`` says whether the deployment is new; without it the SDK is
        asked (None when it cannot say). ``sdk``: a recorded program's SDK releases."""
        self.rec.record(ProvisionRequested(role="policy", base_model=base_model, shape=shape, lora_rank=lora_rank,
                                           deployment_id=deployment_id, trainer_job_id=reused_trainer,
                                           base_url=base_url, sdk=sdk))
        client = self._call(ProvisionRequested, "create_training_client", call)
        job_id = sdk_adapter.trainer_job_id(service)
        deployment = sdk_adapter.deployment_id(service)
        if reused_trainer:
            self.rec.record(Reconnected(role="policy", trainer_job_id=job_id, reused=job_id == reused_trainer,
                                        deployment_id=deployment))
        self.rec.record(TrainerProvisioned(role="policy", trainer_job_id=job_id, base_model=base_model, shape=shape,
                                           lora_rank=lora_rank, created=job_id != reused_trainer))
        if deployment is not None:
            if deployment_created is not None:
                created = deployment_created(deployment)
            else:
                reattached = sdk_adapter.deployment_reattached(service)
                created = None if reattached is None else not reattached
            self.rec.record(DeploymentProvisioned(deployment_id=deployment, base_model=base_model, created=created))
            self.loaded.setdefault(deployment, None)
        return client

    def provision_reference(self, service: object, call: Callable[[], T], *, base_model: str,
                            shape: str | None) -> T:
        """A frozen reference: the SDK names a separate reference trainer, or None when the
        reference is the policy's own session with its adapters disabled (a LoRA policy)."""
        self.rec.record(ProvisionRequested(role="reference", base_model=base_model, shape=shape, lora_rank=0))
        client = self._call(ProvisionRequested, "create_reference_client", call)
        job_id = sdk_adapter.reference_job_id(service)
        if job_id is None:
            self.rec.record(ReferenceProvisioned(trainer_job_id=sdk_adapter.trainer_job_id(service),
                                                 shared_with_policy=True, created=False))
        else:
            self.rec.record(ReferenceProvisioned(trainer_job_id=job_id, shared_with_policy=False, created=True))
        return client

    def provision_teacher(self, call: Callable[[], T], *, model: str, deployment: str | None,
                          creates: bool | None) -> T:
        """A deployment the program samples from without training it (a distillation teacher)."""
        self.rec.record(ProvisionRequested(role="teacher", base_model=model, shape=None, lora_rank=0,
                                           deployment_id=deployment))
        sampler = self._call(ProvisionRequested, "create_inference_deployment_sampler", call)
        self.rec.record(DeploymentProvisioned(deployment_id=deployment or model, base_model=model, created=creates,
                                              role="teacher"))
        return sampler

    # -- weights ---------------------------------------------------------------------------

    def snapshot(self, call: Callable[[], S], *, name: str, kind: str | None, base_path: str | None) -> S:
        """A sampler snapshot: SnapshotRequested, the save, SnapshotSaved (base or delta, and
        the base a delta applies to). ``call`` returns the SDK's result (``.path``)."""
        intent = self.snapshot_requested(name=name)
        result = self._call(SnapshotRequested, "save_weights_for_sampler", call)
        self.snapshot_saved(intent, path=result.path, kind=kind, base_path=base_path)
        return result

    def snapshot_requested(self, *, name: str) -> SnapshotRequested:
        """The intent half of ``snapshot``, for a save whose outcome arrives later (a future)."""
        intent = SnapshotRequested(step=self.rec.step, name=name)
        self.rec.record(intent)
        return intent

    def snapshot_saved(self, intent: SnapshotRequested, *, path: str, kind: str | None, base_path: str | None) -> None:
        self.rec.record(SnapshotSaved(step=intent.step, name=intent.name, path=path, kind=kind,
                                      base_path=None if kind == "base" else base_path))

    def sync(self, call: Callable[[], T], *, deployment_id: str | None, snapshot_path: str) -> T:
        """A weight sync (hotload) onto a deployment: SyncRequested, the call, WeightsSynced. The
        deployment then serves the snapshot, one more weight version published to it."""
        pending = self.sync_requested(deployment_id=deployment_id, snapshot_path=snapshot_path)
        result = self._call(SyncRequested, "hotload", call)
        if result is False:  # the SDK's hotload_and_wait answers False when the deployment never took it
            if self.record_failures:
                self.rec.record(CallFailed(call="hotload", intent=SyncRequested.type_name, step=pending.intent.step,
                                           error=f"the deployment did not load {snapshot_path}"))
            return result
        self.synced(pending)
        return result

    def sync_requested(self, *, deployment_id: str | None, snapshot_path: str) -> PendingSync:
        """The intent half of ``sync``, for a sync whose outcome arrives later (a Tinker sampling
        client made on saved weights)."""
        intent = SyncRequested(step=self.rec.step, deployment_id=deployment_id, snapshot_path=snapshot_path)
        self.rec.record(intent)
        return PendingSync(intent, time.perf_counter())

    def synced(self, pending: PendingSync) -> int:
        """WeightsSynced: the deployment serves the snapshot, one more weight version published to
        it; returns that version."""
        intent = pending.intent
        self.rec.record(WeightsSynced(step=intent.step, deployment_id=intent.deployment_id,
                                      snapshot_path=intent.snapshot_path,
                                      duration_s=round(time.perf_counter() - pending.t0, 6)))
        key = intent.deployment_id or ""
        self.loaded[key] = intent.snapshot_path
        self.published[key] = self.published.get(key, 0) + 1
        return self.published[key]

    def save_state(self, call: Callable[[], S], *, name: str, data_cursor: Json,
                   trainer_job_id: str | None) -> S:
        """DCP state (weights + optimizer): StateSaveRequested, the save, StateSaved."""
        intent = self.state_save_requested(name=name, data_cursor=data_cursor)
        result = self._call(StateSaveRequested, "save_state", call)
        self.state_saved(intent, path=result.path, trainer_job_id=trainer_job_id)
        return result

    def state_save_requested(self, *, name: str, data_cursor: Json) -> StateSaveRequested:
        """The intent half of ``save_state``, for a save whose outcome arrives later (a future)."""
        intent = StateSaveRequested(step=self.rec.step, name=name, data_cursor=data_cursor)
        self.rec.record(intent)
        return intent

    def state_saved(self, intent: StateSaveRequested, *, path: str, trainer_job_id: str | None) -> None:
        self.rec.record(StateSaved(step=intent.step, name=intent.name, path=path, data_cursor=intent.data_cursor,
                                   trainer_job_id=trainer_job_id))


@dataclass(frozen=True)
class PendingSync:
    """A sync whose intent is recorded: WeightsSynced follows with the time since ``t0``."""

    intent: SyncRequested
    t0: float  # time.perf_counter() when the sync was asked for


def error_text(exc: BaseException) -> str:
    return redact_text(f"{type(exc).__name__}: {exc}")


@dataclass
class EvalResult:
    eval_id: str
    score: float
    completions: list[dict[str, Any]]
    prompt_set_digest: str


class Resolved(Generic[T]):
    """An already-finished future: tracked calls wait for the outcome so they can record it,
    and hand the SDK's result back in the shape the SDK does (``.result().path``)."""

    def __init__(self, value: T):
        self._value = value

    def result(self, timeout: float | None = None) -> T:
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


def numeric(metrics: Mapping[str, object] | None) -> dict[str, float]:
    """The finite-or-not numbers of an SDK metrics dict (others left out, none invented)."""
    return {str(k): float(v) for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TrackedTrainingClient:
    """A FiretitanTrainingClient whose saves are recorded; everything else passes through.

    With ``auto_steps`` (a researcher's own loop) every optim_step is recorded as a
    StepCompleted with the micro-batches accumulated since the previous one; the
    caller records its steps itself, with the data cursor.
    """

    def __init__(self, client: FiretitanTrainingClient, calls: CallRecorder, *, lora_rank: int,
                 trainer_job_id: str | None = None, auto_steps: bool = False):
        self._client = client
        self._job_id = trainer_job_id
        self._calls = calls
        self._rec = calls.rec
        self._lora_rank = lora_rank
        self._auto_steps = auto_steps
        self._micro_batches = 0
        self._base_path: str | None = None  # the base the next delta applies to (this session)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    @property
    def raw(self) -> FiretitanTrainingClient:
        return self._client

    def forward_backward(self, *args: Any, **kwargs: Any) -> APIFuture[ForwardBackwardOutput]:
        self._micro_batches += 1
        return self._client.forward_backward(*args, **kwargs)

    def forward_backward_custom(self, *args: Any, **kwargs: Any) -> APIFuture[ForwardBackwardOutput]:
        self._micro_batches += 1
        return self._client.forward_backward_custom(*args, **kwargs)

    def optim_step(self, params: object, *args: Any, **kwargs: Any) -> Any:
        adam = adam_params(params)
        future = self._client.optim_step(adam, *args, **kwargs)
        micro_batches, self._micro_batches = self._micro_batches, 0
        if not self._auto_steps:
            return future

        def record(response: object) -> None:
            self._rec.step += 1
            self._rec.record(StepCompleted(step=self._rec.step, data_cursor=None, micro_batches=micro_batches,
                                           metrics=numeric(getattr(response, "metrics", None)),
                                           optimizer=adam.model_dump(exclude_none=True)), defer=True)

        return _StepFuture(future, record)

    def save_state(self, name: str, *args: Any, data_cursor: Json = None, **kwargs: Any) -> Resolved:
        """Save DCP state (weights + optimizer), recorded with the step and data cursor."""
        return Resolved(self._calls.save_state(lambda: self._client.save_state(name, *args, **kwargs).result(),
                                               name=name, data_cursor=data_cursor, trainer_job_id=self._job_id))

    def load_state_with_optimizer(self, path: str, *, source_job_id: str | None = None) -> Resolved:
        """Load DCP state; a state saved by another trainer job is named by a cross-job reference."""
        if source_job_id and source_job_id != self._job_id:
            path = self._client.resolve_checkpoint_path(path, source_job_id=source_job_id)
        return Resolved(self._client.load_state_with_optimizer(path).result())

    def save_weights_for_sampler(self, name: str, *args: Any, checkpoint_type: str | None = None,
                                 **kwargs: Any) -> Resolved:
        """Save a sampler snapshot: a full base first in a session, deltas against it after."""
        kind = checkpoint_type or ("base" if (self._base_path is None or self._lora_rank > 0) else "delta")
        result = self._calls.snapshot(
            lambda: self._client.save_weights_for_sampler(name, *args, checkpoint_type=kind, **kwargs).result(),
            name=name, kind=kind, base_path=self._base_path)
        if kind == "base":
            self._base_path = result.path
        return Resolved(result)


class TrackedSampler:
    """A deployment sampler in a researcher's own loop: its samples are kept until
    ``TrackedService.log_score`` ties them, with their prompts, to a score."""

    def __init__(self, sampler: DeploymentSampler, pending: list[OwnSample]):
        self._sampler = sampler
        self._pending = pending

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sampler, name)

    async def sample_with_tokens(self, messages: list[dict[str, str]], n: int = 1, max_tokens: int = 1024,
                                 temperature: float = 1.0, **kwargs: Any) -> list[SampledCompletion]:
        outs = await self._sampler.sample_with_tokens(messages=messages, n=n, max_tokens=max_tokens,
                                                      temperature=temperature, **kwargs)
        self._pending.append({"messages": messages, "sampling": {"n": n, "max_tokens": max_tokens,
                                                                 "temperature": temperature},
                              "completions": [{"text": c.text, "finish_reason": c.finish_reason,
                                               "completion_len": c.completion_len} for c in outs]})
        return outs


class TrackedService:
    """A FiretitanServiceClient whose provisioning, syncs, evals and cleanup are recorded."""

    def __init__(self, service: FiretitanServiceClient, recorder: Recorder, *, base_model: str, shape: str | None,
                 lora_rank: int, deployment_id: str | None, reused_trainer_job_id: str | None = None,
                 reused_deployment_id: str | None = None, base_url: str | None = None, auto_steps: bool = False,
                 owns_reattached: bool = False):
        self._service = service
        self._rec = recorder
        self._calls = CallRecorder(recorder)
        self._base_model = base_model
        self._shape = shape
        self._lora_rank = lora_rank
        self._deployment_id = deployment_id
        self._reused_trainer = reused_trainer_job_id
        self._reused_deployment = reused_deployment_id
        self._base_url = base_url
        self._owns_reattached = owns_reattached
        self._auto_steps = auto_steps  # a researcher's own loop: steps and samples recorded as they happen
        self._pending: list[OwnSample] = []  # own-loop samples awaiting log_score
        self._closed = False
        self.cleanup: Cleanup = {}  # what close() recorded

    def __getattr__(self, name: str) -> Any:
        return getattr(self._service, name)

    @property
    def raw(self) -> FiretitanServiceClient:
        return self._service

    # -- provisioning ------------------------------------------------------------

    def create_training_client(self, *args: Any, **kwargs: Any) -> TrackedTrainingClient:
        client = self._calls.provision_policy(
            self._service, lambda: self._service.create_training_client(*args, **kwargs),
            base_model=self._base_model, shape=self._shape, lora_rank=self._lora_rank,
            deployment_id=self._deployment_id, reused_trainer=self._reused_trainer,
            deployment_created=lambda deployment: deployment != self._reused_deployment, base_url=self._base_url)
        return TrackedTrainingClient(client, self._calls, lora_rank=self._lora_rank,
                                     trainer_job_id=self._service.trainer_job_id, auto_steps=self._auto_steps)

    def create_reference_client(self, *args: Any, **kwargs: Any) -> FiretitanTrainingClient:
        return self._calls.provision_reference(
            self._service, lambda: self._service.create_reference_client(*args, **kwargs),
            base_model=self._base_model, shape=self._shape)

    # -- weight sync ---------------------------------------------------------------

    def create_deployment_sampler(self, model_path: str | None = None, **kwargs: Any) -> Any:
        """Hot-load ``model_path`` onto the deployment (recorded as a sync) and return its sampler."""
        if model_path is None:
            return self._own_loop(self._service.create_deployment_sampler(**kwargs))
        sampler = self._calls.sync(lambda: self._service.create_deployment_sampler(model_path=model_path, **kwargs),
                                   deployment_id=self._service.deployment_id, snapshot_path=model_path)
        return self._own_loop(sampler)

    def _own_loop(self, sampler: DeploymentSampler) -> Any:
        return TrackedSampler(sampler, self._pending) if self._auto_steps else sampler

    @property
    def _synced(self) -> str | None:
        """The snapshot the deployment serves."""
        return self._calls.loaded.get(self._service.deployment_id)

    # -- evaluation --------------------------------------------------------------------

    async def evaluate(self, sampler: Any, prompts: Sequence[P], *, snapshot_path: str | None,
                       sampling: dict[str, Any], grade: Callable[[P, str], float], controller: object = None,
                       play: Callable[[Any, int, P, dict[str, Any]], Awaitable[list[dict[str, Any]]]] | None = None,
                       ) -> EvalResult:
        """Sample every prompt through the deployment, grade, and record the eval.

        ``prompts`` are objects with ``chat()`` (the messages) and ``to_json()`` (the stored form);
        the exact prompt set is stored as a blob and the score is tied to it and to
        ``snapshot_path``. A multi-turn task passes ``play(sampler, index, prompt, sampling)``,
        a coroutine giving the prompt's scored episodes ({"text", "score", ...} each) instead
        of one graded completion per sample.
        An eval with no prompts, or whose sampling returned no completion,
        has no score: it raises (ValueError) rather than record one it never measured.
        """
        if not prompts:
            raise ValueError("an eval needs at least one prompt: an empty prompt set has no score")
        eval_id = self._eval_started([p.to_json() for p in prompts], snapshot_path, sampling)

        async def one(i: int, p: P) -> list[dict[str, Any]]:
            if play is not None:
                return [{"prompt": i, **episode} for episode in await play(sampler, i, p, sampling)]
            outs = await sampler.sample_with_tokens(messages=p.chat(), n=sampling["n"],
                                                    max_tokens=sampling["max_tokens"],
                                                    temperature=sampling["temperature"])
            return [{"prompt": i, "text": c.text, "finish_reason": c.finish_reason,
                     "completion_len": c.completion_len, "score": grade(p, c.text)} for c in outs]

        groups: list[list[dict[str, Any]]] = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        completions = [c for g in groups for c in g]
        server = controller.step_completed() if controller is not None and hasattr(controller, "step_completed") else {}
        if not completions:  # the eval stays open (EvalStarted without a score): nothing was measured
            raise ValueError(f"eval {eval_id}: the deployment returned no completion for any of the "
                             f"{len(prompts)} prompts, so there is no score to record")
        score = sum(c["score"] for c in completions) / len(completions)
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

    def _eval_started(self, prompt_set: list[object], snapshot_path: str | None,
                      sampling: Mapping[str, object]) -> str:
        self._eval_digest = self._rec.put_json(prompt_set)
        self._eval_snapshot = snapshot_path
        eval_id = uuid.uuid4().hex[:12]
        self._rec.record(EvalStarted(eval_id=eval_id, step=self._rec.step, snapshot_path=snapshot_path,
                                     prompt_set_digest=self._eval_digest, prompt_count=len(prompt_set),
                                     sampling=dict(sampling)))
        return eval_id

    def _eval_finished(self, eval_id: str, completions: list[dict[str, Any]], score: float,
                       server_metrics: Mapping[str, float] | None, window: float | None,
                       metrics: dict[str, float]) -> None:
        self._rec.record(SamplesRecorded(eval_id=eval_id, completions_digest=self._rec.put_json(completions),
                                         server_metrics={k: float(v) for k, v in (server_metrics or {}).items()},
                                         concurrency_window=window))
        self._rec.record(EvalScored(eval_id=eval_id, step=self._rec.step, snapshot_path=self._eval_snapshot,
                                    prompt_set_digest=self._eval_digest, score=score, metrics=metrics))

    # -- cleanup --------------------------------------------------------------------------

    def close(self, *, backend_lost: str | None = None) -> Cleanup:
        """Apply the cleanup policies and record what was confirmed done (see ``close_and_confirm``)."""
        if self._closed:
            return self.cleanup
        self._closed = True
        close_and_confirm(self._rec, self._service, self._service.close, owns_reattached=self._owns_reattached,
                          backend_lost=backend_lost, done_into=self.cleanup)
        return self.cleanup


# {"trainer": ..., "deployment": ...}: what a cleanup did (or, as a policy, is to do) to each
Cleanup = dict[str, CleanupOutcome]
_NOTHING: Cleanup = {"trainer": CleanupOutcome.KEPT, "deployment": CleanupOutcome.KEPT}


def close_and_confirm(rec: Recorder, service: object, close: Callable[[], object], *, owns_reattached: bool = False,
                      backend_lost: str | None = None, done_into: Cleanup | None = None) -> Cleanup:
    """Close ``service`` (``close`` is its SDK close), apply its cleanup policies, and record
    CleanupApplied with what the service confirmed done.

    The SDK's close cleans up only what this session created. A run that reattached
    to its own trainer or deployment (``owns_reattached``: a loop continuing
    after a crash) applies the same policy to those too, so a finished run leaves what
    its spec says however many attempts it took.

    The SDK's delete and scale-to-zero log a failure and carry on, so each action
    is confirmed by asking the service afterwards: ``failed`` when the resource is
    still there, ``unknown`` when the service cannot say. ``backend_lost`` (the
    service stopped answering) skips the attempt: each SDK call would retry for
    minutes, and nothing could be confirmed. Returns what was recorded; ``done_into`` gets it
    too, before the record is written (a caller whose ledger refuses the write still knows).
    """
    handle = sdk_adapter.managed_handle(service)
    wanted = cleanup_policy(sdk_adapter.managed_config(service))
    done = dict(_NOTHING)
    errors: list[str] = []
    try:
        if backend_lost is not None:
            done = _unconfirmed(wanted)
            errors.append(f"not attempted: {backend_lost}")
            return done
        if handle is not None:  # what the SDK's close will do
            done = cleanup_policy(handle)

        def attempt() -> Cleanup:
            close()
            if handle is not None and owns_reattached:
                return _clean_reattached(handle, wanted, done)
            return done

        try:
            done = _bounded(attempt, CLEANUP_TIMEOUT_S)
        except BaseException as exc:  # recorded, then raised: the run's failure names it too
            errors.append(redact_text(f"{type(exc).__name__}: {exc}") if isinstance(exc, Exception)
                          else "interrupted while cleaning up")
            # whatever was attempted may or may not have happened
            attempted = {k: done[k] if done[k] != CleanupOutcome.KEPT or not owns_reattached else wanted[k]
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
        if done_into is not None:
            done_into.update(done)
        rec.record(CleanupApplied(trainer=done["trainer"], deployment=done["deployment"],
                                  error="; ".join(errors) or None))


def clean_up(handle: object, wanted: Cleanup) -> tuple[Cleanup, list[str]]:
    """Apply the cleanup policy ``wanted`` to the resources ``handle`` names (as the SDK's
    handle does: trainer_manager + trainer_endpoint.job_id, deployment_manager + deployment)
    and confirm each action with the service, as ``close`` does; for resources no SDK handle
    owns (what a failed provisioning left). Returns what was done and why anything was not."""
    try:
        done = _bounded(lambda: _clean_reattached(handle, wanted, _NOTHING), CLEANUP_TIMEOUT_S)
    except Exception as exc:
        done, why = _confirmed(handle, wanted)  # attempted, perhaps in part: ask the service
        return done, [redact_text(f"{type(exc).__name__}: {exc}"), *why]
    return _confirmed(handle, done)


def _unconfirmed(actions: Cleanup) -> Cleanup:
    """What a cleanup that could not be confirmed records: ``unknown`` for each action
    meant to happen (kept stays kept)."""
    return {k: CleanupOutcome.KEPT if v == CleanupOutcome.KEPT else CleanupOutcome.UNKNOWN
            for k, v in actions.items()}


CLEANUP_TIMEOUT_S = 60.0  # the SDK's own calls retry for up to 5 minutes each
CONFIRM_TIMEOUT_S = 20.0
_GONE_JOB_STATES = ("JOB_STATE_DELETED", "JOB_STATE_DELETING")


def _bounded(fn: Callable[[], T], timeout_s: float) -> T:
    """``fn()`` in a daemon thread, given up on (TimeoutError) after ``timeout_s``: a call
    to a service that stopped answering must not hold the run's stop for minutes."""
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


def _confirmed(handle: Any, done: Cleanup) -> tuple[Cleanup, list[str]]:
    """``done`` as the service confirms it: an action whose resource is still there is
    ``failed``; one the service cannot confirm is ``unknown``. Also the reasons."""
    out: Cleanup = dict(done)
    why: list[str] = []
    job_id = getattr(getattr(handle, "trainer_endpoint", None), "job_id", None)
    if done["trainer"] == CleanupOutcome.DELETED and job_id and handle.trainer_manager is not None:
        try:
            job = _bounded(lambda: handle.trainer_manager.try_get(job_id), CONFIRM_TIMEOUT_S)
            state = str(job.get("state", "")) if isinstance(job, dict) else ""
            if job is not None and state not in _GONE_JOB_STATES:
                out["trainer"] = CleanupOutcome.FAILED
                why.append(f"trainer {job_id} is still {state or 'there'} after its delete")
        except Exception as exc:
            out["trainer"] = CleanupOutcome.UNKNOWN
            why.append(redact_text(f"trainer {job_id} delete unconfirmed: {type(exc).__name__}: {exc}"))
    deployment = getattr(handle, "deployment", None)
    if done["deployment"] in (CleanupOutcome.SCALED_TO_ZERO, CleanupOutcome.DELETED) and deployment is not None \
            and handle.deployment_manager is not None:
        dep_id = deployment.deployment_id
        try:
            record = _bounded(lambda: sdk_adapter.deployment_record(handle, dep_id), CONFIRM_TIMEOUT_S)
            if record is None:
                out["deployment"] = CleanupOutcome.DELETED
            elif int(record.get("maxReplicaCount", 1) or 0) == 0:
                out["deployment"] = CleanupOutcome.SCALED_TO_ZERO
            else:
                out["deployment"] = CleanupOutcome.FAILED
                why.append(f"deployment {dep_id} still allows {record.get('maxReplicaCount')} replica(s) "
                           f"after its {done['deployment'].replace('_', ' ')}")
        except Exception as exc:
            out["deployment"] = CleanupOutcome.UNKNOWN
            why.append(redact_text(f"deployment {dep_id} {done['deployment']} unconfirmed: "
                                   f"{type(exc).__name__}: {exc}"))
    return out, why


def cleanup_policy(config: object) -> Cleanup:
    """A provisioning config's (or the SDK handle's) cleanup flags, in the ledger's words (a
    deployment action the SDK holds that is neither delete nor scale_to_zero keeps it)."""
    delete_trainer, deployment_action = sdk_adapter.cleanup_flags(config)
    try:
        action = CleanupAction(str(deployment_action or CleanupAction.KEEP))
    except ValueError:
        action = CleanupAction.KEEP
    return {"trainer": CleanupOutcome.DELETED if delete_trainer else CleanupOutcome.KEPT, "deployment": action.outcome}


def _clean_reattached(handle: Any, wanted: Cleanup, done: Cleanup) -> Cleanup:
    done = dict(done)
    kept = CleanupOutcome.KEPT
    if wanted["trainer"] == CleanupOutcome.DELETED and done["trainer"] == kept and handle.trainer_manager is not None:
        handle.trainer_manager.delete(handle.trainer_endpoint.job_id)
        done["trainer"] = CleanupOutcome.DELETED
    deployment = getattr(handle, "deployment", None)
    if wanted["deployment"] != kept and done["deployment"] == kept and deployment is not None \
            and handle.deployment_manager is not None:
        if wanted["deployment"] == CleanupOutcome.SCALED_TO_ZERO:
            handle.deployment_manager.scale_to_zero(deployment.deployment_id)
        else:
            handle.deployment_manager.delete(deployment.deployment_id)
        done["deployment"] = wanted["deployment"]
    return done


@overload
def track(service: tinker.ServiceClient, *, run_id: str | None = None, ledger_url: str | None = None,
          spec: dict | None = None, seed: int = 0, backend: str = "fireworks") -> tinker.ServiceClient: ...


@overload
def track(service: FiretitanServiceClient, *, run_id: str | None = None, ledger_url: str | None = None,
          spec: dict | None = None, seed: int = 0, backend: str = "fireworks") -> TrackedService: ...


def track(service: tinker.ServiceClient | FiretitanServiceClient, *, run_id: str | None = None,
          ledger_url: str | None = None, spec: dict | None = None, seed: int = 0,
          backend: str = "fireworks") -> tinker.ServiceClient | TrackedService:
    """Record a researcher's own loop: wrap the service, start (or continue) a ledger run.

    A ``tinker.ServiceClient`` is recorded as a program is (``autolog``: the tinker client's
    classes are wrapped, every client this process makes is recorded) and comes back as it was."""
    import dataclasses
    import json

    if sdk_adapter.is_tinker_service(service):
        from firetitan_track.recording import autolog

        autolog(run_id=run_id, ledger_url=ledger_url)
        return service
    from firetitan_track.ledger import Ledger
    from firetitan_track.urls import default_ledger_url
    from firetitan_track.redact import redact

    ledger = Ledger.open(ledger_url or default_ledger_url())
    rid = run_id or f"run-{uuid.uuid4().hex[:10]}"
    rec = Recorder(ledger, rid)
    cfg = sdk_adapter.managed_config(service)
    if rec.version == 0:
        if spec is None and dataclasses.is_dataclass(cfg):
            spec = {"provisioning": dataclasses.asdict(cfg)}  # what the service was built from
        body = redact(json.loads(json.dumps(spec or {}, default=str)))
        from firetitan_track.code_identity import program_identity

        rec.record(RunStarted(spec=body, spec_digest=rec.put_json(body), code_version=code_version(),
                              code=program_identity(ledger.put_blob), seed=seed, backend=backend))
    return TrackedService(service, rec, base_model=getattr(cfg, "base_model", ""),
                          shape=getattr(cfg, "training_shape_id", None), lora_rank=getattr(cfg, "lora_rank", 0),
                          deployment_id=getattr(cfg, "deployment_id", None), auto_steps=True,
                          base_url=sdk_adapter.managed_base_url(service))


def code_version() -> str:
    """The installed firetitan-track version, recorded in RunStarted."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("firetitan-track")
    except PackageNotFoundError:
        return "unknown"
