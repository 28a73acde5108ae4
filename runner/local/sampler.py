"""The deployment's copy of the model: hot loads of trainer snapshots, batched generation.

Every generated token carries two logprobs. ``logprobs`` are the model's own
(temperature 1, the whole vocabulary): what a trainer's forward pass computes for
the same tokens. ``sampling_logprobs`` are those of the distribution the token
was actually drawn from -- the logits divided by the temperature, cut to the
``top_k`` most likely tokens, then to the ``top_p`` nucleus, renormalised -- the
behaviour policy that an importance-sampling loss divides by. Greedy decoding
(temperature 0) draws from a distribution with all its mass on the argmax, so
its sampling logprob is 0.

A request may also ask for its prompt's logprobs (``echo``, what scoring calls
use): each prompt token after the first gets its conditional logprob under the
served weights, from the same prefill pass, so they equal what a trainer's
forward computes for those tokens. ``top_logprobs`` adds the k most likely
tokens at each returned position (model logprobs).
"""

from __future__ import annotations

import inspect
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer  # resolved at import, under load_engine's lock (see model.py)

from . import model as model_io
from .catalogue import EngineError, ModelCard, resolve


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0                    # 0 (or -1): no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    echo: bool = False                # also score the prompt (GenResult.prompt_logprobs)
    top_logprobs: int = 0             # k most likely tokens at each returned position

    @property
    def filtered(self) -> bool:
        """Whether top-k or top-p cuts the distribution (rather than the temperature alone)."""
        return self.top_k > 0 or self.top_p < 1.0


@dataclass
class GenResult:
    token_ids: list[int]       # completion only; includes the eos token or the stop string's tokens
    logprobs: list[float]      # model logprob (temperature 1, whole vocabulary) of each completion token
    finish_reason: str         # "stop" | "length"
    matched_stop: str | None = None   # the stop string that ended it, if any (its tokens end token_ids)
    sampling_logprobs: list[float] = field(default_factory=list)  # under the distribution drawn from
    # Timings (time.monotonic()): the batch's prefill forward pass, when this request's
    # first token was chosen (None if it generated none) and when it finished.
    prefill_s: float = 0.0
    first_token_at: float | None = None
    finished_at: float = 0.0
    # With echo: the logprob of prompt token t given tokens[:t], for t = 1 .. P-1 (the first
    # prompt token has no context to be scored in).
    prompt_logprobs: list[float] | None = None
    # With top_logprobs = k: [(token id, model logprob)] * k per prompt token t = 1 .. P-1 (echo
    # only) and per completion token.
    prompt_top: list[list[tuple[int, float]]] | None = None
    top: list[list[tuple[int, float]]] | None = None


class _Row:
    """Decoding state of one request inside a batch."""

    def __init__(self, request: GenRequest, budget: int, eos_ids: frozenset[int], stop_window: int):
        self.request = request
        self.budget = budget
        self.eos_ids = eos_ids
        self.stop_window = stop_window
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.sampling_logprobs: list[float] = []
        self.finish_reason: str | None = "length" if budget == 0 else None
        self.matched_stop: str | None = None
        self.first_token_at: float | None = None
        self.finished_at = time.monotonic()
        self.prompt_logprobs: list[float] | None = None
        self.prompt_top: list[list[tuple[int, float]]] | None = None
        self.top: list[list[tuple[int, float]]] | None = [] if request.top_logprobs else None
        self.generator = None
        if request.temperature > 0:
            # Sampling runs on CPU with one generator per request, so a seed gives the same
            # draws whatever else is in the batch and whichever device runs the model.
            self.generator = torch.Generator(device="cpu")
            seed = request.seed if request.seed is not None else secrets.randbits(63)
            self.generator.manual_seed(int(seed))

    def push(self, token: int, logprob: float, sampling_logprob: float, now: float, decode,
             top: list[tuple[int, float]] | None = None) -> None:
        if self.first_token_at is None:
            self.first_token_at = now
        if self.top is not None:
            self.top.append(top or [])
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.sampling_logprobs.append(sampling_logprob)
        if token in self.eos_ids:
            self.finish_reason = "stop"
        elif self.request.stop:
            # Stops are matched on text, as a server matches them: the tail of the
            # completion, a token longer than the longest stop string, holds any match
            # the newest token completed (each token is at least one byte of text).
            tail = decode(self.tokens[-self.stop_window:])
            for text in self.request.stop:
                if text and text in tail:
                    self.finish_reason, self.matched_stop = "stop", text
                    break
        if self.finish_reason is None and len(self.tokens) >= self.budget:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self.finished_at = now

    def result(self, prefill_s: float) -> GenResult:
        return GenResult(self.tokens, self.logprobs, self.finish_reason or "length", self.matched_stop,
                         self.sampling_logprobs, prefill_s, self.first_token_at, self.finished_at,
                         self.prompt_logprobs, self.prompt_top, self.top)


def _top(logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """The k most likely tokens of each row of ``logprobs`` [N, V], most likely first."""
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
    return [list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]


def _draw(rows: list[_Row], logits: torch.Tensor) -> list[tuple[int, float]]:
    """Each row's next token and its sampling logprob, from the last position's logits [B, V].

    Greedy rows take the argmax. Sampled rows draw from softmax(logits / temperature)
    with the tokens outside top_k, then outside the top_p nucleus (tokens whose more
    likely ones already hold top_p of the mass; the most likely always stays), set to
    -inf. The draw is in vocabulary order from each row's own generator.
    """
    picks: list[tuple[int, float]] = [(int(t), 0.0) for t in torch.argmax(logits, dim=-1).tolist()]
    sampled = [i for i, r in enumerate(rows) if r.generator is not None and r.finish_reason is None]
    if not sampled:
        return picks
    scaled = logits[sampled].to("cpu", torch.float32)
    scaled /= torch.tensor([[rows[i].request.temperature] for i in sampled])
    cut = [j for j, i in enumerate(sampled) if rows[i].request.filtered]
    if cut:
        vocab = scaled.shape[-1]
        part, order = scaled[cut].sort(dim=-1, descending=True, stable=True)
        ranks = torch.arange(vocab)
        top_k = torch.tensor([[rows[sampled[j]].request.top_k if rows[sampled[j]].request.top_k > 0 else vocab]
                              for j in cut])
        drop = ranks >= top_k
        probs = torch.softmax(part.masked_fill(drop, float("-inf")), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely kept tokens
        drop |= before >= torch.tensor([[rows[sampled[j]].request.top_p] for j in cut])
        drop[:, 0] = False
        scaled[cut] = scaled[cut].masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf"))
    log_probs = torch.log_softmax(scaled, dim=-1)
    probs = log_probs.exp()
    for j, i in enumerate(sampled):
        token = int(torch.multinomial(probs[j], 1, generator=rows[i].generator))
        picks[i] = (token, float(log_probs[j, token]))
    return picks


class Sampler:
    """Serves completions from the base weights or from a hot-loaded trainer snapshot."""

    def __init__(self, base_model: str, *, seed: int = 0, device: str = "cpu"):
        self.card: ModelCard = resolve(base_model)
        self.base_model = base_model
        self.model = model_io.build_model(self.card, seed, device)
        self.model.requires_grad_(False)
        self.device = next(self.model.parameters()).device
        self.dtype = model_io.serving_dtype(self.device)
        self.model.to(self.dtype)
        self.vocab_size = self.card.config["vocab_size"]
        self.max_context_length = self.card.max_context_length
        self.eos_ids = frozenset(self.card.eos_token_ids)
        self.identity: str | None = None
        self._tokenizer = None
        # transformers 5.2x renamed the KV-cache argument and output field from
        # past_key_values to cache; accept either so a client's older pin still works.
        forward_params = inspect.signature(type(self.model).forward).parameters
        self._cache_name = "cache" if "cache" in forward_params else "past_key_values"

    def decode(self, token_ids: list[int]) -> str:
        """Text of ``token_ids`` with special tokens spelled out (what stop strings match)."""
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.card.tokenizer_dir)
        return self._tokenizer.decode(token_ids, skip_special_tokens=False)

    # -- weights

    def hot_load(self, snapshot_path: str) -> None:
        weights = read_snapshot(snapshot_path, self.base_model)
        model_io.load_weight_dict(self.model, {k: v.to(self.device, self.dtype) for k, v in weights.items()})
        self.identity = str(snapshot_path)

    # -- scoring

    @torch.no_grad()
    def score(self, token_ids: list[int], top_k: int = 0) -> tuple[list[float], list[list[tuple[int, float]]] | None]:
        """For t = 1 .. n-1: log p(token_t | tokens[:t]) under the served weights (what a
        trainer's forward computes for the same tokens), and with ``top_k`` the k most
        likely tokens at each of those positions, most likely first. One forward pass."""
        if len(token_ids) < 2:
            return [], ([] if top_k else None)
        if len(token_ids) > self.max_context_length:
            raise EngineError(f"{len(token_ids)} tokens exceed the model's context of {self.max_context_length}")
        ids = torch.as_tensor([token_ids], dtype=torch.int64)
        if bool(((ids < 0) | (ids >= self.vocab_size)).any()):
            raise EngineError(f"token ids must be in 0..{self.vocab_size - 1}")
        ids = ids.to(self.device)
        logprobs = torch.log_softmax(self.model(input_ids=ids, use_cache=False).logits[0, :-1].float(), dim=-1)
        picked = logprobs.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1).cpu().tolist()
        if not top_k:
            return picked, None
        values, top_ids = torch.topk(logprobs, min(top_k, logprobs.shape[-1]), dim=-1)
        return picked, [list(zip(row_ids, row_values)) for row_ids, row_values in
                        zip(top_ids.cpu().tolist(), values.cpu().tolist())]

    # -- generation

    @torch.no_grad()
    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Decode all requests together: left-padded prompts, one forward pass per step."""
        rows = [self._row(i, req) for i, req in enumerate(requests)]
        if not rows:
            return []
        # A scoring request (echo with max_tokens 0) generates nothing but still needs the prefill.
        live = [r for r in rows if r.finish_reason is None or r.request.echo]
        prefill_s = self._decode(live) if live else 0.0
        return [r.result(prefill_s) for r in rows]

    def _row(self, index: int, req: GenRequest) -> _Row:
        where = f"request {index}"
        if not req.prompt_ids:
            raise EngineError(f"{where}: empty prompt")
        ids = torch.as_tensor(req.prompt_ids, dtype=torch.int64)
        bad = ((ids < 0) | (ids >= self.vocab_size)).nonzero()
        if bad.numel():
            pos = int(bad[0, 0])
            raise EngineError(f"{where}: prompt token {int(ids[pos])} at position {pos} is outside the "
                              f"vocabulary (ids 0..{self.vocab_size - 1})")
        if len(req.prompt_ids) + min(req.max_tokens, 1) > self.max_context_length:
            raise EngineError(f"{where}: prompt is {len(req.prompt_ids)} tokens; the model's context is "
                              f"{self.max_context_length} tokens, leaving no room to generate")
        if req.max_tokens < 0:
            raise EngineError(f"{where}: max_tokens must be >= 0, got {req.max_tokens}")
        if not req.temperature >= 0:
            raise EngineError(f"{where}: temperature must be >= 0, got {req.temperature}")
        if not 0 < req.top_p <= 1:
            raise EngineError(f"{where}: top_p must be in (0, 1], got {req.top_p}")
        if req.top_k < -1:
            raise EngineError(f"{where}: top_k must be >= 0 (0 or -1: no limit), got {req.top_k}")
        # The completion is cut at the context end ("length"), as a server would.
        budget = min(req.max_tokens, self.max_context_length - len(req.prompt_ids))
        stop_window = 1 + max((len(text.encode("utf-8")) for text in req.stop), default=0)
        return _Row(req, budget, self.eos_ids, stop_window)

    def _decode(self, rows: list[_Row]) -> float:
        """Generate until every row finishes; returns the prefill forward pass's duration."""
        width = max(len(r.request.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), width), self.card.pad_token_id, dtype=torch.int64)
        mask = torch.zeros(len(rows), width, dtype=torch.int64)
        for i, r in enumerate(rows):
            n = len(r.request.prompt_ids)
            input_ids[i, width - n:] = torch.as_tensor(r.request.prompt_ids)
            mask[i, width - n:] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        prefill_s = 0.0
        echo = any(r.request.echo for r in rows)
        for step in range(max(1, max(r.budget for r in rows))):
            started = time.monotonic()
            # The prefill keeps every position's logits when a row scores its prompt.
            keep = 0 if step == 0 and echo else 1
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, logits_to_keep=keep, **{self._cache_name: cache})
            cache = getattr(out, self._cache_name)
            if keep == 0:
                self._score_prompts(rows, out.logits, width)
            logits = out.logits[:, -1].float()
            logprobs = torch.log_softmax(logits, dim=-1).cpu()
            if step == 0:
                prefill_s = time.monotonic() - started
            picks = _draw(rows, logits)
            now = time.monotonic()
            next_ids = []
            for i, (r, (token, sampling_logprob)) in enumerate(zip(rows, picks)):
                if r.finish_reason is None:
                    top = _top(logprobs[i:i + 1], r.request.top_logprobs)[0] if r.request.top_logprobs else None
                    r.push(token, float(logprobs[i, token]), sampling_logprob, now, self.decode, top)
                else:
                    token = self.card.pad_token_id  # finished rows ride along; their outputs are ignored
                next_ids.append(token)
            if all(r.finish_reason is not None for r in rows):
                break
            input_ids = torch.tensor(next_ids, dtype=torch.int64, device=self.device).unsqueeze(1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
        return prefill_s

    @staticmethod
    def _score_prompts(rows: list[_Row], logits: torch.Tensor, width: int) -> None:
        """Each echo row's prompt logprobs from the prefill's logits [B, width, V]: the
        logprob of prompt token t under the logits at position t-1 (left padding puts a
        prompt of n tokens at the last n positions)."""
        for i, r in enumerate(rows):
            if not r.request.echo:
                continue
            prompt = torch.as_tensor(r.request.prompt_ids, dtype=torch.int64)
            n = len(prompt)
            scores = torch.log_softmax(logits[i, width - n:width - 1].float(), dim=-1).cpu()
            r.prompt_logprobs = scores.gather(-1, prompt[1:, None]).squeeze(-1).tolist()
            if r.request.top_logprobs:
                r.prompt_top = _top(scores, r.request.top_logprobs)


def read_snapshot(snapshot_path: str, base_model: str) -> dict[str, torch.Tensor]:
    """Full float32 weights of a snapshot: a base as saved, a delta XOR-ed onto its base,
    a LoRA adapter merged into the base it was trained on."""
    path = Path(snapshot_path)
    try:
        meta = model_io.read_meta(path)
    except (OSError, ValueError):
        raise EngineError(f"no sampler snapshot at {snapshot_path!r}") from None
    if meta.get("kind") not in ("base", "delta", "adapter"):
        raise EngineError(f"{snapshot_path!r} is not a sampler snapshot")
    if meta.get("base_model") != base_model:
        raise EngineError(f"snapshot {snapshot_path!r} is for {meta.get('base_model')!r}, "
                          f"this deployment serves {base_model!r}")
    if meta["kind"] == "adapter":
        return model_io.adapter_snapshot_weights(path, meta)
    weights = model_io.load_weights(path)
    if meta["kind"] == "base":
        return weights
    base_path = meta.get("base_path")
    if not base_path or model_io.read_meta(base_path).get("kind") != "base":
        raise EngineError(f"delta snapshot {snapshot_path!r} names no readable base snapshot ({base_path!r})")
    return model_io.apply_xor_delta(model_io.load_weights(base_path), weights)
