"""The ledger's commands (``runs``, ``events``, ``verify``, ``blob``, ``db upgrade|current``)
and the click helpers every command shares: the ledger URL, a reading ledger, the one
error adapter and the table renderer.

The command root (``firetitan-track``) lives above this package and registers these
commands from there; nothing here knows what registers it. Reading commands never create a ledger: on
a missing SQLite file they say so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import sys
from typing import TYPE_CHECKING, Iterator

import click

from firetitan_track.errors import UserError
from firetitan_track.redact import redact_text
from firetitan_track.urls import absolute_url, default_ledger_url

# The database layer (ledger, store, SQLAlchemy) is imported by the commands that open a
# ledger, when they run: the shared helpers here stay light, so a command that need not wait
# for it (``record`` starts its program before it opens the ledger) does not.
if TYPE_CHECKING:
    from firetitan_track.ledger import Ledger


def absolute_uri(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A click callback for options that name a store by URL: a relative SQLite path is made
    absolute as the command line is read (``urls.absolute_url``)."""
    return absolute_url(value) if value else value


def ledger_url(ctx: click.Context) -> str:
    """The ledger URL chosen by ``--ledger``, else FIRETITAN_LEDGER, else the default."""
    root = ctx.find_root()
    return (root.obj or {}).get("ledger_url") or default_ledger_url()


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """The one adapter from the project's errors to the command line: a UserError
    becomes its message (secrets redacted) and exit status 1."""
    try:
        yield
    except UserError as exc:
        raise click.ClickException(redact_text(str(exc))) from None


@contextlib.contextmanager
def reading_ledger(ctx: click.Context) -> Iterator[Ledger]:
    """The ledger for a command that only reads: it never creates one (a missing SQLite
    file is an error saying so), and a UserError becomes a message and exit status 1."""
    from firetitan_track.ledger import Ledger

    with user_errors():
        ledger = Ledger.open(ledger_url(ctx), create=False)
        try:
            yield ledger
        finally:
            ledger.close()


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Rows under headers, in left-aligned columns."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in [headers, ["-" * w for w in widths], *rows])


def _printable(text: str) -> str:
    """Text from the ledger as a terminal may show it: one that breaks the run-id rule (written
    behind the ledger's back) is shown escaped, so a control character cannot redraw the table."""
    return text if text.isprintable() else repr(text)


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def runs(ctx: click.Context, as_json: bool) -> None:
    """List the runs in the ledger."""
    with reading_ledger(ctx) as ledger:
        infos = ledger.runs()
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(i) for i in infos], indent=2))
    elif not infos:
        click.echo("no runs")
    else:
        click.echo(table(["RUN", "EVENTS", "FIRST (UTC)", "LAST (UTC)", "LAST EVENT"],
                          [[_printable(i.run_id), str(i.events), _when(i.first_at), _when(i.last_at),
                            _printable(i.last_type)] for i in infos]))


@click.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the events as a JSON array.")
@click.pass_context
def events(ctx: click.Context, run_id: str, as_json: bool) -> None:
    """Show a run's events in order."""
    with reading_ledger(ctx) as ledger:
        recorded = ledger.read(run_id)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(e) for e in recorded], indent=2, ensure_ascii=False))
        return
    rows = []
    for e in recorded:
        data = json.dumps(e.data, sort_keys=True, ensure_ascii=False)
        rows.append([str(e.version), str(e.position), _when(e.recorded_at), e.type,
                     data if len(data) <= 80 else data[:77] + "..."])
    click.echo(table(["VERSION", "POSITION", "RECORDED (UTC)", "TYPE", "DATA"], rows))


@click.command()
@click.argument("run_id", required=False)
@click.option("--bundle", "bundle_path", metavar="FILE", type=click.Path(dir_okay=False),
              help="Check a bundle file instead, offline (no ledger is opened).")
@click.option("--trust", "trust", multiple=True, metavar="KEY",
              help="A public key (ed25519:BASE64, as `key` prints it) or a PEM key file whose signatures you "
                   "trust: every stream must then be vouched for to its end by one of them.")
@click.pass_context
def verify(ctx: click.Context, run_id: str | None, bundle_path: str | None, trust: tuple[str, ...]) -> None:
    """Recompute hash chains, payloads, blob digests and signed heads; exit 1 naming the first bad version."""
    from firetitan_track.signing import load_trusted

    with user_errors():
        trusted = load_trusted(trust) if trust else None
    if bundle_path is not None:
        if run_id is not None:
            raise click.UsageError("give a RUN_ID or --bundle FILE, not both")
        _verify_bundle(ctx, bundle_path, trusted)
        return
    with reading_ledger(ctx) as ledger:
        report = ledger.verify_report(run_id, trusted)
    if trusted is not None:
        _vouching(report.heads, trusted)
    if not report.problems:
        click.echo("intact")
        return
    for p in report.problems:
        click.echo(f"run {_printable(p.run_id)}: first bad version {p.version}: {p.reason}")
    ctx.exit(1)


def _verify_bundle(ctx: click.Context, path: str, trusted: set[str] | None) -> None:
    from firetitan_track.bundle import read_bundle
    from firetitan_track.signing import trust_problems

    with user_errors():
        found = read_bundle(path)
    problems = [str(p) for p in found.problems]
    if trusted is not None:
        _vouching(found.head_checks, trusted)
        problems += [f"run {c.run_id} version {v}: {why}" for c in found.head_checks.values()
                     for v, why in trust_problems(c, trusted)]
    if not problems:
        click.echo(f"intact: {path}: {len(found.streams)} streams, {found.events} events, {len(found.blobs)} blobs"
                   f", {len(found.heads)} signed heads")
        return
    for p in problems:
        click.echo(f"bundle {path}: {p}")
    ctx.exit(1)


def _vouching(checks: dict, trusted: set[str]) -> None:
    """Who vouches for each stream: the trusted key that signed the furthest, and how far."""
    from firetitan_track.signing import key_id

    for name, check in sorted(checks.items()):
        keys = sorted(((v, k) for k, v in check.vouched.items() if k in trusted), reverse=True)
        if keys:
            through, key = keys[0]
            whole = "all" if through == check.events - 1 else "not all"
            click.echo(f"run {name}: vouched for by {key} ({key_id(key)}) through version {through} "
                       f"({whole} of its {check.events} events)")
        else:
            click.echo(f"run {name}: no trusted key vouches for it")


@click.command()
@click.option("--new", "new_file", metavar="FILE", type=click.Path(dir_okay=False),
              help="Make a new ed25519 private key in FILE (mode 0600) and print its public key; point "
                   "FIRETITAN_SIGNING_KEY at it to sign with it.")
@click.pass_context
def key(ctx: click.Context, new_file: str | None) -> None:
    """Print the public key that signs this ledger's heads (what `verify --trust` takes), and where
    its private key is kept."""
    from pathlib import Path

    from firetitan_track.signing import KEY_ENV, new_key_file

    if new_file is not None:
        with user_errors():
            made = new_key_file(Path(new_file))
        click.echo(f"{made.public_text}  (private key: {made.source}; export {KEY_ENV}={made.source})")
        return
    with reading_ledger(ctx) as ledger:
        found = ledger.signing_key(create=False)
    if found is None:
        click.echo(f"no signing key: this ledger's heads are not signed (set {KEY_ENV} to a PEM key file; "
                   "`firetitan-track key --new FILE` makes one)")
        ctx.exit(1)
    click.echo(f"{found.public_text}  (private key: {found.source})")


@click.command()
@click.argument("digest")
@click.pass_context
def blob(ctx: click.Context, digest: str) -> None:
    """Write the blob with DIGEST to stdout, byte for byte."""
    with reading_ledger(ctx) as ledger:
        data = ledger.get_blob(digest)
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@click.group()
def db() -> None:
    """The ledger's database schema."""


@db.command()
@click.pass_context
def upgrade(ctx: click.Context) -> None:
    """Create the ledger tables, or bring them to the current revision."""
    from firetitan_track.store import upgrade_schema

    with user_errors():
        before, after = upgrade_schema(ledger_url(ctx))
    if before == after:
        click.echo(f"already at head revision {after}")
    else:
        click.echo(f"upgraded from {before or '(empty)'} to {after}")


@db.command()
@click.pass_context
def current(ctx: click.Context) -> None:
    """Print the ledger's schema revision and whether it is the head."""
    from firetitan_track.store import HEAD_REVISION, UPGRADE_HINT, revision_status

    with user_errors():
        revision, head = revision_status(ledger_url(ctx))
    if revision == head:
        click.echo(f"{revision} (head)")
    else:
        click.echo(f"{revision or '(empty)'} (head is {HEAD_REVISION}: run `{UPGRADE_HINT}`)")


@click.command()
@click.argument("run_ids", nargs=-1)
@click.option("--sweep", "sweep_ids", multiple=True, metavar="ID", help="Add a sweep's stream and its trials' runs.")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="The bundle to write (a .tar.gz).")
@click.pass_context
def bundle(ctx: click.Context, run_ids: tuple[str, ...], sweep_ids: tuple[str, ...], out: str) -> None:
    """Write RUN_IDS (and --sweep's runs) with every blob they reference to one verifiable file."""
    from firetitan_track.bundle import write_bundle

    with reading_ledger(ctx) as ledger:
        written = write_bundle(ledger, out, run_ids, sweep_ids)
    click.echo(f"wrote {out}: {len(written.streams)} streams ({', '.join(written.streams)}), "
               f"{written.events} events, {written.blobs} blobs, {written.size} bytes, sha256 {written.sha256}")


@click.command("import")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False))
@click.pass_context
def import_(ctx: click.Context, path: str) -> None:
    """Add a bundle's runs to the ledger, after verifying it; importing again adds nothing."""
    from firetitan_track.bundle import import_bundle, importable_bundle
    from firetitan_track.ledger import Ledger

    with user_errors():
        found = importable_bundle(path)  # before the ledger is opened: a bad file creates nothing
        with Ledger.open(ledger_url(ctx)) as ledger:
            report = import_bundle(ledger, found)
    for stream, n in report.written.items():
        click.echo(f"{stream}: {n} event{'s' if n != 1 else ''} imported" if n else f"{stream}: already here")
    if report.events:
        click.echo(f"imported {report.events} events (with the {report.blobs} blobs they reference) from {path}")
    else:
        click.echo(f"nothing new: every run in {path} is already here")
