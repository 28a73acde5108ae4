"""The experiment spec: a TOML file validated into typed sections.

Every error names the file and the dotted key at fault, so a researcher can fix
the spec without reading this module. The spec is the only input the runner
needs: a run records it (redacted) and ``rerun`` rebuilds from the record.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from firetitan_track.errors import UserError
from firetitan_track.events import CleanupAction

from runner.local.supervisor import DEFAULT_STATE_DIR  # the launcher's: where it keeps a service it starts

from runner.tasks import DEFAULT_EVAL_COUNT

__all__ = ["Spec", "SpecError", "KeyCheck", "load_spec", "parse_overrides", "MAX_EVAL_COUNT",
           "MAX_COMPLETIONS_PER_PROMPT", "MAX_STEP_EXAMPLES", "MAX_EVAL_COMPLETIONS", "MAX_NEW_TOKENS", "MAX_DIGITS",
           "RESOURCE_ID_RULE"]

# Bounds on every size in a spec, checked before anything is written. What the service can
# serve per sequence (prompt + new tokens within the model's context) is asked of the service
# by runner.preflight; these are the bounds that hold whatever the service says, each from
# the service's contract or from what one run holds in memory at once (a recipe's own, such as
# async_grpo's MAX_OFFPOLICY_VERSIONS, are in its module).
MAX_EVAL_COUNT = 10_000  # every eval samples each prompt through the deployment
MAX_COMPLETIONS_PER_PROMPT = 128  # the completions API's range for n (fireworks types: 1 <= n <= 128)
MAX_STEP_EXAMPLES = 65_536  # examples (rollouts, for grpo) one optimizer step builds in memory
MAX_EVAL_COMPLETIONS = 100_000  # eval.count x sampling.n: one eval's completions are one stored blob
MAX_NEW_TOKENS = 1 << 20  # sampling/recipe max_tokens: no model's context is longer (preflight asks the real one)
MAX_DIGITS = 1_000  # built-in task operands; their prompts must also fit the context (preflight)
# A resource id of the service (deployments, trainer jobs, models): a DNS label, as the
# managed API and the local service accept them.
RESOURCE_ID_RULE = "1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
_RESOURCE_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class SpecError(UserError, ValueError):
    """A spec that cannot run; the message names the file and the key."""


class KeyCheck:
    """The spec's checks of its values: ``bad(key, why)`` is the SpecError naming the
    spec's source and the key; the methods raise it for the common bounds. Recipes check
    their own keys with it (and import nothing of this module but for type checking)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, key: str, why: str) -> SpecError:
        return SpecError(f"{self.source}: {key}: {why}")

    def at_least(self, key: str, value: int, least: int = 1) -> None:
        if value < least:
            raise self(key, f"must be at least {least}, got {value}")

    def not_negative(self, key: str, value: float) -> None:
        if value < 0:
            raise self(key, f"must not be negative, got {value}")

    def at_most(self, key: str, value: int, limit: int, why: str) -> None:
        if value > limit:
            raise self(key, f"must be at most {limit} ({why}), got {value}")

    def completions_per_request(self, key: str, value: int, why: str) -> None:
        self.at_most(key, value, MAX_COMPLETIONS_PER_PROMPT, why)

    def new_tokens(self, key: str, value: int) -> None:
        self.at_most(key, value, MAX_NEW_TOKENS, "no model's context is longer")


@dataclass(frozen=True)
class RunSection:
    name: str = "run"
    seed: int = 0
    steps: int = 60


@dataclass(frozen=True)
class BackendSection:
    kind: Literal["local", "fireworks"] = "local"
    base_url: str = ""  # fireworks: the API URL (default: the SDK's); local: an already running service
    state_dir: str = str(DEFAULT_STATE_DIR)  # local: where the embedded service keeps its jobs
    device: Literal["cpu", "cuda"] = "cpu"


@dataclass(frozen=True)
class ModelSection:
    base_model: str = "accounts/fireworks/models/qwen3-8b"
    tokenizer: str = ""  # path or name; empty: the local service's tokenizer
    training_shape: str = "ts-qwen3-8b-policy"
    lora_rank: int = 0
    init_from: str = ""  # "RUN_ID" or "RUN_ID@STEP": start from that run's saved state (its last, or at STEP)
    deployment_id: str = "research-serving"


@dataclass(frozen=True)
class CleanupSection:
    """What the run's close does to its trainer and deployment (CleanupApplied records the outcome)."""

    trainer: Literal[CleanupAction.DELETE, CleanupAction.KEEP] = CleanupAction.DELETE
    deployment: Literal[CleanupAction.SCALE_TO_ZERO, CleanupAction.DELETE, CleanupAction.KEEP] = \
        CleanupAction.SCALE_TO_ZERO


def _recipe_defaults() -> dict[str, Any]:
    from runner.recipes import SETTINGS_KEYS

    return {key: default for key, (_, default) in SETTINGS_KEYS.items()}


@dataclass(frozen=True)
class RecipeSection:
    """[recipe]: which recipe trains (``kind``: a recipe of runner.recipes), how large a step
    is, and the recipe's own settings. The table is flat: beside ``kind`` sit the keys of
    every recipe's settings (runner.recipes.SETTINGS_KEYS), each at its default where the
    file leaves it out, and a run records them all; ``settings`` reads the kind's own out of
    them, typed, and each recipe checks its keys."""

    kind: str = "sft"
    batch_size: int = 16  # examples per micro-batch
    micro_batches: int = 1  # forward_backward calls accumulated per optimizer step
    values: Mapping[str, Any] = field(default_factory=_recipe_defaults, hash=False)  # every recipe's keys

    @classmethod
    def keys(cls) -> dict[str, Any]:
        """The table's keys and their types."""
        from runner.recipes import RECIPES, SETTINGS_KEYS

        return {"kind": Literal[tuple(RECIPES)], "batch_size": int, "micro_batches": int,
                **{key: typ for key, (typ, _) in SETTINGS_KEYS.items()}}

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> "RecipeSection":
        own = {k: table[k] for k in ("kind", "batch_size", "micro_batches") if k in table}
        return cls(**own, values={**_recipe_defaults(), **{k: v for k, v in table.items() if k not in own}})

    def as_table(self) -> dict[str, Any]:
        return {"kind": self.kind, "batch_size": self.batch_size, "micro_batches": self.micro_batches,
                **self.values}

    @functools.cached_property
    def settings(self) -> Any:
        """The kind's settings (its Recipe.settings class) read from the table."""
        from runner.recipes import RECIPES

        return RECIPES[self.kind].read_settings(self.values)

    def check(self, bad: KeyCheck) -> None:
        """Every recipe checks its keys, whichever recipe runs: a recorded spec holds them all."""
        from runner.recipes import RECIPES

        for recipe in RECIPES.values():
            recipe.read_settings(self.values).check(bad)


@dataclass(frozen=True)
class TaskSection:
    name: str = "reverse"  # built-in task (graded); see runner.tasks
    data: str = ""  # JSONL training data instead of the built-in generator
    digits: int = 4  # built-in arithmetic tasks: operand length


@dataclass(frozen=True)
class OptimSection:
    learning_rate: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0


@dataclass(frozen=True)
class ScheduleSection:
    save_every: int = 10  # steps between DCP state saves (the resume points)
    eval_every: int = 10  # steps between snapshot + sync + eval


@dataclass(frozen=True)
class EvalSection:
    prompts: str = "builtin"  # "builtin" (the task's held-out set) or a JSONL path
    count: int = 0  # how many prompts: 0 = the whole JSONL file, or DEFAULT_EVAL_COUNT built-in ones


@dataclass(frozen=True)
class SamplingSection:
    n: int = 1
    max_tokens: int = 8
    temperature: float = 0.0


@dataclass(frozen=True)
class ConcurrencySection:
    mode: Literal["adaptive", "fixed"] = "adaptive"
    initial: int = 8  # adaptive: starting window; fixed: the window
    max: int = 64  # adaptive: the largest window


@dataclass(frozen=True)
class Spec:
    run: RunSection = field(default_factory=RunSection)
    backend: BackendSection = field(default_factory=BackendSection)
    model: ModelSection = field(default_factory=ModelSection)
    cleanup: CleanupSection = field(default_factory=CleanupSection)
    recipe: RecipeSection = field(default_factory=RecipeSection)
    task: TaskSection = field(default_factory=TaskSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    eval: EvalSection = field(default_factory=EvalSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    concurrency: ConcurrencySection = field(default_factory=ConcurrencySection)
    source: str = field(default="<spec>", compare=False)  # where it came from, for messages
    base_dir: str = field(default=".", compare=False)  # relative data paths resolve here

    # -- construction ----------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "<spec>", base_dir: str = ".") -> "Spec":
        sections = {}
        for key, value in raw.items():
            f = _fields(cls).get(key)
            if f is None or key in ("source", "base_dir"):
                raise SpecError(f"{source}: unknown section [{key}] (known: {', '.join(_section_names())})")
            if not isinstance(value, Mapping):
                raise SpecError(f"{source}: [{key}] must be a table, got {_kind(value)}")
            sections[key] = _build_section(f.type, value, key, source)
        spec = cls(**sections, source=source, base_dir=base_dir)
        spec._check(source)
        return spec

    def _check(self, source: str) -> None:
        bad = KeyCheck(source)
        positive = {
            "run.steps": self.run.steps, "recipe.batch_size": self.recipe.batch_size,
            "recipe.micro_batches": self.recipe.micro_batches, "schedule.save_every": self.schedule.save_every,
            "schedule.eval_every": self.schedule.eval_every,
            "sampling.n": self.sampling.n, "sampling.max_tokens": self.sampling.max_tokens,
            "concurrency.initial": self.concurrency.initial, "concurrency.max": self.concurrency.max,
            "task.digits": self.task.digits,
        }
        for key, value in positive.items():
            bad.at_least(key, value)
        for section, values in self.to_dict().items():  # TOML spells nan and inf; neither trains anything
            for key, value in values.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise bad(f"{section}.{key}", f"must be a finite number, got {value}")
        self.recipe.check(bad)
        o = self.optim
        if o.learning_rate <= 0:
            raise bad("optim.learning_rate", f"must be positive, got {o.learning_rate}")
        for key, value in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
            if not 0 <= value < 1:
                raise bad(key, f"must be in [0, 1), got {value}")
        if o.eps <= 0:
            raise bad("optim.eps", f"must be positive, got {o.eps}")
        for key, value in (("optim.weight_decay", o.weight_decay), ("optim.grad_clip_norm", o.grad_clip_norm),
                           ("sampling.temperature", self.sampling.temperature)):
            bad.not_negative(key, value)
        if not 0 <= self.eval.count <= MAX_EVAL_COUNT:
            raise bad("eval.count", f"must be 0 (the whole prompt file, or {DEFAULT_EVAL_COUNT} built-in prompts) "
                                    f"to {MAX_EVAL_COUNT}, got {self.eval.count}")
        self._check_sizes(bad)
        self._check_multi_turn(bad)
        run_id, at, step = self.model.init_from.partition("@")
        if self.model.init_from and (not run_id or (at and not step.isdigit())):
            raise bad("model.init_from", f"expected \"RUN_ID\" or \"RUN_ID@STEP\", got {self.model.init_from!r}")
        if self.model.lora_rank < 0:
            raise bad("model.lora_rank", f"must be 0 (full-parameter) or positive, got {self.model.lora_rank}")
        if self.concurrency.initial > self.concurrency.max:
            raise bad("concurrency.initial", f"{self.concurrency.initial} exceeds concurrency.max {self.concurrency.max}")
        for key, path in (("task.data", self.task.data), ("eval.prompts", self.eval.prompts)):
            if path and path != "builtin" and not self.resolve_path(path).is_file():
                raise bad(key, f"no such file: {self.resolve_path(path)}")
        if not self.task.data:
            from runner.tasks import TASKS

            if self.task.name not in TASKS:
                raise bad("task.name", f"unknown built-in task {self.task.name!r} (known: {', '.join(sorted(TASKS))})")

    def _check_multi_turn(self, bad: KeyCheck) -> None:
        """A multi-turn recipe (igpo) plays a built-in multi-turn task, and only such a recipe plays one."""
        from runner.recipes import RECIPES
        from runner.tasks import TASKS

        task = TASKS.get(self.task.name)
        multi = [name for name, t in sorted(TASKS.items()) if t.multi_turn]
        kind = f'recipe.kind = "{self.recipe.kind}"'
        if RECIPES[self.recipe.kind].multi_turn:
            if self.task.data:
                raise bad("task.data", f"{kind} plays a built-in multi-turn task; "
                                       f"leave task.data empty and set task.name (one of: {', '.join(multi)})")
            if task is not None and not task.multi_turn:
                raise bad("task.name", f"{self.task.name!r} is a single-turn task; {kind} "
                                       f"plays a multi-turn one (one of: {', '.join(multi)})")
            if self.eval.prompts != "builtin":
                raise bad("eval.prompts", f"{kind} evaluates on the task's built-in held-out "
                                          "episodes; set eval.prompts = \"builtin\"")
        elif task is not None and task.multi_turn and not self.task.data:
            players = " or ".join(f'recipe.kind = "{k}"' for k, r in RECIPES.items() if r.multi_turn)
            raise bad("recipe.kind", f"task {self.task.name!r} is multi-turn: only {players} "
                                     f"plays it, not {self.recipe.kind!r}")

    def _check_sizes(self, bad: KeyCheck) -> None:
        """The bounds above (the context-dependent ones are runner.preflight's; a recipe's own
        keys, its settings')."""
        r, sm = self.recipe, self.sampling
        at_most = {"sampling.n": (sm.n, MAX_COMPLETIONS_PER_PROMPT, "the completions API's largest n"),
                   "sampling.max_tokens": (sm.max_tokens, MAX_NEW_TOKENS, "no model's context is longer"),
                   "task.digits": (self.task.digits, MAX_DIGITS, "each prompt must also fit the model's context"),
                   "concurrency.max": (self.concurrency.max, MAX_EVAL_COUNT,
                                       "no eval has more requests in flight than prompts")}
        for key, (value, limit, why) in at_most.items():
            bad.at_most(key, value, limit, why)
        group = r.settings.rollouts_per_prompt()  # recipes that sample group_size rollouts per prompt
        per_step = r.batch_size * r.micro_batches * (group or 1)
        if per_step > MAX_STEP_EXAMPLES:
            what = "recipe.batch_size x recipe.micro_batches" + (" x recipe.group_size" if group is not None else "")
            raise bad("recipe.batch_size", f"{what} = {per_step} examples per optimizer step; at most "
                                           f"{MAX_STEP_EXAMPLES} (one step's batch is built in memory)")
        completions = (self.eval.count or DEFAULT_EVAL_COUNT) * sm.n
        if completions > MAX_EVAL_COMPLETIONS:
            raise bad("sampling.n", f"eval.count x sampling.n = {completions} completions per eval; at most "
                                    f"{MAX_EVAL_COMPLETIONS} (one eval's completions are stored as one blob)")
        if not _RESOURCE_ID.fullmatch(self.model.deployment_id):
            raise bad("model.deployment_id", f"{self.model.deployment_id!r} is not a resource id: use "
                                             f"{RESOURCE_ID_RULE}")

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Spec":
        """A copy with dotted keys (``optim.learning_rate``) replaced, validated anew."""
        raw = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if not key:
                raise SpecError(f"override {dotted!r}: expected SECTION.KEY")
            raw.setdefault(section, {})[key] = value
        return Spec.from_dict(raw, source=self.source, base_dir=self.base_dir)

    # -- views -----------------------------------------------------------------

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: _table(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in ("source", "base_dir")}

    def digest(self) -> str:
        """The digest of the spec as a run records it (redacted canonical JSON): the blob
        RunStarted's ``spec_digest`` names."""
        from firetitan_track.blobs import json_digest

        return json_digest(self.to_dict())

    @property
    def bad(self) -> KeyCheck:
        """The spec's errors, each naming its source and the key at fault (for the parts of the
        runner that are handed one section, not the spec)."""
        return KeyCheck(self.source)

    def resolve_path(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p


def load_spec(path: str | Path) -> Spec:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{p}: no such spec file") from None
    except IsADirectoryError:
        raise SpecError(f"{p}: is a folder, not a spec file") from None
    except OSError as e:
        raise SpecError(f"{p}: cannot read the spec: {e.strerror}") from None
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise SpecError(f"{p}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                        "save the spec as UTF-8") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{p}: not valid TOML: {e}") from None
    return Spec.from_dict(raw, source=str(p), base_dir=str(p.parent.resolve()))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict; VALUE is read as TOML (numbers, booleans), else kept as text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SpecError(f"override {item!r}: expected KEY=VALUE")
        out[key.strip()] = _toml_value(text.strip())
    return out


# -- internals ---------------------------------------------------------------------


def _toml_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _section_names() -> list[str]:
    return [n for n in _fields(Spec) if n not in ("source", "base_dir")]


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _table(section: Any) -> dict[str, Any]:
    """A section as its TOML table."""
    return section.as_table() if isinstance(section, RecipeSection) else dataclasses.asdict(section)


def _build_section(cls: type, raw: Mapping[str, Any], section: str, source: str) -> Any:
    keys = cls.keys() if cls is RecipeSection else {name: f.type for name, f in _fields(cls).items()}
    values = {}
    for key, value in raw.items():
        if key not in keys:
            raise SpecError(f"{source}: unknown key {section}.{key} (known in [{section}]: {', '.join(keys)})")
        values[key] = _coerce(keys[key], value, f"{section}.{key}", source)
    return cls.from_table(values) if cls is RecipeSection else cls(**values)


def _coerce(typ: Any, value: Any, key: str, source: str) -> Any:
    if typing.get_origin(typ) is Literal:
        allowed = typing.get_args(typ)
        if value not in allowed:  # (an enum member equals the string it stands for)
            raise SpecError(f"{source}: {key}: must be one of {', '.join(repr(str(a)) for a in allowed)}, "
                            f"got {value!r}")
        return allowed[allowed.index(value)]  # the choice itself: an enum's member where the choices are one
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        want = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}[typ]
        raise SpecError(f"{source}: {key}: expected {want}, got {_kind(value)} {value!r}")
    return value
