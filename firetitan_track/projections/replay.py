"""The replay view: a run's projections rebuilt from its events alone, with its hash chain verified."""

from __future__ import annotations

from dataclasses import dataclass

from firetitan_track.ledger import CorruptLedger, Ledger, Problem, unknown_run
from firetitan_track.projections.audit import EvalRow, eval_rows
from firetitan_track.projections.run_state import RunState, authoritative, fold

__all__ = ["Replay", "replay"]


@dataclass
class Replay:
    run_id: str
    events: int
    superseded: int
    problems: list[Problem]
    state: RunState
    evals: list[EvalRow]

    @property
    def intact(self) -> bool:
        return not self.problems


def replay(ledger: Ledger, run_id: str) -> Replay:
    """Rebuild the run's projections from its events alone, and verify them (chain, payloads,
    blobs, signed heads). A damaged run is still shown as far as it can be rebuilt, beside
    what ``verify`` found."""
    problems = list(ledger.verify(run_id))
    events = ledger.read(run_id, check=not problems)  # unchecked only to show what verify found
    if not events:
        raise unknown_run(run_id)
    state, evals, superseded = RunState(run_id=run_id), [], 0
    try:
        state, evals = fold(events, run_id), eval_rows(events)
        superseded = len(events) - len(authoritative(events))
    except CorruptLedger as e:
        problems.append(Problem(run_id, -1, f"cannot rebuild the views: {e}"))
    return Replay(run_id=run_id, events=len(events), superseded=superseded, problems=problems, state=state,
                  evals=evals)
