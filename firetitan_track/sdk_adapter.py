"""The one module that reaches past the FireTitan SDK's public API.

firetitan-track records programs on the SDK releases researchers pin: fireworks-ai 1.2.24
(built on Thinking Machines' ``tinker`` 0.23 types; the cookbook's pin) and 1.2.30
(its own native types; this project's pin). Their public surface is the same where
the recorder touches it; what the public API does not say (the provisioning config a
service was built from, the raw deployment record, which snapshot kind the next save
writes) is read here and nowhere else, each access named for what it gives and tested
against both releases (tests/record/test_sdk_adapter.py). When a release moves one of
these, this module is the one to change; a caller gets ``None`` (or the documented
fallback), never an AttributeError from deep inside the SDK.

Nothing here imports the SDK at module import: firetitan-track stays importable in an
environment without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx
    from fireworks.training.sdk import AdamParams
    from fireworks.training.sdk.fireworks_client import FireworksClient

# The SDK's own objects (services, clients, handles, configs) are ``object`` here where a function
# only looks an attribute up, and Any where it hands back what it found (a provisioning config, a
# handle, the raw deployment record): the two releases it serves differ in those classes, and the
# caller reads them attribute by attribute. Only the types of this project's pin (1.2.30) are
# named, under TYPE_CHECKING: the control plane's REST client, and AdamParams.

__all__ = ["sdk_versions", "managed_config", "managed_handle", "managed_base_url", "trainer_job_id",
           "deployment_id", "reference_job_id", "deployment_reattached", "deployment_record", "next_snapshot_kind", "rest_get",
           "adam_params", "optimizer_fields", "cleanup_flags", "tinker_base_url", "tinker_training_run",
           "tinker_model", "tinker_sampling_session", "tinker_run_of_path", "is_tinker_service"]


def sdk_versions() -> dict[str, str]:
    """The installed fireworks-ai release, and tinker's when it is installed."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {}
    for dist in ("fireworks-ai", "tinker"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return found


# -- the provisioning a FiretitanServiceClient holds -------------------------------------------

def managed_config(service: object) -> Any:
    """The FiretitanProvisioningConfig an SDK-managed service was built from (None for a
    service made another way)."""
    return getattr(service, "_managed_config", None)


def managed_handle(service: object) -> Any:
    """The SDK's handle on what it provisioned (trainer endpoint, managers, deployment);
    None until the first training client provisions it."""
    return getattr(service, "_managed_handle", None)


def managed_base_url(service: object) -> str | None:
    """The control-plane base URL an SDK-managed service talks to."""
    return getattr(service, "_managed_base_url", None)


def trainer_job_id(service: object) -> str | None:
    """The policy trainer's job id, None before provisioning (the public ``trainer_job_id``
    raises instead)."""
    value = getattr(service, "managed_trainer_job_id", None)
    return value if isinstance(value, str) else None


def deployment_id(service: object) -> str | None:
    """The service's deployment id, None when it has none (a recipe without sampling)."""
    handle = managed_handle(service)
    if handle is not None:
        deployment = getattr(handle, "deployment", None)
        return getattr(deployment, "deployment_id", None) if deployment is not None else None
    value = getattr(service, "managed_deployment_id", None)
    return value if isinstance(value, str) else None


def reference_job_id(service: object) -> str | None:
    """The separate frozen reference trainer's job id; None when the reference shares the
    policy's session (a LoRA policy) or none was made."""
    value = getattr(service, "reference_job_id", None)
    return value if isinstance(value, str) else None


def deployment_reattached(service: object) -> bool | None:
    """Right after provisioning: whether the SDK reattached to an existing deployment (True)
    or created it (False); None when the service has no deployment or cannot say."""
    handle = managed_handle(service)
    if handle is None or getattr(handle, "deployment", None) is None:
        return None
    flag = getattr(handle, "requires_initial_sampler_sync", None)  # set on reattach until the first hotload
    return flag if isinstance(flag, bool) else None


def cleanup_flags(config_or_handle: object) -> tuple[bool, str | None]:
    """(delete the trainer on close, what to do with the deployment on close) as the SDK
    holds them on a provisioning config or on its handle."""
    return (bool(getattr(config_or_handle, "cleanup_trainer_on_close", False)),
            getattr(config_or_handle, "cleanup_deployment_on_close", None))


def deployment_record(handle: object, deployment_id: str) -> dict[str, Any] | None:
    """The control plane's raw deployment record (None: no such deployment). The public
    ``DeploymentManager.get`` returns a DeploymentInfo without the replica counts that tell
    a scale-to-zero happened."""
    manager = getattr(handle, "deployment_manager", None)
    if manager is None:
        raise LookupError("the SDK handle has no deployment manager")
    record: dict[str, Any] | None = manager._get_deployment(deployment_id)
    return record


def rest_get(manager: FireworksClient, path: str, *, timeout: float = 30) -> httpx.Response:
    """GET ``path`` on the control plane with the manager's auth headers: the SDK has no
    public call for some reads (a model by id). Returns the httpx response."""
    return manager._get(path, timeout=timeout)


# -- training clients --------------------------------------------------------------------------

def next_snapshot_kind(client: object, requested: str | None) -> str | None:
    """The checkpoint type (``base``, ``delta``, ...) the client's next
    ``save_weights_for_sampler(checkpoint_type=requested)`` will write, as the SDK decides
    it (a full base first in a session, deltas after it, always a base under LoRA);
    ``requested`` itself when the SDK cannot say."""
    decide = getattr(client, "_next_sampler_checkpoint_type", None)
    if decide is None:
        return requested
    try:
        return str(decide(requested))
    except Exception:  # an invalid request: the SDK's own call will say so
        return requested


def adam_params(params: object) -> AdamParams:
    """The installed SDK's AdamParams from any AdamParams-like object or dict.

    The seed passes Thinking Machines' ``tinker.AdamParams``, which fireworks-ai 1.2.30's
    optim_step rejects; the fields are the same. 1.2.24 exports no AdamParams of its own:
    its optim_step takes tinker's (0.23).
    """
    try:
        from fireworks.training.sdk import AdamParams
    except ImportError:  # fireworks-ai 1.2.24
        from tinker.types import AdamParams

    if isinstance(params, AdamParams):
        return params
    fields = optimizer_fields(params)
    return AdamParams(**{k: v for k, v in fields.items() if k in AdamParams.model_fields})


def optimizer_fields(params: object) -> dict[str, object]:
    """An AdamParams-like object (either release's class, a dataclass, a dict) as its set fields."""
    if isinstance(params, dict):
        fields = dict(params)
    elif hasattr(params, "model_dump"):
        fields = params.model_dump(exclude_none=True)
    elif hasattr(params, "__dict__"):
        fields = dict(vars(params))
    else:
        fields = {}
    return {k: v for k, v in fields.items() if v is not None}


# -- Thinking Machines' tinker client (0.38), for programs written against it ----------------------

def is_tinker_service(service: object) -> bool:
    """Whether ``service`` is Thinking Machines' ``tinker.ServiceClient`` (not the FireTitan SDK's)."""
    cls = type(service)
    return cls.__name__ == "ServiceClient" and (cls.__module__ == "tinker" or cls.__module__.startswith("tinker."))


def tinker_base_url(service: object) -> str | None:
    """The URL a ``tinker.ServiceClient`` was given (None: the client's default, or unknown)."""
    url = getattr(service, "_base_url", None)
    return url if isinstance(url, str) else None


def tinker_training_run(client: object) -> str | None:
    """A tinker TrainingClient's training run (its public ``model_id``; ``tinker://`` paths and the
    REST calls name the run by it)."""
    run = getattr(client, "__dict__", {}).get("model_id")  # a future of a client has none of its own
    return str(run) if run is not None else None


def tinker_model(client: object) -> tuple[str, int]:
    """(base model name, LoRA rank: 0 for full parameters) of a tinker TrainingClient, from the
    model info the client fetched when it was made."""
    info = getattr(client, "__dict__", {}).get("_info")
    name = getattr(getattr(info, "model_data", None), "model_name", None)
    rank = getattr(info, "lora_rank", None)
    return str(name or ""), int(rank or 0)


def tinker_sampling_session(client: object) -> str:
    """The sampling session a tinker SamplingClient samples through."""
    return str(getattr(client, "__dict__", {}).get("_sampling_session_id") or "")


def tinker_run_of_path(path: str) -> str:
    """The training run of a ``tinker://<run>/<kind>/<name>`` path (the path itself otherwise)."""
    if path.startswith("tinker://"):
        return path[len("tinker://"):].split("/", 1)[0]
    return path
