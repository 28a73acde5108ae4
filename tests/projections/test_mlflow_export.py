"""The MLflow exporter against a real ``mlflow server``: the view equals the ledger's history."""

from __future__ import annotations

import json

from firetitan_track import FollowCursor, Ledger, new_event
from firetitan_track.projections.audit import eval_rows
from firetitan_track.projections.mlflow import (TAG_PARENT, LiveExporter, MlflowExporter,
                                                export_mlflow)
from firetitan_track.projections.run_state import authoritative
from tests.projections.streams import PROMPTS, RunWriter, demo_spec, write_run


def _active_runs(client, experiment: str, run_id: str | None = None):  # type: ignore[no-untyped-def]
    exp = client.get_experiment_by_name(experiment)
    query = f"tags.ledger_run_id = '{run_id}'" if run_id else ""
    return client.search_runs([exp.experiment_id], query)


def _history(client, ml_run: str, key: str) -> list[tuple[int, float, int]]:  # type: ignore[no-untyped-def]
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(ml_run, key))


def _expected(ledger: Ledger, run_id: str, type: str, value) -> list[tuple[int, float, int]]:  # type: ignore[no-untyped-def]
    return sorted((ev.data["step"], value(ev.data), round(ev.recorded_at * 1000))
                  for ev in authoritative(ledger.read(run_id)) if ev.type == type)


def test_export_projects_a_run(ledger: Ledger, mlflow_server: str, client, experiment: str) -> None:
    write_run(ledger, "r1", steps=8)
    report = export_mlflow(ledger, mlflow_server, experiment=experiment)
    assert report.runs == ["r1"]

    [run] = _active_runs(client, experiment, "r1")
    ml = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.learning_rate"] == "0.001"
    assert run.data.params["model.lora_rank"] == "8"
    assert run.data.params["schedule.eval_every"] == "2"
    tags = run.data.tags
    assert (tags["trainer_job_id"], tags["deployment_id"], tags["backend"], tags["code_version"]) == (
        "job-r1", "dep-r1", "local", "abc123")
    # every point keeps its step and its event's own timestamp
    assert _history(client, ml, "train/loss") == _expected(ledger, "r1", "StepCompleted",
                                                          lambda d: d["metrics"]["loss"])
    assert _history(client, ml, "eval/score") == _expected(ledger, "r1", "EvalScored", lambda d: d["score"])
    assert _history(client, ml, "sync/duration_s") == _expected(ledger, "r1", "WeightsSynced",
                                                               lambda d: d["duration_s"])

    # the prompt set is the run's dataset, its digest a prefix of the ledger's, the whole in the source
    [ds_input] = run.inputs.dataset_inputs
    digest = ledger.put_json(PROMPTS)
    assert ds_input.dataset.digest == digest[:36]
    assert json.loads(ds_input.dataset.source)["uri"] == f"ledger-blob:{digest}"

    artifacts = {a.path for a in client.list_artifacts(ml)}
    assert {"spec.json", "eval_score.png", "prompts", "completions"} <= artifacts
    spec = json.loads(open(client.download_artifacts(ml, "spec.json")).read())
    assert spec == demo_spec()
    assert len(client.list_artifacts(ml, "completions")) == 4


def test_logged_models_hold_their_eval_metrics(ledger: Ledger, mlflow_server: str, client,
                                               experiment: str) -> None:
    write_run(ledger, "r1", steps=8)
    export_mlflow(ledger, mlflow_server, experiment=experiment)
    exp = client.get_experiment_by_name(experiment)

    models = client.search_logged_models([exp.experiment_id], filter_string="tags.ledger_run_id = 'r1'")
    by_path = {m.tags["snapshot_path"]: m for m in models}
    rows = eval_rows(ledger.read("r1"))
    assert set(by_path) == {r.snapshot_path for r in rows}
    for row in rows:
        model = by_path[row.snapshot_path]
        assert model.tags["kind"] == row.snapshot_kind
        assert model.source_run_id == _active_runs(client, experiment, "r1")[0].info.run_id
        scores = [m for m in model.metrics if m.key == "eval/score"]
        assert [(m.step, m.value) for m in scores] == [(row.step, row.score)]
        assert scores[0].dataset_digest == row.prompt_set_digest[:36]

    best = client.search_logged_models([exp.experiment_id], filter_string="metrics.`eval/score` > 0.7")
    assert [m.tags["snapshot_path"] for m in best] == ["snapshots/r1/sampler-8"]


def test_reexport_writes_nothing(ledger: Ledger, mlflow_server: str, client, experiment: str) -> None:
    write_run(ledger, "r1", steps=6)
    export_mlflow(ledger, mlflow_server, experiment=experiment)
    [run] = _active_runs(client, experiment)
    before = {k: _history(client, run.info.run_id, k) for k in run.data.metrics}

    again = export_mlflow(ledger, mlflow_server, experiment=experiment)  # the checkpoint says: caught up
    assert (again.events, again.metrics) == (0, 0)
    # a follower of this run alone has no checkpoint: the run's own ledger_events tag stops it
    alone = export_mlflow(ledger, mlflow_server, ["r1"], experiment=experiment)
    assert alone.events > 0 and alone.metrics == 0 and alone.runs == []

    [after] = _active_runs(client, experiment)
    assert after.info.run_id == run.info.run_id
    assert {k: _history(client, run.info.run_id, k) for k in after.data.metrics} == before
    exp = client.get_experiment_by_name(experiment)
    assert len(client.search_logged_models([exp.experiment_id])) == 3


def test_export_resumes_from_its_checkpoint(ledger: Ledger, mlflow_server: str, client,
                                            experiment: str) -> None:
    w = RunWriter(ledger, "r1")
    w.start()
    w.train(1, 4)
    first = export_mlflow(ledger, mlflow_server, experiment=experiment)
    w.train(5, 8)
    w.complete(8, "snapshots/r1/sampler-8")
    second = export_mlflow(ledger, mlflow_server, experiment=experiment)
    assert second.events == ledger.stream_version("r1") - first.events  # only the new ones

    [run] = _active_runs(client, experiment)
    assert run.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "train/loss") == _expected(
        ledger, "r1", "StepCompleted", lambda d: d["metrics"]["loss"])


def test_resume_after_export_leaves_only_the_authoritative_history(
        ledger: Ledger, mlflow_server: str, client, experiment: str) -> None:
    w = RunWriter(ledger, "r1")
    w.start()
    w.train(1, 4)
    w.step(5)
    w.step(6)  # a crash after step 6: steps 5 and 6 will be superseded
    export_mlflow(ledger, mlflow_server, experiment=experiment)
    [old] = _active_runs(client, experiment)
    assert [s for s, _, _ in _history(client, old.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]

    dropped = w.resume()
    assert dropped
    w.loss_scale = 2.0  # the redone steps differ from the superseded ones
    w.train(5, 8)
    w.complete(8, "snapshots/r1/sampler-8")
    report = export_mlflow(ledger, mlflow_server, experiment=experiment)
    assert report.rebuilt == ["r1"]

    [run] = _active_runs(client, experiment)  # one active run: the old one is deleted
    assert run.info.run_id != old.info.run_id
    assert client.get_run(old.info.run_id).info.lifecycle_stage == "deleted"
    for key, type, value in [("train/loss", "StepCompleted", lambda d: d["metrics"]["loss"]),
                             ("eval/score", "EvalScored", lambda d: d["score"])]:
        assert _history(client, run.info.run_id, key) == _expected(ledger, "r1", type, value)
    steps = [s for s, _, _ in _history(client, run.info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # each step once: no superseded point remains
    exp = client.get_experiment_by_name(experiment)
    paths = sorted(m.tags["snapshot_path"] for m in client.search_logged_models([exp.experiment_id]))
    # the snapshot at step 4 followed the last saved state, so the resume superseded it too
    assert paths == [f"snapshots/r1/sampler-{n}" for n in (2, 6, 8)]


def test_a_resume_that_supersedes_nothing_exported_keeps_the_run(
        ledger: Ledger, mlflow_server: str, client, experiment: str) -> None:
    w = RunWriter(ledger, "r1")
    w.start()
    w.step(1)
    w.step(2)
    w.save_state(2)
    export_mlflow(ledger, mlflow_server, experiment=experiment)
    [before] = _active_runs(client, experiment)
    w.step(3)  # not exported before the resume supersedes it
    w.resume()
    w.train(3, 6)
    report = export_mlflow(ledger, mlflow_server, experiment=experiment)
    assert report.rebuilt == []
    [after] = _active_runs(client, experiment)
    assert after.info.run_id == before.info.run_id
    assert [s for s, _, _ in _history(client, after.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]


def test_large_runs_are_written_within_log_batch_limits(ledger: Ledger, mlflow_server: str, client,
                                                        experiment: str) -> None:
    # 1,300 steps x 3 metrics: several log_batch calls, each under the server's 1,000-metric limit
    w = RunWriter(ledger, "big")
    w.start(spec={"flat": {f"p{i}": i for i in range(150)}})  # 150 params: two calls of at most 100
    events = [new_event("StepCompleted", step=n, data_cursor=n, micro_batches=1,
                        metrics={"loss": 1 / n, "grad_norm": n}, optimizer={"learning_rate": 1e-3})
              for n in range(1, 1301)]
    ledger.append("big", events, w.version)
    report = export_mlflow(ledger, mlflow_server, experiment=experiment)
    assert report.metrics == 3900
    [run] = _active_runs(client, experiment)
    assert len(run.data.params) == 150
    assert len(client.get_metric_history(run.info.run_id, "train/grad_norm")) == 1300


def test_sweep_trials_nest_under_a_parent_run(ledger: Ledger, mlflow_server: str, client,
                                             experiment: str) -> None:
    trials = [{"trial": i, "run_id": f"sw-{i}", "params": {"optim.learning_rate": lr}}
              for i, lr in enumerate([1e-3, 3e-3])]
    ledger.append("sweep:sw", [new_event("SweepStarted", sweep_id="sw", spec_digest="d" * 64,
                                         grid={"optim.learning_rate": [1e-3, 3e-3]}, trials=trials)], 0)
    for t in trials:
        write_run(ledger, t["run_id"], steps=4, spec=demo_spec(t["params"]["optim.learning_rate"]),
                  sweep_id="sw", trial_params=t["params"])
    export_mlflow(ledger, mlflow_server, experiment=experiment)

    exp = client.get_experiment_by_name(experiment)
    [parent] = client.search_runs([exp.experiment_id], "tags.ledger_sweep = 'sw'")
    assert parent.data.params["grid.optim.learning_rate"] == "[0.001, 0.003]"
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["ledger_run_id"] for c in children) == ["sw-0", "sw-1"]
    assert sorted(c.data.params["optim.learning_rate"] for c in children) == ["0.001", "0.003"]


def test_live_exporter_flushes_on_stop(ledger_url: str, mlflow_server: str, client, experiment: str) -> None:
    ledger = Ledger.open(ledger_url)
    w = RunWriter(ledger, "live")
    w.start()
    with LiveExporter(ledger_url, mlflow_server, "live", experiment=experiment, poll_s=0.2):
        w.train(1, 6)
        w.complete(6, "snapshots/live/sampler-6")
    [run] = _active_runs(client, experiment, "live")
    assert run.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "train/loss") == _expected(
        ledger, "live", "StepCompleted", lambda d: d["metrics"]["loss"])
    ledger.close()


def test_live_exporter_ends_with_a_run_killed_outright(ledger_url: str, mlflow_server: str, client,
                                                     experiment: str) -> None:
    """A SIGKILLed training process cannot call stop(): its follower still flushes and exits."""
    import os
    import signal
    import subprocess
    import sys
    import time

    ledger = Ledger.open(ledger_url)
    w = RunWriter(ledger, "killed")
    w.start()
    w.train(1, 3)
    script = ("import sys, time\n"
              "from firetitan_track.projections.mlflow import LiveExporter\n"
              "live = LiveExporter(sys.argv[1], sys.argv[2], 'killed', experiment=sys.argv[3], poll_s=0.2).start()\n"
              "print(live._proc.pid, flush=True)\n"
              "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, ledger_url, mlflow_server, experiment],
                              stdout=subprocess.PIPE, text=True)
    follower = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(follower, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(follower, signal.SIGKILL)
        raise AssertionError("the follower outlived its killed run")
    [run] = _active_runs(client, experiment, "killed")  # it flushed what was recorded before it went
    assert _history(client, run.info.run_id, "train/loss") == _expected(
        ledger, "killed", "StepCompleted", lambda d: d["metrics"]["loss"])
    ledger.close()


def test_exporter_uses_no_checkpoint_for_a_subset(ledger: Ledger, mlflow_server: str, experiment: str) -> None:
    write_run(ledger, "r1", steps=2)
    exporter = MlflowExporter(ledger, mlflow_server, experiment=experiment, run_ids=["r1"])
    exporter.export()
    assert ledger.get_checkpoint(exporter.checkpoint) == FollowCursor()
    everything = MlflowExporter(ledger, mlflow_server, experiment=experiment)
    everything.export()
    assert ledger.get_checkpoint(everything.checkpoint) == ledger.follow(0).cursor



def test_no_api_key_reaches_the_local_tracking_store(ledger: Ledger, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    key = "fw-test-secret-7f3a9c1e5b"
    monkeypatch.setenv("FIREWORKS_API_KEY", key)
    monkeypatch.chdir(tmp_path)  # the default store and its artifacts live under .firetitan here
    spec = demo_spec(run={"name": f"called with {key}"}, backend={"base_url": f"http://x/?key={key}"})
    write_run(ledger, "r1", steps=2, spec=spec)
    export_mlflow(ledger)  # the project's default store: sqlite:///.firetitan/mlflow.db

    store = tmp_path / ".firetitan"
    files = [p for p in store.rglob("*") if p.is_file()]
    assert (store / "mlflow.db") in files and any(p.name == "eval_score.png" for p in files)
    for path in files:
        assert key.encode() not in path.read_bytes(), path
