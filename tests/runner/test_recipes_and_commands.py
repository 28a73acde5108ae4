"""The recipes and the runner's commands, end to end on the local service."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from firetitan_track import Ledger
from runner.cli import main
from firetitan_track.projections.run_state import fold
from tests.helpers import HARNESS, REPO, cli, small_spec, trainer_state

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_demo_lifts_the_eval_score_from_about_zero_to_at_least_0_9(local_url, ledger_url, tmp_path):
    """examples/reverse_sft.toml as shipped (only pointed at this session's service)."""
    spec = tmp_path / "demo.toml"
    spec.write_text((EXAMPLES / "reverse_sft.toml").read_text().replace(
        '[backend]\nkind = "local"', f'[backend]\nkind = "local"\nbase_url = "{local_url}"'))
    proc = cli(ledger_url, "run", str(spec), "--run-id", "demo", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = {ev.data["step"]: ev.data["score"] for ev in Ledger.open(ledger_url).read("demo")
              if ev.type == "EvalScored"}
    assert scores[0] <= 0.1
    assert scores[max(scores)] >= 0.9


def test_grpo_with_kl_to_a_reference_records_rollout_snapshots(local_url, ledger_url, tmp_path):
    spec = small_spec(tmp_path, local_url, name="grpo", run={"steps": 2},
                      recipe={"kind": "grpo", "batch_size": 4, "group_size": 3, "max_tokens": 4, "kl_coef": 0.1},
                      task={"name": "add", "digits": 1})
    proc = cli(ledger_url, "run", str(spec), "--run-id", "g", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = Ledger.open(ledger_url).read("g")
    types = [ev.type for ev in events]
    assert "ReferenceProvisioned" in types
    steps = [ev.data for ev in events if ev.type == "StepCompleted"]
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        assert 0.0 <= s["metrics"]["reward"] <= 1.0 and "kl" in s["metrics"] and s["metrics"]["rollouts"] > 0
    # on-policy: each step's rollouts came from a snapshot of that step's weights, synced first
    rollout_syncs = [ev.data for ev in events if ev.type == "WeightsSynced" and ev.data["snapshot_path"].startswith("rollout-")]
    assert [d["step"] for d in rollout_syncs] == [1, 2]
    assert fold(events).status == "completed"


def test_resumed_grpo_retires_the_crashed_attempts_reference_trainer(local_url, ledger_url, tmp_path):
    spec = small_spec(tmp_path, local_url, name="grpo-crash", run={"steps": 2},
                      recipe={"kind": "grpo", "batch_size": 2, "group_size": 2, "max_tokens": 3, "kl_coef": 0.1},
                      task={"name": "add", "digits": 1})
    crashed = cli(ledger_url, "run", str(spec), "--run-id", "gc", "--quiet", crash_at="event:SnapshotSaved:2")
    assert crashed.returncode == -signal.SIGKILL
    old_reference = fold(Ledger.open(ledger_url).read("gc")).reference_job_id
    assert old_reference and trainer_state(local_url, old_reference) == "JOB_STATE_RUNNING"
    assert cli(ledger_url, "resume", "gc", "--quiet").returncode == 0
    events = Ledger.open(ledger_url).read("gc")
    assert trainer_state(local_url, old_reference) == "JOB_STATE_DELETED"
    retired = [ev.data for ev in events if ev.type == "CleanupApplied" and ev.data.get("role") == "reference"]
    assert retired == [{"trainer": "deleted", "deployment": "kept", "role": "reference", "trainer_job_id": old_reference}]
    new_reference = fold(events).reference_job_id
    assert new_reference != old_reference and trainer_state(local_url, new_reference) == "JOB_STATE_DELETED"


def test_rerun_reproduces_a_run_from_its_record(local_url, ledger_url, tmp_path):
    spec = small_spec(tmp_path, local_url, name="orig", run={"steps": 2})
    assert cli(ledger_url, "run", str(spec), "--run-id", "orig", "--quiet").returncode == 0
    spec.unlink()  # the record alone is enough
    proc = cli(ledger_url, "rerun", "orig", "--run-id", "again", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ledger = Ledger.open(ledger_url)
    first, second = ledger.read("orig"), ledger.read("again")
    assert second[0].data["rerun_of"] == "orig"
    assert second[0].data["spec_digest"] == first[0].data["spec_digest"]
    assert second[0].data["prompt_sets"] == first[0].data["prompt_sets"]

    def scores(events):
        return [(e.data["step"], e.data["prompt_set_digest"], e.data["score"]) for e in events if e.type == "EvalScored"]

    assert scores(second) == scores(first)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_cleans_up_records_failure_and_leaves_a_resumable_run(sig, local_url, ledger_url, tmp_path):
    spec = small_spec(tmp_path, local_url, name=f"int{int(sig)}", run={"steps": 40}, schedule={"eval_every": 1})
    proc = subprocess.Popen([sys.executable, str(HARNESS), "--ledger", ledger_url, "run", str(spec), "--run-id", "i",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if any(ev.type == "StepCompleted" for ev in Ledger.open(ledger_url).read("i")):
                break
        except Exception:
            pass
        time.sleep(0.1)
    proc.send_signal(sig)
    code, err = proc.wait(timeout=120), proc.stderr.read()
    assert code == 128 + int(sig), (err[-3000:], [(e.type, e.data) for e in Ledger.open(ledger_url).read("i")][-5:])
    assert "Continue it with: firetitan-track resume i" in err
    events = Ledger.open(ledger_url).read("i")
    assert [ev.type for ev in events][-2:] == ["CleanupApplied", "RunFailed"], [(e.type, e.data) for e in events[-4:]]
    assert ("SIGTERM" if sig == signal.SIGTERM else "KeyboardInterrupt") in events[-1].data["error"]
    assert events[-2].data == {"trainer": "deleted", "deployment": "scaled_to_zero"}
    assert fold(events).status == "failed"
    resumed = cli(ledger_url, "resume", "i", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert fold(Ledger.open(ledger_url).read("i")).status == "completed"


def test_bad_spec_exits_non_zero_naming_the_key_and_writes_nothing(ledger_url, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearning_rate = \"fast\"\n")
    result = CliRunner().invoke(main, ["--ledger", ledger_url, "run", str(bad)])
    assert result.exit_code == 1
    assert "bad.toml: optim.learning_rate: expected a number" in result.output
    assert not Path(ledger_url.removeprefix("sqlite:///")).exists()


def test_a_bad_run_id_is_refused_before_anything_is_written(ledger_url, tmp_path):
    spec = small_spec(tmp_path, "http://127.0.0.1:9", name="bad")
    result = CliRunner().invoke(main, ["--ledger", ledger_url, "run", str(spec), "--run-id", "my run'1"])
    assert result.exit_code == 1 and "run id \"my run'1\"" in result.output
    assert not Path(ledger_url.removeprefix("sqlite:///")).exists()


def test_status_json_reports_where_a_run_stands(local_url, ledger_url, tmp_path):
    spec = small_spec(tmp_path, local_url, name="st", run={"steps": 2})
    assert cli(ledger_url, "run", str(spec), "--run-id", "st", "--quiet").returncode == 0
    result = CliRunner().invoke(main, ["--ledger", ledger_url, "status", "st", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)
    assert (row["status"], row["step"], row["deployment_id"]) == ("completed", 2, "dep-st")
    assert row["last_state"]["step"] == 2 and row["last_score"]["step"] == 2 and row["trainer_job_id"]
    missing = CliRunner().invoke(main, ["--ledger", ledger_url, "status", "nope"])
    assert missing.exit_code == 1 and "no run 'nope'" in missing.output


def test_every_digest_a_run_records_is_a_blob_that_blob_shows(local_url, ledger_url, tmp_path):
    """spec_digest, prompt sets, prompt_set_digest, completions_digest: each resolves."""
    import hashlib

    spec = small_spec(tmp_path, local_url, name="digests", run={"steps": 2})
    assert cli(ledger_url, "run", str(spec), "--run-id", "d", "--quiet").returncode == 0
    events = Ledger.open(ledger_url).read("d")
    digests = {ev.data["spec_digest"] for ev in events if ev.type == "RunStarted"}
    digests |= {d for ev in events if ev.type == "RunStarted" for d in ev.data["prompt_sets"].values()}
    digests |= {v for ev in events for k, v in ev.data.items() if k.endswith("_digest") and v}
    assert len(digests) >= 4  # the spec, the eval prompt set, and two evals' completions
    runner = CliRunner()
    for digest in digests:
        shown = runner.invoke(main, ["--ledger", ledger_url, "blob", digest])
        assert shown.exit_code == 0, (digest, shown.output)
        assert hashlib.sha256(shown.stdout_bytes).hexdigest() == digest
    started = next(ev for ev in events if ev.type == "RunStarted")
    assert json.loads(runner.invoke(main, ["--ledger", ledger_url, "blob", started.data["spec_digest"]]).stdout) \
        == started.data["spec"]
