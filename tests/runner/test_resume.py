"""Resume from the ledger alone: kill the runner anywhere, resume, and the authoritative
history equals that of an uninterrupted run with the same seed."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from firetitan_track import Ledger
from firetitan_track.projections.run_state import authoritative, fold

from tests.helpers import HARNESS, REPO, cli, completed_run, small_spec, trainer_state

# Where the runner dies. Steps run 1..4; states at 0, 2, 4; evals at 0, 2, 4.
CRASH_POINTS = [
    "event:RunStarted:1",            # before any provisioning
    "event:ProvisionRequested:1",    # between the provisioning intent and its outcome
    "event:TrainerProvisioned:1",
    "event:DeploymentProvisioned:1",
    "event:SnapshotRequested:1",     # between snapshot intent and outcome (baseline eval)
    "event:SyncRequested:1",         # between sync intent and outcome
    "event:EvalStarted:1",           # mid-eval
    "event:SamplesRecorded:1",       # samples stored, score not yet
    "event:StateSaveRequested:1",    # between DCP save intent and outcome (state 0)
    "event:StateSaved:1",            # right after state 0
    "event:StepCompleted:1",         # after a step, before the next state: step 1 is redone
    "midstep:2",                     # inside step 2: gradients accumulated, optimizer not stepped
    "event:SnapshotSaved:2",         # step 2's snapshot saved, not yet synced
    "event:WeightsSynced:2",         # step 2's weights on the deployment, not evaluated
    "event:EvalScored:2",            # step 2 scored, state 2 not yet saved
    "event:StateSaved:2",            # right after state 2
    "event:StepCompleted:3",         # after step 3
    "event:StateSaved:3",            # after the final state (step 4), before cleanup
    "event:CleanupApplied:1",        # trainer deleted, run not yet marked completed
]


def history(ledger_url: str, run_id: str) -> list[tuple]:
    """The run's training history, free of ids and timings that legitimately differ."""
    out = []
    for ev in authoritative(Ledger.open(ledger_url).read(run_id)):
        d = ev.data
        if ev.type == "StepCompleted":
            out.append(("step", d["step"], tuple(sorted(d["data_cursor"].items())), round(d["metrics"]["loss"], 5)))
        elif ev.type == "StateSaved":
            out.append(("state", d["step"], str(d["data_cursor"])))
        elif ev.type == "EvalScored":
            out.append(("eval", d["step"], d["prompt_set_digest"], d["score"]))
    return out


@pytest.fixture(scope="module")
def reference(local_url, tmp_path_factory):
    """One uninterrupted run: the history every resumed run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    url = f"sqlite:///{tmp}/ledger.db"
    spec = small_spec(tmp, local_url, name="ref")
    proc = cli(url, "run", str(spec), "--run-id", "ref", "--quiet")
    assert proc.returncode == 0, proc.stderr
    h = history(url, "ref")
    assert [e[1] for e in h if e[0] == "step"] == [1, 2, 3, 4]
    assert [e[1] for e in h if e[0] == "eval"] == [0, 2, 4]
    return spec, h


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_resume_after_sigkill_reproduces_the_uninterrupted_history(point, reference, ledger_url, local_url):
    spec, expected = reference
    crashed = cli(ledger_url, "run", str(spec), "--run-id", "r", "--quiet", crash_at=point)
    assert crashed.returncode == -signal.SIGKILL, (point, crashed.stderr[-2000:])

    resumed = cli(ledger_url, "resume", "r", "--quiet")
    assert resumed.returncode == 0, (point, resumed.stderr[-3000:])

    events = Ledger.open(ledger_url).read("r")
    assert fold(events).status == "completed"
    assert history(ledger_url, "r") == expected
    steps = [ev.data["step"] for ev in authoritative(events) if ev.type == "StepCompleted"]
    assert steps == sorted(set(steps)), "a step was trained twice in the authoritative history"
    resumes = [ev for ev in events if ev.type == "RunResumed"]
    assert len(resumes) == 1
    superseded = set(resumes[0].data["superseded"])
    assert all(ev.version not in superseded for ev in events if ev.type in ("RunStarted", "RunResumed"))
    after_resume = [ev for ev in events if ev.version > resumes[0].version]
    assert next(ev for ev in after_resume if ev.type == "DeploymentProvisioned").data["created"] is False
    # The spec's cleanup applies to the run's trainer even when the resume reattached to it.
    assert events[-2].type == "CleanupApplied"
    assert events[-2].data == {"trainer": "deleted", "deployment": "scaled_to_zero"}
    assert trainer_state(local_url, fold(events).trainer_job_id) == "JOB_STATE_DELETED"


def test_two_resumers_exactly_one_proceeds(reference, ledger_url):
    spec, expected = reference
    assert cli(ledger_url, "run", str(spec), "--run-id", "r", "--quiet",
               crash_at="event:StateSaved:2").returncode == -signal.SIGKILL
    cmd = [sys.executable, str(HARNESS), "--ledger", ledger_url, "resume", "r", "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(2)]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 1], outcomes
    loser = next(err for code, err in outcomes if code == 1)
    assert "run r is being" in loser
    assert history(ledger_url, "r") == expected
    assert sum(ev.type == "RunResumed" for ev in Ledger.open(ledger_url).read("r")) == 1


def test_sigterm_cleans_up_records_failure_and_resumes(reference, ledger_url, local_url):
    spec, expected = reference
    stopped = cli(ledger_url, "run", str(spec), "--run-id", "r", "--quiet", crash_at="event:StepCompleted:3",
                  crash_signal="TERM")
    assert stopped.returncode == 143, stopped.stderr[-2000:]  # 128 + SIGTERM, as a shell reports it
    events = Ledger.open(ledger_url).read("r")
    assert [ev.type for ev in events][-2:] == ["CleanupApplied", "RunFailed"]
    assert "SIGTERM" in events[-1].data["error"]
    assert events[-2].data == {"trainer": "deleted", "deployment": "scaled_to_zero"}
    assert trainer_state(local_url, fold(events).trainer_job_id) == "JOB_STATE_DELETED"

    resumed = cli(ledger_url, "resume", "r", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert history(ledger_url, "r") == expected


# The matrix for a LoRA run, at the points where its adapter state is in flight: adapters
# train on a frozen base, every snapshot is the adapter, and the DCP state holds the
# adapter and its optimizer. The same steps, data and scores as an uninterrupted run.
LORA_CRASH_POINTS = [
    "midstep:2",                     # adapter gradients accumulated, optimizer not stepped
    "event:SnapshotSaved:2",         # step 2's adapter snapshot saved, not yet synced
    "event:StateSaved:2",            # right after state 2 (adapter + optimizer)
]


@pytest.fixture(scope="module")
def lora_reference(local_url, tmp_path_factory):
    spec, url = completed_run(tmp_path_factory, local_url, "lora", "lora",
                              model={"lora_rank": 8, "training_shape": "ts-local-tiny-lora"})
    events = Ledger.open(url).read("lora")
    assert {ev.data["lora_rank"] for ev in events if ev.type == "TrainerProvisioned"} == {8}
    return spec, history(url, "lora")


@pytest.mark.parametrize("point", LORA_CRASH_POINTS)
def test_a_lora_run_resumed_after_sigkill_reproduces_the_uninterrupted_history(point, lora_reference, ledger_url):
    spec, expected = lora_reference
    crashed = cli(ledger_url, "run", str(spec), "--run-id", "r", "--quiet", crash_at=point)
    assert crashed.returncode == -signal.SIGKILL, (point, crashed.stderr[-2000:])
    from runner.loop import resume_run

    assert resume_run("r", ledger_url=ledger_url, progress=False).status == "completed"
    assert history(ledger_url, "r") == expected
