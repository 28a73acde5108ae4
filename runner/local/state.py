"""Control-plane records of the local service, kept as JSON files in the state dir.

Layout under ``<state_dir>``::

    control/jobs/<job_id>.json          one trainer job (rlorTrainerJob) each
    control/deployments/<id>.json       one deployment each
    control/models/<model_id>.json      models promoted from checkpoints
    jobs/<job_id>/                      the engine's files for that job (snapshots, DCP states)
    service.json                        the running server's pid, port and base URL (INFO_FILE)
    service.log                         its output (LOG_FILE)
    service.lock, start.lock            one server per state dir; one start at a time
    hf-cache/                           the served models' tokenizers under their Tinker names (HF_HUB_CACHE)

Every write goes to a temporary file in the same directory and is renamed over
the old one, so a crash (``kill -9`` included) leaves either the old record or
the new one, never half a file. Records are plain dicts in the wire shape the
SDK reads (camelCase keys), so the control plane can return them as they are.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .catalogue import EngineError

if TYPE_CHECKING:
    from firetitan_track.blobs import Json

# The state dir's well-known files, named here once for the server, the supervisor and the CLI.
DEFAULT_STATE_DIR = Path(".firetitan/local")
INFO_FILE = "service.json"      # written by the server once it listens, removed on a clean exit
LOG_FILE = "service.log"        # the background server's stdout and stderr
LOCK_FILE = "service.lock"      # held by the server: a second one on the same dir refuses to start
START_LOCK_FILE = "start.lock"  # serializes ensure_running across processes
HF_CACHE_DIR = "hf-cache"       # the offline Hugging Face cache of the served tokenizers (tinker_plane.write_hf_cache)
TOKEN_ENV = "FIRETITAN_LOCAL_TOKEN"  # the bearer token `local up --token` hands the server (see gate.py)


# Snapshot, state and checkpoint names: what the managed service accepts (both cases,
# digits, '.', '_', '-'; the seed's own are "step_00000"). Each becomes one directory
# in the state dir, so nothing else: no separator can escape it, no leading '.' can
# meet our temporary siblings (".<name>.tmp"), and 200 characters leave room for the
# SDK's session suffix under the file system's 255.
NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")
NAME_RULE = "letters, digits, '.', '_' and '-', at most 200 characters, not starting with '.'"
DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
CROSS_JOB_PREFIX = "cross_job://"


class BadName(EngineError):
    """A snapshot, state or checkpoint name the state dir cannot hold; the message says why."""


def check_name(name: object, what: str) -> str:
    """``name`` if it is a valid snapshot/state/checkpoint name, else BadName naming the rule."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BadName(f"{what} name {name!r} is refused: names are {NAME_RULE}, so that each stays one "
                      "directory inside the state dir")
    return name


def state_ref(job_id: str, name: str) -> str:
    """The path save_state answers for a state: one the SDK's load_state accepts.

    The SDK checks load paths as DNS labels, so a name that is one is its own path;
    any other (``step_00000``) gets a cross-job reference to a DNS-safe alias that
    is unique to it (a digest of the exact name), which ``find`` resolves.
    """
    if DNS_LABEL_RE.match(name):
        return name
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:48] or "state"
    return f"{CROSS_JOB_PREFIX}{job_id}/{label}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def split_state_ref(ref: str, current_job: str) -> tuple[str, str]:
    """(job id, name or alias) of a load path: a bare name, ``cross_job://<job>/<name>``
    or ``<account>/<job>/<name>``."""
    ref = ref.strip()
    if ref.startswith(CROSS_JOB_PREFIX):
        job_id, _, name = ref[len(CROSS_JOB_PREFIX):].partition("/")
        return job_id, name
    if "/" in ref:
        parts = ref.split("/")
        return parts[-2], parts[-1]
    return current_job, ref


def now_rfc3339() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def write_json_atomic(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_json(path: Path) -> Json:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def serving_base_model(deployment: dict) -> str:
    """The catalogue model a deployment runs: its base model, or for a deployment of a
    promoted model, the base that model was trained from."""
    return deployment.get("_servingBaseModel") or deployment["baseModel"]


class RecordStore:
    """A directory of JSON records keyed by id; thread-safe, crash-safe writes."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"invalid record id {key!r}")
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return read_json(self._path(key))
        except ValueError:
            return None

    def put(self, key: str, record: dict) -> dict:
        with self._lock:
            write_json_atomic(self._path(key), record)
        return record

    def delete(self, key: str) -> None:
        with self._lock:
            try:
                self._path(key).unlink()
            except FileNotFoundError:
                pass

    def all(self) -> list[dict]:
        records = []
        for path in sorted(self.directory.glob("*.json")):
            record = read_json(path)
            if record is not None:
                records.append(record)
        return records


class ServiceState:
    """All persistent control-plane state of one local service."""

    def __init__(self, state_dir: Path):
        self.root = Path(state_dir)
        self.jobs = RecordStore(self.root / "control" / "jobs")
        self.deployments = RecordStore(self.root / "control" / "deployments")
        self.models = RecordStore(self.root / "control" / "models")
        self.checkpoints = CheckpointIndex(self.root / "control" / "checkpoints")

    def attached_lora_rank(self, deployment: dict) -> int | None:
        """The LoRA rank of the trainer a deployment hot-loads from (0: full-parameter), or
        None when it has none attached."""
        attached = (deployment.get("hotLoadTrainerJob") or "").rsplit("/", 1)[-1]
        job = self.jobs.get(attached) if attached else None
        return int(job["trainingConfig"].get("loraRank") or 0) if job else None

    def job_dir(self, job_id: str) -> Path:
        path = self.root / "jobs" / job_id
        path.mkdir(parents=True, exist_ok=True)
        return path


class CheckpointIndex:
    """Per trainer job, the sampler snapshots and DCP states it saved, oldest first.

    One file per job (``control/checkpoints/<job_id>.json``); it outlives the
    job record's deletion, as the managed service keeps checkpoint rows of a
    deleted trainer for recovery and promotion.
    """

    def __init__(self, directory: Path):
        self._store = RecordStore(directory)
        self._lock = threading.Lock()

    def list(self, job_id: str) -> list[dict]:
        record = self._store.get(job_id)
        return list(record["checkpoints"]) if record else []

    def find(self, job_id: str, checkpoint_id: str, family: str | None = None) -> dict | None:
        """The row named ``checkpoint_id`` ("sampler" or "state" family, or either); a
        state is also found by the path save_state answered for it (``state_ref``)."""
        for entry in reversed(self.list(job_id)):
            names = (entry["id"], entry.get("ref", "").rpartition("/")[2])
            if checkpoint_id in names and family in (None, entry["family"]):
                return entry
        return None

    def remove(self, job_id: str, checkpoint_id: str, family: str) -> None:
        """Forget one checkpoint row (its files are the caller's to delete)."""
        with self._lock:
            rows = [row for row in self.list(job_id) if (row["id"], row["family"]) != (checkpoint_id, family)]
            self._store.put(job_id, {"checkpoints": rows})

    def add(self, job_id: str, entry: dict) -> None:
        """Add (or replace, when a name is saved again) one checkpoint row."""
        with self._lock:
            # Sampler snapshots and DCP states may share a name; each family keeps its own.
            rows = [row for row in self.list(job_id)
                    if (row["id"], row["family"]) != (entry["id"], entry["family"])]
            rows.append(entry)
            self._store.put(job_id, {"checkpoints": rows})
