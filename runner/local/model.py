"""Building the causal LM and moving its weights around as plain tensor dicts."""

from __future__ import annotations

import torch

from . import _IMPORT_LOCK
from .catalogue import CONFIG_CLASSES, EngineError, ModelCard


def pick_device(device: str = "cpu") -> torch.device:
    """'cpu', 'cuda' or 'cuda:N'. Asking for CUDA on a machine without it is an error,
    not a silent fallback, so a run never reports CPU timings as GPU ones."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EngineError(f"device {device!r} requested but CUDA is not available")
        return torch.device(device)
    if device != "cpu":
        raise EngineError(f"unknown device {device!r}; expected cpu or cuda")
    return torch.device("cpu")


def serving_dtype(device: torch.device) -> torch.dtype:
    """What a deployment computes in: bfloat16 on a GPU that supports it (as served
    models are), float32 elsewhere. Trainers and snapshots stay float32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def build_model(card: ModelCard, seed: int, device: str = "cpu"):
    """A float32 causal LM: the checkpoint's weights for a card with a ``weights_dir``,
    else the card's architecture (Qwen3ForCausalLM, Qwen3_5ForCausalLM, ...) with weights
    fixed by (card, seed).

    The init runs on CPU under a forked RNG seeded with `seed`, so it is the same
    on every machine and leaves the caller's global RNG untouched; the model is
    moved to `device` afterwards.
    """
    # Under load_engine's lock: transformers' lazy names are not safe to resolve from two
    # threads at once (a trainer and a deployment building together).
    with _IMPORT_LOCK:
        import transformers

        if card.weights_dir:
            model_class = transformers.AutoModelForCausalLM
        else:
            config_class = getattr(transformers, CONFIG_CLASSES[card.architecture])
            model_class = getattr(transformers, card.architecture)
    if card.weights_dir:
        # local_files_only: the service never downloads; the directory is the whole model.
        model = model_class.from_pretrained(card.weights_dir, dtype=torch.float32, attn_implementation="sdpa",
                                            local_files_only=True)
        model.to(device=pick_device(device))
        model.eval()
        return model
    config = config_class(**card.config)
    # sdpa: fast on CPU and CUDA, and honours the padding masks generation uses.
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.to(dtype=torch.float32, device=pick_device(device))
    model.eval()  # no dropout anywhere; eval() only makes that explicit
    return model


def weight_dict(model) -> dict[str, torch.Tensor]:
    """Every trainable tensor by name (detached views, on the model's device)."""
    return {name: param.detach() for name, param in model.named_parameters()}


@torch.no_grad()
def load_weight_dict(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` into the model in place; names and shapes must match exactly."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(weights))
    extra = sorted(set(weights) - set(params))
    if missing or extra:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, param in params.items():
        tensor = weights[name]
        if tensor.shape != param.shape or tensor.dtype != param.dtype:
            raise ValueError(f"weight {name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                             f"model has {tuple(param.shape)} {param.dtype}")
        param.copy_(tensor)


# --- weight files -------------------------------------------------------------
# A weights directory holds `model.safetensors` and `meta.json`. Sampler
# snapshots are either "base" (float32 weights) or "delta": the XOR of the int32
# bit patterns of new and base weights. XOR is exactly invertible, so
# base ^ delta reproduces the trainer's floats bit for bit, which a float
# difference (new - base, then base + diff) would not.

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
# A LoRA sampler snapshot is a PEFT adapter directory (these two files) plus META_FILE.
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def save_weights(directory, weights: dict[str, torch.Tensor], meta: dict) -> None:
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in weights.items()}
    save_file(cpu, str(directory / WEIGHTS_FILE), metadata={k: str(v) for k, v in meta.items()})
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_meta(directory) -> dict:
    import json
    from pathlib import Path

    return json.loads((Path(directory) / META_FILE).read_text())


def load_weights(directory) -> dict[str, torch.Tensor]:
    from pathlib import Path

    from safetensors.torch import load_file

    return load_file(str(Path(directory) / WEIGHTS_FILE))


def xor_delta(new: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bitwise difference of two float32 weight dicts, as int32 tensors."""
    return {name: new[name].view(torch.int32) ^ base[name].to(new[name].device).view(torch.int32)
            for name in new}


def apply_xor_delta(base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of xor_delta: base ^ delta, viewed back as float32."""
    if set(base) != set(delta):
        raise ValueError("delta and base snapshot hold different tensors")
    return {name: (base[name].view(torch.int32) ^ delta[name]).view(torch.float32) for name in base}


# --- LoRA adapters ----------------------------------------------------------------
# peft names an adapter tensor "base_model.model.<module>.lora_A.weight" (A: [r, in],
# B: [out, r]); the plain model's weight is "<module>.weight" ([out, in]).

@torch.no_grad()
def merge_lora(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
               scale: float) -> dict[str, torch.Tensor]:
    """``base`` with each adapted weight W replaced by W + scale * B @ A (on CPU, so a
    trainer and a deployment that merge the same tensors get the same bits)."""
    merged = {name: tensor.to("cpu") for name, tensor in base.items()}
    for key, a in adapter.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        b = adapter.get(f"{module}.lora_B.weight")
        name = f"{module.removeprefix('base_model.model.')}.weight"
        if b is None or name not in merged:
            raise ValueError(f"adapter tensor {key!r} has no matching lora_B or base weight {name!r}")
        merged[name] = merged[name] + scale * (b.to("cpu", torch.float32) @ a.to("cpu", torch.float32))
    return merged


def adapter_snapshot_weights(directory, meta: dict) -> dict[str, torch.Tensor]:
    """Full float32 weights of a LoRA sampler snapshot: the base it was trained on
    (rebuilt from the catalogue and the trainer's seed) with the adapter merged in."""
    from pathlib import Path

    from safetensors.torch import load_file

    from .catalogue import resolve

    base = weight_dict(build_model(resolve(meta["base_model"]), int(meta.get("base_seed", 0)), "cpu"))
    adapter = load_file(str(Path(directory) / ADAPTER_FILE))
    return merge_lora(base, adapter, float(meta["scale"]))
