"""Tasks: where training examples and eval prompts come from, and how answers are graded.

Built-in tasks generate data as a pure function of (seed, step), so a resumed run
sees exactly the batches an uninterrupted one would. JSONL files give the same
``Example`` shape for your own data and prompt sets.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from firetitan_track.errors import UserError

# A JSON object written out is dict[str, object] (Json's lists are invariant: a list[dict[str, str]]
# is no list[Json]). One read back (a JSONL line, a recorded example) is dict[str, Any]: its
# fields are read by key once checked, not narrowed level by level from Json.

__all__ = ["Example", "Task", "TASKS", "Reply", "DataError", "load_jsonl", "jsonl_objects", "prompt_messages", "eval_prompts",
           "train_batch", "eval_examples", "grade", "seed_of", "MAX_LINE_BYTES", "DEFAULT_EVAL_COUNT"]

DEFAULT_EVAL_COUNT = 32  # built-in held-out prompts when eval.count is 0

# A longer line is no prompt a model here can take (a 128k-token context is ~0.5 MB of
# text); refusing it at read time keeps it out of the ledger and away from the model.
MAX_LINE_BYTES = 1_000_000


class DataError(UserError, ValueError):
    """A data or prompt file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs of the prompt
    answer: str

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def to_json(self) -> dict[str, object]:
        return {"messages": self.chat(), "answer": self.answer}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Example":
        return cls(tuple((m["role"], m["content"]) for m in obj["messages"]), obj["answer"])


def _user(text: str) -> tuple[tuple[str, str], ...]:
    return (("user", text),)


@dataclass(frozen=True)
class Reply:
    """The environment's answer to one turn of a multi-turn task."""

    text: str  # what the environment says (the next user turn)
    solved: bool  # the turn found the answer: the episode ends


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[random.Random, int], Example]  # (rng, digits) -> example
    description: str
    # A multi-turn task's environment: (answer, the model's turn) -> its reply, a pure
    # function of the two. Single-turn tasks (None) are graded by ``grade``.
    reply: Callable[[str, str], Reply] | None = None
    replies: tuple[str, ...] = ()  # every text ``reply`` can answer (the context a turn needs)

    @property
    def multi_turn(self) -> bool:
        return self.reply is not None


def _reverse(rng: random.Random, digits: int) -> Example:
    s = "".join(rng.choice("0123456789") for _ in range(digits))
    return Example(_user(f"reverse {s}"), s[::-1])


def _add(rng: random.Random, digits: int) -> Example:
    a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
    return Example(_user(f"{a}+{b}"), str(a + b))


def _search(rng: random.Random, digits: int) -> Example:
    top = 10 ** digits - 1
    return Example(_user(f"guess 0-{top}"), str(rng.randrange(top + 1)))


_NUMBER = re.compile(r"\d+")


def _search_reply(answer: str, turn: str) -> Reply:
    """The number search's answer to a guess (the first number in the turn): whether the
    hidden number is higher or lower, "correct", or "number?" when the turn holds none."""
    found = _NUMBER.search(turn)
    if found is None:
        return Reply("number?", False)
    guess, secret = int(found.group()), int(answer)
    if guess == secret:
        return Reply("correct", True)
    return Reply("higher" if secret > guess else "lower", False)


TASKS: dict[str, Task] = {
    "reverse": Task("reverse", _reverse, "reverse a digit string: 'reverse 1234' -> '4321'"),
    "add": Task("add", _add, "add two numbers: '12+34' -> '46'"),
    "search": Task("search", _search, "find a hidden number in turns, told 'higher' or 'lower' after each "
                                      "guess: 'guess 0-9' -> '5' -> 'lower' -> '2' -> 'correct' (multi-turn: igpo)",
                   reply=_search_reply, replies=("correct", "higher", "lower", "number?")),
}


def _key(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def _rng(*parts: object) -> random.Random:
    return random.Random(_key(*parts))


def seed_of(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (a sampling request's, say)."""
    return _key(*parts) >> 1


def grade(answer: str, completion: str) -> float:
    """1.0 when the completion is the answer (surrounding whitespace ignored), else 0.0."""
    return 1.0 if completion.strip() == answer.strip() else 0.0


def train_batch(task: str, data: list[Example] | None, *, seed: int, step: int, size: int,
                digits: int) -> tuple[list[Example], dict[str, int]]:
    """The examples of training step ``step`` (1-based) and the data cursor after it.

    Built-in tasks draw from an RNG keyed by (seed, step); a JSONL data set is walked
    in a per-epoch shuffle keyed by (seed, epoch). Either way the batch is a pure
    function of (seed, step): nothing about the process that trains it matters.
    """
    if data is None:
        rng = _rng("train", task, seed, step)
        batch = [TASKS[task].make(rng, digits) for _ in range(size)]
        return batch, {"step": step, "examples": step * size}
    batch = []
    start = (step - 1) * size
    for i in range(start, start + size):
        epoch, index = divmod(i, len(data))
        order = list(range(len(data)))
        _rng("epoch", seed, epoch).shuffle(order)
        batch.append(data[order[index]])
    end_epoch, end_index = divmod(start + size, len(data))
    return batch, {"step": step, "examples": start + size, "epoch": end_epoch, "index": end_index}


def eval_examples(task: str, *, seed: int, count: int, digits: int) -> list[Example]:
    """The built-in held-out prompt set (``count`` 0: DEFAULT_EVAL_COUNT prompts): its own
    RNG stream, so it never overlaps training draws."""
    rng = _rng("eval", task, seed)
    return [TASKS[task].make(rng, digits) for _ in range(count or DEFAULT_EVAL_COUNT)]


def eval_prompts(task: str, prompts_path: str | Path | None, *, seed: int, count: int,
                 digits: int) -> list[Example]:
    """The eval prompt set: ``count`` built-in held-out prompts (0: DEFAULT_EVAL_COUNT), or the
    first ``count`` prompts of a JSONL file (0: all of them)."""
    if prompts_path is None:
        return eval_examples(task, seed=seed, count=count, digits=digits)
    examples = load_jsonl(prompts_path, what="prompt file")
    if count > len(examples):
        raise DataError(f"{prompts_path}: eval.count = {count}, but the prompt file holds {len(examples)} prompts")
    return examples[:count] if count else examples


def jsonl_objects(path: str | Path, *, what: str = "data file",
                  max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; errors name the file and line.

    A line is measured before it is decoded, so an oversized one is refused without
    reading it into a string."""
    p = Path(path)
    try:
        f = p.open("rb")
    except FileNotFoundError:
        raise DataError(f"{p}: no such {what}") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read the {what}: {e.strerror or e}") from None
    with f:
        for n, raw in enumerate(iter(lambda: f.readline(max_line_bytes + 1), b""), 1):
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise DataError(f"{p}:{n}: line longer than {max_line_bytes} bytes; "
                                "no prompt that long fits a model's context")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{p}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def load_jsonl(path: str | Path, *, what: str = "data file") -> list[Example]:
    """Read ``{"messages": [...], "answer": ...}`` or ``{"prompt": ..., "answer": ...}`` lines."""
    p = Path(path)
    out = []
    for n, obj in jsonl_objects(p, what=what):
        if not isinstance(obj.get("answer"), str):
            raise DataError(f"{p}:{n}: missing string field 'answer'")
        out.append(Example(prompt_messages(obj, f"{p}:{n}"), obj["answer"]))
    if not out:
        raise DataError(f"{p}: the {what} holds no examples")
    return out


def prompt_messages(obj: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    """A JSONL line's prompt: ``"prompt"`` (a string, the user's turn) or ``"messages"`` (a list
    of {role, content}). ``where`` (file:line) names the line in the error."""
    if isinstance(obj.get("prompt"), str):
        messages = _user(obj["prompt"])
    else:
        msgs = obj.get("messages")
        if not (isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            raise DataError(f"{where}: needs 'prompt' (a string) or 'messages' (a list of {{role, content}})")
        messages = tuple((m["role"], m["content"]) for m in msgs)
    # A prompt is text sent to a tokenizer and a service and shown in terminals, all of which may
    # end a string at a NUL. (An answer is only compared with what the model wrote, which may
    # hold any token, a NUL included.)
    for role, content in messages:
        if "\x00" in role or "\x00" in content:
            field = "prompt" if isinstance(obj.get("prompt"), str) else "messages"
            raise DataError(f"{where}: {field} holds a NUL character (\\u0000); a prompt is text")
    return messages
