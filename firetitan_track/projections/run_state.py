"""Fold a run's event stream into its current state: the resume plan.

A resume marks the training-history events recorded after the last saved state
as superseded (``RunResumed.superseded`` lists their versions). Everything that
reads "the history" of a run goes through :func:`authoritative`, so a resumed
run reads exactly like an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from firetitan_track.events import (CallFailed, CleanupApplied, DeploymentProvisioned, EvalScored, EvalStarted, Event,
                                    MetricsLogged, ModelPromoted, ProgramExited, ProgramStarted, PromotionFailed,
                                    PromotionRequested, ProvisionRequested, Reconnected, RecordedEvent,
                                    ReferenceProvisioned, RunCompleted, RunFailed, RunResumed, RunStarted,
                                    SamplesDrawn, SamplesRecorded, SnapshotRequested, SnapshotSaved, StateLoaded,
                                    StateSaved, StateSaveRequested, StepCompleted, StepRequested, SyncRequested,
                                    TrainerProvisioned, TrajectoriesRecorded, TrialPruned, WeightsSynced)
from firetitan_track.ledger import VIEW_ERRORS, unreadable

if TYPE_CHECKING:
    from firetitan_track.blobs import Json
    from firetitan_track.events import CodeIdentity, Upstream

__all__ = ["RunState", "fold", "authoritative", "superseded_versions", "to_supersede", "TRAINING_HISTORY",
           "FINISHED", "status_row", "continue_command", "pending_promotion_text"]

# The statuses of a run that is over for good: `resume` refuses it, a sweep counts the trial
# done. A failed run is not among them: it can be resumed.
FINISHED = ("completed", "pruned")

# Events that describe the training history (and so can be superseded by a resume).
TRAINING_HISTORY = frozenset(cls.type_name for cls in (
    StepCompleted, StateSaveRequested, StateSaved, SnapshotRequested, SnapshotSaved,
    SyncRequested, WeightsSynced, EvalStarted, SamplesRecorded, EvalScored,
    TrajectoriesRecorded,  # a multi-turn recipe's episodes of a step (runner/recipes/igpo.py)
    # a recorded program's (firetitan_track/recording)
    StepRequested, SamplesDrawn, MetricsLogged, StateLoaded, CallFailed,
))


@dataclass
class RunState:
    run_id: str = ""
    version: int = 0  # events in the stream: the expected version of the next append
    status: str = "new"  # new | running | failed | completed | pruned
    spec: dict[str, Any] | None = None
    spec_digest: str | None = None
    seed: int | None = None
    backend: str | None = None
    sweep_id: str | None = None
    rerun_of: str | None = None
    init_from: Upstream | None = None  # a chained run's upstream: run, state, step
    code: CodeIdentity | None = None  # which code ran (RunStarted.code; None for a run before it was recorded)
    prompt_sets: dict[str, str] = field(default_factory=dict)
    step: int = 0  # last completed step
    data_cursor: Json = None
    trainer_job_id: str | None = None
    reference_job_id: str | None = None
    deployment_id: str | None = None
    last_state: StateSaved | None = None
    last_state_version: int | None = None  # the stream version last_state was recorded at
    last_snapshot: SnapshotSaved | None = None
    last_sync: WeightsSynced | None = None
    last_score: EvalScored | None = None
    last_metrics: dict[str, float] | None = None  # the last StepCompleted's
    attempts: int = 1
    error: str | None = None
    cleanup: CleanupApplied | None = None
    open_intent: str | None = None  # an intent whose outcome never arrived (crash between the two)
    open_intents: dict[str, int] = field(default_factory=dict)  # intent type -> how many are open
    # a recorded program's run (firetitan-track record / autolog): RunStarted.spec["program"]
    program: dict[str, Any] | None = None
    program_attempts: int = 0  # ProgramStarted events: attempts of the program
    command: list[str] | None = None  # the last attempt's command line and working directory
    cwd: str | None = None
    outcome: ProgramExited | None = None  # the last ProgramExited
    # promotions requested whose outcome is not recorded yet, by request id (the event id the
    # outcome names); `promote` again or `resume` settles them
    pending_promotions: dict[str, PromotionRequested] = field(default_factory=dict)

    @property
    def resume_step(self) -> int:
        """The step the last saved state holds: a resume continues after it."""
        return self.last_state.step if self.last_state else 0

    def to_dict(self) -> dict[str, object]:
        """The state as JSON (``replay --json``): an event it keeps as its payload, the last
        state with the version it was recorded at, a pending promotion with its request id."""
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "last_state_version"}
        for name, value in row.items():
            if isinstance(value, Event):
                row[name] = value.payload()
        if self.last_state is not None:
            row["last_state"]["version"] = self.last_state_version
        row["pending_promotions"] = [{**p.payload(), "request_id": request_id}
                                     for request_id, p in self.pending_promotions.items()]
        return row


_OUTCOME_OF: dict[type[Event], tuple[type[Event], ...]] = {
    ProvisionRequested: (TrainerProvisioned, ReferenceProvisioned, DeploymentProvisioned),
    StateSaveRequested: (StateSaved,),
    SnapshotRequested: (SnapshotSaved,),
    SyncRequested: (WeightsSynced,),
    EvalStarted: (EvalScored,),
    StepRequested: (StepCompleted,),
    PromotionRequested: (ModelPromoted, PromotionFailed),
}
_INTENTS = frozenset(cls.type_name for cls in _OUTCOME_OF)
_INTENT_OF = {o.type_name: i.type_name for i, outs in _OUTCOME_OF.items() for o in outs}


def superseded_versions(events: Iterable[RecordedEvent]) -> set[int]:
    out: set[int] = set()
    for ev in events:  # only a RunResumed is built (and checked) here; the fold names any other
        if ev.type != RunResumed.type_name:
            continue
        try:
            resumed = ev.fact
        except VIEW_ERRORS as exc:
            raise unreadable(ev, exc) from None
        if isinstance(resumed, RunResumed):
            out.update(resumed.superseded or ())
    return out


def authoritative(events: Sequence[RecordedEvent]) -> list[RecordedEvent]:
    """The events that make up the run's history, superseded ones left out."""
    dropped = superseded_versions(events)
    if not dropped:
        return list(events)
    return [ev for ev in events if ev.version not in dropped]


def to_supersede(events: Sequence[RecordedEvent]) -> list[int]:
    """The versions a resume marks superseded: every training-history event of the
    authoritative history recorded after the last saved state (all of them when no
    state was saved)."""
    history = authoritative(events)
    states = [ev.version for ev in history if ev.type == StateSaved.type_name]
    cut = states[-1] if states else -1
    return [ev.version for ev in history if ev.version > cut and ev.type in TRAINING_HISTORY]


def fold(events: Sequence[RecordedEvent], run_id: str | None = None) -> RunState:
    """Rebuild a run's state from its events alone; an event it cannot read is named
    (CorruptLedger), never a traceback."""
    st = RunState(run_id=run_id or (events[0].run_id if events else ""))
    ev = None
    try:
        for ev in authoritative(events):
            _apply(st, ev)
    except VIEW_ERRORS as exc:
        raise unreadable(ev, exc) from None
    st.version = (events[-1].version + 1) if events else 0
    return st


def _apply(st: RunState, ev: RecordedEvent) -> None:
    fact = ev.fact
    if fact is None:
        return  # a type a newer version wrote: nothing this state keeps
    _track_intents(st, fact)

    match fact:
        case StepCompleted():
            st.step, st.data_cursor, st.last_metrics = fact.step, fact.data_cursor, fact.metrics
        case StateSaved():
            st.last_state, st.last_state_version = fact, ev.version
        case SnapshotSaved():
            st.last_snapshot = fact
        case WeightsSynced():
            st.last_sync = fact
        case EvalScored():
            st.last_score = fact
        case RunStarted():
            st.status = "running"
            st.spec, st.spec_digest, st.seed, st.backend = fact.spec, fact.spec_digest, fact.seed, fact.backend
            st.sweep_id, st.rerun_of, st.init_from = fact.sweep_id, fact.rerun_of, fact.init_from
            st.prompt_sets = dict(fact.prompt_sets or {})
            program = fact.spec.get("program") if isinstance(fact.spec, dict) else None
            st.program = program if isinstance(program, dict) else None
            st.code = fact.code
        case TrainerProvisioned(role="reference"):
            st.reference_job_id = fact.trainer_job_id
        case TrainerProvisioned():
            st.trainer_job_id = fact.trainer_job_id
        case ReferenceProvisioned():
            # a reference that shares the policy's session has no trainer of its own to retire
            st.reference_job_id = None if fact.shared_with_policy else fact.trainer_job_id
        case DeploymentProvisioned():
            st.deployment_id = fact.deployment_id
        case Reconnected(role="reference"):
            st.reference_job_id = fact.trainer_job_id
        case Reconnected(role="deployment"):
            st.deployment_id = fact.deployment_id or st.deployment_id
        case Reconnected():
            st.trainer_job_id = fact.trainer_job_id
            st.deployment_id = fact.deployment_id or st.deployment_id
        case RunResumed():
            st.status, st.attempts, st.error = "running", fact.attempt, None
            # the superseded events are already left out; roll the cursor back to the state
            if st.last_state is not None:
                st.step, st.data_cursor = st.last_state.step, st.last_state.data_cursor
        case RunFailed():
            st.status, st.error = "failed", fact.error
        case RunCompleted():
            st.status = "completed"
        case TrialPruned():
            st.status = "pruned"
        case CleanupApplied():
            st.cleanup = fact
        case ProgramStarted():
            st.status = "running"
            st.program_attempts += 1
            st.attempts = fact.attempt
            st.command, st.cwd = list(fact.command), fact.cwd
            st.error = None
        case ProgramExited():
            st.outcome = fact
        case StateLoaded() if fact.step is not None:
            st.step = fact.step  # the program continues from the state it loaded
            st.data_cursor = fact.data_cursor
        case PromotionRequested():
            st.pending_promotions[ev.event_id] = fact
        case ModelPromoted() | PromotionFailed():
            st.pending_promotions.pop(fact.request_id, None)


def _track_intents(st: RunState, fact: Event) -> None:
    """Count open intents per type: pipelined steps and concurrent calls each close their own."""
    t = fact.type_name
    intent = fact.intent if isinstance(fact, CallFailed) else _INTENT_OF.get(t)
    if t in _INTENTS:
        st.open_intents[t] = st.open_intents.get(t, 0) + 1
        st.open_intent = t
    elif intent is not None and st.open_intents.get(intent, 0) > 0:
        st.open_intents[intent] -= 1
        if not st.open_intents[intent]:
            del st.open_intents[intent]
        if st.open_intent == intent and intent not in st.open_intents:
            st.open_intent = next(reversed(st.open_intents), None)


def status_row(st: RunState) -> dict[str, object]:
    """Where a run stands, as ``status`` prints it. For a recorded program also what the
    program needs to continue: its command line (and folder), and the newest resumable
    state with the data cursor saved with it (the cookbook's ``data_consumed``)."""
    row: dict[str, object] = {
        "run_id": st.run_id, "status": st.status, "step": st.step, "version": st.version,
        "attempts": st.attempts, "trainer_job_id": st.trainer_job_id, "deployment_id": st.deployment_id,
        "last_state": st.last_state and {"step": st.last_state.step, "path": st.last_state.path},
        "last_snapshot": st.last_snapshot and {"step": st.last_snapshot.step, "path": st.last_snapshot.path,
                                               "kind": st.last_snapshot.kind},
        "last_score": st.last_score and {"step": st.last_score.step, "score": st.last_score.score,
                                         "snapshot_path": st.last_score.snapshot_path},
        "pending_intent": st.open_intent, "error": st.error,
        "pending_promotion": pending_promotion_text(st),
    }
    if st.program is None:
        return row
    import shlex

    if st.last_state is not None:
        cursor = st.last_state.data_cursor
        row["last_state"] = {"step": st.last_state.step, "name": st.last_state.name, "path": st.last_state.path,
                             **({"data_consumed": cursor["data_consumed"]}
                                if isinstance(cursor, dict) and "data_consumed" in cursor else {}),
                             **({"trainer_job_id": st.last_state.trainer_job_id}
                                if st.last_state.trainer_job_id else {})}
    row["pending_intents"] = dict(st.open_intents) or None
    row["command"] = shlex.join(st.command or st.program.get("command") or [])
    row["cwd"] = st.cwd or st.program.get("cwd")
    if st.outcome is not None:
        exited = st.outcome.payload()
        row["outcome"] = {k: exited[k] for k in ("outcome", "exit_status", "signal") if k in exited}
    row["continue"] = continue_command(st)
    return row


def continue_command(st: RunState) -> str | None:
    """For a recorded program's run, the command that continues it: the program again, recorded
    into the same run (the cookbook resumes from its newest checkpoint by itself)."""
    if st.program is None:
        return None
    import shlex

    command = st.command or st.program.get("command") or []
    cwd = st.cwd or st.program.get("cwd") or "."
    return f"cd {shlex.quote(cwd)} && firetitan-track record --run-id {shlex.quote(st.run_id)} -- {shlex.join(command)}"


def pending_promotion_text(st: RunState) -> str | None:
    """What ``status`` says of promotions requested whose outcome is not recorded (the
    promoting process stopped in between), and how each settles; None when there are none."""
    if not st.pending_promotions:
        return None
    asked = "; ".join(f"{p.model_id} from {p.snapshot_path}" for p in st.pending_promotions.values())
    first = next(iter(st.pending_promotions.values()))
    return (f"requested, outcome not recorded: {asked}. The service is asked whether it happened by "
            f"`firetitan-track promote {st.run_id} --snapshot {first.snapshot_path} --model-id "
            f"{first.model_id}` (the same promotion again) or `firetitan-track resume {st.run_id}`")
