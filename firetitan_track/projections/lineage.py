"""The lineage view: the run, steps and data behind a sampler snapshot, and every eval that used it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from firetitan_track.events import RecordedEvent
from firetitan_track.ledger import Ledger, NotFound
from firetitan_track.projections.audit import EvalRow, eval_rows, read_run, upstream
from firetitan_track.projections.compare import SWEEP_STREAM_PREFIX
from firetitan_track.projections.run_state import authoritative

__all__ = ["Lineage", "lineage"]


@dataclass
class Lineage:
    run_id: str
    snapshot: dict[str, Any]  # the SnapshotSaved payload (+ version, recorded_at)
    steps: list[dict[str, Any]]  # every step from the start up to the snapshot: step, data_cursor
    since_previous: list[dict[str, Any]]  # the steps since the previous snapshot
    previous_snapshot: str | None
    base_chain: list[dict[str, Any]]  # this snapshot, then the base it applies to, ... down to a base
    evals: list[EvalRow]
    upstream: dict[str, Any] | None = None  # a chained run's start: the upstream run, its state and step

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["evals"] = [r.to_dict() for r in self.evals]
        return out


def lineage(ledger: Ledger, snapshot_path: str, run_id: str | None = None) -> Lineage:
    """The run, steps and data cursors that produced a snapshot, its base chain, its evals."""
    candidates = [run_id] if run_id else [r.run_id for r in ledger.runs()]
    for rid in candidates:
        if rid.startswith(SWEEP_STREAM_PREFIX):
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
        evals=[r for r in eval_rows(events) if r.snapshot_path == path], upstream=upstream(events),
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
