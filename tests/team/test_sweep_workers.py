"""Sweeps that several machines join, on one PostgreSQL ledger: N trials in all, none twice;
a trial whose worker died is resumed by another; a pruned trial stops through cleanup.

Each "machine" is its own process with its own TMPDIR and working directory, and in
the first test its own local service (the default state dir is under the working
directory), as two hosts each running the embedded service would be.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from firetitan_track import Ledger
from firetitan_track.projections.audit import audit
from firetitan_track.ids import sweep_stream
from firetitan_track.projections.compare import compare_sweep
from firetitan_track.projections.run_state import fold
from firetitan_track.store import upgrade_schema
from tests.helpers import needs_postgres, small_spec
from tests.team.procs import finish, machine, start

TPE = ["--search", "tpe", "--trials", "4", "--param", "optim.learning_rate=log:1e-3:1e-2",
       "--param", "recipe.batch_size=choice:4,8", "--no-mlflow", "--quiet"]


@pytest.fixture
def pg_ledger(empty_schema_url: str) -> str:
    upgrade_schema(empty_schema_url)  # db upgrade: the ledger's tables and Optuna's
    return empty_schema_url


def _assigned(ledger: Ledger, sweep_id: str) -> list[dict]:
    return [ev.data for ev in ledger.read(sweep_stream(sweep_id)) if ev.type == "TrialAssigned"]


@needs_postgres
def test_two_machines_join_one_tpe_sweep_each_trial_runs_once(pg_ledger: str, tmp_path: Path) -> None:
    import mlflow

    spec = small_spec(tmp_path, "", name="tpe", run={"steps": 2}, backend={"base_url": ""})
    machines = [machine(tmp_path, name) for name in ("host-a", "host-b")]
    try:
        procs = [start(pg_ledger, m, "sweep", str(spec), *TPE, "--sweep-id", "tpe") for m in machines]
        outcomes = [finish(p, timeout=600) for p in procs]
    finally:
        from runner.local.supervisor import stop

        for m in machines:
            stop(Path(m["cwd"]) / ".firetitan" / "local")
    assert [code for code, _ in outcomes] == [0, 0], outcomes

    ledger = Ledger.open(pg_ledger)
    assigned = _assigned(ledger, "tpe")
    assert sorted(a["trial"] for a in assigned) == [0, 1, 2, 3]
    assert len({a["run_id"] for a in assigned}) == 4 and len({a["optuna_trial"] for a in assigned}) == 4
    assert len({a["params"]["optim.learning_rate"] for a in assigned}) == 4  # no two workers asked alike
    trials = compare_sweep(ledger, "tpe")
    assert [t.status for t in trials] == ["completed"] * 4
    for t in trials:  # each trial trained once: one RunStarted, no resume, its sampled params in its spec
        events = ledger.read(t.run_id)
        assert [ev.type for ev in events].count("RunStarted") == 1
        assert not any(ev.type == "RunResumed" for ev in events)
        started = events[0].data
        assert started["sweep_id"] == "tpe" and started["trial_params"] == t.params
        assert started["spec"]["optim"]["learning_rate"] == t.params["optim.learning_rate"]
    # both machines worked (each ran its own local service), and Optuna's study holds the same 4 trials
    both = {ev.data["base_url"] for t in trials for ev in ledger.read(t.run_id) if ev.type == "ProvisionRequested"}
    assert len(both) == 2, both
    import optuna

    from runner.search import storage

    study = optuna.load_study(study_name="tpe", storage=storage(pg_ledger))
    assert sorted(ft.number for ft in study.trials) == sorted(a["optuna_trial"] for a in assigned)
    assert all(ft.state == optuna.trial.TrialState.COMPLETE for ft in study.trials)

    # the MLflow parent and its children come from the ledger
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exported = finish(start(pg_ledger, machines[0], "export", "mlflow", "--tracking-uri", uri, "--experiment", "team",
                            "--no-artifacts", "--quiet"))
    assert exported[0] == 0, exported
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("team")
    [parent] = client.search_runs([exp.experiment_id], "tags.ledger_sweep = 'tpe'")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["ledger_run_id"] for c in children) == sorted(a["run_id"] for a in assigned)
    assert parent.info.status == "FINISHED" and parent.data.params["search"] == "tpe"
    ledger.close()


@needs_postgres
def test_a_killed_workers_trial_is_resumed_by_the_other(pg_ledger: str, tmp_path: Path, local_url: str) -> None:
    spec = small_spec(tmp_path, local_url, name="kill")
    args = ["sweep", str(spec), "--grid", "optim.learning_rate=3e-3,1e-2", "--sweep-id", "kill", "--no-mlflow",
            "--quiet"]
    a, b = machine(tmp_path, "host-a"), machine(tmp_path, "host-b")
    killed = finish(start(pg_ledger, a, *args, crash_at="event:StateSaved:2"))
    assert killed[0] == -signal.SIGKILL, killed
    # host-b joins after host-a died holding the first trial: it takes that trial over (its
    # worker's process is gone; from another host, once the lease's time to live has passed),
    # resumes it from its ledger state, and runs the other
    code, out = finish(start(pg_ledger, b, *args), timeout=600)
    assert code == 0, out

    ledger = Ledger.open(pg_ledger)
    [first, second] = sorted(_assigned(ledger, "kill"), key=lambda a: a["trial"])
    events = ledger.read(first["run_id"])
    assert fold(events).status == "completed"
    [resumed] = [ev for ev in events if ev.type == "RunResumed"]
    assert resumed.data["from_step"] == 2  # resumed from its ledger state, not restarted
    assert [ev.type for ev in events].count("RunStarted") == 1
    assert fold(ledger.read(second["run_id"])).status == "completed"
    assert f"trial 0 ({first['run_id']}): resumed, completed" in out
    ledger.close()


def _answers_the_base_model_gives(tmp_path: Path, ledger_url: str, local_url: str) -> Path:
    """An eval set whose answers are the untrained model's own greedy completions: its score
    starts at 1.0, stays there while training barely moves the weights, and drops when a huge
    learning rate wrecks them (exact-match scores of a few tiny steps are otherwise all 0)."""
    from transformers import AutoTokenizer

    from runner.local.catalogue import tokenizer_path
    from runner.tasks import eval_examples

    questions = tmp_path / "questions.jsonl"
    examples = eval_examples("reverse", seed=7, count=8, digits=3)
    questions.write_text("".join(json.dumps({"messages": ex.chat(), "answer": "?"}) + "\n" for ex in examples))
    probe = small_spec(tmp_path, local_url, name="base", run={"steps": 1}, eval={"prompts": str(questions)})
    code, out = finish(start(ledger_url, machine(tmp_path, "probe"), "run", str(probe), "--run-id", "base", "--quiet"))
    assert code == 0, out
    ledger = Ledger.open(ledger_url)
    [samples] = [ev for ev in ledger.read("base") if ev.type == "SamplesRecorded"][:1]
    completions = ledger.get_json(samples.data["completions_digest"])
    ledger.close()
    specials = AutoTokenizer.from_pretrained(tokenizer_path()).all_special_tokens
    texts = {c["prompt"]: c["text"] for c in completions}
    for token in specials:
        texts = {i: t.replace(token, "") for i, t in texts.items()}
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"messages": ex.chat(), "answer": texts[i].strip()}) + "\n"
                               for i, ex in enumerate(examples)))
    return answers


def test_a_pruned_trial_stops_through_cleanup_and_is_recorded_as_pruned(ledger_url: str, tmp_path: Path,
                                                                          local_url: str) -> None:
    answers = _answers_the_base_model_gives(tmp_path, ledger_url, local_url)
    spec = small_spec(tmp_path, local_url, name="prune", run={"steps": 2}, eval={"prompts": str(answers)},
                      schedule={"eval_every": 1, "save_every": 2})
    # the grid's order is the seeded sampler's: the gentle rate runs first and sets the bar;
    # the wrecking one falls below it at its first eval after training and is pruned there
    args = ["sweep", str(spec), "--grid", "optim.learning_rate=1e-8,1.0", "--prune", "median",
            "--sweep-id", "prune", "--no-mlflow", "--quiet"]
    code, out = finish(start(ledger_url, machine(tmp_path, "host"), *args), timeout=600)
    assert code == 0, out

    ledger = Ledger.open(ledger_url)
    trials = {t.params["optim.learning_rate"]: t for t in compare_sweep(ledger, "prune")}
    assert sorted(trials) == [1e-8, 1.0], out  # the grid's two points, each once
    assert (trials[1e-8].status, trials[1.0].status) == ("completed", "pruned"), out
    assert trials[1e-8].trial == 0
    events = ledger.read(trials[1.0].run_id)
    types = [ev.type for ev in events]
    assert types[-2:] == ["CleanupApplied", "TrialPruned"] and "RunFailed" not in types
    pruned = events[-1].data
    assert pruned["step"] == 1 and trials[1.0].step == 1  # stopped at its first judged eval
    bar = {r.step: r.score for r in audit(ledger, trials[1e-8].run_id)}
    assert pruned["score"] < bar[1]  # below the finished trial's score at that step
    assert "pruned at step 1" in out
    ledger.close()
