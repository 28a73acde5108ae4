"""A recorded program killed with SIGKILL mid-step: the ledger verifies, shows the intent
without its outcome, and ``status`` says what the program needs to continue; continuing it
(the same command, recorded into the same run) resumes the run from that checkpoint."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from firetitan_track import Ledger
from firetitan_track.projections.run_state import authoritative, fold
from tests.envs import COOKBOOK
from tests.record.conftest import API_KEY, record

PROGRAM = Path(__file__).parent / "programs" / "crash_midstep.py"
CLI = Path(sys.executable).parent / "firetitan-track"


def test_killed_mid_step_then_continued_from_what_status_prints(cookbook_recorder_bin, local_info, ledger_url,
                                                                 tmp_path):
    ready = tmp_path / "ready"
    command = [str(cookbook_recorder_bin / "python"), str(PROGRAM), local_info.base_url, local_info.tokenizer_path,
               local_info.training_shape_id, str(tmp_path / "logs"), str(ready)]
    env = {**os.environ, "FIREWORKS_API_KEY": API_KEY, "PYTHONPATH": str(COOKBOOK)}
    recorder = subprocess.Popen([str(CLI), "--ledger", ledger_url, "record", "--run-id", "crash", "--", *command],
                                env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not ready.exists() or not ready.read_text():
        assert recorder.poll() is None, recorder.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the program never reached step 3"
        time.sleep(0.2)
    os.kill(int(ready.read_text()), signal.SIGKILL)  # the program, mid-step; `record` outlives it
    _, err = recorder.communicate(timeout=120)
    assert recorder.returncode == -signal.SIGKILL, err[-3000:]  # record dies of what killed the program

    verify = subprocess.run([str(CLI), "--ledger", ledger_url, "verify", "crash"], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    ledger = Ledger.open(ledger_url)
    events = ledger.read("crash")
    st = fold(events)
    assert [ev.data["step"] for ev in events if ev.type == "StepRequested"] == [1, 2, 3]
    assert [ev.data["step"] for ev in events if ev.type == "StepCompleted"] == [1, 2]
    assert st.open_intent == "StepRequested" and st.open_intents == {"StepRequested": 1}
    exited = next(ev.data for ev in events if ev.type == "ProgramExited")
    assert (exited["outcome"], exited["signal"]) == ("killed", "SIGKILL") and st.status == "failed"

    shown = subprocess.run([str(CLI), "--ledger", ledger_url, "status", "crash", "--json"], capture_output=True,
                           text=True)
    status = json.loads(shown.stdout)
    assert status["trainer_job_id"] == st.trainer_job_id and status["pending_intent"] == "StepRequested"
    assert status["last_state"] == {"step": 2, "name": "step-2", "path": "step-2", "data_consumed": 2,
                                    "trainer_job_id": st.trainer_job_id}
    assert status["command"] == shlex.join(command) and status["cwd"] == str(tmp_path)
    text = subprocess.run([str(CLI), "--ledger", ledger_url, "status", "crash"], capture_output=True, text=True).stdout
    assert "data_consumed=2" in text and st.trainer_job_id in text and str(PROGRAM) in text

    # the cookbook continues on the trainer status names, from the newest resumable checkpoint
    again = record(ledger_url, "--run-id", "crash", "--", *command, status["trainer_job_id"], cwd=tmp_path,
                   env={"PYTHONPATH": str(COOKBOOK)})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trained to step 4, 4 rows consumed" in again.stdout
    events = ledger.read("crash")
    resumed = next(ev for ev in events if ev.type == "RunResumed")
    assert (resumed.data["from_step"], resumed.data["state_path"], resumed.data["attempt"]) == (2, "step-2", 2)
    crashed_intent = next(ev for ev in events if ev.type == "StepRequested" and ev.data["step"] == 3)
    assert crashed_intent.version in resumed.data["superseded"]
    history = authoritative(events)
    assert [ev.data["step"] for ev in history if ev.type == "StepCompleted"] == [1, 2, 3, 4]
    final = fold(events)
    assert (final.status, final.step, final.open_intent, final.attempts) == ("completed", 4, None, 2)
    assert final.last_state.data_cursor == {"data_consumed": 4}
    assert not ledger.verify("crash")
