"""firetitan-track: an event-sourced ledger of FireTitan training runs.

The public surface is re-exported here; the modules behind it are ledger.py
(append, read, follow, verify), store.py (SQLite/PostgreSQL), blobs.py, redact.py
and events.py (the catalogue); track() (tracking.py) and autolog() (recording/) record
programs. Nothing here imports torch or MLflow.
"""

from typing import TYPE_CHECKING, Any

# Each public name and the module that defines it. The modules load on first use (PEP 562),
# so importing one part of the package (the recorder's start inside a recorded program, the
# command line's first screen) does not import the ledger's database layer with it.
_EXPORTS = {
    "NewEvent": "events", "RecordedEvent": "events", "new_event": "events",
    "ConcurrencyError": "ledger", "Ledger": "ledger", "Problem": "ledger", "RunInfo": "ledger",
    "NotFound": "ledger", "FollowCursor": "ledger",
    "redact": "redact", "redact_text": "redact",
    "TrackedService": "tracking", "track": "tracking",
    "autolog": "recording",
    "LedgerError": "store", "SchemaOutOfDate": "store",
}

if TYPE_CHECKING:
    from firetitan_track.events import NewEvent, RecordedEvent, new_event
    from firetitan_track.ledger import ConcurrencyError, FollowCursor, Ledger, NotFound, Problem, RunInfo
    from firetitan_track.recording import autolog
    from firetitan_track.redact import redact, redact_text
    from firetitan_track.store import LedgerError, SchemaOutOfDate
    from firetitan_track.tracking import TrackedService, track


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'firetitan_track' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"firetitan_track.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "Ledger",
    "LedgerError",
    "ConcurrencyError",
    "NotFound",
    "FollowCursor",
    "SchemaOutOfDate",
    "NewEvent",
    "RecordedEvent",
    "new_event",
    "RunInfo",
    "Problem",
    "redact",
    "redact_text",
    "track",
    "autolog",
    "TrackedService",
]
