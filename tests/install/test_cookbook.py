"""firetitan-track's core installed into the cookbook's environment (fireworks-ai 1.2.24 with
tinker 0.23, as researchers run the cookbook) leaves that environment's packages as they were,
and records the seed's loop written on that SDK."""

from __future__ import annotations

import json
from pathlib import Path

from tests.envs import installed, site_packages
from tests.install.conftest import outside, run_program


def test_installing_keeps_the_cookbook_sdk_and_records_the_seed_loop(cookbook_bin: Path, cookbook_core_bin: Path,
                                                                     local_info, tmp_path: Path) -> None:
    added, held = installed(cookbook_core_bin), installed(cookbook_bin)
    assert "firetitan-track" in added
    assert not set(added) & set(held), "pip replaced packages the cookbook environment held"
    probe = "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in ('fireworks-ai', 'tinker')}))"
    versions = outside(cookbook_core_bin, "python", "-c", probe, cwd=tmp_path)
    assert json.loads(versions.stdout) == {"fireworks-ai": "1.2.24", "tinker": "0.23.0"}, versions.stderr

    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    report = run_program(cookbook_core_bin, "seed_loop_tinker.py", json.dumps(local_info.public()), ledger,
                         "seed-cookbook", cwd=tmp_path / "work")
    assert Path(report["firetitan_track"]).is_relative_to(site_packages(cookbook_core_bin))
    done = outside(cookbook_core_bin, "firetitan-track", "--ledger", ledger, "events", "seed", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    events = json.loads(done.stdout)
    types = [e["type"] for e in events]
    assert types[:4] == ["RunStarted", "ProvisionRequested", "TrainerProvisioned", "DeploymentProvisioned"]
    steps = [e["data"] for e in events if e["type"] == "StepCompleted"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert steps[0]["optimizer"]["learning_rate"] == 1e-3  # tinker 0.23's AdamParams, recorded
    snap = next(e["data"] for e in events if e["type"] == "SnapshotSaved")
    assert (snap["step"], snap["path"]) == (3, report["snapshot"])
    synced = next(e["data"] for e in events if e["type"] == "WeightsSynced")
    assert synced["snapshot_path"] == report["snapshot"]
    scored = next(e["data"] for e in events if e["type"] == "EvalScored")
    assert scored["snapshot_path"] == report["snapshot"]
    assert scored["score"] == sum(t.startswith("321") for t in report["texts"]) / 2
    assert events[-1]["type"] == "CleanupApplied"
    assert events[-1]["data"] == {"trainer": "deleted", "deployment": "scaled_to_zero"}
