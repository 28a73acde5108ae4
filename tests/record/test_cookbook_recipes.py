"""The pinned cookbook's recipes, unmodified, under ``firetitan-track record`` (fireworks-ai 1.2.24):
every snapshot a recipe saved is in ``audit`` with the eval scores it logged tied to the right
snapshot, the ledger verifies, and with ``async_rl_loop`` the recorded ``version_offsets`` equal
the recipe's own ``async/version_offset_*`` at every step."""

from __future__ import annotations

from pathlib import Path

import pytest

from firetitan_track import Ledger
from firetitan_track.projections.audit import audit
from firetitan_track.projections.run_state import fold
from tests.envs import COOKBOOK
from tests.record.conftest import record

DRIVER = Path(__file__).parent / "programs" / "cookbook_recipe.py"


def _record_recipe(recipe: str, python: Path, info, folder: Path, ledger_url: str) -> Ledger:
    done = record(ledger_url, "--run-id", recipe, "--", str(python), str(DRIVER), recipe, info.base_url,
                  info.tokenizer_path, info.training_shape_id, str(folder), cwd=folder,
                  env={"PYTHONPATH": str(COOKBOOK), "WANDB_SILENT": "true"}, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    ledger = Ledger.open(ledger_url)
    assert not ledger.verify(recipe)
    assert fold(ledger.read(recipe)).status == "completed"
    return ledger


def _snapshots(events) -> list[dict]:
    return [ev.data for ev in events if ev.type == "SnapshotSaved"]


def test_sft_loop(cookbook_recorder_bin, local_info, tmp_path, ledger_url):
    ledger = _record_recipe("sft_loop", cookbook_recorder_bin / "python", local_info, tmp_path, ledger_url)
    events = ledger.read("sft_loop")
    steps = [ev.data for ev in events if ev.type == "StepCompleted"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(s["provenance"] == {"datums": 2, "matched": 0} and "version_offsets" not in s for s in steps)
    [final] = _snapshots(events)  # the recipe's final, promotable snapshot
    assert final["step"] == 4 and final["kind"] == "base"
    rows = audit(ledger, "sft_loop")
    evals = [r for r in rows if r.source == "program"]
    # one eval per epoch, logged to W&B and to the recipe's metrics file: recorded once each
    assert [r.step for r in evals] == [2, 4]
    assert all(r.measured_on == "trainer" and {"eval/loss", "eval/ppl"} <= set(r.metrics) for r in evals)
    # the step-4 eval measured the trainer's weights after step 4: the weights saved as the final snapshot
    assert [r.snapshot_path for r in evals] == [None, final["path"]]
    assert {r.snapshot_path for r in rows} >= {s["path"] for s in _snapshots(events)}


def test_rl_loop(cookbook_recorder_bin, local_info, tmp_path, ledger_url):
    ledger = _record_recipe("rl_loop", cookbook_recorder_bin / "python", local_info, tmp_path, ledger_url)
    events = ledger.read("rl_loop")
    steps = [ev.data for ev in events if ev.type == "StepCompleted"]
    assert steps  # a step per prompt group with reward variance (sampling decides how many)
    snapshots = _snapshots(events)  # the initial sync, then one after each step
    assert [s["name"] for s in snapshots] == [f"step-{k}" for k in range(len(steps) + 1)]
    assert {r.snapshot_path for r in audit(ledger, "rl_loop")} == {s["path"] for s in snapshots}
    # strictly on-policy: every datum sampled on the weights published just before its step
    assert all(s["provenance"]["matched"] == s["provenance"]["datums"] > 0 for s in steps)
    assert all(s["version_offsets"] == {"min": 0, "max": 0, "mean": 0.0} for s in steps)


def test_async_rl_loop_version_offsets_equal_the_recipes(cookbook_recorder_bin, local_info, tmp_path, ledger_url):
    ledger = _record_recipe("async_rl_loop", cookbook_recorder_bin / "python", local_info, tmp_path, ledger_url)
    events = ledger.read("async_rl_loop")
    ours = {ev.data["step"]: ev.data.get("version_offsets") for ev in events if ev.type == "StepCompleted"}
    theirs = {int(m["train/step"]): {"min": m["async/version_offset_min"], "max": m["async/version_offset_max"]}
              for m in (ev.data["metrics"] for ev in events if ev.type == "MetricsLogged")
              if "async/version_offset_max" in m}
    assert sorted(ours) == sorted(theirs) == list(range(1, 7))
    assert {k: {"min": v["min"], "max": v["max"]} for k, v in ours.items()} == theirs
    assert any(v["max"] == 1 for v in theirs.values())  # data one version behind: off-policy by one
    # each eval the recipe logged after publishing step k measured snapshot step-k
    snapshots = {s["name"]: s["path"] for s in _snapshots(events)}
    evals = [r for r in audit(ledger, "async_rl_loop") if r.source == "program"]
    assert [(r.step, r.snapshot_path, r.measured_on) for r in evals] == [
        (k, snapshots[f"step-{k}"], "deployment") for k in range(0, 7)]
    assert all("eval/reward" in r.metrics for r in evals)
