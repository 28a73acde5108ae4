"""The runner on a PostgreSQL ledger (a team's shared record): run, crash, resume, audit, verify."""

from __future__ import annotations

import json
import os
import signal
import uuid

import pytest
import sqlalchemy as sa

from firetitan_track import Ledger
from firetitan_track.projections.run_state import fold
from tests.helpers import cli, small_spec

POSTGRES_URL = os.environ.get("FIRETITAN_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="FIRETITAN_TEST_POSTGRES_URL is not set; "
                                                         "PostgreSQL runner test skipped")


@pytest.fixture
def pg_ledger_url():
    admin = sa.create_engine(POSTGRES_URL)
    schema = f"ft_e2e_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    admin.dispose()


def test_run_crash_resume_on_postgres(local_url, pg_ledger_url, tmp_path):
    spec = small_spec(tmp_path, local_url, name="pg")
    refused = cli(pg_ledger_url, "run", str(spec), "--run-id", "pg", "--quiet")
    assert refused.returncode == 1 and "firetitan-track db upgrade" in refused.stderr  # a new database: not yet
    assert cli(pg_ledger_url, "db", "upgrade").returncode == 0

    crashed = cli(pg_ledger_url, "run", str(spec), "--run-id", "pg", "--quiet", crash_at="event:StateSaved:2")
    assert crashed.returncode == -signal.SIGKILL
    resumed = cli(pg_ledger_url, "resume", "pg", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    ledger = Ledger.open(pg_ledger_url)
    events = ledger.read("pg")
    assert fold(events).status == "completed"
    assert [ev.version for ev in events] == list(range(len(events)))
    assert ledger.verify("pg") == []
    rows = json.loads(cli(pg_ledger_url, "audit", "pg", "--json").stdout)
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert cli(pg_ledger_url, "verify", "pg").returncode == 0
