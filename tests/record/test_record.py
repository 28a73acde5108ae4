"""``firetitan-track record -- COMMAND`` and ``autolog()``: programs on the SDK, unmodified,
recorded in either SDK release (fireworks-ai 1.2.24 in the cookbook's environment, 1.2.30 in
the project's), with their processes, exit status and output their own."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from firetitan_track import Ledger
from firetitan_track.projections.audit import audit
from firetitan_track.projections.run_state import fold
from tests.record.conftest import API_KEY, record

PROGRAMS = Path(__file__).parent / "programs"
SEED = PROGRAMS / "seed_loop.py"


def _seed_args(info: Any) -> list[str]:
    return [str(SEED), info.base_url, info.tokenizer_path, info.training_shape_id, f"seed-{uuid.uuid4().hex[:6]}"]


@pytest.fixture(scope="module")
def seed_runs(cookbook_recorder_bin, project_bin, local_info, tmp_path_factory) -> dict[str, Any]:
    """The seed loop recorded twice into one ledger: ``old`` with 1.2.24 (finishing, exported to
    MLflow as it runs), ``new`` with 1.2.30 (failing with its own exception after its loop)."""
    folder = tmp_path_factory.mktemp("seed-runs")
    url = f"sqlite:///{folder / 'ledger.db'}"
    runs = {}
    mlflow = f"sqlite:///{folder / 'mlflow.db'}"
    for name, python, extra, export in (("old", cookbook_recorder_bin / "python", [], ["--export-mlflow", mlflow]),
                                        ("new", project_bin / "python", ["--fail"], [])):
        command = [str(python), *_seed_args(local_info), *extra]
        runs[name] = {"command": command,
                      "proc": record(url, "--run-id", f"seed-{name}", *export, "--", *command, cwd=folder)}
    return {"url": url, "folder": folder, "runs": runs, "mlflow": mlflow}


@pytest.mark.parametrize("name, release", [("old", "1.2.24"), ("new", "1.2.30")])
def test_the_seed_loop_is_recorded_unmodified(seed_runs, name, release):
    run = seed_runs["runs"][name]
    proc = run["proc"]
    # the program's own exit status and output
    assert proc.returncode == (0 if name == "old" else 1), proc.stderr[-3000:]
    assert "done final" in proc.stdout and "seed loop: stderr stays the program's" in proc.stderr
    ledger = Ledger.open(seed_runs["url"])
    events = ledger.read(f"seed-{name}")
    data = {ev.type: ev.data for ev in events}  # the last of each type
    program = data["RunStarted"]["spec"]["program"]
    assert program["command"] == run["command"] and program["cwd"] == str(seed_runs["folder"])
    assert program["entry"] == {"path": str(SEED), "sha256": hashlib.sha256(SEED.read_bytes()).hexdigest()}
    assert program["sdk"]["fireworks-ai"] == release
    assert data["ProvisionRequested"]["sdk"]["fireworks-ai"] == release

    types = [ev.type for ev in events]
    assert types[:5] == ["RunStarted", "ProgramStarted", "ProvisionRequested", "TrainerProvisioned",
                         "DeploymentProvisioned"]
    per_step = ["SnapshotRequested", "SnapshotSaved", "SyncRequested", "WeightsSynced", "SamplesDrawn",
                "StepRequested", "StepCompleted"]
    assert types[5:19] == per_step * 2
    snapshots = [ev.data for ev in events if ev.type == "SnapshotSaved"]
    assert [(s["step"], s["kind"]) for s in snapshots] == [(0, "base"), (1, "delta")]
    assert snapshots[1]["base_path"] == snapshots[0]["path"]
    syncs = [ev.data["snapshot_path"] for ev in events if ev.type == "WeightsSynced"]
    assert syncs == [s["path"] for s in snapshots]

    samples = [ev for ev in events if ev.type == "SamplesDrawn"]
    steps = [ev.data for ev in events if ev.type == "StepCompleted"]
    for k, (sample, step) in enumerate(zip(samples, steps), start=1):
        drawn = sample.data
        assert drawn["snapshot_at_send"] == drawn["snapshot_at_return"] == syncs[k - 1]
        assert drawn["version_at_send"] == k and drawn["sampling"]["n"] == 2
        assert ledger.get_json(drawn["prompt_digest"]) == {"messages": [{"role": "user", "content": "What is 2+2?"}]}
        completions = ledger.get_json(drawn["completions_digest"])
        assert len(completions) == len(drawn["sequence_digests"]) == 2 and all(c["completion_tokens"] for c in completions)
        # each datum trained on a sample it was built from; sampled on the weights just synced
        assert step["step"] == k and step["micro_batches"] == 1
        assert step["provenance"]["datums"] == step["provenance"]["matched"] == 2
        assert ledger.get_json(step["provenance"]["samples_digest"]) == [[sample.event_id, 0], [sample.event_id, 1]]
        assert step["version_offsets"] == {"min": 0, "max": 0, "mean": 0.0}
        assert step["metrics"]["grad_norm"] > 0 and step["forward_backward"][0]["nll"] > 0
        assert step["optimizer"]["learning_rate"] == 1e-3

    assert data["StateSaved"]["name"] == "final" and data["StateSaved"]["step"] == 2
    promoted = data["ModelPromoted"]
    assert data["PromotionRequested"]["snapshot_path"] == promoted["snapshot_path"] == snapshots[1]["path"]
    assert promoted["request_id"] == next(ev.event_id for ev in events if ev.type == "PromotionRequested")
    assert [r.promoted_as for r in audit(ledger, f"seed-{name}")] == [[], [promoted["model_id"]]]
    assert data["CleanupApplied"] == {"trainer": "deleted", "deployment": "scaled_to_zero"}
    exited = data["ProgramExited"]
    st = fold(events)
    if name == "old":
        assert (exited["outcome"], exited["exit_status"]) == ("finished", 0) and st.status == "completed"
        assert data["RunCompleted"] == {"final_step": 2, "final_snapshot": snapshots[1]["path"]}
    else:
        assert (exited["outcome"], exited["exit_status"]) == ("failed", 1) and st.status == "failed"
        assert exited["error"] == data["RunFailed"]["error"] == "RuntimeError: the program's own failure, after its loop"
    assert st.open_intent is None and not ledger.verify(f"seed-{name}")


def test_the_api_key_never_reaches_the_ledger(seed_runs):
    stored = b"".join(p.read_bytes() for p in Path(seed_runs["folder"]).glob("ledger.db*"))
    assert API_KEY.encode() not in stored


def test_views_read_recorded_runs(seed_runs, tmp_path):
    """lineage, bundle (verify, import), diff and the MLflow export work on recorded runs."""
    cli = [str(Path(sys.executable).parent / "firetitan-track"), "--ledger", seed_runs["url"]]

    def run(*args: str, ledger: list[str] = cli) -> subprocess.CompletedProcess:
        done = subprocess.run([*ledger, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    ledger = Ledger.open(seed_runs["url"])
    snapshots = [ev.data["path"] for ev in ledger.read("seed-old") if ev.type == "SnapshotSaved"]
    shown = json.loads(run("lineage", snapshots[1], "--json").stdout)
    assert shown["drawn_on"] == {snapshots[0]: 2}  # the samples behind the second snapshot, and where they came from
    assert [row["step"] for row in shown["data"]] == [1]

    bundle = tmp_path / "runs.tar.gz"
    run("bundle", "seed-old", "seed-new", "-o", str(bundle))
    run("verify", "--bundle", str(bundle))
    other = [cli[0], "--ledger", f"sqlite:///{tmp_path / 'other.db'}"]
    run("import", str(bundle), ledger=other)
    assert run("audit", "seed-old", "--json", ledger=other).stdout == run("audit", "seed-old", "--json").stdout

    diff = json.loads(run("diff", "seed-old", "seed-new", "--json").stdout)
    assert diff["spec"]["program.sdk.fireworks-ai"] == {"a": "1.2.24", "b": "1.2.30"}

    from mlflow import MlflowClient  # record --export-mlflow exported the run as it went

    client = MlflowClient(seed_runs["mlflow"])
    found = client.search_runs([client.get_experiment_by_name("firetitan-track").experiment_id])
    assert [(r.data.params["program.sdk.fireworks-ai"], r.info.status) for r in found] == [("1.2.24", "FINISHED")]
    assert [m.step for m in client.get_metric_history(found[0].info.run_id, "train/version_offset/max")] == [1, 2]
    assert {m.name for m in client.search_logged_models([found[0].info.experiment_id])} == {
        "seed-old@step-0", "seed-old@step-1"}


def test_autolog_records_the_program_and_the_processes_it_starts(project_bin, local_info, tmp_path):
    """One line in the program; its spawn worker and subprocess draw rollouts into the same run."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    args = [str(PROGRAMS / "workers.py"), local_info.base_url, local_info.tokenizer_path, local_info.training_shape_id,
            f"workers-{uuid.uuid4().hex[:6]}", "--autolog", "workers"]
    done = subprocess.run([str(project_bin / "python"), *args], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "FIREWORKS_API_KEY": API_KEY, "FIRETITAN_LEDGER": url})
    assert done.returncode == 0, done.stderr[-3000:]
    events = Ledger.open(url).read("workers")
    assert next(ev.data for ev in events if ev.type == "ProgramStarted")["started_by"] == "autolog"
    synced = next(ev.data["snapshot_path"] for ev in events if ev.type == "WeightsSynced")
    drawn = [ev.data for ev in events if ev.type == "SamplesDrawn"]
    assert sorted(d["sampling"]["n"] for d in drawn) == [1, 1, 2]  # the program's own, and each worker's
    assert all((d["snapshot_at_send"], d["version_at_send"]) == (synced, 1) for d in drawn)
    step = next(ev.data for ev in events if ev.type == "StepCompleted")
    assert step["provenance"]["datums"] == step["provenance"]["matched"] == 4
    assert [ev.type for ev in events][-2:] == ["ProgramExited", "RunCompleted"]


def test_track_records_a_tinker_loop_as_a_program(project_bin, local_info, tmp_path, ledger_url):
    """``track(tinker.ServiceClient(...))``: the trainer, each step with the samples it trained on,
    every snapshot its samplers served, the state, in the ledger (issue 25)."""
    done = subprocess.run([str(project_bin / "python"), str(PROGRAMS / "tinker_loop.py"), local_info.base_url,
                           ledger_url, "tinker-loop"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0 and "trained 3" in done.stdout, done.stderr[-3000:]
    ledger = Ledger.open(ledger_url)
    assert not ledger.verify("tinker-loop")
    events = ledger.read("tinker-loop")
    of = lambda type: [ev.data for ev in events if ev.type == type]  # noqa: E731
    assert of("ProgramStarted")[0]["started_by"] == "autolog" and fold(events).status == "completed"
    [trainer] = of("TrainerProvisioned")
    assert (trainer["base_model"], trainer["lora_rank"]) == ("Qwen/Qwen3-8B", 8)
    snapshots = of("SnapshotSaved")
    assert [(s["step"], s["name"]) for s in snapshots] == [(0, "ephemeral"), (1, "ephemeral"), (2, "sampler-2"),
                                                            (3, "ephemeral")]
    assert snapshots[2]["path"].startswith(f"tinker://{trainer['trainer_job_id']}/sampler_weights/")
    # each new sampler is a weight version of the trainer's run; each draw names the one it came from
    synced = [(s["deployment_id"], s["snapshot_path"]) for s in of("WeightsSynced")]
    assert synced == [(trainer["trainer_job_id"], s["path"]) for s in snapshots]
    assert [(d["snapshot_at_send"], d["version_at_send"]) for d in of("SamplesDrawn")] == [
        (s["path"], k) for k, s in enumerate(snapshots[:3], start=1)]
    steps = of("StepCompleted")
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["provenance"]["matched"] == s["provenance"]["datums"] == 2 for s in steps)
    assert all(s["version_offsets"] == {"min": 0, "max": 0, "mean": 0.0} for s in steps)
    [state] = of("StateSaved")
    assert (state["step"], state["name"], state["trainer_job_id"]) == (2, "state-2", trainer["trainer_job_id"])
    assert {r.snapshot_path for r in audit(ledger, "tinker-loop")} == {s["path"] for s in snapshots}


def test_the_programs_own_sitecustomize_runs_and_other_processes_stay_light(tmp_path, ledger_url):
    user_site = tmp_path / "user-site"
    user_site.mkdir()
    (user_site / "sitecustomize.py").write_text("MARK = 'the user sitecustomize ran'\n")
    probe = "import sitecustomize, sys; print(sitecustomize.MARK, 'firetitan_track' in sys.modules); sys.exit(3)"
    done = record(ledger_url, "--run-id", "light", "--", sys.executable, "-c", probe,
                  env={"PYTHONPATH": str(user_site)})
    assert done.returncode == 3  # the program's exit status
    assert done.stdout.strip() == "the user sitecustomize ran False"  # no SDK imported: no recorder imported
    events = Ledger.open(ledger_url).read("light")
    assert events[0].data["spec"]["program"]["entry"] == {"code_sha256": hashlib.sha256(probe.encode()).hexdigest()}
    exited = next(ev.data for ev in events if ev.type == "ProgramExited")
    assert (exited["outcome"], exited["exit_status"], exited["error"]) == ("failed", 3, "exited with status 3")
    # the runner has no spec to resume it from: it says how the program continues it
    cli = [str(Path(sys.executable).parent / "firetitan-track"), "--ledger", ledger_url]
    refused = subprocess.run([*cli, "resume", "light"], capture_output=True, text=True)
    assert refused.returncode == 1 and "firetitan-track record --run-id light --" in refused.stderr


def test_a_program_whose_environment_lacks_the_recorder_runs_and_says_so(cookbook_bin, ledger_url, tmp_path):
    """A real fault of the recorder: firetitan-track is not installed where the program runs."""
    probe = "import fireworks.training.sdk.client; print('the program ran')"
    done = record(ledger_url, "--run-id", "bare", "--", str(cookbook_bin / "python"), "-c", probe, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "the program ran"
    assert done.stderr.count("recording degraded") == 1
    exited = next(ev.data for ev in Ledger.open(ledger_url).read("bare") if ev.type == "ProgramExited")
    assert exited["outcome"] == "finished"
    assert any("firetitan-track cannot be imported" in reason for reason in exited["recording_degraded"])


def test_bad_input_is_refused_and_writes_nothing(ledger_url, tmp_path):
    from firetitan_track.events import new_event

    missing = record(ledger_url, "--run-id", "x", "--", "no-such-command-here")
    assert missing.returncode == 1 and "no-such-command-here" in missing.stderr
    bad_id = record(ledger_url, "--run-id", "../escape", "--", sys.executable, "-c", "pass")
    assert bad_id.returncode == 1 and "run id '../escape'" in bad_id.stderr
    ledger = Ledger.open(ledger_url)
    assert ledger.runs() == []
    spec = {"run": {"name": "r"}}
    ledger.append("runner-run", [new_event("RunStarted", spec=spec, spec_digest="0" * 64, code_version="x", seed=0,
                                           backend="local")], expected_version=0)
    taken = record(ledger_url, "--run-id", "runner-run", "--", sys.executable, "-c", "pass")
    assert taken.returncode == 1 and "firetitan-track run" in taken.stderr
    assert ledger.stream_version("runner-run") == 1
    none = record(ledger_url)
    assert none.returncode == 2 and "Missing argument" in none.stderr


def test_a_run_that_cannot_begin_stops_the_program_before_its_first_recorded_call(ledger_url, tmp_path):
    """``record`` starts the program before it opens the ledger; when the run cannot begin, the
    program is stopped, and a recorded call it reaches meanwhile waits for the run instead of
    going ahead: here the program would write a marker file after its first recorded call."""
    from firetitan_track.events import new_event

    ledger = Ledger.open(ledger_url)
    ledger.append("runner-run", [new_event("RunStarted", spec={"run": {"name": "r"}}, spec_digest="0" * 64,
                                           code_version="x", seed=0, backend="local")], expected_version=0)
    marker = tmp_path / "called"
    program = ("from firetitan_track.recording import program\n"
               "program.active()  # what every recorded call does first\n"
               f"open({str(marker)!r}, 'w').write('called')\n"
               "import time; time.sleep(60)\n")
    taken = record(ledger_url, "--run-id", "runner-run", "--", sys.executable, "-c", program, timeout=60)
    assert taken.returncode == 1 and "firetitan-track run" in taken.stderr
    assert not marker.exists()
    assert ledger.stream_version("runner-run") == 1


def test_the_begin_note_gives_the_attempt_or_says_why_not(tmp_path, monkeypatch):
    """What a recorded process waits for before its first write (boot.wait_until_begun)."""
    from firetitan_track.recording import boot

    monkeypatch.setenv(boot.ENV_DIR, str(tmp_path))
    monkeypatch.setenv(boot.ENV_BEGINNER, str(os.getpid()))
    with pytest.raises(RuntimeError, match="did not begin within"):
        boot.wait_until_begun(timeout_s=0.05)
    boot.mark_begun(str(tmp_path), attempt=3)
    assert boot.wait_until_begun() == 3
    boot.mark_begun(str(tmp_path), error="LedgerError: cannot reach the ledger")
    with pytest.raises(RuntimeError, match="cannot reach the ledger"):
        boot.wait_until_begun()
    (tmp_path / boot.BEGUN_NOTE).unlink()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    monkeypatch.setenv(boot.ENV_BEGINNER, str(gone.pid))  # the process that was to begin the run has ended
    with pytest.raises(RuntimeError, match="ended before the run began"):
        boot.wait_until_begun(timeout_s=30)


def test_unknown_calls_pass_through_and_a_failing_recorder_never_breaks_the_call():
    """The wrappers leave every method they do not know as it was. A bug inside the recorder
    cannot be caused for real, so a stand-in recording whose record step raises plays one."""
    from types import SimpleNamespace

    from fireworks.training.sdk import client as sdk_client

    from firetitan_track.recording import boot, patches

    assert set(patches.WRAPS) == set(boot.WATCHED)  # every module the import hook watches is patched
    before = dict(vars(sdk_client.FiretitanTrainingClient))
    patches.patch_module("fireworks.training.sdk.client", sdk_client)
    try:
        after = vars(sdk_client.FiretitanTrainingClient)
        changed = {name for name in before if after[name] is not before[name]}
        assert changed == {"forward_backward", "forward_backward_custom", "optim_step", "save_state", "load_state",
                           "load_state_with_optimizer", "save_weights_for_sampler", "save_weights_for_sampler_ext"}
    finally:
        patches.unpatch_all()
    assert dict(vars(sdk_client.FiretitanTrainingClient)) == before

    reasons: list[str] = []
    session = SimpleNamespace(degraded=lambda where, exc: reasons.append(f"{where}: {exc}"))
    calls: list[int] = []

    def broken_record(call):
        raise RuntimeError("a recorder bug")

    def program_call():
        calls.append(1)
        return "the program's result"

    assert patches._recorded(session, "optim_step", program_call, broken_record) == "the program's result"
    assert calls == [1] and reasons == ["optim_step: a recorder bug"]

    def failing_call():
        raise ValueError("the program's own error")

    with pytest.raises(ValueError, match="the program's own error"):
        patches._recorded(session, "optim_step", failing_call, lambda call: call())
