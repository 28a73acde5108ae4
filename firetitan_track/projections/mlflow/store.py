"""Where the project's MLflow tracking store lives, and where a sqlite store keeps artifacts."""

from __future__ import annotations

from pathlib import Path

from firetitan_track.urls import absolute_url

# The project's tracking store: `export` writes here by default and `ui` serves it.
# A sqlite store keeps its artifacts in "mlartifacts" beside the database file.
DEFAULT_TRACKING_URI = "sqlite:///.firetitan/mlflow.db"
DEFAULT_ARTIFACT_ROOT = ".firetitan/mlartifacts"
DEFAULT_EXPERIMENT = "firetitan-track"


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The store ``tracking_uri`` names (default: the project's), a relative sqlite path made
    absolute now: MLflow keeps its stores keyed by the URI text, so a relative one would
    go on naming the first directory's store after a ``chdir``."""
    return absolute_url(tracking_uri or DEFAULT_TRACKING_URI)


def sqlite_path(tracking_uri: str) -> Path:
    return Path(tracking_uri.removeprefix("sqlite:///"))


def local_artifact_root(tracking_uri: str) -> Path | None:
    """Where a sqlite tracking store keeps artifacts: ``mlartifacts`` beside the database."""
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a server or file store decides for itself
    return (sqlite_path(tracking_uri).parent / "mlartifacts").resolve()


def checkpoint_name(tracking_uri: str, experiment: str) -> str:
    """The ledger checkpoint that holds a whole-ledger follower's position in this store."""
    return f"mlflow:{tracking_uri}#{experiment}"


def store_exists(tracking_uri: str) -> bool:
    """False for a sqlite store not written yet (opening one would create it)."""
    return not tracking_uri.startswith("sqlite:///") or sqlite_path(tracking_uri).exists()
