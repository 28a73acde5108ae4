"""The one rule for ids that travel: run ids, stream names, and the ids inside events.

A run id becomes part of MLflow filters, file names, URLs and terminal tables, so it
is plain: 1-128 letters, digits, ``.``, ``_`` or ``-``, starting with a letter or
digit (no ``/``, no ``..`` alone, no control characters or ANSI escapes). A stream is
a run id, or ``sweep:`` and a run id for a sweep's own stream. The ids inside events
that name things (an eval id, a trainer job, a deployment) follow the same rule, so
any of them can be a file name without further thought.

Every writer applies it (``Ledger.append``, ``import``, ``run``) and every reader that
makes a path of a stored id checks it again with :func:`file_name`: a ledger or a
bundle is untrusted until checked.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

from firetitan_track.errors import UserError

if TYPE_CHECKING:
    from typing_extensions import TypeIs

__all__ = ["RUN_ID_RULE", "SWEEP_STREAM_PREFIX", "UnsafeId", "is_run_id", "is_stream_id", "run_id_problem",
           "check_run_id", "file_name", "sweep_stream"]

RUN_ID_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
SWEEP_STREAM_PREFIX = "sweep:"  # a sweep's own stream: "sweep:<sweep id>"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def sweep_stream(sweep_id: str) -> str:
    """The ledger stream that records a sweep."""
    return f"{SWEEP_STREAM_PREFIX}{sweep_id}"


class UnsafeId(UserError, ValueError):
    """A stored id that breaks the rule where it was about to become part of a path."""


def is_run_id(value: object) -> TypeIs[str]:
    return isinstance(value, str) and _RUN_ID.fullmatch(value) is not None


def is_stream_id(value: object) -> TypeIs[str]:
    """A run id, or a sweep's stream (``sweep:`` + a run id)."""
    return is_run_id(value) or (isinstance(value, str) and value.startswith(SWEEP_STREAM_PREFIX)
                                and is_run_id(value[len(SWEEP_STREAM_PREFIX):]))


def run_id_problem(value: object, secrets: Sequence[str] = ()) -> str | None:
    """Why ``value`` cannot be a stream id (None when it can). ``secrets``: values (from
    ``redact.secret_values``) no id may contain, since ids are shown and exported unredacted."""
    if not is_stream_id(value):
        return f"a run id is {RUN_ID_RULE}; {_shown(value)} is not"
    if any(s in value for s in secrets):
        return "a run id must not contain the value of a credential in the environment"
    return None


def check_run_id(run_id: str) -> None:
    """Refuse an id a new run cannot take: the rule for a run (not a sweep's stream), and no
    credential's value in it (ids are shown and exported unredacted). A UserError names why."""
    from firetitan_track.redact import secret_values

    if not is_run_id(run_id):
        raise UserError(f"run id {run_id!r}: use {RUN_ID_RULE}")
    if any(secret in run_id for secret in secret_values()):
        raise UserError("the run id holds the value of a credential in the environment (FIREWORKS_API_KEY or "
                        "another key): run ids are shown, stored and exported as they are; choose another")


def file_name(value: object, suffix: str = "") -> str:
    """``value + suffix`` as one plain file name, for a stored id about to become part of a
    path; UnsafeId when the id does not follow the rule (``../../x``, ``/tmp/x``)."""
    if not is_run_id(value):
        raise UnsafeId(f"{_shown(value)} is not a plain id ({RUN_ID_RULE}); it is not used as a file name")
    return f"{value}{suffix}"


def _shown(value: object) -> str:
    """``value`` as a message may show it: repr escapes control characters (an ANSI escape in
    an id must not repaint the terminal that prints the error), and a long one is cut."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
