"""The sweep comparison view: per trial of a sweep, its params, status and best score.

A trial's status is whatever its run's fold says (run_state.py), so a new status
there shows here and in the MLflow export without a change in this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from firetitan_track.events import SweepStarted, first_of, sweep_trials
from firetitan_track.ids import sweep_stream
from firetitan_track.ledger import Ledger, NotFound
from firetitan_track.projections.audit import best_eval, eval_rows
from firetitan_track.projections.run_state import fold

if TYPE_CHECKING:
    from firetitan_track.blobs import Json

__all__ = ["TrialSummary", "compare_sweep"]


@dataclass
class TrialSummary:
    trial: int
    run_id: str
    params: dict[str, Json]  # the trial's sampled values, by spec key
    status: str  # as the run's fold says (running, completed, failed, ...), or new: never started
    step: int
    best_score: float | None
    best_step: int | None
    best_snapshot: str | None
    best_scored_at: float | None = None  # unix seconds of the best score's EvalScored

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def compare_sweep(ledger: Ledger, sweep_id: str) -> list[TrialSummary]:
    """Per trial: its params, status, and its best score with the snapshot that produced it."""
    events = ledger.read_or_empty(sweep_stream(sweep_id))
    if first_of(events, SweepStarted) is None:
        raise NotFound(f"no sweep {sweep_id!r} in the ledger")
    out = []
    for trial in sweep_trials(events):
        run_events = ledger.read_or_empty(trial["run_id"])
        st = fold(run_events, trial["run_id"])
        best = best_eval(eval_rows(run_events))
        out.append(TrialSummary(
            trial=trial["trial"], run_id=trial["run_id"], params=dict(trial["params"]),
            status=st.status, step=st.step,
            best_score=best.score if best else None, best_step=best.step if best else None,
            best_snapshot=best.snapshot_path if best else None,
            best_scored_at=best.scored_at if best else None,
        ))
    return out
