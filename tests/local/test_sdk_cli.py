"""`firetitan-track local up|info|down`, and the SDK pointed at what `up` printed."""

from __future__ import annotations

import json

from click.testing import CliRunner
from fireworks.training.sdk import TrainerJobManager

from runner.cli import main


def test_local_up_info_down(tmp_path):
    runner = CliRunner()
    state_dir = str(tmp_path / "local")
    up = runner.invoke(main, ["local", "up", "--state-dir", state_dir])
    assert up.exit_code == 0, up.output
    lines = up.output.strip().splitlines()
    assert len(lines) == 1
    info = json.loads(lines[0])
    try:
        assert set(info) == {"base_url", "base_model", "tokenizer_path", "training_shape_id", "pid"}
        assert info["base_url"].startswith("http://127.0.0.1:")
        assert info["training_shape_id"].startswith("accounts/fireworks/trainingShapes/")

        # `up` again reuses the running service; `info --json` prints the same line.
        again = runner.invoke(main, ["local", "up", "--state-dir", state_dir])
        assert json.loads(again.output) == info
        described = runner.invoke(main, ["local", "info", "--state-dir", state_dir, "--json"])
        assert described.exit_code == 0 and json.loads(described.output) == info

        # The SDK resolves the advertised training shape and account from that base URL.
        manager = TrainerJobManager(api_key="anything", base_url=info["base_url"])
        profile = manager.resolve_training_profile(info["training_shape_id"])
        assert profile.max_supported_context_length > 0 and profile.deployment_shape
        assert manager.resolve_training_profile(profile.training_shape_version).training_shape_version == \
            profile.training_shape_version
        assert manager.account_id == "local"
    finally:
        down = runner.invoke(main, ["local", "down", "--state-dir", state_dir])
    assert down.exit_code == 0 and "stopped" in down.output
    gone = runner.invoke(main, ["local", "info", "--state-dir", state_dir, "--json"])
    assert gone.exit_code == 1
    assert "no local service" in runner.invoke(main, ["local", "down", "--state-dir", state_dir]).output
