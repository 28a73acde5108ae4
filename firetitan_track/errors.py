"""The one base class for errors a person can act on.

Every error the project raises for bad input or a state the user must fix (a bad spec,
an unknown run, an out-of-date schema, a sweep that cannot start) derives from
``UserError``; the command line turns it into its message and exit status 1 in one
place (``firetitan_track.cli.user_errors``), with secrets redacted.
"""

from __future__ import annotations

__all__ = ["UserError", "first_line"]


class UserError(Exception):
    """A failure whose message names what is wrong and where, and what to do about it."""


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, for a message of our own that names its cause: a
    database error's driver message (SQLAlchemy keeps it in ``orig``), without the ``ERROR: ``
    the SDK's formatted errors open with; the error's type when it says nothing."""
    text = str(getattr(exc, "orig", None) or exc).strip().removeprefix("ERROR: ")
    return text.splitlines()[0] if text else type(exc).__name__
