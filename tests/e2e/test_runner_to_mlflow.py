"""End to end: the real runner on the real local service, exported to a real `mlflow server`."""

from __future__ import annotations

import json
import signal

from mlflow import MlflowClient

from firetitan_track import Ledger
from firetitan_track.projections.run_state import authoritative
from tests.helpers import cli, small_spec


def _losses(ledger_url: str, run_id: str) -> list[tuple[int, float]]:
    return [(ev.data["step"], ev.data["metrics"]["loss"])
            for ev in authoritative(Ledger.open(ledger_url).read(run_id)) if ev.type == "StepCompleted"]


def _mlflow_run(client: MlflowClient, experiment: str, ledger_run_id: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.ledger_run_id = '{ledger_run_id}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_resumed_run_exports_exactly_its_authoritative_history(local_url, mlflow_server, ledger_url, tmp_path):
    experiment = "e2e-resume"
    spec = small_spec(tmp_path, local_url, name="e2e")
    # Killed once step 4's snapshot is saved (the last state is step 2): steps 3 and 4,
    # already exported below, will be superseded by the resume.
    assert cli(ledger_url, "run", str(spec), "--run-id", "e2e", "--quiet",
               crash_at="event:SnapshotSaved:3").returncode == -signal.SIGKILL
    export = ["export", "mlflow", "e2e", "--tracking-uri", mlflow_server, "--experiment", experiment, "--quiet"]
    assert cli(ledger_url, *export).returncode == 0
    client = MlflowClient(tracking_uri=mlflow_server)
    before = _mlflow_run(client, experiment, "e2e")
    assert [m.step for m in client.get_metric_history(before.info.run_id, "train/loss")] == [1, 2, 3, 4]

    resumed = cli(ledger_url, "resume", "e2e", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert cli(ledger_url, *export).returncode == 0
    run = _mlflow_run(client, experiment, "e2e")
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    expected = _losses(ledger_url, "e2e")
    assert [s for s, _ in history] == [1, 2, 3, 4]  # no superseded point, no duplicate
    assert history == [(s, float(v)) for s, v in expected]
    scores = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/score"))
    assert [s for s, _ in scores] == [0, 2, 4]
    snapshots = [ev for ev in authoritative(Ledger.open(ledger_url).read("e2e")) if ev.type == "SnapshotSaved"]
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    models = client.search_logged_models(experiment_ids=[exp_id])
    assert len(models) == len(snapshots)

    # Exporting again writes nothing.
    assert cli(ledger_url, *export).returncode == 0
    again = _mlflow_run(client, experiment, "e2e")
    assert again.info.run_id == run.info.run_id
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4


def test_sweep_nests_trials_compares_and_never_repeats_a_finished_trial(local_url, mlflow_server, ledger_url,
                                                                          tmp_path):
    spec = small_spec(tmp_path, local_url, name="sw", run={"steps": 2})
    sweep = ["sweep", str(spec), "--grid", "optim.learning_rate=1e-3,3e-3", "--sweep-id", "sw",
             "--tracking-uri", mlflow_server, "--experiment", "e2e-sweep", "--quiet"]
    first = cli(ledger_url, *sweep)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "open it in MLflow: firetitan-track ui" in first.stdout

    rows = json.loads(cli(ledger_url, "compare", "sw", "--json").stdout)
    # every grid point is one trial (Optuna's grid sampler picks their order)
    assert sorted(r["params"]["optim.learning_rate"] for r in rows) == [1e-3, 3e-3]
    assert all(list(r["params"]) == ["optim.learning_rate"] for r in rows)
    for row in rows:
        assert row["status"] == "completed" and row["best_snapshot"]
        evals = [ev.data for ev in Ledger.open(ledger_url).read(row["run_id"]) if ev.type == "EvalScored"]
        assert row["best_score"] == max(e["score"] for e in evals)

    client = MlflowClient(tracking_uri=mlflow_server)
    exp_id = client.get_experiment_by_name("e2e-sweep").experiment_id
    runs = client.search_runs([exp_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.data.params["optim.learning_rate"] for r in children} == {"0.001", "0.003"}

    second = cli(ledger_url, *sweep)
    assert second.returncode == 0
    assert len(client.search_runs([exp_id])) == 3
    for row in rows:  # neither trial started again, nor trained another step
        events = Ledger.open(ledger_url).read(row["run_id"])
        assert sum(ev.type == "RunStarted" for ev in events) == 1
        assert sum(ev.type == "StepCompleted" for ev in events) == 2


def test_ui_serves_the_tracking_store_the_export_wrote(local_url, ledger_url, tmp_path):
    import socket
    import subprocess
    import sys
    import urllib.request

    from firetitan_track.projections.mlflow import wait_for_http
    from tests.helpers import HARNESS, REPO

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = small_spec(tmp_path, local_url, name="ui", run={"steps": 2})
    assert cli(ledger_url, "run", str(spec), "--run-id", "ui", "--quiet", "--export-mlflow", store).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(HARNESS), "ui", "--port", str(port), "--backend-store-uri", store],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert f"http://127.0.0.1:{port}" in proc.stdout.readline()
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=120)
        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        run = _mlflow_run(client, "firetitan-track", "ui")
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
            assert page.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) is not None
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # the server went with the command
