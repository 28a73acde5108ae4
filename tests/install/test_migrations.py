"""One set of migration scripts: inside the package, shipped in the wheel, and what alembic.ini
runs from the source tree for developers."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from firetitan_track.store import HEAD_REVISION, SCHEMA_DIR, revision_status
from tests.envs import ROOT


def test_the_wheel_ships_the_package_migration_scripts_and_there_is_no_second_set(wheel: Path) -> None:
    in_source = {p.relative_to(SCHEMA_DIR.parent.parent).as_posix(): p.read_bytes() for p in SCHEMA_DIR.rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    with zipfile.ZipFile(wheel) as z:
        in_wheel = {n: z.read(n) for n in z.namelist() if n.startswith("firetitan_track/schema/")}
    assert in_wheel == in_source
    assert any(n.startswith("firetitan_track/schema/versions/") for n in in_wheel)
    assert not (ROOT / "schema").exists()
    ini = configparser.ConfigParser(defaults={"here": str(ROOT)})  # as Alembic reads it
    ini.read(ROOT / "alembic.ini")
    assert Path(ini["alembic"]["script_location"]).resolve() == SCHEMA_DIR


def test_alembic_upgrade_head_from_the_source_tree(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    done = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "FIRETITAN_LEDGER": url}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert revision_status(url) == (HEAD_REVISION, HEAD_REVISION)
