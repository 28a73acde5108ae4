"""What a spec can be checked against before a run is recorded: the service's catalogue
and the model's context.

A run whose RunStarted is written replays its recorded spec on every resume, so a
spec the service will refuse (an unknown base model or training shape, a LoRA rank on
a full-parameter shape) or a prompt the model cannot hold is refused here, with the
key at fault, before anything is written. The service is asked through the SDK's own
calls, so the same check works against the local service and the managed API.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

from firetitan_track.errors import first_line
from runner.spec import MAX_EVAL_COMPLETIONS, MAX_EVAL_COUNT, KeyCheck, Spec, SpecError
from runner.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from runner.tasks import Example
    from runner.tasks.preference import Pair

__all__ = ["check_against_service", "check_sizes", "check_context"]

_MODEL_NAME = re.compile(r"accounts/[^/]+/models/[^/]+")


def check_against_service(spec: Spec, *, base_url: str | None, api_key: str, tokenizer_path: str,
                          eval_set: Sequence[Example], train_data: Sequence[Example | Pair] | None) -> None:
    """Raise SpecError naming the key the service refuses, or a prompt too long for it."""
    from fireworks.training.sdk import FireworksClient

    check_sizes(spec, eval_set)
    from runner.provision import shape_ref

    from runner.backend_watch import unreachable

    why = unreachable(base_url)  # the SDK would retry a refused connection for minutes
    if why is not None:
        key = "backend.base_url" if spec.backend.base_url else "backend.kind"
        raise SpecError(f"{spec.source}: {key}: no service answers at {base_url or 'the managed API'} ({why})")
    client = FireworksClient(api_key=api_key, **({"base_url": base_url} if base_url else {}))
    model = spec.model.base_model
    try:
        if _MODEL_NAME.fullmatch(model):  # other spellings (the local catalogue's) have no details URL
            client.model_is_moe(model)  # the SDK's call for a base model's details
    except Exception as exc:
        status = getattr(exc, "status_code", None)
        if status in (400, 404):
            raise SpecError(f"{spec.source}: model.base_model: the service has no model {model!r} "
                            f"(HTTP {status})") from None
        if status is not None:
            raise SpecError(f"{spec.source}: model.base_model: the service would not describe {model!r} "
                            f"(HTTP {status}): {first_line(exc)}") from None
        if not isinstance(exc, ValueError):  # a ValueError: it answered, without the moe flag
            raise
    shape = shape_ref(spec.model.training_shape)
    try:
        profile = client.resolve_training_profile(shape)
    except ValueError as exc:  # a malformed resource name, refused by the SDK itself
        raise SpecError(f"{spec.source}: model.training_shape: {first_line(exc)}") from None
    except RuntimeError as exc:
        raise SpecError(f"{spec.source}: model.training_shape: the service refuses {shape!r}: "
                        f"{first_line(exc)}") from None
    if spec.model.lora_rank > 0 and not profile.supports_lora:
        raise SpecError(f"{spec.source}: model.lora_rank: training shape {shape!r} is full-parameter "
                        f"(trainer mode {profile.trainer_mode or 'POLICY_TRAINER'}); it refuses LoRA rank "
                        f"{spec.model.lora_rank}: use a LoRA shape, or lora_rank = 0")
    check_context(spec, profile.max_supported_context_length, tokenizer_path, eval_set, train_data)


def check_sizes(spec: Spec, eval_set: Sequence[Example]) -> None:
    """The bounds that depend on the prompts read (a whole JSONL prompt file, eval.count = 0)."""
    if len(eval_set) > MAX_EVAL_COUNT:
        raise SpecError(f"{spec.source}: eval.prompts: {len(eval_set)} prompts; an eval takes at most "
                        f"{MAX_EVAL_COUNT} (set eval.count)")
    completions = len(eval_set) * spec.sampling.n
    if completions > MAX_EVAL_COMPLETIONS:
        raise SpecError(f"{spec.source}: sampling.n: {len(eval_set)} prompts x sampling.n {spec.sampling.n} = "
                        f"{completions} completions per eval; at most {MAX_EVAL_COMPLETIONS} (one eval's "
                        "completions are stored as one blob)")


def check_context(spec: Spec, context: int, tokenizer_path: str, eval_set: Sequence[Example],
                  train_data: Sequence[Example | Pair] | None) -> None:
    """Every eval prompt plus its sampled tokens, and every JSONL training example, fits
    ``context`` tokens. Built-in training data is short by construction."""
    from runner.recipes import RECIPES
    from runner.recipes.base import prompt_tokens

    # a bad tokenizer is named however long the context
    tokenizer = load_tokenizer(tokenizer_path, named=bool(spec.model.tokenizer), bad=spec.bad)
    if not context or context <= 0:
        return
    recipe = RECIPES[spec.recipe.kind]
    _check_new_tokens(spec.bad, "sampling.max_tokens", spec.sampling.max_tokens, context)
    if recipe.check_context is not None:  # its sequences are its own (a multi-turn recipe's episodes)
        recipe.check_context(spec, spec.bad, context, tokenizer, eval_set)
        return
    rollouts = spec.recipe.settings.new_tokens()
    _check_new_tokens(spec.bad, "recipe.max_tokens", rollouts, context)
    new_tokens = max(spec.sampling.max_tokens, rollouts)
    for i, example in enumerate(eval_set):
        prompt = len(prompt_tokens(tokenizer, example))
        n = prompt + spec.sampling.max_tokens
        if n > context:
            raise SpecError(f"{spec.source}: eval.prompts: prompt {i + 1} takes {n} tokens with "
                            f"sampling.max_tokens, more than the model's context of {context}")
        if train_data is None and prompt + rollouts > context:  # built-in rollouts are prompts like these
            raise SpecError(f"{spec.source}: recipe.max_tokens: a prompt of the task takes {prompt + rollouts} "
                            f"tokens with recipe.max_tokens, more than the model's context of {context}")
    for i, item in enumerate(train_data or ()):
        answer = len(tokenizer.encode(item.answer, add_special_tokens=False)) + 1
        n = len(prompt_tokens(tokenizer, item)) + max(answer, new_tokens)
        if n > context:
            raise SpecError(f"{spec.source}: task.data: example {i + 1} takes {n} tokens, more than the "
                            f"model's context of {context}")


def _check_new_tokens(bad: KeyCheck, key: str, tokens: int, context: int) -> None:
    if tokens >= context:  # not even an empty prompt leaves room
        raise bad(key, f"{tokens} new tokens do not fit the model's context of {context} tokens "
                       "(as the service reports it)")
