"""Deployments: hot load (``/hot_load/v1/models/hot_load``) and completions
(``/inference/v1/completions``), as the SDK's DeploymentManager and DeploymentSampler use them.

Each deployment with a replica owns one engine ``Sampler`` and one worker thread;
generation and hot loads run there in arrival order, never on the event loop.

Batching: completion requests go into a per-deployment queue. A batcher task
takes everything waiting (up to ``MAX_BATCH``) whenever the worker is free and
generates it as one batch. The time a request waited in that queue is reported
as ``prefill-queue-duration`` (seconds, as a string, in the final SSE chunk's
``perf_metrics`` and in the response headers) -- the signal the SDK's
AdaptiveConcurrencyController grows or shrinks its window on. Every other timing
there is measured for the request too (``_perf_metrics``); what nothing here
measures is left out rather than filled in.

Each token's ``logprob`` is the model's; its ``sampling_logprob`` is that of the
distribution it was drawn from (temperature, top_k, top_p), which the SDK's
Tinker-shaped ``sample()`` returns (see ``sampler.py``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from . import catalogue, load_engine
from .state import ServiceState, now_rfc3339, serving_base_model
from .wire import ApiError, check_token_ids, field, json_body, json_response

if TYPE_CHECKING:  # the engine (torch) and transformers load with the first deployment
    from collections.abc import AsyncIterator

    from transformers import PreTrainedTokenizerBase

    from .sampler import GenRequest, GenResult, Sampler

log = logging.getLogger("runner.local.inference_plane")

MAX_BATCH = 64
# Candidates per position that top_logprobs (or an integer logprobs) may ask for; the managed API takes 0..5.
MAX_TOP_LOGPROBS = 20
# Longest the batcher holds a batch for the rest of a concurrent load.
BATCH_GATHER_S = 0.05


def _engine() -> ModuleType:
    return load_engine()


def _decode_thread_setup(device: str) -> None:
    """One intra-op thread for decoding on CPU (this thread only; trainers keep theirs).

    Decoding a small model is thousands of tiny ops, where an OpenMP pool only adds
    synchronisation; on a shared, loaded CPU its threads then wait on each other and
    the same batch took anywhere from 57 ms to 1.1 s (2 threads) instead of a steady
    65 ms (1 thread). ``FIRETITAN_LOCAL_DECODE_THREADS`` overrides.
    """
    if device == "cpu":
        import torch
        torch.set_num_threads(max(1, int(os.environ.get("FIRETITAN_LOCAL_DECODE_THREADS", "1"))))


@dataclass
class _Job:
    request: GenRequest
    arrived: float
    future: asyncio.Future[GenResult]
    started: float = 0.0
    batch_size: int = 0


@dataclass
class Completion:
    """One finished generation plus the timings the SDK reads (time.monotonic() instants)."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]              # the model's, at temperature 1 ("logprob")
    sampling_logprobs: list[float]     # the distribution each token was drawn from ("sampling_logprob")
    finish_reason: str
    arrived: float                     # entered the deployment's queue
    started: float                     # its batch began (prefill)
    prefill_s: float
    first_token_at: float | None       # None when it generated nothing (max_tokens 0)
    finished_at: float
    batch_size: int
    echo_count: int = 0                # how many prompt tokens the response echoes (the last ones)
    prompt_logprobs: list[float] | None = None         # prompt tokens 1 .. P-1 given those before
    prompt_top: list[list[tuple[int, float]]] | None = None
    top: list[list[tuple[int, float]]] | None = None

    @property
    def output_ids(self) -> list[int]:
        """What ``raw_output.completion_token_ids`` holds: the echoed prompt tokens, then the generated ones."""
        echoed = self.prompt_ids[len(self.prompt_ids) - self.echo_count:] if self.echo_count else []
        return echoed + self.token_ids


def _optional_int(body: dict, name: str, default: int | None, *, low: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer (got {type(value).__name__})")
    if low is not None and value < low:
        raise ApiError(400, f"{name} must be >= {low} (got {value})")
    return value


def _optional_number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ApiError(400, f"{name} must be a non-negative number (got {value!r})")
    return float(value)



class DeploymentRuntime:
    """A deployment replica: its Sampler, worker thread and request batcher."""

    def __init__(self, deployment_id: str, base_model: str, device: str, seed: int = 0):
        self.deployment_id = deployment_id
        self.base_model = base_model
        self.device = device
        self.seed = seed
        self.sampler: Sampler | None = None
        self.identity: str | None = None
        self.loading_state: dict = {"stage": "idle"}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"deploy-{deployment_id}",
                                            initializer=_decode_thread_setup, initargs=(device,))
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._batcher = asyncio.get_running_loop().create_task(self._batch_loop())
        self.in_flight = 0
        self._load_peak = 0.0  # decaying maximum of requests in flight: the load to expect

    async def call(self, fn, *args):
        """Run ``fn(sampler, *args)`` on the worker thread, in order with generation."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._with_sampler, fn, args)

    def _with_sampler(self, fn, args):
        if self.sampler is None:
            self.sampler = _engine().Sampler(self.base_model, seed=self.seed, device=self.device)
        return fn(self.sampler, *args)

    async def hot_load(self, identity: str, path: str) -> None:
        self.loading_state = {"stage": "loading", "target_snapshot_identity": identity}
        try:
            await self.call(lambda sampler: sampler.hot_load(path))
        except Exception as exc:
            self.loading_state = {"stage": "error", "target_snapshot_identity": identity,
                                  "error": f"{type(exc).__name__}: {exc}"}
            raise
        self.identity = identity
        self.loading_state = {"stage": "done", "target_snapshot_identity": identity}

    async def generate(self, request: GenRequest) -> tuple[GenResult, _Job]:
        job = _Job(request, time.monotonic(), asyncio.get_running_loop().create_future())
        self.in_flight += 1
        self._load_peak = max(self._load_peak, float(self.in_flight))
        try:
            await self._queue.put(job)
            return await job.future, job
        finally:
            self.in_flight -= 1

    async def _batch_loop(self) -> None:
        last_generation_s = 0.0
        while True:
            first = await self._queue.get()
            # Without continuous batching, concurrent clients can settle into two groups
            # that alternate (each arriving while the other's batch runs). So when
            # recently more requests were in flight than are queued now, wait briefly
            # for the others (a finished batch's clients sending their next request)
            # and run them together.
            # Waiting up to about half a batch's generation time pays for itself when
            # the others arrive; the wait is cut short as soon as they have.
            deadline = time.monotonic() + min(BATCH_GATHER_S, 0.6 * last_generation_s)
            while (self._queue.qsize() + 1 < 0.75 * self._load_peak and time.monotonic() < deadline):
                await asyncio.sleep(0.001)
            batch = [first]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._load_peak = max(float(self.in_flight), 0.7 * self._load_peak)  # decays when load drops
            started = time.monotonic()
            for job in batch:
                job.started, job.batch_size = started, len(batch)
            try:
                results = await self.call(self._generate_isolating, [job.request for job in batch])
            except Exception as exc:  # e.g. the sampler failed to build
                results = [exc] * len(batch)
            last_generation_s = time.monotonic() - started
            log.debug("deployment %s: batch of %d in %.1f ms (oldest waited %.1f ms)", self.deployment_id,
                      len(batch), 1e3 * last_generation_s, 1e3 * (started - batch[0].arrived))
            for job, result in zip(batch, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    @staticmethod
    def _generate_isolating(sampler: Sampler, requests: list[GenRequest]) -> list[GenResult | Exception]:
        """Generate a batch; if it fails, retry one by one so one bad request fails alone."""
        try:
            return list(sampler.generate(requests))
        except Exception as exc:
            if len(requests) == 1:
                return [exc]
        results: list[GenResult | Exception] = []
        for request in requests:
            try:
                results.append(sampler.generate([request])[0])
            except Exception as exc:
                results.append(exc)
        return results

    async def stop(self) -> None:
        self._batcher.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.sampler = None


class InferencePlane:
    def __init__(self, state: ServiceState, device: str):
        self.state = state
        self.device = device
        self.runtimes: dict[str, DeploymentRuntime] = {}
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self._token_texts: dict[tuple[str, int], str] = {}
        self._longest_tokens: dict[str, int] = {}

    # -- lifecycle --------------------------------------------------------------------

    def tokenizer(self, card: catalogue.ModelCard) -> PreTrainedTokenizerBase:
        """The tokenizer of the model a deployment serves (a checkpoint's own, else the shipped one)."""
        tokenizer = self._tokenizers.get(card.tokenizer_dir)
        if tokenizer is None:
            load_engine()  # transformers' first import must not race the warm-up thread
            from transformers import AutoTokenizer
            tokenizer = self._tokenizers[card.tokenizer_dir] = AutoTokenizer.from_pretrained(card.tokenizer_dir)
        return tokenizer

    async def runtime_for(self, deployment_id: str, *, wake: bool) -> DeploymentRuntime:
        """The deployment's replica, started on demand (a scaled-to-zero one wakes if ``wake``)."""
        record = self.state.deployments.get(deployment_id)
        if record is None:
            raise ApiError(404, f"deployment accounts/{deployment_id} not found")
        runtime = self.runtimes.get(deployment_id)
        if runtime is not None:
            return runtime
        if record.get("replicaCount", 1) == 0:
            if not wake:
                raise ApiError(503, f"deployment {deployment_id} is scaled to zero")
            # A hot load or a request wakes a scaled-to-zero deployment with one replica.
            record.update(replicaCount=1, minReplicaCount=max(1, record.get("minReplicaCount", 0)),
                          maxReplicaCount=max(1, record.get("maxReplicaCount", 0)), updateTime=now_rfc3339())
            self.state.deployments.put(deployment_id, record)
        runtime = DeploymentRuntime(deployment_id, serving_base_model(record), self.device)
        self.runtimes[deployment_id] = runtime
        snapshot = record.get("_snapshot")
        if snapshot and record.get("currentSnapshotIdentity"):
            # After a restart or a scale-up, serve what the deployment served before.
            try:
                await runtime.hot_load(record["currentSnapshotIdentity"], snapshot["path"])
            except Exception:
                log.exception("deployment %s could not restore snapshot %s", deployment_id,
                              record.get("currentSnapshotIdentity"))
        return runtime

    async def stop(self, deployment_id: str) -> None:
        runtime = self.runtimes.pop(deployment_id, None)
        if runtime is not None:
            await runtime.stop()

    async def scale_to_zero(self, deployment_id: str) -> None:
        await self.stop(deployment_id)

    async def stop_all(self) -> None:
        for deployment_id in list(self.runtimes):
            await self.stop(deployment_id)

    @staticmethod
    def _deployment_id(ref: str | None) -> str:
        if not ref:
            raise ApiError(400, "missing deployment: set the request's model to accounts/<a>/deployments/<id>")
        parts = ref.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "accounts" or parts[2] != "deployments":
            raise ApiError(404, f"model {ref!r} is not served here: use accounts/<account>/deployments/<id>")
        return parts[3]

    def _snapshot_for(self, record: dict, identity: str) -> dict:
        """The sampler snapshot named ``identity``: the attached trainer's first, then any job's."""
        attached = (record.get("hotLoadTrainerJob") or "").rsplit("/", 1)[-1]
        job_ids = [attached] if attached else []
        job_ids += [job["name"].rsplit("/", 1)[-1] for job in self.state.jobs.all()]
        for job_id in job_ids:
            row = self.state.checkpoints.find(job_id, identity, "sampler") if job_id else None
            if row is not None:
                return row
        raise ApiError(404, f"snapshot {identity!r} not found: save it with save_weights_for_sampler on the "
                            "trainer attached to this deployment")

    # -- hot load -----------------------------------------------------------------------

    async def hot_load(self, request: Request) -> Response:
        deployment_id = self._deployment_id(request.headers.get("fireworks-deployment"))
        record = self.state.deployments.get(deployment_id)
        if record is None:
            raise ApiError(404, f"deployment {deployment_id!r} not found")
        if request.method == "GET":
            return json_response(self._hot_load_status(deployment_id, record))
        body = await json_body(request)
        identity = body.get("identity")
        if not isinstance(identity, str) or not identity:
            raise ApiError(400, "missing identity")
        snapshot = self._snapshot_for(record, identity)
        trainer_rank = self.state.attached_lora_rank(record)
        if snapshot["kind"] == "adapter" and trainer_rank == 0:
            raise ApiError(400, f"snapshot {identity!r} is a LoRA adapter (rank {snapshot.get('loraRank')}); deployment "
                                f"{deployment_id} serves the full-parameter trainer {record['hotLoadTrainerJob']}: hot "
                                "load adapters into a deployment attached to their LoRA trainer")
        incremental = body.get("incremental_snapshot_metadata")
        if snapshot["kind"] == "delta" and not snapshot.get("base_path"):
            raise ApiError(400, f"delta snapshot {identity!r} has no base to apply it to")
        if incremental is not None and not isinstance(incremental, dict):
            raise ApiError(400, "incremental_snapshot_metadata must be an object")
        runtime = await self.runtime_for(deployment_id, wake=True)
        try:
            await runtime.hot_load(identity, snapshot["path"])
        except Exception as exc:
            raise ApiError(400, f"hot load of {identity!r} failed: {type(exc).__name__}: {exc}") from None
        record = self.state.deployments.get(deployment_id) or record
        record.update(currentSnapshotIdentity=identity, updateTime=now_rfc3339(),
                      _snapshot={"path": snapshot["path"], "kind": snapshot["kind"]})
        self.state.deployments.put(deployment_id, record)
        return json_response({"identity": identity, "status": "loaded"})

    def _hot_load_status(self, deployment_id: str, record: dict) -> dict:
        runtime = self.runtimes.get(deployment_id)
        if runtime is None:
            if record.get("replicaCount", 1) == 0:
                return {"replicas": []}
            identity, stage = record.get("currentSnapshotIdentity"), {"stage": "idle"}
        else:
            identity, stage = runtime.identity, runtime.loading_state
        return {"replicas": [{
            "replica_id": f"{deployment_id}-0",
            "current_snapshot_identity": identity,
            "readiness": stage.get("stage") != "loading",
            "loading_state": stage,
            "loaded_adapters": [],
        }]}

    # -- completions ---------------------------------------------------------------------

    def _longest_token(self, card: catalogue.ModelCard) -> int:
        """The most characters one token of the model's tokenizer spells: a text longer than
        the context times this cannot fit, whatever it tokenizes to."""
        longest = self._longest_tokens.get(card.tokenizer_dir)
        if longest is None:
            vocab = self.tokenizer(card).get_vocab()
            longest = self._longest_tokens[card.tokenizer_dir] = max(map(len, vocab), default=1) or 1
        return longest

    def _gen_request(self, body: dict, card: catalogue.ModelCard) -> tuple[GenRequest, list[int], int]:
        """The engine request a completions body asks for, its prompt ids, and how many of
        them to echo. Every field is checked before use; the prompt is checked against the
        context before it is tokenized, so an oversized one costs nothing."""
        vocab_size, max_context = int(card.config["vocab_size"]), card.max_context_length
        max_tokens = _optional_int(body, "max_tokens", None, low=0)
        alias = _optional_int(body, "max_completion_tokens", None, low=0)
        if max_tokens is not None and alias is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both")
        max_tokens = next((v for v in (max_tokens, alias) if v is not None), 16)
        temperature = _optional_number(body, "temperature", 1.0)
        top_p = _optional_number(body, "top_p", 1.0)
        if not 0 < top_p <= 1:
            raise ApiError(400, "top_p must be in (0, 1]")
        top_k = _optional_int(body, "top_k", 0, low=-1)
        seed = _optional_int(body, "seed", None)
        echo = field(body, "echo", bool, required=False, default=False)
        echo_last = _optional_int(body, "echo_last", None, low=0)
        logprobs = body.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, (bool, int)):
            raise ApiError(400, f"logprobs must be true, false or an integer (got {type(logprobs).__name__})")
        legacy_top = logprobs if isinstance(logprobs, int) and not isinstance(logprobs, bool) else 0
        top_logprobs = max(_optional_int(body, "top_logprobs", 0, low=0), legacy_top)
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        for unsupported in ("include_routing_matrix", "routing_matrix_format", "top_sampling_logprobs",
                            "sampling_mask", "images"):
            if body.get(unsupported):
                raise ApiError(400, f"{unsupported} is not supported by the local deployment")
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "stop must be a string or a list of strings")

        prompt = body.get("prompt")
        room = f"the model's context length is {max_context} tokens"
        if isinstance(prompt, str):
            limit = max_context * self._longest_token(card)
            if len(prompt) > limit:
                raise ApiError(400, f"prompt is {len(prompt)} characters, more than {room} can hold (at most "
                                    f"{limit} characters with this tokenizer); refused before tokenizing")
            prompt_ids = list(self.tokenizer(card).encode(prompt, add_special_tokens=False))
        elif isinstance(prompt, list):
            if len(prompt) > max_context:
                raise ApiError(400, f"prompt is {len(prompt)} tokens; {room}")
            prompt_ids = prompt
            check_token_ids(prompt_ids, "prompt", vocab_size=vocab_size)
        else:
            raise ApiError(400, "prompt must be a list of token ids or a string")
        if not prompt_ids:
            raise ApiError(400, "prompt is empty")
        if len(prompt_ids) + min(max_tokens, 1) > max_context:
            # A completion running into the context end stops there ("length"), as a server would;
            # a prompt that fills the context can still be scored (echo with max_tokens 0).
            raise ApiError(400, f"prompt is {len(prompt_ids)} tokens; {room}, leaving no room to generate")
        echo_count = len(prompt_ids) if echo else min(echo_last, len(prompt_ids)) if echo_last is not None else 0
        request = _engine().GenRequest(prompt_ids=list(prompt_ids), max_tokens=max_tokens,
                                       temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
                                       seed=seed, stop=stop, echo=echo_count > 0, top_logprobs=top_logprobs)
        return request, list(prompt_ids), echo_count

    async def completions(self, request: Request) -> Response:
        received = time.monotonic()
        body = await json_body(request)
        model = field(body, "model", str, required=False)
        deployment_id = self._deployment_id(model or request.headers.get("fireworks-deployment"))
        record = self.state.deployments.get(deployment_id)
        if record is None:
            raise ApiError(404, f"deployment {deployment_id!r} not found")
        card = catalogue.resolve(serving_base_model(record))
        n = _optional_int(body, "n", 1)
        if not 1 <= n <= MAX_BATCH:
            raise ApiError(400, f"n must be an integer in [1, {MAX_BATCH}]")
        stream = field(body, "stream", bool, required=False, default=False)
        if stream and n != 1:
            raise ApiError(400, "streamed completions take n=1 (send n requests)")
        gen_request, prompt_ids, echo_count = self._gen_request(body, card)
        runtime = await self.runtime_for(deployment_id, wake=True)
        outcomes = await asyncio.gather(*(runtime.generate(gen_request) for _ in range(n)), return_exceptions=True)
        completions = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                if isinstance(outcome, (ValueError, _engine().EngineError)):
                    raise ApiError(400, f"generation failed: {outcome}")
                raise outcome
            result, job = outcome
            completions.append(Completion(
                prompt_ids=prompt_ids, token_ids=list(result.token_ids), logprobs=[float(x) for x in result.logprobs],
                sampling_logprobs=[float(x) for x in result.sampling_logprobs],
                finish_reason="length" if result.finish_reason == "length" else "stop",
                arrived=job.arrived, started=job.started, prefill_s=result.prefill_s,
                first_token_at=result.first_token_at, finished_at=result.finished_at, batch_size=job.batch_size,
                echo_count=echo_count, prompt_logprobs=result.prompt_logprobs, prompt_top=result.prompt_top,
                top=result.top))
        metrics = self._perf_metrics(completions[0], runtime, received)
        headers = {f"fireworks-{key}": value for key, value in metrics.items()}
        model = model or record["name"]
        tokenizer = self.tokenizer(card)
        if stream:
            return StreamingResponse(self._sse(completions[0], model, metrics, tokenizer),
                                     media_type="text/event-stream", headers=headers)
        return json_response(self._completion_body(completions, model, metrics, tokenizer), headers=headers)

    @staticmethod
    def _perf_metrics(completion: Completion, runtime: DeploymentRuntime, received: float) -> dict[str, str]:
        """Server timings, each measured for this request (seconds, as strings).

        Left out because nothing here measures them: ``generation-queue-duration``
        (prefill and decoding run in one batch, with no queue between them) and
        ``cached-prompt-tokens`` (the deployment keeps no prompt cache).
        """
        metrics = {
            # Waiting for the worker: the queue the batcher drains, before the batch's prefill.
            "prefill-queue-duration": f"{completion.started - completion.arrived:.6f}",
            "prefill-duration": f"{completion.prefill_s:.6f}",
            "num-concurrent-requests": str(max(runtime.in_flight, completion.batch_size)),
            "batch-size": str(completion.batch_size),
            "prompt-tokens": str(len(completion.prompt_ids)),
            "server-processing-time": f"{time.monotonic() - received:.6f}",
        }
        if completion.first_token_at is not None:
            metrics["server-time-to-first-token"] = f"{completion.first_token_at - received:.6f}"
            metrics["generation-duration"] = f"{completion.finished_at - completion.first_token_at:.6f}"
        return metrics

    def _token_text(self, tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
        key = (tokenizer.name_or_path, token_id)
        text = self._token_texts.get(key)
        if text is None:
            text = self._token_texts[key] = tokenizer.decode([token_id])
        return text

    def _entry(self, tokenizer: PreTrainedTokenizerBase, token_id: int, logprob: float, sampling_logprob: float | None,
               top: list[tuple[int, float]] | None) -> dict:
        entry = {"token": self._token_text(tokenizer, token_id), "token_id": token_id, "logprob": logprob,
                 "sampling_logprob": sampling_logprob}
        if top is not None:
            entry["top_logprobs"] = [{"token": self._token_text(tokenizer, t), "token_id": t, "logprob": lp}
                                     for t, lp in top]
        return entry

    def _token_entries(self, completion: Completion, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
        """``logprobs.content``: one entry per token of ``raw_output.completion_token_ids``
        (echoed prompt tokens, then generated ones), built in O(tokens) on the event loop.

        An echoed prompt token's ``logprob`` is its conditional logprob under the served
        weights; it was not sampled, so its ``sampling_logprob`` is null. The prompt's
        first token has no context to be scored in, yet the managed API's schema requires a
        number in that slot (``logprob: float``), and the SDK, which reads the column whole,
        drops that row and reports None for it: the slot carries 0.0, which nothing reads.
        """
        entries = []
        for position in range(len(completion.prompt_ids) - completion.echo_count, len(completion.prompt_ids)):
            scored = position >= 1
            top = None
            if completion.prompt_top is not None:
                top = completion.prompt_top[position - 1] if scored else []
            entries.append(self._entry(tokenizer, completion.prompt_ids[position],
                                       completion.prompt_logprobs[position - 1] if scored else 0.0, None, top))
        for index, (token_id, logprob, sampling_logprob) in enumerate(zip(
                completion.token_ids, completion.logprobs, completion.sampling_logprobs)):
            top = completion.top[index] if completion.top is not None else None
            entries.append(self._entry(tokenizer, token_id, logprob, sampling_logprob, top))
        return entries

    def _choice(self, completion: Completion, tokenizer: PreTrainedTokenizerBase, index: int = 0) -> dict:
        return {
            "index": index,
            "text": tokenizer.decode(completion.output_ids),
            "finish_reason": completion.finish_reason,
            "logprobs": {"content": self._token_entries(completion, tokenizer)},
            "raw_output": {"prompt_token_ids": completion.prompt_ids,
                           "completion_token_ids": completion.output_ids},
        }

    def _completion_body(self, completions: list[Completion], model: str, metrics: dict,
                         tokenizer: PreTrainedTokenizerBase) -> dict:
        completion_tokens = sum(len(c.token_ids) for c in completions)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [self._choice(c, tokenizer, i) for i, c in enumerate(completions)],
            "usage": {"prompt_tokens": len(completions[0].prompt_ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(completions[0].prompt_ids) + completion_tokens},
            "perf_metrics": metrics,
        }

    def _sse(self, completion: Completion, model: str, metrics: dict,
             tokenizer: PreTrainedTokenizerBase) -> AsyncIterator[bytes]:
        """The SSE stream: ``data: {chunk}`` with the generated text and its token
        logprobs, then the final chunk with finish_reason, raw_output, usage and
        perf_metrics, then ``data: [DONE]``.

        The engine generates a completion whole, so it goes out as one content chunk
        rather than one per token: the client parses JSON per chunk, and per-token
        chunks cost it more time than the generation itself under concurrent load.
        """
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        entries = self._token_entries(completion, tokenizer)
        text = tokenizer.decode(completion.output_ids)

        def chunk(choice: dict, **extra: object) -> bytes:
            body = {"id": completion_id, "object": "text_completion", "created": created, "model": model,
                    "choices": [choice], **extra}
            return b"data: " + orjson.dumps(body) + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            if entries:
                yield chunk({"index": 0, "text": text, "logprobs": {"content": entries}, "finish_reason": None})
            yield chunk(
                {"index": 0, "text": "", "finish_reason": completion.finish_reason,
                 "raw_output": {"prompt_token_ids": completion.prompt_ids,
                                "completion_token_ids": completion.output_ids}},
                usage={"prompt_tokens": len(completion.prompt_ids), "completion_tokens": len(completion.token_ids),
                       "total_tokens": len(completion.prompt_ids) + len(completion.token_ids)},
                perf_metrics=metrics)
            yield b"data: [DONE]\n\n"

        return events()

    # -- debug ---------------------------------------------------------------------------

    async def weights_digest(self, request: Request) -> Response:
        deployment_id = request.path_params["deployment"]
        runtime = await self.runtime_for(deployment_id, wake=False)
        digest = await runtime.call(lambda sampler: load_engine().weights_digest(sampler.model))
        digest["identity"] = runtime.identity
        return json_response(digest)

    def routes(self) -> list[Route]:
        return [
            Route("/hot_load/v1/models/hot_load", self.hot_load, methods=["GET", "POST"]),
            Route("/inference/v1/completions", self.completions, methods=["POST"]),
            Route("/local/v1/deployments/{deployment}/weights_digest", self.weights_digest, methods=["GET"]),
        ]
