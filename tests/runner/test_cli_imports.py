"""What `firetitan-track run|resume|rerun` imports before a run starts: a resumed run is back
to training sooner when it loads only what it uses (benchmarks/tracking_overhead.py's
``resume_to_next_step_s``). torch is not in the list: the fireworks SDK, which every run
drives, imports it (its training client and TensorData import torch at module level)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Each is loaded only where it is used: MLflow with --export-mlflow, optuna by sweeps, peft and
# the web stack inside the local service, transformers when the run's tokenizer is another than
# the local service's own (runner.tokenizer), alembic when a ledger is migrated.
NOT_BEFORE_THE_RUN = ("mlflow", "optuna", "peft", "transformers", "uvicorn", "starlette", "alembic",
                      "safetensors", "pandas", "scipy")

PROBE = """
import json, sys
from click import Context
from runner.cli import main
ctx = Context(main)
for name in ("run", "resume", "rerun"):
    assert main.get_command(ctx, name).name == name
import runner.loop, runner.provision, runner.preflight  # what the commands call into
print(json.dumps(sorted({m.partition(".")[0] for m in sys.modules})))
"""


def test_run_commands_import_no_module_the_run_does_not_use():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "runner" in loaded and "firetitan_track" in loaded  # the probe did import the commands
    assert not loaded & set(NOT_BEFORE_THE_RUN), sorted(loaded & set(NOT_BEFORE_THE_RUN))
