"""sdk_adapter against each SDK release the project supports: fireworks-ai 1.2.24 (the cookbook's
environment, tinker 0.23 types) and 1.2.30 (the project's), each driving the local service."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

PROBE = Path(__file__).parent / "programs" / "adapter_probe.py"


@pytest.mark.parametrize("env, release", [("cookbook_recorder_bin", "1.2.24"), ("project_bin", "1.2.30")])
def test_every_private_access_gives_what_it_names_in_each_release(request, env, release, local_info):
    python = request.getfixturevalue(env) / "python"
    deployment = f"adapter-{uuid.uuid4().hex[:6]}"
    done = subprocess.run([str(python), str(PROBE), local_info.base_url, local_info.tokenizer_path,
                           local_info.training_shape_id, deployment], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["versions"]["fireworks-ai"] == release
    # the provisioning config and the handle: before and after the first training client
    assert got["config_base_model"] == "accounts/fireworks/models/qwen3-8b"
    assert got["handle_before"] is False and got["trainer_before"] is None
    assert got["base_url"] == local_info.base_url
    assert got["trainer"] == got["public_trainer"] and got["trainer"]
    assert got["deployment"] == deployment and got["reattached"] is False
    assert got["reference"] is None and got["reference_after"] not in (None, got["trainer"])
    # the snapshot kind the SDK will write next: a base first, deltas after, what is asked for when asked
    assert (got["kind_first"], got["kind_next"], got["kind_asked"]) == ("base", "delta", "base")
    # the raw deployment record: replicas before and after the scale-to-zero cleanup; None when missing
    assert (got["replicas"], got["closed_replicas"], got["no_deployment"]) == (1, 0, None)
    assert got["cleanup_config"] == got["cleanup_handle"] == [True, "scale_to_zero"]
    assert got["no_model_status"] == 404
    # Thinking Machines' AdamParams, as the installed SDK's optim_step takes it
    assert "grad_norm" in got["optim_metrics"]
    assert got["optimizer"]["learning_rate"] == 2e-3
