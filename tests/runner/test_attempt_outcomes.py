"""How a failed attempt ends, from what stopped it: ``runner.loop.classify`` is pure, so each
cause's cleanup, last event and answer to the caller are checked here without a service
(the end-to-end paths, a killed service or ledger, Ctrl-C twice, a pruned trial, are
test_record_truth's, test_recipes_and_commands' and the sweeps')."""

from __future__ import annotations

import signal

from firetitan_track.events import RunFailed, TrialPruned
from firetitan_track.ledger import StoreFailure
from runner.backend_watch import BackendLost
from runner.interrupts import RunInterrupted, Terminated
from firetitan_track.lease import LeaseLost
from runner.loop import NotResumable, RunError, ServiceLost, StopEarly, classify
from runner.spec import BackendSection

LOCAL = BackendSection(state_dir="/srv/state")


def ends(cause: BaseException, backend: BackendSection = LOCAL):
    return classify(cause, run_id="r", step=7, backend=backend)


def test_a_ledger_that_refuses_writes_gets_a_cleanup_and_no_record():
    outcome = ends(StoreFailure("disk full"))
    assert (outcome.cleanup, outcome.last_event, outcome.error, outcome.pruned) == ("unrecorded", None, None, None)


def test_a_lost_lease_leaves_the_service_and_the_ledger_to_the_other_writer():
    outcome = ends(LeaseLost("r"))
    assert outcome.cleanup == "none" and outcome.last_event is None
    assert type(outcome.error) is RunError and "lost its lease" in str(outcome.error)


def test_a_pruned_trial_is_recorded_pruned_and_returns():
    stop = StopEarly("median", 4, 0.25)
    outcome = ends(stop)
    assert outcome.cleanup == "recorded" and outcome.pruned is stop and outcome.error is None
    assert outcome.last_event == TrialPruned(step=4, score=0.25, reason="median")


def test_a_lost_service_is_recorded_failed_and_says_how_to_continue():
    lost = BackendLost("http://127.0.0.1:1", 30, "connection refused")
    outcome = ends(lost)
    assert outcome.last_event == RunFailed(error=f"BackendLost: {lost}", step=7)
    assert isinstance(outcome.error, ServiceLost)
    assert "--state-dir /srv/state" in str(outcome.error) and "firetitan-track resume r" in str(outcome.error)
    remote = ends(lost, BackendSection(kind="fireworks"))
    assert "When the service answers again, continue it with" in str(remote.error)


def test_a_failure_resume_would_repeat_says_to_change_the_spec():
    outcome = ends(NotResumable("step 2: loss = nan: training diverged"))
    assert isinstance(outcome.last_event, RunFailed) and outcome.last_event.step == 7
    assert type(outcome.error) is RunError and "would fail the same way" in str(outcome.error)


def test_ctrl_c_and_sigterm_are_recorded_failed_and_answered_as_interrupts():
    for cause, signum in ((KeyboardInterrupt(), signal.SIGINT), (Terminated("terminated by SIGTERM"), signal.SIGTERM)):
        outcome = ends(cause)
        assert isinstance(outcome.last_event, RunFailed)
        assert isinstance(outcome.error, RunInterrupted) and outcome.error.signum == signum


def test_any_other_failure_is_recorded_and_the_exception_itself_goes_to_the_caller():
    outcome = ends(ValueError("boom"))
    assert outcome.cleanup == "recorded" and outcome.error is None and outcome.pruned is None
    assert outcome.last_event == RunFailed(error="ValueError: boom", step=7)
