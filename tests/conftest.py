"""Fixtures any test may use: a fresh SQLite ledger in a temporary folder."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from firetitan_track import Ledger


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    """A URL for a ledger that does not exist yet (created on first open)."""
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    led = Ledger.open(ledger_url)
    yield led
    led.close()
