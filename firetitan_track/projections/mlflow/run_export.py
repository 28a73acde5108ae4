"""What one export pass writes into one MLflow run, in an order that makes a crash harmless.

Params come from the recorded (already redacted) spec; metrics carry the step and
the original ``recorded_at`` of their event, so writing the same event twice adds
nothing; a LoggedModel per sampler snapshot holds the eval metrics measured on it,
and the eval prompt set is the run's dataset input.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from firetitan_track.events import (EvalScored, EvalStarted, MetricsLogged, ModelPromoted, RecordedEvent, RunStarted,
                                     SamplesRecorded, SnapshotSaved, StepCompleted, TrajectoriesRecorded, WeightsSynced,
                                     first_of)
from firetitan_track.ids import file_name  # a stored id becomes a file name only once checked
from firetitan_track.ledger import Ledger
from firetitan_track.projections.audit import best_eval, eval_rows, is_eval_metric
from firetitan_track.projections.mlflow.keys import (MAX_DATASET_DIGEST, MAX_METRICS_PER_CALL,
                                                     MAX_PARAMS_PER_CALL, MAX_TAGS_PER_CALL, PROMPTS_DATASET,
                                                     SNAPSHOT_MODEL_TYPE, TAG_BEST_IN_RUN, TAG_RUN, flatten,
                                                     is_identifier, mlflow_key, model_name, ms, numbers,
                                                     param_value, quote)
from firetitan_track.redact import redact, redact_bytes

if TYPE_CHECKING:  # mlflow is imported where it is used: the core installs without it
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from firetitan_track.blobs import Json
    from firetitan_track.code_identity import CodeIdentity


@dataclass
class RunExport:
    """One MLflow run brought up to its ledger stream: models, datasets, params, metrics, artifacts.

    It is handed what it writes with (the exporter depends on it, never the other way): the
    MLflow client and experiment, the ledger the blobs come from, and ``models``, the run's
    LoggedModels so far (snapshot path -> model id), which it extends with those it creates.
    """

    client: MlflowClient
    experiment_id: str
    ledger: Ledger
    models: dict[str, str]
    run_id: str
    ml_run: str
    history: list[RecordedEvent]  # the authoritative stream, for context
    shown: int  # the stream version the MLflow run already shows
    _: KW_ONLY
    artifacts: bool
    new: list[RecordedEvent] = field(init=False)  # what this pass must show
    known_prompts: set[str] = field(init=False)  # prompt sets the MLflow run already holds
    metric_count: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.new = [ev for ev in self.history if ev.version >= self.shown]
        # logged and uploaded by an earlier pass
        self.known_prompts = {ev.fact.prompt_set_digest for ev in self.history
                              if isinstance(ev.fact, EvalStarted) and ev.version < self.shown}

    def run(self) -> None:
        models = self._logged_models()
        datasets = self._datasets()
        self._params()
        self._metrics(models, datasets)
        self._tag_promotions(models)
        self._mark_models(models)
        if self.artifacts:
            self._artifacts()

    def _params(self) -> None:
        """The spec's settings as params; the keys that only identify the run (its name,
        deployment, service) as tags of the same name."""
        from mlflow.entities import Param, RunTag

        started = first_of(self.new, RunStarted)
        if started is None:
            return
        # the ledger stored the spec redacted; redact again so no key can reach MLflow
        spec = flatten(redact(started.spec))
        swept = set(started.trial_params or {})
        params = [Param(mlflow_key(k), param_value(v)) for k, v in sorted(spec.items())
                  if k in swept or not is_identifier(k)]
        tags = [RunTag(mlflow_key(k), param_value(v)) for k, v in sorted(spec.items())
                if k not in swept and is_identifier(k)]
        for i in range(0, len(params), MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.ml_run, params=params[i:i + MAX_PARAMS_PER_CALL])
        for i in range(0, len(tags), MAX_TAGS_PER_CALL):
            self.client.log_batch(self.ml_run, tags=tags[i:i + MAX_TAGS_PER_CALL])

    def _logged_models(self) -> dict[str, str]:
        """A LoggedModel per sampler snapshot (found again by path); path -> model id."""
        from mlflow.entities import LoggedModelOutput

        models = self.models
        outputs = []
        for ev in self.new:
            snap = ev.fact
            if not isinstance(snap, SnapshotSaved) or snap.path in models:
                continue
            info = {"snapshot_path": snap.path, "kind": snap.kind, "base_path": snap.base_path or "",
                    "step": str(snap.step), "snapshot_name": snap.name}
            model = self.client.create_logged_model(
                self.experiment_id, name=model_name(self.run_id, snap.step), source_run_id=self.ml_run,
                tags={TAG_RUN: self.run_id, **info}, params=info, model_type=SNAPSHOT_MODEL_TYPE)
            self.client.finalize_logged_model(model.model_id, "READY")
            models[snap.path] = model.model_id
            outputs.append(LoggedModelOutput(model.model_id, int(snap.step)))
        if outputs:
            self.client.log_outputs(self.ml_run, outputs)
        return models

    def _tag_promotions(self, models: dict[str, str]) -> None:
        """Tag a snapshot's LoggedModel with every model id promoted from it (``promoted_as``)."""
        fresh = {ev.fact.snapshot_path for ev in self.new if isinstance(ev.fact, ModelPromoted)}
        for path in fresh & set(models):
            ids = [ev.fact.model_id for ev in self.history
                   if isinstance(ev.fact, ModelPromoted) and ev.fact.snapshot_path == path]
            self.client.set_logged_model_tags(models[path], {"promoted_as": ",".join(ids)})

    def _mark_models(self, models: dict[str, str]) -> None:
        """Tag each snapshot's model with the prompt set it was scored on, and mark the run's best."""
        for ev in self.new:
            if isinstance(opened := ev.fact, EvalStarted) and opened.snapshot_path in models:
                self.client.set_logged_model_tags(models[opened.snapshot_path],
                                                  {"prompt_set_digest": opened.prompt_set_digest})
        if not any(isinstance(ev.fact, EvalScored) for ev in self.new):
            return
        best = best_eval(eval_rows(self.history))
        best_model = models.get(best.snapshot_path) if best else None
        marked = self.client.search_logged_models(
            [self.experiment_id],
            filter_string=f"tags.{TAG_RUN} = {quote(self.run_id)} AND tags.{TAG_BEST_IN_RUN} = 'true'")
        for model in marked:
            if model.model_id != best_model:
                self.client.delete_logged_model_tag(model.model_id, TAG_BEST_IN_RUN)
        if best_model and best_model not in {m.model_id for m in marked}:
            self.client.set_logged_model_tags(best_model, {TAG_BEST_IN_RUN: "true"})

    def _datasets(self) -> dict[str, str]:
        """Log each prompt set first used in this pass; ledger digest -> MLflow digest."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        used = {ev.fact.prompt_set_digest: ev.fact.prompt_count
                for ev in self.history if isinstance(ev.fact, EvalStarted)}
        fresh = {ev.fact.prompt_set_digest for ev in self.new if isinstance(ev.fact, EvalStarted)} - self.known_prompts
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

        eval_steps = {ev.fact.eval_id: ev.fact.step for ev in self.history if isinstance(ev.fact, EvalStarted)}
        program = _ProgramMetrics(self.history, models)
        points: list[Metric] = []
        for ev in self.new:
            ts = ms(ev)
            match ev.fact:
                case StepCompleted() as done:
                    for key, value in {**numbers(done.metrics, "train"),
                                       **numbers(done.optimizer, "optim"),
                                       **numbers(done.version_offsets, "train/version_offset")}.items():
                        points.append(Metric(key, value, ts, int(done.step)))
                case MetricsLogged() as logged:
                    points += program.points(ev, logged)
                case WeightsSynced(duration_s=duration, step=step):
                    points.append(Metric("sync/duration_s", float(duration), ts, int(step)))
                case SamplesRecorded(eval_id=eval_id) as samples if eval_id in eval_steps:
                    step = int(eval_steps[eval_id])
                    for key, value in {**numbers(samples.server_metrics, "eval/server"),
                                       **numbers(samples.concurrency_window, "eval/concurrency_window")}.items():
                        points.append(Metric(key, value, ts, step))
                case EvalScored() as scored:
                    path = scored.snapshot_path
                    link = {"model_id": models.get(path) if path is not None else None}
                    if scored.prompt_set_digest in datasets:
                        link.update(dataset_name=PROMPTS_DATASET, dataset_digest=datasets[scored.prompt_set_digest])
                    for key, value in {"eval/score": float(scored.score), **numbers(scored.metrics, "eval")}.items():
                        points.append(Metric(key, value, ts, int(scored.step), **link))
        for i in range(0, len(points), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.ml_run, metrics=points[i:i + MAX_METRICS_PER_CALL])
        self.metric_count = len(points)

    def _artifacts(self) -> None:
        with tempfile.TemporaryDirectory(prefix="firetitan-mlflow-") as tmp:
            files: list[tuple[Path, str | None]] = []
            prompts = set(self.known_prompts)
            for ev in self.new:
                match ev.fact:
                    case RunStarted(spec=spec, code=code):
                        files.append((_write_json(tmp, "spec.json", redact(spec)), None))
                        files += self._code_files(tmp, code)
                    case EvalStarted(prompt_set_digest=digest) if digest not in prompts:
                        prompts.add(digest)
                        files.append((_write_json(tmp, f"{digest}.json", self._blob(digest)), "prompts"))
                    case SamplesRecorded(eval_id=eval_id, completions_digest=digest):
                        body = self._blob(digest)
                        files.append((_write_json(tmp, file_name(eval_id, ".json"), body), "completions"))
                    case TrajectoriesRecorded(step=step, trajectories_digest=digest):
                        # a multi-turn recipe's episodes of one step
                        body = self._blob(digest)
                        files.append((_write_json(tmp, f"step-{step}.json", body), "trajectories"))
            if any(isinstance(ev.fact, EvalScored) for ev in self.new):
                files.append((_plot_scores(self.history, Path(tmp) / "eval_score.png"), None))
            for path, folder in files:
                self.client.log_artifact(self.ml_run, str(path), folder)

    def _code_files(self, tmp: str, code: CodeIdentity | None) -> list[tuple[Path, str | None]]:
        """``code/identity.json`` (RunStarted.code) and ``code/diff.patch`` (the uncommitted diff)."""
        if not code:
            return []
        folder = Path(tmp) / "code"
        folder.mkdir(exist_ok=True)
        files: list[tuple[Path, str | None]] = [(_write_json(str(folder), "identity.json", redact(code)), "code")]
        digest = (code.get("git") or {}).get("diff_digest")
        if digest:
            patch = folder / "diff.patch"
            patch.write_bytes(redact_bytes(self.ledger.get_blob(digest)))
            files.append((patch, "code"))
        return files

    def _blob(self, digest: str) -> Json:
        return redact(self.ledger.get_json(digest))


class _ProgramMetrics:
    """A recorded program's own metrics (MetricsLogged) under their own names and steps; its
    eval/* metrics linked to the LoggedModel of the snapshot they measured (as audit ties
    them). A number the step's StepCompleted already gives under that name is left out."""

    def __init__(self, history: list[RecordedEvent], models: dict[str, str]):
        self.models = models
        self.measured = {r.eval_id: r.snapshot_path for r in eval_rows(history) if r.source == "program"}
        self.from_steps = {(key, int(ev.fact.step)) for ev in history if isinstance(ev.fact, StepCompleted)
                           for key in numbers(ev.fact.metrics, "train")}

    def points(self, ev: RecordedEvent, logged: MetricsLogged) -> list[Metric]:
        """The points of ``logged``, the fact ``ev`` records (its id and time name the points)."""
        from mlflow.entities import Metric

        step = logged.step if logged.step is not None else logged.trainer_step
        if not isinstance(step, (int, float)):
            return []
        model = self.models.get(self.measured.get(ev.event_id[:12]) or "")
        out = []
        for key, value in logged.metrics.items():
            name = mlflow_key(key)
            if (name, int(step)) in self.from_steps or isinstance(value, bool):
                continue
            link = {"model_id": model} if model and is_eval_metric(key) else {}
            out.append(Metric(name, float(value), ms(ev), int(step), **link))
        return out


def _write_json(folder: str, name: str, obj: object) -> Path:
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
