"""The MLflow view of the ledger: a follower that projects each run into MLflow.

One MLflow run per ledger run (found again by its ``ledger_run_id`` tag, never
created twice), nested under one parent run per sweep. Params come from the
recorded (already redacted) spec; metrics carry the step and the original
``recorded_at`` of their event, so writing the same event twice adds nothing;
a LoggedModel per sampler snapshot holds the eval metrics measured on it, and
the eval prompt set is the run's dataset input.

Progress is kept in two places. The follower's global position is a ledger
checkpoint (``mlflow:<tracking uri>#<experiment>``), so ``export`` resumes where
it stopped. Each MLflow run also carries ``ledger_events``: how much of its
ledger stream it already shows, written last, so a crash mid-export only
repeats idempotent writes, and a follower of a few runs needs no checkpoint.

Superseded steps. MLflow's metric history is append-only and has no delete
call, while a resume supersedes events that may already be exported. When that
happens the exporter deletes the MLflow run (and its LoggedModels) and writes
the run's authoritative history into a fresh MLflow run. This is exact (no
superseded point survives in the active run) and simple; the old run stays in
MLflow's trash until ``mlflow gc``. Resumes that supersede nothing already
exported (the common case for a one-shot export) cost nothing extra.

MLflow is imported lazily: nothing here touches it until an exporter is built.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from firetitan_track.events import RecordedEvent
from firetitan_track.projections.audit import eval_rows
from firetitan_track.projections.run_state import authoritative, fold
from firetitan_track.redact import redact

__all__ = [
    "DEFAULT_TRACKING_URI", "DEFAULT_ARTIFACT_ROOT", "DEFAULT_EXPERIMENT",
    "MlflowExporter", "ExportReport", "LiveExporter", "export_mlflow", "flatten",
]

# The project's tracking store: `export` writes here by default and `ui` serves it.
# A sqlite store keeps its artifacts in "mlartifacts" beside the database file.
DEFAULT_TRACKING_URI = "sqlite:///.firetitan/mlflow.db"
DEFAULT_ARTIFACT_ROOT = ".firetitan/mlartifacts"
DEFAULT_EXPERIMENT = "firetitan-track"

# MLflow's log_batch limits (mlflow.utils.validation)
MAX_METRICS_PER_CALL = 1000
MAX_PARAMS_PER_CALL = 100
MAX_TAGS_PER_CALL = 100
MAX_PARAM_VALUE = 6000
MAX_KEY_LENGTH = 250
MAX_DATASET_DIGEST = 36  # MLflow keeps a dataset digest in 36 characters

TAG_RUN = "ledger_run_id"
TAG_EVENTS = "ledger_events"  # how many events of the stream this MLflow run shows
TAG_SWEEP_PARENT = "ledger_sweep"  # on a sweep's parent run: the sweep id
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
PROMPTS_DATASET = "eval_prompts"
SNAPSHOT_MODEL_TYPE = "sampler-snapshot"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys: {"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


_BAD_KEY_CHARS = re.compile(r"[^\w./\- :]")


def _key(name: str) -> str:
    """A valid MLflow metric/param key (letters, digits, _ - . / : and spaces)."""
    return _BAD_KEY_CHARS.sub("_", name)[:MAX_KEY_LENGTH]


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:MAX_PARAM_VALUE]


def _numbers(values: Any, prefix: str) -> dict[str, float]:
    """The numeric leaves of a metrics payload, under ``prefix/``."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return {prefix: float(values)}
    if not isinstance(values, dict):
        return {}
    out: dict[str, float] = {}
    for k, v in flatten(values).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[_key(f"{prefix}/{k}")] = float(v)
    return out


def _ms(ev: RecordedEvent) -> int:
    return int(round(ev.recorded_at * 1000))


def _sqlite_path(tracking_uri: str) -> Path:
    return Path(tracking_uri.removeprefix("sqlite:///"))


def local_artifact_root(tracking_uri: str) -> Path | None:
    """Where a sqlite tracking store keeps artifacts: ``mlartifacts`` beside the database."""
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a server or file store decides for itself
    return (_sqlite_path(tracking_uri).parent / "mlartifacts").resolve()


def _checkpoint_name(tracking_uri: str, experiment: str) -> str:
    return f"mlflow:{tracking_uri}#{experiment}"


def _quote(value: str) -> str:
    """A string literal for an MLflow filter (its parser takes no escapes, so refuse quotes)."""
    if "'" in value:
        raise ValueError(f"cannot search MLflow for a value containing a quote: {value!r}")
    return f"'{value}'"


@dataclass
class ExportReport:
    position: int = 0  # the last global position handled
    events: int = 0  # events read from the ledger
    runs: list[str] = field(default_factory=list)  # ledger runs written to
    metrics: int = 0  # metric points sent
    rebuilt: list[str] = field(default_factory=list)  # runs rewritten after a resume

    def add(self, other: ExportReport) -> None:
        self.position = max(self.position, other.position)
        self.events += other.events
        self.runs += [r for r in other.runs if r not in self.runs]
        self.metrics += other.metrics
        self.rebuilt += other.rebuilt


class MlflowExporter:
    """Projects ledger runs into an MLflow tracking store.

    ``run_ids=None`` follows every run (position stored as a ledger checkpoint);
    a list follows only those streams (``sweep:<id>`` streams included).
    """

    def __init__(self, ledger: Any, tracking_uri: str = DEFAULT_TRACKING_URI, *,
                 experiment: str = DEFAULT_EXPERIMENT, run_ids: Sequence[str] | None = None,
                 artifacts: bool = True) -> None:
        from mlflow import MlflowClient

        self.ledger = ledger
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_ids = list(run_ids) if run_ids is not None else None
        self.artifacts = artifacts
        if tracking_uri.startswith("sqlite:///"):
            # sqlite needs its folder; MLflow won't make it
            _sqlite_path(tracking_uri).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._experiment_id: str | None = None
        self._streams: dict[str, list[RecordedEvent]] = {}  # ledger stream -> events so far
        self._runs: dict[str, tuple[str, int]] = {}  # ledger run -> (MLflow run id, events shown)
        self._models: dict[str, dict[str, str]] = {}  # ledger run -> snapshot path -> model id
        self._status: dict[str, str] = {}  # MLflow run -> the status this exporter last set
        self._position = (ledger.get_checkpoint(self.checkpoint) if self.run_ids is None else 0)

    @property
    def checkpoint(self) -> str:
        return _checkpoint_name(self.tracking_uri, self.experiment)

    # -- the follower -------------------------------------------------------------

    def export(self, batch: int = 5000) -> ExportReport:
        """Catch up with the ledger: write every event after the stored position."""
        report = ExportReport(position=self._position)
        while True:
            events = self.ledger.follow(self._position, limit=batch, run_ids=self.run_ids)
            if not events:
                return report
            report.add(self._apply(events))
            self._position = events[-1].position
            report.position = self._position
            if self.run_ids is None:
                self.ledger.set_checkpoint(self.checkpoint, self._position)

    def follow(self, stop: threading.Event, poll_s: float = 1.0) -> ExportReport:
        """Export as events arrive until ``stop`` is set, then flush what is left."""
        report = ExportReport(position=self._position)
        while not stop.is_set():
            try:
                report.add(self.export())
            except Exception as exc:  # e.g. the tracking server is down: the ledger keeps it all
                print(f"mlflow export: {type(exc).__name__}: {exc}; retrying in {poll_s}s",
                      file=sys.stderr, flush=True)
            stop.wait(poll_s)
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
            if stream_id not in self._streams:
                self._streams[stream_id] = self.ledger.read(stream_id)
            if stream_id.startswith("sweep:"):
                self._write_sweep(stream_id.removeprefix("sweep:"), self._streams[stream_id])
                continue
            sweep_id = self._write_run(stream_id, self._streams[stream_id], report)
            if sweep_id:
                sweeps.add(sweep_id)
        for sweep_id in sweeps:
            self._update_sweep_status(sweep_id)
        return report

    # -- MLflow lookups -------------------------------------------------------------

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._get_or_create_experiment()
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
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
        found = self.client.search_runs([self.experiment_id], f"tags.{tag} = {_quote(value)}",
                                        max_results=1, order_by=["attributes.start_time DESC"])
        return found[0].info.run_id if found else None

    def mlflow_run_id(self, ledger_run_id: str) -> str | None:
        """The active MLflow run that shows this ledger run, if any."""
        return self._find_run(TAG_RUN, ledger_run_id)

    def sweep_run_id(self, sweep_id: str) -> str | None:
        return self._find_run(TAG_SWEEP_PARENT, sweep_id)

    def _models_of(self, run_id: str) -> dict[str, str]:
        if run_id not in self._models:
            models: dict[str, str] = {}
            token = None
            while True:
                page = self.client.search_logged_models(
                    [self.experiment_id], filter_string=f"tags.{TAG_RUN} = {_quote(run_id)}",
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
        """Bring the MLflow run up to ``stream``; returns its sweep id when its status changed."""
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
        writes = _RunWrites(self, run_id, ml_run, history, shown)
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
        # a sweep's status follows its trials': look again only when one of them changed
        return state.sweep_id if changed else None

    def _create_run(self, run_id: str, stream: list[RecordedEvent], sweep_id: str | None) -> str:
        tags = {TAG_RUN: run_id, TAG_RUN_NAME: run_id}
        if sweep_id:
            tags[TAG_PARENT] = self._sweep_parent(sweep_id)
        run = self.client.create_run(self.experiment_id, start_time=_ms(stream[0]), tags=tags)
        self._models[run_id] = {}
        return run.info.run_id

    def _delete(self, run_id: str, ml_run: str) -> None:
        for model_id in self._models_of(run_id).values():
            self.client.delete_logged_model(model_id)
        self.client.delete_run(ml_run)
        self._models.pop(run_id, None)
        self._runs.pop(run_id, None)

    def _set_status(self, ml_run: str, status: str, last: RecordedEvent | None = None) -> None:
        ended = {"completed": "FINISHED", "failed": "FAILED"}.get(status)
        if ended is None:
            self.client.update_run(ml_run, status="RUNNING")
            return
        # set_terminated (the one call that records an end time) prints links to stdout;
        # keep them out of the command's output
        with contextlib.redirect_stdout(io.StringIO()):
            self.client.set_terminated(ml_run, ended, end_time=_ms(last) if last else None)

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
        run = self.client.create_run(self.experiment_id, tags={
            TAG_SWEEP_PARENT: sweep_id, TAG_RUN_NAME: f"sweep {sweep_id}", "sweep_id": sweep_id})
        return run.info.run_id

    def _write_sweep(self, sweep_id: str, stream: list[RecordedEvent]) -> None:
        from mlflow.entities import Param

        parent = self._sweep_parent(sweep_id)
        started = next((ev for ev in stream if ev.type == "SweepStarted"), None)
        if started is None:
            return
        params = [Param(_key(f"grid.{k}"), _param_value(v)) for k, v in started.data["grid"].items()]
        params.append(Param("trials", str(len(started.data["trials"]))))
        for i in range(0, len(params), MAX_PARAMS_PER_CALL):
            self.client.log_batch(parent, params=params[i:i + MAX_PARAMS_PER_CALL])
        self._log_tags(parent, {"spec_digest": started.data["spec_digest"], TAG_EVENTS: str(len(stream))})
        self._update_sweep_status(sweep_id)

    def _update_sweep_status(self, sweep_id: str) -> None:
        """A sweep is finished when every trial is, failed when one failed and none runs."""
        from firetitan_track.ledger import NotFound

        try:
            sweep = self.ledger.read(f"sweep:{sweep_id}")
        except NotFound:  # a trial exported before its sweep was recorded
            return
        started = next((ev for ev in sweep if ev.type == "SweepStarted"), None)
        if started is None:
            return
        statuses = []
        for trial in started.data["trials"]:
            n = self.ledger.stream_version(trial["run_id"])
            statuses.append(fold(self.ledger.read(trial["run_id"])).status if n else "new")
        if all(s == "completed" for s in statuses):
            status = "completed"
        elif "failed" in statuses and not {"running", "new"} & set(statuses):
            status = "failed"
        else:
            status = "running"
        self._set_status(self._sweep_parent(sweep_id), status)


def _supersedes_shown(stream: list[RecordedEvent], shown: int) -> bool:
    """True when a resume not yet exported supersedes events the MLflow run already shows."""
    return any(ev.type == "RunResumed" and any(v < shown for v in ev.data.get("superseded") or ())
               for ev in stream[shown:])


def _run_tags(run_id: str, state: Any, stream: list[RecordedEvent]) -> dict[str, str]:
    started = next((ev.data for ev in stream if ev.type == "RunStarted"), {})
    tags = {
        TAG_RUN: run_id,
        "trainer_job_id": state.trainer_job_id,
        "reference_job_id": state.reference_job_id,
        "deployment_id": state.deployment_id,
        "backend": state.backend,
        "code_version": started.get("code_version"),
        "sweep_id": state.sweep_id,
        "rerun_of": state.rerun_of,
        "spec_digest": state.spec_digest,
        "seed": state.seed,
        "ledger_status": state.status,
        "attempts": state.attempts,
    }
    if started.get("trial_params"):
        tags["trial_params"] = json.dumps(started["trial_params"], sort_keys=True)
    return {k: str(v) for k, v in tags.items() if v is not None}


class _RunWrites:
    """What one export pass writes into one MLflow run, in an order that makes a crash harmless."""

    def __init__(self, exporter: MlflowExporter, run_id: str, ml_run: str,
                 history: list[RecordedEvent], shown: int) -> None:
        self.x = exporter
        self.client = exporter.client
        self.run_id = run_id
        self.ml_run = ml_run
        self.history = history  # the authoritative stream, for context
        self.new = [ev for ev in history if ev.version >= shown]  # what this pass must show
        # prompt sets the MLflow run already holds (logged and uploaded by an earlier pass)
        self.known_prompts = {ev.data["prompt_set_digest"] for ev in history
                              if ev.type == "EvalStarted" and ev.version < shown}
        self.metric_count = 0

    def run(self) -> None:
        models = self._logged_models()
        datasets = self._datasets()
        self._params()
        self._metrics(models, datasets)
        if self.x.artifacts:
            self._artifacts()

    def _params(self) -> None:
        from mlflow.entities import Param

        started = next((ev for ev in self.new if ev.type == "RunStarted"), None)
        if started is None:
            return
        # the ledger stored the spec redacted; redact again so no key can reach MLflow
        spec = redact(started.data["spec"])
        params = [Param(_key(k), _param_value(v)) for k, v in sorted(flatten(spec).items())]
        for i in range(0, len(params), MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.ml_run, params=params[i:i + MAX_PARAMS_PER_CALL])

    def _logged_models(self) -> dict[str, str]:
        """A LoggedModel per sampler snapshot (found again by path); path -> model id."""
        from mlflow.entities import LoggedModelOutput

        models = self.x._models_of(self.run_id)
        outputs = []
        for ev in self.new:
            if ev.type != "SnapshotSaved" or ev.data["path"] in models:
                continue
            d = ev.data
            info = {"snapshot_path": d["path"], "kind": d["kind"], "base_path": d["base_path"] or "",
                    "step": str(d["step"]), "snapshot_name": d["name"]}
            model = self.client.create_logged_model(
                self.x.experiment_id, name=_model_name(d["name"], d["step"]), source_run_id=self.ml_run,
                tags={TAG_RUN: self.run_id, **info}, params=info, model_type=SNAPSHOT_MODEL_TYPE)
            self.client.finalize_logged_model(model.model_id, "READY")
            models[d["path"]] = model.model_id
            outputs.append(LoggedModelOutput(model.model_id, int(d["step"])))
        if outputs:
            self.client.log_outputs(self.ml_run, outputs)
        return models

    def _datasets(self) -> dict[str, str]:
        """Log each prompt set first used in this pass; ledger digest -> MLflow digest."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        used = {ev.data["prompt_set_digest"]: ev.data["prompt_count"]
                for ev in self.history if ev.type == "EvalStarted"}
        fresh = {ev.data["prompt_set_digest"] for ev in self.new if ev.type == "EvalStarted"} - self.known_prompts
        inputs = []
        for digest in fresh:
            # MLflow holds 36 characters of a digest: a prefix of the ledger's sha256,
            # with the whole digest in the source so the two can be matched exactly
            dataset = Dataset(
                name=PROMPTS_DATASET, digest=digest[:MAX_DATASET_DIGEST], source_type="firetitan-ledger",
                source=json.dumps({"uri": f"ledger-blob:{digest}"}),
                profile=json.dumps({"num_rows": used[digest]}))
            inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "eval"),
                                                      InputTag("ledger_digest", digest)]))
        if inputs:
            self.client.log_inputs(self.ml_run, datasets=inputs)
        return {d: d[:MAX_DATASET_DIGEST] for d in used}

    def _metrics(self, models: dict[str, str], datasets: dict[str, str]) -> None:
        from mlflow.entities import Metric

        eval_steps = {ev.data["eval_id"]: ev.data["step"] for ev in self.history if ev.type == "EvalStarted"}
        points: list[Metric] = []
        for ev in self.new:
            d, ts = ev.data, _ms(ev)
            if ev.type == "StepCompleted":
                for key, value in {**_numbers(d["metrics"], "train"),
                                   **_numbers(d["optimizer"], "optim")}.items():
                    points.append(Metric(key, value, ts, int(d["step"])))
            elif ev.type == "WeightsSynced":
                points.append(Metric("sync/duration_s", float(d["duration_s"]), ts, int(d["step"])))
            elif ev.type == "SamplesRecorded" and d["eval_id"] in eval_steps:
                step = int(eval_steps[d["eval_id"]])
                for key, value in {**_numbers(d["server_metrics"], "eval/server"),
                                   **_numbers(d["concurrency_window"], "eval/concurrency_window")}.items():
                    points.append(Metric(key, value, ts, step))
            elif ev.type == "EvalScored":
                link = {"model_id": models.get(d["snapshot_path"])}
                if d["prompt_set_digest"] in datasets:
                    link.update(dataset_name=PROMPTS_DATASET, dataset_digest=datasets[d["prompt_set_digest"]])
                for key, value in {"eval/score": float(d["score"]), **_numbers(d["metrics"], "eval")}.items():
                    points.append(Metric(key, value, ts, int(d["step"]), **link))
        for i in range(0, len(points), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.ml_run, metrics=points[i:i + MAX_METRICS_PER_CALL])
        self.metric_count = len(points)

    def _artifacts(self) -> None:
        with tempfile.TemporaryDirectory(prefix="firetitan-mlflow-") as tmp:
            files: list[tuple[Path, str | None]] = []
            prompts = set(self.known_prompts)
            for ev in self.new:
                if ev.type == "RunStarted":
                    files.append((_write_json(tmp, "spec.json", redact(ev.data["spec"])), None))
                elif ev.type == "EvalStarted" and ev.data["prompt_set_digest"] not in prompts:
                    digest = ev.data["prompt_set_digest"]
                    prompts.add(digest)
                    files.append((_write_json(tmp, f"{digest}.json", self._blob(digest)), "prompts"))
                elif ev.type == "SamplesRecorded":
                    body = self._blob(ev.data["completions_digest"])
                    files.append((_write_json(tmp, f"{ev.data['eval_id']}.json", body), "completions"))
            if any(ev.type == "EvalScored" for ev in self.new):
                files.append((_plot_scores(self.history, Path(tmp) / "eval_score.png"), None))
            for path, folder in files:
                self.client.log_artifact(self.ml_run, str(path), folder)

    def _blob(self, digest: str) -> Any:
        return redact(self.x.ledger.get_json(digest))


def _model_name(name: str, step: int) -> str:
    # LoggedModel names may not hold / : . % " '
    return re.sub(r"[/:.%\"']", "-", name or f"step-{step}") or f"step-{step}"


def _write_json(folder: str, name: str, obj: Any) -> Path:
    path = Path(folder) / name
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    return path


def _plot_scores(history: list[RecordedEvent], out: Path) -> Path:
    """Eval score against step, each point labelled with the snapshot it was measured on."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    rows = [r for r in eval_rows(history) if r.score is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot([r.step for r in rows], [r.score for r in rows], marker="o")
    for r in rows:
        ax.annotate(os.path.basename(r.snapshot_path.rstrip("/")) or r.snapshot_path, (r.step, r.score),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, rotation=20)
    ax.set_xlabel("step")
    ax.set_ylabel("eval score")
    ax.set_title("eval score by sampler snapshot")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def export_mlflow(ledger: Any, tracking_uri: str = DEFAULT_TRACKING_URI, run_ids: Sequence[str] | None = None,
                  *, experiment: str = DEFAULT_EXPERIMENT, artifacts: bool = True) -> ExportReport:
    """Export everything new (or only ``run_ids``) to MLflow and return what was written."""
    return MlflowExporter(ledger, tracking_uri, experiment=experiment, run_ids=run_ids,
                          artifacts=artifacts).export()


# -- live export ---------------------------------------------------------------------


class LiveExporter:
    """Exports a run to MLflow while it runs, from a separate process.

    A process, not a thread: MLflow's client work then never competes with the
    training loop for the GIL, and the loop's process never imports MLflow.
    ``stop()`` asks the follower to flush what is left and waits for it.
    """

    def __init__(self, ledger: Any, tracking_uri: str = DEFAULT_TRACKING_URI, run_id: str | None = None,
                 *, run_ids: Iterable[str] = (), experiment: str = DEFAULT_EXPERIMENT,
                 poll_s: float = 1.0) -> None:
        """``ledger``: its URL, or an open Ledger (the follower opens its own connection)."""
        if not isinstance(ledger, str):
            ledger = ledger.engine.url.render_as_string(hide_password=False)
        self.ledger_url = ledger
        self.tracking_uri = tracking_uri
        self.run_ids = ([run_id] if run_id else []) + list(run_ids)
        self.experiment = experiment
        self.poll_s = poll_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> LiveExporter:
        cmd = [sys.executable, "-c", "from runner.cli import main; main()",
               "export", "mlflow", "--tracking-uri", self.tracking_uri,
               "--experiment", self.experiment, "--follow", "--until-stdin-closes",
               "--poll", str(self.poll_s), "--quiet", *self.run_ids]
        self._log = tempfile.TemporaryFile()
        # stdin is the stop signal: closing it cannot race the child's start-up, a signal can
        # the ledger URL travels in the environment, so a password never shows in `ps`
        env = {**os.environ, "FIRETITAN_LEDGER": self.ledger_url}
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._log, stderr=self._log, env=env)
        return self

    def stop(self, timeout: float = 300.0) -> bool:
        """Flush everything recorded so far to MLflow and end the follower; False if it failed.

        A failed export never fails the run: the ledger holds every event, and
        ``firetitan-track export mlflow RUN_ID`` finishes the job later.
        """
        if self._proc is None:
            return True
        proc, self._proc = self._proc, None
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._log.seek(0)
        output = self._log.read().decode(errors="replace")
        self._log.close()
        if proc.returncode == 0:
            return True
        print(f"MLflow live export failed (exit {proc.returncode}); the ledger has everything: run "
              f"`firetitan-track export mlflow {' '.join(self.run_ids)}` to finish it.\n{output[-2000:]}",
              file=sys.stderr)
        return False

    def __enter__(self) -> LiveExporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def follow_until_stopped(exporter: MlflowExporter, poll_s: float = 1.0, *,
                         until_stdin_closes: bool = False) -> ExportReport:
    """Run ``exporter.follow`` until SIGTERM or SIGINT (or stdin's end), then flush and return."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if until_stdin_closes:
        def wait_for_eof() -> None:
            while sys.stdin.buffer.read(4096):
                pass
            stop.set()

        threading.Thread(target=wait_for_eof, daemon=True).start()
    return exporter.follow(stop, poll_s)


def wait_for_http(url: str, timeout: float = 60.0) -> None:
    """Wait until ``url`` answers 200 (a freshly started ``mlflow server``)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")
        time.sleep(0.25)
