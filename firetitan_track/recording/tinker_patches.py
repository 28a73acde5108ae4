"""The wrappers that record a program written against Thinking Machines' ``tinker`` client (0.38),
as patches.py records one on the FireTitan SDK: the same recording, the same events where they
mean the same thing (README, Recording a program as it is; issue 25).

What each Tinker call is in the ledger:

- ``ServiceClient.create_lora_training_client`` and ``create_training_client_from_state[_with_optimizer]``:
  a policy trainer (ProvisionRequested, then TrainerProvisioned with the training run id as its
  trainer job id; from a state, StateLoaded, which resumes the run when it names a state the run
  recorded);
- ``TrainingClient.forward_backward[_custom]`` and ``optim_step``: a step (patches.py's own wrappers);
  ``save_state``, ``load_state[_with_optimizer]``: DCP states (the same); tinker-cookbook's
  ``checkpoint_utils.save_checkpoint_async`` gives the state its ``loop_state`` as data cursor;
- ``TrainingClient.save_weights_for_sampler``: a sampler snapshot (always whole: ``base``);
- a ``SamplingClient`` made on a training run's weights is that run's sampler publishing a new
  weight version, a weight sync onto the "deployment" named by the training run id:
  ``save_weights_and_get_sampling_client`` saves an ephemeral snapshot (its path is the sampling
  session's id, the only name the client gets for it) and syncs it; ``create_sampling_client
  (model_path=...)`` syncs the snapshot at that path. A sampling client on a base model serves
  no snapshot;
- ``SamplingClient.sample``: SamplesDrawn, tied to the snapshot and weight version *that client*
  serves (a Tinker sampling client's weights never change), so an off-policy rollout counts
  its staleness as the FireTitan recorder does;
- tinker-cookbook's ``JsonLogger.log_metrics``: the program's own metrics (it writes them to its
  ``metrics.jsonl``), tied to the snapshot of the sampling client the program last sampled from
  (or scored with): tinker-cookbook's RL loop evaluates with an iteration's sampler, samples its
  rollouts there, trains, makes the next iteration's sampler and only then logs.

Tinker builds its clients inside coroutines on its own event loop: the outcome of a creation is
recorded in the new client's ``__init__``, before the program can hold it; the call that began
it passes what it knows (``_origin``) in a context variable, which the coroutine's task inherits
(``asyncio.run_coroutine_threadsafe`` schedules it in a copy of the caller's context).
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypedDict

from firetitan_track import sdk_adapter
from firetitan_track.events import ProvisionRequested, SnapshotRequested, TrainerProvisioned
from firetitan_track.recording import program
from firetitan_track.recording.patches import (MODULE, TRAINING_CALLS, Method, ObservedFuture, Wraps, _arguments,
                                               _client_state, _data_cursor, _logged_metrics, _quietly, _recording)
from firetitan_track.recording.program import ProgramRecording, SampledSequence

if TYPE_CHECKING:
    from firetitan_track.blobs import Json
    from firetitan_track.tracking import PendingSync

__all__ = ["WRAPS"]

# As in patches.py, Any stays where a value is the SDK's own (a wrapped method's arguments and
# result, the clients, what a future resolves to): this module imports no tinker, and passes them on.


class _Origin(TypedDict, total=False):
    """What a creation call knows of the client its coroutine builds (``kind``: "training" or "sampler")."""

    kind: str
    created: bool  # a training client: provisioned by this call
    state: str  # a training client from a state: its path
    with_optimizer: bool
    snapshot: SnapshotRequested | None  # a sampler on an ephemeral snapshot: its intent
    deployment: str | None  # a sampler: the training run (or base model) it serves
    t0: float  # when the ephemeral snapshot's sync began (time.perf_counter)
    sync: PendingSync | None  # a sampler on a saved snapshot: its sync


_origin: contextvars.ContextVar[_Origin | None] = contextvars.ContextVar("firetitan_tinker_origin", default=None)
EPHEMERAL = "ephemeral"  # the name of a snapshot save_weights_and_get_sampling_client saves


@dataclass(frozen=True)
class _Served:
    """What a sampling client serves: its "deployment" (the training run whose weights it holds,
    or the base model), the snapshot, and that snapshot's weight version."""

    deployment: str
    snapshot_path: str | None
    version: int


def _begun(original: Method, origin: _Origin, self: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The program's creation call, with ``origin`` for the client its coroutine builds."""
    token = _origin.set(origin)
    try:
        return _quietly(lambda: original(self, *args, **kwargs))
    finally:
        _origin.reset(token)


# -- training clients --------------------------------------------------------------------------

@_recording
def _create_lora_training_client(session: ProgramRecording, original: Method, self: Any, /,
                                 *args: Any, **kwargs: Any) -> Any:
    given = _arguments(original, self, args, kwargs)
    session.safely("create_lora_training_client", lambda: session.now(ProvisionRequested(
        role="policy", base_model=str(given.get("base_model")), shape=None,
        lora_rank=int(given.get("rank") or 0), base_url=sdk_adapter.tinker_base_url(self))))
    return _begun(original, {"kind": "training", "created": True}, self, args, kwargs)


def _create_training_client_from_state(with_optimizer: bool) -> Callable[[Method], Method]:
    @_recording
    def create_training_client_from_state(session: ProgramRecording, original: Method, self: Any, /,
                                          *args: Any, **kwargs: Any) -> Any:
        path = str(_arguments(original, self, args, kwargs).get("path"))
        # the base model is the state's, known once it is loaded (TrainerProvisioned names it)
        session.safely("create_training_client_from_state", lambda: session.now(ProvisionRequested(
            role="policy", base_model=path, shape=None, lora_rank=0, base_url=sdk_adapter.tinker_base_url(self))))
        origin: _Origin = {"kind": "training", "created": True, "state": path, "with_optimizer": with_optimizer}
        return _begun(original, origin, self, args, kwargs)
    return create_training_client_from_state


def _client_init(kind: str, made: Callable[[ProgramRecording, object, _Origin], None]) -> Callable[[Method], Method]:
    """A tinker client's ``__init__``: a client of ``kind`` built where the program asked for one
    (its origin set by the call that asked) is recorded by ``made`` once it is built."""
    def make(original: Method) -> Method:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            origin, session = _origin.get(), program.active()
            if origin is not None and origin["kind"] == kind and session is not None:
                session.safely(f"recording a tinker {kind} client", lambda: made(session, self, origin))
        return __init__
    return make


def _trainer_made(session: ProgramRecording, client: object, origin: _Origin) -> None:
    run_id = sdk_adapter.tinker_training_run(client)
    base_model, lora_rank = sdk_adapter.tinker_model(client)
    _client_state(client).trainer_job_id = run_id
    session.provisioned_here = session.synced_here = True  # its samplers are published from this process
    session.now(TrainerProvisioned(role="policy", trainer_job_id=run_id, base_model=base_model, shape=None,
                                   lora_rank=lora_rank, created=origin["created"]))
    if "state" in origin:
        session.state_loaded(origin["state"], with_optimizer=origin["with_optimizer"], trainer_job_id=run_id)


@_recording
def _save_weights_for_sampler(session: ProgramRecording, original: Method, self: Any, /,
                              *args: Any, **kwargs: Any) -> Any:
    name = str(_arguments(original, self, args, kwargs).get("name"))
    intent = session.safely("save_weights_for_sampler", lambda: _snapshot_requested(session, name))
    future = _quietly(lambda: original(self, *args, **kwargs))
    if intent is None:
        return future
    return ObservedFuture(future, session,
                          lambda out: session.calls.snapshot_saved(intent, path=out.path, kind="base", base_path=None),
                          lambda exc: session.call_failed("save_weights_for_sampler", SnapshotRequested, exc))


def _snapshot_requested(session: ProgramRecording, name: str) -> SnapshotRequested:
    session.flush()  # the steps before this snapshot are recorded before it
    return session.calls.snapshot_requested(name=name)


# -- sampling clients ----------------------------------------------------------------------------

@_recording
def _save_weights_and_get_sampling_client(session: ProgramRecording, original: Method, self: Any, /,
                                          *args: Any, **kwargs: Any) -> Any:
    intent = session.safely("save_weights_and_get_sampling_client", lambda: _snapshot_requested(session, EPHEMERAL))
    origin: _Origin = {"kind": "sampler", "snapshot": intent, "deployment": sdk_adapter.tinker_training_run(self),
                       "t0": time.perf_counter()}
    return _begun(original, origin, self, args, kwargs)


@_recording
def _create_sampling_client(session: ProgramRecording, original: Method, self: Any, /,
                            *args: Any, **kwargs: Any) -> Any:
    given = _arguments(original, self, args, kwargs)
    path = given.get("model_path")
    origin: _Origin = {"kind": "sampler"}
    if path:
        deployment = sdk_adapter.tinker_run_of_path(str(path))
        origin.update({"deployment": deployment, "sync": session.safely("create_sampling_client", lambda: (
            session.calls.sync_requested(deployment_id=deployment, snapshot_path=str(path))))})
    else:
        origin.update({"deployment": str(given.get("base_model"))})
    return _begun(original, origin, self, args, kwargs)


def _sampler_made(session: ProgramRecording, client: object, origin: _Origin) -> None:
    deployment = origin["deployment"]
    sync = origin.get("sync")
    if origin.get("snapshot") is not None:  # an ephemeral snapshot, saved and served by this client
        path = sdk_adapter.tinker_sampling_session(client)
        session.calls.snapshot_saved(origin["snapshot"], path=path, kind="base", base_path=None)
        sync = dataclasses.replace(session.calls.sync_requested(deployment_id=deployment, snapshot_path=path),
                                   t0=origin["t0"])
    served = _Served(deployment, None, 0)
    if sync is not None:
        served = _Served(deployment, sync.intent.snapshot_path, session.calls.synced(sync))
    client.__dict__[_SERVED] = served


_SERVED = "_firetitan_record_served"


def _served(client: object) -> _Served:
    """What a sampling client serves; one the recorder did not see made (an unpickled copy in a
    worker) is named by its sampling session, with no snapshot known."""
    found = getattr(client, "__dict__", {}).get(_SERVED)
    return found or _Served(sdk_adapter.tinker_sampling_session(client), None, 0)


@_recording
def _sample(session: ProgramRecording, original: Method, self: Any, /, *args: Any, **kwargs: Any) -> Any:
    served = _served(self)
    session.last_sampler = (served.deployment, served.snapshot_path)
    given = _arguments(original, self, args, kwargs)
    future = _quietly(lambda: original(self, *args, **kwargs))
    return ObservedFuture(future, session, lambda out: _samples_drawn(session, served, given, out))


@_recording
def _compute_logprobs(session: ProgramRecording, original: Method, self: Any, /, *args: Any, **kwargs: Any) -> Any:
    """Scoring through a sampling client (an NLL eval): no samples, but the sampler is used."""
    served = _served(self)
    session.last_sampler = (served.deployment, served.snapshot_path)
    return original(self, *args, **kwargs)


def _samples_drawn(session: ProgramRecording, served: _Served, given: dict[str, Any], out: Any) -> None:
    prompt = [int(t) for t in given["prompt"].to_ints()]
    completions: list[SampledSequence] = [
        {"full_tokens": prompt + [int(t) for t in seq.tokens], "prompt_len": len(prompt), "text": None,
         "finish_reason": str(getattr(seq, "stop_reason", None))} for seq in out.sequences]
    params = given.get("sampling_params")
    fields = params.model_dump(exclude_none=True) if hasattr(params, "model_dump") else {}
    sampling: dict[str, Json] = {k: v for k, v in fields.items() if isinstance(v, (int, float, str, bool, list))}
    sampling["n"] = int(given.get("num_samples") or len(completions))
    published = session.calls.published.get(served.deployment, served.version)
    session.samples_drawn(deployment=served.deployment, sent=(served.snapshot_path, served.version), call="sample",
                          prompt={"prompt_token_ids": prompt}, completions=completions, sampling=sampling,
                          returned=(served.snapshot_path, published))


# -- tinker-cookbook: its checkpoints' loop state, its metrics -----------------------------------

def _save_checkpoint_async(original: Method) -> Method:
    signature = inspect.signature(original)

    async def save_checkpoint_async(*args: Any, **kwargs: Any) -> Any:
        try:
            loop_state = signature.bind(*args, **kwargs).arguments.get("loop_state")
        except TypeError:
            loop_state = None
        token = _data_cursor.set(dict(loop_state) if isinstance(loop_state, dict) else None)
        try:
            return await original(*args, **kwargs)
        finally:
            _data_cursor.reset(token)
    return save_checkpoint_async


_json_logger_log_metrics = _logged_metrics("log_metrics", "metrics_file",
                                           lambda given: (given.get("metrics"), given.get("step")))


# -- which module gets which wrappers (patches.WRAPS's form) -------------------------------------

WRAPS: Wraps = {
    "tinker.lib.public_interfaces.service_client": {
        "ServiceClient": {
            "create_lora_training_client": _create_lora_training_client,
            "create_training_client_from_state": _create_training_client_from_state(False),
            "create_training_client_from_state_with_optimizer": _create_training_client_from_state(True),
            "create_sampling_client": _create_sampling_client,
        },
    },
    "tinker.lib.public_interfaces.training_client": {
        "TrainingClient": {
            "__init__": _client_init("training", _trainer_made),
            **TRAINING_CALLS,
            "save_weights_for_sampler": _save_weights_for_sampler,
            "save_weights_and_get_sampling_client": _save_weights_and_get_sampling_client,
            "create_sampling_client": _create_sampling_client,
        },
    },
    "tinker.lib.public_interfaces.sampling_client": {
        "SamplingClient": {"__init__": _client_init("sampler", _sampler_made), "sample": _sample,
                           "compute_logprobs": _compute_logprobs},
    },
    # tinker-cookbook: its checkpoint function (the module's own) and its metrics logger
    "tinker_cookbook.checkpoint_utils": {MODULE: {"save_checkpoint_async": _save_checkpoint_async}},
    "tinker_cookbook.utils.ml_log": {"JsonLogger": {"log_metrics": _json_logger_log_metrics}},
}
