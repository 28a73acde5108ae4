"""What the local service can serve: base models, training shapes, the tokenizer.

Plain data only (no torch import), so the control plane can answer listings
without loading a model. Every name maps to a *small* Qwen3-architecture config
that runs on a CPU: the managed service's model names are accepted so that
unmodified recipe code runs, but the weights are a seeded random init, not the
real checkpoint. See docs/local_models.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    config: dict            # keyword arguments for transformers.Qwen3Config
    max_context_length: int
    description: str


@dataclass(frozen=True)
class ShapeCard:
    """A training shape as the control plane serves it (small, read-only data)."""

    shape_id: str                      # unversioned id, e.g. "ts-local-tiny"
    base_model: str
    max_context_length: int
    supports_lora: bool
    trainer_mode: str                  # "policy" (trainable) | "reference" (forward-only)
    versions: tuple[str, ...] = ("v1",)
    accelerator: str = "CPU"

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


# Sizes: "tiny" trains a 32 x 64 batch in tens of ms on two CPU cores; "small"
# is the default stand-in for the 8B model, big enough to learn the demo tasks
# from scratch in a couple of CPU minutes (see docs/local_models.md).
_TINY = _qwen3_config(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
_SMALL = _qwen3_config(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256)
_BASE = _qwen3_config(hidden=192, layers=4, heads=6, kv_heads=2, intermediate=512)

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
    )
}
