"""LoRA runs through the runner: a DPO run whose reference is the policy's own session
with adapters disabled, a rerun that reproduces a LoRA run, and a sweep of LoRA trials.
(The crash matrix in test_resume.py covers resume.)"""

from __future__ import annotations

import json

from click.testing import CliRunner

from firetitan_track import Ledger
from firetitan_track.projections.run_state import authoritative, fold
from runner.cli import main
from runner.loop import rerun, run_spec
from runner.spec import load_spec
from tests.helpers import small_spec

LORA = {"lora_rank": 8, "training_shape": "ts-local-tiny-lora"}


def _history(url: str, run_id: str) -> list[tuple]:
    out = []
    for ev in authoritative(Ledger.open(url).read(run_id)):
        if ev.type == "StepCompleted":
            out.append(("step", ev.data["step"], round(ev.data["metrics"]["loss"], 5)))
        elif ev.type == "EvalScored":
            out.append(("eval", ev.data["step"], ev.data["prompt_set_digest"], ev.data["score"]))
    return out


def test_lora_dpo_measures_itself_against_its_own_session_with_adapters_disabled(tmp_path, ledger_url, local_url):
    spec = load_spec(small_spec(tmp_path, local_url, name="ldpo", run={"steps": 3}, model=LORA,
                                recipe={"kind": "dpo", "batch_size": 4}, schedule={"eval_every": 3, "save_every": 3}))
    assert run_spec(spec, ledger_url=ledger_url, run_id="ldpo", progress=False).status == "completed"
    events = Ledger.open(ledger_url).read("ldpo")
    trainers = [ev.data for ev in events if ev.type == "TrainerProvisioned"]
    assert [t["lora_rank"] for t in trainers] == [8]  # no second trainer for the reference
    ref = next(ev.data for ev in events if ev.type == "ReferenceProvisioned")
    assert ref["shared_with_policy"] is True and ref["trainer_job_id"] == trainers[0]["trainer_job_id"]
    margins = [ev.data["metrics"]["margin"] for ev in events if ev.type == "StepCompleted"]
    # step 1: adapters are zero, so the policy is its reference; after updates it is not
    assert abs(margins[0]) < 1e-4 and any(abs(m) > 1e-4 for m in margins[1:])


def test_a_lora_run_reruns_to_the_same_history_and_sweeps_as_lora_trials(tmp_path, ledger_url, local_url):
    path = small_spec(tmp_path, local_url, name="lsft", run={"steps": 2}, model=LORA,
                      schedule={"eval_every": 2, "save_every": 2})
    assert run_spec(load_spec(path), ledger_url=ledger_url, run_id="lsft", progress=False).status == "completed"
    again = rerun("lsft", ledger_url=ledger_url, new_run_id="lsft-again", progress=False)
    assert again.status == "completed"
    assert _history(ledger_url, "lsft-again") == _history(ledger_url, "lsft")

    out = CliRunner().invoke(main, ["--ledger", ledger_url, "sweep", str(path), "--grid",
                                    "optim.learning_rate=1e-3,3e-3", "--sweep-id", "lsw",
                                    "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert out.exit_code == 0, out.output
    led = Ledger.open(ledger_url)
    trials = [r.run_id for r in led.runs() if r.run_id not in ("lsft", "lsft-again") and not r.run_id.startswith("sweep:")]
    assert len(trials) == 2
    for run_id in trials:
        events = led.read(run_id)
        assert fold(events).status == "completed"
        assert {ev.data["lora_rank"] for ev in events if ev.type == "TrainerProvisioned"} == {8}
        assert json.dumps(events[0].data["spec"]["model"]["lora_rank"]) == "8"
