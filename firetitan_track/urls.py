"""Where a ledger is: its URL as the user gave it, made absolute once, where it is read.

Standard library only, so a command can resolve its ledger before it imports the database
layer (``record`` starts the program first and opens the ledger beside it).
"""

from __future__ import annotations

import os
import re

__all__ = ["DEFAULT_LEDGER_URL", "absolute_url", "default_ledger_url"]

DEFAULT_LEDGER_URL = "sqlite:///.firetitan/ledger.db"  # relative to the current directory

# sqlite:///PATH (any driver): PATH relative to the current directory unless it starts with "/"
_SQLITE_FILE_URL = re.compile(r"(sqlite(?:\+\w+)?:///)([^?]*)(.*)", re.DOTALL)


def absolute_url(url: str) -> str:
    """``url`` with a relative SQLite file made absolute against the current directory.

    A relative ``sqlite:///`` URL names a different file after a ``chdir``, while every
    cache keyed by the URL text (SQLAlchemy's pool, MLflow's store map) keeps the first
    one: the same text would name two stores. URLs are resolved once, where they are
    read (command line, environment, default); other URLs are returned unchanged.
    """
    m = _SQLITE_FILE_URL.fullmatch(url)
    if m is None or m.group(2) in ("", ":memory:") or m.group(2).startswith("/"):
        return url
    return f"{m.group(1)}{os.path.abspath(m.group(2))}{m.group(3)}"


def default_ledger_url() -> str:
    """FIRETITAN_LEDGER when set, else the SQLite file under the current directory
    (a relative SQLite path made absolute now: see ``absolute_url``)."""
    return absolute_url(os.environ.get("FIRETITAN_LEDGER") or DEFAULT_LEDGER_URL)
