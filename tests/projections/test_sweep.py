"""Sweeps: grid expansion, the trial -> run mapping, resuming unfinished trials, MLflow nesting.

The trials here are synthetic runs (tests/projections/streams.py) written by
stand-ins for ``run_spec``/``resume_run``, so the orchestration is tested
without the training loop; the runner's own tests cover the loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import runner.loop
from firetitan_track import Ledger
from runner.cli import main
from firetitan_track.projections.audit import compare_sweep
from runner.sweep import (SweepError, default_sweep_id, expand_grid, parse_grid, plan_sweep,
                          trial_run_id)
from tests.projections.streams import RunWriter

SPEC = Path(__file__).parents[2] / "examples" / "reverse_sft.toml"


class FakeRunner:
    """Writes a short synthetic run per trial; ``crash`` names trials that stop mid-way once."""

    def __init__(self, crash: set[str] = frozenset()) -> None:
        self.crash = set(crash)
        self.calls: list[tuple[str, str]] = []

    def run_spec(self, spec: Any, *, ledger_url: str, run_id: str, sweep_id: str, trial_params: dict,
                 **_: Any) -> runner.loop.RunResult:
        self.calls.append(("start", run_id))
        ledger = Ledger.open(ledger_url)
        w = RunWriter(ledger, run_id)
        w.start(spec=spec.to_dict(), sweep_id=sweep_id, trial_params=trial_params)
        lr = spec.optim.learning_rate
        if run_id in self.crash:
            self.crash.discard(run_id)
            w.train(1, 3, score=lambda n: lr * 100 * n)
            raise RuntimeError("killed mid-run")
        return self._finish(w, 1, lr)

    def resume_run(self, run_id: str, *, ledger_url: str, **_: Any) -> runner.loop.RunResult:
        self.calls.append(("resume", run_id))
        ledger = Ledger.open(ledger_url)
        w = RunWriter(ledger, run_id)
        w.evals = 10
        w.resume()
        lr = next(ev for ev in ledger.read(run_id) if ev.type == "RunStarted").data["spec"]["optim"]["learning_rate"]
        return self._finish(w, 3, lr)

    def _finish(self, w: RunWriter, first: int, lr: float) -> runner.loop.RunResult:
        w.train(first, 4, score=lambda n: lr * 100 * n)
        w.complete(4, f"snapshots/{w.run_id}/sampler-4")
        return runner.loop.RunResult(w.run_id, "completed", 4, lr * 400)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeRunner:
    fake = FakeRunner()
    monkeypatch.setattr(runner.loop, "run_spec", fake.run_spec)
    monkeypatch.setattr(runner.loop, "resume_run", fake.resume_run)
    return fake


def _sweep(ledger_url: str, *args: str) -> Any:
    return CliRunner().invoke(main, ["--ledger", ledger_url, "sweep", str(SPEC),
                                     "--grid", "optim.learning_rate=1e-3,3e-3", "--sweep-id", "lr", *args])


def test_grid_parsing_and_expansion() -> None:
    grid = parse_grid(["optim.learning_rate=1e-3,3e-3", "recipe.batch_size=8,16", "task.name=reverse"])
    assert grid == {"optim.learning_rate": [1e-3, 3e-3], "recipe.batch_size": [8, 16], "task.name": ["reverse"]}
    combos = expand_grid(grid)
    assert len(combos) == 4
    assert combos[1] == {"optim.learning_rate": 1e-3, "recipe.batch_size": 16, "task.name": "reverse"}
    for bad in (["optim.learning_rate"], ["=1,2"], ["a=1", "a=2"], []):
        with pytest.raises(SweepError):
            parse_grid(bad)


def test_the_sweep_id_and_trial_runs_follow_from_the_spec_and_grid(ledger: Ledger) -> None:
    from runner.spec import load_spec

    spec = load_spec(SPEC)
    grid = {"optim.learning_rate": [1e-3, 3e-3]}
    assert default_sweep_id(spec, grid) == default_sweep_id(load_spec(SPEC), dict(grid))
    assert default_sweep_id(spec, grid) != default_sweep_id(spec, {"optim.learning_rate": [1e-3]})
    first = plan_sweep(ledger, spec, grid, "s")
    assert [t.run_id for t in first] == [trial_run_id("s", 0), trial_run_id("s", 1)]
    assert plan_sweep(ledger, spec, grid, "s") == first  # recorded once, found again
    assert ledger.stream_version("sweep:s") == 1
    with pytest.raises(SweepError, match="another spec or grid"):
        plan_sweep(ledger, spec, {"optim.learning_rate": [1e-2]}, "s")


def test_a_bad_grid_key_fails_before_anything_is_written(ledger_url: str, fake: FakeRunner) -> None:
    result = CliRunner().invoke(main, ["--ledger", ledger_url, "sweep", str(SPEC), "--grid", "optim.nope=1,2",
                                       "--no-mlflow"])
    assert result.exit_code != 0 and "optim.nope" in result.output
    assert fake.calls == []


def test_rerunning_a_sweep_resumes_only_unfinished_trials(ledger_url: str, fake: FakeRunner) -> None:
    fake.crash = {"lr-t1"}
    first = _sweep(ledger_url, "--no-mlflow", "--quiet")
    assert first.exit_code == 1, first.output
    assert "1 of 2 trials did not complete" in first.output
    assert fake.calls == [("start", "lr-t0"), ("start", "lr-t1")]

    second = _sweep(ledger_url, "--no-mlflow", "--quiet")
    assert second.exit_code == 0, second.output
    assert fake.calls[2:] == [("resume", "lr-t1")]  # the finished trial is left alone
    third = _sweep(ledger_url, "--no-mlflow", "--quiet")
    assert third.exit_code == 0 and fake.calls[3:] == []

    ledger = Ledger.open(ledger_url)
    trials = compare_sweep(ledger, "lr")
    assert [(t.params["optim.learning_rate"], t.status, t.step) for t in trials] == [
        (1e-3, "completed", 4), (3e-3, "completed", 4)]
    best = trials[1]
    assert (best.best_score, best.best_step, best.best_snapshot) == (
        pytest.approx(1.2), 4, "snapshots/lr-t1/sampler-4")
    ledger.close()


def test_compare_command(ledger_url: str, fake: FakeRunner) -> None:
    assert _sweep(ledger_url, "--no-mlflow", "--quiet").exit_code == 0
    table = CliRunner().invoke(main, ["--ledger", ledger_url, "compare", "lr"])
    assert table.exit_code == 0
    lines = table.output.splitlines()
    assert lines[0].split()[:2] == ["trial", "optim.learning_rate"]
    assert lines[2].split()[:2] == ["1", "0.003"]  # the best trial first
    missing = CliRunner().invoke(main, ["--ledger", ledger_url, "compare", "nope"])
    assert missing.exit_code == 1 and "no sweep 'nope'" in missing.output


def test_sweep_exports_nested_runs(ledger_url: str, fake: FakeRunner, mlflow_server: str, client,
                                   experiment: str) -> None:
    result = _sweep(ledger_url, "--tracking-uri", mlflow_server, "--experiment", experiment, "--quiet")
    assert result.exit_code == 0, result.output

    exp = client.get_experiment_by_name(experiment)
    [parent] = client.search_runs([exp.experiment_id], "tags.ledger_sweep = 'lr'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["ledger_run_id"] for c in children) == ["lr-t0", "lr-t1"]
    assert {c.data.tags["sweep_id"] for c in children} == {"lr"}
