"""The one base class for errors a person can act on.

Every error the project raises for bad input or a state the user must fix (a bad spec,
an unknown run, an out-of-date schema, a sweep that cannot start) derives from
``UserError``; the command line turns it into its message and exit status 1 in one
place (``firetitan_track.cli.user_errors``), with secrets redacted.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A failure whose message names what is wrong and where, and what to do about it."""
