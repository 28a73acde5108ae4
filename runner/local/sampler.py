"""The deployment's copy of the model: hot loads of trainer snapshots, batched generation."""

from __future__ import annotations

import inspect
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import model as model_io
from .catalogue import EOS_TOKEN_IDS, ENDOFTEXT_ID, IM_END_ID, IM_START_ID, EngineError, resolve

_SPECIAL_TEXT = {"<|endoftext|>": ENDOFTEXT_ID, "<|im_start|>": IM_START_ID, "<|im_end|>": IM_END_ID}


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenResult:
    token_ids: list[int]       # completion only; includes the eos token or the stop string's bytes
    logprobs: list[float]      # model logprob (temperature 1, no top-p) of each completion token
    finish_reason: str         # "stop" | "length"
    matched_stop: str | None = None   # the stop string that ended it, if any (its bytes end token_ids)


def _stop_sequences(stop: list[str]) -> list[tuple[str, list[int]]]:
    """Stop strings as token-id sequences. The tokenizer maps byte b to id b, so a
    string's ids are its UTF-8 bytes; a special token's text is its single id."""
    return [(s, [_SPECIAL_TEXT[s]] if s in _SPECIAL_TEXT else list(s.encode("utf-8"))) for s in stop if s]


class _Row:
    """Decoding state of one request inside a batch."""

    def __init__(self, request: GenRequest, budget: int):
        self.request = request
        self.budget = budget
        self.stops = _stop_sequences(request.stop)
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.finish_reason: str | None = "length" if budget == 0 else None
        self.matched_stop: str | None = None
        self.generator = None
        if request.temperature > 0:
            # Sampling runs on CPU with one generator per request, so a seed gives the same
            # draws whatever else is in the batch and whichever device runs the model.
            self.generator = torch.Generator(device="cpu")
            seed = request.seed if request.seed is not None else secrets.randbits(63)
            self.generator.manual_seed(int(seed))

    def choose(self, logits: torch.Tensor) -> int:
        req = self.request
        if self.generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.to("cpu", torch.float32) / req.temperature, dim=-1)
        if req.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            before = sorted_probs.cumsum(0) - sorted_probs   # mass of strictly more likely tokens
            sorted_probs[before >= req.top_p] = 0.0          # always keeps the top token
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def push(self, token: int, logprob: float) -> None:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if token in EOS_TOKEN_IDS:
            self.finish_reason = "stop"
            return
        for text, ids in self.stops:
            if len(self.tokens) >= len(ids) and self.tokens[-len(ids):] == ids:
                self.finish_reason, self.matched_stop = "stop", text
                return
        if len(self.tokens) >= self.budget:
            self.finish_reason = "length"

    def result(self) -> GenResult:
        return GenResult(self.tokens, self.logprobs, self.finish_reason or "length", self.matched_stop)


class Sampler:
    """Serves completions from the base init or from a hot-loaded trainer snapshot."""

    def __init__(self, base_model: str, *, seed: int = 0, device: str = "cpu"):
        self.card = resolve(base_model)
        self.base_model = base_model
        self.model = model_io.build_model(self.card, seed, device)
        self.model.requires_grad_(False)
        self.device = next(self.model.parameters()).device
        self.vocab_size = self.card.config["vocab_size"]
        self.max_context_length = self.card.max_context_length
        self.identity: str | None = None
        # transformers 5.2x renamed the KV-cache argument and output field from
        # past_key_values to cache; accept either so a client's older pin still works.
        forward_params = inspect.signature(type(self.model).forward).parameters
        self._cache_name = "cache" if "cache" in forward_params else "past_key_values"

    # -- weights

    def hot_load(self, snapshot_path: str) -> None:
        weights = read_snapshot(snapshot_path, self.base_model)
        model_io.load_weight_dict(self.model, {k: v.to(self.device) for k, v in weights.items()})
        self.identity = str(snapshot_path)

    # -- generation

    @torch.no_grad()
    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Decode all requests together: left-padded prompts, one forward pass per step."""
        rows = [_Row(req, self._budget(i, req)) for i, req in enumerate(requests)]
        if not rows:
            return []
        live = [r for r in rows if r.finish_reason is None]
        if live:
            self._decode(live)
        return [r.result() for r in rows]

    def _budget(self, index: int, req: GenRequest) -> int:
        where = f"request {index}"
        if not req.prompt_ids:
            raise EngineError(f"{where}: empty prompt")
        ids = torch.as_tensor(req.prompt_ids, dtype=torch.int64)
        bad = ((ids < 0) | (ids >= self.vocab_size)).nonzero()
        if bad.numel():
            pos = int(bad[0, 0])
            raise EngineError(f"{where}: prompt token {int(ids[pos])} at position {pos} is outside the "
                              f"vocabulary (ids 0..{self.vocab_size - 1})")
        if len(req.prompt_ids) >= self.max_context_length:
            raise EngineError(f"{where}: prompt is {len(req.prompt_ids)} tokens; the model's context is "
                              f"{self.max_context_length} tokens, leaving no room to generate")
        if req.max_tokens < 0:
            raise EngineError(f"{where}: max_tokens must be >= 0, got {req.max_tokens}")
        if not req.temperature >= 0:
            raise EngineError(f"{where}: temperature must be >= 0, got {req.temperature}")
        if not 0 < req.top_p <= 1:
            raise EngineError(f"{where}: top_p must be in (0, 1], got {req.top_p}")
        # The completion is cut at the context end ("length"), as a server would.
        return min(req.max_tokens, self.max_context_length - len(req.prompt_ids))

    def _decode(self, rows: list[_Row]) -> None:
        width = max(len(r.request.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), width), ENDOFTEXT_ID, dtype=torch.int64)
        mask = torch.zeros(len(rows), width, dtype=torch.int64)
        for i, r in enumerate(rows):
            n = len(r.request.prompt_ids)
            input_ids[i, width - n:] = torch.as_tensor(r.request.prompt_ids)
            mask[i, width - n:] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        for _ in range(max(r.budget for r in rows)):
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1, **{self._cache_name: cache})
            cache = getattr(out, self._cache_name)
            logits = out.logits[:, -1].float()
            logprobs = torch.log_softmax(logits, dim=-1).cpu()
            next_ids = []
            for i, r in enumerate(rows):
                if r.finish_reason is None:
                    token = r.choose(logits[i])
                    r.push(token, float(logprobs[i, token]))
                else:
                    token = ENDOFTEXT_ID  # finished rows ride along; their outputs are ignored
                next_ids.append(token)
            if all(r.finish_reason is not None for r in rows):
                return
            input_ids = torch.tensor(next_ids, dtype=torch.int64, device=self.device).unsqueeze(1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1


def read_snapshot(snapshot_path: str, base_model: str) -> dict[str, torch.Tensor]:
    """Full float32 weights of a snapshot: a base as saved, a delta XOR-ed onto its base."""
    path = Path(snapshot_path)
    try:
        meta = model_io.read_meta(path)
    except (OSError, ValueError):
        raise EngineError(f"no sampler snapshot at {snapshot_path!r}") from None
    if meta.get("kind") not in ("base", "delta"):
        raise EngineError(f"{snapshot_path!r} is not a sampler snapshot")
    if meta.get("base_model") != base_model:
        raise EngineError(f"snapshot {snapshot_path!r} is for {meta.get('base_model')!r}, "
                          f"this deployment serves {base_model!r}")
    weights = model_io.load_weights(path)
    if meta["kind"] == "base":
        return weights
    base_path = meta.get("base_path")
    if not base_path or model_io.read_meta(base_path).get("kind") != "base":
        raise EngineError(f"delta snapshot {snapshot_path!r} names no readable base snapshot ({base_path!r})")
    return model_io.apply_xor_delta(model_io.load_weights(base_path), weights)
