"""The MLflow view of the ledger: each run projected into MLflow, live or after the fact.

- store.py: where the project's tracking store is (``export`` writes it, ``ui`` serves it);
- keys.py: how ledger names and values become MLflow keys, tags and timestamps;
- exporter.py: :class:`MlflowExporter`, the follower (one MLflow run per ledger run,
  sweeps as parent runs, a rebuilt run after a resume superseded what it showed);
- run_export.py: what one pass writes into one MLflow run;
- live.py: :class:`LiveExporter`, the exporter in its own process beside a training run;
- ui.py: the MLflow UI over the store.

MLflow itself is imported lazily: nothing here touches it until an exporter is built,
so a training process can start a live export without importing it.
"""

from firetitan_track.projections.mlflow.exporter import ExportReport, MlflowExporter, export_mlflow
from firetitan_track.projections.mlflow.keys import (TAG_EVENTS, TAG_PARENT, TAG_RUN, TAG_RUN_NAME,
                                                     TAG_SWEEP_PARENT, flatten)
from firetitan_track.projections.mlflow.live import LiveExporter, follow_until_stopped
from firetitan_track.projections.mlflow.store import (DEFAULT_ARTIFACT_ROOT, DEFAULT_EXPERIMENT,
                                                      DEFAULT_TRACKING_URI, local_artifact_root)
from firetitan_track.projections.mlflow.ui import wait_for_http

__all__ = [
    "DEFAULT_TRACKING_URI", "DEFAULT_ARTIFACT_ROOT", "DEFAULT_EXPERIMENT", "local_artifact_root",
    "MlflowExporter", "ExportReport", "export_mlflow", "LiveExporter", "follow_until_stopped",
    "TAG_RUN", "TAG_EVENTS", "TAG_SWEEP_PARENT", "TAG_PARENT", "TAG_RUN_NAME", "flatten", "wait_for_http",
]
