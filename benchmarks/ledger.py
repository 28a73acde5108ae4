"""Ledger benchmarks, printed as one JSON object.

- append_latency_ratio_vs_raw: median single-event ``Ledger.append`` (validate,
  redact, hash chain, expected-version check, commit) over the median raw
  SQLAlchemy insert+commit of the same row into an identical table in the same
  SQLite file. Both are durable: WAL with synchronous=FULL fsyncs each commit.
  Target <= 1.5.
- batched_append_events_per_s: events/s appending batches of 1000 (SQLite, same
  durability), best of three rounds of 20 batches; the median is printed too. >= 20000.
- fold_events_per_s: events/s folding a run's events into its RunState
  (projections.run_state.fold), best of three. >= 200000.
- speedup_vs_mlflow_log_metric: median ``MlflowClient.log_metric`` on an sqlite
  store over the median single-event append, same process. >= 3.
The single-event measurements are interleaved call by call (see below).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from firetitan_track import Ledger, RecordedEvent, new_event  # noqa: E402
from firetitan_track.projections.run_state import fold  # noqa: E402
from firetitan_track.store import events as event_table  # noqa: E402

SINGLE_APPENDS = 300
BATCH, BATCHES, ROUNDS = 1000, 20, 3
FOLD_EVENTS = 100_000
MLFLOW_CALLS = 100


def step_event(n: int):  # noqa: ANN201
    return new_event("StepCompleted", step=n, data_cursor=n * 8, micro_batches=4,
                     metrics={"loss": 1.0 / (n + 1), "grad_norm": 0.5, "lr": 1e-4},
                     optimizer={"lr": 1e-4, "beta1": 0.9, "beta2": 0.999})


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def single_event_latencies(ledger: Ledger, log_metric: Callable[[int], None]) -> dict[str, float]:
    """Median seconds of one durable append, one raw insert+commit, one log_metric.

    The three are interleaved, call by call, so that a slow patch of the (shared)
    disk slows all three alike instead of whichever happened to run then.
    """
    raw_table = event_table.to_metadata(sa.MetaData(), name="events_raw")
    raw_table.create(ledger.engine)
    template = ledger.append("warmup", [step_event(0)], 0)[0]
    insert = raw_table.insert()
    times: dict[str, list[float]] = {"append": [], "raw": [], "mlflow": []}
    for i in range(SINGLE_APPENDS):
        event = step_event(i)
        times["append"].append(timed(lambda: ledger.append("single", [event], i)))
        row = {"run_id": "single", "version": i, "event_id": event.event_id, "type": event.type,
               "schema_version": 1, "data": json.dumps(dict(event.data), sort_keys=True),
               "recorded_at": time.time(), "hash": template.hash}

        def raw_insert() -> None:
            with ledger.engine.begin() as conn:
                conn.execute(insert, row)

        times["raw"].append(timed(raw_insert))
        if i < MLFLOW_CALLS:
            times["mlflow"].append(timed(lambda: log_metric(i)))
    return {name: statistics.median(samples) for name, samples in times.items()}


def batched(ledger: Ledger, run_id: str) -> float:
    batches = [[step_event(b * BATCH + i) for i in range(BATCH)] for b in range(BATCHES)]
    start = time.perf_counter()
    for b, batch in enumerate(batches):
        ledger.append(run_id, batch, b * BATCH)
    return BATCH * BATCHES / (time.perf_counter() - start)


def fold_rate(ledger: Ledger) -> float:
    stored = ledger.read("batched-0")
    recorded: list[RecordedEvent] = [stored[i % len(stored)] for i in range(FOLD_EVENTS)]
    recorded = [RecordedEvent(e.run_id, v, v + 1, e.event_id, e.type, e.schema_version, e.data,
                              e.recorded_at, e.hash) for v, e in enumerate(recorded)]
    elapsed = min(timed(lambda: fold(recorded)) for _ in range(3))
    return FOLD_EVENTS / elapsed


def mlflow_log_metric(folder: Path) -> Callable[[int], None]:
    """A ``log_metric`` call on a fresh MLflow sqlite store (created here, untimed)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("bench")).info.run_id
    return lambda i: client.log_metric(run_id, "loss", 1.0 / (i + 1), step=i)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        log_metric = mlflow_log_metric(Path(folder))
        with Ledger.open(f"sqlite:///{folder}/ledger.db") as ledger:
            single = single_event_latencies(ledger, log_metric)
            # best of three rounds (each a fresh run of 20 x 1000): the machine is shared
            rounds = [batched(ledger, f"batched-{r}") for r in range(ROUNDS)]
            fold_per_s = fold_rate(ledger)
    print(json.dumps({
        "append_latency_ratio_vs_raw": round(single["append"] / single["raw"], 3),
        "batched_append_events_per_s": round(max(rounds)),
        "batched_append_events_per_s_median_of_rounds": round(statistics.median(rounds)),
        "fold_events_per_s": round(fold_per_s),
        "speedup_vs_mlflow_log_metric": round(single["mlflow"] / single["append"], 2),
        "append_median_us": round(single["append"] * 1e6, 1),
        "raw_insert_median_us": round(single["raw"] * 1e6, 1),
        "mlflow_log_metric_median_us": round(single["mlflow"] * 1e6, 1),
        "durability": "SQLite WAL, synchronous=FULL (every commit fsynced)",
    }, indent=2))


if __name__ == "__main__":
    main()
