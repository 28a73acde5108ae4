"""The control plane: ``/v1/accounts/...`` as the SDK's managers call it.

Accounts (any API key resolves to the one local account), training shapes,
trainer jobs (``rlorTrainerJobs``: create, get, ``:resume``, delete, checkpoint
listing), deployments (create, get, patch, delete), base and promoted models,
and checkpoint promotion. Records are persisted in the state dir (see
``state.py``) and returned in the camelCase shape the SDK reads.

State machine the SDK polls for:
- a trainer job is ``JOB_STATE_RUNNING`` as soon as it is created (its engine is
  built on first use), so ``wait_for_ready`` returns on its first poll;
- after a service restart, jobs that were running are ``JOB_STATE_PAUSED``
  (their in-memory weights are gone); the SDK resumes them (``:resume``) and the
  client loads its saved state;
- deleting a job leaves a ``JOB_STATE_DELETED`` tombstone, so its checkpoints
  stay listable and promotable, as on the managed service;
- a deployment is ``READY`` once created; scale-to-zero (PATCH of the replica
  counts) frees its model and keeps the record; a hot load or a completion
  brings one replica back; DELETE removes it (GET then answers 404).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import catalogue
from .state import DNS_LABEL_RE, ServiceState, now_rfc3339
from .trainer_plane import TrainerSpec
from .wire import ApiError, field, json_body, json_response

if TYPE_CHECKING:
    from firetitan_track.blobs import Json

    from .inference_plane import InferencePlane
    from .trainer_plane import TrainerPlane

ACCOUNT_ID = "local"
# Base models and training shapes are public resources of this account, as on the managed service.
PUBLIC_ACCOUNT_ID = "fireworks"

RESUMABLE_STATES = {"JOB_STATE_PAUSED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_COMPLETED"}
SHAPE_REF_RE = re.compile(r"^accounts/([^/]+)/trainingShapes/([^/]+)(?:/versions/([^/]+))?$")
TRAINER_MODES = {"policy": "POLICY_TRAINER", "reference": "FORWARD_ONLY", "lora": "LORA_TRAINER"}
CHECKPOINT_TYPES = {"base": "CHECKPOINT_TYPE_INFERENCE_BASE", "merged_base": "CHECKPOINT_TYPE_INFERENCE_BASE",
                    "delta": "CHECKPOINT_TYPE_INFERENCE_ARC_V2", "adapter": "CHECKPOINT_TYPE_INFERENCE_LORA",
                    "state": "CHECKPOINT_TYPE_TRAINING"}


def shape_name(shape_id: str) -> str:
    return f"accounts/{PUBLIC_ACCOUNT_ID}/trainingShapes/{shape_id}"


def default_training_shape(base_model: str) -> str | None:
    """The unversioned policy shape for ``base_model`` (what ``local up`` reports)."""
    for shape in catalogue.TRAINING_SHAPES.values():
        if shape.base_model == base_model and shape.trainer_mode == "policy":
            return shape_name(shape.shape_id)
    return None


def deployment_shape_for(base_model: str) -> str:
    short = base_model.rstrip("/").rsplit("/", 1)[-1]
    return f"accounts/{PUBLIC_ACCOUNT_ID}/deploymentShapes/ds-{short}-local/versions/1"


def public(record: dict) -> dict:
    """A stored record without its private (underscore) bookkeeping keys."""
    return {key: value for key, value in record.items() if not key.startswith("_")}


class ControlPlane:
    def __init__(self, state: ServiceState, trainers: "TrainerPlane", inference: "InferencePlane"):
        self.state = state
        self.trainers = trainers
        self.inference = inference

    # -- service lifecycle --------------------------------------------------------

    def restore(self) -> None:
        """After a (re)start: jobs that were running lost their in-memory weights."""
        for job in self.state.jobs.all():
            if job.get("state") == "JOB_STATE_RUNNING":
                job_id = job["name"].rsplit("/", 1)[-1]
                job.update(state="JOB_STATE_PAUSED", updateTime=now_rfc3339(), status={
                    "code": "UNAVAILABLE",
                    "message": "The local service restarted; the trainer's in-memory weights are gone. "
                               "Resume the job and load a saved state to continue."})
                self.state.jobs.put(job_id, job)

    # -- helpers ------------------------------------------------------------------

    @staticmethod
    def _account(request: Request) -> str:
        account = request.path_params["account"]
        if account != ACCOUNT_ID:
            raise ApiError(404, f"account {account!r} not found (the local service's account is {ACCOUNT_ID!r})")
        return account

    @staticmethod
    def _split_verb(ref: str) -> tuple[str, str | None]:
        """'job-1:resume' -> ('job-1', 'resume'); custom methods ride on the last path segment."""
        name, sep, verb = ref.partition(":")
        return name, (verb if sep else None)

    def _job(self, job_id: str) -> dict:
        job = self.state.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"trainer job accounts/{ACCOUNT_ID}/rlorTrainerJobs/{job_id} not found")
        return job

    def _deployment(self, deployment_id: str) -> dict:
        record = self.state.deployments.get(deployment_id)
        if record is None:
            raise ApiError(404, f"deployment accounts/{ACCOUNT_ID}/deployments/{deployment_id} not found")
        return record

    def _start_trainer(self, job_id: str, job: dict) -> None:
        config = job["trainingConfig"]
        self.trainers.start(TrainerSpec(job_id=job_id, base_model=config["baseModel"],
                                        lora_rank=int(config.get("loraRank") or 0),
                                        forward_only=bool(job.get("forwardOnly")),
                                        seed=int(job.get("_seed", 0))))

    def start_job(self, job_id: str, base_model: str, *, lora_rank: int = 0, display_name: str | None = None,
                  private: dict | None = None) -> dict:
        """A running trainer job that another protocol asked for (a Tinker training run): the
        record create_job writes, without a training shape, plus ``private`` bookkeeping
        (underscore keys, never returned by the control plane); its trainer started."""
        if self.state.jobs.get(job_id) is not None:
            raise ApiError(409, f"trainer job accounts/{ACCOUNT_ID}/rlorTrainerJobs/{job_id} already exists")
        now = now_rfc3339()
        job = {
            "name": f"accounts/{ACCOUNT_ID}/rlorTrainerJobs/{job_id}",
            "displayName": display_name or job_id,
            "state": "JOB_STATE_RUNNING",
            "status": {"code": "OK", "message": ""},
            "createTime": now,
            "updateTime": now,
            "serviceMode": True,
            "forwardOnly": False,
            "trainingShape": None,
            "trainingConfig": {"baseModel": base_model, "loraRank": lora_rank, "learningRate": None,
                               "maxContextLength": catalogue.resolve(base_model).max_context_length},
            **{f"_{key}": value for key, value in (private or {}).items()},
        }
        self.state.jobs.put(job_id, job)
        self._start_trainer(job_id, job)
        return job

    # -- accounts -----------------------------------------------------------------

    async def list_accounts(self, request: Request) -> Response:
        # Any API key is accepted locally and resolves to the single local account.
        return _listing("accounts", [self._account_record()])

    async def get_account(self, request: Request) -> Response:
        self._account(request)
        return json_response(self._account_record())

    @staticmethod
    def _account_record() -> dict:
        return {"name": f"accounts/{ACCOUNT_ID}", "displayName": "firetitan-track local service",
                "state": "READY", "accountType": "ENTERPRISE"}

    # -- training shapes ----------------------------------------------------------

    @staticmethod
    def _shape(request: Request) -> catalogue.ShapeCard:
        account, shape_id = request.path_params["account"], request.path_params["shape"]
        if account != PUBLIC_ACCOUNT_ID:
            raise ApiError(404, f"training shape accounts/{account}/trainingShapes/{shape_id} not found: the local "
                                f"service serves shapes under accounts/{PUBLIC_ACCOUNT_ID}/trainingShapes/")
        try:
            return catalogue.training_shape(shape_id)
        except catalogue.UnknownShape as exc:
            raise ApiError(404, f"training shape accounts/{account}/trainingShapes/{shape_id} not found: {exc}") from None

    @staticmethod
    def _shape_version(shape: catalogue.ShapeCard, version: str) -> dict:
        return {
            "name": f"{shape_name(shape.shape_id)}/versions/{version}",
            "validated": True,
            "latestValidated": version == shape.latest_version,
            "createTime": "2025-01-01T00:00:00Z",
            "snapshot": {
                "baseModel": shape.base_model,
                "maxSupportedContextLength": shape.max_context_length,
                "trainerMode": TRAINER_MODES.get(shape.trainer_mode, "POLICY_TRAINER"),
                "loraSupported": shape.supports_lora,
                "deploymentShapeVersion": deployment_shape_for(shape.base_model),
                "acceleratorType": shape.accelerator,
                "acceleratorCount": 1,
                "nodeCount": 1,
                "trainerImageTag": "local",
                "deploymentImageTag": "local",
                "baseModelWeightPrecision": "FLOAT32",
                "trainerShardingScheme": {"pipelineParallelism": 1},
            },
        }

    async def list_shapes(self, request: Request) -> Response:
        if request.path_params["account"] != PUBLIC_ACCOUNT_ID:
            return json_response({"trainingShapes": []})
        shapes = [{"name": shape_name(s.shape_id), "baseModel": s.base_model,
                   "latestVersion": f"{shape_name(s.shape_id)}/versions/{s.latest_version}"}
                  for s in catalogue.TRAINING_SHAPES.values()]
        return _listing("trainingShapes", shapes)

    async def get_shape(self, request: Request) -> Response:
        shape = self._shape(request)
        return json_response({"name": shape_name(shape.shape_id), "baseModel": shape.base_model,
                              "latestVersion": f"{shape_name(shape.shape_id)}/versions/{shape.latest_version}"})

    async def list_shape_versions(self, request: Request) -> Response:
        shape = self._shape(request)
        versions = [self._shape_version(shape, v) for v in reversed(shape.versions)]  # newest first
        query = request.query_params.get("filter", "")
        if "latest_validated=true" in query.replace(" ", "").lower():
            versions = [v for v in versions if v["latestValidated"]]
        page_size = request.query_params.get("pageSize")
        if page_size and page_size.isdigit() and int(page_size) > 0:
            versions = versions[: int(page_size)]
        return _listing("trainingShapeVersions", versions)

    async def get_shape_version(self, request: Request) -> Response:
        shape = self._shape(request)
        version = request.path_params["version"]
        if version == "latest":
            version = shape.latest_version
        if version not in shape.versions:
            raise ApiError(404, f"training shape {shape_name(shape.shape_id)} has no version {version!r} "
                                f"(versions: {', '.join(shape.versions)})")
        return json_response(self._shape_version(shape, version))

    # -- trainer jobs ---------------------------------------------------------------

    def _resolve_create_shape(self, ref: str, base_model: str) -> tuple[catalogue.ShapeCard, str]:
        match = SHAPE_REF_RE.match(ref)
        if not match or match.group(1) != PUBLIC_ACCOUNT_ID:
            raise ApiError(400, f"unknown training shape {ref!r}: expected accounts/{PUBLIC_ACCOUNT_ID}/"
                                "trainingShapes/<shape>[/versions/<version>]")
        try:
            shape = catalogue.training_shape(match.group(2))
        except catalogue.UnknownShape as exc:
            raise ApiError(400, f"unknown training shape {ref!r}: {exc}") from None
        version = match.group(3) or shape.latest_version
        if version == "latest":
            version = shape.latest_version
        if version not in shape.versions:
            raise ApiError(400, f"training shape {shape_name(shape.shape_id)} has no version {version!r}")
        if shape.base_model != base_model:
            raise ApiError(400, f"training shape {ref!r} is for {shape.base_model!r}, not {base_model!r}")
        return shape, f"{shape_name(shape.shape_id)}/versions/{version}"

    async def create_job(self, request: Request) -> Response:
        account = self._account(request)
        body = await json_body(request)
        job_id = request.query_params.get("rlorTrainerJobId") or f"trainer-{now_rfc3339()[:19].replace(':', '').replace('T', '-').lower()}"
        if not DNS_LABEL_RE.match(job_id):
            raise ApiError(400, f"invalid trainer job id {job_id!r}: lowercase a-z, 0-9 and '-', at most 63 characters")
        if self.state.jobs.get(job_id) is not None:
            raise ApiError(409, f"trainer job accounts/{account}/rlorTrainerJobs/{job_id} already exists")
        config = field(body, "trainingConfig", dict)
        base_model = field(config, "baseModel", str)
        try:
            card = catalogue.resolve(base_model)
        except catalogue.UnknownModel as exc:
            raise ApiError(400, str(exc)) from None
        lora_rank = config.get("loraRank") or 0
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
            raise ApiError(400, "trainingConfig.loraRank must be a non-negative integer")
        forward_only = field(body, "forwardOnly", bool, required=False, default=False)
        display_name = field(body, "displayName", str, required=False) or job_id
        max_rank = catalogue.MAX_LORA_RANK
        max_context = card.max_context_length
        shape_version = None
        shape_ref = request.query_params.get("trainingShape")
        if shape_ref:
            shape, shape_version = self._resolve_create_shape(shape_ref, base_model)
            max_context = min(max_context, shape.max_context_length)
            forward_only = forward_only or shape.trainer_mode == "reference"
            if lora_rank and not shape.supports_lora:
                lora_shapes = [shape_name(s.shape_id) for s in catalogue.TRAINING_SHAPES.values()
                               if s.supports_lora and s.base_model == base_model]
                raise ApiError(400, f"trainingConfig.loraRank={lora_rank}: training shape {shape_ref!r} is a "
                                    f"{TRAINER_MODES[shape.trainer_mode]} shape without LoRA; LoRA shapes for "
                                    f"{base_model}: {', '.join(lora_shapes) or 'none'}")
            max_rank = shape.max_lora_rank or max_rank
        if lora_rank > max_rank:
            raise ApiError(400, f"trainingConfig.loraRank={lora_rank} exceeds the largest rank "
                                f"{'the training shape' if shape_ref else 'the local trainer'} allows ({max_rank})")
        requested_context = config.get("maxContextLength")
        if requested_context is not None:
            if isinstance(requested_context, bool) or not isinstance(requested_context, int) or requested_context <= 0:
                raise ApiError(400, "trainingConfig.maxContextLength must be a positive integer")
            if requested_context > card.max_context_length:
                raise ApiError(400, f"maxContextLength {requested_context} exceeds {base_model}'s "
                                    f"{card.max_context_length}")
            max_context = requested_context
        now = now_rfc3339()
        job = {
            "name": f"accounts/{account}/rlorTrainerJobs/{job_id}",
            "displayName": display_name,
            "state": "JOB_STATE_RUNNING",
            "status": {"code": "OK", "message": ""},
            "createTime": now,
            "updateTime": now,
            "serviceMode": True,
            "forwardOnly": forward_only,
            "trainingShape": shape_version,
            "trainingConfig": {
                "baseModel": base_model,
                "loraRank": lora_rank,
                "learningRate": config.get("learningRate"),
                "maxContextLength": max_context,
            },
        }
        self.state.jobs.put(job_id, job)
        self._start_trainer(job_id, job)
        return json_response(public(job))

    async def list_jobs(self, request: Request) -> Response:
        self._account(request)
        jobs = [public(job) for job in self.state.jobs.all()]
        return _listing("rlorTrainerJobs", jobs)

    async def job(self, request: Request) -> Response:
        """GET / DELETE .../rlorTrainerJobs/{job} and POST .../rlorTrainerJobs/{job}:resume."""
        self._account(request)
        job_id, verb = self._split_verb(request.path_params["job"])
        if request.method == "POST":
            if verb != "resume":
                raise ApiError(404, f"unknown method :{verb} on trainer jobs (only :resume)")
            return await self._resume_job(job_id)
        if verb is not None:
            raise ApiError(404, f"unknown method :{verb}")
        job = self._job(job_id)
        if request.method == "DELETE":
            self.trainers.stop(job_id)
            job.update(state="JOB_STATE_DELETED", updateTime=now_rfc3339(),
                       status={"code": "OK", "message": "Trainer deleted; checkpoints are kept for recovery."})
            self.state.jobs.put(job_id, job)
            return json_response({})
        return json_response(public(job))

    async def _resume_job(self, job_id: str) -> Response:
        job = self._job(job_id)
        state = job.get("state")
        if state == "JOB_STATE_RUNNING":
            self._start_trainer(job_id, job)  # idempotent: running jobs already have a runtime
            return json_response(public(job))
        if state not in RESUMABLE_STATES:
            raise ApiError(400, f"trainer job {job_id} is {state}; only paused, failed, cancelled or "
                                "completed jobs can be resumed")
        job.update(state="JOB_STATE_RUNNING", updateTime=now_rfc3339(), status={"code": "OK", "message": ""})
        self.state.jobs.put(job_id, job)
        self._start_trainer(job_id, job)
        return json_response(public(job))

    async def list_job_checkpoints(self, request: Request) -> Response:
        account = self._account(request)
        job_id = request.path_params["job"]
        self._job(job_id)
        rows = []
        for row in self.state.checkpoints.list(job_id):
            rows.append({
                "name": f"accounts/{account}/rlorTrainerJobs/{job_id}/checkpoints/{row['id']}",
                "createTime": row["createTime"],
                "updateTime": row["createTime"],
                "checkpointType": CHECKPOINT_TYPES.get(row["kind"], "CHECKPOINT_TYPE_UNSPECIFIED"),
                "promotable": row["family"] == "sampler",
                "step": row.get("step"),
            })
        return _listing("checkpoints", rows)

    # -- checkpoint promotion ---------------------------------------------------------

    async def promote_checkpoint(self, request: Request) -> Response:
        account = self._account(request)
        checkpoint_id, verb = self._split_verb(request.path_params["checkpoint"])
        if verb != "promote":
            raise ApiError(404, f"unknown checkpoint method :{verb} (only :promote)")
        body = await json_body(request)
        output_model = field(body, "output_model", str)
        trainer_ref = field(body, "trainer_job_id", str)
        base_model = field(body, "base_model", str)
        match = re.match(rf"^accounts/{ACCOUNT_ID}/models/([^/]+)$", output_model)
        if not match or not DNS_LABEL_RE.match(match.group(1)):
            raise ApiError(400, f"output_model must be accounts/{ACCOUNT_ID}/models/<id> (got {output_model!r})")
        job_id = trainer_ref.rsplit("/", 1)[-1]
        self._job(job_id)
        row = self.state.checkpoints.find(job_id, checkpoint_id, "sampler")
        if row is None:
            if self.state.checkpoints.find(job_id, checkpoint_id, "state") is not None:
                raise ApiError(400, f"checkpoint {checkpoint_id!r} is a training (DCP) state; only sampler "
                                    "snapshots are promotable")
            raise ApiError(404, f"checkpoint {checkpoint_id!r} not found on trainer job {job_id}")
        model_id = match.group(1)
        if self.state.models.get(model_id) is not None or f"accounts/{account}/models/{model_id}" in catalogue.BASE_MODELS:
            raise ApiError(409, f"model {output_model} already exists")
        job_base = self._job(job_id)["trainingConfig"]["baseModel"]
        source = f"accounts/{account}/rlorTrainerJobs/{job_id}/checkpoints/{checkpoint_id}"
        model = {
            "name": output_model,
            "displayName": model_id,
            "kind": "HF_BASE_MODEL",
            "state": "READY",
            "createTime": now_rfc3339(),
            "baseModel": base_model,
            "sourceCheckpoint": source,
            "sourceSnapshot": {"checkpoint": source, "snapshot": checkpoint_id, "checkpointType":
                               CHECKPOINT_TYPES.get(row["kind"], "CHECKPOINT_TYPE_UNSPECIFIED"),
                               "step": row.get("step"), "trainerBaseModel": job_base},
            "baseModelDetails": {"moe": False, "checkpointFormat": "LOCAL_SNAPSHOT"},
            "_snapshot": {"path": row["path"], "kind": row["kind"], "base_path": row.get("base_path"),
                          "base_model": job_base},
        }
        if row["kind"] == "adapter":  # a LoRA adapter promotes to a PEFT add-on of its base
            model["kind"] = "HF_PEFT_ADDON"
            model["peftDetails"] = {"baseModel": job_base, "r": row.get("loraRank")}
        self.state.models.put(model_id, model)
        return json_response({"model": public(model)})

    # -- models ---------------------------------------------------------------------

    async def get_model(self, request: Request) -> Response:
        account, model_id = request.path_params["account"], request.path_params["model"]
        name = f"accounts/{account}/models/{model_id}"
        card = catalogue.BASE_MODELS.get(name)
        if card is not None:
            return json_response({
                "name": name, "displayName": model_id, "description": card.description, "kind": "HF_BASE_MODEL",
                "state": "READY", "contextLength": card.max_context_length, "public": True,
                "baseModelDetails": {"moe": card.moe, "modelType": card.model_type, "checkpointFormat": "HUGGINGFACE",
                                     "worldSize": 1, "tunable": True},
                "tuneable": True, "supportsLora": True,
            })
        if account == ACCOUNT_ID:
            model = self.state.models.get(model_id)
            if model is not None:
                return json_response(public(model))
        raise ApiError(404, f"model {name} not found")

    async def list_models(self, request: Request) -> Response:
        account = request.path_params["account"]
        names = [name for name in catalogue.BASE_MODELS if name.startswith(f"accounts/{account}/")]
        models = [{"name": name, "kind": "HF_BASE_MODEL", "state": "READY"} for name in names]
        if account == ACCOUNT_ID:
            models += [public(m) for m in self.state.models.all()]
        return _listing("models", models)

    # -- deployments ------------------------------------------------------------------

    async def create_deployment(self, request: Request) -> Response:
        account = self._account(request)
        deployment_id = request.query_params.get("deploymentId")
        if not deployment_id or not DNS_LABEL_RE.match(deployment_id):
            raise ApiError(400, f"deploymentId query parameter must be a resource id (got {deployment_id!r})")
        if self.state.deployments.get(deployment_id) is not None:
            raise ApiError(409, f"deployment accounts/{account}/deployments/{deployment_id} already exists")
        body = await json_body(request)
        base_model = field(body, "baseModel", str)
        promoted = self._promoted_model(base_model)
        serving_base = promoted["_snapshot"]["base_model"] if promoted else base_model
        try:
            catalogue.resolve(serving_base)
        except catalogue.UnknownModel as exc:
            raise ApiError(400, str(exc)) from None
        trainer_job = field(body, "hotLoadTrainerJob", str, required=False)
        if trainer_job is not None:
            self._job(trainer_job.rsplit("/", 1)[-1])
        text = {key: field(body, key, str, required=False) for key in
                ("displayName", "description", "hotLoadTransitionType", "deploymentShape")}
        flags = {key: field(body, key, bool, required=False, default=default) for key, default in
                 (("enableHotLoad", True), ("forTraining", False))}
        replicas = self._replica_counts(body, default_min=1, default_max=1)
        now = now_rfc3339()
        record = {
            "name": f"accounts/{account}/deployments/{deployment_id}",
            "displayName": text["displayName"] or deployment_id,
            "description": text["description"] or "",
            "baseModel": base_model,
            "state": "READY",
            "status": {"code": "OK", "message": ""},
            "createTime": now,
            "updateTime": now,
            "enableHotLoad": flags["enableHotLoad"],
            "forTraining": flags["forTraining"],
            "hotLoadTrainerJob": trainer_job,
            "hotLoadTransitionType": text["hotLoadTransitionType"] or "ASYNC",
            "deploymentShape": text["deploymentShape"] or deployment_shape_for(base_model),
            "minReplicaCount": replicas[0],
            "maxReplicaCount": replicas[1],
            "replicaCount": min(max(replicas[0], 1), replicas[1]),
        }
        if promoted:
            # Serve the promoted snapshot from the start, on the model it was trained from.
            snapshot = promoted["_snapshot"]
            record.update(currentSnapshotIdentity=base_model, _servingBaseModel=serving_base,
                          _snapshot={"path": snapshot["path"], "kind": snapshot["kind"]})
        self.state.deployments.put(deployment_id, record)
        return json_response(public(record))

    def _promoted_model(self, name: str) -> dict | None:
        match = re.match(rf"^accounts/{ACCOUNT_ID}/models/([^/]+)$", name)
        return self.state.models.get(match.group(1)) if match else None

    @staticmethod
    def _replica_counts(body: dict, *, default_min: int, default_max: int) -> tuple[int, int]:
        values = []
        for key, default in (("minReplicaCount", default_min), ("maxReplicaCount", default_max)):
            value = body.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ApiError(400, f"{key} must be a non-negative integer")
            values.append(value)
        if values[0] > values[1]:
            raise ApiError(400, "minReplicaCount must not exceed maxReplicaCount")
        return values[0], values[1]

    async def list_deployments(self, request: Request) -> Response:
        self._account(request)
        records = [public(r) for r in self.state.deployments.all()]
        return _listing("deployments", records)

    async def deployment(self, request: Request) -> Response:
        """GET / PATCH / DELETE .../deployments/{id}."""
        self._account(request)
        deployment_id = request.path_params["deployment"]
        record = self._deployment(deployment_id)
        if request.method == "DELETE":
            await self.inference.stop(deployment_id)
            self.state.deployments.delete(deployment_id)
            return json_response({})
        if request.method == "PATCH":
            record = await self._patch_deployment(deployment_id, record, await json_body(request), request)
        return json_response(public(record))

    async def _patch_deployment(self, deployment_id: str, record: dict, body: dict, request: Request) -> dict:
        mask = request.query_params.get("updateMask")
        allowed = {"minReplicaCount": "min_replica_count", "maxReplicaCount": "max_replica_count",
                   "hotLoadTrainerJob": "hot_load_trainer_job", "hotLoadTransitionType": "hot_load_transition_type",
                   "description": "description", "displayName": "display_name"}
        masked = {part.strip() for part in mask.split(",")} if mask else None
        updates = {}
        for key, value in body.items():
            if key not in allowed:
                raise ApiError(400, f"field {key!r} cannot be updated on a deployment")
            if key not in ("minReplicaCount", "maxReplicaCount"):  # counts are checked below
                field(body, key, str, required=False)
            if masked is not None and allowed[key] not in masked and key not in masked:
                continue
            updates[key] = value
        if "hotLoadTrainerJob" in updates and updates["hotLoadTrainerJob"]:
            self._job(updates["hotLoadTrainerJob"].rsplit("/", 1)[-1])
        if "minReplicaCount" in updates or "maxReplicaCount" in updates:
            merged = {"minReplicaCount": record["minReplicaCount"], "maxReplicaCount": record["maxReplicaCount"]}
            merged.update({k: v for k, v in updates.items() if k in merged})
            low, high = self._replica_counts(merged, default_min=0, default_max=0)
            updates["minReplicaCount"], updates["maxReplicaCount"] = low, high
            updates["replicaCount"] = min(max(low, 1), high)
        record.update(updates)
        record["updateTime"] = now_rfc3339()
        self.state.deployments.put(deployment_id, record)
        if record["replicaCount"] == 0:
            await self.inference.scale_to_zero(deployment_id)
        return record

    def routes(self) -> list[Route]:
        a = "/v1/accounts/{account}"
        return [
            Route("/v1/accounts", self.list_accounts, methods=["GET"]),
            Route(a, self.get_account, methods=["GET"]),
            Route(a + "/trainingShapes", self.list_shapes, methods=["GET"]),
            Route(a + "/trainingShapes/{shape}", self.get_shape, methods=["GET"]),
            Route(a + "/trainingShapes/{shape}/versions", self.list_shape_versions, methods=["GET"]),
            Route(a + "/trainingShapes/{shape}/versions/{version}", self.get_shape_version, methods=["GET"]),
            Route(a + "/rlorTrainerJobs", self.create_job, methods=["POST"]),
            Route(a + "/rlorTrainerJobs", self.list_jobs, methods=["GET"]),
            Route(a + "/rlorTrainerJobs/{job}", self.job, methods=["GET", "DELETE", "POST"]),
            Route(a + "/rlorTrainerJobs/{job}/checkpoints", self.list_job_checkpoints, methods=["GET"]),
            Route(a + "/checkpoints/{checkpoint}", self.promote_checkpoint, methods=["POST"]),
            Route(a + "/models", self.list_models, methods=["GET"]),
            Route(a + "/models/{model}", self.get_model, methods=["GET"]),
            Route(a + "/deployments", self.create_deployment, methods=["POST"]),
            Route(a + "/deployments", self.list_deployments, methods=["GET"]),
            Route(a + "/deployments/{deployment}", self.deployment, methods=["GET", "PATCH", "DELETE"]),
        ]


def _listing(key: str, items: list[Json]) -> Response:
    """A list call's answer, as the managed API pages it: the items under their collection's
    name, and how many there are (one page holds them all)."""
    return json_response({key: items, "totalSize": len(items)})
