"""The runner on a PostgreSQL ledger (a team's shared record): run, crash, resume, audit, verify."""

from __future__ import annotations

import json
import signal

from firetitan_track import Ledger
from firetitan_track.projections.run_state import fold
from tests.helpers import cli, needs_postgres, small_spec

pytestmark = needs_postgres


def test_run_crash_resume_on_postgres(local_url, empty_schema_url, tmp_path):
    spec = small_spec(tmp_path, local_url, name="pg")
    refused = cli(empty_schema_url, "run", str(spec), "--run-id", "pg", "--quiet")
    assert refused.returncode == 1 and "firetitan-track db upgrade" in refused.stderr  # a new database: not yet
    assert cli(empty_schema_url, "db", "upgrade").returncode == 0

    crashed = cli(empty_schema_url, "run", str(spec), "--run-id", "pg", "--quiet", crash_at="event:StateSaved:2")
    assert crashed.returncode == -signal.SIGKILL
    resumed = cli(empty_schema_url, "resume", "pg", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    ledger = Ledger.open(empty_schema_url)
    events = ledger.read("pg")
    assert fold(events).status == "completed"
    assert [ev.version for ev in events] == list(range(len(events)))
    assert ledger.verify("pg") == []
    rows = json.loads(cli(empty_schema_url, "audit", "pg", "--json").stdout)
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert cli(empty_schema_url, "verify", "pg").returncode == 0
