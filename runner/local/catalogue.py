"""What the local service can serve: base models, training shapes, the tokenizer.

Plain data only (no torch import), so the control plane can answer listings
without loading a model. Every name maps to a *small* config of the model's own
transformers architecture (Qwen3, Qwen3.5, Qwen3.5-MoE) that runs on a CPU: the
managed service's model and training-shape names are accepted so that unmodified
recipe code runs, but the weights are a seeded random init, not the real
checkpoint, unless `local up --model-dir` maps the name to a checkpoint on disk
(`load_model_dir`, `register`). See docs/local_models.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from firetitan_track.errors import UserError

# Byte tokenizer: ids 0..255 are bytes, then <|endoftext|>, <|im_start|>, <|im_end|>.
VOCAB_SIZE = 259
ENDOFTEXT_ID = 256
IM_START_ID = 257
IM_END_ID = 258
EOS_TOKEN_IDS = (IM_END_ID, ENDOFTEXT_ID)


def tokenizer_path() -> str:
    """Directory that `transformers.AutoTokenizer.from_pretrained` loads offline."""
    return str(Path(__file__).resolve().parent / "assets" / "tokenizer")


@dataclass(frozen=True)
class ModelCard:
    name: str
    config: dict            # keyword arguments for the architecture's config class, or a checkpoint's config.json
    max_context_length: int
    description: str
    architecture: str = "Qwen3ForCausalLM"   # the transformers class (`model.build_model`)
    # A Hugging Face checkpoint directory (config, safetensors, tokenizer) whose weights
    # this model loads; None for the seeded stand-ins. See `load_model_dir`.
    weights_dir: str | None = None
    eos_token_ids: tuple[int, ...] = EOS_TOKEN_IDS
    pad_token_id: int = ENDOFTEXT_ID

    @property
    def tokenizer_dir(self) -> str:
        """The tokenizer that goes with these weights: the checkpoint's own, else the shipped one."""
        return self.weights_dir or tokenizer_path()

    @property
    def moe(self) -> bool:
        """Whether the architecture routes tokens to experts (what `model_is_moe` asks)."""
        return "Moe" in self.architecture or bool(self.config.get("num_experts"))

    @property
    def model_type(self) -> str:
        """transformers' model_type of the architecture ("qwen3", "qwen3_5_moe_text", ...)."""
        return str(self.config.get("model_type") or _MODEL_TYPES.get(self.architecture, "qwen3"))


@dataclass(frozen=True)
class ShapeCard:
    """A training shape as the control plane serves it (small, read-only data)."""

    shape_id: str                      # unversioned id, e.g. "ts-local-tiny"
    base_model: str
    max_context_length: int
    supports_lora: bool
    trainer_mode: str                  # "policy" | "lora" (LORA_TRAINER) | "reference" (forward-only)
    versions: tuple[str, ...] = ("v1",)
    accelerator: str = "CPU"
    max_lora_rank: int = 0             # the largest trainingConfig.loraRank a LoRA shape takes

    @property
    def latest_version(self) -> str:
        return self.versions[-1]


def _qwen3_config(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                  max_positions: int = 512, head_dim: int | None = None) -> dict:
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim or hidden // heads,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_positions,
        # Untied: snapshots, deltas and checkpoints then need no shared-tensor care.
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": IM_END_ID,
        "pad_token_id": ENDOFTEXT_ID,
    }


def _qwen3_5_config(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, *,
                    max_positions: int = 1024, **extra) -> dict:
    """A Qwen3.5 text config: Gated DeltaNet (linear attention) layers with a full-attention
    layer every second one (the released models: every fourth), in the byte vocabulary."""
    config = {key: value for key, value in _qwen3_config(hidden, layers, heads, kv_heads, 0, max_positions,
                                                         head_dim).items()
              if key not in ("intermediate_size", "rope_theta", "use_cache")}
    config.update(full_attention_interval=2, linear_conv_kernel_dim=4, linear_key_head_dim=head_dim,
                  linear_value_head_dim=head_dim, linear_num_key_heads=kv_heads, linear_num_value_heads=heads,
                  **extra)
    return config


# Sizes: "tiny" trains a 32 x 64 batch in tens of ms on two CPU cores; "small"
# is the default stand-in for the 8B model, big enough to learn the demo tasks
# from scratch in a couple of CPU minutes (see docs/local_models.md).
_TINY = _qwen3_config(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
_SMALL = _qwen3_config(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256)
_BASE = _qwen3_config(hidden=192, layers=4, heads=6, kv_heads=2, intermediate=512)
_QWEN3_5 = _qwen3_5_config(hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32, intermediate_size=256)
_QWEN3_5_MOE = _qwen3_5_config(hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32, num_experts=8,
                               num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128)
_QWEN3_5_ARCH, _QWEN3_5_MOE_ARCH = "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM"
# The transformers config class of each architecture the stand-ins use (`model.build_model`).
CONFIG_CLASSES = {"Qwen3ForCausalLM": "Qwen3Config", _QWEN3_5_ARCH: "Qwen3_5TextConfig",
                  _QWEN3_5_MOE_ARCH: "Qwen3_5MoeTextConfig"}
_MODEL_TYPES = {"Qwen3ForCausalLM": "qwen3", _QWEN3_5_ARCH: "qwen3_5_text", _QWEN3_5_MOE_ARCH: "qwen3_5_moe_text",
                "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}

BASE_MODELS: dict[str, ModelCard] = {
    card.name: card
    for card in (
        ModelCard("local/tiny-qwen3", _TINY, 512,
                  "Tiny Qwen3 (hidden 64, 2 layers); unit tests and smoke runs."),
        ModelCard("accounts/fireworks/models/qwen3-0p6b", _TINY, 512,
                  "Local stand-in for Qwen3-0.6B: the tiny config, seeded init."),
        ModelCard("accounts/fireworks/models/qwen3-4b", _BASE, 512,
                  "Local stand-in for Qwen3-4B: hidden 192, 4 layers, seeded init."),
        ModelCard("accounts/fireworks/models/qwen3-8b", _SMALL, 512,
                  "Local stand-in for Qwen3-8B (the seed flow's model): hidden 128, 2 layers, seeded init."),
        # The Qwen3.5 / Qwen3.6 families the cookbook defaults to, in their own architectures.
        ModelCard("accounts/fireworks/models/qwen3p5-9b", _QWEN3_5, 1024,
                  "Local stand-in for Qwen3.5-9B: Qwen3.5 (Gated DeltaNet + attention), hidden 128, "
                  "4 layers, seeded init.", _QWEN3_5_ARCH),
        ModelCard("accounts/fireworks/models/qwen3p6-27b", _QWEN3_5, 1024,
                  "Local stand-in for Qwen3.6-27B: the Qwen3.5 stand-in config, seeded init.", _QWEN3_5_ARCH),
        ModelCard("accounts/fireworks/models/qwen3p5-35b-a3b", _QWEN3_5_MOE, 1024,
                  "Local stand-in for Qwen3.5-35B-A3B: Qwen3.5-MoE, hidden 128, 4 layers, 8 experts (2 active), "
                  "seeded init.", _QWEN3_5_MOE_ARCH),
        ModelCard("accounts/fireworks/models/qwen3p6-35b-a3b", _QWEN3_5_MOE, 1024,
                  "Local stand-in for Qwen3.6-35B-A3B: the Qwen3.5-MoE stand-in config, seeded init.",
                  _QWEN3_5_MOE_ARCH),
    )
}

DEFAULT_BASE_MODEL = "accounts/fireworks/models/qwen3-8b"


class EngineError(ValueError):
    """Bad input from a client; the server answers it with a 4xx carrying this message.

    Defined here, the torch-free module, so the HTTP layer can catch it without
    importing the engine; runner.local.engine re-exports it.
    """


class UnknownModel(KeyError, EngineError):
    """A base-model name the catalogue does not know (both a KeyError and an EngineError)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else "unknown model"


def resolve(base_model: str) -> ModelCard:
    try:
        return BASE_MODELS[base_model]
    except KeyError:
        known = ", ".join(sorted(BASE_MODELS))
        raise UnknownModel(f"unknown base model {base_model!r}; the local service knows: {known}") from None


TRAINING_SHAPES: dict[str, ShapeCard] = {
    shape.shape_id: shape
    for shape in (
        ShapeCard("ts-qwen3-8b-policy", "accounts/fireworks/models/qwen3-8b", 512, False, "policy"),
        ShapeCard("ts-qwen3-8b-reference", "accounts/fireworks/models/qwen3-8b", 512, False, "reference"),
        ShapeCard("ts-qwen3-0p6b-policy", "accounts/fireworks/models/qwen3-0p6b", 512, False, "policy"),
        ShapeCard("ts-qwen3-4b-policy", "accounts/fireworks/models/qwen3-4b", 512, False, "policy"),
        ShapeCard("ts-local-tiny", "local/tiny-qwen3", 512, False, "policy"),
        # LoRA shapes (trainerMode LORA_TRAINER, as the SDK's supports_lora reads it).
        ShapeCard("ts-qwen3-8b-lora", "accounts/fireworks/models/qwen3-8b", 512, True, "lora", max_lora_rank=64),
        ShapeCard("ts-qwen3-0p6b-lora", "accounts/fireworks/models/qwen3-0p6b", 512, True, "lora", max_lora_rank=64),
        ShapeCard("ts-qwen3-4b-lora", "accounts/fireworks/models/qwen3-4b", 512, True, "lora", max_lora_rank=64),
        ShapeCard("ts-local-tiny-lora", "local/tiny-qwen3", 512, True, "lora", max_lora_rank=64),
    )
}
# Without a shape (the SDK's manual path) a LoRA trainer still takes at most this rank.
MAX_LORA_RANK = 64


# --- the managed service's shape names -----------------------------------------------
# Managed training shapes are named <model>-<context>k[-<accelerator>][-lora]: the seed's
# qwen3-8b-128k-h200, the cookbook's qwen3p5-9b-256k-lora. Each resolves to the local model
# of that family (accounts/fireworks/models/<model>), full-parameter or LoRA as the name says,
# at the local model's context (never more than the name's).
MANAGED_MODELS_ACCOUNT = "fireworks"
_CONTEXT_PART_RE = re.compile(r"^[1-9][0-9]{0,6}k$")
_NAME_PART_RE = re.compile(r"^[a-z0-9][a-z0-9.]*$")


class UnknownShape(KeyError, EngineError):
    """A training-shape id the local service cannot serve; the message says what it serves instead."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown training shape"


@dataclass(frozen=True)
class ManagedShapeName:
    model: str                    # "qwen3p5-9b"
    context_k: int                # 256
    accelerator: str | None       # "h200"
    lora: bool

    @property
    def base_model(self) -> str:
        return f"accounts/{MANAGED_MODELS_ACCOUNT}/models/{self.model}"


def parse_managed_shape(shape_id: str) -> ManagedShapeName | None:
    """``<model>-<context>k[-<accelerator>][-lora]`` split into its parts, or None."""
    parts = shape_id.split("-")
    lora = len(parts) > 1 and parts[-1] == "lora"
    if lora:
        parts = parts[:-1]
    for index in (len(parts) - 1, len(parts) - 2):  # the context part is last, or before the accelerator
        if index < 1 or not _CONTEXT_PART_RE.match(parts[index]):
            continue
        model, rest = parts[:index], parts[index + 1:]
        if all(_NAME_PART_RE.match(part) for part in model + rest) and (not rest or rest[0][0].isalpha()):
            return ManagedShapeName("-".join(model), int(parts[index][:-1]), rest[0] if rest else None, lora)
    return None


def served_families() -> list[str]:
    """The managed model ids the local service has a model for (stand-ins and --model-dir checkpoints)."""
    prefix = f"accounts/{MANAGED_MODELS_ACCOUNT}/models/"
    return sorted(name[len(prefix):] for name in BASE_MODELS if name.startswith(prefix))


def training_shape(shape_id: str) -> ShapeCard:
    """The training shape ``shape_id`` (unversioned, no account): a local ``ts-...`` shape, or a
    managed name resolved to the local model of its family. UnknownShape says what is served."""
    shape = TRAINING_SHAPES.get(shape_id)
    if shape is not None:
        return shape
    managed = parse_managed_shape(shape_id)
    if managed is None:
        raise UnknownShape(f"training shape {shape_id!r} is neither a local shape ({', '.join(sorted(TRAINING_SHAPES))}) "
                           "nor a managed name <model>-<context>k[-<accelerator>][-lora] (e.g. qwen3-8b-128k-h200)")
    card = BASE_MODELS.get(managed.base_model)
    if card is None:
        raise UnknownShape(f"training shape {shape_id!r} is for {managed.base_model}, which the local service has no "
                           f"model for; it serves the families {', '.join(served_families())}. To train "
                           f"{managed.model} locally, serve a checkpoint of it: `firetitan-track local up --model-dir "
                           f"{managed.base_model}=DIR` (DIR holds config.json, *.safetensors and the tokenizer)")
    return ShapeCard(shape_id, managed.base_model, min(managed.context_k * 1024, card.max_context_length),
                     managed.lora, "lora" if managed.lora else "policy",
                     max_lora_rank=MAX_LORA_RANK if managed.lora else 0)


# --- real checkpoints --------------------------------------------------------------
# `local up --model-dir [NAME=]DIR` serves a Hugging Face checkpoint (config.json,
# *.safetensors, the tokenizer) under NAME: its weights instead of a seeded init, its
# tokenizer instead of the shipped one. NAME may be a managed name (the stand-in of
# that name is replaced) or any accounts/<a>/models/<id>; by default it is
# accounts/local/models/<the directory's name>.

# Causal LMs whose transformers classes take the same generation arguments
# (attention mask, position ids, a KV cache, logits_to_keep) as Qwen3's.
SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", _QWEN3_5_ARCH,
                           _QWEN3_5_MOE_ARCH)
MODEL_NAME_RE = re.compile(r"^accounts/[a-z0-9][a-z0-9-]*/models/[A-Za-z0-9][A-Za-z0-9._-]*$")
LOCAL_MODELS_ACCOUNT = "local"


class ModelDirError(UserError, EngineError):
    """A checkpoint directory the service cannot serve; the message names the directory and the field."""


def parse_model_dir(value: str) -> tuple[str | None, str]:
    """``NAME=DIR`` (NAME starting with ``accounts/``) or a bare ``DIR``."""
    name, sep, directory = value.partition("=")
    if sep and name.startswith("accounts/"):
        return name, directory
    return None, value


def _token_ids(value) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def load_model_dir(directory: str | Path, name: str | None = None) -> ModelCard:
    """The card of the checkpoint in ``directory``, checked without loading any weights."""
    path = Path(directory).expanduser().resolve()
    where = f"--model-dir {directory}"
    if not path.is_dir():
        raise ModelDirError(f"{where}: no such directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelDirError(f"{where}: no config.json (a Hugging Face checkpoint directory holds config.json, "
                            "the *.safetensors weights and the tokenizer files)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{config_file}: not readable as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{config_file}: expected a JSON object")
    architectures = config.get("architectures")
    if not (isinstance(architectures, list) and len(architectures) == 1
            and architectures[0] in SUPPORTED_ARCHITECTURES):
        raise ModelDirError(f"{config_file}: architectures is {architectures!r}; the local service serves "
                            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    for key in ("vocab_size", "max_position_embeddings"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelDirError(f"{config_file}: {key} must be a positive integer, got {value!r}")
    if not any(path.glob("*.safetensors")):
        raise ModelDirError(f"{where}: no *.safetensors weights (write them with model.save_pretrained(DIR))")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        raise ModelDirError(f"{where}: no tokenizer (tokenizer.json or tokenizer_config.json); save it beside "
                            "the weights with tokenizer.save_pretrained(DIR)")
    name = name or f"accounts/{LOCAL_MODELS_ACCOUNT}/models/{path.name}"
    if not MODEL_NAME_RE.match(name):
        raise ModelDirError(f"--model-dir {name}={directory}: the model name must be accounts/<account>/models/<id> "
                            "(id: letters, digits, '.', '_', '-')")
    eos = _token_ids(config.get("eos_token_id"))
    try:
        eos += _token_ids(json.loads((path / "generation_config.json").read_text()).get("eos_token_id"))
    except (OSError, ValueError, AttributeError):
        pass  # generation_config.json is optional
    eos = list(dict.fromkeys(eos))
    pad = config.get("pad_token_id")
    pad = pad if isinstance(pad, int) and not isinstance(pad, bool) else (eos[0] if eos else 0)
    return ModelCard(name, config, int(config["max_position_embeddings"]),
                     f"{architectures[0]} checkpoint in {path}", architectures[0], weights_dir=str(path),
                     eos_token_ids=tuple(eos), pad_token_id=pad)


def register(card: ModelCard) -> None:
    """Serve ``card`` under its name (replacing a stand-in of that name), with training
    shapes: the stand-in's own, or a policy and a reference shape made for it."""
    BASE_MODELS[card.name] = card
    shapes = [shape for shape in TRAINING_SHAPES.values() if shape.base_model == card.name]
    for shape in shapes:
        TRAINING_SHAPES[shape.shape_id] = replace(shape, max_context_length=card.max_context_length)
    if shapes:
        return
    slug = re.sub(r"[^a-z0-9]+", "-", card.name.rsplit("/", 1)[-1].lower()).strip("-") or "model"
    for template in TRAINING_SHAPES.copy().values():
        if template.base_model == DEFAULT_BASE_MODEL:
            shape_id = f"ts-{slug}-{template.trainer_mode}"
            TRAINING_SHAPES[shape_id] = replace(template, shape_id=shape_id, base_model=card.name,
                                                max_context_length=card.max_context_length)
