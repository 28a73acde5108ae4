"""The class-level wrappers that record a program's SDK calls, whoever made the objects.

The cookbook builds its service inside ``training/utils/``, so no instance can be handed
to ``track()``; instead these wrap the SDK's public classes when their module is imported
(``boot.WATCHED``), the way MLflow's autologging patches a library. Each wrapper asks the
process's recording (``program.active()``) and goes through the same ``CallRecorder`` as
``track()``; with no recording, or inside another recorded call (the SDK calling itself),
it is the original method. What is wrapped:

- ``FiretitanServiceClient``: ``create_training_client`` (the policy trainer and its deployment),
  ``create_reference_client``, ``create_inference_deployment_sampler`` (a teacher), ``close`` (cleanup);
- ``FiretitanTrainingClient``: ``forward_backward[_custom]`` (a step's intent and its data), ``optim_step``
  (the step), ``save_state``, ``load_state[_with_optimizer]``, ``save_weights_for_sampler[_ext]`` (snapshots);
- ``DeploymentManager.hotload_and_wait``: every weight sync, however reached
  (``hotload_sampler_snapshot``, ``create_deployment_sampler(model_path=...)``, ``WeightSyncer``);
- ``DeploymentSampler``: ``sample_with_tokens``, ``sample_with_prompt_tokens[_result]``;
- ``FireworksClient.promote_checkpoint``: promotion (``TrainerJobManager`` and the service delegate to it);
- the cookbook's ``TrainingCheckpoints``: ``save`` (its ``data_consumed`` becomes the state's data
  cursor) and ``resume`` (the step it resumes at);
- W&B's ``Run.log`` and ``NoopRun.log``: the program's own metrics (W&B online, offline or disabled).

Calls that return futures are recorded when the program takes their result (the future
it gets back is the SDK's, observed: same class for ``isinstance``, same methods). A method
a release lacks is left alone; every other method passes through untouched. A failure of
the recorder inside a wrapper degrades the recording and lets the call go on
(``_recorded``).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeAlias, TypeVar

from firetitan_track import sdk_adapter
from firetitan_track.events import (ModelPromoted, PromotionFailed, PromotionRequested, StateSaveRequested,
                                    StepRequested)
from firetitan_track.recording import program
from firetitan_track.recording.program import PendingStep, ProgramRecording, SampledSequence
from firetitan_track.recording.provenance import datum_sequence, sequence_digest
from firetitan_track.tracking import close_and_confirm, error_text, numeric

if TYPE_CHECKING:
    from firetitan_track.blobs import Json

__all__ = ["patch_module", "unpatch_all", "ObservedFuture", "WRAPS"]

# Any stays where a value is the SDK's own: a wrapped method's arguments and result, the objects
# it is called on, its futures and what they resolve to. Their classes differ between fireworks-ai
# 1.2.24 and 1.2.30 (and tinker's), no SDK is imported here, and a wrapper passes them on untouched.
Method: TypeAlias = "Callable[..., Any]"  # an SDK method, or the wrapper that replaces it
T = TypeVar("T")

_inside: contextvars.ContextVar[bool] = contextvars.ContextVar("firetitan_recorded_call", default=False)
_data_cursor: contextvars.ContextVar[Json] = contextvars.ContextVar("firetitan_data_cursor", default=None)
_PATCHED: list[tuple[type, str, Method]] = []  # (class, attribute, original), for unpatch_all
_STATE = "_firetitan_record_state"  # what the recorder keeps on an SDK object


def _session() -> ProgramRecording | None:
    """The recording a wrapper records into; None inside another recorded call."""
    return None if _inside.get() else program.active()


def _state(obj: object, make: Callable[[], T]) -> T:
    try:
        found = obj.__dict__.get(_STATE)
        if found is None:
            found = make()
            obj.__dict__[_STATE] = found
        return found
    except AttributeError:  # no __dict__: nothing kept, nothing recorded from it
        return make()


def _wrap(cls: type | ModuleType, name: str, make: Callable[[Method], Method]) -> None:
    """``cls.name`` (a class's method, or a module's function) replaced by ``make(original)``."""
    original = cls.__dict__.get(name)
    if original is None or getattr(original, "__firetitan_recorded__", False):
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper.__firetitan_recorded__ = True  # type: ignore[attr-defined]
    setattr(cls, name, wrapper)
    _PATCHED.append((cls, name, original))


def unpatch_all() -> None:
    """Put every wrapped method back (tests)."""
    while _PATCHED:
        cls, name, original = _PATCHED.pop()
        setattr(cls, name, original)


def _arguments(original: Method, self: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name, defaults filled in ({} when they do not bind)."""
    try:
        bound = inspect.signature(original).bind(self, *args, **kwargs)
    except (TypeError, ValueError):
        return {}
    bound.apply_defaults()
    return dict(bound.arguments)


def _recorded(session: ProgramRecording, where: str, call: Callable[[], T],
              record: Callable[[Callable[[], T]], T]) -> T:
    """``record(call)`` records around the program's call; if the recorder itself fails, the
    call still happens once and its own result or exception is the program's."""
    outcome: list[tuple[str, Any]] = []  # ("raised", the exception) or ("returned", the value)

    def tracked() -> T:
        try:
            value = call()
        except BaseException as exc:
            outcome.append(("raised", exc))
            raise
        outcome.append(("returned", value))
        return value

    token = _inside.set(True)
    try:
        return record(tracked)
    except BaseException as exc:
        if outcome and outcome[0][0] == "raised":
            raise  # the program's own exception (recorded as CallFailed where it applies)
        session.degraded(where, exc)
        if not outcome:
            return call()
        return outcome[0][1]
    finally:
        _inside.reset(token)


def _quietly(call: Callable[[], T]) -> T:
    """The program's call, with the SDK's own calls inside it left unrecorded."""
    token = _inside.set(True)
    try:
        return call()
    finally:
        _inside.reset(token)


def _recording(body: Callable[..., Any]) -> Callable[[Method], Method]:
    """The wrapper maker for ``body(session, original, self, /, *args, **kwargs)``, what a call
    records: with no recording, or inside another recorded call, the wrapper is ``original``
    untouched. The body takes the call's own parameters after ``/`` (``name``, ``data``...) bound
    as the wrapper always bound them; an async body makes an async wrapper."""
    if inspect.iscoroutinefunction(body):
        def make_async(original: Method) -> Method:
            async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
                session = _session()
                if session is None:
                    return await original(self, *args, **kwargs)
                return await body(session, original, self, *args, **kwargs)
            return wrapper
        return make_async

    def make(original: Method) -> Method:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            session = _session()
            if session is None:
                return original(self, *args, **kwargs)
            return body(session, original, self, *args, **kwargs)
        return wrapper
    return make


class ObservedFuture:
    """An SDK future whose result (or failure) is recorded when the program takes it. It
    passes for the future it wraps: its class (``isinstance``), attributes and methods."""

    __slots__ = ("_inner", "_on_result", "_on_error", "_session")

    def __init__(self, inner: Any, session: ProgramRecording, on_result: Callable[[Any], None],
                 on_error: Callable[[BaseException], None] | None = None):
        self._inner = inner
        self._session = session
        self._on_result: Callable[[Any], None] | None = on_result
        self._on_error = on_error

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return type(self._inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _settle(self, value: object = None, error: BaseException | None = None) -> None:
        on_result, self._on_result = self._on_result, None
        if on_result is None:
            return
        if error is None:
            self._session.safely("recording a call's outcome", lambda: on_result(value))
        elif self._on_error is not None and not isinstance(error, TimeoutError):
            on_error = self._on_error
            self._session.safely("recording a call's failure", lambda: on_error(error))

    def result(self, *args: Any, **kwargs: Any) -> Any:
        try:
            value = self._inner.result(*args, **kwargs)
        except TimeoutError:
            raise  # not an outcome: the call is still going
        except BaseException as exc:
            self._settle(error=exc)
            raise
        self._settle(value)
        return value

    async def result_async(self, *args: Any, **kwargs: Any) -> Any:
        try:
            value = await self._inner.result_async(*args, **kwargs)
        except TimeoutError:
            raise
        except BaseException as exc:
            self._settle(error=exc)
            raise
        self._settle(value)
        return value

    def __await__(self) -> Any:
        return self.result_async().__await__()


# -- FiretitanServiceClient ------------------------------------------------------------------

@_recording
def _create_training_client(session: ProgramRecording, original: Method, self: Any, /,
                            *args: Any, **kwargs: Any) -> Any:
    config = sdk_adapter.managed_config(self)
    if config is None:
        return original(self, *args, **kwargs)
    lora_rank = config.lora_rank
    if getattr(config, "max_lora_rank", None) is not None:  # one model per call, at the rank asked
        lora_rank = _arguments(original, self, args, kwargs).get("lora_rank", lora_rank)
    reused = config.trainer_job_id if sdk_adapter.managed_handle(self) is None else sdk_adapter.trainer_job_id(self)

    def record(call: Callable[[], Any]) -> Any:
        return session.calls.provision_policy(
            self, call, base_model=config.base_model, shape=config.training_shape_id, lora_rank=lora_rank,
            deployment_id=getattr(config, "deployment_id", None), reused_trainer=reused,
            base_url=sdk_adapter.managed_base_url(self), sdk=sdk_adapter.sdk_versions())

    client = _recorded(session, "create_training_client", lambda: original(self, *args, **kwargs), record)
    session.safely("create_training_client", lambda: _adopt(session, client, self))
    return client


def _adopt(session: ProgramRecording, client: object, service: object) -> None:
    """The policy client this process provisioned: it knows its trainer, and this process
    (which sees the deployment's syncs) reads the program's metrics file."""
    _state(client, lambda: _ClientState(None)).trainer_job_id = sdk_adapter.trainer_job_id(service)
    session.metrics.reads_file = session.provisioned_here = True


@_recording
def _create_reference_client(session: ProgramRecording, original: Method, self: Any, /,
                             *args: Any, **kwargs: Any) -> Any:
    config = sdk_adapter.managed_config(self)
    if config is None:
        return original(self, *args, **kwargs)
    return _recorded(session, "create_reference_client", lambda: original(self, *args, **kwargs),
                     lambda call: session.calls.provision_reference(
                         self, call, base_model=config.base_model,
                         shape=getattr(config, "reference_training_shape_id", None)))


@_recording
def _create_inference_deployment_sampler(session: ProgramRecording, original: Method, self: Any, /,
                                         config: Any, *args: Any, **kwargs: Any) -> Any:
    return _recorded(session, "create_inference_deployment_sampler",
                     lambda: original(self, config, *args, **kwargs),
                     lambda call: session.calls.provision_teacher(
                         call, model=getattr(config, "base_model", ""),
                         deployment=getattr(config, "deployment_id", None), creates=None))


@_recording
def _close(session: ProgramRecording, original: Method, self: Any, /, *args: Any, **kwargs: Any) -> Any:
    if sdk_adapter.managed_handle(self) is None or self.__dict__.get("_firetitan_closed"):
        return original(self, *args, **kwargs)
    self.__dict__["_firetitan_closed"] = True
    session.safely("reading the metrics file", session.metrics.poll)  # logged while the deployment served
    return _recorded(session, "close", lambda: original(self, *args, **kwargs),
                     lambda call: close_and_confirm(session.rec, self, call))


# -- FiretitanTrainingClient -----------------------------------------------------------------

class _ClientState:
    """What the recorder keeps per training client: its trainer, the step being assembled,
    the base its next delta snapshot applies to."""

    def __init__(self, trainer_job_id: str | None):
        self.trainer_job_id = trainer_job_id
        self.pending: PendingStep | None = None
        self.base_path: str | None = None


def _client_state(client: object) -> _ClientState:
    return _state(client, lambda: _ClientState(None))


@_recording
def _forward_backward(session: ProgramRecording, original: Method, self: Any, /,
                      data: Any, *args: Any, **kwargs: Any) -> Any:
    pending = session.safely("forward_backward", lambda: _micro_batch(session, self, data))
    future = _quietly(lambda: original(self, data, *args, **kwargs))
    if pending is None:
        return future
    return ObservedFuture(future, session,
                          lambda out: pending.forward_backward.append(numeric(getattr(out, "metrics", None))))


def _micro_batch(session: ProgramRecording, client: object, data: Iterable[Any]) -> PendingStep:
    """Add a micro-batch to the client's next step (whose intent its first one records)."""
    state = _client_state(client)
    pending = state.pending
    if pending is None:
        pending = state.pending = PendingStep(state.trainer_job_id)
        session.step_sent(pending)
    data = list(data)
    pending.micro_batches += 1
    pending.datums += len(data)
    for datum in data:
        tokens = datum_sequence(datum)
        if tokens is not None:
            pending.sequences.append(sequence_digest(tokens))
    return pending


@_recording
def _optim_step(session: ProgramRecording, original: Method, self: Any, /, *args: Any, **kwargs: Any) -> Any:
    # the optimizer's params: the first argument, or the tinker client's optim_params / adam_params
    params = args[0] if args else kwargs.get("optim_params", kwargs.get("adam_params"))
    pending = session.safely("optim_step", lambda: _step_requested(session, self, params))
    try:
        future = _quietly(lambda: original(self, *args, **kwargs))
    except Exception as exc:
        if pending is not None:
            session.safely("optim_step", lambda: session.call_failed("optim_step", StepRequested, exc,
                                                                     pending.step))
        raise
    if pending is None:
        return future
    return ObservedFuture(future, session, lambda out: session.step_completed(pending, out),
                          lambda exc: session.call_failed("optim_step", StepRequested, exc, pending.step))


def _step_requested(session: ProgramRecording, client: object, params: object) -> PendingStep:
    state = _client_state(client)
    pending, state.pending = state.pending, None
    if pending is None:  # an optimizer step with no micro-batch of its own
        pending = PendingStep(state.trainer_job_id)
        session.step_sent(pending)
    session.step_requested(pending, sdk_adapter.optimizer_fields(params))
    return pending


@_recording
def _save_state(session: ProgramRecording, original: Method, self: Any, /,
                name: str, *args: Any, **kwargs: Any) -> Any:
    state = _client_state(self)
    intent = session.safely("save_state", lambda: _state_save_requested(session, name))
    try:
        future = _quietly(lambda: original(self, name, *args, **kwargs))
    except Exception as exc:
        session.safely("save_state", lambda: session.call_failed("save_state", StateSaveRequested, exc))
        raise
    if intent is None:
        return future
    return ObservedFuture(
        future, session,
        lambda out: session.calls.state_saved(intent, path=out.path, trainer_job_id=state.trainer_job_id),
        lambda exc: session.call_failed("save_state", StateSaveRequested, exc))


def _state_save_requested(session: ProgramRecording, name: str) -> StateSaveRequested:
    session.flush()  # the steps before this state are recorded before it
    return session.calls.state_save_requested(name=name, data_cursor=_data_cursor.get())


def _load_state(with_optimizer: bool) -> Callable[[Method], Method]:
    @_recording
    def load(session: ProgramRecording, original: Method, self: Any, /, path: str, *args: Any, **kwargs: Any) -> Any:
        future = _quietly(lambda: original(self, path, *args, **kwargs))
        job = _client_state(self).trainer_job_id
        return ObservedFuture(future, session,
                              lambda out: session.state_loaded(path, with_optimizer=with_optimizer,
                                                               trainer_job_id=job))
    return load


@_recording
def _save_weights_for_sampler(session: ProgramRecording, original: Method, self: Any, /,
                              name: str, *args: Any, **kwargs: Any) -> Any:
    state = _client_state(self)
    requested = _arguments(original, self, (name, *args), kwargs).get("checkpoint_type")
    kind = sdk_adapter.next_snapshot_kind(self, requested)
    returned: list[Any] = []

    def call() -> Any:
        out = original(self, name, *args, **kwargs)
        returned.append(out)
        return out if hasattr(out, "path") else out.result()  # _ext answers at once; the other a future

    def record(tracked: Callable[[], Any]) -> Any:
        return session.calls.snapshot(tracked, name=name, kind=kind, base_path=state.base_path)

    saved = _recorded(session, "save_weights_for_sampler", call, record)
    if kind == "base":
        state.base_path = getattr(saved, "path", None)
    return returned[0]


# -- weight syncs, sampling, promotion ----------------------------------------------------------

@_recording
def _hotload_and_wait(session: ProgramRecording, original: Method, self: Any, /, *args: Any, **kwargs: Any) -> Any:
    given = _arguments(original, self, args, kwargs)
    session.synced_here = True
    session.safely("reading the metrics file", session.metrics.poll)  # what was logged before this sync
    return _recorded(session, "hotload_and_wait", lambda: original(self, *args, **kwargs),
                     lambda call: session.calls.sync(call, deployment_id=given.get("deployment_id"),
                                                     snapshot_path=str(given.get("snapshot_identity"))))


def _deployment_of(sampler: object) -> str:
    """The deployment a sampler serves from: its id when its model names one, else the model."""
    model = str(getattr(sampler, "model", "") or "")
    return model.rsplit("/deployments/", 1)[1].split("/")[0] if "/deployments/" in model else model


_SAMPLING_KEYS = ("n", "max_tokens", "temperature", "top_p", "top_k", "max_seq_len", "stop", "logprobs", "echo",
                  "seed")


@_recording
async def _sample(session: ProgramRecording, original: Method, self: Any, /, *args: Any, **kwargs: Any) -> Any:
    deployment = _deployment_of(self)
    sent = session.safely("recording samples", lambda: session.deployment_state(deployment)) or (None, 0)
    token = _inside.set(True)
    try:
        out = await original(self, *args, **kwargs)
    finally:
        _inside.reset(token)
    session.safely("recording samples", lambda: _samples_drawn(session, original, self, args, kwargs, out,
                                                               deployment, sent, original.__name__))
    return out


def _samples_drawn(session: ProgramRecording, original: Method, sampler: object, args: tuple[Any, ...],
                   kwargs: dict[str, Any], out: Any, deployment: str, sent: tuple[str | None, int],
                   call_name: str) -> None:
    given = _arguments(original, sampler, args, kwargs)
    extra = given.pop("kwargs", {}) or {}
    given.update(extra)
    completions: list[SampledSequence] = [
        {"full_tokens": c.full_tokens, "prompt_len": c.prompt_len, "text": getattr(c, "text", None),
         "finish_reason": getattr(c, "finish_reason", None)}
        for c in (out.completions if hasattr(out, "completions") else out or [])]
    prompt = ({"messages": given["messages"]} if "messages" in given
              else {"prompt_token_ids": [int(t) for t in given.get("prompt_token_ids") or []]})
    sampling = {k: given[k] for k in _SAMPLING_KEYS
                if k in given and isinstance(given[k], (int, float, str, bool, list, type(None)))}
    session.samples_drawn(deployment=deployment, sent=sent, call=call_name, prompt=prompt,
                          completions=completions, sampling=sampling)


@_recording
def _promote_checkpoint(session: ProgramRecording, original: Method, self: Any, /, *args: Any, **kwargs: Any) -> Any:
    given = _arguments(original, self, args, kwargs)
    ref = str(given.get("name") or given.get("checkpoint_id") or "")
    snapshot, model_id = ref.rstrip("/").rsplit("/", 1)[-1], given.get("output_model_id")
    requested = session.safely("promote_checkpoint", lambda: session.now(PromotionRequested(
        snapshot_path=snapshot, model_id=model_id, eval_id=None, score=None,
        trainer_job_id=given.get("job_id") or _job_of(ref), checkpoint_id=snapshot)))
    request_id = requested.event_id if requested is not None else None
    try:
        model = original(self, *args, **kwargs)
    except Exception as exc:
        session.safely("promote_checkpoint", lambda: session.now(PromotionFailed(
            request_id=request_id, snapshot_path=snapshot, model_id=model_id, error=error_text(exc))))
        raise
    session.safely("promote_checkpoint", lambda: session.now(ModelPromoted(
        request_id=request_id, snapshot_path=snapshot, model_id=model_id,
        model=model.get("name") if isinstance(model, dict) else None)))
    return model


def _job_of(checkpoint_name: str) -> str | None:
    """The trainer job in ``accounts/<a>/rlorTrainerJobs/<job>/checkpoints/<id>``."""
    parts = checkpoint_name.split("/")
    return parts[parts.index("rlorTrainerJobs") + 1] if "rlorTrainerJobs" in parts[:-1] else None


# -- the cookbook's checkpoint manager, W&B -------------------------------------------------------

def _checkpoints_save(original: Method) -> Method:
    def save(self: Any, *args: Any, **kwargs: Any) -> Any:
        consumed = _arguments(original, self, args, kwargs).get("data_consumed")
        token = _data_cursor.set({"data_consumed": consumed} if consumed is not None else None)
        try:
            return original(self, *args, **kwargs)
        finally:
            _data_cursor.reset(token)
    return save


def _checkpoints_resume(original: Method) -> Method:
    def resume(self: Any, *args: Any, **kwargs: Any) -> Any:
        info = original(self, *args, **kwargs)
        session = program.active()
        step = getattr(info, "step", None)
        if session is not None and isinstance(step, int) and step > 0:
            session.continue_from(step)  # the cookbook's own count of the steps that state holds
        return info
    return resume


def _logged_metrics(what: str, source: str,
                    read: Callable[[dict[str, Any]], tuple[object, object]]) -> Callable[[Method], Method]:
    """A metrics logger's call (``what``: W&B's log, the cookbook's log_metrics): once it returns,
    the metrics and step ``read`` takes from its bound arguments are the program's own, from ``source``."""
    def make(original: Method) -> Method:
        def log(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(self, *args, **kwargs)
            session = program.active()
            if session is not None:
                given = _arguments(original, self, args, kwargs)
                session.safely(f"recording {what}", lambda: session.metrics.from_call(*read(given), source))
            return out
        return log
    return make


def _wandb_data(given: dict[str, Any]) -> tuple[object, object]:
    given.update(given.pop("kwargs", None) or {})  # NoopRun.log(data, *args, **kwargs)
    return given.get("data"), given.get("step", (given.get("args") or (None,))[0])


_wandb_log = _logged_metrics("wandb.log", "wandb", _wandb_data)


# -- which module gets which wrappers ------------------------------------------------------------

# module -> what in it is wrapped (a class by its name; MODULE: the module's own functions) ->
# method -> the wrapper's maker. A name a release lacks is left alone.
MODULE = ""
Wraps = dict[str, dict[str, dict[str, Callable[[Method], Method]]]]

_WANDB_LOG = {"log": _wandb_log}  # W&B online or offline (Run); disabled, WANDB_MODE=disabled (NoopRun)

# a training client's steps and states, named and wrapped alike in fireworks-ai and tinker
TRAINING_CALLS = {
    "forward_backward": _forward_backward,
    "forward_backward_custom": _forward_backward,
    "optim_step": _optim_step,
    "save_state": _save_state,
    "load_state": _load_state(with_optimizer=False),
    "load_state_with_optimizer": _load_state(with_optimizer=True),
}

WRAPS: Wraps = {
    "fireworks.training.sdk.client": {
        "FiretitanServiceClient": {
            "create_training_client": _create_training_client,
            "create_reference_client": _create_reference_client,
            "create_inference_deployment_sampler": _create_inference_deployment_sampler,
            "close": _close,
        },
        "FiretitanTrainingClient": {
            **TRAINING_CALLS,
            "save_weights_for_sampler": _save_weights_for_sampler,
            "save_weights_for_sampler_ext": _save_weights_for_sampler,
        },
    },
    "fireworks.training.sdk.sampling": {
        "DeploymentSampler": dict.fromkeys(
            ("sample_with_tokens", "sample_with_prompt_tokens", "sample_with_prompt_tokens_result"), _sample),
    },
    "fireworks.training.sdk.deployment": {"DeploymentManager": {"hotload_and_wait": _hotload_and_wait}},
    "fireworks.training.sdk.fireworks_client": {"FireworksClient": {"promote_checkpoint": _promote_checkpoint}},
    "training.utils.checkpoints": {"TrainingCheckpoints": {"save": _checkpoints_save,
                                                           "resume": _checkpoints_resume}},
    "wandb.sdk.wandb_run": {"Run": _WANDB_LOG, "NoopRun": _WANDB_LOG},
    "wandb.sdk.lib.noop_run": {"Run": _WANDB_LOG, "NoopRun": _WANDB_LOG},
}


from firetitan_track.recording import tinker_patches  # noqa: E402  (it wraps with the helpers above)

WRAPS.update(tinker_patches.WRAPS)


def patch_module(name: str, module: ModuleType) -> None:
    """Wrap what ``module`` (just imported, or already there) holds of the recorded classes."""
    wraps = WRAPS.get(name)
    if wraps is None:
        return
    try:
        for owner_name, methods in wraps.items():
            owner = module if owner_name == MODULE else getattr(module, owner_name, None)
            if isinstance(owner, (type, ModuleType)):
                for method, make in methods.items():
                    _wrap(owner, method, make)
    except Exception as exc:  # a release whose classes look different: those calls go unrecorded
        from firetitan_track.recording import boot

        boot.note("degraded", f"cannot wrap {name}: {error_text(exc)}")
