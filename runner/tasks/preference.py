"""Preference data: a prompt with a chosen and a rejected answer, for DPO and ORPO.

The built-in tasks make pairs from their own examples: the chosen answer is the
right one, the rejected one a plausible mistake (for ``reverse``: the string left
unreversed, two neighbours swapped, a digit changed). Like every built-in batch, a
step's pairs are a pure function of (seed, step), so a resumed run trains on exactly
the pairs an uninterrupted one would. JSONL lines
``{"prompt" | "messages", "chosen", "rejected"}`` give the same shape for your data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.tasks import TASKS, DataError, Example, _rng, jsonl_objects, prompt_messages

__all__ = ["Pair", "pair_batch", "load_pairs", "plausible_mistake"]


@dataclass(frozen=True)
class Pair:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs of the prompt
    chosen: str
    rejected: str

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def answer(self) -> str:
        """The longer of the two answers: what a context-length check (runner.preflight) must fit."""
        return max(self.chosen, self.rejected, key=len)

    @property
    def prompt(self) -> Example:
        """The prompt with the chosen answer, as the SFT datum builders take it."""
        return Example(self.messages, self.chosen)

    def to_json(self) -> dict[str, object]:
        return {"messages": self.chat(), "chosen": self.chosen, "rejected": self.rejected}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Pair":  # JSON read back by key (as runner.tasks)
        return cls(tuple((m["role"], m["content"]) for m in obj["messages"]), obj["chosen"], obj["rejected"])


def plausible_mistake(example: Example, rng: random.Random) -> str:
    """A wrong answer a learner could plausibly give: never the right one.

    For ``reverse`` the commonest mistake is not reversing at all; otherwise the answer
    with two neighbouring characters swapped or one digit changed.
    """
    answer = example.answer
    prompt = example.messages[-1][1]
    candidates = []
    if prompt.startswith("reverse "):
        candidates.append(prompt[len("reverse "):])  # left unreversed
    if len(answer) > 1:
        i = rng.randrange(len(answer) - 1)
        candidates.append(answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:])  # neighbours swapped
    digits = [i for i, ch in enumerate(answer) if ch.isdigit()]
    if digits:
        i = rng.choice(digits)
        wrong = rng.choice([d for d in "0123456789" if d != answer[i]])
        candidates.append(answer[:i] + wrong + answer[i + 1:])  # one digit changed
    candidates = [c for c in candidates if c != answer]
    if not candidates:  # a palindrome with equal neighbours, or no digits: a changed length
        return answer + answer[-1:] if answer else "0"
    return rng.choice(candidates)


def pair_batch(task: str, data: list[Pair] | None, *, seed: int, step: int, size: int,
               digits: int) -> tuple[list[Pair], dict[str, int]]:
    """The preference pairs of training step ``step`` (1-based) and the data cursor after it.

    Built-in tasks draw the step's examples from the same RNG stream as supervised runs
    (so DPO and SFT on ``reverse`` see the same prompts at a step) and the mistakes from
    a stream of their own. A JSONL set is walked in the same per-epoch shuffle as
    supervised data.
    """
    if data is None:
        examples_rng, mistakes_rng = _rng("train", task, seed, step), _rng("rejected", task, seed, step)
        pairs = []
        for _ in range(size):
            ex = TASKS[task].make(examples_rng, digits)
            pairs.append(Pair(ex.messages, ex.answer, plausible_mistake(ex, mistakes_rng)))
        return pairs, {"step": step, "examples": step * size}
    from runner.tasks import train_batch

    # the walk over a data set does not depend on what its items are
    return train_batch(task, data, seed=seed, step=step, size=size, digits=digits)  # type: ignore[arg-type,return-value]


def load_pairs(path: str | Path, *, what: str = "preference data file") -> list[Pair]:
    """Read ``{"prompt" | "messages", "chosen", "rejected"}`` lines; errors name the file and line."""
    p = Path(path)
    out = []
    for n, obj in jsonl_objects(p, what=what):
        for key in ("chosen", "rejected"):
            if not isinstance(obj.get(key), str):
                raise DataError(f"{p}:{n}: missing string field {key!r} (a preference line is "
                                "{\"prompt\" | \"messages\", \"chosen\", \"rejected\"})")
        if obj["chosen"] == obj["rejected"]:
            raise DataError(f"{p}:{n}: 'chosen' and 'rejected' are the same text; the pair teaches nothing")
        out.append(Pair(prompt_messages(obj, f"{p}:{n}"), obj["chosen"], obj["rejected"]))
    if not out:
        raise DataError(f"{p}: the {what} holds no pairs")
    return out
