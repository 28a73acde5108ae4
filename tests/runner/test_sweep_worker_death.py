"""``sweep --workers 2``: ``kill -9`` of one worker mid-trial does not stop the sweep. The
other worker runs on untouched, the dead worker's trial is resumed from its ledger state
(not restarted), and every trial completes."""

from __future__ import annotations

from pathlib import Path

import pytest

from firetitan_track import Ledger
from firetitan_track.projections.compare import compare_sweep
from tests.helpers import POSTGRES_URL, small_spec
from tests.team.procs import finish, machine, start


@pytest.fixture(params=["sqlite", "postgresql"])
def sweep_ledger(request: pytest.FixtureRequest, ledger_url: str) -> str:
    if request.param == "sqlite":
        return ledger_url
    if not POSTGRES_URL:
        pytest.skip("FIRETITAN_TEST_POSTGRES_URL is not set; PostgreSQL tests skipped")
    from firetitan_track.store import upgrade_schema

    url = request.getfixturevalue("empty_schema_url")
    upgrade_schema(url)
    return url


def test_a_killed_worker_does_not_stop_the_sweep(sweep_ledger: str, tmp_path: Path, local_url: str) -> None:
    spec = small_spec(tmp_path, local_url, name="wk")
    host = machine(tmp_path, "host")
    once = tmp_path / "one-worker-died"
    proc = start(sweep_ledger, host, "sweep", str(spec), "--grid", "optim.learning_rate=1e-3,3e-3,1e-2",
                 "--workers", "2", "--sweep-id", "wk", "--no-mlflow", "--quiet",
                 worker_crash_at="event:StateSaved:2", worker_crash_once=str(once))
    code, out = finish(proc, timeout=900)
    assert once.exists(), out  # one worker was killed, at its first trial's state 2
    assert code == 0, out
    assert "died (killed by SIGKILL)" in out and "BrokenProcessPool" not in out and "Traceback" not in out

    with Ledger.open(sweep_ledger) as ledger:
        trials = compare_sweep(ledger, "wk")
        assert [t.status for t in trials] == ["completed"] * 3, out
        histories = {t.run_id: [ev.type for ev in ledger.read(t.run_id)] for t in trials}
        resumed = [rid for rid, types in histories.items() if "RunResumed" in types]
        assert len(resumed) == 1, histories  # the dead worker's trial, and only it
        events = ledger.read(resumed[0])
        [again] = [ev for ev in events if ev.type == "RunResumed"]
        assert again.data["from_step"] == 2  # from its ledger state, not restarted
        assert [ev.type for ev in events].count("RunStarted") == 1
        for rid, types in histories.items():  # the others ran straight through
            assert "RunFailed" not in types, (rid, types)
            assert types.count("RunStarted") == 1 and types[-1] == "RunCompleted"
