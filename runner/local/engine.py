"""The local trainer: real forward/backward passes, AdamW, snapshots and state.

The HTTP layer decodes the SDK's wire types into `Example`s and calls a
`Trainer`; everything here is synchronous and not thread-safe, so the server
runs one call at a time per trainer, in the order the requests were sequenced.

Loss semantics follow Tinker's documented built-in losses: every loss is a SUM
over tokens (the "loss:sum" metric), and gradients accumulate across
forward_backward calls until optim_step.

Custom losses need nothing here: the SDK's forward_backward_custom runs
forward("cross_entropy") and then forward_backward("cross_entropy") with
weights = -dLoss/dlogprob, both ordinary calls.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import model as model_io
from .catalogue import EngineError, resolve

__all__ = [
    "EngineError", "Example", "ForwardResult", "Trainer", "Sampler", "GenRequest", "GenResult",
    "SUPPORTED_LOSSES", "weights_digest",
]


@dataclass
class Example:
    """One datum: model input tokens, and loss inputs aligned with them (length T each)."""

    tokens: list[int]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ForwardResult:
    logprobs: list[torch.Tensor]   # per example, float32 on CPU, logprob of target_tokens[t]
    metrics: dict[str, float]      # "name:reduction" keys, as the SDK's chunk merger requires


# --- losses ----------------------------------------------------------------------
# Each takes padded [B, L] tensors and returns the per-token loss (padding is
# masked out by the caller) plus extra metrics. `logp` carries the gradient.

_POLICY_INPUTS = ("target_tokens", "logprobs", "advantages")
LOSS_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),   # weights default to 1
    "importance_sampling": _POLICY_INPUTS,
    "ppo": _POLICY_INPUTS,
    "cispo": _POLICY_INPUTS,
    "dro": _POLICY_INPUTS,
}
SUPPORTED_LOSSES = tuple(LOSS_INPUTS)
DEFAULT_CLIP = (0.8, 1.2)   # ratio bounds for ppo / cispo: Tinker's epsilon = 0.2
DEFAULT_DRO_BETA = 0.05


def _config_float(config: dict, key: str, default: float) -> float:
    value = config.get(key, default)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise EngineError(f"loss_fn_config.{key} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise EngineError(f"loss_fn_config.{key} must be finite, got {value!r}")
    return value


def _token_losses(loss_fn: str, logp: torch.Tensor, batch: dict[str, torch.Tensor], mask: torch.Tensor,
                  config: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if loss_fn == "cross_entropy":
        weights = batch.get("weights")
        weights = mask if weights is None else weights
        return -weights * logp, {}
    sampling_logp, advantages = batch["logprobs"], batch["advantages"]
    ratio = torch.exp(logp - sampling_logp)
    if loss_fn == "importance_sampling":
        return -ratio * advantages, {}
    if loss_fn == "dro":
        # Direct reward optimisation: policy gradient with a quadratic penalty that
        # keeps the policy near the sampler.
        beta = _config_float(config, "beta", DEFAULT_DRO_BETA)
        return -(logp * advantages - 0.5 * beta * (logp - sampling_logp) ** 2), {}
    low = _config_float(config, "clip_low_threshold", DEFAULT_CLIP[0])
    high = _config_float(config, "clip_high_threshold", DEFAULT_CLIP[1])
    if not 0 <= low <= high:
        raise EngineError(f"need 0 <= clip_low_threshold <= clip_high_threshold, got {low} and {high}")
    # Per-token thresholds, when a datum carries them, override the config's scalars.
    low = batch.get("clip_low_threshold", torch.tensor(low, device=ratio.device))
    high = batch.get("clip_high_threshold", torch.tensor(high, device=ratio.device))
    clipped = torch.minimum(torch.maximum(ratio, low), high)
    clip_fraction = ((ratio < low) | (ratio > high)).float()
    extra = {"clip_fraction": clip_fraction}
    if loss_fn == "ppo":
        return -torch.minimum(ratio * advantages, clipped * advantages), extra
    if loss_fn == "cispo":
        # The clipped ratio is a constant weight; the gradient flows through logp only.
        return -clipped.detach() * logp * advantages, extra
    raise AssertionError(loss_fn)


def _check_loss_fn(loss_fn: str) -> None:
    if loss_fn not in LOSS_INPUTS:
        raise EngineError(f"loss function {loss_fn!r} is not supported by the local service; "
                          f"supported: {', '.join(SUPPORTED_LOSSES)}")


# --- batching ----------------------------------------------------------------------

_FLOAT_INPUTS = ("weights", "logprobs", "advantages", "clip_low_threshold", "clip_high_threshold")


@dataclass
class _Batch:
    input_ids: torch.Tensor            # [B, L], right-padded with 0
    mask: torch.Tensor                 # [B, L] float32, 1 on real positions
    inputs: dict[str, torch.Tensor]    # [B, L] each, zero-padded
    lengths: list[int]


def _make_batch(examples: list[Example], loss_fn: str, vocab_size: int, max_context: int,
                device: torch.device) -> _Batch:
    if not examples:
        raise EngineError("no data: the request holds zero datums")
    required = LOSS_INPUTS[loss_fn]
    lengths = []
    for i, ex in enumerate(examples):
        n = len(ex.tokens)
        if n == 0:
            raise EngineError(f"datum {i} has no input tokens")
        if n > max_context:
            raise EngineError(f"datum {i} is {n} tokens long; the model's context is {max_context} tokens")
        missing = [key for key in required if key not in ex.inputs]
        if missing:
            raise EngineError(f"datum {i} lacks loss_fn_inputs {missing} needed by loss {loss_fn!r}")
        lengths.append(n)
    width = max(lengths)
    B = len(examples)
    input_ids = torch.zeros(B, width, dtype=torch.int64)
    mask = torch.zeros(B, width, dtype=torch.float32)
    keys = [k for k in ("target_tokens", *_FLOAT_INPUTS) if any(k in ex.inputs for ex in examples)]
    for key in keys:  # a zero-padded gap would silently mean e.g. a clip threshold of 0
        lacking = [i for i, ex in enumerate(examples) if key not in ex.inputs]
        if lacking and key != "weights":
            raise EngineError(f"loss_fn_inputs[{key!r}] is given for some datums but not for datum {lacking[0]}")
    padded = {k: torch.zeros(B, width, dtype=torch.int64 if k == "target_tokens" else torch.float32)
              for k in keys}
    for i, ex in enumerate(examples):
        n = lengths[i]
        tokens = torch.as_tensor(ex.tokens, dtype=torch.int64)
        _check_ids(tokens, vocab_size, f"datum {i} input token")
        input_ids[i, :n] = tokens
        mask[i, :n] = 1.0
        for key in keys:
            if key not in ex.inputs:
                if key == "weights":  # absent weights mean "count every token"
                    padded[key][i, :n] = 1.0
                continue
            value = torch.as_tensor(ex.inputs[key])
            if value.dim() != 1 or value.numel() != n:
                raise EngineError(f"datum {i}: loss_fn_inputs[{key!r}] has shape {tuple(value.shape)}, "
                                  f"expected ({n},) to match its {n} input tokens")
            if key == "target_tokens":
                if value.is_floating_point() and not torch.equal(value, value.round()):
                    raise EngineError(f"datum {i}: target_tokens must be integers")
                value = value.to(torch.int64)
                _check_ids(value, vocab_size, f"datum {i} target token")
            else:
                value = value.to(torch.float32)
                if not torch.isfinite(value).all():
                    raise EngineError(f"datum {i}: loss_fn_inputs[{key!r}] holds NaN or infinite values")
            padded[key][i, :n] = value
    return _Batch(input_ids.to(device), mask.to(device), {k: v.to(device) for k, v in padded.items()}, lengths)


def _check_ids(ids: torch.Tensor, vocab_size: int, what: str) -> None:
    bad = ((ids < 0) | (ids >= vocab_size)).nonzero()
    if bad.numel():
        pos = int(bad[0, 0])
        raise EngineError(f"{what} {int(ids[pos])} at position {pos} is outside the vocabulary "
                          f"(ids 0..{vocab_size - 1})")


def _target_logprobs(model, batch: _Batch) -> torch.Tensor:
    """[B, L] log p(target_t | tokens[:t+1]). Right padding needs no attention mask:
    with causal attention, padding after a sequence cannot affect it."""
    logits = model(input_ids=batch.input_ids, use_cache=False).logits.float()
    targets = batch.inputs["target_tokens"]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


# --- the trainer ---------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_ADAM_DEFAULTS = {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12,
                  "weight_decay": 0.0, "grad_clip_norm": 0.0}
GRAD_NORMALIZATIONS = ("none", "num_loss_tokens", "num_sequences")
STATE_FORMAT = "firetitan-local-state/1"
SNAPSHOT_FORMAT = "firetitan-local-snapshot/1"


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise EngineError(f"invalid {what} name {name!r}: use letters, digits, '.', '_' or '-' "
                          "(at most 200, not starting with a dot)")
    return name


class Trainer:
    """A trainable (or forward-only) copy of a catalogue model."""

    def __init__(self, base_model: str, *, state_dir: Path, seed: int = 0, device: str = "cpu",
                 lora_rank: int = 0, forward_only: bool = False):
        self.card = resolve(base_model)  # UnknownModel is an EngineError
        if lora_rank:
            # Every shape in the catalogue is full-parameter; see docs/local_models.md.
            raise EngineError(f"lora_rank={lora_rank}: the local service trains full parameters only; "
                              "use lora_rank=0")
        self.base_model = base_model
        self.seed = seed
        self.lora_rank = 0
        self.forward_only = forward_only
        self.state_dir = Path(state_dir)
        self.model = model_io.build_model(self.card, seed, device)
        self.device = next(self.model.parameters()).device
        self.vocab_size = self.card.config["vocab_size"]
        self.max_context_length = self.card.max_context_length
        self.step = 0
        if forward_only:
            self.model.requires_grad_(False)
        self.optimizer = None if forward_only else self._new_optimizer()
        self._reset_accumulation()
        self._base_snapshot: tuple[str, dict[str, torch.Tensor]] | None = None

    def _new_optimizer(self) -> torch.optim.AdamW:
        # Hyperparameters are placeholders: optim_step sets them from each request.
        return torch.optim.AdamW(self.model.parameters(), lr=0.0, betas=(0.9, 0.95), eps=1e-12,
                                 weight_decay=0.0)

    def _reset_accumulation(self) -> None:
        self._loss_tokens = 0
        self._loss_sequences = 0

    # -- passes

    def forward(self, examples: list[Example], loss_fn: str = "cross_entropy",
                loss_fn_config: dict | None = None) -> ForwardResult:
        with torch.no_grad():
            return self._run(examples, loss_fn, loss_fn_config, backward=False)

    def forward_backward(self, examples: list[Example], loss_fn: str = "cross_entropy",
                         loss_fn_config: dict | None = None) -> ForwardResult:
        if self.forward_only:
            raise EngineError("this trainer is forward-only (a reference model); forward_backward is not allowed")
        return self._run(examples, loss_fn, loss_fn_config, backward=True)

    def _run(self, examples, loss_fn, loss_fn_config, *, backward: bool) -> ForwardResult:
        _check_loss_fn(loss_fn)
        config = dict(loss_fn_config or {})
        batch = _make_batch(examples, loss_fn, self.vocab_size, self.max_context_length, self.device)
        logp = _target_logprobs(self.model, batch)
        token_loss, extra = _token_losses(loss_fn, logp, batch.inputs, batch.mask, config)
        token_loss = token_loss * batch.mask
        loss = token_loss.sum()
        if backward:
            loss.backward()
            # Tokens/sequences that carry gradient, for optim_step's optional normalisation.
            coeff = batch.inputs.get("weights" if loss_fn == "cross_entropy" else "advantages", batch.mask)
            active = (coeff != 0) & (batch.mask > 0)
            self._loss_tokens += int(active.sum())
            self._loss_sequences += int(active.any(dim=1).sum())
        n_tokens = batch.mask.sum()
        metrics = {
            "loss:sum": float(loss.detach()),
            "num_tokens:sum": float(n_tokens),
            "num_sequences:sum": float(len(examples)),
        }
        for name, values in extra.items():
            metrics[f"{name}:mean"] = float((values * batch.mask).sum() / n_tokens)
        logp_cpu = logp.detach().to("cpu", torch.float32)
        per_example = [logp_cpu[i, :n].clone() for i, n in enumerate(batch.lengths)]
        return ForwardResult(per_example, metrics)

    # -- optimizer

    def optim_step(self, adam: dict, grad_accumulation_normalization: str | None = None) -> dict[str, float]:
        if self.forward_only:
            raise EngineError("this trainer is forward-only (a reference model); optim_step is not allowed")
        hp = self._adam_params(adam)
        params = [p for p in self.model.parameters() if p.grad is not None]
        self._normalise_grads(params, grad_accumulation_normalization)
        grads = [p.grad for p in params]
        grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if hp["grad_clip_norm"] > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(params, hp["grad_clip_norm"], torch.tensor(grad_norm))
        for group in self.optimizer.param_groups:
            group["lr"] = hp["learning_rate"]
            group["betas"] = (hp["beta1"], hp["beta2"])
            group["eps"] = hp["eps"]
            group["weight_decay"] = hp["weight_decay"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics = {"grad_norm": grad_norm, "learning_rate": hp["learning_rate"], "step": float(self.step),
                   "num_loss_tokens": float(self._loss_tokens),
                   "num_loss_sequences": float(self._loss_sequences)}
        self._reset_accumulation()
        return metrics

    @staticmethod
    def _adam_params(adam: dict) -> dict[str, float]:
        unknown = set(adam) - set(_ADAM_DEFAULTS) - {"emit_grad_norm_metrics"}
        if unknown:
            raise EngineError(f"unknown adam_params {sorted(unknown)}; expected {sorted(_ADAM_DEFAULTS)}")
        hp = {}
        for key, default in _ADAM_DEFAULTS.items():
            value = adam.get(key)
            value = default if value is None else value
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise EngineError(f"adam_params.{key} must be a number, got {value!r}") from None
            if not math.isfinite(value) or value < 0:
                raise EngineError(f"adam_params.{key} must be a finite number >= 0, got {value}")
            hp[key] = value
        for key in ("beta1", "beta2"):
            if hp[key] >= 1:
                raise EngineError(f"adam_params.{key} must be below 1, got {hp[key]}")
        return hp

    def _normalise_grads(self, params, mode: str | None) -> None:
        mode = (mode or "none").lower()
        if mode not in GRAD_NORMALIZATIONS:
            raise EngineError(f"unknown grad_accumulation_normalization {mode!r}; expected one of "
                              f"{', '.join(GRAD_NORMALIZATIONS)}")
        divisor = {"none": 1, "num_loss_tokens": self._loss_tokens,
                   "num_sequences": self._loss_sequences}[mode]
        if divisor > 1:
            with torch.no_grad():
                for p in params:
                    p.grad.div_(divisor)

    # -- sampler snapshots

    def save_sampler_snapshot(self, name: str, kind: str) -> dict:
        _check_name(name, "snapshot")
        if kind not in ("base", "delta"):
            raise EngineError(f"snapshot kind must be 'base' or 'delta', got {kind!r}")
        path = self.state_dir / "snapshots" / name
        if path.exists():
            raise EngineError(f"snapshot {name!r} already exists")
        weights = {k: v.to("cpu", copy=True) for k, v in model_io.weight_dict(self.model).items()}
        meta = {"format": SNAPSHOT_FORMAT, "kind": kind, "base_model": self.base_model, "step": self.step,
                "base_path": None}
        if kind == "base":
            _write_atomically(path, lambda tmp: model_io.save_weights(tmp, weights, meta))
            self._base_snapshot = (str(path), weights)
        else:
            if self._base_snapshot is None:
                raise EngineError("a delta snapshot needs a base snapshot first; save kind='base' once")
            base_path, base_weights = self._base_snapshot
            meta["base_path"] = base_path
            delta = model_io.xor_delta(weights, base_weights)
            _write_atomically(path, lambda tmp: model_io.save_weights(tmp, delta, meta))
        return {"path": str(path), "kind": kind, "base_path": meta["base_path"]}

    # -- training state ("DCP" checkpoints)

    def save_state(self, name: str) -> str:
        _check_name(name, "checkpoint")
        if self.forward_only:
            raise EngineError("this trainer is forward-only (a reference model); it has no state to save")
        path = self.state_dir / "checkpoints" / name
        meta = {"format": STATE_FORMAT, "base_model": self.base_model, "seed": self.seed, "step": self.step,
                "lora_rank": self.lora_rank}

        def write(tmp: Path) -> None:
            model_io.save_weights(tmp, model_io.weight_dict(self.model), meta)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")

        _write_atomically(path, write, replace=True)
        return str(path)

    def load_state(self, path: str, with_optimizer: bool = True) -> None:
        path = Path(path)
        try:
            meta = model_io.read_meta(path)
        except (OSError, ValueError):
            raise EngineError(f"no training state at {str(path)!r}") from None
        if meta.get("format") != STATE_FORMAT:
            raise EngineError(f"{str(path)!r} is not a training state (format {meta.get('format')!r})")
        if meta["base_model"] != self.base_model:
            raise EngineError(f"state at {str(path)!r} is for {meta['base_model']!r}, "
                              f"this trainer runs {self.base_model!r}")
        model_io.load_weight_dict(self.model, model_io.load_weights(path))
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer = self._new_optimizer()
            if with_optimizer:
                self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device,
                                                          weights_only=True))
        self.step = int(meta["step"])
        self._reset_accumulation()


def _write_atomically(path: Path, write: Callable[[Path], None], replace: bool = False) -> None:
    """Write into a temporary sibling, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if replace and path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


from .sampler import GenRequest, GenResult, Sampler  # noqa: E402  (re-exported; sampler imports EngineError)


def weights_digest(model: torch.nn.Module) -> dict:
    """sha256 over every parameter's name, shape, dtype and bytes, in name order: the
    debug endpoints compare a trainer's weights with a deployment's through it."""
    digest = hashlib.sha256()
    weights = model_io.weight_dict(model)
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        digest.update(tensor.numpy().tobytes())
    return {"sha256": digest.hexdigest(), "tensors": len(weights)}
