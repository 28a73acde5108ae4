"""The Tinker wire: ``/api/v1/...`` as Thinking Machines' ``tinker`` client (0.38) calls it.

One engine serves both protocols. A Tinker training run is a trainer job of the control
plane (``trainer_plane.TrainerRuntime``: the same worker thread, request sequencing,
futures, LoRA, DCP states and snapshots, in the same state dir), so ``rlorTrainerJobs``
lists it and the FireTitan SDK can load its states; Tinker clients can load the states
and sample from the snapshots of FireTitan jobs. Sampling runs on deployment replicas
(``inference_plane.DeploymentRuntime``: the engine's Sampler, batching, hot loads).

Names:
- a session is ``s<12 hex>``; its training runs are ``<session>:train:<n>`` (the id the
  client itself derives for a model it creates by loading a state), each the trainer job
  ``<session>-train-<n>``; its sampling sessions are ``<session>:sample:<n>``;
- ``tinker://<run>/weights/<name>`` is a training state (DCP), ``tinker://<run>/sampler_weights/<name>``
  a sampler snapshot, where ``<run>`` is a Tinker run id or any trainer job's id.

Futures: every training call and every sample answers ``{"request_id": ...}`` at once;
``retrieve_future`` long-polls for the result (``{"type": "try_again"}`` after
``LONG_POLL_S``), and a sampling client may instead long-poll ``retrieve_futures`` for the
completions of its whole sampling session. ``forward_backward`` arrives as protobuf
(optionally zstd), and its result and a sample's leave as protobuf when the client
accepts it (the 0.38 client requires it), else as JSON.

Everything a request carries is checked before it is queued (a 4xx naming the field):
sizes against the client's own limits, types, names (``state.check_name``), token ids
and shapes (``engine.check_examples``).

Model names: a Tinker program asks for ``Qwen/Qwen3-8B``; ``TINKER_MODEL_NAMES`` maps the
names the service answers to to its catalogue models (any catalogue name works too).
For the tokenizer a program loads by that name, ``write_hf_cache`` lays out an offline
Hugging Face cache entry per name holding the served model's tokenizer (README, Tinker).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
import logging
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import catalogue, load_engine
from .catalogue import EngineError
from .inference_plane import DeploymentRuntime
from .state import ServiceState, check_name, now_rfc3339, read_json, state_ref
from .tinker_proto import (EncodedSequence, WireError, decode_forward_backward, decompress,
                           encode_forward_backward_output, encode_sample_response)
from .trainer_plane import LONG_POLL_S, RESULT_TTL_S, TrainerRuntime, lora_settings
from .wire import PROTOBUF, ApiError, encode_tensor, field, json_body, json_response, read_body, result_response

if TYPE_CHECKING:  # the engine and transformers: imported where a request first needs them
    from transformers import PreTrainedTokenizerBase

    from firetitan_track.blobs import Json

    from .control_plane import ControlPlane
    from .engine import ForwardResult, LoraSettings, Trainer
    from .trainer_plane import TrainerPlane, Work

log = logging.getLogger("runner.local.tinker")

# A protobuf forward_backward body as sent (tinker_proto bounds it again decompressed).
MAX_PROTO_BODY = 24 * 2**20
MAX_SAMPLES = 64                 # num_samples of one asample request
MAX_TOPK = 20                    # top-k logprobs per position
SAMPLER_REPLICAS = 4             # sampler weights kept loaded at once (least recently used go)
MAX_SESSIONS = 4096
MAX_SAMPLERS = 16384             # sampling sessions remembered (the oldest are forgotten first)

# The names a Tinker program uses for the models the service runs (Tinker's own names for
# them; cookbook recipes default to them). Any catalogue name is accepted as well.
TINKER_MODEL_NAMES = {
    "Qwen/Qwen3-8B": "accounts/fireworks/models/qwen3-8b",
    "Qwen/Qwen3-8B-Base": "accounts/fireworks/models/qwen3-8b",
    "Qwen/Qwen3-4B-Instruct-2507": "accounts/fireworks/models/qwen3-4b",
}

SESSION_RE = re.compile(r"^s[0-9a-f]{12}$")
RUN_RE = re.compile(r"^(s[0-9a-f]{12}):train:([0-9]{1,9})$")
SAMPLER_RE = re.compile(r"^(s[0-9a-f]{12}):sample:([0-9]{1,9})$")
TINKER_PATH_RE = re.compile(r"^tinker://([^/]+)/(weights|sampler_weights)/([^/]+)$")
KINDS = {"weights": "state", "sampler_weights": "sampler"}


def served_model(name: Json) -> tuple[str, catalogue.ModelCard]:
    """(catalogue name, card) for a model name a Tinker request carries; a 400 naming what is served."""
    if not isinstance(name, str) or not name:
        raise ApiError(400, "base_model must be a model name")
    target = TINKER_MODEL_NAMES.get(name, name)
    try:
        return target, catalogue.resolve(target)
    except catalogue.UnknownModel:
        names = sorted({n for n, t in TINKER_MODEL_NAMES.items() if t in catalogue.BASE_MODELS} | set(catalogue.BASE_MODELS))
        raise ApiError(400, f"base model {name!r} is not served here; the local service serves {', '.join(names)}") from None


def write_hf_cache(root: Path) -> Path:
    """An offline Hugging Face hub cache (``HF_HUB_CACHE``) with one entry per name in
    TINKER_MODEL_NAMES whose model is served, holding that model's tokenizer files, so
    ``AutoTokenizer.from_pretrained("Qwen/Qwen3-8B")`` under ``HF_HUB_OFFLINE=1`` loads
    the tokenizer the service's model uses. Rewritten at every start (a --model-dir
    checkpoint may have replaced a stand-in); a separate directory, so a user's own
    cache of the real model is never touched."""
    for name, target in TINKER_MODEL_NAMES.items():
        card = catalogue.BASE_MODELS.get(target)
        if card is None:
            continue
        source = Path(card.tokenizer_dir)
        files = sorted(p for p in source.iterdir() if p.is_file() and (p.name.startswith("tokenizer") or p.name in (
            "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt")))
        # AutoTokenizer reads the model's config too: the checkpoint's own, else the stand-in's.
        config = (source / "config.json").read_bytes() if (source / "config.json").is_file() else json.dumps(
            {"architectures": [card.architecture], "model_type": card.model_type, **card.config}, sort_keys=True).encode()
        contents = {path.name: path.read_bytes() for path in files} | {"config.json": config}
        digest = hashlib.sha1()
        for file_name, data in sorted(contents.items()):
            digest.update(file_name.encode())
            digest.update(data)
        revision = digest.hexdigest()
        repo = root / f"models--{name.replace('/', '--')}"
        snapshot = repo / "snapshots" / revision
        if not snapshot.is_dir():
            tmp = repo / "snapshots" / f".{revision}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for file_name, data in contents.items():
                (tmp / file_name).write_bytes(data)
            tmp.rename(snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    return root


# -- ids and paths -----------------------------------------------------------------------

def job_for_run(run_id: str) -> str:
    """The trainer job of a Tinker run id (``<session>:train:<n>``), or the run id itself
    when it names a job directly (a FireTitan SDK job)."""
    match = RUN_RE.match(run_id)
    return f"{match.group(1)}-train-{match.group(2)}" if match else run_id


def run_for_job(job: dict) -> str:
    return (job.get("_tinker") or {}).get("model_id") or job["name"].rsplit("/", 1)[-1]


def tinker_path(run_id: str, kind: str, name: str) -> str:
    return f"tinker://{run_id}/{'weights' if kind == 'state' else 'sampler_weights'}/{name}"


@dataclass
class _Session:
    session_id: str
    created: float
    user_metadata: dict
    display_name: str | None
    project_id: str | None
    status: dict = dc_field(default_factory=lambda: {"type": "active"})
    runs: list[str] = dc_field(default_factory=list)
    samplers: list[str] = dc_field(default_factory=list)


@dataclass
class _Sampler:
    """A sampling session: a base model's weights, or a saved snapshot's."""

    sampler_id: str
    session_id: str
    base_model: str                 # catalogue name
    model_name: str                 # the name the client knows it by
    model_path: str | None          # tinker://.../sampler_weights/...
    snapshot: str | None            # the snapshot's directory
    clients: int = 0                # join_sampling_session hands out 1, 2, ...
    seq_requests: dict[int, str] = dc_field(default_factory=dict)
    # retrieve_futures: per clone id, completions after a cursor, and a condition to wait on
    cursor: int = 0
    events: dict[int, list[tuple[int, dict]]] = dc_field(default_factory=lambda: collections.defaultdict(list))
    changed: asyncio.Condition = dc_field(default_factory=asyncio.Condition)


@dataclass
class _Replica:
    runtime: DeploymentRuntime
    users: int = 0
    last_used: float = 0.0


@dataclass
class _SampleFuture:
    future: asyncio.Future
    created: float


class TinkerPlane:
    """Tinker sessions, training runs, sampling sessions and futures over the shared engine."""

    def __init__(self, state: ServiceState, trainers: "TrainerPlane", control: "ControlPlane", device: str):
        self.state = state
        self.trainers = trainers
        self.control = control
        self.device = device
        self.sessions: dict[str, _Session] = {}
        self.samplers: dict[str, _Sampler] = {}
        self.replicas: dict[tuple[str, str | None], _Replica] = {}
        self._replica_lock = asyncio.Lock()
        self._replica_ids = itertools.count(1)
        self._trainer_requests: dict[str, tuple[TrainerRuntime, float]] = {}
        self._samples: dict[str, _SampleFuture] = {}
        self._request_counter = itertools.count(1)
        self._last_request: dict[str, str] = {}  # job id -> when a Tinker request last reached it (RFC 3339)

    # -- sessions -------------------------------------------------------------------------

    def _session(self, session_id: Json) -> _Session:
        session = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None:
            raise ApiError(404, f"unknown session {session_id!r} (sessions last as long as the service; "
                                "create a new ServiceClient)")
        if session.status["type"] != "active":
            raise ApiError(410, f"session {session_id} has finished")
        return session

    async def healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def client_config(self, request: Request) -> Response:
        await json_body(request, required=False)
        return json_response({
            "pjwt_auth_enabled": False,
            "parallel_fwdbwd_chunks": True,
            # Loopback: compressing costs the client more than it saves; zstd bodies are
            # still accepted (an older client config, or a client that compresses anyway).
            "proto_compress_fwdbwd": False,
            "fwdbwd_max_chunk_len": 1024,
            "fwdbwd_max_chunk_bytes_count": 5_000_000,
            "sample_use_retrieve_futures": True,
            "sample_join_sampling_session": True,
            "custom_loss_server_side": False,
        })

    async def client_dynamic_config(self, request: Request) -> Response:
        await json_body(request, required=False)
        return json_response({"refresh_interval_sec": 300, "sample_cancel_enabled": False})

    async def create_session(self, request: Request) -> Response:
        body = await json_body(request)
        metadata = _metadata(body) or {}
        display_name = field(body, "display_name", str, required=False)
        project_id = field(body, "project_id", str, required=False)
        field(body, "tags", list, required=False)
        if len(self.sessions) >= MAX_SESSIONS:  # forget the oldest finished ones first
            for old in sorted(self.sessions.values(), key=lambda s: (s.status["type"] == "active", s.created)):
                if len(self.sessions) < MAX_SESSIONS:
                    break
                if old.status["type"] != "active":
                    del self.sessions[old.session_id]
            if len(self.sessions) >= MAX_SESSIONS:
                raise ApiError(429, f"{MAX_SESSIONS} sessions are active on the local service; finish some "
                                    "(ServiceClient.close) first")
        session_id = f"s{uuid.uuid4().hex[:12]}"
        self.sessions[session_id] = _Session(session_id, time.time(), metadata, display_name, project_id)
        return json_response({"type": "create_session", "session_id": session_id})

    async def session_heartbeat(self, request: Request) -> Response:
        body = await json_body(request)
        self._session(field(body, "session_id", str))
        return json_response({"type": "session_heartbeat"})

    async def finish_session(self, request: Request) -> Response:
        """The client is done: its trainers stop (their states and snapshots stay)."""
        session = self._session(request.path_params["session"])
        body = await json_body(request, required=False)
        reason = body.get("reason") if isinstance(body.get("reason"), dict) else {"type": "success"}
        session.status = {"type": "client_finished", "reason": {"type": str(reason.get("type", "success"))},
                          "detail": body.get("detail") if isinstance(body.get("detail"), str) else None}
        for run_id in session.runs:
            job_id = job_for_run(run_id)
            self.trainers.stop(job_id)
            job = self.state.jobs.get(job_id)
            if job is not None and job.get("state") == "JOB_STATE_RUNNING":
                job.update(state="JOB_STATE_COMPLETED", updateTime=now_rfc3339(),
                           status={"code": "OK", "message": "The Tinker session finished; checkpoints are kept."})
                self.state.jobs.put(job_id, job)
        for sampler_id in session.samplers:
            self.samplers.pop(sampler_id, None)
        return Response(status_code=200)

    async def get_session(self, request: Request) -> Response:
        session = self.sessions.get(request.path_params["session"])
        if session is None:
            raise ApiError(404, f"unknown session {request.path_params['session']!r}")
        return json_response({"training_run_ids": session.runs, "sampler_ids": session.samplers,
                              "user_metadata": session.user_metadata, "display_name": session.display_name})

    async def list_sessions(self, request: Request) -> Response:
        return json_response({"sessions": sorted(self.sessions, key=lambda s: -self.sessions[s].created)})

    async def telemetry(self, request: Request) -> Response:
        await json_body(request, required=False)  # accepted and dropped: the service keeps no client telemetry
        return json_response({"status": "accepted"})

    async def server_capabilities(self, request: Request) -> Response:
        names = {**{name: name for name in catalogue.BASE_MODELS},
                 **{n: t for n, t in TINKER_MODEL_NAMES.items() if t in catalogue.BASE_MODELS}}
        return json_response({"supported_models": [
            {"model_name": name, "max_context_length": catalogue.BASE_MODELS[target].max_context_length,
             "trainable": True, "sampleable": True} for name, target in sorted(names.items())]})

    # -- training runs --------------------------------------------------------------------

    def _runtime(self, model_id: Json) -> TrainerRuntime:
        if not isinstance(model_id, str) or not model_id:
            raise ApiError(400, "missing model_id")
        runtime = self.trainers.runtimes.get(job_for_run(model_id))
        if runtime is None or not runtime.has_model(model_id):
            raise ApiError(404, f"unknown model_id {model_id!r}: no running training run has it (the service may have "
                                "restarted, or its session finished)")
        return runtime

    def _new_run(self, session: _Session, model_seq_id: Json, base_model: str, model_name: str,
                 lora: LoraSettings | None, user_metadata: dict | None) -> tuple[str, TrainerRuntime]:
        if isinstance(model_seq_id, bool) or not isinstance(model_seq_id, int) or not 0 <= model_seq_id < 10**9:
            raise ApiError(400, "model_seq_id must be a non-negative integer")
        model_id = f"{session.session_id}:train:{model_seq_id}"
        job_id = job_for_run(model_id)
        private = {"tinker": {"model_id": model_id, "session_id": session.session_id, "base_model": model_name,
                              "user_metadata": user_metadata or {}}}
        self.control.start_job(job_id, base_model, lora_rank=lora.rank if lora else 0,
                               display_name=session.display_name or model_id, private=private)
        runtime = self.trainers.runtimes[job_id]
        runtime.lora = lora  # before the engine is built, so it is built with these adapters
        runtime.add_model(model_id)
        session.runs.append(model_id)
        return model_id, runtime

    @staticmethod
    def _lora(config: Json, job_id: str) -> LoraSettings | None:
        if config is None:
            return None
        if not isinstance(config, dict):
            raise ApiError(400, "lora_config must be an object")
        rank = config.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= catalogue.MAX_LORA_RANK:
            raise ApiError(400, f"lora_config.rank must be an integer in [1, {catalogue.MAX_LORA_RANK}] (got {rank!r})")
        unknown = set(config) - {"rank", "seed", "train_attn", "train_mlp", "train_unembed", "alpha"}
        if unknown:
            raise ApiError(400, f"unknown lora_config fields {sorted(unknown)}")
        try:
            return lora_settings(config, rank, job_id)
        except EngineError as exc:
            raise ApiError(400, str(exc)) from None

    @staticmethod
    def _check_optimizer(config: Json) -> None:
        if config is None:
            return
        if not isinstance(config, dict) or config.get("type", "adamw") != "adamw":
            kind = config.get("type") if isinstance(config, dict) else config
            raise ApiError(400, f"optimizer {kind!r} is not available locally: the local trainer runs AdamW")

    def _track(self, runtime: TrainerRuntime, request_id: str) -> None:
        now = time.monotonic()
        self._trainer_requests[request_id] = (runtime, now)
        if len(self._trainer_requests) > 4096:
            for old, (_, at) in list(self._trainer_requests.items()):
                if now - at > RESULT_TTL_S:
                    del self._trainer_requests[old]

    def _future(self, runtime: TrainerRuntime, op: str, work: Work, model_id: str, *,
                sequenced: int | None = None) -> Response:
        """Queue ``work``: in seq_id order when ``sequenced`` is the request's seq_id, else at once."""
        request_id = runtime.submit(op, work, model_id=model_id if sequenced is not None else None, seq_id=sequenced)
        self._track(runtime, request_id)
        self._last_request[runtime.spec.job_id] = now_rfc3339()
        return json_response({"request_id": request_id, "model_id": model_id})

    async def _sequenced(self, body: dict, op: str, build: Callable[[TrainerRuntime, dict], Work]) -> Response:
        """Check now (a 4xx, which still uses up the request's seq_id), queue in seq_id order."""
        model_id, seq_id = body.get("model_id"), body.get("seq_id")
        runtime = self._runtime(model_id)
        if isinstance(seq_id, bool) or not isinstance(seq_id, int):
            raise ApiError(400, "seq_id must be an integer")
        try:
            work = build(runtime, body)
        except (ApiError, EngineError) as exc:
            runtime.skip_seq(model_id, seq_id)
            if isinstance(exc, EngineError):
                raise ApiError(400, f"{op}: {exc}") from None
            raise
        return self._future(runtime, op, work, model_id, sequenced=seq_id)

    async def create_model(self, request: Request) -> Response:
        body = await json_body(request)
        session = self._session(body.get("session_id"))
        base_model, card = served_model(body.get("base_model"))
        self._check_optimizer(body.get("optimizer_config"))
        metadata = _metadata(body)
        model_seq_id = body.get("model_seq_id")
        lora = self._lora(body.get("lora_config"), job_for_run(f"{session.session_id}:train:{model_seq_id}"))
        model_id, runtime = self._new_run(session, model_seq_id, base_model, body["base_model"], lora, metadata)

        def work(trainer: Trainer) -> dict:  # the engine is built (first use) before this runs
            return {"type": "create_model", "model_id": model_id}
        return self._future(runtime, "create_model", work, model_id)

    async def get_info(self, request: Request) -> Response:
        body = await json_body(request)
        model_id = field(body, "model_id", str)
        runtime = self._runtime(model_id)
        job = self.state.jobs.get(runtime.spec.job_id) or {}
        card = catalogue.resolve(runtime.spec.base_model)
        name = (job.get("_tinker") or {}).get("base_model") or runtime.spec.base_model
        rank = runtime.spec.lora_rank
        return json_response({
            "type": "get_info", "model_id": model_id, "model_name": name, "is_lora": rank > 0,
            "lora_rank": rank or None,
            # the served model's own tokenizer: a directory the client loads offline
            "model_data": {"arch": card.architecture,
                           "model_name": name, "tokenizer_id": card.tokenizer_dir},
        })

    async def unload_model(self, request: Request) -> Response:
        body = await json_body(request)
        model_id = field(body, "model_id", str)
        runtime = self._runtime(model_id)
        runtime.drop_model(model_id)
        return self._future(runtime, "unload_model",
                            lambda trainer: {"type": "unload_model", "model_id": model_id})

    # forward / forward_backward ---------------------------------------------------------

    def _examples(self, runtime: TrainerRuntime, data: list, loss_fn: str) -> list:
        import torch

        engine = load_engine()
        examples = []
        for datum in data:
            inputs = {name: torch.from_numpy(np.array(value, dtype=np.int64 if name == "target_tokens" else np.float32))
                      for name, value in datum.inputs.items()}
            examples.append(engine.Datum(tokens=datum.tokens, inputs=inputs))
        engine.check_examples(examples, loss_fn, runtime.vocab_size, runtime.max_context)
        return examples

    @staticmethod
    def _loss_config(config: dict) -> dict:
        for key, value in config.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ApiError(400, f"loss_fn_config[{key!r}] = {value!r}: the local trainer's losses take numbers")
        return config

    async def forward_backward(self, request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        if PROTOBUF in content_type:
            raw = await read_body(request, MAX_PROTO_BODY)  # JSON bodies: json_body, the service's limit
            try:
                decoded = decode_forward_backward(decompress(raw, request.headers.get("content-encoding")))
            except WireError as exc:
                raise ApiError(400, f"forward_backward: {exc}") from None
            body = {"model_id": decoded.model_id, "seq_id": decoded.seq_id}
            forward_only, loss_fn, config, data = (decoded.forward_only, decoded.loss_fn, decoded.loss_fn_config,
                                                   decoded.data)
        else:
            raise ApiError(415, f"forward_backward takes {PROTOBUF} bodies (tinker_public.ForwardBackwardRequest), "
                                f"got {content_type or 'no Content-Type'}")
        op = "forward" if forward_only else "forward_backward"

        def build(runtime: TrainerRuntime, body: dict) -> Work:
            examples = self._examples(runtime, data, loss_fn)
            checked = self._loss_config(config)
            if forward_only:
                return lambda trainer: _fb_payload(trainer.forward(examples, loss_fn, checked))
            return lambda trainer: _fb_payload(trainer.forward_backward(examples, loss_fn, checked))
        return await self._sequenced(body, op, build)

    async def optim_step(self, request: Request) -> Response:
        body = await json_body(request)

        def build(runtime: TrainerRuntime, body: dict) -> Work:
            if body.get("optimizer_params") is not None:
                raise ApiError(400, "optimizer_params (a non-Adam optimizer step) is not available locally: "
                                    "the local trainer runs AdamW (send adam_params)")
            params = load_engine().adam_hyperparams(field(body, "adam_params", dict))

            def work(trainer: Trainer) -> dict:
                metrics = trainer.optim_step(params)
                return {"type": "optim_step", "metrics": {key: float(value) for key, value in metrics.items()}}
            return work
        return await self._sequenced(body, "optim_step", build)

    # states and snapshots ---------------------------------------------------------------

    def _saved(self, path: Json, family: str) -> tuple[dict, str, dict]:
        """(checkpoint row, its job id, the job record) named by a tinker:// path."""
        if not isinstance(path, str):
            raise ApiError(400, "path must be a tinker:// path")
        match = TINKER_PATH_RE.match(path.strip())
        if not match:
            raise ApiError(400, f"path {path!r} is not a tinker://<run>/weights/<name> or "
                                "tinker://<run>/sampler_weights/<name> path")
        run_id, segment, name = match.groups()
        if KINDS[segment] != family:
            want = "weights" if family == "state" else "sampler_weights"
            raise ApiError(400, f"path {path!r} names {'a training state' if segment == 'weights' else 'sampler weights'};"
                                f" this call takes tinker://<run>/{want}/<name>")
        job_id = job_for_run(run_id)
        job = self.state.jobs.get(job_id) if re.match(r"^[a-z0-9-]{1,63}$", job_id) else None
        row = self.state.checkpoints.find(job_id, name, family) if job is not None else None
        if row is None:
            raise ApiError(404, f"no {'training state' if family == 'state' else 'sampler weights'} {name!r} in "
                                f"training run {run_id!r}")
        return row, job_id, job

    def _save_state_work(self, runtime: TrainerRuntime, model_id: str, name: str, metadata: dict | None) -> Work:
        job_id, state = runtime.spec.job_id, self.state

        def work(trainer: Trainer) -> dict:
            path = trainer.save_state(name)
            state.checkpoints.add(job_id, {
                "id": name, "family": "state", "kind": "state", "path": str(path), "ref": state_ref(job_id, name),
                "tinker_path": tinker_path(model_id, "state", name), "createTime": now_rfc3339(),
                "step": trainer.step, "loraRank": trainer.lora_rank, "userMetadata": metadata or None})
            return {"type": "save_weights", "path": tinker_path(model_id, "state", name)}
        return work

    async def save_weights(self, request: Request) -> Response:
        body = await json_body(request)

        def build(runtime: TrainerRuntime, body: dict) -> Work:
            name = check_name(field(body, "path", str), "checkpoint")
            metadata = _metadata(body)
            return self._save_state_work(runtime, body["model_id"], name, metadata)
        return await self._sequenced(body, "save_weights", build)

    def _snapshot_work(self, runtime: TrainerRuntime, model_id: str, name: str, metadata: dict | None,
                       then: Callable[[dict], dict]) -> Work:
        job_id, state = runtime.spec.job_id, self.state

        def work(trainer: Trainer) -> dict:
            saved = trainer.save_sampler_snapshot(name, "base")  # LoRA: the adapter alone
            row = {"id": name, "family": "sampler", "kind": saved["kind"], "path": saved["path"],
                   "base_path": saved.get("base_path"), "tinker_path": tinker_path(model_id, "sampler", name),
                   "createTime": now_rfc3339(), "step": trainer.step, "loraRank": trainer.lora_rank,
                   "userMetadata": metadata or None}
            state.checkpoints.add(job_id, row)
            return then(row)
        return work

    async def save_weights_for_sampler(self, request: Request) -> Response:
        body = await json_body(request)

        def build(runtime: TrainerRuntime, body: dict) -> Work:
            model_id = body["model_id"]
            metadata = _metadata(body)
            kind = field(body, "kind", str, required=False, default="snapshot")
            if kind not in ("snapshot", "inflight"):
                raise ApiError(400, f"kind must be snapshot or inflight (got {kind!r})")
            if body.get("path") is not None:
                name = check_name(field(body, "path", str), "sampler weights")
                return self._snapshot_work(runtime, model_id, name, metadata, lambda row: {
                    "type": "save_weights_for_sampler", "path": row["tinker_path"]})
            # save_weights_and_get_sampling_client: a snapshot the new sampling session serves
            # (inflight clients get one too: fixed weights no older than asked for).
            seq = body.get("sampling_session_seq_id")
            if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 10**9:
                raise ApiError(400, "save_weights_for_sampler needs a path or a sampling_session_seq_id")
            match = RUN_RE.match(model_id)
            session = self._session(match.group(1) if match else None)
            sampler_id = f"{session.session_id}:sample:{seq}"
            if sampler_id in self.samplers:
                raise ApiError(409, f"sampling session {sampler_id} already exists")
            name = f"sampler-{seq}-{uuid.uuid4().hex[:8]}"
            job = self.state.jobs.get(runtime.spec.job_id) or {}
            model_name = (job.get("_tinker") or {}).get("base_model") or runtime.spec.base_model
            loop = asyncio.get_running_loop()

            def register(row: dict) -> dict:
                sampler = _Sampler(sampler_id, session.session_id, runtime.spec.base_model, model_name,
                                   row["tinker_path"], row["path"])
                loop.call_soon_threadsafe(self._add_sampler, session, sampler)
                return {"type": "save_weights_for_sampler", "sampling_session_id": sampler_id}
            return self._snapshot_work(runtime, model_id, name, metadata, register)
        return await self._sequenced(body, "save_weights_for_sampler", build)

    def _add_sampler(self, session: _Session, sampler: _Sampler) -> None:
        self.samplers[sampler.sampler_id] = sampler
        session.samplers.append(sampler.sampler_id)
        while len(self.samplers) > MAX_SAMPLERS:  # an RL loop makes one per step: the oldest go
            self.samplers.pop(next(iter(self.samplers)))

    async def load_weights(self, request: Request) -> Response:
        body = await json_body(request)
        row, _, _ = self._saved(body.get("path"), "state")
        optimizer = field(body, "optimizer", bool, required=False, default=False)
        path = row["path"]
        if body.get("session_id") is None:  # onto an existing model, in its request order
            def build(runtime: TrainerRuntime, body: dict) -> Work:
                def work(trainer: Trainer) -> dict:
                    trainer.load_state(path, with_optimizer=optimizer)
                    return {"type": "load_weights", "path": body["path"], "model_id": body["model_id"]}
                return work
            return await self._sequenced(body, "load_weights", build)
        # A new training run made by loading a state: its adapters and base come from the state.
        session = self._session(body["session_id"])
        self._check_optimizer(body.get("optimizer_config"))
        if optimizer and body.get("optimizer_config") is not None:
            raise ApiError(400, "optimizer_config cannot be combined with optimizer=true (the state's optimizer is restored)")
        meta = read_json(Path(path) / "meta.json") or {}
        base_model = meta.get("base_model")
        if not isinstance(base_model, str) or base_model not in catalogue.BASE_MODELS:
            raise ApiError(400, f"state {body['path']} is for {base_model!r}, which this service does not serve")
        model_name = base_model
        source_job = self.state.jobs.get(job_for_run(TINKER_PATH_RE.match(body["path"].strip()).group(1))) or {}
        model_name = (source_job.get("_tinker") or {}).get("base_model") or model_name
        if body.get("base_model") is not None:
            override, _ = served_model(body["base_model"])
            if override != base_model:
                raise ApiError(400, f"base_model {body['base_model']!r} is not compatible with the state's base model "
                                    f"{model_name!r}")
            model_name = body["base_model"]
        lora = None
        if int(meta.get("lora_rank") or 0):
            lora_meta = {k: v for k, v in (meta.get("lora") or {}).items()
                         if k in ("rank", "alpha", "seed", "train_attn", "train_mlp", "train_unembed")}
            lora = self._lora({**lora_meta, "rank": int(meta["lora_rank"])}, "load")
        metadata = _metadata(body)
        model_id, runtime = self._new_run(session, body.get("model_seq_id"), base_model, model_name, lora, metadata)

        def work(trainer: Trainer) -> dict:
            trainer.load_state(path, with_optimizer=optimizer)
            return {"type": "load_weights", "path": body["path"], "model_id": model_id}
        return self._future(runtime, "load_weights", work, model_id)

    async def weights_info(self, request: Request) -> Response:
        body = await json_body(request)
        row, job_id, job = self._saved(body.get("tinker_path"), "state")
        meta = read_json(Path(row["path"]) / "meta.json") or {}
        lora = meta.get("lora") or {}
        rank = int(meta.get("lora_rank") or 0)
        name = (job.get("_tinker") or {}).get("base_model") or meta.get("base_model")
        return json_response({"base_model": name, "is_lora": rank > 0, "lora_rank": rank or None,
                              "train_unembed": lora.get("train_unembed"), "train_mlp": lora.get("train_mlp"),
                              "train_attn": lora.get("train_attn")})

    # -- futures --------------------------------------------------------------------------

    async def retrieve_future(self, request: Request) -> Response:
        body = await json_body(request)
        request_id = field(body, "request_id", str)
        if request_id in self._samples:
            entry = self._samples[request_id]
            try:
                await asyncio.wait_for(asyncio.shield(entry.future), LONG_POLL_S)
            except asyncio.TimeoutError:
                return json_response({"type": "try_again", "request_id": request_id, "queue_state": "active"})
            payload = entry.future.result()
        else:
            tracked = self._trainer_requests.get(request_id)
            if tracked is None:
                raise ApiError(404, f"unknown request_id {request_id!r} (results are kept {RESULT_TTL_S:.0f}s; the "
                                    "service may have restarted)")
            payload = await tracked[0].wait(request_id, LONG_POLL_S)
            if payload is None:
                return json_response({"type": "try_again", "request_id": request_id, "queue_state": "active"})
        if "error" in payload:
            return json_response({"error": payload["error"], "category": payload.get("category", "unknown")})
        return result_response(payload, request)

    async def retrieve_futures(self, request: Request) -> Response:
        """A sampling session's completions after ``prev_cursor`` (long-polled), for one clone."""
        body = await json_body(request)
        target = field(body, "target", dict)
        sampler = self._sampler(target.get("sampling_session_id"))
        clone = target.get("cloned_sampler_id", 0)
        prev = body.get("prev_cursor", 0)
        timeout = body.get("timeout")
        for name, value in (("cloned_sampler_id", clone), ("prev_cursor", prev)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ApiError(400, f"{name} must be a non-negative integer")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
            raise ApiError(400, "timeout must be a non-negative number of seconds")
        for request_id in field(body, "retrieved_request_ids", list, required=False, default=[]):
            if isinstance(request_id, str):
                self._samples.pop(request_id, None)  # fully retrieved: its payload can go
        events = sampler.events[clone]
        events[:] = [(cursor, event) for cursor, event in events if cursor > prev]
        wait = LONG_POLL_S if timeout is None else min(float(timeout), LONG_POLL_S)
        if not events and wait > 0:
            async with sampler.changed:
                try:
                    await asyncio.wait_for(sampler.changed.wait_for(lambda: bool(events)), wait)
                except asyncio.TimeoutError:
                    pass
        cursor = max([prev] + [c for c, _ in events])
        return json_response({"completions": [event for _, event in events], "cursor": cursor})

    async def cancel_future(self, request: Request) -> Response:
        await json_body(request)  # nothing to cancel early: a local sample finishes in its batch
        return Response(status_code=200)

    # -- sampling -------------------------------------------------------------------------

    def _sampler(self, sampler_id: Json) -> _Sampler:
        sampler = self.samplers.get(sampler_id) if isinstance(sampler_id, str) else None
        if sampler is None:
            raise ApiError(404, f"unknown sampling session {sampler_id!r} (the service may have restarted, or its "
                                "session finished)")
        return sampler

    def _new_sampler(self, sampler_id: str, session_id: str, model_path: Json, base_model: Json) -> _Sampler:
        if model_path is not None:
            row, _, job = self._saved(model_path, "sampler")
            served = job["trainingConfig"]["baseModel"]
            name = (job.get("_tinker") or {}).get("base_model") or served
            if base_model is not None and served_model(base_model)[0] != served:
                raise ApiError(400, f"base_model {base_model!r} does not match {model_path}'s base model {name!r}")
            return _Sampler(sampler_id, session_id, served, name, model_path.strip(), row["path"])
        if base_model is None:
            raise ApiError(400, "a sampling session needs a model_path or a base_model")
        served, _ = served_model(base_model)
        return _Sampler(sampler_id, session_id, served, base_model, None, None)

    async def create_sampling_session(self, request: Request) -> Response:
        body = await json_body(request)
        session = self._session(body.get("session_id"))
        seq = body.get("sampling_session_seq_id")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 10**9:
            raise ApiError(400, "sampling_session_seq_id must be a non-negative integer")
        sampler_id = f"{session.session_id}:sample:{seq}"
        if sampler_id in self.samplers:
            return json_response({"type": "create_sampling_session", "sampling_session_id": sampler_id})
        self._add_sampler(session, self._new_sampler(sampler_id, session.session_id, body.get("model_path"),
                                                     body.get("base_model")))
        return json_response({"type": "create_sampling_session", "sampling_session_id": sampler_id})

    async def join_sampling_session(self, request: Request) -> Response:
        body = await json_body(request)
        sampler = self._sampler(body.get("sampling_session_id"))
        sampler.clients += 1
        return json_response({"type": "join_sampling_session", "client_counter": sampler.clients})

    async def get_sampler(self, request: Request) -> Response:
        sampler = self._sampler(request.path_params["sampler"])
        return json_response({"sampler_id": sampler.sampler_id, "base_model": sampler.model_name,
                              "model_path": sampler.model_path})

    async def _replica(self, sampler: _Sampler) -> _Replica:
        """A deployment replica serving the sampler's weights (kept loaded, least recently used go)."""
        key = (sampler.base_model, sampler.snapshot)
        async with self._replica_lock:
            replica = self.replicas.get(key)
            if replica is None:
                runtime = DeploymentRuntime(f"tinker-sampler-{next(self._replica_ids)}", sampler.base_model,
                                            self.device)
                replica = self.replicas[key] = _Replica(runtime)
                if sampler.snapshot is not None:
                    try:
                        await runtime.hot_load(sampler.model_path or sampler.snapshot, sampler.snapshot)
                    except Exception as exc:
                        del self.replicas[key]
                        await runtime.stop()
                        raise ApiError(400, f"loading {sampler.model_path}: {type(exc).__name__}: {exc}") from None
                idle = sorted((r.last_used, k) for k, r in self.replicas.items() if r.users == 0 and k != key)
                for _, old in idle[: max(0, len(self.replicas) - SAMPLER_REPLICAS)]:
                    await self.replicas.pop(old).runtime.stop()
            replica.users += 1
            replica.last_used = time.monotonic()
            return replica

    def _gen_requests(self, body: dict, card: catalogue.ModelCard, prompt: list[int], num_samples: int) -> list:
        params = field(body, "sampling_params", dict)
        unknown = set(params) - {"max_tokens", "seed", "stop", "temperature", "top_k", "top_p"}
        if unknown:
            raise ApiError(400, f"unknown sampling_params {sorted(unknown)}")
        max_tokens = params.get("max_tokens")
        room = card.max_context_length - len(prompt)
        if max_tokens is None:
            max_tokens = room
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ApiError(400, "sampling_params.max_tokens must be a non-negative integer")
        if room < 1:
            raise ApiError(400, f"prompt is {len(prompt)} tokens; the model's context length is "
                                f"{card.max_context_length}, leaving no room to generate")
        temperature = params.get("temperature", 1.0)
        top_p = params.get("top_p", 1.0)
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ApiError(400, f"sampling_params.{name} must be a non-negative number")
        if not 0 < top_p <= 1:
            raise ApiError(400, "sampling_params.top_p must be in (0, 1]")
        top_k = params.get("top_k", -1)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
            raise ApiError(400, "sampling_params.top_k must be an integer >= 1, or -1 (no limit)")
        seed = params.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ApiError(400, "sampling_params.seed must be an integer")
        stop = params.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif isinstance(stop, list) and not stop:
            raise ApiError(400, "sampling_params.stop=[] (generating past the end-of-sequence token) is not "
                                "supported locally; leave stop unset to stop at it")
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            pass
        elif isinstance(stop, list) and all(type(s) is int for s in stop):
            vocab = int(card.config["vocab_size"])
            if any(not 0 <= s < vocab for s in stop):
                raise ApiError(400, f"sampling_params.stop token ids must be in 0..{vocab - 1}")
            # Stop tokens are matched as their text (the sampler matches stops on text, with
            # special tokens spelled out); end-of-sequence tokens stop it anyway.
            tokenizer = self._tokenizer(card)
            stop = [tokenizer.decode([s], skip_special_tokens=False) for s in stop if s not in card.eos_token_ids]
        else:
            raise ApiError(400, "sampling_params.stop must be a string, a list of strings or a list of token ids")
        gen = load_engine().GenRequest
        return [gen(prompt_ids=list(prompt), max_tokens=min(max_tokens, room), temperature=float(temperature),
                    top_p=float(top_p), top_k=max(top_k, 0),
                    seed=None if seed is None else (seed + i) % 2**63, stop=list(stop)) for i in range(num_samples)]

    _tokenizers: dict[str, PreTrainedTokenizerBase] = {}

    def _tokenizer(self, card: catalogue.ModelCard) -> PreTrainedTokenizerBase:
        if card.tokenizer_dir not in self._tokenizers:
            from transformers import AutoTokenizer
            self._tokenizers[card.tokenizer_dir] = AutoTokenizer.from_pretrained(card.tokenizer_dir)
        return self._tokenizers[card.tokenizer_dir]

    @staticmethod
    def _prompt(body: dict, vocab: int) -> list[int]:
        prompt = field(body, "prompt", dict)
        chunks = prompt.get("chunks")
        if not isinstance(chunks, list) or not chunks:
            raise ApiError(400, "prompt.chunks must be a non-empty list")
        tokens: list[int] = []
        for index, chunk in enumerate(chunks):
            if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
                kind = chunk.get("type") if isinstance(chunk, dict) else type(chunk).__name__
                raise ApiError(400, f"prompt.chunks[{index}]: only encoded_text chunks are supported locally (got {kind!r})")
            chunk_tokens = chunk.get("tokens")
            if not isinstance(chunk_tokens, list) or any(type(t) is not int or not 0 <= t < vocab for t in chunk_tokens):
                raise ApiError(400, f"prompt.chunks[{index}].tokens must be token ids in 0..{vocab - 1}")
            tokens.extend(chunk_tokens)
        if not tokens:
            raise ApiError(400, "prompt is empty")
        return tokens

    async def asample(self, request: Request) -> Response:
        body = await json_body(request)
        sampler_id = body.get("sampling_session_id")
        if sampler_id is None:  # a stateless sample (older clients): a sampler made for it
            sampler = self._new_sampler(f"adhoc-{uuid.uuid4().hex[:8]}", "", body.get("model_path"),
                                        body.get("base_model"))
            seq_id = None
        else:
            sampler = self._sampler(sampler_id)
            seq_id = body.get("seq_id")
            if isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < 0:
                raise ApiError(400, "seq_id must be a non-negative integer")
            if seq_id in sampler.seq_requests:  # a retry of a request already taken
                request_id = sampler.seq_requests[seq_id]
                return json_response({"request_id": request_id,
                                      "sample_sequence_ids": [f"{request_id}.{i}" for i in
                                                              range(_num_samples(body))]})
        card = catalogue.resolve(sampler.base_model)
        num_samples = _num_samples(body)
        prompt = self._prompt(body, int(card.config["vocab_size"]))
        gen_requests = self._gen_requests(body, card, prompt, num_samples)
        want_prompt = field(body, "prompt_logprobs", bool, required=False, default=False)
        prompt_k, sample_k = (_topk_arg(body, "topk_prompt_logprobs"), _topk_arg(body, "topk_sample_logprobs"))
        if prompt_k and not want_prompt:
            raise ApiError(400, "topk_prompt_logprobs needs prompt_logprobs=true")
        last_n = body.get("prompt_logprobs_last_n")
        if last_n is not None and (isinstance(last_n, bool) or not isinstance(last_n, int) or
                                   not 1 <= last_n <= len(prompt) - 1 or not want_prompt):
            raise ApiError(400, "prompt_logprobs_last_n must be in [1, len(prompt) - 1] and needs prompt_logprobs=true")
        for unsupported, empty in (("target_prompt_logprobs", None), ("prompt_alt_tokens_k", 0)):
            if body.get(unsupported) not in (None, empty):
                raise ApiError(400, f"{unsupported} is not supported by the local sampler")
        request_id = f"sample-{next(self._request_counter)}-{uuid.uuid4().hex[:6]}"
        if seq_id is not None:
            sampler.seq_requests[seq_id] = request_id
            if len(sampler.seq_requests) > 4096:
                for old in sorted(sampler.seq_requests)[:2048]:
                    del sampler.seq_requests[old]
        future = asyncio.get_running_loop().create_future()
        self._samples[request_id] = _SampleFuture(future, time.monotonic())
        self._prune_samples()
        clone = (seq_id or 0) // 1_000_000_000
        asyncio.get_running_loop().create_task(self._run_sample(
            sampler, request_id, clone, gen_requests, prompt, want_prompt, last_n, prompt_k, sample_k, future))
        return json_response({"request_id": request_id,
                              "sample_sequence_ids": [f"{request_id}.{i}" for i in range(num_samples)]})

    def _prune_samples(self) -> None:
        if len(self._samples) <= 4096:
            return
        cutoff = time.monotonic() - RESULT_TTL_S
        for request_id, entry in list(self._samples.items()):
            if entry.future.done() and entry.created < cutoff:
                del self._samples[request_id]

    async def _run_sample(self, sampler: _Sampler, request_id: str, clone: int, gen_requests: list, prompt: list[int],
                          want_prompt: bool, last_n: int | None, prompt_k: int, sample_k: int,
                          future: asyncio.Future) -> None:
        payload: dict
        try:
            replica = await self._replica(sampler)
            try:
                outcomes = await asyncio.gather(*(replica.runtime.generate(g) for g in gen_requests))
                results = [result for result, _ in outcomes]
                prompt_scores = None
                if want_prompt:
                    prompt_scores = await replica.runtime.call(lambda s: s.score(prompt, prompt_k))
                sample_tops: list = [None] * len(results)
                if sample_k:
                    for i, result in enumerate(results):
                        _, top = await replica.runtime.call(lambda s, r=result: s.score(prompt + list(r.token_ids),
                                                                                        sample_k))
                        sample_tops[i] = top[len(prompt) - 1:]
            finally:
                replica.users -= 1
                replica.last_used = time.monotonic()
            payload = _sample_payload(results, sample_tops, prompt_scores, len(prompt), last_n, prompt_k, sample_k)
        except ApiError as exc:
            payload = {"error": exc.message, "category": "user"}
        except (EngineError, ValueError) as exc:
            payload = {"error": f"sample: {exc}", "category": "user"}
        except Exception as exc:  # never lose a future: report and carry on
            log.exception("sample %s failed", request_id)
            payload = {"error": f"sample: internal error: {type(exc).__name__}: {exc}", "category": "server"}
        if not future.done():
            future.set_result(payload)
        state = "failed" if "error" in payload else "finished"
        async with sampler.changed:
            sampler.cursor += 1
            sampler.events[clone].append((sampler.cursor, {"state": state, "request_id": request_id}))
            sampler.changed.notify_all()

    # -- REST: training runs and checkpoints ------------------------------------------------

    def _checkpoint(self, run_id: str, row: dict) -> dict:
        path = Path(row["path"])
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else None
        return {"checkpoint_id": f"{'weights' if row['family'] == 'state' else 'sampler_weights'}/{row['id']}",
                "checkpoint_type": "training" if row["family"] == "state" else "sampler",
                "time": row["createTime"], "tinker_path": tinker_path(run_id, row["family"], row["id"]),
                "size_bytes": size, "public": False, "user_metadata": row.get("userMetadata"), "expires_at": None}

    def _training_run(self, job: dict) -> dict:
        run_id = run_for_job(job)
        job_id = job["name"].rsplit("/", 1)[-1]
        rows = self.state.checkpoints.list(job_id)
        states = [r for r in rows if r["family"] == "state"]
        samplers = [r for r in rows if r["family"] == "sampler"]
        rank = int(job["trainingConfig"].get("loraRank") or 0)
        tinker = job.get("_tinker") or {}
        return {"training_run_id": run_id, "base_model": tinker.get("base_model") or job["trainingConfig"]["baseModel"],
                "model_owner": "local", "is_lora": rank > 0, "corrupted": False, "lora_rank": rank or None,
                # the last request since the service started, else the job's last change
                "last_request_time": self._last_request.get(job_id) or job.get("updateTime") or job["createTime"],
                "last_checkpoint": self._checkpoint(run_id, states[-1]) if states else None,
                "last_sampler_checkpoint": self._checkpoint(run_id, samplers[-1]) if samplers else None,
                "user_metadata": {str(k): str(v) for k, v in (tinker.get("user_metadata") or {}).items()} or None}

    def _job_of_run(self, run_id: str) -> dict:
        job_id = job_for_run(run_id)
        job = self.state.jobs.get(job_id) if re.match(r"^[a-z0-9-]{1,63}$", job_id) else None
        if job is None:
            raise ApiError(404, f"training run {run_id!r} not found")
        return job

    @staticmethod
    def _page(request: Request, default_limit: int) -> tuple[int, int]:
        values = []
        for name, default in (("limit", default_limit), ("offset", 0)):
            raw = request.query_params.get(name, str(default))
            if not raw.isdigit():
                raise ApiError(400, f"{name} must be a non-negative integer")
            values.append(int(raw))
        return values[0], values[1]

    async def list_training_runs(self, request: Request) -> Response:
        limit, offset = self._page(request, 20)
        jobs = sorted(self.state.jobs.all(), key=lambda j: j["createTime"], reverse=True)
        page = jobs[offset: offset + limit]
        return json_response({"training_runs": [self._training_run(j) for j in page],
                              "cursor": {"offset": offset, "limit": limit, "total_count": len(jobs)}})

    async def get_training_run(self, request: Request) -> Response:
        return json_response(self._training_run(self._job_of_run(request.path_params["run"])))

    async def list_checkpoints(self, request: Request) -> Response:
        run_id = request.path_params["run"]
        job = self._job_of_run(run_id)
        rows = self.state.checkpoints.list(job["name"].rsplit("/", 1)[-1])
        return json_response({"checkpoints": [self._checkpoint(run_for_job(job), r) for r in rows], "cursor": None})

    async def list_user_checkpoints(self, request: Request) -> Response:
        limit, offset = self._page(request, 100)
        every = []
        for job in self.state.jobs.all():
            run_id = run_for_job(job)
            every += [self._checkpoint(run_id, r) for r in self.state.checkpoints.list(job["name"].rsplit("/", 1)[-1])]
        every.sort(key=lambda c: c["time"], reverse=True)
        return json_response({"checkpoints": every[offset: offset + limit],
                              "cursor": {"offset": offset, "limit": limit, "total_count": len(every)}})

    async def delete_checkpoint(self, request: Request) -> Response:
        run_id, checkpoint = request.path_params["run"], request.path_params["checkpoint"]
        self._job_of_run(run_id)
        row, job_id, _ = self._saved(f"tinker://{run_id}/{checkpoint}", KINDS.get(checkpoint.split("/", 1)[0], "state"))
        self.state.checkpoints.remove(job_id, row["id"], row["family"])
        shutil.rmtree(row["path"], ignore_errors=True)
        return Response(status_code=200)

    def routes(self) -> list[Route]:
        a = "/api/v1"
        table = [
            ("/healthz", self.healthz, ["GET"]),
            ("/client/config", self.client_config, ["POST"]),
            ("/client/dynamic_config", self.client_dynamic_config, ["POST"]),
            ("/create_session", self.create_session, ["POST"]),
            ("/session_heartbeat", self.session_heartbeat, ["POST"]),
            ("/sessions", self.list_sessions, ["GET"]),
            ("/sessions/{session}", self.get_session, ["GET"]),
            ("/sessions/{session}/finish", self.finish_session, ["POST"]),
            ("/telemetry", self.telemetry, ["POST"]),
            ("/get_server_capabilities", self.server_capabilities, ["GET"]),
            ("/create_model", self.create_model, ["POST"]),
            ("/get_info", self.get_info, ["POST"]),
            ("/unload_model", self.unload_model, ["POST"]),
            ("/forward_backward", self.forward_backward, ["POST"]),
            ("/optim_step", self.optim_step, ["POST"]),
            ("/save_weights", self.save_weights, ["POST"]),
            ("/save_weights_for_sampler", self.save_weights_for_sampler, ["POST"]),
            ("/load_weights", self.load_weights, ["POST"]),
            ("/weights_info", self.weights_info, ["POST"]),
            ("/retrieve_future", self.retrieve_future, ["POST"]),
            ("/retrieve_futures", self.retrieve_futures, ["POST"]),
            ("/cancel_future", self.cancel_future, ["POST"]),
            ("/create_sampling_session", self.create_sampling_session, ["POST"]),
            ("/join_sampling_session", self.join_sampling_session, ["POST"]),
            ("/samplers/{sampler}", self.get_sampler, ["GET"]),
            ("/asample", self.asample, ["POST"]),
            ("/training_runs", self.list_training_runs, ["GET"]),
            ("/training_runs/{run}", self.get_training_run, ["GET"]),
            ("/training_runs/{run}/checkpoints", self.list_checkpoints, ["GET"]),
            ("/training_runs/{run}/checkpoints/{checkpoint:path}", self.delete_checkpoint, ["DELETE"]),
            ("/checkpoints", self.list_user_checkpoints, ["GET"]),
        ]
        return [Route(a + path, handler, methods=methods) for path, handler, methods in table]

    async def stop_all(self) -> None:
        for replica in self.replicas.values():
            await replica.runtime.stop()
        self.replicas.clear()


# -- payloads ------------------------------------------------------------------------------

MAX_METADATA_ENTRIES, MAX_METADATA_CHARS = 64, 4096


def _metadata(body: dict) -> dict[str, str] | None:
    """``user_metadata``: at most 64 string keys, each value a string, number or bool (kept as text)."""
    metadata = field(body, "user_metadata", dict, required=False)
    if metadata is None:
        return None
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise ApiError(400, f"user_metadata holds {len(metadata)} entries; at most {MAX_METADATA_ENTRIES}")
    out = {}
    for key, value in metadata.items():
        if not isinstance(value, (str, int, float, bool)):
            raise ApiError(400, f"user_metadata[{key!r}] must be a string or a number")
        if len(key) > MAX_METADATA_CHARS or len(str(value)) > MAX_METADATA_CHARS:
            raise ApiError(400, f"user_metadata[{key[:64]!r}] is longer than {MAX_METADATA_CHARS} characters")
        out[key] = str(value)
    return out


def _num_samples(body: dict) -> int:
    n = body.get("num_samples", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
        raise ApiError(400, f"num_samples must be an integer in [1, {MAX_SAMPLES}]")
    return n


def _topk_arg(body: dict, name: str) -> int:
    k = body.get(name, 0)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOPK:
        raise ApiError(400, f"{name} must be an integer in [0, {MAX_TOPK}]")
    return k


def _metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Tinker metric names carry their reduction ("loss:sum"), which the client's chunk merger reads."""
    return {(key if key.count(":") == 1 else f"{key.replace(':', '_')}:mean"): float(value)
            for key, value in metrics.items()}


def _fb_payload(result: ForwardResult) -> dict:
    """A forward(_backward) result, encoded when it is retrieved: protobuf, or JSON for a client that asks for it."""
    logprobs = [t.numpy() for t in result.logprobs]
    metrics = _metrics(result.metrics)
    return {"_proto": lambda: encode_forward_backward_output(logprobs, metrics),
            "_json": lambda: {"loss_fn_output_type": "ArrayRecord", "metrics": metrics,
                              "loss_fn_outputs": [{"logprobs": encode_tensor(t)} for t in result.logprobs]}}


def _sample_payload(results: list, sample_tops: list, prompt_scores: tuple | None, prompt_len: int,
                    last_n: int | None, prompt_k: int, sample_k: int) -> dict:
    sequences = [EncodedSequence(list(r.token_ids), [float(x) for x in r.sampling_logprobs], r.finish_reason != "length",
                                 sample_tops[i]) for i, r in enumerate(results)]
    prompt_logprobs = prompt_top = None
    if prompt_scores is not None:
        scored, top = prompt_scores
        first = prompt_len - last_n if last_n else 1  # positions before it are not scored
        prompt_logprobs = [float("nan")] * prompt_len
        for t in range(first, prompt_len):
            prompt_logprobs[t] = scored[t - 1]
        if top is not None:
            prompt_top = [[] for _ in range(prompt_len)]
            for t in range(first, prompt_len):
                prompt_top[t] = top[t - 1]

    def as_json() -> dict:
        return {"type": "sample", "sequences": [
            {"stop_reason": "stop" if s.stop else "length", "tokens": s.tokens, "logprobs": s.logprobs}
            for s in sequences],
            "prompt_logprobs": None if prompt_logprobs is None else [None if np.isnan(x) else x for x in prompt_logprobs]}
    return {"_proto": lambda: encode_sample_response(sequences, prompt_logprobs=prompt_logprobs, prompt_topk=prompt_top,
                                                     prompt_k=prompt_k, sample_k=sample_k),
            "_json": as_json}
