"""Signed heads: what the ledger vouches for, and who vouches for it.

The hash chain catches an event edited without recomputing the chain. It cannot
catch a forger who recomputes it (change a score, re-hash every later event), nor a
stream cut short (its last events removed: the chain that is left is intact). So the
ledger signs heads: a *signed head* is an ed25519 signature over (run, version, hash
of the event at that version, when), stored in the ``signed_heads`` table and carried
in bundles. A head is signed when a run ends (RunCompleted, RunFailed, TrialPruned, a
promotion's outcome, each step of a sweep's stream: ``events.SIGNED_AFTER``) and at
least every ``SIGN_EVERY`` events of a stream, in the append's own transaction.

What a valid signed head proves: the holder of that private key saw this stream with
exactly this history up to that version. ``verify`` then catches

- a re-chained forgery: any change before a signed version changes the hash there;
- truncation back past a signed head: the stream no longer reaches the signed version;
- a forged or altered signature: it does not verify under its public key.

What it cannot prove:

- anything after the newest signed head (an unfinished run's last < SIGN_EVERY events,
  or events appended after its end by someone without the key: ``verify --trust``
  names them as not vouched for);
- that the signer is who you think: a signature says only "this key", so a verifier
  names the keys it trusts (``--trust``); a forger with their own key signs their
  forgery validly, and only the trust decision tells the two apart;
- anything against the key's holder: whoever can read the private key can sign any
  history. Keep it where the people who can edit the ledger's database cannot read it;
- that signed heads were not deleted: someone who removes a run's tail *and* every
  signed head past it leaves a shorter stream whose remaining heads all verify. A copy
  of a signed head kept elsewhere (a bundle, an earlier ``verify`` output) catches that.

Where the private key lives (never in the ledger's database: whoever can rewrite
events there could then re-sign them):

- ``FIRETITAN_SIGNING_KEY``: a PEM file (PKCS8 ed25519) a team provides, for every
  ledger this process writes; ``firetitan-track key --new FILE`` makes one;
- else a SQLite ledger's own key, ``<database file>.signing-key`` beside it (mode 0600),
  made on the first signed append;
- else (PostgreSQL without a team key) heads are not signed, and ``verify`` says so.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firetitan_track.errors import UserError

__all__ = ["SIGN_EVERY", "KEY_ENV", "SignedHead", "SigningKey", "SigningError", "HeadCheck", "key_text", "key_id",
           "parse_public_key", "load_trusted", "ledger_key_path", "signing_key_for", "new_key_file",
           "check_heads", "trust_problems", "should_sign"]

SIGN_EVERY = 64  # the most events of a stream after its last signed head
KEY_ENV = "FIRETITAN_SIGNING_KEY"
_KEY_PREFIX = "ed25519:"
_DOMAIN = "firetitan-track signed head v1"  # signatures of other messages never pass as heads


class SigningError(UserError):
    """A key that cannot be read, made or trusted; the message names the file or text."""


def key_text(public: Ed25519PublicKey) -> str:
    """A public key as printed and passed to ``--trust``: ``ed25519:`` and its 32 raw bytes in base64."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _KEY_PREFIX + base64.b64encode(raw).decode()


def key_id(text: str) -> str:
    """A short name for a public key in messages (the key itself is ``text``)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_public_key(text: str) -> Ed25519PublicKey:
    if not isinstance(text, str) or not text.startswith(_KEY_PREFIX):
        raise SigningError(f"{text!r} is not a public key (expected {_KEY_PREFIX}BASE64)")
    try:
        raw = base64.b64decode(text[len(_KEY_PREFIX):], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise SigningError(f"{text!r} is not an ed25519 public key (32 bytes in base64)") from None


@dataclass(frozen=True)
class SignedHead:
    """A signature over one stream's head: ``hash`` is the hash of the event at ``version``."""

    run_id: str
    version: int
    hash: str
    signed_at: float
    public_key: str  # key_text of the signer
    signature: str  # base64

    def message(self) -> bytes:
        return json.dumps([_DOMAIN, self.run_id, self.version, self.hash, self.signed_at],
                          separators=(",", ":")).encode()

    def valid(self) -> bool:
        """The signature verifies under ``public_key`` (which says nothing of whether to trust it)."""
        try:
            parse_public_key(self.public_key).verify(base64.b64decode(self.signature, validate=True),
                                                     self.message())
            return True
        except (SigningError, InvalidSignature, ValueError):
            return False

    def to_dict(self) -> dict[str, str | int | float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> SignedHead:
        """From a stored or bundled row; ValueError when it is not one."""
        types = {"run_id": str, "version": int, "hash": str, "signed_at": float, "public_key": str, "signature": str}
        if not isinstance(d, Mapping):
            raise ValueError("a signed head is an object")
        for name, kind in types.items():
            value = d.get(name)
            if kind is float and type(value) is int:
                value = float(value)
            if type(value) is not kind:
                raise ValueError(f"a signed head's {name} is missing or not a {kind.__name__}")
        return cls(**{k: (float(d[k]) if k == "signed_at" else d[k]) for k in types})


class SigningKey:
    """A private key that signs heads, and where it came from (for messages)."""

    def __init__(self, private: Ed25519PrivateKey, source: str) -> None:
        self._private = private
        self.source = source
        self.public_text = key_text(private.public_key())

    def sign(self, run_id: str, version: int, hash: str, signed_at: float | None = None) -> SignedHead:
        head = SignedHead(run_id, version, hash, round(time.time() if signed_at is None else signed_at, 6),
                          self.public_text, "")
        signature = base64.b64encode(self._private.sign(head.message())).decode()
        return SignedHead(run_id, version, hash, head.signed_at, self.public_text, signature)

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SigningError(f"cannot read the signing key {path}: {e.strerror or e}") from None
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise SigningError(f"{path} is not an unencrypted PEM private key ({e})") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise SigningError(f"{path} holds a {type(private).__name__}, not an ed25519 key")
        return cls(private, str(path))


def new_key_file(path: Path) -> SigningKey:
    """Make a new ed25519 key in ``path`` (mode 0600); refuses to replace a file. The file
    appears whole or not at all (written aside, then linked), so a concurrent reader never
    meets half a key."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    aside = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}")
    try:
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.link(aside, path)
    except FileExistsError:
        raise SigningError(f"{path} exists; a key file is never replaced (move it away first)") from None
    except OSError as e:
        raise SigningError(f"cannot write the signing key {path}: {e.strerror or e}") from None
    finally:
        aside.unlink(missing_ok=True)
    return SigningKey(private, str(path))


def ledger_key_path(sqlite_file: Path | None) -> Path | None:
    """Where a ledger's own key lives: beside its SQLite file (None for other databases)."""
    return None if sqlite_file is None else sqlite_file.with_name(sqlite_file.name + ".signing-key")


def signing_key_for(sqlite_file: Path | None, *, create: bool) -> SigningKey | None:
    """The key this process signs with for a ledger: the team's (FIRETITAN_SIGNING_KEY), else the
    ledger's own beside its SQLite file (made when ``create``), else None."""
    team = os.environ.get(KEY_ENV)
    if team:
        return SigningKey.load(Path(team).expanduser())
    own = ledger_key_path(sqlite_file)
    if own is None:
        return None
    if own.exists():
        return SigningKey.load(own)
    if not create:
        return None
    try:
        return new_key_file(own)
    except SigningError:
        if own.exists():  # made meanwhile by another writer of the same ledger
            return SigningKey.load(own)
        raise


def load_trusted(items: Iterable[str]) -> set[str]:
    """The public keys named by ``--trust``: each an ``ed25519:BASE64`` text, or a PEM file
    holding a public key or a private one (whose public half is trusted)."""
    trusted = set()
    for item in items:
        if item.startswith(_KEY_PREFIX):
            trusted.add(key_text(parse_public_key(item)))
            continue
        path = Path(item).expanduser()
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SigningError(f"--trust {item}: neither {_KEY_PREFIX}BASE64 nor a readable key file "
                               f"({e.strerror or e})") from None
        try:
            key: Any = serialization.load_pem_public_key(data)
        except ValueError:
            key = SigningKey.load(path)._private.public_key()
        if not isinstance(key, Ed25519PublicKey):
            raise SigningError(f"--trust {item}: not an ed25519 key")
        trusted.add(key_text(key))
    return trusted


def should_sign(version: int, last_type: str, first_version: int, signed_after: frozenset[str]) -> bool:
    """Whether an append ending at ``version`` (whose batch began at ``first_version``) signs
    its new head: it ends a run (or another SIGNED_AFTER event), or it completes a block of
    SIGN_EVERY events (so no more than SIGN_EVERY events ever follow the last signed head)."""
    return last_type in signed_after or (version + 1) // SIGN_EVERY != first_version // SIGN_EVERY


@dataclass(frozen=True)
class HeadCheck:
    """What one stream's signed heads say: problems (the stream does not reach a head, or a
    signature does not verify), and who vouches for how much of it."""

    run_id: str
    events: int
    problems: list[tuple[int, str]]  # (version, why)
    vouched: dict[str, int]  # signer's public key -> the newest version it signed (valid, reached)

    def trusted_through(self, trusted: set[str]) -> int:
        """The newest version a trusted key vouches for (-1: none)."""
        return max((v for k, v in self.vouched.items() if k in trusted), default=-1)


def check_heads(run_id: str, hashes: Sequence[str], heads: Iterable[SignedHead], first: int = 0) -> HeadCheck:
    """Check ``heads`` against a stream whose event hashes from version ``first`` on are
    ``hashes`` (a head before ``first`` has only its signature checked)."""
    problems: list[tuple[int, str]] = []
    vouched: dict[str, int] = {}
    end = first + len(hashes)
    for h in heads:
        if not h.valid():
            problems.append((h.version, f"the signed head at version {h.version} does not verify under its "
                                        f"key {key_id(h.public_key)}: the signature or what it signs was altered"))
        elif h.version >= end:
            ends = f"ends at version {end - 1}" if end else "holds no events"
            problems.append((end, f"the stream {ends}, but version {h.version} was signed (key "
                                  f"{key_id(h.public_key)}): events were removed"))
        elif h.version < first:
            continue
        elif hashes[h.version - first] != h.hash:
            problems.append((h.version, f"version {h.version} differs from its signed head (key "
                                        f"{key_id(h.public_key)}): the history before it was rewritten"))
        else:
            vouched[h.public_key] = max(vouched.get(h.public_key, -1), h.version)
    return HeadCheck(run_id, end, sorted(problems), vouched)


def trust_problems(check: HeadCheck, trusted: set[str]) -> list[tuple[int, str]]:
    """With ``--trust``: a stream must be vouched for to its last event by a trusted key."""
    if check.problems or not check.events:
        return []
    through = check.trusted_through(trusted)
    if through == check.events - 1:
        return []
    if through < 0:
        signers = ", ".join(key_id(k) for k in sorted(check.vouched)) or "no key"
        return [(0, f"no trusted key vouches for it (signed by {signers})")]
    return [(through + 1, f"versions {through + 1}-{check.events - 1} are not vouched for by a trusted key "
                          "(appended after its last signed head, or the run was still going when bundled)")]
