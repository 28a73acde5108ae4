"""firetitan-track: an event-sourced ledger of FireTitan training runs.

The public surface is re-exported here; the modules behind it are ledger.py
(append, read, follow, verify), store.py (SQLite/PostgreSQL), blobs.py, redact.py
and events.py (the catalogue); track() (tracking.py) and autolog() (recording/) record
programs. Nothing here imports torch or MLflow.
"""

from firetitan_track.events import NewEvent, RecordedEvent, new_event
from firetitan_track.ledger import ConcurrencyError, Ledger, Problem, RunInfo, NotFound
from firetitan_track.redact import redact, redact_text
from firetitan_track.tracking import TrackedService, track
from firetitan_track.recording import autolog
from firetitan_track.store import LedgerError, SchemaOutOfDate

__all__ = [
    "Ledger",
    "LedgerError",
    "ConcurrencyError",
    "NotFound",
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
