"""Provisioning and reconnection: from a spec and a run's record to a tracked service.

A new run provisions a trainer and a deployment. A resumed run first asks the backend
whether the recorded trainer job and deployment still exist: it reattaches to what
does and provisions anew what does not (the state is then loaded by a cross-job
reference). Only the SDK's "not found" answer counts as gone; an auth error or a
network failure propagates, so a blip never silently provisions a second trainer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from firetitan_track.events import (CleanupAction, CleanupApplied, CleanupOutcome, DeploymentProvisioned,
                                    TrainerProvisioned)
from firetitan_track.ledger import StoreFailure
from firetitan_track.projections.run_state import RunState
from firetitan_track.tracking import Recorder, TrackedService, error_text
from runner.spec import BackendSection, CleanupSection, KeyCheck, ModelSection

if TYPE_CHECKING:
    from fireworks.training.sdk import FiretitanServiceClient

__all__ = ["Endpoint", "Session", "api_key", "endpoint", "served_tokenizer", "shape_ref", "connect"]

# Job states from which a trainer cannot be reconnected to.
_GONE_STATES = frozenset({"", "JOB_STATE_DELETED", "JOB_STATE_DELETING", "JOB_STATE_FAILED",
                          "JOB_STATE_CANCELLED"})


@dataclass(frozen=True)
class Endpoint:
    base_url: str | None  # None: the SDK's default (the managed service)
    tokenizer_path: str


@dataclass
class Session:
    """What a run drives: the tracked service, the policy (and reference) clients."""

    tracked: TrackedService
    policy: Any  # the SDK's training clients, as TrackedService wraps them
    reference: Any
    endpoint: Endpoint


def endpoint(backend: BackendSection, tokenizer: str, bad: KeyCheck) -> Endpoint:
    """Where the run's service is (the spec's [backend]): the managed API, a given base_url,
    or the embedded local service (started when none runs on its state dir). A local
    service's tokenizer (unless the spec names one, ``tokenizer``) is the one that service
    says it serves."""
    if backend.kind == "fireworks":
        return Endpoint(backend.base_url or None, tokenizer)
    if backend.base_url:
        return Endpoint(backend.base_url, tokenizer or served_tokenizer(backend.base_url, api_key(backend) or "", bad))
    from runner.local.supervisor import ensure_running

    info = ensure_running(backend.state_dir, device=backend.device)  # its service.json
    return Endpoint(info.base_url, tokenizer or info.tokenizer_path)


INFO_PATH = "/local/v1/info"  # what a local service says of itself (`local info --json`, service.json)
_INFO_TIMEOUT_S = 10.0


def served_tokenizer(base_url: str, key: str, bad: KeyCheck) -> str:
    """The tokenizer the local service at ``base_url`` serves its default model with, as it
    says (GET /local/v1/info; a service started with --token wants it as the API key). One
    request, no retries: a URL where nothing answers is refused at once, as preflight refuses it."""
    import httpx

    where = "backend.base_url"
    # a plain-HTTP service (the local one, on loopback) needs no certificates: loading the CA
    # bundle for nothing was some 45 ms of a resume's time to its next step
    verify = base_url.lower().startswith("https:")
    try:
        answer = httpx.get(base_url.rstrip("/") + INFO_PATH, headers={"Authorization": f"Bearer {key}"},
                           timeout=_INFO_TIMEOUT_S, verify=verify)
    except httpx.HTTPError as exc:
        raise bad(where, f"no service answers at {base_url} ({str(exc) or type(exc).__name__})") from None
    try:
        path = answer.json().get("tokenizer_path") if answer.status_code == 200 else None
    except (ValueError, AttributeError):
        path = None
    if not isinstance(path, str) or not path:
        raise bad(where, f"the service at {base_url} does not say which tokenizer it serves (GET {INFO_PATH}: "
                         f"HTTP {answer.status_code}); point backend.base_url at a firetitan-track local service "
                         "(with FIREWORKS_API_KEY set to its token, if it has one), or name the tokenizer in "
                         "model.tokenizer")
    return path


def api_key(backend: BackendSection) -> str | None:
    """The key the run's service is called with: FIREWORKS_API_KEY. The managed service needs
    it (None when it is not set; the caller says what cannot go on without it). The local
    service accepts any key; a key in the environment is used as-is, so the secret-scanning
    tests exercise the same path as the managed service."""
    key = os.environ.get("FIREWORKS_API_KEY", "")
    if backend.kind == "fireworks":
        return key or None
    return key or "local"


def shape_ref(shape: str) -> str:
    """The SDK wants a resource name; a bare shape id means one of the public shapes."""
    return shape if "/" in shape else f"accounts/fireworks/trainingShapes/{shape}"


def connect(model: ModelSection, cleanup: CleanupSection, where: Endpoint, st: RunState, rec: Recorder,
            api_key: str, *, learning_rate: float, seed: int, needs_reference: bool) -> Session:
    """Provision (or, on a resume, reattach to) the run's trainer, deployment and reference
    (the spec's [model], cleaned up under its [cleanup]) at ``where``, the endpoint the
    caller resolved once for this attempt."""
    from fireworks.training.sdk import FiretitanServiceClient

    shape = shape_ref(model.training_shape)
    resuming = st.resume_step > 0 or st.attempts > 1
    trainer_id = st.trainer_job_id if resuming and _trainer_alive(where, api_key, st.trainer_job_id) else None
    deployment_id = st.deployment_id or model.deployment_id
    existing_deployment = deployment_id if _deployment_exists(where, api_key, deployment_id) else None
    service = FiretitanServiceClient.from_firetitan_config(
        api_key=api_key, base_url=where.base_url, base_model=model.base_model,
        tokenizer_model=where.tokenizer_path, lora_rank=model.lora_rank,
        training_shape_id=shape, deployment_id=deployment_id,
        learning_rate=learning_rate, replica_count=1, trainer_job_id=trainer_id,
        gradient_accumulation_steps=None,  # the SDK's default (1) only logs a deprecation; micro-batches are ours
        cleanup_trainer_on_close=cleanup.trainer == CleanupAction.DELETE,
        cleanup_deployment_on_close=None if cleanup.deployment == CleanupAction.KEEP
        else cleanup.deployment.value,
    )
    tracked = TrackedService(
        service, rec, base_model=model.base_model, shape=shape,
        lora_rank=model.lora_rank, deployment_id=model.deployment_id,
        reused_trainer_job_id=trainer_id, reused_deployment_id=existing_deployment,
        base_url=where.base_url, owns_reattached=True)
    session = Session(tracked, None, None, where)
    try:
        session.policy = tracked.create_training_client(base_model=model.base_model,
                                                        lora_rank=model.lora_rank, seed=seed)
    except BaseException as exc:
        # the SDK raises without cleaning up what it made before the failure (a trainer made,
        # then the deployment refused): record it and apply the spec's policy, then stop
        _retire_partial(service, model, cleanup, where, api_key, rec, trainer_id, existing_deployment, exc)
        raise
    if needs_reference:
        session.reference = tracked.create_reference_client(lora_rank=model.lora_rank)
        if st.reference_job_id and cleanup.trainer == CleanupAction.DELETE:
            _retire_reference(where, api_key, st.reference_job_id, rec)
    return session


def _retire_partial(service: FiretitanServiceClient, model: ModelSection, cleanup: CleanupSection, where: Endpoint,
                    api_key: str, rec: Recorder, reused_trainer: str | None, existing_deployment: str | None,
                    cause: BaseException) -> None:
    """What a failed provisioning made before it failed, recorded and cleaned up under the spec's
    policy. The SDK names the trainer job on its config before creating it; a deployment that
    is there now and was not before was made by this attempt."""
    from types import SimpleNamespace

    from fireworks.training.sdk import DeploymentManager, TrainerJobManager

    from firetitan_track import sdk_adapter
    from firetitan_track.tracking import clean_up

    config = sdk_adapter.managed_config(service)
    job_id = getattr(config, "trainer_job_id", None)
    made_trainer = bool(job_id) and job_id != reused_trainer and _trainer_alive(where, api_key, job_id)
    deployment_id = model.deployment_id
    made_deployment = existing_deployment is None and _deployment_exists(where, api_key, deployment_id)
    if not made_trainer and not made_deployment:
        return
    handle = SimpleNamespace(
        trainer_manager=TrainerJobManager(api_key=api_key, base_url=where.base_url) if made_trainer else None,
        trainer_endpoint=SimpleNamespace(job_id=job_id),
        deployment_manager=DeploymentManager(api_key=api_key, base_url=where.base_url) if made_deployment else None,
        deployment=SimpleNamespace(deployment_id=deployment_id) if made_deployment else None)
    kept = CleanupOutcome.KEPT
    wanted = {"trainer": cleanup.trainer.outcome if made_trainer else kept,
              "deployment": cleanup.deployment.outcome if made_deployment else kept}
    # cleaned up before it is recorded: a ledger that refuses the record (the failure may be
    # that very refusal) must not leave a trainer running
    done, why = clean_up(handle, wanted)
    shape = shape_ref(model.training_shape)
    error = f"provisioning failed ({error_text(cause)}) after it made " + " and ".join(
        what for what, made in ((f"trainer {job_id}", made_trainer), (f"deployment {deployment_id}", made_deployment))
        if made)
    try:
        if made_trainer:
            rec.record(TrainerProvisioned(role="policy", trainer_job_id=job_id, base_model=model.base_model,
                                          shape=shape, lora_rank=model.lora_rank, created=True, partial=True))
        if made_deployment:
            rec.record(DeploymentProvisioned(deployment_id=deployment_id, base_model=model.base_model,
                                             created=True, partial=True))
        rec.record(CleanupApplied(trainer=done["trainer"], deployment=done["deployment"], role="policy",
                                  trainer_job_id=job_id if made_trainer else None, error="; ".join([error, *why])))
    except StoreFailure as refused:
        refused.cleanup = done  # what ran, for the message saying it could not be recorded
        raise


def _trainer_alive(where: Endpoint, api_key: str, job_id: str | None) -> bool:
    """Whether the recorded trainer job can be reconnected to (else provision anew and load the state)."""
    if not job_id:
        return False
    from fireworks.training.sdk import TrainerJobManager

    job = TrainerJobManager(api_key=api_key, base_url=where.base_url).try_get(job_id)  # None: not found
    return job is not None and str(job.get("state", "")) not in _GONE_STATES


def _deployment_exists(where: Endpoint, api_key: str, deployment_id: str | None) -> bool:
    """Whether provisioning will reattach to this deployment (an earlier attempt's, or another run's)."""
    if not deployment_id:
        return False
    from fireworks.training.sdk import DeploymentManager

    return DeploymentManager(api_key=api_key, base_url=where.base_url).get(deployment_id) is not None


def _retire_reference(where: Endpoint, api_key: str, job_id: str, rec: Recorder) -> None:
    """A crashed attempt's frozen reference trainer: the SDK that made it died before its
    close, and the resumed run has a new one, so the spec's cleanup applies to it now."""
    if not _trainer_alive(where, api_key, job_id):
        return
    from fireworks.training.sdk import TrainerJobManager

    TrainerJobManager(api_key=api_key, base_url=where.base_url).delete(job_id)  # logs a failure, returns
    gone = not _trainer_alive(where, api_key, job_id)  # recorded as the service confirms it
    rec.record(CleanupApplied(trainer=CleanupOutcome.DELETED if gone else CleanupOutcome.FAILED,
                              deployment=CleanupOutcome.KEPT, role="reference",
                              trainer_job_id=job_id,
                              error=None if gone else f"trainer {job_id} is still there after its delete"))
