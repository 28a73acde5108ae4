"""Specs that would exhaust the machine or leave resources behind, and the smaller ways a
careless run went wrong: each refused before anything is written, with one clear error
naming the key (or cleaned up and recorded when the service refuses late)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from firetitan_track import Ledger
from firetitan_track.projections.run_state import fold
from runner.cli import main
from tests.helpers import REPO, cli, small_spec, trainer_state


def _run(ledger_url: str, spec: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner(env=env).invoke(main, ["--ledger", ledger_url, "run", str(spec), "--quiet", *args])


def _refused(result: Any, *expected: str) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    for text in expected:
        assert text in result.output, result.output
    return result.output


def _no_runs(ledger_url: str) -> None:
    path = Path(ledger_url.removeprefix("sqlite:///"))
    if path.exists():
        with Ledger.open(ledger_url) as ledger:
            assert ledger.runs() == []


@pytest.mark.parametrize("override, named", [
    ("recipe.batch_size=100000000", "recipe.batch_size: recipe.batch_size x recipe.micro_batches = 100000000 "
                                    "examples per optimizer step; at most 65536"),
    ("sampling.n=100000000", "sampling.n: must be at most 128 (the completions API's largest n)"),
    ("recipe.micro_batches=100000", "examples per optimizer step; at most 65536"),
    ("sampling.max_tokens=1000000000", "sampling.max_tokens: must be at most 1048576"),
    ("task.digits=100000000", "task.digits: must be at most 1000"),
    ("concurrency.max=100000000", "concurrency.max: must be at most 10000"),
    ("sampling.n=100", "eval.count x sampling.n = 800000 completions per eval; at most 100000"),
])
def test_a_size_past_its_bound_is_refused_before_anything_is_written(tmp_path: Path, ledger_url: str,
                                                                     override: str, named: str) -> None:
    spec = small_spec(tmp_path, "http://127.0.0.1:9", name="big", eval={"count": 8000})
    _refused(_run(ledger_url, spec, "--set", override), named)
    assert not Path(ledger_url.removeprefix("sqlite:///")).exists()  # not even a ledger


@pytest.mark.parametrize("deployment_id", ["Bad_ID", "../../etc", "-x", "a" * 64, ""])
def test_a_deployment_id_that_is_no_resource_id_is_refused_up_front(tmp_path: Path, ledger_url: str,
                                                                   deployment_id: str) -> None:
    spec = small_spec(tmp_path, "http://127.0.0.1:9", name="dep")
    result = _run(ledger_url, spec, "--set", f"model.deployment_id={json.dumps(deployment_id)}")
    _refused(result, "model.deployment_id:", "is not a resource id: use 1-63 lowercase letters")
    assert not Path(ledger_url.removeprefix("sqlite:///")).exists()


def test_new_tokens_past_the_models_context_are_refused_by_asking_the_service(tmp_path: Path, ledger_url: str,
                                                                              local_url: str) -> None:
    spec = small_spec(tmp_path, local_url, name="ctx")
    _refused(_run(ledger_url, spec, "--set", "sampling.max_tokens=600"),
             "sampling.max_tokens: 600 new tokens do not fit the model's context of 512 tokens")
    grpo = small_spec(tmp_path, local_url, name="ctxg", recipe={"kind": "grpo", "max_tokens": 505})
    _refused(_run(ledger_url, grpo), "recipe.max_tokens: a prompt of the task takes")
    _no_runs(ledger_url)


def test_a_provisioning_that_fails_after_making_a_trainer_cleans_it_up(tmp_path: Path, ledger_url: str,
                                                                       local_url: str) -> None:
    from runner.loop import RunError, run_spec
    from runner.spec import load_spec

    # The spec's own check refuses this id up front (above); bypassed here, so the service is
    # the one to refuse it: after the trainer was made, as the deployment is created.
    spec = load_spec(small_spec(tmp_path, local_url, name="orphan", run={"steps": 1}))
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, deployment_id="Bad_ID"))
    with pytest.raises(RunError, match="deploymentId query parameter must be a resource id"):
        run_spec(spec, ledger_url=ledger_url, run_id="orphan", progress=False)
    events = Ledger.open(ledger_url).read("orphan")
    types = [ev.type for ev in events]
    assert types == ["RunStarted", "ProvisionRequested", "TrainerProvisioned", "CleanupApplied", "RunFailed"], types
    made = events[2].data
    assert made["partial"] is True and made["created"] is True
    assert events[3].data["trainer"] == "deleted" and events[3].data["trainer_job_id"] == made["trainer_job_id"]
    assert "after it made trainer" in events[3].data["error"]
    assert trainer_state(local_url, made["trainer_job_id"]) == "JOB_STATE_DELETED"  # no orphan
    assert fold(events).status == "failed"


def test_a_tokenizer_that_cannot_load_is_one_clear_error(tmp_path: Path, ledger_url: str, local_url: str) -> None:
    spec = small_spec(tmp_path, local_url, name="tok")
    out = _refused(_run(ledger_url, spec, "--set", "model.tokenizer=/nonexistent"),
                   "model.tokenizer: cannot load a tokenizer from '/nonexistent'")
    assert len(out.strip().splitlines()) == 1, out
    _no_runs(ledger_url)


def test_a_nul_in_a_jsonl_prompt_is_refused_naming_file_and_line(tmp_path: Path, ledger_url: str) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "12", "answer": "21"}) + "\n" +
                       json.dumps({"prompt": "reverse 1\u00002", "answer": "21"}) + "\n")
    spec = small_spec(tmp_path, "http://127.0.0.1:9", name="nul", eval={"prompts": str(prompts), "count": 0})
    _refused(_run(ledger_url, spec), f"{prompts}:2: prompt holds a NUL character (\\u0000); a prompt is text")
    assert not Path(ledger_url.removeprefix("sqlite:///")).exists()


SECRET = "fw-hostile-6b1f0c2e9d"


def test_a_run_id_equal_to_a_secret_is_refused(tmp_path: Path, ledger_url: str) -> None:
    spec = small_spec(tmp_path, "http://127.0.0.1:9", name="sec")
    out = _refused(_run(ledger_url, spec, "--run-id", SECRET, env={"FIREWORKS_API_KEY": SECRET}),
                   "the run id holds the value of a credential")
    assert SECRET not in out
    assert not Path(ledger_url.removeprefix("sqlite:///")).exists()


def test_an_unhandled_errors_traceback_never_prints_a_secret(tmp_path: Path) -> None:
    # An error no code path expects, carrying a secret in its message (a secret pasted into a
    # field the SDK echoes back): a fault that cannot be caused on purpose, so run_spec is
    # replaced by one that raises it, and the real command line prints the traceback.
    program = ("import os, runner.loop as loop\n"
               "def boom(*a, **k): raise RuntimeError('service said: bad model ' + os.environ['FIREWORKS_API_KEY'])\n"
               "loop.run_spec = boom\n"
               "from runner.cli import main\n"
               f"main(['--ledger', 'sqlite:///{tmp_path}/l.db', 'run', '{small_spec(tmp_path, 'http://x', name='tb')}'])\n")
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "FIREWORKS_API_KEY": SECRET})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "RuntimeError" in proc.stderr
    assert SECRET not in proc.stderr + proc.stdout and "bad model ***" in proc.stderr


def test_sigterm_after_run_completed_exits_0_for_a_completed_run(tmp_path: Path, ledger_url: str,
                                                                 local_url: str) -> None:
    spec = small_spec(tmp_path, local_url, name="late", run={"steps": 2})
    done = cli(ledger_url, "run", str(spec), "--run-id", "late", "--quiet", crash_at="event:RunCompleted:1",
               crash_signal="TERM")
    assert done.returncode == 0, done.stderr[-2000:]
    events = Ledger.open(ledger_url).read("late")
    assert events[-1].type == "RunCompleted" and "RunFailed" not in [ev.type for ev in events]
    assert fold(events).status == "completed"


def test_run_failed_names_the_step_in_progress(tmp_path: Path, ledger_url: str, local_url: str) -> None:
    # the catalogue's RunFailed.step: the step the run was on, one past the last StepCompleted
    spec = small_spec(tmp_path, local_url, name="stepk")
    stopped = cli(ledger_url, "run", str(spec), "--run-id", "stepk", "--quiet", crash_at="midstep:3",
                  crash_signal="TERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    events = Ledger.open(ledger_url).read("stepk")
    completed = [ev.data["step"] for ev in events if ev.type == "StepCompleted"]
    assert events[-1].type == "RunFailed" and events[-1].data["step"] == 3 == completed[-1] + 1


def test_a_signal_landing_inside_a_ledger_write_waits_until_the_write_is_done(ledger_url: str,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # raised mid-transaction, the exception could leave a pooled connection holding SQLite's
    # write lock, and the cleanup's own record would then wait for it and fail
    import time

    from firetitan_track import ledger as ledger_module
    from firetitan_track import new_event
    from runner.interrupts import StopSignals, Terminated

    ledger = Ledger.open(ledger_url)
    chain = ledger_module._chain  # runs inside the append's transaction, holding the write lock

    def signalled_inside(*args: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)  # lands on the next bytecode: inside the append
        return chain(*args)

    monkeypatch.setattr(ledger_module, "_chain", signalled_inside)
    stop = StopSignals()
    try:
        ledger.append("w", [new_event("RunFailed", error="x", step=0)], 0)  # not interrupted
        assert ledger.stream_version("w") == 1 and isinstance(stop.requested, Terminated)
        monkeypatch.setattr(ledger_module, "_chain", chain)
        with pytest.raises(Terminated):  # delivered again once the write is done
            time.sleep(5)
    finally:
        stop.restore()
        ledger.close()
