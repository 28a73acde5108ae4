"""The lineage view: the run, steps and data behind a sampler snapshot, and every eval that used it.

For a recorded program whose data came from its own samples (RL), each step also names the
samples it trained on and the snapshot each was drawn on (``data``): a snapshot's
off-policy history, counted in weight versions (``version_offsets``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

from firetitan_track.events import RecordedEvent, SamplesDrawn, SnapshotSaved, StepCompleted, TrajectoriesRecorded
from firetitan_track.ids import SWEEP_STREAM_PREFIX
from firetitan_track.ledger import Ledger, NotFound
from firetitan_track.projections.audit import EvalRow, eval_rows, read_run, upstream
from firetitan_track.projections.run_state import authoritative

if TYPE_CHECKING:
    from firetitan_track.blobs import Json
    from firetitan_track.events import Upstream

__all__ = ["Lineage", "StepRow", "StepData", "lineage"]


class StepRow(TypedDict):
    """A step behind a snapshot: its number and the data cursor it started from."""

    step: int
    data_cursor: Json


class StepData(TypedDict):
    """Where one step's data came from (``Lineage.data``): the samples it trained on, or a
    multi-turn recipe's trajectories, and the snapshots they were drawn on."""

    step: int
    drawn_on: dict[str, int]
    datums: NotRequired[Json]
    matched: NotRequired[Json]
    version_offsets: NotRequired[dict[str, float]]
    samples_digest: NotRequired[str]
    trajectories: NotRequired[int]
    turns: NotRequired[int]
    trajectories_digest: NotRequired[str]


@dataclass
class Lineage:
    run_id: str
    snapshot: dict[str, Any]  # the SnapshotSaved payload (+ version, recorded_at)
    steps: list[StepRow]  # every step from the start up to the snapshot
    since_previous: list[StepRow]  # the steps since the previous snapshot
    previous_snapshot: str | None
    base_chain: list[dict[str, Any]]  # this snapshot, then the base it applies to, ... down to a base
    evals: list[EvalRow]
    upstream: Upstream | None = None  # a chained run's start: the upstream run, its state and step
    # per step up to the snapshot, where its data came from: datums, matched (to recorded samples),
    # version_offsets, drawn_on ({snapshot the samples were drawn on: how many}); for a runner's
    # multi-turn recipe (igpo), trajectories, turns, trajectories_digest and drawn_on; empty when
    # the run recorded neither (a runner's single-turn run, supervised data)
    data: list[StepData] = field(default_factory=list)
    drawn_on: dict[str, int] = field(default_factory=dict)  # over all those steps

    def to_dict(self) -> dict[str, object]:
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
        if any(isinstance(ev.fact, SnapshotSaved) and ev.fact.path == snapshot_path for ev in events):
            found = _lineage_in(rid, events, snapshot_path)
            found.data, found.drawn_on = _data_behind(ledger, events, found.snapshot["version"])
            return found
    where = f"run {run_id!r}" if run_id else "the ledger"
    raise NotFound(f"no snapshot {snapshot_path!r} in {where}")


def _lineage_in(run_id: str, events: list[RecordedEvent], path: str) -> Lineage:
    snapshots: dict[str, dict[str, Any]] = {}
    steps: list[StepRow] = []
    previous: str | None = None
    since_previous_from = 0  # index into steps where the current snapshot's own steps begin
    target: dict[str, Any] | None = None
    for ev in events:
        if isinstance(fact := ev.fact, StepCompleted):
            steps.append({"step": fact.step, "data_cursor": fact.data_cursor})
        elif isinstance(fact, SnapshotSaved):
            snap = {**fact.payload(), "version": ev.version, "recorded_at": ev.recorded_at}
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


_NOT_RECORDED = "(not recorded)"  # a sample drawn before any sync the run recorded


def _data_behind(ledger: Ledger, events: list[RecordedEvent],
                 until_version: int) -> tuple[list[StepData], dict[str, int]]:
    """Each step before the snapshot (``until_version``) with the samples it trained on."""
    drawn = {ev.event_id: ev.fact for ev in events if isinstance(ev.fact, SamplesDrawn)}
    steps: list[StepData] = []
    total: dict[str, int] = {}
    for ev in events:
        if ev.version >= until_version:
            break
        fact = ev.fact
        if isinstance(fact, TrajectoriesRecorded):  # a runner's multi-turn recipe: one step's episodes
            on = fact.snapshot_path or _NOT_RECORDED
            steps.append({"step": fact.step, "trajectories": fact.trajectories, "turns": fact.turns,
                          "trajectories_digest": fact.trajectories_digest, "drawn_on": {on: fact.trajectories}})
            total[on] = total.get(on, 0) + fact.trajectories
            continue
        provenance = fact.provenance if isinstance(fact, StepCompleted) else None
        if not isinstance(provenance, dict):
            continue
        row: StepData = {"step": fact.step, "datums": provenance.get("datums"),
                         "matched": provenance.get("matched"), "drawn_on": {}}
        if fact.version_offsets:
            row["version_offsets"] = fact.version_offsets
        if provenance.get("samples_digest"):
            row["samples_digest"] = provenance["samples_digest"]
            for event_id, _index in ledger.get_json(provenance["samples_digest"]):
                sample = drawn.get(event_id)
                on = (sample.snapshot_at_send if sample is not None else None) or _NOT_RECORDED
                row["drawn_on"][on] = row["drawn_on"].get(on, 0) + 1
                total[on] = total.get(on, 0) + 1
        steps.append(row)
    return steps, total
