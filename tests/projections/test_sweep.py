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
from firetitan_track.ids import sweep_stream
from firetitan_track.projections.compare import compare_sweep
from runner.search import grid_points, parse_grid, parse_params
from runner.sweep import SweepError, plan_sweep, running_trial, trial_run_id
from tests.projections.streams import RunWriter

SPEC = Path(__file__).parents[2] / "examples" / "reverse_sft.toml"


class FakeRunner:
    """Writes a short synthetic run per trial; ``crash`` names trials that stop mid-way once."""

    def __init__(self, crash: set[str] = frozenset()) -> None:
        self.crash = set(crash)
        self.die_before_start: set[str] = set()  # trials whose worker dies before their RunStarted
        self.calls: list[tuple[str, str]] = []

    def run_spec(self, spec: Any, *, ledger_url: str, run_id: str, sweep_id: str, trial_params: dict,
                 **_: Any) -> runner.loop.RunResult:
        self.calls.append(("start", run_id))
        if run_id in self.die_before_start:
            self.die_before_start.discard(run_id)
            raise RuntimeError("the worker died before the trial started")
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


def test_grid_and_param_parsing() -> None:
    grid = parse_grid(["optim.learning_rate=1e-3,3e-3", "recipe.batch_size=8,16", "task.name=reverse"])
    assert {k: d.choices for k, d in grid.items()} == {
        "optim.learning_rate": (1e-3, 3e-3), "recipe.batch_size": (8, 16), "task.name": ("reverse",)}
    combos = grid_points(grid)
    assert len(combos) == 4
    assert combos[1] == {"optim.learning_rate": 1e-3, "recipe.batch_size": 16, "task.name": "reverse"}
    for bad in (["optim.learning_rate"], ["=1,2"], ["a=1", "a=2"], ["a=,,"]):
        with pytest.raises(SweepError):
            parse_grid(bad)
    space = parse_params(["optim.learning_rate=log:1e-4:1e-2", "recipe.batch_size=int:4:16",
                          "optim.beta1=float:0.8:0.95", "task.name=choice:reverse,add"])
    assert [d.text() for d in space.values()] == ["log:0.0001:0.01", "int:4:16", "float:0.8:0.95",
                                                  "choice:reverse,add"]


def test_a_running_trial_is_reopened_on_the_installed_optuna_and_reports_to_the_same_trial() -> None:
    """running_trial is the sweep's one access past Optuna's public API (a FrozenTrial's
    storage id); this holds it to the installed release: a worker that did not ask the trial
    reports to it, sees what an earlier attempt reported, and gets nothing once it is told."""
    import optuna

    from runner.search import pruner_for

    study = optuna.create_study(direction="maximize", pruner=pruner_for("median"))
    asked = study.ask()
    asked.report(0.5, 1)  # an earlier attempt's eval
    found = running_trial(study, asked.number)
    assert found is not None
    trial, reported = found
    assert reported == {1}
    trial.report(0.75, 2)
    assert study.trials[asked.number].intermediate_values == {1: 0.5, 2: 0.75}
    assert not trial.should_prune()  # no finished trial yet: the median rule has no bar
    study.tell(asked.number, 0.75)
    assert running_trial(study, asked.number) is None
    assert running_trial(study, asked.number + 1) is None  # never asked


def test_the_sweep_id_follows_from_the_spec_and_search() -> None:
    from runner.spec import load_spec

    spec = load_spec(SPEC)
    _, a = plan_sweep(spec, grid_items=["optim.learning_rate=1e-3,3e-3"])
    _, b = plan_sweep(load_spec(SPEC), grid_items=["optim.learning_rate=1e-3,3e-3"])
    _, c = plan_sweep(spec, grid_items=["optim.learning_rate=1e-3"])
    _, d = plan_sweep(spec, search="tpe", trials=2, param_items=["optim.learning_rate=log:1e-4:1e-2"])
    assert a.sweep_id == b.sweep_id and len({a.sweep_id, c.sweep_id, d.sweep_id}) == 3
    assert (a.search, a.n_trials, d.search, d.n_trials) == ("grid", 2, "tpe", 2)
    assert trial_run_id("s", 3) == "s-t3"


BAD_INPUTS = [
    (["--search", "tpe", "--trials", "2", "--param", "optim.learning_rate=beta:1:2"], "unknown distribution 'beta'"),
    (["--search", "tpe", "--trials", "2", "--param", "optim.learning_rate=log:1e-2:1e-4"], "must be below HIGH"),
    (["--search", "random", "--trials", "2", "--param", "recipe.batch_size=int:8:8"], "must be below HIGH"),
    (["--search", "tpe", "--trials", "2", "--param", "optim.nope=float:0.1:0.2"], "optim.nope"),
    (["--grid", "optim.learning_rate=,,"], "no values"),
    (["--grid", "optim.learning_rate=1e-3", "--sweep-id", "bad id/with slash"], "--sweep-id"),
    (["--search", "tpe", "--param", "optim.learning_rate=log:1e-4:1e-2"], "needs --trials"),
    (["--search", "grid", "--param", "optim.learning_rate=log:1e-4:1e-2"], "finite list of values"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path, fake: FakeRunner, args: list[str],
                                                         message: str) -> None:
    db = tmp_path / "ledger.db"
    result = CliRunner().invoke(main, ["--ledger", f"sqlite:///{db}", "sweep", str(SPEC), "--no-mlflow", *args])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Error:" in result.output
    assert "run the same command again" not in result.output
    assert not db.exists() and fake.calls == []


def test_a_sweep_id_reused_with_another_search_space_is_refused(ledger_url: str, fake: FakeRunner) -> None:
    assert _sweep(ledger_url, "--no-mlflow", "--quiet").exit_code == 0
    ledger = Ledger.open(ledger_url)
    before = ledger.stream_version(sweep_stream("lr"))
    calls = len(fake.calls)
    other = CliRunner().invoke(main, ["--ledger", ledger_url, "sweep", str(SPEC), "--no-mlflow", "--sweep-id", "lr",
                                      "--grid", "optim.learning_rate=1e-2,3e-2"])
    assert other.exit_code == 1, other.output
    assert ("space is {\"optim.learning_rate\": \"choice:0.001,0.003\"} in the sweep, "
            "{\"optim.learning_rate\": \"choice:0.01,0.03\"} here") in " ".join(other.output.split()), other.output
    tpe = CliRunner().invoke(main, ["--ledger", ledger_url, "sweep", str(SPEC), "--no-mlflow", "--sweep-id", "lr",
                                    "--search", "tpe", "--trials", "2", "--param", "optim.learning_rate=log:1e-4:1e-2"])
    assert tpe.exit_code == 1 and "search is 'grid' in the sweep, 'tpe' here" in tpe.output, tpe.output
    # a spec that really differs: each key named, with the sweep's value and this worker's
    spec = _sweep(ledger_url, "--no-mlflow", "--set", "optim.beta1=0.8", "--set", "recipe.batch_size=8")
    assert spec.exit_code == 1, spec.output
    said = " ".join(spec.output.split())
    assert "optim.beta1 is 0.9 in the sweep, 0.8 here" in said and "recipe.batch_size is 16 in the sweep, 8 here" in said
    assert "backend" not in said
    assert ledger.stream_version(sweep_stream("lr")) == before and len(fake.calls) == calls
    ledger.close()


def test_workers_join_one_sweep_each_with_its_own_machine_settings(ledger_url: str, fake: FakeRunner,
                                                                    tmp_path: Path) -> None:
    """Machine A's worker dies after taking trial 1; machine B, with its own local-service folder,
    device and service address, joins the same sweep, runs trial 1, and records its own settings."""
    fake.die_before_start = {"lr-t1"}
    a = _sweep(ledger_url, "--no-mlflow", "--quiet", "--set", f"backend.state_dir={tmp_path / 'a'}")
    assert a.exit_code == 1 and "lr-t1" in a.output, a.output
    b = _sweep(ledger_url, "--no-mlflow", "--quiet", "--set", f"backend.state_dir={tmp_path / 'b'}",
               "--set", "backend.device=cuda", "--set", "backend.base_url=http://127.0.0.1:8123")
    assert b.exit_code == 0, b.output
    assert fake.calls == [("start", "lr-t0"), ("start", "lr-t1"), ("start", "lr-t1")]
    ledger = Ledger.open(ledger_url)
    backends = {rid: ledger.read(rid)[0].data["spec"]["backend"] for rid in ("lr-t0", "lr-t1")}
    ledger.close()
    assert backends["lr-t0"]["state_dir"] == str(tmp_path / "a") and backends["lr-t0"]["device"] == "cpu"
    assert (backends["lr-t1"]["state_dir"], backends["lr-t1"]["device"], backends["lr-t1"]["base_url"]) == (
        str(tmp_path / "b"), "cuda", "http://127.0.0.1:8123")


def test_the_derived_sweep_id_is_the_same_on_every_machine() -> None:
    from runner.spec import load_spec

    here = load_spec(SPEC)
    there = here.with_overrides({"backend.state_dir": "/elsewhere", "backend.device": "cuda",
                                 "backend.base_url": "http://127.0.0.1:9999"})
    grid = ["optim.learning_rate=1e-3,3e-3"]
    assert plan_sweep(here, grid_items=grid)[1].sweep_id == plan_sweep(there, grid_items=grid)[1].sweep_id
    other = here.with_overrides({"optim.beta1": 0.8})
    assert plan_sweep(here, grid_items=grid)[1].sweep_id != plan_sweep(other, grid_items=grid)[1].sweep_id


def test_a_bad_grid_key_fails_before_anything_is_written(ledger_url: str, fake: FakeRunner) -> None:
    result = CliRunner().invoke(main, ["--ledger", ledger_url, "sweep", str(SPEC), "--grid", "optim.nope=1,2",
                                       "--no-mlflow"])
    assert result.exit_code != 0 and "optim.nope" in result.output
    assert fake.calls == []


def test_rerunning_a_sweep_resumes_only_unfinished_trials(ledger_url: str, fake: FakeRunner) -> None:
    fake.crash = {"lr-t1"}
    first = _sweep(ledger_url, "--no-mlflow", "--quiet")
    assert first.exit_code == 1, first.output
    assert "1 of 2 trials did not complete (lr-t1)" in first.output
    assert fake.calls == [("start", "lr-t0"), ("start", "lr-t1")]

    second = _sweep(ledger_url, "--no-mlflow", "--quiet")
    assert second.exit_code == 0, second.output
    assert fake.calls[2:] == [("resume", "lr-t1")]  # the finished trial is left alone
    third = _sweep(ledger_url, "--no-mlflow", "--quiet")
    assert third.exit_code == 0 and fake.calls[3:] == []

    ledger = Ledger.open(ledger_url)
    trials = sorted(compare_sweep(ledger, "lr"), key=lambda t: t.params["optim.learning_rate"])
    assert [(t.params["optim.learning_rate"], t.status, t.step) for t in trials] == [
        (1e-3, "completed", 4), (3e-3, "completed", 4)]
    best = trials[1]
    assert (best.best_score, best.best_step, best.best_snapshot) == (
        pytest.approx(1.2), 4, f"snapshots/{best.run_id}/sampler-4")
    ledger.close()


def test_compare_command(ledger_url: str, fake: FakeRunner) -> None:
    assert _sweep(ledger_url, "--no-mlflow", "--quiet").exit_code == 0
    table = CliRunner().invoke(main, ["--ledger", ledger_url, "compare", "lr"])
    assert table.exit_code == 0
    lines = table.output.splitlines()
    assert lines[0].split()[:2] == ["trial", "optim.learning_rate"]
    assert lines[2].split()[1] == "0.003"  # the best trial first
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
