"""MLflow export figures, printed as one JSON object.

- export_speedup_vs_log_metric: exporting a ledger run of 10,000 metric points
  (MlflowExporter: log_batch, 1,000 points a call) against the naive way, one
  MlflowClient.log_metric call per point, into a second run of the same
  tracking store, measured in this process. The store is a local sqlite
  tracking store (no server), so the figure is database work, not HTTP.
- reexport_seconds: exporting the same run again (the checkpoint says caught
  up); reexport_without_checkpoint_seconds: a follower of that run alone, which
  reads its events and finds the MLflow run already shows them.
- live_export_loop_overhead: a loop of CPU-bound steps that records one event
  per step, with a LiveExporter following it against without; the ratio of wall
  times minus 1 (0.02 = 2% slower), measured once the follower is up;
  live_export_startup_seconds: until it is; live_export_flush_seconds: stop()'s
  flush. On a busy machine with few cores this figure is noisy: the follower is
  a second process competing for the same CPUs as the CPU-bound loop.

Usage: python benchmarks/mlflow_export.py [--points 10000] [--naive-points N]
(--naive-points below --points times the naive way on that many points and
scales it up, for a quick run; the JSON says so.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firetitan_track import Ledger, new_event  # noqa: E402

SPEC = {"run": {"name": "bench", "steps": 0}, "optim": {"learning_rate": 1e-3}}


def _write_run(ledger: Ledger, run_id: str, points: int) -> None:
    """A run whose steps carry two loss metrics each: ``points`` metric points in all."""
    ledger.append(run_id, [new_event("RunStarted", spec=SPEC, spec_digest=ledger.put_json(SPEC),
                                     code_version="bench", seed=0, backend="local")], 0)
    steps = [new_event("StepCompleted", step=n, data_cursor=n, micro_batches=1,
                       metrics={"loss": 1.0 / n, "grad_norm": float(n % 7)}, optimizer={})
             for n in range(1, points // 2 + 1)]
    for i in range(0, len(steps), 1000):
        ledger.append(run_id, steps[i:i + 1000], 1 + i)


def _export_figures(tmp: Path, points: int, naive_points: int) -> dict[str, float]:
    from mlflow import MlflowClient

    from firetitan_track.projections.mlflow import MlflowExporter

    ledger = Ledger.open(f"sqlite:///{tmp / 'ledger.db'}")
    _write_run(ledger, "bench", points)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.search_experiments()  # create the store's tables before any timing

    t = time.perf_counter()
    report = MlflowExporter(ledger, uri, artifacts=False).export()
    export_s = time.perf_counter() - t
    assert report.metrics == points, report

    # the naive way: the same points, one call each, into another run of the same store
    exp = client.get_experiment_by_name("firetitan-track").experiment_id
    naive_run = client.create_run(exp).info.run_id
    events = [ev for ev in ledger.read("bench") if ev.type == "StepCompleted"]
    calls = [(f"train/{k}", v, int(ev.recorded_at * 1000), ev.data["step"])
             for ev in events for k, v in ev.data["metrics"].items()][:naive_points]
    t = time.perf_counter()
    for key, value, ts, step in calls:
        client.log_metric(naive_run, key, value, timestamp=ts, step=step)
    naive_s = (time.perf_counter() - t) * points / len(calls)

    t = time.perf_counter()
    again = MlflowExporter(ledger, uri, artifacts=False).export()
    reexport_s = time.perf_counter() - t
    t = time.perf_counter()
    alone = MlflowExporter(ledger, uri, artifacts=False, run_ids=["bench"]).export()
    reexport_alone_s = time.perf_counter() - t
    assert again.metrics == alone.metrics == 0
    ml_run = client.search_runs([exp], "tags.ledger_run_id = 'bench'")[0].info.run_id
    assert len(client.get_metric_history(ml_run, "train/loss")) == points // 2
    ledger.close()
    return {
        "metric_points": points,
        "export_seconds": round(export_s, 3),
        "naive_log_metric_seconds": round(naive_s, 3),
        "naive_points_timed": len(calls),
        "export_speedup_vs_log_metric": round(naive_s / export_s, 1),
        "reexport_seconds": round(reexport_s, 4),
        "reexport_without_checkpoint_seconds": round(reexport_alone_s, 4),
    }


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _start(ledger: Ledger, run_id: str) -> None:
    ledger.append(run_id, [new_event("RunStarted", spec=SPEC, spec_digest=ledger.put_json(SPEC),
                                     code_version="bench", seed=0, backend="local")], 0)


def _loop(ledger: Ledger, run_id: str, steps: int, work_s: float) -> float:
    """A stand-in training loop: CPU work, then one recorded event per step; its wall time."""
    t = time.perf_counter()
    for n in range(1, steps + 1):
        _busy(work_s)
        ledger.append(run_id, [new_event("StepCompleted", step=n, data_cursor=n, micro_batches=1,
                                         metrics={"loss": 1.0 / n}, optimizer={"learning_rate": 1e-3})], n)
    return time.perf_counter() - t


def _exported(client, run_id: str) -> bool:  # type: ignore[no-untyped-def]
    exp = client.get_experiment_by_name("firetitan-track")
    return bool(exp and client.search_runs([exp.experiment_id], f"tags.ledger_run_id = '{run_id}'"))


def _live_figures(tmp: Path, steps: int = 300, work_s: float = 0.02) -> dict[str, float]:
    from firetitan_track.projections.mlflow import LiveExporter

    url = f"sqlite:///{tmp / 'live-ledger.db'}"
    uri = f"sqlite:///{tmp / 'live-mlflow.db'}"
    from mlflow import MlflowClient

    ledger = Ledger.open(url)
    client = MlflowClient(uri)
    client.search_experiments()  # an existing store, as in a project that exported before
    _start(ledger, "bare")
    bare = _loop(ledger, "bare", steps, work_s)
    _start(ledger, "live")
    t = time.perf_counter()
    exporter = LiveExporter(url, uri, "live", poll_s=0.5).start()
    while not _exported(client, "live"):  # the follower is up (MLflow imported) and working
        time.sleep(0.2)
    startup = time.perf_counter() - t
    live = _loop(ledger, "live", steps, work_s)
    t = time.perf_counter()
    exporter.stop()
    flush = time.perf_counter() - t
    ledger.close()
    return {"live_export_loop_overhead": round(live / bare - 1, 3),
            "live_export_startup_seconds": round(startup, 3),
            "live_export_flush_seconds": round(flush, 3),
            "live_loop_steps": steps, "live_loop_step_work_s": work_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--naive-points", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-mlflow-") as tmp:
        figures = {"tracking_store": "local sqlite (no server)"}
        figures.update(_export_figures(Path(tmp), args.points, args.naive_points or args.points))
        figures.update(_live_figures(Path(tmp)))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
