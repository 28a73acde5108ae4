"""The diff view: how two runs differ, and the first step at which their training parts.

Built from each run's authoritative history, like every view:

- ``spec``: every flattened spec key whose values differ, with both values;
- ``prompt_sets``: per named set (eval, train) whether the digests match, and how many
  examples differ (same index, different content, plus any only one set has); a set
  whose record had secrets masked out of it (``masked_a``/``masked_b``: RunStarted's
  ``prompt_sets_masked``) is not the data that run saw, so equal digests with unequal
  masking are not the same data;
- ``code``: whether the same code ran (``same``), each run's commit, dirty flag and
  firetitan-track version (``a``, ``b``), and what differs (``differences``: commits, dirty,
  the files whose content differs, the entry script, package versions, Python, device, and
  the command line, which is how a program was invoked rather than code: it keeps two runs
  from being identical, not their code from being the same); a run recorded before code
  identity has only its firetitan-track version to compare;
- ``first_divergent_step``: the first step whose StepCompleted differs in its data (data
  cursor, micro-batches), its optimizer settings or its loss (``divergence`` names the
  fields); a step only one run has counts too;
- ``scores``: per eval step in either run, both scores and the gap (b - a).

Losses are compared to a relative 1e-6: a rerun on a GPU backend need not reproduce the
last bits of a float, and a real difference in data or settings moves a loss far more.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Mapping, TypedDict

from firetitan_track.code_identity import Change, CodeDifferences, code_differences
from firetitan_track.errors import UserError
from firetitan_track.events import RecordedEvent, RunStarted, StepCompleted, first_of
from firetitan_track.ledger import Ledger, LedgerError
from firetitan_track.projections.audit import eval_rows, read_run
from firetitan_track.projections.mlflow.keys import flatten
from firetitan_track.projections.run_state import authoritative

if TYPE_CHECKING:
    from firetitan_track.blobs import Json

__all__ = ["RunDiff", "PromptSetDiff", "ScoreDiff", "CodeSummary", "CodeComparison", "diff_runs", "report",
           "LOSS_REL_TOL"]

LOSS_REL_TOL = 1e-6


class CodeSummary(TypedDict):
    """One run's code, in brief: whether it was recorded, its commit and dirty flag (None
    outside git), why there was no git, and the firetitan-track version."""

    recorded: bool
    commit: str | None
    dirty: bool | None
    no_git: str | None
    code_version: str


class CodeComparison(TypedDict):
    """``RunDiff.code``: see the module docstring."""

    same: bool
    a: CodeSummary
    b: CodeSummary
    differences: CodeDifferences


@dataclass
class PromptSetDiff:
    same: bool
    a: str | None  # digest; None when the run has no such set
    b: str | None
    examples_a: int | None  # None when the blob is not in the ledger
    examples_b: int | None
    differing_examples: int | None
    masked_a: int = 0  # strings masked in the record of what run a saw
    masked_b: int = 0


@dataclass
class ScoreDiff:
    step: int
    a: float | None
    b: float | None
    gap: float | None  # b - a, when both scored


@dataclass
class RunDiff:
    a: str
    b: str
    spec: dict[str, Change[object]]  # differing key -> {"a": ..., "b": ...}
    prompt_sets: dict[str, PromptSetDiff]
    code: CodeComparison
    first_divergent_step: int | None
    divergence: dict[str, Change[object]] = field(default_factory=dict)  # at that step: field -> {"a", "b"}
    scores: list[ScoreDiff] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return (not self.spec and all(p.same for p in self.prompt_sets.values()) and not self.code["differences"]
                and self.first_divergent_step is None and all(s.gap == 0 for s in self.scores))

    def to_dict(self) -> dict[str, object]:
        return {"a": self.a, "b": self.b, "identical": self.identical, "spec": self.spec,
                "prompt_sets": {k: asdict(v) for k, v in self.prompt_sets.items()},
                "code": self.code, "first_divergent_step": self.first_divergent_step,
                "divergence": self.divergence, "scores": [asdict(s) for s in self.scores]}


class NotATrainingRun(UserError):
    """A stream with no RunStarted (a sweep's stream, say): there is nothing to diff."""


def diff_runs(ledger: Ledger, run_a: str, run_b: str) -> RunDiff:
    """How ``run_b`` differs from ``run_a``; NotFound names an unknown run."""
    events_a, events_b = authoritative(read_run(ledger, run_a)), authoritative(read_run(ledger, run_b))
    start_a, start_b = _started(run_a, events_a), _started(run_b, events_b)
    step, fields = _first_divergence(events_a, events_b)
    return RunDiff(
        a=run_a, b=run_b,
        spec=_differing(flatten(start_a.spec or {}), flatten(start_b.spec or {})),
        prompt_sets=_prompt_sets(ledger, start_a.prompt_sets or {}, start_b.prompt_sets or {},
                                 start_a.prompt_sets_masked or {}, start_b.prompt_sets_masked or {}),
        code=_code(start_a, start_b),
        first_divergent_step=step, divergence=fields, scores=_scores(events_a, events_b),
    )


def _started(run_id: str, events: list[RecordedEvent]) -> RunStarted:
    started = first_of(events, RunStarted)
    if started is not None:
        return started
    raise NotATrainingRun(f"{run_id} is not a training run (its stream has no RunStarted event)")


def _differing(a: Mapping[str, object], b: Mapping[str, object]) -> dict[str, Change[object]]:
    return {k: {"a": a.get(k), "b": b.get(k)} for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


# -- code --------------------------------------------------------------------------------


def _code(start_a: RunStarted, start_b: RunStarted) -> CodeComparison:
    ca, cb = start_a.code, start_b.code
    differences: CodeDifferences = {}
    if ca is not None and cb is not None:
        differences = code_differences(ca, cb)
    elif (ca is None) != (cb is None):
        differences["recorded"] = {"a": ca is not None, "b": cb is not None}
    if start_a.code_version != start_b.code_version:
        differences["code_version"] = {"a": start_a.code_version, "b": start_b.code_version}
    return {"same": not (differences.keys() - {"argv"}), "a": _code_summary(start_a), "b": _code_summary(start_b),
            "differences": differences}


def _code_summary(started: RunStarted) -> CodeSummary:
    code = started.code
    git = (code or {}).get("git")
    return {"recorded": code is not None, "commit": git.get("commit") if git else None,
            "dirty": git.get("dirty") if git else None, "no_git": (code or {}).get("no_git"),
            "code_version": started.code_version}


# -- prompt sets -------------------------------------------------------------------------


def _prompt_sets(ledger: Ledger, sets_a: dict[str, str], sets_b: dict[str, str],
                 masked_a: dict[str, int], masked_b: dict[str, int]) -> dict[str, PromptSetDiff]:
    out = {}
    for name in sorted(sets_a.keys() | sets_b.keys()):
        da, db = sets_a.get(name), sets_b.get(name)
        xa, xb = _examples(ledger, da), _examples(ledger, db)
        differing = None
        if da == db:
            differing = 0
        elif xa is not None and xb is not None:
            differing = sum(x != y for x, y in zip(xa, xb)) + abs(len(xa) - len(xb))
        ma, mb = masked_a.get(name, 0), masked_b.get(name, 0)
        out[name] = PromptSetDiff(same=da == db and ma == mb, a=da, b=db,
                                  examples_a=None if xa is None else len(xa),
                                  examples_b=None if xb is None else len(xb), differing_examples=differing,
                                  masked_a=ma, masked_b=mb)
    return out


def _examples(ledger: Ledger, digest: str | None) -> list[Json] | None:
    if digest is None:
        return []
    try:
        examples = ledger.get_json(digest)
    except LedgerError:  # NotFound included: a digest whose blob this ledger lacks
        return None
    return examples if isinstance(examples, list) else None


# -- training ----------------------------------------------------------------------------


def _steps(events: list[RecordedEvent]) -> dict[int, StepCompleted]:
    return {ev.fact.step: ev.fact for ev in events if isinstance(ev.fact, StepCompleted)}


def _first_divergence(events_a: list[RecordedEvent],
                      events_b: list[RecordedEvent]) -> tuple[int | None, dict[str, Change[object]]]:
    steps_a, steps_b = _steps(events_a), _steps(events_b)
    for step in sorted(steps_a.keys() | steps_b.keys()):
        a, b = steps_a.get(step), steps_b.get(step)
        if a is None or b is None:
            return step, {"present": {"a": a is not None, "b": b is not None}}
        fields = _step_differences(a, b)
        if fields:
            return step, fields
    return None, {}


def _step_differences(a: StepCompleted, b: StepCompleted) -> dict[str, Change[object]]:
    out: dict[str, Change[object]] = {}
    if a.data_cursor != b.data_cursor:
        out["data_cursor"] = {"a": a.data_cursor, "b": b.data_cursor}
    if a.micro_batches != b.micro_batches:
        out["micro_batches"] = {"a": a.micro_batches, "b": b.micro_batches}
    for k, v in _differing(flatten(a.optimizer or {}), flatten(b.optimizer or {})).items():
        out[f"optimizer.{k}"] = v
    losses_a, losses_b = _losses(a), _losses(b)
    for k in sorted(losses_a.keys() | losses_b.keys()):
        x, y = losses_a.get(k), losses_b.get(k)
        if x is None or y is None or not math.isclose(x, y, rel_tol=LOSS_REL_TOL):
            out[f"metrics.{k}"] = {"a": x, "b": y}
    return out


def _losses(step: StepCompleted) -> dict[str, float]:
    return {k: float(v) for k, v in flatten(step.metrics or {}).items()
            if "loss" in k and isinstance(v, (int, float)) and not isinstance(v, bool)}


# -- scores ------------------------------------------------------------------------------


def _scores(events_a: list[RecordedEvent], events_b: list[RecordedEvent]) -> list[ScoreDiff]:
    def by_step(events: list[RecordedEvent]) -> dict[int, float]:
        return {r.step: r.score for r in eval_rows(events) if r.score is not None}

    a, b = by_step(events_a), by_step(events_b)
    return [ScoreDiff(step, a.get(step), b.get(step),
                      b[step] - a[step] if step in a and step in b else None)
            for step in sorted(a.keys() | b.keys())]


# -- the human report --------------------------------------------------------------------


def report(d: RunDiff) -> str:
    """A few lines a person reads in ten seconds."""
    if d.identical:
        evals = f"{len(d.scores)} evals" if d.scores else "no evals"
        return (f"{d.a} and {d.b} do not differ: same spec, prompt sets, code, "
                f"training and scores ({evals})")
    lines = [f"{d.a} -> {d.b}"]
    spec = [f"{k}: {_v(v['a'])} -> {_v(v['b'])}" for k, v in d.spec.items()]
    lines += _block("spec", spec[:6] + ([f"... {len(spec) - 6} more"] if len(spec) > 6 else []) or ["same"])
    sets = []
    for name, p in d.prompt_sets.items():
        if p.same:
            sets.append(f"{name}: same ({(p.a or '-')[:12]}, {_v(p.examples_a)} examples)")
        elif p.a == p.b:  # one record, but secrets masked out of what one run saw
            sets.append(f"{name}: same record ({(p.a or '-')[:12]}), but the data differ: the record masks "
                        f"{p.masked_a} string(s) of what {d.a} saw, {p.masked_b} of what {d.b} saw")
        else:
            sets.append(f"{name}: {(p.a or 'none')[:12]} -> {(p.b or 'none')[:12]}, "
                        f"{_v(p.differing_examples)} of {_v(p.examples_a)}/{_v(p.examples_b)} examples differ")
    lines += _block("prompt sets", sets or ["none"])
    lines += _block("code", _code_lines(d.code))
    if d.first_divergent_step is None:
        training = ["same at every step"]
    else:
        what = ", ".join(f"{k} {_v(v['a'])} -> {_v(v['b'])}" for k, v in d.divergence.items())
        training = [f"first differs at step {d.first_divergent_step}: {what}"]
    lines += _block("training", training)
    lines += _block("scores", [_scores_line(d.scores)])
    return "\n".join(lines)


def _code_lines(code: CodeComparison) -> list[str]:
    a, b, diff = code["a"], code["b"], code["differences"]
    if "recorded" in diff:
        who = "a" if diff["recorded"]["a"] else "b"
        return [f"recorded only for {who} (the other run predates code identity; firetitan-track "
                f"{_v(a['code_version'])} -> {_v(b['code_version'])})"]
    if not a["recorded"]:  # neither run recorded its code: only the package version to go by
        cv = diff.get("code_version")
        return [f"not recorded; firetitan-track {_v(cv['a'])} -> {_v(cv['b'])}" if cv
                else f"not recorded; firetitan-track {_v(a['code_version'])} in both"]
    where = (f"commit {_short(a['commit'])}" if a["commit"] else (a["no_git"] or "no commit"))
    state = "dirty" if a["dirty"] else "clean"
    if not diff:
        return [f"same ({where}, {state})"]
    first = []
    if "commit" in diff:
        first.append(f"commit {_short(diff['commit']['a'])} -> {_short(diff['commit']['b'])}")
    else:
        first.append(f"{where} in both")
    if "dirty" in diff:
        first.append(f"{'dirty' if diff['dirty']['b'] else 'clean'} (was {'dirty' if diff['dirty']['a'] else 'clean'})")
    elif a["dirty"]:
        first.append("dirty in both")
    if diff.get("files"):
        files = diff["files"]
        first.append(f"{', '.join(files[:6])}{f' and {len(files) - 6} more' if len(files) > 6 else ''} differ"
                     if len(files) > 1 else f"{files[0]} differs")
    if "diff" in diff:
        first.append(f"uncommitted diff {(diff['diff']['a'] or '-')[:12]} -> {(diff['diff']['b'] or '-')[:12]}")
    lines = ["; ".join(first)]
    if "entry" in diff:
        ea, eb = diff["entry"]["a"] or {}, diff["entry"]["b"] or {}
        lines.append(f"entry script {_v(ea.get('path'))} ({(ea.get('digest') or '-')[:12]}) -> "
                     f"{_v(eb.get('path'))} ({(eb.get('digest') or '-')[:12]})")
    for name, v in diff.get("packages", {}).items():
        lines.append(f"{name} {v['a'] or 'not installed'} -> {v['b'] or 'not installed'}")
    for key in ("python", "device", "code_version"):
        if key in diff:
            label = "firetitan-track" if key == "code_version" else key
            lines.append(f"{label} {_v(diff[key]['a'])} -> {_v(diff[key]['b'])}")
    if "argv" in diff:
        lines.append(f"command line {_argv(diff['argv']['a'])} -> {_argv(diff['argv']['b'])}")
    return lines


def _short(commit: str | None) -> str:
    return commit[:12] if commit else "none"


def _argv(argv: list[str] | None) -> str:
    return " ".join(argv) if argv else "-"


def _block(title: str, items: list[str]) -> list[str]:
    return [f"{title:13} {item}" if i == 0 else f"{'':13} {item}" for i, item in enumerate(items)]


def _scores_line(scores: list[ScoreDiff]) -> str:
    if not scores:
        return "no evals"
    differing = [s for s in scores if s.gap != 0]
    last = scores[-1]
    tail = f"last, step {last.step}: {_v(last.a)} vs {_v(last.b)}{_gap(last)}"
    if not differing:
        return f"same at all {len(scores)} evals ({tail})"
    known = [s for s in differing if s.gap is not None]
    widest = max(known, key=lambda s: abs(s.gap or 0.0), default=None)
    most = f"; largest gap at step {widest.step}: {_v(widest.a)} vs {_v(widest.b)}{_gap(widest)}" if widest else ""
    return f"{len(differing)} of {len(scores)} evals differ{most}; {tail}"


def _gap(s: ScoreDiff) -> str:
    return f" ({s.gap:+.4g})" if s.gap else ""


def _v(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
