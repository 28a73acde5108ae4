"""The local trainer: real forward/backward passes, AdamW, snapshots and state.

The HTTP layer decodes the SDK's wire types into `Datum`s and calls a
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
import itertools
import json
import math
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import model as model_io
from .catalogue import EngineError, resolve

__all__ = [
    "Batch", "EngineError", "Datum", "ForwardResult", "LoraSettings", "Trainer", "Sampler", "GenRequest", "GenResult",
    "SUPPORTED_LOSSES", "adam_hyperparams", "check_examples", "check_loss_fn", "prepare_batch", "prepare_dense_batch",
    "weights_digest",
]


@dataclass
class Datum:
    """One datum of a forward(_backward) request, as the SDK names it (not a task's Example):
    model input tokens, and loss inputs aligned with them (length T each)."""

    tokens: list[int]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ForwardResult:
    logprobs: list[torch.Tensor]   # per example, float32 on CPU, logprob of target_tokens[t]
    metrics: dict[str, float]      # "name:reduction" keys, as the SDK's chunk merger requires
    padded: torch.Tensor | None = None  # [B, L]: the logprobs right-padded, whose rows they view

    def logprob_lists(self) -> list[list[float]]:
        """Each example's logprobs as Python floats, converted for the whole batch at once."""
        if self.padded is None:
            return [logprobs.tolist() for logprobs in self.logprobs]
        return [row[:len(logprobs)] for row, logprobs in zip(self.padded.tolist(), self.logprobs)]


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


def check_loss_fn(loss_fn: str) -> None:
    if loss_fn not in LOSS_INPUTS:
        raise EngineError(f"unknown loss function {loss_fn!r}: the local trainer supports "
                          f"{', '.join(SUPPORTED_LOSSES)}")


# --- batching ----------------------------------------------------------------------

_FLOAT_INPUTS = ("weights", "logprobs", "advantages", "clip_low_threshold", "clip_high_threshold")


@dataclass
class Batch:
    """Datums checked against a model and padded into tensors (``prepare_batch``): what a
    forward pass takes. The trainer plane prepares it when the request arrives, so the
    worker runs the model at once and the rules run once per request."""

    input_ids: torch.Tensor            # [B, L], right-padded with 0
    mask: torch.Tensor                 # [B, L] float32, 1 on real positions
    inputs: dict[str, torch.Tensor]    # [B, L] each, zero-padded
    lengths: list[int]
    loss_fn: str                       # the loss whose inputs were checked

    def to(self, device: torch.device) -> "Batch":
        if self.input_ids.device == device:
            return self
        return Batch(self.input_ids.to(device), self.mask.to(device),
                     {k: v.to(device) for k, v in self.inputs.items()}, self.lengths, self.loss_fn)


def check_examples(examples: list[Datum], loss_fn: str, vocab_size: int, max_context: int) -> None:
    """Every rule a batch of datums must meet, in one place: the trainer planes call it
    (through ``prepare_batch``) when a request arrives, a 400 at once.

    A vectorised pass over the whole batch decides; only a batch it refuses goes through the
    datum-by-datum rules, which name the first datum and position at fault."""
    check_loss_fn(loss_fn)
    if not examples:
        raise EngineError("no data: the request holds zero datums")
    try:
        valid = _batch_is_valid(examples, loss_fn, vocab_size, max_context)
    except (TypeError, ValueError, RuntimeError):  # e.g. an input torch cannot read: the rules say which
        valid = False
    if not valid:
        _check_each_example(examples, loss_fn, vocab_size, max_context)


def _present_keys(examples: list[Datum]) -> list[str]:
    return [k for k in ("target_tokens", *_FLOAT_INPUTS) if any(k in ex.inputs for ex in examples)]


def _batch_is_valid(examples: list[Datum], loss_fn: str, vocab_size: int, max_context: int) -> bool:
    """True only if ``_check_each_example`` would pass, decided with a few whole-batch
    tensor operations instead of a few per datum (the difference is a millisecond a step)."""
    required = LOSS_INPUTS[loss_fn]
    present = _present_keys(examples)
    by_key: dict[str, list[torch.Tensor]] = {}
    for ex in examples:
        tokens, n = ex.tokens, len(ex.tokens)
        if not 0 < n <= max_context or any(key not in ex.inputs for key in required):
            return False
        if any(key not in ex.inputs and key != "weights" for key in present):
            return False
        if set(map(type, tokens)) != {int} or min(tokens) < 0 or max(tokens) >= vocab_size:
            return False
        for key, raw in ex.inputs.items():
            value = torch.as_tensor(raw)
            if value.dim() != 1 or value.numel() != n:
                return False
            by_key.setdefault(key, []).append(value)
    for key, values in by_key.items():
        if key == "target_tokens":
            if any(value.is_floating_point() for value in values):
                return False  # integral floats are allowed; the per-datum rules judge them
            ids = torch.cat([value.to(torch.int64) for value in values])
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
                return False
        elif key in _FLOAT_INPUTS and not torch.isfinite(torch.cat(values).to(torch.float32)).all():
            return False
    return True


def _check_each_example(examples: list[Datum], loss_fn: str, vocab_size: int, max_context: int) -> None:
    """The rules datum by datum: raises naming the first datum (and position) at fault."""
    required = LOSS_INPUTS[loss_fn]
    present = _present_keys(examples)
    for i, ex in enumerate(examples):
        n = len(ex.tokens)
        if n == 0:
            raise EngineError(f"datum {i} has no input tokens")
        if n > max_context:
            raise EngineError(f"datum {i} is {n} tokens long, beyond the model's context length of {max_context} "
                              "tokens")
        missing = [key for key in required if key not in ex.inputs]
        if missing:
            raise EngineError(f"datum {i} lacks loss_fn_inputs {missing} needed by loss {loss_fn!r}")
        lacking = [key for key in present if key not in ex.inputs and key != "weights"]
        if lacking:  # a zero-padded gap would silently mean e.g. a clip threshold of 0
            raise EngineError(f"loss_fn_inputs[{lacking[0]!r}] is given for some datums but not for datum {i}")
        for pos, token in enumerate(ex.tokens):
            if type(token) is not int:
                raise EngineError(f"datum {i}: input token {token!r} at position {pos} is not an integer")
            if not 0 <= token < vocab_size:
                raise EngineError(f"datum {i} input token {token} at position {pos} is outside the vocabulary "
                                  f"(ids 0..{vocab_size - 1})")
        for key, raw in ex.inputs.items():
            value = torch.as_tensor(raw)
            if value.dim() != 1 or value.numel() != n:
                raise EngineError(f"datum {i}: loss_fn_inputs[{key!r}] has shape {tuple(value.shape)}, "
                                  f"expected ({n},) to match its {n} input tokens")
            if key == "target_tokens":
                if value.is_floating_point() and not torch.equal(value, value.round()):
                    raise EngineError(f"datum {i}: target_tokens must be integers")
                _check_ids(value.to(torch.int64), vocab_size, f"datum {i} target token")
            elif key in _FLOAT_INPUTS and not torch.isfinite(value.to(torch.float32)).all():
                raise EngineError(f"datum {i}: loss_fn_inputs[{key!r}] holds NaN or infinite values")


def prepare_batch(examples: list[Datum], loss_fn: str, vocab_size: int, max_context: int) -> Batch:
    """``examples`` checked (``check_examples``) and right-padded into CPU tensors."""
    check_examples(examples, loss_fn, vocab_size, max_context)
    lengths = [len(ex.tokens) for ex in examples]
    width = max(lengths)
    input_ids = torch.tensor([ex.tokens if len(ex.tokens) == width else ex.tokens + [0] * (width - len(ex.tokens))
                              for ex in examples], dtype=torch.int64)
    mask = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).to(torch.float32)
    padded = {}
    for key in _present_keys(examples):
        dtype = torch.int64 if key == "target_tokens" else torch.float32
        # absent weights (allowed for cross_entropy) mean "count every token"
        rows = [torch.as_tensor(ex.inputs[key]).to(dtype) if key in ex.inputs else torch.ones(n, dtype=dtype)
                for ex, n in zip(examples, lengths)]
        padded[key] = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    return Batch(input_ids, mask, padded, lengths, loss_fn)


def prepare_dense_batch(tokens: list[list[int]], inputs: dict[str, torch.Tensor], loss_fn: str, vocab_size: int,
                        max_context: int) -> Batch | None:
    """What ``prepare_batch`` builds from the same datums, for datums of one length whose loss
    inputs arrive as [B, L] tensors (``wire.dense_columns``: the SDK's usual request), in a few
    whole-batch operations instead of a few per datum. None wherever ``check_examples`` might
    refuse the datums: the caller then goes through ``prepare_batch``, whose messages name the
    datum at fault."""
    check_loss_fn(loss_fn)
    shape = (len(tokens), len(tokens[0]) if tokens else 0)
    if not 0 < shape[1] <= max_context or any(len(row) != shape[1] for row in tokens):
        return None
    if any(key not in inputs for key in LOSS_INPUTS[loss_fn]) or any(v.shape != shape for v in inputs.values()):
        return None
    if set(map(type, itertools.chain.from_iterable(tokens))) != {int}:  # bools and floats are not token ids
        return None
    try:
        input_ids = torch.tensor(tokens, dtype=torch.int64)
    except (OverflowError, RuntimeError):
        return None
    targets = inputs["target_tokens"]  # every loss needs them
    if targets.is_floating_point():  # integral floats are allowed; the per-datum rules judge them
        return None
    for ids in (input_ids, targets):
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            return None
    padded = {"target_tokens": targets}
    for key in _FLOAT_INPUTS:
        if key in inputs:
            padded[key] = inputs[key].to(torch.float32)
            if not torch.isfinite(padded[key]).all():
                return None
    return Batch(input_ids, torch.ones(shape, dtype=torch.float32), padded, [shape[1]] * shape[0], loss_fn)


def _check_ids(ids: torch.Tensor, vocab_size: int, what: str) -> None:
    bad = ((ids < 0) | (ids >= vocab_size)).nonzero()
    if bad.numel():
        pos = int(bad[0, 0])
        raise EngineError(f"{what} {int(ids[pos])} at position {pos} is outside the vocabulary "
                          f"(ids 0..{vocab_size - 1})")


def _target_logprobs(model, batch: Batch) -> torch.Tensor:
    """[B, L] log p(target_t | tokens[:t+1]). Right padding needs no attention mask:
    with causal attention, padding after a sequence cannot affect it."""
    logits = model(input_ids=batch.input_ids, use_cache=False).logits.float()
    targets = batch.inputs["target_tokens"]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


# --- the trainer ---------------------------------------------------------------------

_ADAM_DEFAULTS = {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12,
                  "weight_decay": 0.0, "grad_clip_norm": 0.0}
GRAD_NORMALIZATIONS = ("none", "num_loss_tokens", "num_sequences")
LEGACY_STATE_FORMAT = "firetitan-local-state/1"  # model.safetensors + optimizer.pt (torch.save)
STATE_FORMAT = "firetitan-local-state/2"         # torch.distributed.checkpoint: model and optimizer
SNAPSHOT_FORMAT = "firetitan-local-snapshot/1"
SNAPSHOT_KINDS = ("base", "delta", "merged_base")
# LoRA wraps every linear layer of a Qwen3 block; train_* pick which (the SDK's LoraConfig flags).
_LORA_TARGETS = {"train_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
                 "train_mlp": ("gate_proj", "up_proj", "down_proj"),
                 "train_unembed": ("lm_head",)}


def adam_hyperparams(adam: dict) -> dict[str, float]:
    """``adam_params`` of an optim_step request, validated, with defaults filled in."""
    if not isinstance(adam, dict):
        raise EngineError("adam_params must be an object")
    unknown = set(adam) - set(_ADAM_DEFAULTS) - {"emit_grad_norm_metrics"}
    if unknown:
        raise EngineError(f"unknown adam_params {sorted(unknown)}; expected {sorted(_ADAM_DEFAULTS)}")
    hp = {}
    for key, default in _ADAM_DEFAULTS.items():
        value = adam.get(key)
        value = default if value is None else value
        if isinstance(value, bool):
            raise EngineError(f"adam_params.{key} must be a number, got {value!r}")
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


def grad_normalization(mode: object) -> str:
    """``grad_accumulation_normalization`` of an optim_step request, validated."""
    if mode is None:
        return "none"
    if not isinstance(mode, str) or mode.lower() not in GRAD_NORMALIZATIONS:
        raise EngineError(f"unknown grad_accumulation_normalization {mode!r}; expected one of "
                          f"{', '.join(GRAD_NORMALIZATIONS)}")
    return mode.lower()


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA trainer's adapters: the SDK's ``LoraConfig`` (rank, alpha, seed, train_*)."""

    rank: int
    alpha: int | None = None       # None: the backend default, 2 * rank
    seed: int | None = None        # adapter init; None: the trainer's seed
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True

    @property
    def effective_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.rank

    @property
    def scale(self) -> float:
        return self.effective_alpha / self.rank

    def targets(self) -> list[str]:
        return [name for flag, names in _LORA_TARGETS.items() if getattr(self, flag) for name in names]


def _lora_model(base: torch.nn.Module, lora: LoraSettings, seed: int) -> torch.nn.Module:
    """``base`` wrapped by peft: frozen base weights, trainable adapters (A kaiming, B zero)."""
    from peft import LoraConfig, get_peft_model

    if lora.rank < 1:
        raise EngineError(f"lora rank must be >= 1, got {lora.rank}")
    if not lora.targets():
        raise EngineError("LoRA with train_attn, train_mlp and train_unembed all false has nothing to train")
    config = LoraConfig(r=lora.rank, lora_alpha=lora.effective_alpha, target_modules=lora.targets(),
                        lora_dropout=0.0, bias="none", init_lora_weights=True)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # the adapter init is seeded, as the base's
        # peft asks transformers a deprecated question (is_gradient_checkpointing); not ours to answer.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed if lora.seed is None else lora.seed)
        return get_peft_model(base, config)


def _base_name(peft_name: str) -> str:
    """A peft parameter name as the plain model names it (what snapshots and deployments use)."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


class Trainer:
    """A trainable (or forward-only) copy of a catalogue model, full-parameter or LoRA.

    Names of snapshots and states are validated where requests arrive (the trainer
    plane, through ``state.check_name``); the trainer takes them as given.
    """

    def __init__(self, base_model: str, *, state_dir: Path, seed: int = 0, device: str = "cpu",
                 lora: LoraSettings | None = None, forward_only: bool = False):
        self.card = resolve(base_model)  # UnknownModel is an EngineError
        self.base_model = base_model
        self.seed = seed
        self.lora = lora
        self.forward_only = forward_only
        self.state_dir = Path(state_dir)
        if lora is None:
            self.model = model_io.build_model(self.card, seed, device)
        else:  # wrapped on CPU, so the adapter init is the same on every device
            self.model = _lora_model(model_io.build_model(self.card, seed, "cpu"), lora, seed)
            self.model.to(model_io.pick_device(device))
        self.device = next(self.model.parameters()).device
        self.vocab_size = self.card.config["vocab_size"]
        self.max_context_length = self.card.max_context_length
        self.step = 0
        if forward_only:
            self.model.requires_grad_(False)
        self.optimizer = None if forward_only else self._new_optimizer()
        self._reset_accumulation()
        self._base_snapshot: tuple[str, dict[str, torch.Tensor]] | None = None

    @property
    def lora_rank(self) -> int:
        return self.lora.rank if self.lora else 0

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _new_optimizer(self) -> torch.optim.AdamW:
        # Only what trains has moments: under LoRA, the adapters. Hyperparameters are
        # placeholders: optim_step sets them from each request.
        return torch.optim.AdamW(self._trainable(), lr=0.0, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)

    def _reset_accumulation(self) -> None:
        self._loss_tokens = 0
        self._loss_sequences = 0

    def optimizer_state_bytes(self) -> int:
        """Bytes the optimizer's moments take (the LoRA saving the benchmark reports)."""
        if self.optimizer is None:
            return 0
        return sum(t.numel() * t.element_size() for state in self.optimizer.state.values()
                   for t in state.values() if isinstance(t, torch.Tensor))

    def effective_weights(self) -> dict[str, torch.Tensor]:
        """The weights a deployment serves for this trainer, by plain model names:
        its own weights, or under LoRA the base with the adapters merged in."""
        if self.lora is None:
            return model_io.weight_dict(self.model)
        from peft import get_peft_model_state_dict

        base = {_base_name(name): p.detach() for name, p in self.model.named_parameters() if "lora_" not in name}
        adapter = get_peft_model_state_dict(self.model, save_embedding_layers=False)
        return model_io.merge_lora(base, adapter, self.lora.scale)

    # -- passes

    def forward(self, examples: list[Datum] | Batch, loss_fn: str = "cross_entropy",
                loss_fn_config: dict | None = None, *, base_only: bool = False) -> ForwardResult:
        """Logprobs and loss without gradients. ``base_only`` on a LoRA trainer runs the
        frozen base with the adapters disabled (the seed's shared-session reference)."""
        if base_only and self.lora is None:
            raise EngineError("base_only forwards need a LoRA trainer (adapters to disable); this trainer "
                              "trains full parameters, so its base is gone after the first step")
        with torch.no_grad():
            if base_only:
                with self.model.disable_adapter():
                    return self._run(examples, loss_fn, loss_fn_config, backward=False)
            return self._run(examples, loss_fn, loss_fn_config, backward=False)

    def forward_backward(self, examples: list[Datum] | Batch, loss_fn: str = "cross_entropy",
                         loss_fn_config: dict | None = None) -> ForwardResult:
        if self.forward_only:
            raise EngineError("this trainer is forward-only (a reference model); forward_backward is not allowed")
        return self._run(examples, loss_fn, loss_fn_config, backward=True)

    def _run(self, data: list[Datum] | Batch, loss_fn, loss_fn_config, *, backward: bool) -> ForwardResult:
        config = dict(loss_fn_config or {})
        if not isinstance(data, Batch):
            data = prepare_batch(data, loss_fn, self.vocab_size, self.max_context_length)
        elif data.loss_fn != loss_fn:
            raise EngineError(f"a batch prepared for loss {data.loss_fn!r} cannot run loss {loss_fn!r}")
        batch = data.to(self.device)
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
            "num_sequences:sum": float(len(batch.lengths)),
        }
        for name, values in extra.items():
            metrics[f"{name}:mean"] = float((values * batch.mask).sum() / n_tokens)
        logp_cpu = logp.detach().to("cpu", torch.float32)
        return ForwardResult([logp_cpu[i, :n] for i, n in enumerate(batch.lengths)], metrics, logp_cpu)

    # -- optimizer

    def optim_step(self, adam: dict, grad_accumulation_normalization: str | None = None) -> dict[str, float]:
        if self.forward_only:
            raise EngineError("this trainer is forward-only (a reference model); optim_step is not allowed")
        hp = adam_hyperparams(adam)
        mode = grad_normalization(grad_accumulation_normalization)
        # The optimizer holds exactly the trainable parameters, in model order (_new_optimizer):
        # no walk over every module each step.
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        self._normalise_grads(params, mode)
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

    def _normalise_grads(self, params, mode: str) -> None:
        divisor = {"none": 1, "num_loss_tokens": self._loss_tokens,
                   "num_sequences": self._loss_sequences}[mode]
        if divisor > 1:
            with torch.no_grad():
                for p in params:
                    p.grad.div_(divisor)

    # -- sampler snapshots

    def save_sampler_snapshot(self, name: str, kind: str) -> dict:
        """Write what a deployment loads. Full-parameter: "base" (float32 weights) or
        "delta" (XOR against the last base). LoRA: "base" is the adapter alone (a PEFT
        directory, kind "adapter"), "merged_base" the base with the adapter folded in."""
        if kind not in SNAPSHOT_KINDS:
            raise EngineError(f"snapshot kind must be one of {', '.join(SNAPSHOT_KINDS)}, got {kind!r}")
        if self.lora is None and kind == "merged_base":
            raise EngineError("checkpoint_type 'merged_base' folds a LoRA adapter into the base; this trainer "
                              "trains full parameters (use 'base' or 'delta')")
        if self.lora is not None and kind == "delta":
            raise EngineError("checkpoint_type 'delta' is for full-parameter training; a LoRA trainer saves "
                              "standalone adapters ('base') or 'merged_base'")
        path = self.state_dir / "snapshots" / name
        if path.exists():
            raise EngineError(f"snapshot {name!r} already exists on this trainer; save under a new name")
        meta = {"format": SNAPSHOT_FORMAT, "kind": kind, "base_model": self.base_model, "step": self.step,
                "base_path": None}
        if self.lora is not None and kind == "base":
            meta.update(kind="adapter", base_seed=self.seed, lora=asdict(self.lora), scale=self.lora.scale)
            _write_atomically(path, lambda tmp: self._write_adapter(tmp, meta))
            return {"path": str(path), "kind": "adapter", "base_path": None}
        weights = {k: v.to("cpu", copy=True) for k, v in self.effective_weights().items()}
        if kind in ("base", "merged_base"):
            meta["kind"] = "base"  # a merged base is a plain full checkpoint to a deployment
            _write_atomically(path, lambda tmp: model_io.save_weights(tmp, weights, meta))
            self._base_snapshot = (str(path), weights)
            return {"path": str(path), "kind": kind, "base_path": None}
        if self._base_snapshot is None:
            raise EngineError("a delta snapshot needs a base snapshot first; save kind='base' once")
        base_path, base_weights = self._base_snapshot
        meta["base_path"] = base_path
        delta = model_io.xor_delta(weights, base_weights)
        _write_atomically(path, lambda tmp: model_io.save_weights(tmp, delta, meta))
        return {"path": str(path), "kind": kind, "base_path": meta["base_path"]}

    def _write_adapter(self, directory: Path, meta: dict) -> None:
        """A PEFT adapter directory (adapter_model.safetensors, adapter_config.json) plus our meta."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        adapter = get_peft_model_state_dict(self.model, save_embedding_layers=False)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in adapter.items()},
                  str(directory / model_io.ADAPTER_FILE))
        config = self.model.peft_config["default"].to_dict()
        config.update(base_model_name_or_path=self.base_model, target_modules=sorted(config["target_modules"]))
        (directory / model_io.ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True,
                                                                         default=str) + "\n")
        (directory / model_io.META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    # -- training state (DCP checkpoints)

    def _state_options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # Under LoRA only the adapters are state: the base is fixed by (model, seed).
        # strict=False lets the adapters load into a model whose base is not in the
        # state; dcp.load still fails on any adapter tensor missing from the checkpoint.
        lora = self.lora is not None
        return StateDictOptions(ignore_frozen_params=lora, strict=not lora)

    def _state_meta(self) -> dict:
        return {"format": STATE_FORMAT, "base_model": self.base_model, "seed": self.seed, "step": self.step,
                "lora_rank": self.lora_rank, "lora": asdict(self.lora) if self.lora else None}

    def save_state(self, name: str) -> str:
        """Model and optimizer state dicts through torch.distributed.checkpoint, as the
        managed trainer writes them; one process here, so no process group."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if self.forward_only:
            raise EngineError("this trainer is forward-only (a reference model); it has no state to save")
        path = self.state_dir / "checkpoints" / name
        meta = self._state_meta()
        if self.optimizer.state:
            model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self._state_options())
            state = {"model": model_state, "optimizer": optim_state}
        else:
            # No step yet, so no moments. (get_state_dict would take a zero-gradient step to
            # create some, which changes how the next real step is bias-corrected.)
            state = {"model": get_model_state_dict(self.model, options=self._state_options())}
        meta["optimizer"] = "optimizer" in state

        def write(tmp: Path) -> None:
            with _single_process_dcp():
                dcp.save(state, checkpoint_id=str(tmp))
            (tmp / model_io.META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

        _write_atomically(path, write, replace=True)
        return str(path)

    def load_state(self, path: str, with_optimizer: bool = True) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                             set_model_state_dict, set_state_dict)

        path = Path(path)
        try:
            meta = model_io.read_meta(path)
        except (OSError, ValueError):
            raise EngineError(f"no training state at {str(path)!r}") from None
        if meta.get("format") not in (STATE_FORMAT, LEGACY_STATE_FORMAT):
            raise EngineError(f"{str(path)!r} is not a training state this service reads (format "
                              f"{meta.get('format')!r}; expected {STATE_FORMAT!r})")
        if meta["base_model"] != self.base_model:
            raise EngineError(f"state at {str(path)!r} is for {meta['base_model']!r}, "
                              f"this trainer runs {self.base_model!r}")
        saved_rank = int(meta.get("lora_rank") or 0)
        if saved_rank != self.lora_rank:
            raise EngineError(f"lora rank mismatch: the state at {str(path)!r} was saved with lora_rank="
                              f"{saved_rank}, this trainer has lora_rank={self.lora_rank} (trainingConfig.loraRank)")
        if meta["format"] == LEGACY_STATE_FORMAT:
            self._load_legacy_state(path, with_optimizer)
        else:
            if self.lora is not None and int(meta.get("seed", self.seed)) != self.seed:
                self._rebuild_base(int(meta["seed"]))  # adapters are only meaningful on their own base
            options = self._state_options()
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
                self.optimizer = self._new_optimizer()
            try:
                with _single_process_dcp():
                    if with_optimizer and self.optimizer is not None and meta.get("optimizer", True):
                        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=options)
                        state = {"model": model_state, "optimizer": optim_state}
                        dcp.load(state, checkpoint_id=str(path))
                        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                                       optim_state_dict=state["optimizer"], options=options)
                    else:
                        state = {"model": get_model_state_dict(self.model, options=options)}
                        dcp.load(state, checkpoint_id=str(path))
                        set_model_state_dict(self.model, state["model"], options=options)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise EngineError(f"state at {str(path)!r} does not fit this trainer: {exc}") from None
        self.step = int(meta["step"])
        self._reset_accumulation()

    @torch.no_grad()
    def _rebuild_base(self, seed: int) -> None:
        """Under LoRA: replace the frozen base weights with the init of ``seed``."""
        base = model_io.weight_dict(model_io.build_model(self.card, seed, "cpu"))
        for name, param in self.model.named_parameters():
            if "lora_" not in name:
                param.copy_(base[_base_name(name)])
        self.seed = seed

    def _load_legacy_state(self, path: Path, with_optimizer: bool) -> None:
        """States written before DCP (model.safetensors + optimizer.pt): full-parameter only."""
        model_io.load_weight_dict(self.model, model_io.load_weights(path))
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer = self._new_optimizer()
            if with_optimizer:
                self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device,
                                                          weights_only=True))


class _single_process_dcp(warnings.catch_warnings):
    """DCP warns that it runs without a process group; here that is the design, not a slip."""

    def __enter__(self):
        super().__enter__()
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        return self


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


def weights_digest(weights: torch.nn.Module | dict[str, torch.Tensor]) -> dict:
    """sha256 over every tensor's name, shape, dtype and bytes, in name order: the
    debug endpoints compare a trainer's weights with a deployment's through it."""
    digest = hashlib.sha256()
    if isinstance(weights, torch.nn.Module):
        weights = model_io.weight_dict(weights)
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        digest.update(tensor.numpy().tobytes())
    return {"sha256": digest.hexdigest(), "tensors": len(weights)}
