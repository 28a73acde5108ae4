"""The event catalogue: every fact the ledger records, with its schema version.

An event is a JSON object with a ``type`` and a payload. Each type has a current
schema version and a set of required payload fields; an event stored under an
older version is upcast on read by the registered upcasters, never rewritten.

Intent/outcome pairs (``*Requested`` then the outcome) make a crash between
"asked" and "done" visible in the log.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = [
    "CATALOGUE",
    "EventType",
    "NewEvent",
    "RecordedEvent",
    "UnknownEventType",
    "InvalidEvent",
    "register_upcaster",
    "upcast",
    "new_event",
]


class UnknownEventType(ValueError):
    pass


class InvalidEvent(ValueError):
    pass


@dataclass(frozen=True)
class EventType:
    name: str
    version: int
    required: tuple[str, ...]
    doc: str = ""


def _types(*entries: EventType) -> dict[str, EventType]:
    return {e.name: e for e in entries}


CATALOGUE: dict[str, EventType] = _types(
    # -- run lifecycle ---------------------------------------------------------
    EventType("RunStarted", 1, ("spec", "spec_digest", "code_version", "seed", "backend"),
              "spec (redacted) and its digest; optional: sweep_id, trial_params, rerun_of, prompt_sets, "
              "init_from (a chained run's upstream: run_id, status, state_path, step, trainer_job_id), "
              "prompt_sets_masked ({set: strings the stored set masks of what the run used}), "
              "rerun_data_differs (a rerun: the original's prompt_sets_masked), "
              "code (which code ran, firetitan_track/code_identity.py: git {commit, dirty, root, changed "
              "{path: sha256|null}, diff_digest, diff_bytes, diff_truncated} or null with no_git and files "
              "{path: sha256}; entry {path, digest} and argv for a program; packages, python, device); "
              "code_version is the firetitan-track version (a run before code was recorded has only it)"),
    EventType("RunResumed", 1, ("from_step", "state_path", "superseded", "attempt"),
              "superseded: the versions of earlier training-history events no longer authoritative"),
    EventType("Reconnected", 1, ("role", "trainer_job_id", "reused"),
              "role: policy|reference|deployment; optional deployment_id"),
    EventType("CleanupApplied", 1, ("trainer", "deployment"),
              "trainer: deleted|kept; deployment: scaled_to_zero|deleted|kept, as the service confirmed "
              "them; failed (still there after the attempt) or unknown (not confirmed); optional error: why"),
    EventType("RunFailed", 1, ("error", "step"), "error text (redacted)"),
    EventType("RunCompleted", 1, ("final_step", "final_snapshot")),
    # -- provisioning ----------------------------------------------------------
    EventType("ProvisionRequested", 1, ("role", "base_model", "shape", "lora_rank"),
              "role: policy|reference; optional deployment_id, trainer_job_id (reuse), base_url (the service)"),
    EventType("TrainerProvisioned", 1, ("role", "trainer_job_id", "base_model", "shape", "lora_rank", "created")),
    EventType("DeploymentProvisioned", 1, ("deployment_id", "base_model", "created")),
    EventType("ReferenceProvisioned", 1, ("trainer_job_id", "created"),
              "optional shared_with_policy: true when the reference is the policy's own session with "
              "adapters disabled (trainer_job_id is then the policy's job)"),
    # -- training --------------------------------------------------------------
    EventType("StepCompleted", 1, ("step", "data_cursor", "micro_batches", "metrics", "optimizer"),
              "may be written with the next event (a step after the last saved state is redone on resume)"),
    EventType("StateSaveRequested", 1, ("step", "name", "data_cursor")),
    EventType("StateSaved", 1, ("step", "name", "path", "data_cursor"),
              "optional trainer_job_id: the job that saved it (a new job loads it by cross-job reference)"),
    EventType("SnapshotRequested", 1, ("step", "name")),
    EventType("SnapshotSaved", 1, ("step", "name", "path", "kind", "base_path"),
              "kind: base|delta; base_path: the base snapshot a delta applies to (null for a base)"),
    EventType("SyncRequested", 1, ("step", "deployment_id", "snapshot_path")),
    EventType("WeightsSynced", 1, ("step", "deployment_id", "snapshot_path", "duration_s")),
    # -- evaluation ------------------------------------------------------------
    EventType("EvalStarted", 1, ("eval_id", "step", "snapshot_path", "prompt_set_digest", "prompt_count", "sampling")),
    EventType("SamplesRecorded", 1, ("eval_id", "completions_digest", "server_metrics", "concurrency_window")),
    EventType("EvalScored", 1, ("eval_id", "step", "snapshot_path", "prompt_set_digest", "score", "metrics")),
    # -- promotion (in the run's stream; never superseded) -------------------------
    EventType("PromotionRequested", 1, ("snapshot_path", "model_id", "eval_id", "score"),
              "the snapshot, the model id asked for, and the eval that justified it (eval_id and score "
              "are null when a never-evaluated snapshot is promoted with --force); optional trainer_job_id, "
              "checkpoint_id, forced"),
    EventType("ModelPromoted", 1, ("request_id", "snapshot_path", "model_id", "model"),
              "request_id: the PromotionRequested event's id; model: the promoted model's resource name; "
              "optional eval_id, score, recovered (resolved after a crash between request and outcome)"),
    EventType("PromotionFailed", 1, ("request_id", "snapshot_path", "model_id", "error"),
              "the promotion did not happen (error redacted); a new request may follow"),
    EventType("TrialPruned", 1, ("step", "score", "reason"),
              "a sweep trial stopped early by the sweep's pruner, after its cleanup: the eval step and "
              "score it was judged on; the run is finished (status pruned)"),
    # -- sweeps (stream id "sweep:<id>", see projections/compare.py) ---------------
    EventType("SweepStarted", 1, ("sweep_id", "spec_digest", "grid", "trials"),
              "trials: [{trial, run_id, params}] planned at the start ([] when trials are assigned as "
              "the sweep goes); grid: a grid search's values ({} otherwise); optional search "
              "(grid|random|tpe), space ({key: distribution text}), n_trials, prune (median|none), "
              "overrides (--set, for every trial)"),
    EventType("TrialAssigned", 1, ("trial", "run_id", "params", "optuna_trial"),
              "a worker took the sweep's next trial: its index, its run, the sampled params and the "
              "Optuna trial number they came from"),
    # -- recorded programs (firetitan-track record / autolog; firetitan_track/recording) --------
    # Their RunStarted.spec is {"program": {...}} (command, cwd, entry script digest, sdk, backend);
    # provisioning, snapshots, syncs, states, promotion and cleanup use the events above. A
    # program's StepCompleted may also hold trainer_job_id, forward_backward (each micro-batch's
    # metrics), provenance ({datums, matched, data_digest}) and version_offsets ({min, max, mean}:
    # weight versions published before the step minus those published before each matched
    # datum's sample was sent; absent when no datum matched a sample).
    EventType("ProgramStarted", 1, ("attempt", "command", "cwd"),
              "attempt n of a recorded program's run: its command line (argv) and working directory; "
              "optional started_by (record|autolog), pid, metrics_file"),
    EventType("ProgramExited", 1, ("attempt", "outcome", "exit_status"),
              "how attempt n ended: outcome finished|failed|killed; exit_status (None when unknown, the "
              "negative signal number when killed); optional signal (its name), error (the uncaught "
              "exception, redacted), recording_degraded (what the recorder could not record)"),
    EventType("StepRequested", 1, ("step",),
              "a recorded program sent the k-th optimizer step's first micro-batch (or its optim_step); "
              "StepCompleted is the outcome; optional trainer_job_id"),
    EventType("SamplesDrawn", 1, ("deployment", "snapshot_at_send", "snapshot_at_return", "version_at_send",
                                  "version_at_return", "prompt_digest", "completions_digest",
                                  "sequence_digests", "sampling", "step"),
              "one sampling call: the deployment (its id, or the model it serves), the snapshot loaded on it "
              "when the call was sent and when it returned (None when none was recorded), the weight versions "
              "published to it by then (syncs and hotloads seen), the prompt and completions as blobs, one "
              "sha256 of the token ids per sampled sequence (prompt + completion), the sampling params and "
              "the optimizer steps requested so far; optional call (the SDK method)"),
    EventType("MetricsLogged", 1, ("step", "metrics", "source"),
              "numbers a recorded program logged itself (source: metrics_file|wandb) under its own step; "
              "optional snapshot_path and deployment (the snapshot loaded on the deployment when they were "
              "logged) and trainer_step (optimizer steps requested by then): an eval/* metric logged with no "
              "snapshot loaded measured the trainer's weights at trainer_step"),
    EventType("StateLoaded", 1, ("path", "with_optimizer"),
              "a recorded program loaded DCP state; optional step and data_cursor (of the StateSaved it names), "
              "trainer_job_id"),
    EventType("CallFailed", 1, ("call", "intent", "error"),
              "a recorded call raised after its intent was recorded: the SDK method, the intent event's type "
              "and the error (redacted); optional step"),
    EventType("RecordingDegraded", 1, ("reason",),
              "the recorder could not record something and let the program go on: what and why; optional pid"),
)


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
    """Build a NewEvent, checking the type and its required fields now."""
    ev = NewEvent(type, data, event_id or uuid.uuid4().hex)
    validate(ev)
    return ev


def validate(ev: NewEvent) -> None:
    et = CATALOGUE.get(ev.type)
    if et is None:
        raise UnknownEventType(f"unknown event type {ev.type!r}")
    if ev.schema_version is not None and ev.schema_version != et.version:
        return  # an older version written by an older tool; upcasting handles it on read
    missing = [k for k in et.required if k not in ev.data]
    if missing:
        raise InvalidEvent(f"{ev.type} is missing {', '.join(missing)}")


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
