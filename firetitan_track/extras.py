"""What each optional part of firetitan-track needs, and the line that installs it.

The core (the ledger, ``track()``, the views and every reading command) needs only
SQLAlchemy, Alembic and click. The rest come as extras: ``postgres``, ``mlflow``,
``runner``, ``local`` (and ``all``). pyproject.toml's ``[project.optional-dependencies]``
is their one list; this module reads it back from the installed package's metadata, so
a command whose extra is missing says which one to install instead of failing on an import.
"""

from __future__ import annotations

import functools
import re

from firetitan_track.errors import UserError

__all__ = ["DIST", "MissingExtra", "install_line", "missing", "require", "requirements"]

DIST = "firetitan-track"
# what each extra is for, in the words a message uses when no command is named
PURPOSES = {
    "postgres": "a PostgreSQL ledger",
    "mlflow": "the MLflow export and UI",
    "runner": "the runner",
    "local": "the local service",
}

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def install_line(extra: str) -> str:
    return f"pip install '{DIST}[{extra}]'"


class MissingExtra(UserError):
    """A part of firetitan-track whose extra is not installed here."""

    def __init__(self, extra: str, what: str, missing: list[str]):
        self.extra = extra
        self.missing = missing
        super().__init__(f"{what} needs the [{extra}] extra of {DIST} ({', '.join(missing)} not installed): "
                         f"{install_line(extra)}")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def requirements(extra: str) -> tuple[str, ...] | None:
    """The distributions ``extra`` adds, as the installed package declares them; None where
    firetitan-track itself is not installed (its code run from a bare source tree)."""
    from importlib import metadata  # here, not at import: the command line's start stays light

    try:
        declared = metadata.requires(DIST) or []
    except metadata.PackageNotFoundError:
        return None
    names = []
    for line in declared:
        requirement, _, marker = line.partition(";")
        found = _EXTRA.search(marker)
        name = _NAME.match(requirement)
        if found and name and _normalize(found.group(1)) == extra and _normalize(name.group(1)) != DIST:
            names.append(name.group(1))  # ([all] names the other extras through firetitan-track itself)
    return tuple(names)


def missing(extra: str) -> list[str]:
    """The distributions of ``extra`` that are not installed (none known: an empty list)."""
    from importlib import metadata

    gone = []
    for name in requirements(extra) or ():
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            gone.append(name)
    return gone


def require(extra: str, what: str | None = None) -> None:
    """Raise MissingExtra (a UserError: a message and exit 1 at the command line) unless
    everything ``extra`` adds is installed."""
    gone = missing(extra)
    if gone:
        raise MissingExtra(extra, what or PURPOSES[extra], gone)
