"""What the MLflow export gives a person comparing trials: the experiment's kind, snapshots
named by run and step with their prompt set and the run's best marked, and a sweep parent
that carries each trial's best score and the best trial's params. Against a real server."""

from __future__ import annotations

from firetitan_track import Ledger, new_event
from firetitan_track.projections.compare import compare_sweep
from firetitan_track.projections.mlflow import MlflowExporter, export_mlflow
from tests.projections.streams import PROMPTS, RunWriter, demo_spec


def _models(client, experiment: str, run_id: str) -> dict[str, dict[str, str]]:  # type: ignore[no-untyped-def]
    exp = client.get_experiment_by_name(experiment)
    found = client.search_logged_models([exp.experiment_id], filter_string=f"tags.ledger_run_id = '{run_id}'")
    return {m.name: m.tags for m in found}


def test_snapshots_are_named_by_run_and_step_and_the_best_is_marked(ledger: Ledger, mlflow_server: str, client,
                                                                  experiment: str) -> None:
    w = RunWriter(ledger, "r1")
    w.start()
    scores = {2: 0.5, 4: 0.75, 6: 0.75, 8: 0.9}  # 4 and 6 tie: the earlier snapshot is the better buy
    w.train(1, 6, score=scores.get)
    exporter = MlflowExporter(ledger, mlflow_server, experiment=experiment, run_ids=["r1"])
    exporter.export()

    exp = client.get_experiment_by_name(experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    models = _models(client, experiment, "r1")
    assert sorted(models) == ["r1@step-2", "r1@step-4", "r1@step-6"]
    digest = ledger.put_json(PROMPTS)
    for name, tags in models.items():
        assert tags["snapshot_path"] == f"snapshots/r1/sampler-{name.split('-')[-1]}"
        assert tags["kind"] == ("base" if name.endswith("step-2") else "delta")
        assert tags["prompt_set_digest"] == digest
    assert [n for n, t in models.items() if t.get("best_in_run") == "true"] == ["r1@step-4"]

    w.train(7, 8, score=scores.get)  # a better snapshot arrives: the mark moves to it
    w.complete(8, "snapshots/r1/sampler-8")
    exporter.export()
    models = _models(client, experiment, "r1")
    assert [n for n, t in models.items() if t.get("best_in_run") == "true"] == ["r1@step-8"]


def test_the_sweep_parent_carries_each_trials_best_score_and_the_best_trials_params(
        ledger: Ledger, mlflow_server: str, client, experiment: str) -> None:
    trials = [{"trial": i, "run_id": f"sw-t{i}", "params": {"optim.learning_rate": lr}}
              for i, lr in enumerate([1e-3, 3e-3])]
    ledger.append("sweep:sw", [new_event("SweepStarted", sweep_id="sw", spec_digest="d" * 64,
                                         grid={"optim.learning_rate": [1e-3, 3e-3]}, trials=trials)], 0)
    for t, top in zip(trials, (0.4, 0.8)):
        w = RunWriter(ledger, t["run_id"])
        w.start(spec=demo_spec(t["params"]["optim.learning_rate"]), sweep_id="sw", trial_params=t["params"])
        w.train(1, 4, score=lambda n, top=top: top * n / 4)
        w.complete(4, f"snapshots/{t['run_id']}/sampler-4")
    export_mlflow(ledger, mlflow_server, experiment=experiment)

    exp = client.get_experiment_by_name(experiment)
    [parent] = client.search_runs([exp.experiment_id], "tags.ledger_sweep = 'sw'")
    expected = {t.run_id: t.best_score for t in compare_sweep(ledger, "sw")}
    assert expected == {"sw-t0": 0.4, "sw-t1": 0.8}
    metrics = parent.data.metrics
    assert {k.removeprefix("best_score/"): v for k, v in metrics.items() if k.startswith("best_score/")} == expected
    assert metrics["best_score"] == 0.8
    tags = parent.data.tags
    assert (tags["best_trial"], tags["best.optim.learning_rate"], tags["best_step"]) == ("sw-t1", "0.003", "4")
    assert tags["trials_finished"] == "2"
    # the trials carry their own curves per step
    for t in trials:
        [run] = client.search_runs([exp.experiment_id], f"tags.ledger_run_id = '{t['run_id']}'")
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/score")] == [2, 4]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]


def test_ui_refuses_a_sweep_its_store_lacks_before_serving(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from runner.cli import main

    store = tmp_path / "mlflow.db"
    result = CliRunner().invoke(main, ["ui", "--sweep", "nope", "--backend-store-uri", f"sqlite:///{store}"])
    assert result.exit_code == 1
    assert "export mlflow" in result.output and "MLflow UI for" not in result.output
    assert not store.exists()  # nothing created, nothing served


def test_a_sweep_gets_a_view_of_its_trials_which_differ_in_params_only_by_what_was_swept(
        ledger: Ledger, mlflow_server: str, client, experiment: str) -> None:  # type: ignore[no-untyped-def]
    import json

    from firetitan_track.projections.mlflow.ui import link

    trials = [{"trial": i, "run_id": f"sv-t{i}", "params": {"optim.learning_rate": lr}}
              for i, lr in enumerate([1e-3, 3e-3])]
    ledger.append("sweep:sv", [new_event("SweepStarted", sweep_id="sv", spec_digest="d" * 64, search="grid",
                                         space={"optim.learning_rate": "choice:0.001,0.003"},
                                         grid={"optim.learning_rate": [1e-3, 3e-3]}, trials=trials)], 0)
    for t in trials:  # each trial with its own deployment, and on its own machine's service folder
        spec = demo_spec(t["params"]["optim.learning_rate"],
                         model={"deployment_id": f"dep-{t['run_id']}"}, backend={"state_dir": f"/m{t['trial']}"})
        w = RunWriter(ledger, t["run_id"])
        w.start(spec=spec, sweep_id="sv", trial_params=t["params"])
        w.train(1, 2)
    export_mlflow(ledger, mlflow_server, experiment=experiment)

    exp = client.get_experiment_by_name(experiment)
    runs = {r.data.tags["ledger_run_id"]: r for r in client.search_runs([exp.experiment_id], "tags.sweep_id = 'sv'")
            if "ledger_run_id" in r.data.tags}
    params = [r.data.params for r in runs.values()]
    assert [k for k in params[0] if params[0][k] != params[1].get(k)] == ["optim.learning_rate"]
    assert {r.data.tags["model.deployment_id"] for r in runs.values()} == {"dep-sv-t0", "dep-sv-t1"}
    assert {r.data.tags["backend.state_dir"] for r in runs.values()} == {"/m0", "/m1"}
    assert not any("model.deployment_id" in p or "backend.state_dir" in p or "run.name" in p for p in params)
    assert runs["sv-t0"].data.tags["mlflow.runColor"] != runs["sv-t1"].data.tags["mlflow.runColor"]

    # the view the sweep's link opens: its trials' runs, the score by step, the swept key against it
    base = "http://127.0.0.1:5000"
    assert link(mlflow_server, experiment, base, sweep_id="sv") == (
        f"{base}/#/experiments/{exp.experiment_id}/runs?viewStateShareKey=sweep-sv"
        "&compareRunsMode=CHART&workflowType=machine_learning")
    view = json.loads(exp.tags["mlflow.sharedViewState.sweep-sv"])
    state = json.loads(view["state"])
    assert view["name"] == "sweep sv"
    assert state["searchFilter"] == "tags.sweep_id = 'sv' AND tags.ledger_run_id LIKE '%'"
    found = client.search_runs([exp.experiment_id], state["searchFilter"])
    assert sorted(r.data.tags["ledger_run_id"] for r in found) == ["sv-t0", "sv-t1"]
    charts = {c["type"]: c for c in state["compareRunCharts"]}
    assert charts["LINE"]["metricKey"] == "eval/score" and charts["LINE"]["xAxisKey"] == "step"
    assert (charts["PARALLEL"]["selectedParams"], charts["PARALLEL"]["selectedMetrics"]) == (
        ["optim.learning_rate"], ["eval/score"])

    # a store whose sweep has no view (exported before views) links to the runs comparison page
    client.delete_experiment_tag(exp.experiment_id, "mlflow.sharedViewState.sweep-sv")
    fallback = link(mlflow_server, experiment, base, sweep_id="sv")
    assert fallback.startswith(f"{base}/#/compare-runs?runs=")
    assert runs["sv-t0"].info.run_id in fallback and runs["sv-t1"].info.run_id in fallback
