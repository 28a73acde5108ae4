"""A sweep's search space and the Optuna study that samples it.

``--param KEY=DIST`` names a spec key and how to search it: ``log:LOW:HIGH``,
``float:LOW:HIGH``, ``int:LOW:HIGH`` or ``choice:A,B,C``; ``--grid KEY=V1,V2`` is
``choice`` under ``--search grid``. Everything is checked here, against the spec,
before a sweep writes anything.

Optuna's RDB storage lives in the ledger's own database (its tables beside the
ledger's: schema revision 0002 makes them on PostgreSQL; on SQLite the first sweep
does). It is how trials spread over machines: every worker opens the same study,
and the sampler sees every trial any worker has asked for. The ledger stays the
source of truth; the study only proposes params and judges eval scores for pruning.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from firetitan_track.errors import UserError

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution
    from optuna.storages import RDBStorage

# A searched value (``choices``, a grid point's values) is Any: a spec key's value read as TOML,
# whichever type that key takes.

__all__ = ["SweepError", "Dist", "SEARCHES", "DISTRIBUTIONS", "parse_params", "parse_grid", "grid_size",
           "open_study", "storage", "sampler_for", "pruner_for", "MEDIAN_STARTUP_TRIALS"]

SEARCHES = ("grid", "random", "tpe")
DISTRIBUTIONS = ("log", "float", "int", "choice")
PRUNERS = ("median", "none")
# The median rule judges a trial once this many trials have finished. One: sweeps here
# are a handful of trials, each costly, and the first finished trial is already a bar.
MEDIAN_STARTUP_TRIALS = 1
_DIST_HELP = "log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH or choice:A,B,C"


class SweepError(UserError, ValueError):
    """A sweep that cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class Dist:
    """How one spec key is searched."""

    kind: str  # log | float | int | choice
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()

    def text(self) -> str:
        """The distribution as the command line spells it (and SweepStarted records it)."""
        if self.kind == "choice":
            return "choice:" + ",".join(_value_text(c) for c in self.choices)
        return f"{self.kind}:{_value_text(self.low)}:{_value_text(self.high)}"

    def examples(self) -> list[Any]:
        """Values that must all be valid for the spec key (checked before anything runs)."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def optuna(self) -> BaseDistribution:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(self.choices)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high))  # type: ignore[arg-type]
        return FloatDistribution(float(self.low), float(self.high), log=self.kind == "log")  # type: ignore[arg-type]


def _value_text(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _read_value(key: str, text: str) -> Any:
    from runner.spec import parse_overrides

    return parse_overrides([f"{key}={text.strip()}"])[key]


def _split(flag: str, item: str, what: str) -> tuple[str, str]:
    key, sep, rest = item.partition("=")
    key = key.strip()
    if not sep or not key or not rest.strip():
        raise SweepError(f"{flag} {item!r}: expected {what}")
    return key, rest.strip()


def parse_params(items: Sequence[str]) -> dict[str, Dist]:
    """``--param KEY=DIST`` strings to {KEY: Dist}."""
    space: dict[str, Dist] = {}
    for item in items:
        key, dist = _split("--param", item, f"KEY=DIST with DIST one of {_DIST_HELP}")
        if key in space:
            raise SweepError(f"--param {key} is given twice")
        kind, _, rest = dist.partition(":")
        if kind not in DISTRIBUTIONS:
            raise SweepError(f"--param {item!r}: unknown distribution {kind!r}; use {_DIST_HELP}")
        if kind == "choice":
            space[key] = Dist("choice", choices=_choices("--param", item, key, rest))
            continue
        bounds = rest.split(":")
        if len(bounds) != 2 or not all(b.strip() for b in bounds):
            raise SweepError(f"--param {item!r}: expected {kind}:LOW:HIGH")
        number = int if kind == "int" else float
        try:
            low, high = (number(b.strip()) for b in bounds)
        except ValueError:
            raise SweepError(f"--param {item!r}: LOW and HIGH must be {'integers' if kind == 'int' else 'numbers'}") from None
        if not (math.isfinite(low) and math.isfinite(high)):
            raise SweepError(f"--param {item!r}: LOW and HIGH must be finite")
        if low >= high:
            raise SweepError(f"--param {item!r}: LOW ({low}) must be below HIGH ({high})")
        if kind == "log" and low <= 0:
            raise SweepError(f"--param {item!r}: a log distribution needs LOW > 0")
        space[key] = Dist(kind, low, high)
    return space


def _choices(flag: str, item: str, key: str, text: str) -> tuple[Any, ...]:
    values = [v for v in text.split(",") if v.strip()]
    if not values:
        raise SweepError(f"{flag} {item!r}: no values (expected {key}=V1,V2,...)")
    return tuple(_read_value(key, v) for v in values)


def parse_grid(items: Sequence[str]) -> dict[str, Dist]:
    """``--grid KEY=V1,V2`` strings to {KEY: choice Dist}; values read as TOML (numbers, booleans), else text."""
    space: dict[str, Dist] = {}
    for item in items:
        key, values = _split("--grid", item, "KEY=V1,V2,...")
        if key in space:
            raise SweepError(f"--grid {key} is given twice; list all its values in one --grid")
        space[key] = Dist("choice", choices=_choices("--grid", item, key, values))
    return space


def grid_size(space: dict[str, Dist]) -> int:
    return math.prod(len(d.choices) for d in space.values())


def grid_points(space: dict[str, Dist]) -> list[dict[str, Any]]:
    """Every combination, the first key varying slowest."""
    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k].choices for k in keys))]


# -- Optuna ---------------------------------------------------------------------------------------


def sampler_for(search: str, space: dict[str, Dist], seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    if search == "grid":
        return optuna.samplers.GridSampler({k: list(d.choices) for k, d in space.items()}, seed=seed)
    if search == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def pruner_for(prune: str) -> optuna.pruners.BasePruner:
    import optuna

    if prune == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def open_study(ledger_url: str, sweep_id: str, search: str, space: dict[str, Dist], seed: int,
               prune: str) -> optuna.Study:
    """The sweep's Optuna study in the ledger's database (created by the first worker, joined by the rest)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep reports trials itself
    return optuna.create_study(storage=storage(ledger_url), study_name=sweep_id, direction="maximize",
                               sampler=sampler_for(search, space, seed), pruner=pruner_for(prune),
                               load_if_exists=True)


def storage(ledger_url: str) -> RDBStorage:
    """Optuna's RDB storage on the ledger's database."""
    from optuna.storages import RDBStorage

    from firetitan_track.store import sqlite_path

    path = sqlite_path(ledger_url)
    if path is None:
        # PostgreSQL: the tables exist (db upgrade); Optuna's own Alembic stamp would collide
        # with the ledger's alembic_version, so its version check is off (the pinned release
        # made the tables: firetitan_track/schema/versions/0002)
        return RDBStorage(ledger_url, engine_kwargs={"pool_size": 2, "max_overflow": 2, "pool_pre_ping": True},
                          skip_compatibility_check=True, skip_table_creation=True)
    import fcntl

    # SQLite: made on first use, one process at a time (Optuna's first write is not race-free)
    lock_path = path.resolve().parent / f"{path.name}-leases" / "optuna.lock"
    lock_path.parent.mkdir(exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return RDBStorage(f"sqlite:///{path.resolve()}", engine_kwargs={"connect_args": {"timeout": 30}},
                          skip_compatibility_check=True)
