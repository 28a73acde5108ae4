"""How ledger values become MLflow names and values: keys, tags, limits, timestamps."""

from __future__ import annotations

import json
import re
from typing import Any

from firetitan_track.events import RecordedEvent

# flatten's leaves are Any: they are the input's own values (a spec's, a metrics payload's), whatever
# their types, and its callers narrow them.

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
TAG_GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's tag for the code's commit
TAG_SOURCE_NAME = "mlflow.source.name"  # MLflow's tag for the program that ran (its entry script)
TAG_RUN_COLOR = "mlflow.runColor"  # the UI draws a run's lines in this colour
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"  # what the UI opens an experiment on
MODEL_TRAINING = "custom_model_development"  # its kind for training runs (not GenAI traces)
TAG_BEST_IN_RUN = "best_in_run"  # on the LoggedModel of a run's best-scoring snapshot
PROMPTS_DATASET = "eval_prompts"
# a sweep's trials in colours told apart at a glance (matplotlib's tab10), by trial number
TRIAL_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf")
SNAPSHOT_MODEL_TYPE = "sampler-snapshot"


# Spec keys that say where, or under which name, a run ran rather than how it trains: the
# run's name, its deployment, the service it used and that service's folder and device. They
# are tags, not params, so the params of a sweep's trials differ only in what was swept (and
# two machines' trials do not differ in their machines). A swept key stays a param.
IDENTIFIER_KEYS = frozenset({"run.name"})
IDENTIFIER_LEAVES = frozenset({"deployment_id", "display_name", "base_url", "state_dir", "device"})


def is_identifier(key: str) -> bool:
    """A flattened spec key that identifies rather than configures (``model.deployment_id``)."""
    return key in IDENTIFIER_KEYS or key.rsplit(".", 1)[-1] in IDENTIFIER_LEAVES


def flatten(obj: object, prefix: str = "") -> dict[str, Any]:
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


def mlflow_key(name: str) -> str:
    """A valid MLflow metric/param key (letters, digits, _ - . / : and spaces)."""
    return _BAD_KEY_CHARS.sub("_", name)[:MAX_KEY_LENGTH]


def param_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:MAX_PARAM_VALUE]


def numbers(values: object, prefix: str) -> dict[str, float]:
    """The numeric leaves of a metrics payload, under ``prefix/``."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return {prefix: float(values)}
    if not isinstance(values, dict):
        return {}
    out: dict[str, float] = {}
    for k, v in flatten(values).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[mlflow_key(f"{prefix}/{k}")] = float(v)
    return out


def ms(ev: RecordedEvent) -> int:
    """An event's own time in MLflow's unit (ms): the same event always gives the same point."""
    return int(round(ev.recorded_at * 1000))


def quote(value: str) -> str:
    """A string literal for an MLflow filter (its parser takes no escapes, so refuse quotes)."""
    if "'" in value:
        raise ValueError(f"cannot search MLflow for a value containing a quote: {value!r}")
    return f"'{value}'"


def model_name(run_id: str, step: int) -> str:
    """A snapshot's LoggedModel name, unique in the experiment and saying what it is:
    ``demo-lr-t0@step-75`` (names may not hold / : . % " ')."""
    return re.sub(r"[/:.%\"']", "-", f"{run_id}@step-{step}")
