"""The cookbook as researchers run it: the pinned tree unmodified, in its own environment."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.envs import COOKBOOK

RECIPES = ("sft_loop", "dpo_loop", "orpo_loop", "rl_loop", "async_rl_loop", "igpo_loop", "distillation_loop")


def test_the_pinned_cookbook_is_unmodified() -> None:
    check = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=COOKBOOK, capture_output=True, text=True)
    assert check.returncode == 0, f"../shared/cookbook was edited:\n{check.stdout}{check.stderr}"


def test_the_cookbook_environment_holds_its_own_sdk_and_imports_every_recipe(cookbook_bin: Path) -> None:
    probe = ("import json, importlib, importlib.metadata as m\n"
             f"for r in {RECIPES!r}: importlib.import_module('training.recipes.' + r)\n"
             "print(json.dumps({p: m.version(p) for p in ('fireworks-ai', 'tinker', 'tinker-cookbook')}))")
    out = subprocess.run([str(cookbook_bin / "python"), "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(COOKBOOK)}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "fireworks-ai": "1.2.24", "tinker": "0.23.0", "tinker-cookbook": "0.4.3"}
