"""The ``firetitan-track`` command.

Commands live in the modules that own their behaviour and are loaded lazily, so
``firetitan-track runs`` never imports torch or MLflow:

- ledger commands (``runs``, ``events``, ``verify``, ``blob``, ``db``): firetitan_track.ledger_cli
- the local service (``local up|down|info``): runner.local.cli
- the runner (``run``, ``resume``, ``status``, ``rerun``): runner.cli; ``sweep``: runner.sweep
- views (``audit``, ``lineage``, ``replay``, ``export``, ``compare``, ``ui``):
  firetitan_track.projections.cli
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Iterator

import click


# command name -> "module:attribute"
COMMANDS: dict[str, str] = {
    "runs": "firetitan_track.ledger_cli:runs",
    "events": "firetitan_track.ledger_cli:events",
    "verify": "firetitan_track.ledger_cli:verify",
    "blob": "firetitan_track.ledger_cli:blob",
    "db": "firetitan_track.ledger_cli:db",
    "local": "runner.local.cli:local",
    "run": "runner.cli:run",
    "resume": "runner.cli:resume",
    "status": "runner.cli:status",
    "rerun": "runner.cli:rerun",
    "audit": "firetitan_track.projections.cli:audit",
    "lineage": "firetitan_track.projections.cli:lineage",
    "replay": "firetitan_track.projections.cli:replay",
    "export": "firetitan_track.projections.cli:export",
    "sweep": "runner.sweep:sweep",
    "compare": "firetitan_track.projections.cli:compare",
    "ui": "firetitan_track.projections.cli:ui",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in COMMANDS:
            return cmd
        module, attr = COMMANDS[name].split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            return None  # not built yet: click reports "No such command"


def ledger_url(ctx: click.Context) -> str:
    """The ledger URL chosen by ``--ledger``, else FIRETITAN_LEDGER, else the default."""
    root = ctx.find_root()
    from firetitan_track.ledger import default_ledger_url

    return (root.obj or {}).get("ledger_url") or default_ledger_url()


@contextlib.contextmanager
def reading_ledger(ctx: click.Context, *errors: type[BaseException]) -> Iterator[Any]:
    """The ledger for a command that only reads: it never creates one (a missing SQLite
    file is an error saying so), and a LedgerError, or any of ``errors``, becomes a
    message and a non-zero exit."""
    from firetitan_track.ledger import Ledger
    from firetitan_track.store import LedgerError

    try:
        ledger = Ledger.open(ledger_url(ctx), create=False)
        try:
            yield ledger
        finally:
            ledger.close()
    except (LedgerError, *errors) as exc:
        raise click.ClickException(exc.args[0] if exc.args else str(exc)) from None


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Rows under headers, in left-aligned columns."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in [headers, ["-" * w for w in widths], *rows])


@click.group(cls=LazyGroup)
@click.option("--ledger", "ledger", metavar="URL", default=None,
              help="Ledger URL (sqlite:///PATH or postgresql+psycopg://...). "
                   "Default: $FIRETITAN_LEDGER, else sqlite:///.firetitan/ledger.db")
@click.version_option(package_name="firetitan-track")
@click.pass_context
def main(ctx: click.Context, ledger: str | None) -> None:
    """Run FireTitan research loops and keep an auditable record of them."""
    ctx.ensure_object(dict)
    ctx.obj["ledger_url"] = ledger
