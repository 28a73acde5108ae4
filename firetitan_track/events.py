"""The event catalogue: every fact the ledger records, one frozen dataclass per event type.

An event is a JSON object with a ``type`` and a payload. Each type is a class below: its
fields are its payload's fields, their annotations the JSON kinds they hold (a field with no
default is required; one declared ``optional()`` may be left out, and reads None then), its
``schema_version`` the current version, its ``blobs`` the fields that name stored blobs.
``CATALOGUE`` is generated from the classes. ``payload_problem`` is the one check of a payload
against its type: appends, imports and every read apply it, so a view can rely on what the
class lists. An event stored under an older version is upcast on read by the registered
upcasters, never rewritten; a field a newer writer added is kept (``Event.extra``) and written
back unchanged.

Writers build an instance (``new_event(StepCompleted(step=3, ...))``); readers match on one
(``RecordedEvent.fact``). Intent/outcome pairs (``*Requested`` then the outcome) make a crash
between "asked" and "done" visible in the log.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, ClassVar, Iterable, Iterator, Mapping, TypeVar

from firetitan_track.blobs import is_digest
from firetitan_track.ids import RUN_ID_RULE, is_run_id

__all__ = [
    "CATALOGUE",
    "EVENT_CLASSES",
    "CleanupAction",
    "CleanupOutcome",
    "Event",
    "EventType",
    "Kind",
    "NewEvent",
    "RecordedEvent",
    "first_of",
    "UnknownEventType",
    "InvalidEvent",
    "optional",
    "register_upcaster",
    "upcast",
    "new_event",
    "payload_problem",
    "blob_references",
    "digest_references",
    "SIGNED_AFTER",
    "sweep_trials",
]


class UnknownEventType(ValueError):
    pass


class InvalidEvent(ValueError):
    pass


# -- the JSON kinds a payload field may hold --------------------------------------------


@dataclass(frozen=True)
class Kind:
    """What a payload field holds, as JSON: its name for messages and its test."""

    name: str
    test: Callable[[Any], bool] = field(repr=False, compare=False)


def _optional(kind: Kind) -> Kind:
    return Kind(f"{kind.name} or null", lambda v: v is None or kind.test(v))


def _array_of(kind: Kind) -> Kind:
    return Kind(f"an array of ({kind.name})", lambda v: isinstance(v, list) and all(kind.test(x) for x in v))


def _object_of(kind: Kind) -> Kind:
    return Kind(f"an object of ({kind.name})",
                lambda v: isinstance(v, dict) and all(kind.test(x) for x in v.values()))


def _record(**fields: Kind) -> Kind:
    """An object holding at least these fields (views read them)."""
    shown = ", ".join(f"{k}: {f.name}" for k, f in fields.items())
    return Kind(f"an object with {shown}",
                lambda v: isinstance(v, dict) and all(k in v and f.test(v[k]) for k, f in fields.items()))


ANY = Kind("any JSON value", lambda v: True)
STRING = Kind("a string", lambda v: isinstance(v, str))
INTEGER = Kind("an integer", lambda v: type(v) is int)  # JSON has no bool-as-int
NUMBER = Kind("a number", lambda v: type(v) is int or type(v) is float)
BOOLEAN = Kind("a boolean", lambda v: type(v) is bool)
OBJECT = Kind("an object", lambda v: isinstance(v, dict))
ARRAY = Kind("an array", lambda v: isinstance(v, list))
ID = Kind(f"an id ({RUN_ID_RULE})", is_run_id)  # may become a file name: see ids.py
DIGEST = Kind("a sha256 digest (64 lowercase hex)", is_digest)

# Annotations naming a kind a Python type cannot: a field's annotation is its JSON kind.
Id = Annotated[str, ID]
Digest = Annotated[str, DIGEST]
Upstream = Annotated[dict[str, Any], _record(run_id=ID, state_path=STRING, step=INTEGER)]  # RunStarted.init_from
CodeIdentity = Annotated[dict[str, Any], _record(packages=_object_of(STRING), python=STRING)]  # code_identity.py
Trial = Annotated[dict[str, Any], _record(trial=INTEGER, run_id=ID, params=OBJECT)]  # SweepStarted.trials

_SCALAR_KINDS: dict[Any, Kind] = {str: STRING, int: INTEGER, float: NUMBER, bool: BOOLEAN, Any: ANY,
                                  dict: OBJECT, list: ARRAY}


def _one_of(values: tuple[str, ...]) -> Kind:
    return Kind("one of " + ", ".join(map(repr, values)), lambda v: isinstance(v, str) and v in values)


# Any stays where it is meant: an annotation (a type form) is no one Python type, ``optional()``
# is a default that must fit any field, and a payload's values are whatever the event's fields
# hold (``Any`` as a field's annotation is the JSON kind "any value"). Values only inspected or
# passed on are ``object``.


def _kind_of(annotation: Any) -> Kind:
    """The JSON kind a field's annotation names: str, int, float, bool, Any, dict[str, X],
    list[X], X | None, a str-valued Enum (one of its values), or Annotated[..., Kind] for one
    Python cannot name (Id, Digest)."""
    if typing.get_origin(annotation) is Annotated:
        return typing.get_args(annotation)[1]
    if isinstance(annotation, type) and issubclass(annotation, enum.StrEnum):
        return _one_of(tuple(m.value for m in annotation))
    if annotation in _SCALAR_KINDS:
        return _SCALAR_KINDS[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (rest,) = (a for a in args if a is not type(None))
        return _optional(_kind_of(rest))
    if origin is list:
        return ARRAY if args[0] is Any else _array_of(_kind_of(args[0]))
    if origin is dict:
        return OBJECT if args[1] is Any else _object_of(_kind_of(args[1]))
    raise TypeError(f"no JSON kind for the annotation {annotation!r}")


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = tuple(a for a in typing.get_args(annotation) if a is not type(None))
        return rest[0] if len(rest) == 1 else typing.Union[rest]
    return annotation


@dataclass(frozen=True)
class EventType:
    """One event type: its current schema version, its fields with their JSON kinds (``fields``
    required, ``optional`` checked when present), the fields that name stored blobs, and the
    class it is (None only for a type a test makes up).

    ``blobs`` lists the fields whose digest names a blob the ledger must hold (``verify``
    reports a missing one; ``bundle`` carries it); ``name.*`` means every value of the object
    ``name``. Any other ``*_digest`` field is an identity: a digest of content held elsewhere
    (RunStarted.spec_digest hashes the spec the event itself holds), checked against a blob
    only when one is stored under it.
    """

    name: str
    version: int
    required: tuple[str, ...]
    doc: str = ""
    fields: Mapping[str, Kind] = field(default_factory=dict, compare=False)
    optional: Mapping[str, Kind] = field(default_factory=dict, compare=False)
    blobs: tuple[str, ...] = ()
    cls: type[Event] | None = field(default=None, compare=False, repr=False)


# -- events as classes --------------------------------------------------------------------


class _Omitted:
    """The default of an optional field not given: the payload leaves it out."""

    def __repr__(self) -> str:
        return "<omitted>"


_OMITTED: Any = _Omitted()


def optional(*, null: bool = False) -> Any:
    """A field the payload may leave out (it then reads None; given as None, it is left out).
    ``null=True``: it may also be null, and then left out and given as None are kept apart, so
    a payload reads back as it was written."""
    return field(default=_OMITTED, metadata={"optional": True, "null": null})


E = TypeVar("E", bound="Event")


@typing.dataclass_transform(kw_only_default=True, field_specifiers=(field, optional))
@dataclass(frozen=True, kw_only=True)
class Event:
    """The base of every event class: a subclass is a frozen, keyword-only dataclass whose
    fields are its payload's. ``extra`` holds fields this code does not know (written by a
    newer version), read and written back unchanged."""

    type_name: ClassVar[str]  # the event's ``type``: the class's name
    schema_version: ClassVar[int] = 1
    blobs: ClassVar[tuple[str, ...]] = ()  # see EventType.blobs
    _fields: ClassVar[tuple[tuple[str, bool, bool], ...]] = ()  # (name, optional, may be null) per field
    _doc: ClassVar[str] = ""

    extra: dict[str, Any] = field(default_factory=dict)
    _given: frozenset[str] = field(default=frozenset(), init=False, repr=False)  # optional fields given

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._doc = " ".join((cls.__dict__.get("__doc__") or "").split())
        cls.type_name = cls.__name__
        dataclass(frozen=True, kw_only=True)(cls)
        cls._fields = tuple((f.name, bool(f.metadata.get("optional")), bool(f.metadata.get("null")))
                            for f in dataclasses.fields(cls) if f.init and f.name != "extra")

    def __post_init__(self) -> None:
        given = []
        for name, is_optional, null in self._fields:
            if is_optional:
                value = getattr(self, name)
                if value is _OMITTED or (value is None and not null):
                    object.__setattr__(self, name, None)
                else:
                    given.append(name)
        object.__setattr__(self, "_given", frozenset(given))
        clash = sorted(self.extra.keys() & {name for name, _, _ in self._fields})
        if clash:
            raise InvalidEvent(f"{self.type_name}: extra holds {', '.join(clash)}, which are fields of the event")

    def payload(self) -> dict[str, Any]:
        """The JSON object the ledger stores: every required field, the optional ones given,
        and the unknown ones read with it."""
        data = {name: getattr(self, name) for name, is_optional, _ in self._fields
                if not is_optional or name in self._given}
        data.update(self.extra)
        return data

    def replace(self: E, **changes: object) -> E:
        """This event with ``changes``; an optional field left out stays left out (where
        ``dataclasses.replace`` would give it as None)."""
        return type(self).from_payload({**self.payload(), **changes})

    @classmethod
    def from_payload(cls: type[E], data: Mapping[str, Any]) -> E:
        """The event a stored (upcast) payload holds; fields this class does not know go to ``extra``."""
        names = {name for name, _, _ in cls._fields}
        missing = [name for name, is_optional, _ in cls._fields if not is_optional and name not in data]
        if missing:
            raise InvalidEvent(f"{cls.type_name}: missing {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    @functools.cache
    def event_type(cls) -> EventType:
        """This class as a catalogue entry: each field's JSON kind from its annotation."""
        hints = typing.get_type_hints(cls, include_extras=True)
        required: dict[str, Kind] = {}
        optional_kinds: dict[str, Kind] = {}
        for f in dataclasses.fields(cls):
            if not f.init or f.name == "extra":
                continue
            if f.metadata.get("optional"):
                kind = _kind_of(_without_none(hints[f.name]))
                optional_kinds[f.name] = _optional(kind) if f.metadata["null"] and kind is not ANY else kind
            else:
                required[f.name] = _kind_of(hints[f.name])
        return EventType(cls.type_name, cls.schema_version, tuple(required), cls._doc, required, optional_kinds,
                         cls.blobs, cls)


# -- run lifecycle ---------------------------------------------------------


class RunStarted(Event):
    """spec (redacted) and its digest; optional: sweep_id, trial_params, rerun_of, prompt_sets,
    init_from (a chained run's upstream: run_id, status, state_path, step, trainer_job_id),
    prompt_sets_masked ({set: strings the stored set masks of what the run used}),
    rerun_data_differs (a rerun: the original's prompt_sets_masked),
    code (which code ran, firetitan_track/code_identity.py: git {commit, dirty, root, changed
    {path: sha256|null}, diff_digest, diff_bytes, diff_truncated} or null with no_git and files
    {path: sha256}; entry {path, digest} and argv for a program; packages, python, device);
    code_version is the firetitan-track version (a run before code was recorded has only it);
    seed is null for a recorded program (firetitan-track record), whose spec is {program: ...}"""

    blobs = ("prompt_sets.*", "code.git.diff_digest")
    spec: dict[str, Any]
    spec_digest: Digest
    code_version: str
    seed: int | None
    backend: str
    sweep_id: Id | None = optional(null=True)
    trial_params: dict[str, Any] | None = optional(null=True)
    rerun_of: Id | None = optional(null=True)
    prompt_sets: dict[str, Digest] | None = optional()
    init_from: Upstream | None = optional(null=True)
    prompt_sets_masked: dict[str, float] | None = optional()
    rerun_data_differs: dict[str, float] | None = optional()
    code: CodeIdentity | None = optional(null=True)


class RunResumed(Event):
    """superseded: the versions of earlier training-history events no longer authoritative"""

    from_step: int
    state_path: str | None
    superseded: list[int]
    attempt: int


class Reconnected(Event):
    """role: policy|reference|deployment; optional deployment_id"""

    role: str
    trainer_job_id: str | None
    reused: bool
    deployment_id: str | None = optional(null=True)


class CleanupOutcome(enum.StrEnum):
    """What became of a resource when its run closed, as CleanupApplied records it (the
    values are the ledger's words; a member is the str it stands for, so an old payload's
    string and a member compare equal and serialise the same)."""

    DELETED = "deleted"
    KEPT = "kept"
    SCALED_TO_ZERO = "scaled_to_zero"
    FAILED = "failed"  # attempted, and the resource is still there
    UNKNOWN = "unknown"  # attempted (or meant to be), and the service could not confirm it


class CleanupAction(enum.StrEnum):
    """What a cleanup policy asks for a resource when its run closes: a spec's ``[cleanup]``
    (trainer: delete|keep; deployment: scale_to_zero|delete|keep), in the words the SDK's
    ``cleanup_deployment_on_close`` takes."""

    DELETE = "delete"
    KEEP = "keep"
    SCALE_TO_ZERO = "scale_to_zero"

    @property
    def outcome(self) -> CleanupOutcome:
        """The outcome this action records when it is done."""
        return {CleanupAction.DELETE: CleanupOutcome.DELETED, CleanupAction.KEEP: CleanupOutcome.KEPT,
                CleanupAction.SCALE_TO_ZERO: CleanupOutcome.SCALED_TO_ZERO}[self]


class CleanupApplied(Event):
    """trainer: deleted|kept; deployment: scaled_to_zero|deleted|kept, as the service confirmed
    them; failed (still there after the attempt) or unknown (not confirmed) (CleanupOutcome);
    optional error: why; optional role and trainer_job_id: a resource other than the run's own
    session (a crashed attempt's reference, a trainer a failed provisioning left behind)"""

    trainer: CleanupOutcome
    deployment: CleanupOutcome
    error: str | None = optional()
    role: str | None = optional()
    trainer_job_id: str | None = optional(null=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("trainer", "deployment"):  # a stored payload's string reads as its member
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, CleanupOutcome(value))
            except ValueError:
                raise InvalidEvent(f"CleanupApplied: {name} is {value!r}, not one of "
                                   f"{', '.join(m.value for m in CleanupOutcome)}") from None


class RunFailed(Event):
    """error text (redacted); step: the step the run was on when it stopped, not the last one
    completed: while step k trains it is k (one past the last StepCompleted), after step k
    completed (during its snapshot, eval or state save) it is k, before the first step 0"""

    error: str
    step: int


class RunCompleted(Event):
    final_step: int
    final_snapshot: str | None


# -- provisioning ----------------------------------------------------------


class ProvisionRequested(Event):
    """role: policy|reference|teacher; optional deployment_id, trainer_job_id (reuse), base_url (the
    service), sdk (a recorded program's SDK releases: {distribution: version})"""

    role: str
    base_model: str
    shape: str | None
    lora_rank: int
    deployment_id: str | None = optional(null=True)
    trainer_job_id: str | None = optional(null=True)
    base_url: str | None = optional(null=True)
    sdk: dict[str, str] | None = optional()


class TrainerProvisioned(Event):
    """optional partial: true when provisioning failed after the trainer was made (its cleanup follows)"""

    role: str
    trainer_job_id: str | None
    base_model: str
    shape: str | None
    lora_rank: int
    created: bool
    partial: bool | None = optional()


class DeploymentProvisioned(Event):
    """created: null when the SDK does not say whether it made the deployment or found it
    (a recorded program's teacher); optional partial: true when provisioning failed after
    the deployment was made; optional role: teacher for a deployment a recorded program samples
    from without training it"""

    deployment_id: str | None
    base_model: str
    created: bool | None
    partial: bool | None = optional()
    role: str | None = optional()


class ReferenceProvisioned(Event):
    """optional shared_with_policy: true when the reference is the policy's own session with
    adapters disabled (trainer_job_id is then the policy's job)"""

    trainer_job_id: str | None
    created: bool
    shared_with_policy: bool | None = optional()


# -- training --------------------------------------------------------------


class StepCompleted(Event):
    """may be written with the next event (a step after the last saved state is redone on resume);
    optional skipped: why no optimizer step ran (its metrics then hold only what was measured);
    provenance and version_offsets as a recorded program's (below): the runner's async_grpo names
    the rollouts each step trained on"""

    step: int
    data_cursor: Any
    micro_batches: int
    metrics: dict[str, float]
    optimizer: dict[str, Any]
    skipped: str | None = optional()
    # a recorded program's (see the note above ProgramStarted)
    trainer_job_id: str | None = optional(null=True)
    forward_backward: list[dict[str, float]] | None = optional()
    provenance: dict[str, Any] | None = optional()
    version_offsets: dict[str, float] | None = optional()


class TrajectoriesRecorded(Event):
    """a multi-turn recipe's (igpo) episodes of one step, sampled from snapshot_path: the blob holds, per
    trajectory, its prompt, answer, outcome, baseline_logprob and turns (text, the environment's reply,
    the answer's log-probability after it, info_gain, advantage, finish_reason, the request's seed);
    trajectories and turns count them"""

    blobs = ("trajectories_digest",)
    step: int
    snapshot_path: str | None
    trajectories_digest: Digest
    trajectories: int
    turns: int


class StateSaveRequested(Event):
    step: int
    name: str
    data_cursor: Any


class StateSaved(Event):
    """optional trainer_job_id: the job that saved it (a new job loads it by cross-job reference)"""

    step: int
    name: str
    path: str
    data_cursor: Any
    trainer_job_id: str | None = optional(null=True)


class SnapshotRequested(Event):
    step: int
    name: str


class SnapshotSaved(Event):
    """kind: base|delta; base_path: the base snapshot a delta applies to (null for a base)"""

    step: int
    name: str
    path: str
    kind: str
    base_path: str | None


class SyncRequested(Event):
    step: int
    deployment_id: str | None
    snapshot_path: str


class WeightsSynced(Event):
    step: int
    deployment_id: str | None
    snapshot_path: str
    duration_s: float


# -- evaluation ------------------------------------------------------------


class EvalStarted(Event):
    blobs = ("prompt_set_digest",)
    eval_id: Id
    step: int
    snapshot_path: str | None
    prompt_set_digest: Digest
    prompt_count: int
    sampling: dict[str, Any]


class SamplesRecorded(Event):
    blobs = ("completions_digest",)
    eval_id: Id
    completions_digest: Digest
    server_metrics: dict[str, float]
    concurrency_window: float | None


class EvalScored(Event):
    blobs = ("prompt_set_digest",)
    eval_id: Id
    step: int
    snapshot_path: str | None
    prompt_set_digest: Digest
    score: float
    metrics: dict[str, Any]


# -- promotion (in the run's stream; never superseded) -------------------------


class PromotionRequested(Event):
    """the snapshot, the model id asked for, and the eval that justified it (eval_id and score
    are null when a never-evaluated snapshot is promoted with --force); optional trainer_job_id,
    checkpoint_id, forced"""

    snapshot_path: str
    model_id: str
    eval_id: Id | None
    score: float | None
    trainer_job_id: str | None = optional(null=True)
    checkpoint_id: str | None = optional(null=True)
    forced: bool | None = optional()


class ModelPromoted(Event):
    """request_id: the PromotionRequested event's id; model: the promoted model's resource name;
    optional eval_id, score, recovered (resolved after a crash between request and outcome)"""

    request_id: str
    snapshot_path: str
    model_id: str
    model: str
    eval_id: Id | None = optional(null=True)
    score: float | None = optional(null=True)
    recovered: bool | None = optional()


class PromotionFailed(Event):
    """the promotion did not happen (error redacted); a new request may follow"""

    request_id: str
    snapshot_path: str
    model_id: str
    error: str


class TrialPruned(Event):
    """a sweep trial stopped early by the sweep's pruner, after its cleanup: the eval step and
    score it was judged on; the run is finished (status pruned)"""

    step: int
    score: float
    reason: str


# -- sweeps (stream id "sweep:<id>", ids.sweep_stream) ----------------------------


class SweepStarted(Event):
    """trials: [{trial, run_id, params}] planned at the start ([] when trials are assigned as
    the sweep goes); grid: a grid search's values ({} otherwise); optional search
    (grid|random|tpe), space ({key: distribution text}), n_trials, prune (median|none),
    overrides (--set, for every trial); spec_digest: the digest of the sweep's spec (an identity
    joining workers compare)"""

    sweep_id: Id
    spec_digest: Digest
    grid: dict[str, list[Any]]
    trials: list[Trial]
    search: str | None = optional()
    space: dict[str, str] | None = optional()
    n_trials: int | None = optional()
    prune: str | None = optional()
    overrides: dict[str, Any] | None = optional()


class TrialAssigned(Event):
    """a worker took the sweep's next trial: its index, its run, the sampled params and the
    Optuna trial number they came from"""

    trial: int
    run_id: Id
    params: dict[str, Any]
    optuna_trial: int | None


def sweep_trials(events: list[RecordedEvent]) -> list[dict[str, Any]]:
    """A sweep stream's trials, ``{trial, run_id, params}`` in trial order: those its
    SweepStarted planned, then those its workers were assigned as it went."""
    trials = {}
    for ev in events:
        if ev.type == "SweepStarted":
            trials.update({t["trial"]: t for t in ev.data["trials"]})
        elif ev.type == "TrialAssigned":
            trials[ev.data["trial"]] = {k: ev.data[k] for k in ("trial", "run_id", "params")}
    return [trials[k] for k in sorted(trials)]


# -- recorded programs (firetitan-track record / autolog; firetitan_track/recording) --------
# Their RunStarted.spec is {"program": {...}} (command, cwd, entry script digest, sdk, backend);
# provisioning, snapshots, syncs, states, promotion and cleanup use the events above. A
# program's StepCompleted may also hold trainer_job_id, forward_backward (each micro-batch's
# metrics), provenance ({datums, matched, data_digest}) and version_offsets ({min, max, mean}:
# weight versions published before the step minus those published before each matched
# datum's sample was sent; absent when no datum matched a sample).


class ProgramStarted(Event):
    """attempt n of a recorded program's run: its command line (argv) and working directory;
    optional started_by (record|autolog), pid, metrics_file"""

    attempt: int
    command: list[str]
    cwd: str
    started_by: str | None = optional()
    pid: int | None = optional()
    metrics_file: str | None = optional(null=True)


class ProgramExited(Event):
    """how attempt n ended: outcome finished|failed|killed; exit_status (None when unknown, the
    negative signal number when killed); optional signal (its name), error (the uncaught
    exception, redacted), recording_degraded (what the recorder could not record)"""

    attempt: int
    outcome: str
    exit_status: int | None
    signal: str | None = optional()
    error: str | None = optional()
    recording_degraded: list[str] | None = optional()


class StepRequested(Event):
    """a recorded program sent the k-th optimizer step's first micro-batch (or its optim_step);
    StepCompleted is the outcome; optional trainer_job_id"""

    step: int
    trainer_job_id: str | None = optional(null=True)


class SamplesDrawn(Event):
    """one sampling call: the deployment (its id, or the model it serves), the snapshot loaded on it
    when the call was sent and when it returned (None when none was recorded), the weight versions
    published to it by then (syncs and hotloads seen), the prompt and completions as blobs, one
    sha256 of the token ids per sampled sequence (prompt + completion), the sampling params and
    the optimizer steps requested so far; optional call (the SDK method). The runner's async_grpo
    records one per batch of rollouts: batch (the step that trains on them), its versions count the
    optimizer steps the served weights hold (one publication per step), and replayed_from (a resumed
    run re-recording rollouts a crashed attempt sampled from weights the resumed history holds: the
    event id they were first recorded under)"""

    blobs = ("prompt_digest", "completions_digest")
    deployment: str | None
    snapshot_at_send: str | None
    snapshot_at_return: str | None
    version_at_send: int
    version_at_return: int
    prompt_digest: Digest
    completions_digest: Digest
    sequence_digests: list[Digest]
    sampling: dict[str, Any]
    step: int
    call: str | None = optional()
    batch: int | None = optional()
    replayed_from: str | None = optional()


class MetricsLogged(Event):
    """numbers a recorded program logged itself (source: metrics_file|wandb) under its own step;
    optional snapshot_path and deployment (the snapshot loaded on the deployment when they were
    logged; for a Tinker program, the snapshot of the sampling client it last used) and trainer_step
    (optimizer steps requested by then): an eval/* metric logged with no snapshot loaded measured
    the trainer's weights at trainer_step"""

    step: int | None
    metrics: dict[str, float]
    source: str
    snapshot_path: str | None = optional(null=True)
    deployment: str | None = optional(null=True)
    trainer_step: int | None = optional(null=True)


class StateLoaded(Event):
    """a recorded program loaded DCP state; optional step and data_cursor (of the StateSaved it names),
    trainer_job_id"""

    path: str
    with_optimizer: bool
    step: int | None = optional(null=True)
    data_cursor: Any = optional(null=True)
    trainer_job_id: str | None = optional(null=True)


class CallFailed(Event):
    """a recorded call raised after its intent was recorded: the SDK method, the intent event's type
    and the error (redacted); optional step"""

    call: str
    intent: str
    error: str
    step: int | None = optional(null=True)


class RecordingDegraded(Event):
    """the recorder could not record something and let the program go on: what and why; optional pid"""

    reason: str
    pid: int | None = optional()


EVENT_CLASSES: tuple[type[Event], ...] = tuple(Event.__subclasses__())  # every class above, in order
CATALOGUE: dict[str, EventType] = {cls.type_name: cls.event_type() for cls in EVENT_CLASSES}


# A stream whose head is one of these is signed when it is appended (see signing.py): the end
# of a run or trial, a promotion's outcome, and each step of a sweep's own stream.
SIGNED_AFTER = frozenset(cls.type_name for cls in (RunCompleted, RunFailed, TrialPruned, ModelPromoted, PromotionFailed,
                                                    SweepStarted, TrialAssigned, ProgramExited))


@dataclass(frozen=True)
class NewEvent:
    """An event about to be appended. ``event_id`` makes a re-append idempotent."""

    type: str
    data: Mapping[str, Any]
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    schema_version: int | None = None  # None: the catalogue's current version


@dataclass(frozen=True)
class RecordedEvent:
    """An event as stored: its place in its stream and in the global order."""

    run_id: str
    version: int
    position: int
    event_id: str
    type: str
    schema_version: int
    data: dict[str, Any]
    recorded_at: float  # unix seconds, UTC
    hash: str

    @functools.cached_property
    def fact(self) -> Event | None:
        """The event as its class (built from the payload as read, so already upcast); None for
        a type this code does not know (written by a newer version)."""
        et = CATALOGUE.get(self.type)
        return et.cls.from_payload(self.data) if et is not None and et.cls is not None else None


def first_of(events: Iterable[RecordedEvent], cls: type[E]) -> E | None:
    """The first of ``events`` that is a ``cls`` (RunStarted, SweepStarted, ...), as that class;
    None when there is none."""
    return next((ev.fact for ev in events if isinstance(ev.fact, cls)), None)


def new_event(event: Event | str, event_id: str | None = None, **data: object) -> NewEvent:
    """The NewEvent that appends ``event``, checked against its type now. A type's name and its
    fields as keywords also work (a test writing a payload by hand)."""
    if isinstance(event, Event):
        if data:
            raise TypeError(f"new_event({event.type_name}(...)) takes no fields as keywords: "
                            f"got {', '.join(sorted(data))}")
        ev = NewEvent(event.type_name, event.payload(), event_id or uuid.uuid4().hex)
    else:
        ev = NewEvent(event, data, event_id or uuid.uuid4().hex)
    validate(ev)
    return ev


def validate(ev: NewEvent) -> None:
    et = CATALOGUE.get(ev.type)
    if et is None:
        raise UnknownEventType(f"unknown event type {ev.type!r}")
    if ev.schema_version is not None and ev.schema_version != et.version:
        return  # an older version written by an older tool; upcasting handles it on read
    problem = payload_problem(et, ev.data)
    if problem is not None:
        raise InvalidEvent(f"{ev.type}: {problem}")


def payload_problem(et: EventType, data: object) -> str | None:
    """What is wrong with ``data`` as a payload of ``et`` at its current version, or None.

    The one check of a payload against the catalogue: appends, imports and reads apply it,
    so a view can rely on every field its event type lists."""
    if type(data) is not dict and not isinstance(data, Mapping):
        return f"the payload is {_json_kind(data)}, not an object"
    for key in et.required:
        if key not in data:
            return f"missing {', '.join(k for k in et.required if k not in data)}"
    for key, kind in et.fields.items():
        if not kind.test(data[key]):
            return f"{key} is {_shown(data[key])}, not {kind.name}"
    for key, kind in et.optional.items():
        if key in data and not kind.test(data[key]):
            return f"{key} is {_shown(data[key])}, not {kind.name}"
    return None


def _json_kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _shown(value: object) -> str:
    text = repr(value)
    return f"{_json_kind(value)} {text if len(text) <= 60 else text[:57] + '...'}"


def blob_references(type: str, data: Mapping[str, object]) -> Iterator[tuple[str, str]]:
    """(field, digest) for every field of ``type`` that names a stored blob (EventType.blobs:
    dotted paths into the payload, ``*`` standing for every value of an object)."""
    et = CATALOGUE.get(type)
    for path in et.blobs if et is not None else ():
        nodes: list[tuple[str, Any]] = [("", data)]
        for part in path.split("."):
            found = []
            for where, node in nodes:
                if not isinstance(node, Mapping):
                    continue
                items = node.items() if part == "*" else ([(part, node[part])] if part in node else [])
                found += [(f"{where}.{key}" if where else key, value) for key, value in items]
            nodes = found
        yield from ((where, value) for where, value in nodes if is_digest(value))


def digest_references(data: object) -> Iterator[tuple[str, str]]:
    """(field, digest) for every ``*_digest`` field anywhere in a payload and every digest under a
    ``prompt_sets`` map: the digests whose blob, when stored, must still hash to them."""
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if k.endswith("_digest") and is_digest(v):
                    yield k, v
                elif k == "prompt_sets" and isinstance(v, dict):
                    yield from ((f"prompt_sets.{name}", d) for name, d in v.items() if is_digest(d))
                elif isinstance(v, (dict, list)):
                    stack.append(v)
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))


# -- upcasting -----------------------------------------------------------------

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
_UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def register_upcaster(type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register ``fn(data) -> data`` taking ``type`` from ``from_version`` to the next."""

    def deco(fn: Upcaster) -> Upcaster:
        _UPCASTERS[(type, from_version)] = fn
        return fn

    return deco


def upcast(type: str, version: int, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Bring ``data`` stored at ``version`` up to the catalogue's current version."""
    et = CATALOGUE.get(type)
    target = et.version if et else version
    while version < target:
        fn = _UPCASTERS.get((type, version))
        if fn is None:
            raise InvalidEvent(f"no upcaster for {type} v{version} -> v{version + 1}")
        data = fn(dict(data))
        version += 1
    return version, data
