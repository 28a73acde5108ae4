"""Keep secrets out of everything we write: events, blobs, logs, error texts.

Two rules, applied together:

- a dict entry whose key is named like a credential (``api_key``, ``apiKey``,
  ``FIREWORKS_API_KEY``, ``access_token``, ``secret``, ``password`` ...) has its
  value replaced by ``"***"``;
- the value of ``FIREWORKS_API_KEY`` (and of any other environment variable named
  like a key, token, password or secret) is replaced wherever it appears inside a
  string or bytes.

Paths are never secrets: ``PWD`` is the working directory, not a password, and a
credential-named variable whose value is a path (``GOOGLE_APPLICATION_CREDENTIALS``)
names where a secret lives, not the secret. Masking them would rewrite the user's
own file names in the record (a state dir recorded as ``***/svc``).

The environment is read on every call, so a key set after import is still caught.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["MASK", "is_secret_key", "redact", "redact_text", "redact_bytes", "secret_values",
           "may_need_redaction", "count_masked", "guard_output", "redact_source", "redact_argv"]

MASK = "***"

# Words that make a name a credential on their own, wherever they appear last.
# ("pwd" is not one: it is the shell's working directory far more often than a password.)
_SECRET_LAST_WORDS = frozenset({"secret", "secrets", "password", "passwd", "passphrase",
                                "apikey", "credential", "credentials", "authorization"})
# "token" and "key" alone are ordinary words in this domain (sampled tokens, dict
# keys, max_tokens), so they count only after one of these qualifiers.
_TOKEN_QUALIFIERS = frozenset({"access", "refresh", "auth", "bearer", "api", "session", "id",
                               "secret", "private", "client", "github", "hf", "oauth", "security"})
_KEY_QUALIFIERS = frozenset({"api", "secret", "private", "access", "signing", "encryption", "auth",
                             "client", "master"})
_MIN_SECRET_LEN = 6  # shorter env values would mask ordinary text
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
# lower-case fragments of every name is_secret_key accepts, and of "Bearer <token>"
_CREDENTIAL_WORDS = re.compile("key|token|secret|passw|passphrase|credential|authoriz|bearer")


@functools.lru_cache(maxsize=4096)
def is_secret_key(name: str) -> bool:
    """True for names like api_key, apiKey, FIREWORKS_API_KEY, access_token, secret."""
    words = [w.lower() for w in _WORD_SPLIT.split(name) if w]
    if not words:
        return False
    last, before = words[-1], set(words[:-1])
    if last in _SECRET_LAST_WORDS:
        return True
    if last == "token":
        return bool(before & _TOKEN_QUALIFIERS)
    if last == "key":
        return bool(before & _KEY_QUALIFIERS)
    return False


def _secret_env_names() -> list[str]:
    """Names of credential-like env vars, scanned on every call (a few microseconds with
    is_secret_key cached): a cache keyed on the number of variables missed a variable
    replaced by another."""
    return [k for k in os.environ if is_secret_key(k)]


def secret_values() -> list[str]:
    """The current values of FIREWORKS_API_KEY and other credential-named env vars."""
    found = set()
    for name in _secret_env_names():
        value = os.environ.get(name, "")
        if len(value) >= _MIN_SECRET_LEN and not _is_path(value):
            found.add(value)
    key = os.environ.get("FIREWORKS_API_KEY", "")
    if key:
        found.add(key)  # always, whatever its length
    # longest first, so a secret containing another is masked whole
    return sorted(found, key=len, reverse=True)


@functools.lru_cache(maxsize=256)
def _is_path(value: str) -> bool:
    """A value that names a file or folder (absolute, home-relative, or existing)."""
    if value.startswith(("/", "~", "./", "../")) or (len(value) > 2 and value[1:3] in (":\\", ":/")):
        return True
    try:
        return os.path.exists(value)
    except (OSError, ValueError):
        return False


def count_masked(obj: object, secrets: list[str] | None = None) -> int:
    """How many strings (and secret-named entries) ``redact`` would change in ``obj``.

    Redaction also applies to training and eval data (a key pasted into a prompt);
    the run records this count so a rerun from the stored, masked data can say its
    data differ from what the original run saw.
    """
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, str):
        return int(redact_text(obj, secrets) != obj)
    if isinstance(obj, dict):
        return sum(1 if isinstance(k, str) and is_secret_key(k) and _has_value(v) else count_masked(v, secrets)
                   for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(count_masked(v, secrets) for v in obj)
    return 0


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with every secret value (and any ``Bearer <token>``) masked."""
    for s in secret_values() if secrets is None else secrets:
        if s in text:
            text = text.replace(s, MASK)
    if "earer" in text:  # cheap pre-check before the regex
        text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
    return text


def redact_bytes(data: bytes) -> bytes:
    """``data`` with every secret value masked (as UTF-8 bytes)."""
    for s in secret_values():
        raw = s.encode()
        if raw in data:
            data = data.replace(raw, MASK.encode())
    return data


def redact(obj: object, secrets: list[str] | None = None) -> Any:
    """A copy of a JSON-like value with secret-named entries and secret values masked (Any:
    the value's own shape, a masked entry a string, a tuple a list).

    ``secrets`` (from ``secret_values()``) saves re-reading the environment per call.
    """
    return _redact(obj, secret_values() if secrets is None else secrets)


def may_need_redaction(json_text: str, secrets: list[str]) -> bool:
    """False only when ``json_text`` (a JSON encoding) surely holds nothing to redact.

    A cheap check on the encoded text lets the common payload (step metrics) skip
    the tree walk: no credential-like word, no secret value, no bearer token.
    """
    if _CREDENTIAL_WORDS.search(json_text.lower()):
        return True
    return any(_json_escaped(s) in json_text for s in secrets)


@functools.lru_cache(maxsize=64)
def _json_escaped(secret: str) -> str:
    # a string's JSON encoding escapes char by char, so a secret inside any string
    # shows up as its own escaped form inside the text
    return json.dumps(secret, ensure_ascii=False)[1:-1]


def _redact(obj: object, secrets: list[str]) -> Any:
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    if isinstance(obj, dict):
        return {k: (MASK if isinstance(k, str) and is_secret_key(k) and _has_value(v)
                    else _redact(v, secrets))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_redact(v, secrets) for v in obj]
    return obj


def _has_value(value: object) -> bool:
    """A secret-named field that is null or empty holds nothing to hide; keep it readable."""
    return value is not None and value != ""


def guard_output() -> None:
    """What this process prints of an error passes through ``redact_text``: an unhandled
    exception's traceback (the main thread's and any other's) and every log message. A value
    used where a secret was expected, or a secret pasted into a spec field, would otherwise
    reach the terminal in an exception's message. Idempotent; the command line calls it first."""
    import logging
    import sys
    import threading
    import traceback

    def excepthook(exc_type: type[BaseException], exc: BaseException | None, tb: TracebackType | None) -> None:
        sys.stderr.write(redact_text("".join(traceback.format_exception(exc_type, exc, tb))))
        sys.stderr.flush()

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not SystemExit:
            sys.stderr.write(f"Exception in thread {getattr(args.thread, 'name', '?')}:\n")
            excepthook(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    factory = logging.getLogRecordFactory()
    if getattr(factory, "redacting", False):
        return

    def redacting(*args: object, **kwargs: object) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed log call: leave it for logging to report
            return record
        masked = redact_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        return record

    redacting.redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting)
# ``name = "value"`` / ``name: "value"`` / ``--name value`` in source text or a command line
_ASSIGNED = re.compile(r"""(?P<name>[A-Za-z_][A-Za-z0-9_-]*)(?P<sep>["']?\s*[:=]\s*|\s+)"""
                       r"""(?:(?P<q>["'])(?P<quoted>[^"'\n]{6,})(?P=q)|(?P<bare>[A-Za-z0-9_+/=~-]{6,})(?=[\s,;)}\]]|$))""")


def redact_source(text: str) -> str:
    """``text`` (source code, a diff, a command line) with the value assigned to every
    credential-named variable, key or option masked: ``api_key="fw_..."``, ``API_KEY: ...``,
    ``--api-key fw_...``. Secrets that are environment values are masked by redact_text."""
    if not _CREDENTIAL_WORDS.search(text.lower()):
        return text

    def mask(m: re.Match[str]) -> str:
        if not is_secret_key(m.group("name")):
            return m.group(0)
        quote = m.group("q") or ""
        return f"{m.group('name')}{m.group('sep')}{quote}{MASK}{quote}"

    return _ASSIGNED.sub(mask, text)


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with secrets masked: env values, ``--api-key=VALUE``, and the word
    after a credential-named option (``--api-key VALUE``)."""
    out = []
    for i, arg in enumerate(argv):
        option = argv[i - 1] if i else ""
        if option.startswith("-") and "=" not in option and is_secret_key(option.lstrip("-")):
            out.append(MASK)
        else:
            out.append(redact_source(redact_text(arg)))
    return out
