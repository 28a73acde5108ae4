"""The replay view: a run's projections rebuilt from its events alone, with its hash chain verified."""

from __future__ import annotations

from dataclasses import dataclass

from firetitan_track.ledger import Ledger, Problem
from firetitan_track.projections.audit import EvalRow, eval_rows, read_run
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
    """Rebuild the run's projections from its events alone, and verify its hash chain."""
    events = read_run(ledger, run_id)
    return Replay(
        run_id=run_id, events=len(events),
        superseded=len(events) - len(authoritative(events)),
        problems=list(ledger.verify(run_id)), state=fold(events, run_id), evals=eval_rows(events),
    )
