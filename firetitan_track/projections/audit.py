"""Audit views: which snapshot produced each score, on which prompts, from which steps.

Every view here is built from a run's *authoritative* history (superseded events
left out), so a resumed run reads exactly like an uninterrupted one:

- :func:`eval_rows` / :func:`audit`: one row per eval;
- :func:`lineage`: where a sampler snapshot came from and every eval that used it;
- :func:`replay`: rebuild the projections from the log alone and verify its chain;
- :func:`compare_sweep`: per trial of a sweep, its params and best score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from firetitan_track.events import RecordedEvent
from firetitan_track.ledger import NotFound, unknown_run
from firetitan_track.projections.run_state import RunState, authoritative, fold

__all__ = [
    "EvalRow", "Lineage", "Replay", "TrialSummary", "NotFound",
    "eval_rows", "audit", "lineage", "replay", "compare_sweep", "read_run", "sweep_stream",
]


@dataclass
class EvalRow:
    eval_id: str
    step: int
    snapshot_path: str
    snapshot_kind: str | None  # base | delta; None when the snapshot event is missing
    prompt_set_digest: str
    prompt_count: int
    sampling: dict[str, Any]
    score: float | None  # None: the eval started but never scored
    metrics: dict[str, Any] = field(default_factory=dict)
    sync_duration_s: float | None = None
    completions_digest: str | None = None
    scored_at: float | None = None  # unix seconds of the EvalScored event

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sweep_stream(sweep_id: str) -> str:
    """The ledger stream that records a sweep."""
    return f"sweep:{sweep_id}"


def read_run(ledger: Any, run_id: str) -> list[RecordedEvent]:
    """A run's whole stream; NotFound when the ledger holds no such run."""
    events = ledger.read(run_id)
    if not events:
        raise unknown_run(run_id)
    return events


def eval_rows(events: Sequence[RecordedEvent]) -> list[EvalRow]:
    """One row per eval in the authoritative history, in the order they started."""
    rows: dict[str, EvalRow] = {}
    kinds: dict[str, str] = {}  # snapshot path -> base|delta
    synced: dict[str, float] = {}  # snapshot path -> duration of its latest sync
    for ev in authoritative(events):
        d = ev.data
        if ev.type == "SnapshotSaved":
            kinds[d["path"]] = d["kind"]
        elif ev.type == "WeightsSynced":
            synced[d["snapshot_path"]] = float(d["duration_s"])
        elif ev.type == "EvalStarted":
            path = d["snapshot_path"]
            rows[d["eval_id"]] = EvalRow(
                eval_id=d["eval_id"], step=d["step"], snapshot_path=path,
                snapshot_kind=kinds.get(path), prompt_set_digest=d["prompt_set_digest"],
                prompt_count=d["prompt_count"], sampling=dict(d["sampling"]), score=None,
                sync_duration_s=synced.get(path),
            )
        elif ev.type == "SamplesRecorded" and d["eval_id"] in rows:
            rows[d["eval_id"]].completions_digest = d["completions_digest"]
        elif ev.type == "EvalScored" and d["eval_id"] in rows:
            row = rows[d["eval_id"]]
            row.score = float(d["score"])
            row.metrics = dict(d.get("metrics") or {})
            row.scored_at = ev.recorded_at
    return list(rows.values())


def audit(ledger: Any, run_id: str) -> list[EvalRow]:
    return eval_rows(read_run(ledger, run_id))


# -- lineage -------------------------------------------------------------------


@dataclass
class Lineage:
    run_id: str
    snapshot: dict[str, Any]  # the SnapshotSaved payload (+ version, recorded_at)
    steps: list[dict[str, Any]]  # every step from the start up to the snapshot: step, data_cursor
    since_previous: list[dict[str, Any]]  # the steps since the previous snapshot
    previous_snapshot: str | None
    base_chain: list[dict[str, Any]]  # this snapshot, then the base it applies to, ... down to a base
    evals: list[EvalRow]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["evals"] = [r.to_dict() for r in self.evals]
        return out


def lineage(ledger: Any, snapshot_path: str, run_id: str | None = None) -> Lineage:
    """The run, steps and data cursors that produced a snapshot, its base chain, its evals."""
    candidates = [run_id] if run_id else [r.run_id for r in ledger.runs()]
    for rid in candidates:
        if rid.startswith("sweep:"):
            continue
        events = authoritative(read_run(ledger, rid))
        if any(ev.type == "SnapshotSaved" and ev.data["path"] == snapshot_path for ev in events):
            return _lineage_in(rid, events, snapshot_path)
    where = f"run {run_id!r}" if run_id else "the ledger"
    raise NotFound(f"no snapshot {snapshot_path!r} in {where}")


def _lineage_in(run_id: str, events: list[RecordedEvent], path: str) -> Lineage:
    snapshots: dict[str, dict[str, Any]] = {}
    steps: list[dict[str, Any]] = []
    previous: str | None = None
    since_previous_from = 0  # index into steps where the current snapshot's own steps begin
    target: dict[str, Any] | None = None
    for ev in events:
        if ev.type == "StepCompleted":
            steps.append({"step": ev.data["step"], "data_cursor": ev.data["data_cursor"]})
        elif ev.type == "SnapshotSaved":
            snap = {**ev.data, "version": ev.version, "recorded_at": ev.recorded_at}
            snapshots[snap["path"]] = snap
            if snap["path"] == path:
                target = snap
                break
            previous, since_previous_from = snap["path"], len(steps)
    assert target is not None  # the caller found it in these events
    made_by = [s for s in steps if s["step"] <= target["step"]]
    return Lineage(
        run_id=run_id, snapshot=target, steps=made_by,
        since_previous=made_by[since_previous_from:], previous_snapshot=previous,
        base_chain=_base_chain(target, snapshots),
        evals=[r for r in eval_rows(events) if r.snapshot_path == path],
    )


def _base_chain(snap: dict[str, Any], snapshots: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    chain = [snap]
    seen = {snap["path"]}
    while chain[-1].get("base_path"):
        base = chain[-1]["base_path"]
        if base in seen:  # a malformed log must not loop forever
            break
        seen.add(base)
        chain.append(snapshots.get(base) or {"path": base, "kind": None, "step": None, "missing": True})
    return [{k: s.get(k) for k in ("path", "name", "kind", "step", "base_path")} for s in chain]


# -- replay --------------------------------------------------------------------


@dataclass
class Replay:
    run_id: str
    events: int
    superseded: int
    problems: list[Any]  # the ledger's Problem(run_id, version, reason)
    state: RunState
    evals: list[EvalRow]

    @property
    def intact(self) -> bool:
        return not self.problems


def replay(ledger: Any, run_id: str) -> Replay:
    """Rebuild the run's projections from its events alone, and verify its hash chain."""
    events = read_run(ledger, run_id)
    return Replay(
        run_id=run_id, events=len(events),
        superseded=len(events) - len(authoritative(events)),
        problems=list(ledger.verify(run_id)), state=fold(events, run_id), evals=eval_rows(events),
    )


# -- sweeps --------------------------------------------------------------------


@dataclass
class TrialSummary:
    trial: int
    run_id: str
    params: dict[str, Any]
    status: str  # new (never started) | running | failed | completed
    step: int
    best_score: float | None
    best_step: int | None
    best_snapshot: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_sweep(ledger: Any, sweep_id: str) -> list[TrialSummary]:
    """Per trial: its params, status, and its best score with the snapshot that produced it."""
    events = ledger.read(sweep_stream(sweep_id)) if _has_stream(ledger, sweep_stream(sweep_id)) else []
    started = [ev for ev in events if ev.type == "SweepStarted"]
    if not started:
        raise NotFound(f"no sweep {sweep_id!r} in the ledger")
    out = []
    for trial in started[0].data["trials"]:
        run_events = ledger.read(trial["run_id"]) if _has_stream(ledger, trial["run_id"]) else []
        st = fold(run_events, trial["run_id"])
        scored = [r for r in eval_rows(run_events) if r.score is not None]
        # the earliest step wins a tie: the cheapest snapshot that reached the score
        best = max(scored, key=lambda r: (r.score, -r.step), default=None)
        out.append(TrialSummary(
            trial=trial["trial"], run_id=trial["run_id"], params=dict(trial["params"]),
            status=st.status, step=st.step,
            best_score=best.score if best else None, best_step=best.step if best else None,
            best_snapshot=best.snapshot_path if best else None,
        ))
    return out


def _has_stream(ledger: Any, stream: str) -> bool:
    try:
        return ledger.stream_version(stream) > 0
    except NotFound:
        return False
