"""The run's tokenizer: what turns its prompts into tokens and its completions back into text.

A spec names a tokenizer folder (``model.tokenizer``) or takes the one its service serves.
Any folder is loaded by transformers' ``AutoTokenizer``, as the recipes and the SDK's
DeploymentSampler expect, except the local service's own tokenizer: the byte-level
tokenizer this package ships (runner/local/assets/tokenizer, built by
runner.local.build_tokenizer), which every run on the local service uses unless its spec
names another. That one is read by ``ShippedTokenizer`` with the two libraries
transformers itself uses for it, ``tokenizers`` for the text and jinja2 for the chat
template, without importing transformers: opening the transformers package costs about
0.6 s of CPU here (version 5 reads every model's source file to build its lazy import
table), which was a quarter of a resumed run's time to its next step
(benchmarks/tracking_overhead.py, ``resume_to_next_step_s``).

``ShippedTokenizer`` gives exactly what transformers gives for these files, call for call,
for the calls a run makes (tests/runner/test_tokenizer.py holds it to that, over every
built-in task's prompts and text that plays with the special tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Protocol, Sequence

from firetitan_track.errors import first_line

if TYPE_CHECKING:
    from runner.spec import KeyCheck

__all__ = ["Tokenizer", "ShippedTokenizer", "load_tokenizer"]

Chat = Sequence[Mapping[str, Any]]


class Tokenizer(Protocol):
    """The calls a run (its recipes, its checks and the SDK's DeploymentSampler) makes of a
    tokenizer; transformers' tokenizers and ``ShippedTokenizer`` both answer them."""

    @property
    def all_special_tokens(self) -> list[str]: ...

    @property
    def eos_token_id(self) -> int | None: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...

    def convert_tokens_to_ids(self, tokens: str) -> int | None: ...

    def apply_chat_template(self, conversation: Chat, *, add_generation_prompt: bool = False,
                            tokenize: bool = True, return_dict: bool = True) -> Any: ...


def load_tokenizer(path: str, *, named: bool, bad: KeyCheck) -> Tokenizer:
    """The run's tokenizer from ``path``; one that cannot be loaded is a SpecError naming
    model.tokenizer (``named``: the spec names it) or the backend that serves it, not the
    chained tracebacks transformers raises for a missing folder or an unknown name."""
    try:
        if ShippedTokenizer.serves(path):
            return ShippedTokenizer(Path(path))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise bad("model.tokenizer" if named else "backend",
                  f"cannot load a tokenizer from {path!r} ({type(exc).__name__}: {first_line(exc)}); give a "
                  "folder holding tokenizer files, or leave model.tokenizer empty for the local service's own") \
            from None


class ShippedTokenizer:
    """The local service's own tokenizer, as transformers' PreTrainedTokenizerFast reads its
    folder (module doc): the tokenizer.json pipeline as it stands, the special tokens its
    tokenizer_config.json names, and its chat template rendered in a sandbox with transformers'
    settings (blocks trimmed and left-stripped, loop controls, ``raise_exception``)."""

    def __init__(self, folder: Path) -> None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer as Pipeline

        config = json.loads((folder / "tokenizer_config.json").read_text())
        self._pipeline = Pipeline.from_file(str(folder / "tokenizer.json"))
        # the named special tokens, in transformers' order of their names (bos, eos, unk, sep,
        # pad, cls, mask): these are what all_special_tokens lists and the template may use
        self._named = {name: config[name] for name in ("bos_token", "eos_token", "unk_token", "sep_token",
                                                       "pad_token", "cls_token", "mask_token") if config.get(name)}
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise_exception
        self._template = env.from_string(config["chat_template"])

    @staticmethod
    def serves(path: str) -> bool:
        """Whether ``path`` is the shipped tokenizer's own folder."""
        from runner.local.catalogue import tokenizer_path

        try:
            return Path(path).resolve() == Path(tokenizer_path()).resolve()
        except OSError:
            return False

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self._named.values()))

    @property
    def eos_token_id(self) -> int | None:
        eos = self._named.get("eos_token")
        return None if eos is None else self._pipeline.token_to_id(eos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._pipeline.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._pipeline.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: str) -> int | None:
        return self._pipeline.token_to_id(tokens)

    def apply_chat_template(self, conversation: Chat, *, add_generation_prompt: bool = False,
                            tokenize: bool = True, return_dict: bool = True) -> Any:
        """The chat rendered by the template; its token ids with ``tokenize``, as a dict of
        input_ids and attention_mask with ``return_dict`` too (transformers 5's default)."""
        text = self._template.render(messages=list(conversation), add_generation_prompt=add_generation_prompt,
                                     **self._named)
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)  # the template places every special token itself
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if return_dict else ids


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)
