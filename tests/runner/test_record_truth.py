"""The record never lies, and bad values never reach it.

A killed service is noticed within seconds and its cleanup is recorded as unknown, not
as done; a spec the service refuses, a diverging loss, an in-memory ledger or an empty
run id is refused before (or instead of) a misleading record; a second Ctrl-C still
says how to continue; a secret masked out of the data is recorded as such.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from firetitan_track import Ledger
from firetitan_track.projections.run_state import fold
from runner.cli import main
from runner.loop import RunError, rerun, run_spec
from runner.spec import SpecError, load_spec

from tests.helpers import REPO, cli, small_spec


def events(url: str, run_id: str) -> list:
    return Ledger.open(url).read(run_id)


def test_a_killed_service_stops_the_run_in_seconds_with_an_honest_record(tmp_path: Path) -> None:
    from runner.local.supervisor import running, stop

    state_dir = tmp_path / "svc"
    spec = small_spec(tmp_path, "", name="dead", run={"steps": 50})
    spec.write_text(spec.read_text().replace('base_url = ""', f'state_dir = "{state_dir}"'))
    url = f"sqlite:///{tmp_path}/ledger.db"
    env = {**os.environ, "FIRETITAN_BACKEND_TIMEOUT_S": "4"}
    runner = subprocess.Popen([sys.executable, "-m", "runner.cli", "--ledger", url, "run", str(spec),
                               "--run-id", "d", "--quiet"], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not any(ev.type == "StateSaved" for ev in _read_or_empty(url, "d")):
            assert runner.poll() is None and time.monotonic() < deadline, runner.communicate()
            time.sleep(0.2)
        os.kill(running(state_dir).pid, signal.SIGKILL)  # the service dies mid-run
        killed_at = time.monotonic()
        _, err = runner.communicate(timeout=120)
    finally:
        if runner.poll() is None:
            runner.kill()
        stop(state_dir)
    # before: the SDK retried for 16 minutes, then a traceback
    assert time.monotonic() - killed_at < 45, "the runner took minutes to notice"
    assert runner.returncode == 1, err
    assert "stopped answering" in err and "continue it with: firetitan-track resume d" in err
    assert "Traceback" not in err
    recorded = events(url, "d")
    # before: {"trainer": "deleted", "deployment": "scaled_to_zero"}, neither of which happened
    cleanup = next(ev.data for ev in recorded if ev.type == "CleanupApplied")
    assert (cleanup["trainer"], cleanup["deployment"]) == ("unknown", "unknown"), cleanup
    assert recorded[-1].type == "RunFailed" and "stopped answering" in recorded[-1].data["error"]
    assert fold(recorded).last_state is not None  # resumable: `resume d` starts the service again


def _read_or_empty(url: str, run_id: str) -> list:
    try:
        return events(url, run_id)
    except Exception:  # not created yet
        return []


def test_cleanup_records_a_delete_the_service_did_not_do_as_failed(local_info, ledger_url: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from fireworks.training.sdk import FiretitanServiceClient, TrainerJobManager

    from firetitan_track import track

    service = FiretitanServiceClient.from_firetitan_config(
        api_key="local", base_url=local_info.base_url, base_model="local/tiny-qwen3",
        tokenizer_model=local_info.tokenizer_path, lora_rank=0,
        training_shape_id="accounts/fireworks/trainingShapes/ts-local-tiny", deployment_id="truth-cleanup",
        learning_rate=1e-3, replica_count=1, cleanup_trainer_on_close=True,
        cleanup_deployment_on_close="scale_to_zero")
    tracked = track(service, run_id="c", ledger_url=ledger_url)
    tracked.create_training_client()
    # The SDK's delete logs a failure and returns; a refused delete is hard to cause on the
    # local service, so this one is made to do nothing (a fake: the only one in this file).
    monkeypatch.setattr(TrainerJobManager, "delete", lambda self, job_id: None)
    tracked.close()
    cleanup = events(ledger_url, "c")[-1]
    assert cleanup.type == "CleanupApplied"
    assert cleanup.data["trainer"] == "failed" and cleanup.data["deployment"] == "scaled_to_zero"
    assert "still" in cleanup.data["error"]
    monkeypatch.undo()
    TrainerJobManager(api_key="local", base_url=local_info.base_url).delete(fold(events(ledger_url, "c")).trainer_job_id)


@pytest.mark.parametrize("section, key, message", [
    ("model", {"base_model": "accounts/fireworks/models/no-such-model"},
     "model.base_model: the service has no model 'accounts/fireworks/models/no-such-model'"),
    ("model", {"training_shape": "ts-no-such-shape"}, "model.training_shape: the service refuses"),
    ("model", {"lora_rank": 8}, "model.lora_rank: training shape .*ts-local-tiny' is full-parameter"),
    ("sampling", {"max_tokens": 100_000}, "sampling.max_tokens: 100000 new tokens do not fit the model's context"),
        ("sampling", {"max_tokens": 500}, "eval.prompts: prompt 1 takes .* more than the model's context"),
])
def test_what_the_service_refuses_is_refused_before_anything_is_written(tmp_path, local_url, ledger_url,
                                                                         section, key, message):
    spec = load_spec(small_spec(tmp_path, local_url, name="pre", **{section: key}))
    with pytest.raises(SpecError, match=message):
        run_spec(spec, ledger_url=ledger_url, run_id="pre", progress=False)
    assert Ledger.open(ledger_url).runs() == []


def test_a_diverged_loss_is_not_recorded_and_not_offered_to_resume(tmp_path, local_url, ledger_url,
                                                                   monkeypatch):
    import dataclasses

    from runner.recipes import RECIPES, sft

    # The local service reports a non-finite loss as null, which the SDK refuses to parse,
    # so a NaN loss cannot reach the runner from it for real: step 2's real metrics are
    # handed back with the loss the managed service would report.
    def diverging(ctx, batch):
        metrics = sft.train_step(ctx, batch)
        return {**metrics, "loss": float("nan")} if ctx.step == 2 else metrics

    monkeypatch.setitem(RECIPES, "sft", dataclasses.replace(sft.RECIPE, train_step=diverging))
    spec = load_spec(small_spec(tmp_path, local_url, name="nan", run={"steps": 3},
                                schedule={"eval_every": 10, "save_every": 10}, eval={"count": 1}))
    with pytest.raises(RunError, match=r"step 2: loss = nan: training diverged") as caught:
        run_spec(spec, ledger_url=ledger_url, run_id="nan", progress=False)
    assert "would fail the same way" in str(caught.value)
    assert "continue it with" not in str(caught.value) + "".join(getattr(caught.value, "__notes__", []))
    shown = CliRunner().invoke(main, ["--ledger", ledger_url, "events", "nan", "--json"])
    assert shown.exit_code == 0
    json.loads(shown.output, parse_constant=lambda c: pytest.fail(f"{c} in the ledger"))
    recorded = events(ledger_url, "nan")
    assert recorded[-1].type == "RunFailed" and "diverged" in recorded[-1].data["error"]
    assert [ev.data["step"] for ev in recorded if ev.type == "StepCompleted"] == [1]


def test_an_in_memory_ledger_and_an_empty_run_id_are_refused(tmp_path, local_url):
    spec = str(small_spec(tmp_path, local_url, name="refuse"))
    memory = CliRunner().invoke(main, ["--ledger", "sqlite://", "run", spec, "--quiet"])
    assert memory.exit_code == 1 and "is in memory" in memory.output
    empty = CliRunner().invoke(main, ["--ledger", f"sqlite:///{tmp_path}/l.db", "run", spec, "--run-id", "",
                                      "--quiet"])
    assert empty.exit_code == 1 and "run id ''" in empty.output
    assert not (tmp_path / "l.db").exists() or Ledger.open(f"sqlite:///{tmp_path}/l.db").runs() == []


def test_a_second_ctrl_c_during_cleanup_still_says_how_to_continue(tmp_path, local_url, ledger_url):
    # Real SIGINTs, sent by the process to itself at chosen moments: the first after the
    # first state save, the second as cleanup begins.
    script = textwrap.dedent("""
        import os, signal
        from firetitan_track import tracking
        record, close = tracking.Recorder.record, tracking.TrackedService.close
        def first(self, event, **kw):
            ev = record(self, event, **kw)
            if event.type_name == "StateSaved":
                os.kill(os.getpid(), signal.SIGINT)
            return ev
        def second(self, **kw):
            os.kill(os.getpid(), signal.SIGINT)
            return close(self, **kw)
        tracking.Recorder.record, tracking.TrackedService.close = first, second
        from runner.cli import main
        main(prog_name="firetitan-track")
    """)
    spec = small_spec(tmp_path, local_url, name="twice", eval={"count": 1})
    proc = subprocess.run([sys.executable, "-c", script, "--ledger", ledger_url, "run", str(spec),
                           "--run-id", "twice", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "interrupted again while cleaning up" in proc.stderr
    assert "Continue it with: firetitan-track resume twice" in proc.stderr and "Aborted" not in proc.stderr


def test_a_secret_masked_out_of_the_data_is_recorded_and_a_rerun_says_its_data_differ(
        tmp_path, local_url, ledger_url, monkeypatch):
    key = "fw_live_pasted_into_a_prompt_123"
    monkeypatch.setenv("FIREWORKS_API_KEY", key)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": f"reverse 123 {key}", "answer": "321"}) + "\n"
                       + json.dumps({"prompt": "reverse 45", "answer": "54"}) + "\n")
    spec = load_spec(small_spec(tmp_path, local_url, name="masked", run={"steps": 1},
                                eval={"prompts": str(prompts), "count": 0}))
    run_spec(spec, ledger_url=ledger_url, run_id="masked", progress=False)
    started = events(ledger_url, "masked")[0].data
    assert started["prompt_sets_masked"] == {"eval": 1}
    stored = Ledger.open(ledger_url).get_json(started["prompt_sets"]["eval"])
    assert key not in json.dumps(stored) and len(stored) == 2
    rerun("masked", ledger_url=ledger_url, new_run_id="masked-again", progress=False)
    again = events(ledger_url, "masked-again")[0].data
    assert again["rerun_of"] == "masked" and again["rerun_data_differs"] == {"eval": 1}
    assert "prompt_sets_masked" not in again  # the rerun's own record is exactly what it used
    from firetitan_track.projections.diff import diff_runs, report

    d = diff_runs(Ledger.open(ledger_url), "masked", "masked-again")
    assert not d.prompt_sets["eval"].same and (d.prompt_sets["eval"].masked_a, d.prompt_sets["eval"].masked_b) == (1, 0)
    assert "eval: same record" in report(d) and "but the data differ" in report(d)


@pytest.mark.parametrize("room_kb", [0, 40], ids=["while-provisioning", "while-training"])
def test_a_ledger_that_stops_taking_writes_stops_the_run_through_its_cleanup(tmp_path, local_url, room_kb):
    """Wherever the ledger stops taking writes (no room past the run's request to provision:
    during provisioning, after the trainer is made but before the run's record holds it; 40 KB
    past it: while training), the run stops, says so, and leaves no trainer running, though
    the record of its cleanup is refused too."""
    import resource

    url = f"sqlite:///{tmp_path}/ledger.db"
    Ledger.open(url).close()  # created in full; the run's own writes then hit the limit
    # how far the files grow through ProvisionRequested (RunStarted's size varies: a checkout
    # with uncommitted changes records them), measured on a copy that stops right after it
    probe = tmp_path / "probe"
    probe.mkdir()
    probe_url = f"sqlite:///{probe}/ledger.db"
    Ledger.open(probe_url).close()
    stopped = cli(probe_url, "run", str(small_spec(probe, local_url, name="full", eval={"count": 2})),
                  "--run-id", "full", "--quiet", crash_at="event:ProvisionRequested:1")
    assert stopped.returncode == -signal.SIGKILL, stopped.stderr[-3000:]
    limit = max(f.stat().st_size for f in probe.glob("ledger.db*")) + room_kb * 1024

    def refuse_growth() -> None:  # a real refused write: no file may grow past the limit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    before = _trainer_states(local_url)
    spec = small_spec(tmp_path, local_url, name="full", eval={"count": 2})
    proc = subprocess.run([sys.executable, "-m", "runner.cli", "--ledger", url, "run", str(spec),
                           "--run-id", "full", "--quiet"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, preexec_fn=refuse_growth)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"cannot write to the ledger at {url}" in proc.stderr and "Traceback" not in proc.stderr
    assert "could not be recorded" in proc.stderr and "firetitan-track resume full" in proc.stderr
    made = {job: state for job, state in _trainer_states(local_url).items() if job not in before}
    # before: a trainer made during provisioning kept running, and the run said "nothing to clean up"
    assert all(state == "JOB_STATE_DELETED" for state in made.values()), made
    assert made  # the cut comes after the trainer is made, in both cases
    assert "trainer deleted" in proc.stderr, proc.stderr[-3000:]


def _trainer_states(base_url: str) -> dict[str, str]:
    """Every trainer job the service holds: its id and state."""
    import httpx
    from fireworks.training.sdk import TrainerJobManager

    account = TrainerJobManager(api_key="local", base_url=base_url).account_id
    listed = httpx.get(f"{base_url}/v1/accounts/{account}/rlorTrainerJobs",
                       headers={"Authorization": "Bearer local"}, timeout=30).json()
    return {job["name"].rsplit("/", 1)[-1]: str(job.get("state", "")) for job in listed["rlorTrainerJobs"]}


def test_a_service_whose_state_dir_was_deleted_is_still_found_and_never_doubled(tmp_path):
    import shutil

    from firetitan_track.processes import pid_alive
    from runner.local.supervisor import ServiceError, ensure_running, start

    state_dir = tmp_path / "svc"
    info = start(state_dir)
    try:
        shutil.rmtree(state_dir)  # under the running service
        with pytest.raises(ServiceError, match=rf"pid {info.pid}\) still runs on .*svc.*local down"):
            ensure_running(state_dir)  # what `resume` does: no second server on the same dir
        down = CliRunner().invoke(main, ["local", "down", "--state-dir", str(state_dir)])
        assert down.exit_code == 0 and "stopped the local service" in down.output, down.output
        assert not pid_alive(info.pid)
    finally:
        if pid_alive(info.pid):
            os.kill(info.pid, signal.SIGKILL)


def test_a_request_the_service_refuses_is_not_offered_to_resume(tmp_path, local_url, ledger_url):
    # a shape for another base model: the service refuses the trainer (HTTP 400) on every try
    spec = load_spec(small_spec(tmp_path, local_url, name="mismatch",
                                model={"base_model": "accounts/fireworks/models/qwen3-8b"}))
    with pytest.raises(RunError, match=r"HTTP 400.*would fail the same way") as caught:
        run_spec(spec, ledger_url=ledger_url, run_id="mismatch", progress=False)
    assert "continue it with" not in str(caught.value)
    assert events(ledger_url, "mismatch")[-1].type == "RunFailed"


def test_rerun_refuses_an_empty_run_id_too(ledger_url):
    from firetitan_track.events import new_event

    spec = {"run": {"name": "x"}}
    Ledger.open(ledger_url).append("orig", [new_event("RunStarted", spec=spec, spec_digest="0" * 64,
                                                      code_version="t", seed=0, backend="local")], 0)
    result = CliRunner().invoke(main, ["--ledger", ledger_url, "rerun", "orig", "--run-id", "", "--quiet"])
    assert result.exit_code == 1 and "run id ''" in result.output, result.output


def test_a_base_url_where_nothing_answers_is_refused_at_once(tmp_path, ledger_url):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = load_spec(small_spec(tmp_path, f"http://127.0.0.1:{port}", name="nobody"))
    started = time.monotonic()
    with pytest.raises(SpecError, match=rf"backend.base_url: no service answers at http://127.0.0.1:{port}"):
        run_spec(spec, ledger_url=ledger_url, run_id="nobody", progress=False)
    assert time.monotonic() - started < 30  # not the SDK's five minutes of retries
    assert Ledger.open(ledger_url).runs() == []
