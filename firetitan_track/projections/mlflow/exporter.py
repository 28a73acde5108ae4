"""The MLflow exporter: a follower of the ledger that projects each run into MLflow.

One MLflow run per ledger run (found again by its ``ledger_run_id`` tag, never
created twice), nested under one parent run per sweep. What one pass writes into
one MLflow run is in run_export.py.

Progress is kept in two places. The follower's cursor (``Ledger.follow``) is a ledger
checkpoint (``mlflow:<tracking uri>#<experiment>``), so ``export`` resumes where
it stopped (a position kept by an older exporter still reads, see FollowCursor). Each
MLflow run also carries ``ledger_events``: how much of its ledger stream it already
shows, written last, so a crash mid-export only
repeats idempotent writes, and a follower of a few runs needs no checkpoint.

Superseded steps. MLflow's metric history is append-only and has no delete
call, while a resume supersedes events that may already be exported. When that
happens the exporter deletes the MLflow run (and its LoggedModels) and writes
the run's authoritative history into a fresh MLflow run. This is exact (no
superseded point survives in the active run) and simple; the old run stays in
MLflow's trash until ``mlflow gc``. Resumes that supersede nothing already
exported (the common case for a one-shot export) cost nothing extra.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import threading
from dataclasses import dataclass, field
from typing import Sequence

from firetitan_track.events import (EvalScored, RecordedEvent, RunResumed, RunStarted, SweepStarted,
                                     first_of, sweep_trials)
from firetitan_track.ids import SWEEP_STREAM_PREFIX, sweep_stream
from firetitan_track.ledger import FollowCursor, Ledger, LedgerError, NotFound
from firetitan_track.projections.compare import compare_sweep
from firetitan_track.projections.mlflow.keys import (MAX_METRICS_PER_CALL, MAX_PARAMS_PER_CALL,
                                                     MAX_TAGS_PER_CALL, MODEL_TRAINING, TAG_EVENTS,
                                                     TAG_EXPERIMENT_KIND, TAG_GIT_COMMIT, TAG_PARENT, TAG_RUN,
                                                     TAG_RUN_COLOR, TAG_RUN_NAME, TAG_SOURCE_NAME, TAG_SWEEP_PARENT,
                                                     TRIAL_COLORS, mlflow_key, ms, param_value, quote)
from firetitan_track.projections.mlflow.run_export import RunExport
from firetitan_track.projections.mlflow.ui import sweep_view
from firetitan_track.projections.mlflow.store import (DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI,
                                                      checkpoint_name, local_artifact_root, resolve_tracking_uri,
                                                      sqlite_path)
from firetitan_track.projections.run_state import FINISHED, RunState, authoritative, fold
from firetitan_track.redact import redact_text

@dataclass
class ExportReport:
    cursor: FollowCursor = field(default_factory=FollowCursor)  # how far the follower has read
    events: int = 0  # events read from the ledger
    runs: list[str] = field(default_factory=list)  # ledger runs written to
    metrics: int = 0  # metric points sent
    rebuilt: list[str] = field(default_factory=list)  # runs rewritten after a resume

    def add(self, other: ExportReport) -> None:
        self.cursor = max(self.cursor, other.cursor)
        self.events += other.events
        self.runs += [r for r in other.runs if r not in self.runs]
        self.metrics += other.metrics
        self.rebuilt += other.rebuilt


class MlflowExporter:
    """Projects ledger runs into an MLflow tracking store.

    ``run_ids=None`` follows every run (its cursor stored as a ledger checkpoint);
    a list follows only those streams (``sweep:<id>`` streams included).
    """

    def __init__(self, ledger: Ledger, tracking_uri: str = DEFAULT_TRACKING_URI, *,
                 experiment: str = DEFAULT_EXPERIMENT, run_ids: Sequence[str] | None = None,
                 artifacts: bool = True) -> None:
        from mlflow import MlflowClient

        self.ledger = ledger
        self.tracking_uri = tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment = experiment
        self.run_ids = list(run_ids) if run_ids is not None else None
        self.artifacts = artifacts
        if tracking_uri.startswith("sqlite:///"):
            # sqlite needs its folder; MLflow won't make it
            sqlite_path(tracking_uri).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._experiment_id: str | None = None
        self._streams: dict[str, list[RecordedEvent]] = {}  # ledger stream -> events so far
        self._runs: dict[str, tuple[str, int]] = {}  # ledger run -> (MLflow run id, events shown)
        self._models: dict[str, dict[str, str]] = {}  # ledger run -> snapshot path -> model id
        self._status: dict[str, str] = {}  # MLflow run -> the status this exporter last set
        self._cursor = ledger.get_checkpoint(self.checkpoint) if self.run_ids is None else FollowCursor()

    @property
    def checkpoint(self) -> str:
        return checkpoint_name(self.tracking_uri, self.experiment)

    # -- the follower -------------------------------------------------------------

    def export(self, batch: int = 5000, *, settle: bool = True) -> ExportReport:
        """Catch up with the ledger: write every event after the stored cursor that committed
        before this call (``settle``; on PostgreSQL that waits for the transactions still
        writing, see ``Ledger.settle``), or, with ``settle=False``, every event readable now."""
        if settle and not self.ledger.settle():
            print("mlflow export: a transaction on the ledger's database has stayed open for "
                  "30 s; the events after it are exported once it ends", file=sys.stderr, flush=True)
        report = ExportReport(cursor=self._cursor)
        while True:
            events = self.ledger.follow(self._cursor, limit=batch, run_ids=self.run_ids)
            if not events:
                return report
            report.add(self._apply(events))
            self._cursor = report.cursor = events.cursor
            if self.run_ids is None:
                self.ledger.set_checkpoint(self.checkpoint, self._cursor)

    def follow(self, stop: threading.Event, poll_s: float = 1.0) -> ExportReport:
        """Export as events arrive until ``stop`` is set, then flush what is left.

        The follower wakes when an append commits (``Ledger.watch_commits``), and reads at
        least every ``poll_s`` seconds whatever it hears; once stopped, it settles
        (``Ledger.settle``) and writes the rest."""
        report = ExportReport(cursor=self._cursor)
        watch = self.ledger.watch_commits()
        try:
            while not stop.is_set():
                try:
                    report.add(self.export(settle=False))
                except Exception as exc:  # e.g. the tracking server is down: the ledger keeps it all
                    print(f"mlflow export: {type(exc).__name__}: {exc}; retrying in {poll_s}s",
                          file=sys.stderr, flush=True)
                    stop.wait(poll_s)
                    continue
                watch.wait_or_stop(stop, poll_s)
        finally:
            watch.close()
        report.add(self.export())
        return report

    def _apply(self, events: list[RecordedEvent]) -> ExportReport:
        report = ExportReport(events=len(events))
        touched: dict[str, None] = {}  # streams in first-touched order
        for ev in events:
            touched.setdefault(ev.run_id)
            stream = self._streams.get(ev.run_id)
            if stream is not None and ev.version == len(stream):
                stream.append(ev)  # (a stream not cached yet is read whole below)
        sweeps: set[str] = set()
        for stream_id in touched:
            if redact_text(stream_id) != stream_id:  # an id is exported as it is: never one holding a secret
                raise LedgerError("a run id holds the value of a credential in this environment; it is not "
                                  "exported to MLflow")
            if stream_id not in self._streams:
                self._streams[stream_id] = self.ledger.read(stream_id)
            if stream_id.startswith(SWEEP_STREAM_PREFIX):
                self._write_sweep(stream_id.removeprefix(SWEEP_STREAM_PREFIX), self._streams[stream_id])
                continue
            sweep_id = self._write_run(stream_id, self._streams[stream_id], report)
            if sweep_id:
                sweeps.add(sweep_id)
        for sweep_id in sweeps:
            self._update_sweep(sweep_id)
        return report

    # -- MLflow lookups -------------------------------------------------------------

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._get_or_create_experiment()
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            experiment_id = self._create_experiment()
        else:
            experiment_id = found.experiment_id
        if found is None or found.tags.get(TAG_EXPERIMENT_KIND) != MODEL_TRAINING:
            # without a kind the UI opens an experiment on its GenAI pages (traces, tokens)
            self.client.set_experiment_tag(experiment_id, TAG_EXPERIMENT_KIND, MODEL_TRAINING)
        return experiment_id

    def _create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        root = local_artifact_root(self.tracking_uri)
        # a sqlite store keeps artifacts beside it, where `firetitan-track ui` serves them
        location = root.as_uri() if root else None
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location)
        except MlflowException:  # created meanwhile by another exporter
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _find_run(self, tag: str, value: str) -> str | None:
        found = self.client.search_runs([self.experiment_id], f"tags.{tag} = {quote(value)}",
                                        max_results=1, order_by=["attributes.start_time DESC"])
        return found[0].info.run_id if found else None

    def mlflow_run_id(self, ledger_run_id: str) -> str | None:
        """The active MLflow run that shows this ledger run, if any."""
        return self._find_run(TAG_RUN, ledger_run_id)

    def sweep_run_id(self, sweep_id: str) -> str | None:
        return self._find_run(TAG_SWEEP_PARENT, sweep_id)

    def models_of(self, run_id: str) -> dict[str, str]:
        if run_id not in self._models:
            models: dict[str, str] = {}
            token = None
            while True:
                page = self.client.search_logged_models(
                    [self.experiment_id], filter_string=f"tags.{TAG_RUN} = {quote(run_id)}",
                    page_token=token)
                for m in page:
                    models[m.tags.get("snapshot_path", "")] = m.model_id
                token = page.token
                if not token:
                    break
            self._models[run_id] = models
        return self._models[run_id]

    # -- one ledger run ---------------------------------------------------------------

    def _write_run(self, run_id: str, stream: list[RecordedEvent], report: ExportReport) -> str | None:
        """Bring the MLflow run up to ``stream``; returns its sweep id when what the sweep's
        parent shows of it may have changed (its status or its scores)."""
        if run_id in self._runs:
            ml_run, shown = self._runs[run_id]
        else:
            ml_run = self.mlflow_run_id(run_id)
            shown = int(self.client.get_run(ml_run).data.tags.get(TAG_EVENTS, 0)) if ml_run else 0
        if shown >= len(stream):
            return None
        if ml_run is not None and _supersedes_shown(stream, shown):
            self._delete(run_id, ml_run)
            ml_run, shown = None, 0
            report.rebuilt.append(run_id)

        history = authoritative(stream)
        state = fold(stream, run_id)
        if ml_run is None:
            ml_run = self._create_run(run_id, stream, state.sweep_id)
        writes = RunExport(self.client, self.experiment_id, self.ledger, self.models_of(run_id), run_id, ml_run,
                           history, shown, artifacts=self.artifacts)
        writes.run()
        changed = self._status.get(ml_run) != state.status
        if changed:
            self._set_status(ml_run, state.status, stream[-1])
            self._status[ml_run] = state.status
        self._log_tags(ml_run, {**_run_tags(run_id, state, stream), TAG_EVENTS: str(len(stream))})
        self._runs[run_id] = (ml_run, len(stream))
        report.runs.append(run_id)
        report.metrics += writes.metric_count
        if state.status in ("completed", "failed"):
            self._streams.pop(run_id, None)  # a resume re-reads it; keeps a long follower small
        # the parent follows its trials: look again only when one of them changed
        rescored = any(isinstance(ev.fact, EvalScored) for ev in writes.new) or run_id in report.rebuilt
        return state.sweep_id if changed or rescored else None

    def _create_run(self, run_id: str, stream: list[RecordedEvent], sweep_id: str | None) -> str:
        tags = {TAG_RUN: run_id, TAG_RUN_NAME: run_id}
        if sweep_id:
            tags[TAG_PARENT] = self._sweep_parent(sweep_id)
            trial = self._trial_number(sweep_id, run_id)
            if trial is not None:  # set once: a person may recolour a run in the UI
                tags[TAG_RUN_COLOR] = TRIAL_COLORS[trial % len(TRIAL_COLORS)]
        run = self.client.create_run(self.experiment_id, start_time=ms(stream[0]), tags=tags)
        self._models[run_id] = {}
        return run.info.run_id

    def _trial_number(self, sweep_id: str, run_id: str) -> int | None:
        events = self.ledger.read_or_empty(sweep_stream(sweep_id))
        return next((t["trial"] for t in sweep_trials(events) if t["run_id"] == run_id), None)

    def _delete(self, run_id: str, ml_run: str) -> None:
        for model_id in self.models_of(run_id).values():
            self.client.delete_logged_model(model_id)
        self.client.delete_run(ml_run)
        self._models.pop(run_id, None)
        self._runs.pop(run_id, None)

    def _set_status(self, ml_run: str, status: str, last: RecordedEvent | None = None) -> None:
        ended = {"completed": "FINISHED", "failed": "FAILED", "pruned": "KILLED"}.get(status)
        if ended is None:
            self.client.update_run(ml_run, status="RUNNING")
            return
        # set_terminated (the one call that records an end time) prints links to stdout;
        # keep them out of the command's output
        with contextlib.redirect_stdout(io.StringIO()):
            self.client.set_terminated(ml_run, ended, end_time=ms(last) if last else None)

    def _log_tags(self, ml_run: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), MAX_TAGS_PER_CALL):
            self.client.log_batch(ml_run, tags=items[i:i + MAX_TAGS_PER_CALL])

    # -- sweeps ---------------------------------------------------------------------

    def _sweep_parent(self, sweep_id: str) -> str:
        found = self.sweep_run_id(sweep_id)
        if found:
            return found
        # started when the sweep was recorded (not when it was exported), so an export of an
        # imported sweep equals the original's
        stream = self.ledger.read_or_empty(sweep_stream(sweep_id))
        run = self.client.create_run(self.experiment_id, start_time=ms(stream[0]) if stream else None, tags={
            TAG_SWEEP_PARENT: sweep_id, TAG_RUN_NAME: f"sweep {sweep_id}", "sweep_id": sweep_id})
        return run.info.run_id

    def _write_sweep(self, sweep_id: str, stream: list[RecordedEvent]) -> None:
        from mlflow.entities import Param

        parent = self._sweep_parent(sweep_id)
        started = first_of(stream, SweepStarted)
        if started is None:
            return
        params = [Param(mlflow_key(f"grid.{k}"), param_value(v)) for k, v in started.grid.items()]
        params += [Param(mlflow_key(f"space.{k}"), param_value(v)) for k, v in (started.space or {}).items()
                   if k not in started.grid]
        params.append(Param("trials", str(started.n_trials if started.n_trials is not None else len(started.trials))))
        params += [Param(k, str(v)) for k, v in (("search", started.search), ("prune", started.prune)) if v]
        for i in range(0, len(params), MAX_PARAMS_PER_CALL):
            self.client.log_batch(parent, params=params[i:i + MAX_PARAMS_PER_CALL])
        self._log_tags(parent, {"spec_digest": started.spec_digest, TAG_EVENTS: str(len(stream))})
        self._update_sweep(sweep_id)

    def _update_sweep(self, sweep_id: str) -> None:
        """The parent run follows its trials: its status, each trial's best score, the best trial.

        A sweep is finished when every trial is (completed or pruned), failed when one
        failed and none runs.
        """
        from mlflow.entities import Metric

        try:
            sweep = self.ledger.read(sweep_stream(sweep_id))
            trials = compare_sweep(self.ledger, sweep_id)
        except NotFound:  # a trial exported before its sweep was recorded
            return
        recorded = next(ev for ev in sweep if isinstance(ev.fact, SweepStarted))
        started = recorded.fact
        # the sweep's saved view, the page `compare` and `ui --sweep` link to (written again as
        # trials change, so a store exported before views had them gains it)
        swept = [mlflow_key(k) for k in (started.space or started.grid)]
        self.client.set_experiment_tag(self.experiment_id, *sweep_view(sweep_id, swept, ms(recorded)))
        statuses = [t.status for t in trials]
        # trials a sweep has not assigned yet are still to come
        statuses += ["new"] * ((started.n_trials if started.n_trials is not None else len(statuses)) - len(statuses))
        if all(s in FINISHED for s in statuses):
            status = "completed"
        elif "failed" in statuses and not {"running", "new"} & set(statuses):
            status = "failed"
        else:
            status = "running"
        parent = self._sweep_parent(sweep_id)

        # Each best score is one point at step 0, stamped with its eval's time: sent again it
        # adds nothing, and a better (or, after a resume, a re-measured) best is a later point,
        # which is the value MLflow shows.
        scored = [t for t in trials if t.best_score is not None and t.best_scored_at is not None]
        points = [Metric(mlflow_key(f"best_score/{t.run_id}"), float(t.best_score),
                         int(round(t.best_scored_at * 1000)), 0) for t in scored]
        tags = {"trials_started": str(sum(s != "new" for s in statuses)),
                "trials_finished": str(sum(s in (*FINISHED, "failed") for s in statuses))}
        best = max(scored, key=lambda t: (t.best_score, -t.trial), default=None)
        if best is not None:
            points.append(Metric("best_score", float(best.best_score), int(round(best.best_scored_at * 1000)), 0))
            tags.update({"best_trial": best.run_id, "best_step": str(best.best_step),
                         "best_snapshot": best.best_snapshot or ""})
            tags.update({mlflow_key(f"best.{k}"): param_value(v) for k, v in best.params.items()})
        for i in range(0, len(points), MAX_METRICS_PER_CALL):
            self.client.log_batch(parent, metrics=points[i:i + MAX_METRICS_PER_CALL])
        self._log_tags(parent, tags)
        if self._status.get(parent) != status:
            # a finished sweep ends with its last trial's last event
            ends = [self.ledger.read(t.run_id)[-1] for t in trials if status != "running"]
            self._set_status(parent, status, max(ends, key=lambda ev: ev.recorded_at, default=None))
            self._status[parent] = status


def _supersedes_shown(stream: list[RecordedEvent], shown: int) -> bool:
    """True when a resume not yet exported supersedes events the MLflow run already shows."""
    return any(isinstance(ev.fact, RunResumed) and any(v < shown for v in ev.fact.superseded or ())
               for ev in stream[shown:])


def _run_tags(run_id: str, state: RunState, stream: list[RecordedEvent]) -> dict[str, str]:
    started = first_of(stream, RunStarted)
    tags = {
        TAG_RUN: run_id,
        "trainer_job_id": state.trainer_job_id,
        "reference_job_id": state.reference_job_id,
        "deployment_id": state.deployment_id,
        "backend": state.backend,
        "code_version": started.code_version if started is not None else None,
        "sweep_id": state.sweep_id,
        "rerun_of": state.rerun_of,
        "spec_digest": state.spec_digest,
        "seed": state.seed,
        "ledger_status": state.status,
        "attempts": state.attempts,
    }
    if started is not None and started.trial_params:
        tags["trial_params"] = json.dumps(started.trial_params, sort_keys=True)
    code = state.code or {}
    if code.get("git"):  # MLflow's own tags for the code's commit (the UI's Version column)
        tags[TAG_GIT_COMMIT] = code["git"].get("commit")
        tags["git_dirty"] = str(bool(code["git"].get("dirty"))).lower()
    elif code:
        tags["code_no_git"] = code.get("no_git")
    if (code.get("entry") or {}).get("path"):
        tags[TAG_SOURCE_NAME] = code["entry"]["path"]
    return {k: str(v) for k, v in tags.items() if v is not None}


def export_mlflow(ledger: Ledger, tracking_uri: str = DEFAULT_TRACKING_URI, run_ids: Sequence[str] | None = None,
                  *, experiment: str = DEFAULT_EXPERIMENT, artifacts: bool = True) -> ExportReport:
    """Export everything new (or only ``run_ids``) to MLflow and return what was written."""
    return MlflowExporter(ledger, tracking_uri, experiment=experiment, run_ids=run_ids,
                          artifacts=artifacts).export()
