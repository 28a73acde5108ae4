"""The event catalogue: every fact the ledger records, with its schema version.

An event is a JSON object with a ``type`` and a payload. Each type has a current
schema version, its payload fields with their JSON kinds (required, and optional ones
checked when present), and the fields that name stored blobs. ``payload_problem`` is
the one check of a payload against its type: appends, imports and every read apply it,
so a view can rely on what the catalogue lists. An event stored under an older version
is upcast on read by the registered upcasters, never rewritten.

Intent/outcome pairs (``*Requested`` then the outcome) make a crash between
"asked" and "done" visible in the log.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from firetitan_track.blobs import is_digest
from firetitan_track.ids import RUN_ID_RULE, is_run_id

__all__ = [
    "CATALOGUE",
    "EventType",
    "Kind",
    "NewEvent",
    "RecordedEvent",
    "UnknownEventType",
    "InvalidEvent",
    "register_upcaster",
    "upcast",
    "new_event",
    "payload_problem",
    "blob_references",
    "digest_references",
    "SIGNED_AFTER",
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
OPT_STRING, OPT_ID, OPT_INTEGER, OPT_NUMBER, OPT_BOOLEAN = (_optional(k) for k in (STRING, ID, INTEGER, NUMBER,
                                                                                    BOOLEAN))
NUMBERS = _object_of(NUMBER)  # metrics: name -> number


@dataclass(frozen=True)
class EventType:
    """One event type: its current schema version, its fields with their JSON kinds (``fields``
    required, ``optional`` checked when present), and the fields that name stored blobs.

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


def _type(name: str, doc: str = "", *, fields: Mapping[str, Kind], optional: Mapping[str, Kind] | None = None,
          blobs: tuple[str, ...] = (), version: int = 1) -> EventType:
    return EventType(name, version, tuple(fields), doc, fields, optional or {}, blobs)


def _types(*entries: EventType) -> dict[str, EventType]:
    return {e.name: e for e in entries}


_UPSTREAM = _record(run_id=ID, state_path=STRING, step=INTEGER)
_CODE = _record(packages=_object_of(STRING), python=STRING)  # RunStarted.code (code_identity.py)
_TRIAL = _record(trial=INTEGER, run_id=ID, params=OBJECT)

CATALOGUE: dict[str, EventType] = _types(
    # -- run lifecycle ---------------------------------------------------------
    _type("RunStarted",
          "spec (redacted) and its digest; optional: sweep_id, trial_params, rerun_of, prompt_sets, "
          "init_from (a chained run's upstream: run_id, status, state_path, step, trainer_job_id), "
          "prompt_sets_masked ({set: strings the stored set masks of what the run used}), "
          "rerun_data_differs (a rerun: the original's prompt_sets_masked), "
          "code (which code ran, firetitan_track/code_identity.py: git {commit, dirty, root, changed "
          "{path: sha256|null}, diff_digest, diff_bytes, diff_truncated} or null with no_git and files "
          "{path: sha256}; entry {path, digest} and argv for a program; packages, python, device); "
          "code_version is the firetitan-track version (a run before code was recorded has only it); "
          "seed is null for a recorded program (firetitan-track record), whose spec is {program: ...}",
          fields={"spec": OBJECT, "spec_digest": DIGEST, "code_version": STRING, "seed": OPT_INTEGER,
                  "backend": STRING},
          optional={"sweep_id": OPT_ID, "trial_params": _optional(OBJECT), "rerun_of": OPT_ID,
                    "prompt_sets": _object_of(DIGEST), "init_from": _optional(_UPSTREAM),
                    "prompt_sets_masked": NUMBERS, "rerun_data_differs": NUMBERS,
                    "code": _optional(_CODE)},
          blobs=("prompt_sets.*", "code.git.diff_digest")),
    _type("RunResumed", "superseded: the versions of earlier training-history events no longer authoritative",
          fields={"from_step": INTEGER, "state_path": OPT_STRING, "superseded": _array_of(INTEGER),
                  "attempt": INTEGER}),
    _type("Reconnected", "role: policy|reference|deployment; optional deployment_id",
          fields={"role": STRING, "trainer_job_id": OPT_STRING, "reused": BOOLEAN},
          optional={"deployment_id": OPT_STRING}),
    _type("CleanupApplied",
          "trainer: deleted|kept; deployment: scaled_to_zero|deleted|kept, as the service confirmed "
          "them; failed (still there after the attempt) or unknown (not confirmed); optional error: why; "
          "optional role and trainer_job_id: a resource other than the run's own session (a crashed "
          "attempt's reference, a trainer a failed provisioning left behind)",
          fields={"trainer": STRING, "deployment": STRING},
          optional={"error": STRING, "role": STRING, "trainer_job_id": OPT_STRING}),
    _type("RunFailed",
          "error text (redacted); step: the step the run was on when it stopped, not the last one "
          "completed: while step k trains it is k (one past the last StepCompleted), after step k "
          "completed (during its snapshot, eval or state save) it is k, before the first step 0",
          fields={"error": STRING, "step": INTEGER}),
    _type("RunCompleted", fields={"final_step": INTEGER, "final_snapshot": OPT_STRING}),
    # -- provisioning ----------------------------------------------------------
    _type("ProvisionRequested",
          "role: policy|reference; optional deployment_id, trainer_job_id (reuse), base_url (the service)",
          fields={"role": STRING, "base_model": STRING, "shape": OPT_STRING, "lora_rank": INTEGER},
          optional={"deployment_id": OPT_STRING, "trainer_job_id": OPT_STRING, "base_url": OPT_STRING}),
    _type("TrainerProvisioned",
          "optional partial: true when provisioning failed after the trainer was made (its cleanup follows)",
          fields={"role": STRING, "trainer_job_id": OPT_STRING, "base_model": STRING, "shape": OPT_STRING,
                  "lora_rank": INTEGER, "created": BOOLEAN},
          optional={"partial": BOOLEAN}),
    _type("DeploymentProvisioned",
          "created: null when the SDK does not say whether it made the deployment or found it "
          "(a recorded program's teacher); optional partial: true when provisioning failed after "
          "the deployment was made",
          fields={"deployment_id": OPT_STRING, "base_model": STRING, "created": OPT_BOOLEAN},
          optional={"partial": BOOLEAN}),
    _type("ReferenceProvisioned",
          "optional shared_with_policy: true when the reference is the policy's own session with "
          "adapters disabled (trainer_job_id is then the policy's job)",
          fields={"trainer_job_id": OPT_STRING, "created": BOOLEAN}, optional={"shared_with_policy": BOOLEAN}),
    # -- training --------------------------------------------------------------
    _type("StepCompleted",
          "may be written with the next event (a step after the last saved state is redone on resume); "
          "optional skipped: why no optimizer step ran (its metrics then hold only what was measured); "
          "provenance and version_offsets as a recorded program's (below): the runner's async_grpo names "
          "the rollouts each step trained on",
          fields={"step": INTEGER, "data_cursor": ANY, "micro_batches": INTEGER, "metrics": NUMBERS,
                  "optimizer": OBJECT},
          optional={"skipped": STRING}),
    _type("TrajectoriesRecorded",
          "a multi-turn recipe's (igpo) episodes of one step, sampled from snapshot_path: the blob holds, per "
          "trajectory, its prompt, answer, outcome, baseline_logprob and turns (text, the environment's reply, "
          "the answer's log-probability after it, info_gain, advantage, finish_reason, the request's seed); "
          "trajectories and turns count them",
          fields={"step": INTEGER, "snapshot_path": OPT_STRING, "trajectories_digest": DIGEST,
                  "trajectories": INTEGER, "turns": INTEGER},
          blobs=("trajectories_digest",)),
    _type("StateSaveRequested", fields={"step": INTEGER, "name": STRING, "data_cursor": ANY}),
    _type("StateSaved", "optional trainer_job_id: the job that saved it (a new job loads it by cross-job reference)",
          fields={"step": INTEGER, "name": STRING, "path": STRING, "data_cursor": ANY},
          optional={"trainer_job_id": OPT_STRING}),
    _type("SnapshotRequested", fields={"step": INTEGER, "name": STRING}),
    _type("SnapshotSaved", "kind: base|delta; base_path: the base snapshot a delta applies to (null for a base)",
          fields={"step": INTEGER, "name": STRING, "path": STRING, "kind": STRING, "base_path": OPT_STRING}),
    _type("SyncRequested", fields={"step": INTEGER, "deployment_id": OPT_STRING, "snapshot_path": STRING}),
    _type("WeightsSynced", fields={"step": INTEGER, "deployment_id": OPT_STRING, "snapshot_path": STRING,
                                   "duration_s": NUMBER}),
    # -- evaluation ------------------------------------------------------------
    _type("EvalStarted",
          fields={"eval_id": ID, "step": INTEGER, "snapshot_path": OPT_STRING, "prompt_set_digest": DIGEST,
                  "prompt_count": INTEGER, "sampling": OBJECT},
          blobs=("prompt_set_digest",)),
    _type("SamplesRecorded",
          fields={"eval_id": ID, "completions_digest": DIGEST, "server_metrics": NUMBERS,
                  "concurrency_window": OPT_NUMBER},
          blobs=("completions_digest",)),
    _type("EvalScored",
          fields={"eval_id": ID, "step": INTEGER, "snapshot_path": OPT_STRING, "prompt_set_digest": DIGEST,
                  "score": NUMBER, "metrics": OBJECT},
          blobs=("prompt_set_digest",)),
    # -- promotion (in the run's stream; never superseded) -------------------------
    _type("PromotionRequested",
          "the snapshot, the model id asked for, and the eval that justified it (eval_id and score "
          "are null when a never-evaluated snapshot is promoted with --force); optional trainer_job_id, "
          "checkpoint_id, forced",
          fields={"snapshot_path": STRING, "model_id": STRING, "eval_id": OPT_ID, "score": OPT_NUMBER},
          optional={"trainer_job_id": OPT_STRING, "checkpoint_id": OPT_STRING, "forced": BOOLEAN}),
    _type("ModelPromoted",
          "request_id: the PromotionRequested event's id; model: the promoted model's resource name; "
          "optional eval_id, score, recovered (resolved after a crash between request and outcome)",
          fields={"request_id": STRING, "snapshot_path": STRING, "model_id": STRING, "model": STRING},
          optional={"eval_id": OPT_ID, "score": OPT_NUMBER, "recovered": BOOLEAN}),
    _type("PromotionFailed", "the promotion did not happen (error redacted); a new request may follow",
          fields={"request_id": STRING, "snapshot_path": STRING, "model_id": STRING, "error": STRING}),
    _type("TrialPruned",
          "a sweep trial stopped early by the sweep's pruner, after its cleanup: the eval step and "
          "score it was judged on; the run is finished (status pruned)",
          fields={"step": INTEGER, "score": NUMBER, "reason": STRING}),
    # -- sweeps (stream id "sweep:<id>", see projections/compare.py) ---------------
    _type("SweepStarted",
          "trials: [{trial, run_id, params}] planned at the start ([] when trials are assigned as "
          "the sweep goes); grid: a grid search's values ({} otherwise); optional search "
          "(grid|random|tpe), space ({key: distribution text}), n_trials, prune (median|none), "
          "overrides (--set, for every trial); spec_digest: the digest of the sweep's spec (an identity "
          "joining workers compare)",
          fields={"sweep_id": ID, "spec_digest": DIGEST, "grid": _object_of(ARRAY), "trials": _array_of(_TRIAL)},
          optional={"search": STRING, "space": _object_of(STRING), "n_trials": INTEGER, "prune": STRING,
                    "overrides": OBJECT}),
    _type("TrialAssigned",
          "a worker took the sweep's next trial: its index, its run, the sampled params and the "
          "Optuna trial number they came from",
          fields={"trial": INTEGER, "run_id": ID, "params": OBJECT, "optuna_trial": OPT_INTEGER}),
    # -- recorded programs (firetitan-track record / autolog; firetitan_track/recording) --------
    # Their RunStarted.spec is {"program": {...}} (command, cwd, entry script digest, sdk, backend);
    # provisioning, snapshots, syncs, states, promotion and cleanup use the events above. A
    # program's StepCompleted may also hold trainer_job_id, forward_backward (each micro-batch's
    # metrics), provenance ({datums, matched, data_digest}) and version_offsets ({min, max, mean}:
    # weight versions published before the step minus those published before each matched
    # datum's sample was sent; absent when no datum matched a sample).
    _type("ProgramStarted",
          "attempt n of a recorded program's run: its command line (argv) and working directory; "
          "optional started_by (record|autolog), pid, metrics_file",
          fields={"attempt": INTEGER, "command": _array_of(STRING), "cwd": STRING},
          optional={"started_by": STRING, "pid": INTEGER, "metrics_file": OPT_STRING}),
    _type("ProgramExited",
          "how attempt n ended: outcome finished|failed|killed; exit_status (None when unknown, the "
          "negative signal number when killed); optional signal (its name), error (the uncaught "
          "exception, redacted), recording_degraded (what the recorder could not record)",
          fields={"attempt": INTEGER, "outcome": STRING, "exit_status": OPT_INTEGER},
          optional={"signal": STRING, "error": STRING, "recording_degraded": _array_of(STRING)}),
    _type("StepRequested",
          "a recorded program sent the k-th optimizer step's first micro-batch (or its optim_step); "
          "StepCompleted is the outcome; optional trainer_job_id",
          fields={"step": INTEGER}, optional={"trainer_job_id": OPT_STRING}),
    _type("SamplesDrawn",
          "one sampling call: the deployment (its id, or the model it serves), the snapshot loaded on it "
          "when the call was sent and when it returned (None when none was recorded), the weight versions "
          "published to it by then (syncs and hotloads seen), the prompt and completions as blobs, one "
          "sha256 of the token ids per sampled sequence (prompt + completion), the sampling params and "
          "the optimizer steps requested so far; optional call (the SDK method). The runner's async_grpo "
          "records one per batch of rollouts: batch (the step that trains on them), its versions count the "
          "optimizer steps the served weights hold (one publication per step), and replayed_from (a resumed "
          "run re-recording rollouts a crashed attempt sampled from weights the resumed history holds: the "
          "event id they were first recorded under)",
          fields={"deployment": OPT_STRING, "snapshot_at_send": OPT_STRING, "snapshot_at_return": OPT_STRING,
                  "version_at_send": INTEGER, "version_at_return": INTEGER, "prompt_digest": DIGEST,
                  "completions_digest": DIGEST, "sequence_digests": _array_of(DIGEST), "sampling": OBJECT,
                  "step": INTEGER},
          optional={"call": STRING, "batch": INTEGER, "replayed_from": STRING},
          blobs=("prompt_digest", "completions_digest")),
    _type("MetricsLogged",
          "numbers a recorded program logged itself (source: metrics_file|wandb) under its own step; "
          "optional snapshot_path and deployment (the snapshot loaded on the deployment when they were "
          "logged; for a Tinker program, the snapshot of the sampling client it last used) and trainer_step (optimizer steps requested by then): an eval/* metric logged with no "
          "snapshot loaded measured the trainer's weights at trainer_step",
          fields={"step": OPT_INTEGER, "metrics": NUMBERS, "source": STRING},
          optional={"snapshot_path": OPT_STRING, "deployment": OPT_STRING, "trainer_step": OPT_INTEGER}),
    _type("StateLoaded",
          "a recorded program loaded DCP state; optional step and data_cursor (of the StateSaved it names), "
          "trainer_job_id",
          fields={"path": STRING, "with_optimizer": BOOLEAN},
          optional={"step": OPT_INTEGER, "data_cursor": ANY, "trainer_job_id": OPT_STRING}),
    _type("CallFailed",
          "a recorded call raised after its intent was recorded: the SDK method, the intent event's type "
          "and the error (redacted); optional step",
          fields={"call": STRING, "intent": STRING, "error": STRING}, optional={"step": OPT_INTEGER}),
    _type("RecordingDegraded",
          "the recorder could not record something and let the program go on: what and why; optional pid",
          fields={"reason": STRING}, optional={"pid": INTEGER}),
)

# A stream whose head is one of these is signed when it is appended (see signing.py): the end
# of a run or trial, a promotion's outcome, and each step of a sweep's own stream.
SIGNED_AFTER = frozenset({"RunCompleted", "RunFailed", "TrialPruned", "ModelPromoted", "PromotionFailed",
                          "SweepStarted", "TrialAssigned", "ProgramExited"})


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


def new_event(type: str, event_id: str | None = None, **data: Any) -> NewEvent:
    """Build a NewEvent, checking the type and its fields now."""
    ev = NewEvent(type, data, event_id or uuid.uuid4().hex)
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


def payload_problem(et: EventType, data: Any) -> str | None:
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


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{_json_kind(value)} {text if len(text) <= 60 else text[:57] + '...'}"


def blob_references(type: str, data: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
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


def digest_references(data: Any) -> Iterator[tuple[str, str]]:
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
