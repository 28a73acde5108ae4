"""One writer per run across machines: two processes with different TMPDIRs (two
"machines") resume one crashed run on a PostgreSQL ledger, at the interleavings we
can force with real signals (SIGKILL to crash, SIGSTOP/SIGCONT to pause a writer at a
chosen event): exactly one proceeds, and the run's history equals the uninterrupted
run's. A writer whose lease was taken over while it was paused stops before its next
append. And on SQLite, two spellings of one database file find the same lease.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from firetitan_track import Ledger
from firetitan_track.projections.run_state import fold
from firetitan_track.store import upgrade_schema
from firetitan_track.lease import LeaseHeld, acquire, try_acquire
from tests.helpers import needs_postgres, small_spec
from tests.runner.test_resume import history
from tests.team.procs import LEASE_TTL_S, finish, machine, start, wait_stopped


@pytest.fixture(scope="module")
def uninterrupted(local_url: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    tmp = tmp_path_factory.mktemp("reference")
    url = f"sqlite:///{tmp}/ledger.db"
    spec = small_spec(tmp, local_url, name="race")
    code, out = finish(start(url, machine(tmp, "ref"), "run", str(spec), "--run-id", "ref", "--quiet"))
    assert code == 0, out
    return spec, history(url, "ref")


@pytest.fixture
def crashed(empty_schema_url: str, uninterrupted: tuple[Path, list], tmp_path: Path) -> str:
    """A PostgreSQL ledger holding run r, killed right after its state at step 2."""
    upgrade_schema(empty_schema_url)
    spec, _ = uninterrupted
    code, out = finish(start(empty_schema_url, machine(tmp_path, "first"), "run", str(spec), "--run-id", "r",
                             "--quiet", crash_at="event:StateSaved:2"))
    assert code == -signal.SIGKILL, out
    return empty_schema_url


@needs_postgres
def test_two_machines_resuming_at_once_exactly_one_proceeds(crashed: str, uninterrupted, tmp_path: Path) -> None:
    _, expected = uninterrupted
    procs = [start(crashed, machine(tmp_path, name), "resume", "r", "--quiet") for name in ("host-a", "host-b")]
    outcomes = [finish(p) for p in procs]
    assert sorted(code for code, _ in outcomes) == [0, 1], outcomes
    loser = next(out for code, out in outcomes if code == 1)
    assert "run r is being written by another process" in loser
    events = Ledger.open(crashed).read("r")
    assert sum(ev.type == "RunResumed" for ev in events) == 1
    assert fold(events).status == "completed"
    assert history(crashed, "r") == expected


@needs_postgres
def test_a_paused_writer_keeps_its_lease_then_loses_it_and_stops_before_its_next_append(
        crashed: str, uninterrupted, tmp_path: Path) -> None:
    _, expected = uninterrupted
    a, b = machine(tmp_path, "host-a"), machine(tmp_path, "host-b")
    # host-a resumes and is paused (SIGSTOP) right after its RunResumed is durable
    first = start(crashed, a, "resume", "r", "--quiet", crash_at="event:RunResumed:1", crash_signal="STOP")
    wait_stopped(first)
    # while its lease is live, another writer is refused (asked here, in this process: a new
    # CLI process can take longer to start than the lease lives when the machine is busy)
    other = Ledger.open(crashed)
    lease, holder = try_acquire(other, "r")
    assert lease is None and f":{first.pid}," in holder
    other.close()
    # paused past its lease's time to live (its renewals stopped with it): host-b takes over and finishes
    time.sleep(float(LEASE_TTL_S) + 1)
    code, out = finish(start(crashed, b, "resume", "r", "--quiet"))
    assert code == 0, out
    done = Ledger.open(crashed).read("r")
    # host-a wakes up: its next append is fenced off, it stops without cleanup or any write
    os.kill(first.pid, signal.SIGCONT)
    code, out = finish(first)
    assert code == 1 and "lost its lease on the run to another writer" in out, out
    events = Ledger.open(crashed).read("r")
    assert events == done
    assert [ev.type for ev in events].count("RunResumed") == 2 and fold(events).status == "completed"
    assert history(crashed, "r") == expected


def test_two_spellings_of_one_sqlite_file_share_one_lease(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    plain = Ledger.open(f"sqlite:///{tmp_path}/a/ledger.db")
    doubled = Ledger.open(f"sqlite:///{tmp_path}//a//ledger.db")
    linked = Ledger.open(f"sqlite:///{tmp_path}/link/../a/../link/ledger.db")
    with acquire(plain, "r"):
        for other in (doubled, linked):
            with pytest.raises(LeaseHeld, match="run r is being written by another process"):
                acquire(other, "r")
    with acquire(linked, "r"):  # released: free again
        pass
    for led in (plain, doubled, linked):
        led.close()
