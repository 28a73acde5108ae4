"""The audit view: one row per eval, saying which snapshot produced each score, on which prompts.

Built from a run's *authoritative* history (superseded events left out), so a
resumed run reads exactly like an uninterrupted one. The other views of the ledger
each have their module beside this one: lineage.py (where a snapshot came from),
replay.py (rebuild and verify), compare.py (a sweep's trials side by side),
mlflow/ (the MLflow export) and run_state.py (the resume plan).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Sequence

from firetitan_track.events import (EvalScored, EvalStarted, MetricsLogged, ModelPromoted, RecordedEvent, RunStarted,
                                     SamplesRecorded, SnapshotSaved, WeightsSynced, first_of)
from firetitan_track.ledger import VIEW_ERRORS, Ledger, unknown_run, unreadable
from firetitan_track.projections.run_state import authoritative

if TYPE_CHECKING:
    from firetitan_track.blobs import Json
    from firetitan_track.events import Upstream

__all__ = ["EvalRow", "eval_rows", "best_eval", "audit", "read_run", "code_line", "is_eval_metric"]

# The names a recorded program gives its evals: the FireTitan cookbook's ``eval/*``, and
# tinker-cookbook's evaluators' ``test/*`` (an evaluator's metrics carry its name, ``test`` by default).
EVAL_PREFIXES = ("eval/", "test/")


def is_eval_metric(name: str) -> bool:
    """Whether a metric a recorded program logged is an eval's score (see ``EVAL_PREFIXES``)."""
    return name.startswith(EVAL_PREFIXES)


@dataclass
class EvalRow:
    """An eval, and the snapshot it measured.

    ``source`` says what kind: ``eval``, an eval the ledger holds whole (its prompt set,
    sampling, completions, score); ``program``, the eval metrics (``eval/*``, ``test/*``) a recorded program
    logged itself (``metrics``; no prompt set or score of the ledger's own), tied to the
    snapshot its deployment served when they were logged (``measured_on="deployment"``), or,
    when it served none, to the trainer's weights then, and so to the snapshot saved from
    those weights at that optimizer step (``measured_on="trainer"``; no snapshot when none was
    saved there); ``snapshot``, a recorded program's snapshot with no eval logged on it.
    """

    eval_id: str
    step: int | None
    snapshot_path: str | None
    snapshot_kind: str | None  # base | delta; None when the snapshot event is missing
    prompt_set_digest: str | None
    prompt_count: int | None
    sampling: dict[str, Json]
    score: float | None  # None: the eval started but never scored (or a program's: see metrics)
    metrics: dict[str, Json] = field(default_factory=dict)
    sync_duration_s: float | None = None
    completions_digest: str | None = None
    scored_at: float | None = None  # unix seconds of the EvalScored (or MetricsLogged) event
    promoted_as: list[str] = field(default_factory=list)  # model ids promoted from this row's snapshot
    source: str = "eval"  # eval | program | snapshot
    measured_on: str | None = None  # a program's eval: deployment | trainer

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def read_run(ledger: Ledger, run_id: str) -> list[RecordedEvent]:
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
    promoted: dict[str, list[str]] = {}  # snapshot path -> model ids promoted from it
    ev = None
    try:
        for ev in authoritative(events):
            match ev.fact:
                case SnapshotSaved(path=path, kind=kind):
                    kinds[path] = kind
                case WeightsSynced(snapshot_path=path, duration_s=duration):
                    synced[path] = float(duration)
                case EvalStarted() as e:
                    rows[e.eval_id] = EvalRow(
                        eval_id=e.eval_id, step=e.step, snapshot_path=e.snapshot_path,
                        snapshot_kind=kinds.get(e.snapshot_path or ""), prompt_set_digest=e.prompt_set_digest,
                        prompt_count=e.prompt_count, sampling=dict(e.sampling), score=None,
                        sync_duration_s=synced.get(e.snapshot_path or ""),
                    )
                case SamplesRecorded(eval_id=eval_id, completions_digest=digest) if eval_id in rows:
                    rows[eval_id].completions_digest = digest
                case EvalScored(eval_id=eval_id, score=score, metrics=metrics) if eval_id in rows:
                    row = rows[eval_id]
                    row.score = float(score)
                    row.metrics = dict(metrics or {})
                    row.scored_at = ev.recorded_at
                case ModelPromoted(snapshot_path=path, model_id=model_id):
                    promoted.setdefault(path, []).append(model_id)
                case MetricsLogged() as logged:
                    row = _program_eval(ev.event_id, ev.recorded_at, logged)
                    if row is not None:
                        rows[row.eval_id] = row
        if _is_program(events):
            _tie_to_snapshots(list(rows.values()), events, kinds, synced)
            evaluated = {r.snapshot_path for r in rows.values()}
            for ev in authoritative(events):
                if isinstance(snap := ev.fact, SnapshotSaved) and snap.path not in evaluated:
                    evaluated.add(snap.path)
                    rows[f"snapshot@{ev.version}"] = EvalRow(
                        eval_id=f"snapshot@{ev.version}", step=snap.step, snapshot_path=snap.path,
                        snapshot_kind=snap.kind, prompt_set_digest=None, prompt_count=None, sampling={},
                        score=None, sync_duration_s=synced.get(snap.path), source="snapshot")
    except VIEW_ERRORS as exc:  # a stored event its type does not describe: named, never a traceback
        raise unreadable(ev, exc) from None
    for row in rows.values():
        row.promoted_as = list(promoted.get(row.snapshot_path or "", []))
    return list(rows.values())


def _is_program(events: Sequence[RecordedEvent]) -> bool:
    """A recorded program's run (firetitan-track record, autolog)."""
    started = first_of(events, RunStarted)
    return started is not None and isinstance(started.spec, dict) and "program" in started.spec


def _program_eval(event_id: str, recorded_at: float, logged: MetricsLogged) -> EvalRow | None:
    """The eval/* metrics of one MetricsLogged, as a row (None when it holds none)."""
    scores: dict[str, Json] = {k: v for k, v in logged.metrics.items() if is_eval_metric(k)}
    if not scores:
        return None
    served = logged.snapshot_path
    return EvalRow(eval_id=event_id[:12], step=logged.step if logged.step is not None else logged.trainer_step,
                   snapshot_path=served, snapshot_kind=None, prompt_set_digest=None, prompt_count=None,
                   sampling={}, score=None, metrics=scores, scored_at=recorded_at, source="program",
                   measured_on="deployment" if served else "trainer")


def _tie_to_snapshots(rows: list[EvalRow], events: Sequence[RecordedEvent], kinds: dict[str, str],
                      synced: dict[str, float]) -> None:
    """A program's eval logged while its deployment served nothing measured the trainer's
    weights: the snapshot saved from them (at that optimizer step) is the one it scores."""
    saved_at: dict[int, str] = {}
    for ev in authoritative(events):
        if isinstance(snap := ev.fact, SnapshotSaved):
            saved_at.setdefault(int(snap.step), snap.path)
            kinds[snap.path] = snap.kind
    trainer_steps = {ev.event_id[:12]: ev.fact.trainer_step for ev in events if isinstance(ev.fact, MetricsLogged)}
    for row in rows:
        if row.source != "program":
            continue
        if row.snapshot_path is None and trainer_steps.get(row.eval_id) is not None:
            row.snapshot_path = saved_at.get(int(trainer_steps[row.eval_id]))
        row.snapshot_kind = kinds.get(row.snapshot_path or "")
        row.sync_duration_s = synced.get(row.snapshot_path or "")


def upstream(events: Sequence[RecordedEvent]) -> Upstream | None:
    """A chained run's upstream (RunStarted.init_from: run, state, step), None for a run from scratch."""
    started = first_of(events, RunStarted)
    return started.init_from if started is not None else None


def code_line(events: Sequence[RecordedEvent]) -> str:
    """Which code produced the run's scores, in a line: its commit and whether the tree was dirty
    (the recorded diff's digest, for ``blob``), the files outside git, or the version alone for
    a run recorded before code identity."""
    started = first_of(events, RunStarted)
    code = started.code if started is not None else None
    if code is None:
        return f"code: not recorded (firetitan-track {started.code_version if started is not None else '-'})"
    git = code.get("git")
    if git is None:
        return f"code: {code.get('no_git') or 'no git repository'}; {len(code.get('files') or {})} file(s) by digest"
    commit = git.get("commit") or "none yet"
    if not git.get("dirty"):
        return f"code: commit {commit} (clean)"
    changed = len(git.get("changed") or {}) + int(git.get("changed_more") or 0)
    cut = ", cut" if git.get("diff_truncated") else ""
    return (f"code: commit {commit} + uncommitted changes to {changed} file(s) "
            f"(diff {str(git.get('diff_digest'))[:12]}{cut}: `firetitan-track blob` shows it)")


def best_eval(rows: Sequence[EvalRow]) -> EvalRow | None:
    """The scored eval with the highest score; the earliest step wins a tie (the cheapest
    snapshot that reached the score). None when nothing is scored yet."""
    scored = [r for r in rows if r.score is not None]
    return max(scored, key=lambda r: (r.score, -r.step), default=None)


def audit(ledger: Ledger, run_id: str) -> list[EvalRow]:
    return eval_rows(read_run(ledger, run_id))
