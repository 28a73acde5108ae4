"""The core alone, installed from the wheel into a researcher's own environment: it records their
loop with track(), creates its SQLite ledger on first use, reads it back, and names the extra
of every command it does not hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from firetitan_track.store import HEAD_REVISION
from tests.envs import ROOT, installed, site_packages
from tests.install.conftest import HEAVY, outside, run_program


def test_the_core_brings_no_torch_service_stack_mlflow_optuna_or_sdk(core_bin: Path) -> None:
    held = installed(core_bin)  # a fresh environment after `pip install firetitan-track`
    assert "firetitan-track" in held
    assert not HEAVY & set(held)


def test_the_core_records_a_run_with_track_and_reads_it_back(user_core_bin: Path, local_info, tmp_path: Path) -> None:
    core_bin = user_core_bin
    work = tmp_path / "work"
    report = run_program(core_bin, "tracked_loop.py", json.dumps(local_info.public()), "installed-core", cwd=work)
    assert Path(report["firetitan_track"]).is_relative_to(site_packages(core_bin))  # the wheel's, not the checkout
    assert not any(Path(p).resolve() == ROOT for p in report["sys_path"] if p)
    assert report["torch_loaded"] is False
    assert (work / ".firetitan" / "ledger.db").is_file()  # created and migrated on first use

    def ft(*args: str) -> str:
        done = outside(core_bin, "firetitan-track", *args, cwd=work)
        assert done.returncode == 0, f"firetitan-track {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done.stdout

    assert ft("db", "current").strip() == f"{HEAD_REVISION} (head)"
    assert ft("db", "upgrade").strip() == f"already at head revision {HEAD_REVISION}"
    events = json.loads(ft("events", "mine", "--json"))
    types = [e["type"] for e in events]
    assert types[:4] == ["RunStarted", "ProvisionRequested", "TrainerProvisioned", "DeploymentProvisioned"]
    assert [e["data"]["step"] for e in events if e["type"] == "StepCompleted"] == [1, 2]
    assert events[-1]["type"] == "CleanupApplied"
    assert events[-1]["data"] == {"trainer": "deleted", "deployment": "scaled_to_zero"}
    assert ft("verify").strip().endswith("intact")
    rows = json.loads(ft("audit", "mine", "--json"))
    assert [(r["step"], r["snapshot_path"]) for r in rows] == [(2, report["snapshot"])]
    assert json.loads(ft("status", "mine", "--json"))["last_snapshot"]["path"] == report["snapshot"]
    ft("bundle", "mine", "-o", "mine.tar.gz")
    assert "intact" in ft("verify", "--bundle", "mine.tar.gz")


@pytest.mark.parametrize("args, extra", [
    (["local", "up", "--state-dir", "svc"], "local"),
    (["run", "spec.toml"], "runner"),
    (["sweep", "spec.toml", "--grid", "optim.learning_rate=1e-3"], "runner"),
    (["resume", "--help"], "runner"),
    (["export", "mlflow"], "mlflow"),
    (["ui"], "mlflow"),
    (["--ledger", "postgresql+psycopg://me@127.0.0.1:1/ledger", "runs"], "postgres"),
])
def test_a_command_whose_extra_is_missing_names_it(core_bin: Path, tmp_path: Path, args: list[str],
                                                   extra: str) -> None:
    done = outside(core_bin, "firetitan-track", *args, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"pip install 'firetitan-track[{extra}]'" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "svc").exists()  # `local up` started nothing
