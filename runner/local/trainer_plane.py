"""The trainer data plane: ``/training/v1/rlorTrainerJobs/{account}/{job}/api/v1/...``.

Every mutating call (create_model, forward, forward_backward, optim_step, the
saves and loads) is answered at once with ``{"request_id": ...}``; the work runs
on the job's own worker thread and the client collects the result with
``retrieve_future``, a long-poll held open until the result is ready (or
answered ``{"type": "try_again"}`` after a while, so the client polls again).

Ordering: the SDK numbers each model's requests (``seq_id`` 1, 2, ...) and may
send forward_backward chunks in parallel, so requests can arrive out of order.
The per-model sequencer releases them to the worker strictly in ``seq_id``
order; a re-sent ``seq_id`` (a client retry) gets the original request id back
instead of running twice. One worker thread per trainer means torch work never
runs on the event loop and requests for one trainer never overlap.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeAlias

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import catalogue, load_engine
from .catalogue import EngineError
from .state import ServiceState, check_name, now_rfc3339, read_json, split_state_ref, state_ref
from .wire import (ApiError, datum_tokens, decode_tensor, dense_columns, encode_floats, field, json_body,
                   json_response, result_response)

if TYPE_CHECKING:  # the engine imports torch: the control plane and the CLI load this module without it
    from firetitan_track.blobs import Json

    from .engine import Batch, ForwardResult, LoraSettings, Trainer

log = logging.getLogger("runner.local.trainer")

# Long-poll budget for retrieve_future: well under the SDK's 45 s read timeout.
LONG_POLL_S = 20.0
# A request held back waiting for an earlier seq_id fails after this long: the
# client that skipped a number has already failed its own sequence.
SEQUENCE_GAP_TIMEOUT_S = 60.0
# Completed results are kept this long so a retried retrieve_future still finds them.
RESULT_TTL_S = 600.0

_engine = load_engine

# What a trainer's worker thread runs: the engine's Trainer in, the call's result payload out.
Work: TypeAlias = "Callable[[Trainer], dict]"


@dataclass
class TrainerSpec:
    """What a trainer job asks the engine for (from its control-plane record)."""

    job_id: str
    base_model: str
    lora_rank: int = 0
    forward_only: bool = False
    seed: int = 0


@dataclass
class _Pending:
    request_id: str
    op: str
    fn: Work
    buffered_at: float = 0.0


@dataclass
class _ModelSequence:
    """Per model_id: next seq_id to release, requests waiting for their turn."""

    next_seq: int = 1
    waiting: dict[int, _Pending] = dc_field(default_factory=dict)
    request_ids: dict[int, str] = dc_field(default_factory=dict)
    base_only: bool = False  # a LoRA trainer's frozen-base reference model (adapters disabled)


class TrainerRuntime:
    """One trainer job's engine, worker thread, futures and request ordering."""

    def __init__(self, spec: TrainerSpec, state: ServiceState, device: str, loop: asyncio.AbstractEventLoop):
        self.spec = spec
        self.state = state
        self.device = device
        self.loop = loop
        card = catalogue.resolve(spec.base_model)
        self.vocab_size = int(card.config["vocab_size"])
        self.max_context = int(card.max_context_length)
        self.engine_trainer: Trainer | None = None
        self.lora: LoraSettings | None = None  # the policy model's, from its create_model
        self._engine_error: str | None = None
        self._work: queue.Queue[_Pending | None] = queue.Queue()
        self._held: list[_Pending] | None = None  # work kept back until the loop's next turn
        self._futures: dict[str, asyncio.Future] = {}
        self._done_at: dict[str, float] = {}
        self._models: dict[str, _ModelSequence] = {}
        self._model_counter = itertools.count(1)
        self._request_counter = itertools.count(1)
        self._thread = threading.Thread(target=self._run, name=f"trainer-{spec.job_id}", daemon=True)
        self._thread.start()

    # -- submission (event loop) ------------------------------------------------

    def new_model_id(self, *, base_only: bool = False) -> str:
        model_id = f"{self.spec.job_id}.model-{next(self._model_counter)}"
        self._models[model_id] = _ModelSequence(base_only=base_only)
        return model_id

    def add_model(self, model_id: str) -> None:
        """Sequence requests for a model whose id another protocol chose (the Tinker plane's
        ``<session>:train:<n>``); its requests then start at seq_id 1, like any model's."""
        self._models.setdefault(model_id, _ModelSequence())

    def has_model(self, model_id: str) -> bool:
        return model_id in self._models

    def is_base_only(self, model_id: str) -> bool:
        seq = self._models.get(model_id)
        return seq is not None and seq.base_only

    def drop_model(self, model_id: str) -> None:
        self._models.pop(model_id, None)

    def submit(self, op: str, fn: Work, *, model_id: str | None = None,
               seq_id: int | None = None, after_response: bool = False) -> str:
        """Queue ``fn(engine_trainer)``; returns the request id the client polls.

        ``after_response``: the worker gets the work on the event loop's next turn, once the
        handler calling this has written its response (which it does without yielding). A
        worker started at once takes the GIL from the loop in the middle of that response
        (Python threads hand the GIL over every few ms), so the client learned its request id,
        and sent the retrieve_future that collects the result, only a switch interval or two
        later; for a short call (optim_step) that is on the step's critical path."""
        if after_response and self._held is None:
            self._held = []
            self.loop.call_soon(self._release_held)
        if model_id is not None and seq_id is not None:
            seq = self._models.get(model_id)
            if seq is None:
                raise ApiError(404, f"unknown model_id {model_id!r} on trainer {self.spec.job_id}; "
                                    "create a model first (the service may have restarted)")
            if type(seq_id) is not int or seq_id < 1:
                raise ApiError(400, f"seq_id must be a positive integer (got {seq_id!r})")
            if seq_id in seq.request_ids:  # a client retry of a request we already took
                return seq.request_ids[seq_id]
            if seq_id < seq.next_seq:
                raise ApiError(409, f"seq_id {seq_id} for {model_id} was already consumed")
            pending = self._new_pending(op, fn)
            seq.request_ids[seq_id] = pending.request_id
            if seq_id == seq.next_seq:
                self._release(seq, seq_id, pending)
            else:
                pending.buffered_at = time.monotonic()
                seq.waiting[seq_id] = pending
                self.loop.call_later(SEQUENCE_GAP_TIMEOUT_S + 0.1, self._expire_gaps, model_id)
            return pending.request_id
        pending = self._new_pending(op, fn)
        self._enqueue(pending)
        return pending.request_id

    def skip_seq(self, model_id: str | None, seq_id: Json) -> None:
        """A request we rejected with a 4xx still used up its seq_id: let later ones run."""
        seq = self._models.get(model_id) if model_id else None
        if seq is None or type(seq_id) is not int or seq_id in seq.request_ids or seq_id < seq.next_seq:
            return
        seq.request_ids[seq_id] = ""
        if seq_id == seq.next_seq:
            self._release(seq, seq_id, None)
        else:
            seq.waiting[seq_id] = _Pending("", "skipped", lambda engine: {})

    def _new_pending(self, op: str, fn: Work) -> _Pending:
        request_id = f"{self.spec.job_id}-r{next(self._request_counter)}-{uuid.uuid4().hex[:6]}"
        self._futures[request_id] = self.loop.create_future()
        self._prune()
        return _Pending(request_id, op, fn)

    def _release(self, seq: _ModelSequence, seq_id: int, pending: _Pending | None) -> None:
        if pending is not None and pending.request_id:
            self._enqueue(pending)
        seq.next_seq = seq_id + 1
        while seq.next_seq in seq.waiting:
            queued = seq.waiting.pop(seq.next_seq)
            if queued.request_id:
                self._enqueue(queued)
            seq.next_seq += 1

    def _enqueue(self, pending: _Pending) -> None:
        if self._held is not None:  # behind held work, in order
            self._held.append(pending)
        else:
            self._work.put(pending)

    def _release_held(self) -> None:
        held, self._held = self._held or [], None
        for pending in held:
            self._work.put(pending)

    def _expire_gaps(self, model_id: str) -> None:
        seq = self._models.get(model_id)
        if seq is None:
            return
        now = time.monotonic()
        for seq_id, pending in list(seq.waiting.items()):
            if pending.request_id and now - pending.buffered_at >= SEQUENCE_GAP_TIMEOUT_S:
                del seq.waiting[seq_id]
                self._resolve(pending.request_id, {
                    "error": f"seq_id {seq_id} waited {SEQUENCE_GAP_TIMEOUT_S:.0f}s for seq_id {seq.next_seq}, "
                             "which never arrived; reconnect and retry",
                    "category": "user"})

    # -- results (event loop) -----------------------------------------------------

    def _resolve(self, request_id: str, payload: dict) -> None:
        future = self._futures.get(request_id)
        if future is not None and not future.done():
            future.set_result(payload)
            self._done_at[request_id] = time.monotonic()

    def _prune(self) -> None:
        # _done_at is in completion order, so the expired ones come first: each request
        # looks at those alone, not at every result of the last RESULT_TTL_S.
        if len(self._done_at) < 256:
            return
        cutoff = time.monotonic() - RESULT_TTL_S
        while self._done_at:
            request_id, done_at = next(iter(self._done_at.items()))
            if done_at >= cutoff:
                break
            del self._done_at[request_id]
            self._futures.pop(request_id, None)

    async def wait(self, request_id: str, timeout: float) -> dict | None:
        """The result payload, or None if it is not ready within ``timeout``."""
        future = self._futures.get(request_id)
        if future is None:
            raise ApiError(404, f"unknown request_id {request_id!r} (results are kept {RESULT_TTL_S:.0f}s; "
                                "the service may have restarted)")
        if not future.done():
            try:
                await asyncio.wait_for(asyncio.shield(future), timeout)
            except asyncio.TimeoutError:
                return None
        return future.result()

    async def run(self, op: str, fn: Work, timeout: float = 600.0) -> dict:
        """Run ``fn`` on the worker (in order with queued work) and await its payload."""
        request_id = self.submit(op, fn)
        payload = await self.wait(request_id, timeout)
        if payload is None:
            raise ApiError(503, f"{op} timed out")
        if "error" in payload:
            raise ApiError(400 if payload.get("category") == "user" else 500, payload["error"])
        return payload

    # -- worker thread ------------------------------------------------------------

    def _ensure_engine(self) -> Trainer:
        if self.engine_trainer is None and self._engine_error is None:
            spec = self.spec
            lora = None
            if spec.lora_rank:
                lora = self.lora or _engine().LoraSettings(rank=spec.lora_rank)
            try:
                self.engine_trainer = _engine().Trainer(
                    spec.base_model, state_dir=str(self.state.job_dir(spec.job_id)), seed=spec.seed,
                    device=self.device, lora=lora, forward_only=spec.forward_only)
            except Exception as exc:
                log.exception("trainer %s failed to start", spec.job_id)
                self._engine_error = f"trainer failed to start: {type(exc).__name__}: {exc}"
        if self._engine_error is not None:
            raise RuntimeError(self._engine_error)
        return self.engine_trainer

    def _run(self) -> None:
        engine_error = _engine().EngineError
        while True:
            item = self._work.get()
            if item is None:
                break
            started = time.perf_counter()
            try:
                payload = item.fn(self._ensure_engine())
            except (ApiError, engine_error, ValueError) as exc:
                message = exc.message if isinstance(exc, ApiError) else str(exc)
                payload = {"error": f"{item.op}: {message}", "category": "user"}
            except Exception as exc:  # never kill the worker: report and carry on
                log.error("trainer %s: %s failed:\n%s", self.spec.job_id, item.op, traceback.format_exc())
                payload = {"error": f"{item.op}: internal error: {type(exc).__name__}: {exc}", "category": "server"}
            log.debug("trainer %s: %s took %.1f ms", self.spec.job_id, item.op, 1e3 * (time.perf_counter() - started))
            try:
                self.loop.call_soon_threadsafe(self._resolve, item.request_id, payload)
            except RuntimeError:  # loop closed: the service is shutting down
                break
        self.engine_trainer = None

    def configure_lora(self, trainer: Trainer, lora: LoraSettings | None) -> Trainer:
        """On the worker: the engine for the policy model's LoRA settings. An engine built
        before them (a reference's create_model came first) is rebuilt while untrained."""
        self.lora = lora
        if trainer.lora == lora:
            return trainer
        if trainer.step > 0:
            raise EngineError(f"trainer {self.spec.job_id} already trains adapters {trainer.lora}; "
                              f"a model asking for {lora} needs its own trainer job")
        self.engine_trainer = None
        return self._ensure_engine()

    def stop(self) -> None:
        self._release_held()  # what was queued before still runs first
        self._work.put(None)


# -- request decoding -------------------------------------------------------------

def decode_examples(runtime: TrainerRuntime, fb_input: Json) -> tuple[Batch, str, dict | None]:
    """(an engine Batch, loss_fn, loss_fn_config) from a forward(_backward)_input: decoded
    here, checked against the model by the engine's own rules (a 400 at once) and padded
    into tensors, so the worker goes straight to the model."""
    if not isinstance(fb_input, dict):
        raise ApiError(400, "missing forward_backward_input / forward_input object")
    loss_fn = fb_input.get("loss_fn")
    if not isinstance(loss_fn, str):
        raise ApiError(400, "missing loss_fn")
    config = fb_input.get("loss_fn_config")
    if config is not None and not isinstance(config, dict):
        raise ApiError(400, "loss_fn_config must be an object")
    data = fb_input.get("data")
    if not isinstance(data, list):
        raise ApiError(400, "data must be a list of datums")
    engine = _engine()
    columns = dense_columns(data)
    if columns is not None:  # the usual request: read as a whole batch
        batch = engine.prepare_dense_batch(*columns, loss_fn, runtime.vocab_size, runtime.max_context)
        if batch is not None:
            return batch, loss_fn, config
    example_cls = engine.Datum
    examples = []
    for index, datum in enumerate(data):
        tokens = datum_tokens(datum, index)
        raw_inputs = datum.get("loss_fn_inputs") or {}
        if not isinstance(raw_inputs, dict):
            raise ApiError(400, f"data[{index}].loss_fn_inputs must be an object")
        inputs = {name: decode_tensor(value, name) for name, value in raw_inputs.items()}
        examples.append(example_cls(tokens=tokens, inputs=inputs))
    return engine.prepare_batch(examples, loss_fn, runtime.vocab_size, runtime.max_context), loss_fn, config


def _metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Metric names carry their reduction ("loss:sum"): the SDK splits on ':' to
    combine chunked results, so a bare name would crash it. Bare names get ':mean'."""
    out = {}
    for key, value in metrics.items():
        name = key if key.count(":") == 1 else f"{key.replace(':', '_')}:mean"
        out[name] = float(value)
    return out


def forward_payload(result: ForwardResult) -> dict:
    """A forward(_backward) result, encoded when it is retrieved (``wire.result_response``):
    as protobuf for a client that accepts it, as the SDK does for this result (it then reads
    each datum's logprobs straight from the bytes instead of parsing and validating JSON
    numbers), else as JSON. Both carry the same float32 logprobs and float metrics under the
    same output type, so the SDK builds the same ForwardBackwardOutput from either."""
    metrics = _metrics(result.metrics)

    def as_proto() -> bytes:
        from .tinker_proto import encode_forward_backward_output

        return encode_forward_backward_output([logprobs.numpy() for logprobs in result.logprobs], metrics,
                                              output_type="TensorData")

    def as_json() -> dict:
        return {"loss_fn_output_type": "TensorData",
                "loss_fn_outputs": [{"logprobs": encode_floats(values)} for values in result.logprob_lists()],
                "metrics": metrics}
    return {"_proto": as_proto, "_json": as_json}


# -- the plane -----------------------------------------------------------------------

class TrainerPlane:
    """Running trainer jobs and the HTTP handlers that reach them."""

    def __init__(self, state: ServiceState, device: str):
        self.state = state
        self.device = device
        self.runtimes: dict[str, TrainerRuntime] = {}

    def start(self, spec: TrainerSpec) -> TrainerRuntime:
        runtime = self.runtimes.get(spec.job_id)
        if runtime is None:
            runtime = TrainerRuntime(spec, self.state, self.device, asyncio.get_running_loop())
            self.runtimes[spec.job_id] = runtime
        return runtime

    def stop(self, job_id: str) -> None:
        runtime = self.runtimes.pop(job_id, None)
        if runtime is not None:
            runtime.stop()

    def stop_all(self) -> None:
        for job_id in list(self.runtimes):
            self.stop(job_id)

    def runtime(self, request: Request) -> TrainerRuntime:
        job_id = request.path_params["job"]
        runtime = self.runtimes.get(job_id)
        if runtime is None:
            job = self.state.jobs.get(job_id)
            if job is None:
                raise ApiError(404, f"trainer job {job_id!r} not found")
            raise ApiError(404, f"trainer job {job_id!r} is not running (state {job.get('state')}); "
                                "resume it through the control plane")
        return runtime

    # -- session endpoints (answered directly) --------------------------------------

    async def healthz(self, request: Request) -> Response:
        self.runtime(request)
        return json_response({"status": "ok"})

    async def client_config(self, request: Request) -> Response:
        self.runtime(request)
        return json_response({"pjwt_auth_enabled": False, "parallel_fwdbwd_chunks": True})

    async def create_session(self, request: Request) -> Response:
        self.runtime(request)
        await json_body(request, required=False)
        return json_response({"type": "create_session", "session_id": f"session-{uuid.uuid4().hex[:12]}"})

    async def session_heartbeat(self, request: Request) -> Response:
        self.runtime(request)
        return json_response({"type": "session_heartbeat"})

    async def telemetry(self, request: Request) -> Response:
        # Accepted and dropped: the local service keeps no client telemetry.
        return json_response({"status": "accepted"})

    async def get_server_capabilities(self, request: Request) -> Response:
        self.runtime(request)
        return json_response({"supported_models": [{"model_name": name} for name in catalogue.BASE_MODELS]})

    async def list_checkpoints(self, request: Request) -> Response:
        runtime = self.runtime(request)
        names = [row["id"] for row in self.state.checkpoints.list(runtime.spec.job_id) if row["family"] == "state"]
        return json_response({"checkpoints": sorted(names)})

    async def get_info(self, request: Request) -> Response:
        runtime = self.runtime(request)
        body = await json_body(request)
        model_id = field(body, "model_id", str)
        card = catalogue.resolve(runtime.spec.base_model)
        return json_response({
            "type": "get_info", "model_id": model_id, "model_name": runtime.spec.base_model,
            "is_lora": runtime.spec.lora_rank > 0 and not runtime.is_base_only(model_id),
            "lora_rank": (runtime.spec.lora_rank or None) if not runtime.is_base_only(model_id) else None,
            # the served model's own architecture and tokenizer (a checkpoint's, or the stand-in's)
            "model_data": {"arch": card.architecture, "model_name": runtime.spec.base_model,
                           "tokenizer_id": card.tokenizer_dir},
        })

    async def retrieve_future(self, request: Request) -> Response:
        runtime = self.runtime(request)
        body = await json_body(request)
        request_id = field(body, "request_id", str)
        payload = await runtime.wait(request_id, LONG_POLL_S)
        if payload is None:
            return json_response({"type": "try_again", "request_id": request_id, "queue_state": "active"})
        return result_response(payload, request)

    # -- queued operations --------------------------------------------------------------

    async def _queued(self, request: Request, op: str, build: Callable[[TrainerRuntime, dict], Work],
                      *, sequenced: bool = True) -> Response:
        """Validate synchronously (a 4xx now), then queue the work in seq_id order."""
        runtime = self.runtime(request)
        body = await json_body(request)
        model_id = body.get("model_id") if sequenced else None
        seq_id = body.get("seq_id") if sequenced else None
        if sequenced:
            if not isinstance(model_id, str):
                raise ApiError(400, "missing model_id")
            if not runtime.has_model(model_id):
                raise ApiError(404, f"unknown model_id {model_id!r} on trainer {runtime.spec.job_id}; "
                                    "create a model first (the service may have restarted)")
        try:
            if sequenced and runtime.is_base_only(model_id) and op != "forward":
                raise ApiError(400, f"model {model_id} is a frozen base-only reference (the policy trainer with "
                                    f"its adapters disabled); {op} is not available on it")
            work = build(runtime, body)
        except EngineError as exc:  # a field the engine's validators refused: a 400 now
            runtime.skip_seq(model_id, seq_id)
            raise ApiError(400, f"{op}: {exc}") from None
        except ApiError:
            runtime.skip_seq(model_id, seq_id)
            raise
        request_id = runtime.submit(op, work, model_id=model_id, seq_id=seq_id, after_response=True)
        return json_response({"request_id": request_id, "model_id": model_id})

    async def create_model(self, request: Request) -> Response:
        runtime = self.runtime(request)
        body = await json_body(request)
        base_model = field(body, "base_model", str)
        job_id, job_rank = runtime.spec.job_id, runtime.spec.lora_rank
        if base_model != runtime.spec.base_model:
            raise ApiError(400, f"trainer {job_id} serves {runtime.spec.base_model!r}, not {base_model!r}")
        if body.get("base_only"):
            if not job_rank:
                raise ApiError(400, "base-only reference models share a LoRA trainer; this full-parameter trainer "
                                    "cannot serve one (the SDK provisions a separate forward-only reference trainer)")
            model_id = runtime.new_model_id(base_only=True)
            request_id = runtime.submit("create_model", lambda trainer: {"type": "create_model", "model_id": model_id})
            return json_response({"request_id": request_id, "model_id": model_id})
        lora = lora_settings(body.get("lora_config"), job_rank, job_id)
        if runtime.engine_trainer is None and lora is not None:
            runtime.lora = lora  # so the engine's first build already has them
        model_id = runtime.new_model_id()

        def work(trainer: Trainer) -> dict:
            # The engine is built (first use) before this runs; the model is the trainer's.
            if lora is not None:
                runtime.configure_lora(trainer, lora)
            return {"type": "create_model", "model_id": model_id}

        request_id = runtime.submit("create_model", work)
        return json_response({"request_id": request_id, "model_id": model_id})

    async def unload_model(self, request: Request) -> Response:
        runtime = self.runtime(request)
        body = await json_body(request)
        model_id = field(body, "model_id", str)

        def work(trainer: Trainer) -> dict:
            return {"type": "unload_model", "model_id": model_id}

        request_id = runtime.submit("unload_model", work)
        runtime.drop_model(model_id)
        return json_response({"request_id": request_id, "model_id": model_id})

    async def forward(self, request: Request) -> Response:
        def build(runtime: TrainerRuntime, body: dict) -> Work:
            batch, loss_fn, config = decode_examples(runtime, body.get("forward_input"))
            base_only = runtime.is_base_only(body["model_id"])
            return lambda trainer: forward_payload(trainer.forward(batch, loss_fn, config, base_only=base_only))
        return await self._queued(request, "forward", build)

    async def forward_backward(self, request: Request) -> Response:
        def build(runtime: TrainerRuntime, body: dict) -> Work:
            if runtime.spec.forward_only:
                raise ApiError(400, f"trainer {runtime.spec.job_id} is forward-only (a frozen reference); "
                                    "forward_backward is not available")
            batch, loss_fn, config = decode_examples(runtime, body.get("forward_backward_input"))
            return lambda trainer: forward_payload(trainer.forward_backward(batch, loss_fn, config))
        return await self._queued(request, "forward_backward", build)

    async def optim_step(self, request: Request) -> Response:
        def build(runtime: TrainerRuntime, body: dict) -> Work:
            if runtime.spec.forward_only:
                raise ApiError(400, f"trainer {runtime.spec.job_id} is forward-only; optim_step is not available")
            # Validated here, by the engine's own rules, so a bad value is a 400 at once.
            params = _engine().adam_hyperparams(field(body, "adam_params", dict))
            normalization = _engine().grad_normalization(body.get("grad_accumulation_normalization"))

            def work(trainer: Trainer) -> dict:
                metrics = trainer.optim_step(params, grad_accumulation_normalization=normalization)
                return {"type": "optim_step", "metrics": {key: float(value) for key, value in metrics.items()}}
            return work
        return await self._queued(request, "optim_step", build)

    async def save_weights_for_sampler(self, request: Request) -> Response:
        def build(runtime: TrainerRuntime, body: dict) -> Work:
            name = check_name(field(body, "path", str), "sampler snapshot")
            kind = body.get("checkpoint_type") or "base"
            if not isinstance(kind, str):
                raise ApiError(400, "checkpoint_type must be a string")
            kind = kind.lower()
            job_id = runtime.spec.job_id
            state = self.state

            def work(trainer: Trainer) -> dict:
                saved = trainer.save_sampler_snapshot(name, kind)
                state.checkpoints.add(job_id, {
                    "id": name, "family": "sampler", "kind": saved["kind"], "path": saved["path"],
                    "base_path": saved.get("base_path"), "createTime": now_rfc3339(),
                    "step": trainer.step, "loraRank": trainer.lora_rank})
                return {"type": "save_weights_for_sampler", "path": name}
            return work
        return await self._queued(request, "save_weights_for_sampler", build)

    async def save_weights(self, request: Request) -> Response:
        def build(runtime: TrainerRuntime, body: dict) -> Work:
            name = check_name(field(body, "path", str), "checkpoint")
            job_id = runtime.spec.job_id
            state = self.state
            ref = state_ref(job_id, name)

            def work(trainer: Trainer) -> dict:
                path = trainer.save_state(name)
                state.checkpoints.add(job_id, {
                    "id": name, "family": "state", "kind": "state", "path": str(path), "ref": ref,
                    "createTime": now_rfc3339(), "step": trainer.step, "loraRank": trainer.lora_rank})
                return {"type": "save_weights", "path": ref}
            return work
        return await self._queued(request, "save_weights", build)

    def saved_state(self, ref: str, current_job: str) -> dict:
        """The checkpoint row a load path names (see state.split_state_ref), or a 404."""
        source_job, name = split_state_ref(ref, current_job)
        row = self.state.checkpoints.find(source_job, name, "state")
        if row is None:
            raise ApiError(404, f"no saved state {name!r} on trainer job {source_job!r}")
        return row

    async def load_weights(self, request: Request) -> Response:
        def build(runtime: TrainerRuntime, body: dict) -> Work:
            ref = field(body, "path", str)
            with_optimizer = bool(body.get("optimizer", False))
            path = self.saved_state(ref, runtime.spec.job_id)["path"]

            def work(trainer: Trainer) -> dict:
                trainer.load_state(path, with_optimizer=with_optimizer)
                return {"type": "load_weights", "path": ref}
            return work
        return await self._queued(request, "load_weights", build)

    async def weights_info(self, request: Request) -> Response:
        """What a saved state needs to be trained on: the SDK's create_training_client_from_state."""
        runtime = self.runtime(request)
        row = self.saved_state(field(await json_body(request), "tinker_path", str), runtime.spec.job_id)
        meta = read_json(Path(row["path"]) / "meta.json") or {}
        lora = meta.get("lora") or {}
        rank = int(meta.get("lora_rank") or 0)
        return json_response({
            "base_model": meta.get("base_model", runtime.spec.base_model), "is_lora": rank > 0,
            "lora_rank": rank or None, "train_unembed": lora.get("train_unembed"),
            "train_mlp": lora.get("train_mlp"), "train_attn": lora.get("train_attn")})

    async def weights_digest(self, request: Request) -> Response:
        """Debug: a digest of the trainer's current weights (compare with a deployment's)."""
        runtime = self.runtime(request)
        return json_response(await runtime.run("weights_digest", lambda trainer: _engine().weights_digest(trainer.effective_weights())))

    async def optimizer_info(self, request: Request) -> Response:
        """Debug: what the trainer trains and what its optimizer holds (LoRA: adapters only)."""
        runtime = self.runtime(request)

        def describe(trainer: Trainer) -> dict:
            params = list(trainer.model.parameters())
            held = [p for group in (trainer.optimizer.param_groups if trainer.optimizer else []) for p in group["params"]]
            return {"parameters": sum(p.numel() for p in params),
                    "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
                    "optimizer_parameters": sum(p.numel() for p in held),
                    "optimizer_state_bytes": trainer.optimizer_state_bytes(), "lora_rank": trainer.lora_rank}
        return json_response(await runtime.run("optimizer_info", describe))

    def routes(self) -> list[Route]:
        base = "/training/v1/rlorTrainerJobs/{account}/{job}/api/v1"
        # A training step's calls first: Starlette tries the patterns in order.
        table = [
            ("/retrieve_future", self.retrieve_future, ["POST"]),
            ("/forward_backward", self.forward_backward, ["POST"]),
            ("/optim_step", self.optim_step, ["POST"]),
            ("/forward", self.forward, ["POST"]),
            ("/healthz", self.healthz, ["GET"]),
            ("/client/config", self.client_config, ["POST"]),
            ("/create_session", self.create_session, ["POST"]),
            ("/session_heartbeat", self.session_heartbeat, ["POST"]),
            ("/telemetry", self.telemetry, ["POST"]),
            ("/get_server_capabilities", self.get_server_capabilities, ["GET"]),
            ("/get_info", self.get_info, ["POST"]),
            ("/create_model", self.create_model, ["POST"]),
            ("/unload_model", self.unload_model, ["POST"]),
            ("/save_weights_for_sampler", self.save_weights_for_sampler, ["POST"]),
            ("/save_weights", self.save_weights, ["POST"]),
            ("/load_weights", self.load_weights, ["POST"]),
            ("/weights_info", self.weights_info, ["POST"]),
            ("/list_checkpoints", self.list_checkpoints, ["GET"]),
            ("/local/weights_digest", self.weights_digest, ["GET"]),
            ("/local/optimizer", self.optimizer_info, ["GET"]),
        ]
        return [Route(base + path, handler, methods=methods) for path, handler, methods in table]


def lora_settings(config: Json, job_rank: int, job_id: str) -> LoraSettings | None:
    """engine.LoraSettings from create_model's ``lora_config``, checked against the job's rank."""
    if config is not None and not isinstance(config, dict):
        raise ApiError(400, "lora_config must be an object")
    config = config or {}
    rank = config.get("rank") or 0
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ApiError(400, f"lora_config.rank must be a non-negative integer (got {rank!r})")
    if rank != job_rank:
        raise ApiError(400, f"lora_config.rank={rank} does not match trainer {job_id}, created with "
                            f"trainingConfig.loraRank={job_rank}")
    if not rank:
        return None
    values = {}
    for key in ("alpha", "seed"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ApiError(400, f"lora_config.{key} must be an integer (got {value!r})")
        values[key] = value
    for key in ("train_attn", "train_mlp", "train_unembed"):
        value = config.get(key, True)
        if not isinstance(value, bool):
            raise ApiError(400, f"lora_config.{key} must be true or false (got {value!r})")
        values[key] = value
    init = config.get("init_method")
    if init not in (None, "kaiming"):
        raise ApiError(400, f"lora_config.init_method {init!r} is not supported locally (kaiming)")
    return _engine().LoraSettings(rank=rank, **values)


