"""What ``firetitan-track record`` costs a program: the cookbook's ``sft_loop``, unmodified.

Prints one JSON object:

- ``record_overhead_wall_ratio``: the wall time of ``firetitan-track record -- python sft.py``
  over that of ``python sft.py``, the same run on the same local service (the pinned
  cookbook's ``sft_loop`` in its own environment, fireworks-ai 1.2.24: a tiny dataset, one
  epoch of ``--steps`` optimizer steps, the final checkpoint; the metrics file named in both).
  Each is timed from launch to exit, as a user sees it; rounds are interleaved and the median
  of the per-round ratios is reported, after one uncounted warm-up round (the service's first
  trainer, a cold page cache). Run it with ``OMP_NUM_THREADS=1``, as the local service's
  benchmark: two 2-thread torch pools on two cores spin-wait on each other. Target: <= 1.05.
- ``recorded_events``: what one recorded run wrote (its steps, states, snapshot, metrics lines).
- ``bare_wall_s`` / ``recorded_wall_s``: the medians of each.
- ``record_added_cpu_s``: the CPU seconds (user + system) the recorded run's own processes
  (``record`` and the program) used beyond the bare program's, median over rounds: what the
  recorder costs, which the wall ratio shows only on a machine with a core to spare (the
  service's training is in another process, counted in neither).
- ``load_average``: the machine's 1/5/15-minute load when the benchmark ended.

Usage: ``python benchmarks/record_overhead.py [--rounds N] [--steps N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

def sft_spec(folder: Path, info, steps: int) -> Path:
    """The spec tests/cookbook/recipe_driver.py (the one driver of the cookbook's recipes, plain
    or recorded) runs ``sft_loop`` from: one epoch of ``steps`` optimizer steps on a tiny dataset."""
    data = folder / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"reverse {n}"},
                                                      {"role": "assistant", "content": str(n)[::-1]}]}) + "\n"
                            for n in range(2 * steps)))
    spec = folder / "sft.json"
    spec.write_text(json.dumps({"config": {
        "log_path": str(folder / "logs"), "base_model": "accounts/fireworks/models/qwen3-8b", "dataset": str(data),
        "tokenizer_model": info.tokenizer_path, "renderer_name": "qwen3_instruct", "epochs": 1, "batch_size": 2,
        "max_seq_len": 256, "render_workers": 1, "trainer": {"training_shape_id": info.training_shape_id}}}))
    return spec


def one_run(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command's own processes: user + system, children included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed: {done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    from firetitan_track import Ledger
    from runner.local.supervisor import local_service
    from tests.envs import COOKBOOK, cookbook_env, install_project

    python = str(install_project(cookbook_env(), ()) / "python")  # the cookbook's environment, the recorder in it
    driver = str(REPO / "tests" / "cookbook" / "recipe_driver.py")
    cli = str(Path(sys.executable).parent / "firetitan-track")
    ratios, bare, recorded, added_cpu = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp, local_service() as info:
        root = Path(tmp)
        ledger_url = f"sqlite:///{root / 'ledger.db'}"
        for k in range(-1, args.rounds):  # round -1 warms the service and the page cache, and is not counted
            times, cpu = {}, {}
            for kind in (("bare", "recorded") if k % 2 == 0 else ("recorded", "bare")):
                folder = root / f"{kind}-{k}"
                folder.mkdir()
                env = {**os.environ, "PYTHONPATH": str(COOKBOOK), "FIREWORKS_API_KEY": "local", "WANDB_MODE": "disabled",
                       "FIREWORKS_BASE_URL": info.base_url, "COOKBOOK_METRICS_FILE": str(folder / "metrics.jsonl")}
                program = [python, driver, "sft_loop", str(sft_spec(folder, info, args.steps))]
                if kind == "recorded":
                    program = [cli, "--ledger", ledger_url, "record", "--run-id", f"sft-{k}", "--", *program]
                times[kind], cpu[kind] = one_run(program, env, folder)
            if k < 0:
                continue
            bare.append(times["bare"])
            recorded.append(times["recorded"])
            ratios.append(times["recorded"] / times["bare"])
            added_cpu.append(cpu["recorded"] - cpu["bare"])
        events = len(Ledger.open(ledger_url).read("sft-0"))
    print(json.dumps({
        "record_overhead_wall_ratio": round(statistics.median(ratios), 4),
        "round_ratios": [round(r, 4) for r in ratios],
        "bare_wall_s": round(statistics.median(bare), 2),
        "record_added_cpu_s": round(statistics.median(added_cpu), 2),
        "recorded_wall_s": round(statistics.median(recorded), 2),
        "sft_steps": args.steps,
        "recorded_events": events,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
