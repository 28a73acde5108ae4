"""Which code produced a run: recorded in its RunStarted as ``code``.

One function, :func:`code_identity`, serves every kind of run, so runs of every kind
compare alike (``diff``) and show alike (``audit``, MLflow):

- the runner passes its own source folders (the project's tree when it runs from a
  checkout, the installed package otherwise);
- ``track()`` and ``firetitan-track record -- COMMAND`` call :func:`program_identity`,
  which finds the program from its entry script (``__main__``) and adds the entry
  script's digest and the command line.

What is recorded (every path relative to the repository root, or to the code folder
outside git; a field that is not known is absent, never made up):

- ``git``: ``commit`` (null before the first commit), ``dirty``, ``changed`` (each path
  that differs from the commit, tracked or untracked: the sha256 of its content now, null
  when deleted), ``diff_digest`` (the uncommitted diff, ``git diff HEAD`` plus new text
  files, redacted, cut at :data:`MAX_DIFF_BYTES`, stored as a blob), ``diff_bytes``,
  ``diff_truncated``; ``root`` says where it was (a machine's own path, never compared);
- outside git, ``git`` is null, ``no_git`` says why, and ``files`` holds the sha256 of
  every source file of the code folders that the process had loaded;
- ``entry`` (``{path, digest}``) and ``argv`` for a program;
- ``packages``: the installed versions of the packages that decide results
  (:data:`RESULT_PACKAGES`), ``python``, and ``device`` when the caller knows it.

Cheap by design (a run start must not wait on it): three ``git`` processes started
together (``status`` once for the commit, the dirty flag and the changed paths, beside
``rev-parse`` and ``check-ignore``), ``diff`` of the changed paths only when tracked files
changed, no torch import, files hashed only when they changed (or, outside git, when
they ran). ``benchmarks/code_identity.py`` measures it on a
large repository. The optional locks git takes to refresh its index are turned off,
so recording never contends with the user's own git commands.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Generic, Iterable, NotRequired, Sequence, TypedDict, TypeVar

from firetitan_track.redact import redact_argv, redact_source

if TYPE_CHECKING:
    from firetitan_track.events import CodeIdentity

__all__ = ["code_identity", "program_identity", "installed_versions", "code_differences", "RESULT_PACKAGES",
           "MAX_DIFF_BYTES", "DIFF_MEDIA_TYPE", "GitIdentity", "Change", "CodeDifferences"]

# The packages whose versions decide a run's results (the SDK, its types, the model stack).
RESULT_PACKAGES = ("fireworks-ai", "tinker", "torch", "transformers", "peft")
MAX_DIFF_BYTES = 1 << 20  # the stored diff stops here (diff_truncated says so)
MAX_NEW_FILE_BYTES = 64 << 10  # an untracked file larger than this is in the diff by digest only
MAX_HASH_BYTES = 64 << 20  # a changed file larger than this is listed with a null digest
MAX_CHANGED = 2000  # changed paths recorded; more are counted (changed_more)
GIT_TIMEOUT_S = 20.0
DIFF_MEDIA_TYPE = "text/x-diff"
_EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"  # git's id of the empty tree
_MAX_PATHSPECS = 500  # more changed paths than this: diff the whole tree (one long command line is worse)
_SOURCE_SUFFIXES = (".py", ".pyx", ".toml", ".json", ".yaml", ".yml", ".jinja", ".sh")

PutBlob = Callable[[bytes, str], str]
T = TypeVar("T")


class GitIdentity(TypedDict):
    """A code identity's ``git`` (see above): the rest only when the tree is dirty."""

    commit: str | None
    dirty: bool
    root: str
    changed: NotRequired[dict[str, str | None]]
    changed_more: NotRequired[int]
    diff_digest: NotRequired[str]
    diff_bytes: NotRequired[int]
    diff_truncated: NotRequired[bool]


class Change(TypedDict, Generic[T]):
    """One way two code identities differ: its value in ``a``, and in ``b``."""

    a: T
    b: T


class CodeDifferences(TypedDict, total=False):
    """What ``code_differences`` finds, an entry per differing aspect (none: the same code)."""

    commit: Change[str | None]
    dirty: Change[bool]
    files: list[str]
    diff: Change[str | None]
    entry: Change[dict[str, str] | None]  # {path, digest}
    packages: dict[str, Change[str | None]]
    python: Change[str | None]
    device: Change[str | None]
    argv: Change[list[str] | None]
    # the diff view's own: whether each run recorded its code at all, and firetitan-track's version
    recorded: Change[bool]
    code_version: Change[str]


def code_identity(put_blob: PutBlob, code_dirs: Sequence[str | os.PathLike[str]], *,
                  entry: str | os.PathLike[str] | None = None, argv: Sequence[str] | None = None,
                  device: str | None = None) -> CodeIdentity:
    """The code identity of a run whose code lives in ``code_dirs`` (the first decides the
    repository). ``put_blob(data, media_type) -> digest`` stores the diff (a ledger's
    ``put_blob``)."""
    dirs = [Path(d).resolve() for d in code_dirs]
    entry_path = Path(entry).resolve() if entry is not None else None
    status = _GitStatus.start(entry_path or dirs[0])
    out: CodeIdentity = {}
    packages = installed_versions(RESULT_PACKAGES)  # while git works
    git, why = status.finish(put_blob) if status is not None else (None, "git is not installed")
    root = Path(git["root"]) if git else dirs[0]
    if git is not None:
        out["git"] = git
    else:
        out["git"] = None
        out["no_git"] = why
        out["files"] = _loaded_files(dirs, root)
    if entry_path is not None:
        out["entry"] = {"path": _relative(entry_path, root), "digest": _file_digest(entry_path)}
    if argv is not None:
        out["argv"] = redact_argv([str(a) for a in argv])
    out["packages"] = packages
    out["python"] = platform.python_version()
    if device:
        out["device"] = device
    return out


def program_identity(put_blob: PutBlob, *, device: str | None = None) -> CodeIdentity:
    """The code identity of the program this process runs (``track()`` and ``record``): its
    entry script (``__main__``), that script's repository, and its command line."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    entry = Path(main_file).resolve() if main_file and Path(main_file).is_file() else None
    code_dir = entry.parent if entry is not None else Path.cwd()  # a notebook or `python -c`: where it runs
    return code_identity(put_blob, [code_dir], entry=entry, argv=list(sys.argv), device=device or _torch_device())


def installed_versions(names: Iterable[str]) -> dict[str, str]:
    """name -> installed version, for those installed (a missing package is absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _torch_device() -> str | None:
    """The program's accelerator, when it already imported torch (never imported here). The
    GPU's name only once the program itself initialised CUDA: asking for it would initialise
    CUDA here, which a program that forks workers later must not have done."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if torch.cuda.is_initialized():
            return f"cuda:{torch.cuda.get_device_name(torch.cuda.current_device())}"
        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # a broken CUDA setup says nothing about the code
        return None


# -- git --------------------------------------------------------------------------------------


def _git_env() -> dict[str, str]:
    # no index refresh written behind the user's back, no pager, no prompts, plain bytes
    return {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}


class _GitStatus:
    """The git processes a code identity needs, started together and read when the rest is
    done: ``status`` (it walks the tree: the commit, the changed paths), ``rev-parse`` (the
    root) and ``check-ignore`` (whether the code is the repository's at all)."""

    def __init__(self, where: Path, procs: dict[str, subprocess.Popen[bytes]]) -> None:
        self.where, self.procs = where, procs

    @classmethod
    def start(cls, where: Path) -> _GitStatus | None:
        folder = str(where if where.is_dir() else where.parent)
        commands = {
            "status": ["status", "--porcelain=v2", "-z", "--branch", "--no-renames", "--untracked-files=all",
                       "--ignore-submodules=dirty"],
            "root": ["rev-parse", "--show-toplevel"],
            "ignored": ["check-ignore", "-q", "--", str(where)],
        }
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for name, args in commands.items():
                procs[name] = subprocess.Popen(["git", "-C", folder, *args], stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, env=_git_env())
        except OSError:
            for proc in procs.values():
                proc.kill()
                proc.wait()
            return None
        return cls(where, procs)

    def finish(self, put_blob: PutBlob) -> tuple[GitIdentity | None, str]:
        results: dict[str, tuple[int, bytes, bytes]] = {}
        for name, proc in self.procs.items():
            try:
                out, err = proc.communicate(timeout=GIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                for other in self.procs.values():
                    other.kill()
                    other.communicate()
                return None, f"git {name} took longer than {GIT_TIMEOUT_S:.0f}s"
            results[name] = (proc.returncode, out, err)
        code, porcelain, err = results["status"]
        if code != 0 or results["root"][0] != 0:
            text = err.decode(errors="replace")
            return None, ("not in a git repository" if code == 0 or "not a git repository" in text
                          else f"git status failed: {text.strip()[:200]}")
        root = Path(os.fsdecode(results["root"][1].strip()))
        if results["ignored"][0] == 0:
            # code installed inside a checkout's ignored folder (a .venv) is not that checkout's code
            return None, f"{_relative(self.where, root)} is ignored by the git repository at {root}"
        return _describe(root, porcelain, put_blob), ""


def _describe(root: Path, porcelain: bytes, put_blob: PutBlob) -> GitIdentity:
    commit: str | None = None
    tracked: list[str] = []
    untracked: list[str] = []
    for record in porcelain.split(b"\0"):
        if record.startswith(b"# branch.oid "):
            oid = record.split()[-1].decode()
            commit = None if oid == "(initial)" else oid
        elif record[:2] in (b"1 ", b"u "):
            fields = 8 if record[:1] == b"1" else 10
            tracked.append(os.fsdecode(record.split(b" ", fields)[fields]))
        elif record.startswith(b"? "):
            untracked.append(os.fsdecode(record[2:]))
    git: GitIdentity = {"commit": commit, "dirty": bool(tracked or untracked), "root": str(root)}
    if not git["dirty"]:
        return git
    paths = sorted(tracked + untracked)
    git["changed"] = {p: _file_digest(root / p) for p in paths[:MAX_CHANGED]}
    if len(paths) > MAX_CHANGED:
        git["changed_more"] = len(paths) - MAX_CHANGED
    diff, truncated = _diff_text(root, commit, tracked, sorted(untracked))
    stored = redact_source(diff.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")
    git["diff_digest"] = put_blob(stored, DIFF_MEDIA_TYPE)
    git["diff_bytes"] = len(stored)
    git["diff_truncated"] = truncated
    return git


def _diff_text(root: Path, commit: str | None, tracked: list[str], untracked: list[str]) -> tuple[bytes, bool]:
    """``git diff HEAD`` (bounded) and each small new text file as a new-file patch."""
    chunks: list[bytes] = []
    size = 0
    if tracked:
        # only the changed paths: on a large tree a diff of everything would stat every file again
        paths = tracked if len(tracked) <= _MAX_PATHSPECS else []
        proc = subprocess.Popen(["git", "-C", str(root), "--literal-pathspecs", "diff", commit or _EMPTY_TREE,
                                 "--no-color", "--no-ext-diff", "--no-textconv", "--", *paths],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_git_env())
        assert proc.stdout is not None
        body = proc.stdout.read(MAX_DIFF_BYTES + 1)
        proc.kill()  # a diff past the bound is not read to its end
        proc.wait()
        chunks.append(body)
        size = len(body)
    for path in untracked:
        if size > MAX_DIFF_BYTES:
            break
        patch = _new_file_patch(root, path)
        if patch:
            chunks.append(patch)
            size += len(patch)
    text = b"".join(chunks)
    return text[:MAX_DIFF_BYTES], len(text) > MAX_DIFF_BYTES


def _new_file_patch(root: Path, path: str) -> bytes:
    try:
        file = root / path
        if not file.is_file() or file.stat().st_size > MAX_NEW_FILE_BYTES:
            return b""
        data = file.read_bytes()
    except OSError:
        return b""
    if b"\0" in data:
        return b""  # binary: its digest is in ``changed``
    lines = data.splitlines(keepends=True)
    name = path.encode("utf-8", "surrogateescape")
    head = (b"diff --git a/" + name + b" b/" + name + b"\nnew file mode 100644\n--- /dev/null\n+++ b/" + name
            + b"\n@@ -0,0 +1," + str(len(lines)).encode() + b" @@\n")
    body = b"".join(b"+" + line for line in lines)
    if lines and not lines[-1].endswith(b"\n"):
        body += b"\n\\ No newline at end of file\n"
    return head + body


# -- files ------------------------------------------------------------------------------------


def _file_digest(path: Path) -> str | None:
    """The sha256 of a file's bytes; None when it is gone (deleted), not a file, or too large to read now."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_HASH_BYTES:
            return None
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except OSError:
        return None


def _loaded_files(dirs: Sequence[Path], root: Path) -> dict[str, str]:
    """Outside git: the digest of every source file under ``dirs`` that this process loaded
    (the files that ran), keyed by its path under ``root``. Installed packages inside a code
    folder (a virtualenv or user site under the program's folder, Python itself) are not the
    program's code."""
    prefixes = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    files: dict[str, str] = {}
    for module in list(sys.modules.values()):
        name = getattr(module, "__file__", None)
        if not name or not name.endswith(_SOURCE_SUFFIXES):
            continue
        path = Path(name).resolve()
        home = next((d for d in dirs if d in path.parents), None)
        if home is None:
            continue
        inner = path.relative_to(home).parts
        if "site-packages" in inner or "dist-packages" in inner or any(
                home in p.parents and p in path.parents for p in prefixes):
            continue
        digest = _file_digest(path)
        if digest is not None:
            files[_relative(path, root)] = digest
    return dict(sorted(files.items()))


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# -- comparing two identities (diff) -----------------------------------------------------------

def code_differences(a: CodeIdentity | None, b: CodeIdentity | None) -> CodeDifferences:
    """How code identity ``b`` differs from ``a``: one entry per differing aspect, each
    ``{"a": ..., "b": ...}`` (``files``: the paths whose content differs, when it can be
    told from the record). Empty when the code is the same. ``argv`` (how the program was
    invoked) is reported too; it is not code, and the caller decides what it counts for."""
    a, b = a or {}, b or {}
    out: CodeDifferences = {}
    ga, gb = a.get("git"), b.get("git")
    commit_a = ga.get("commit") if ga else None
    commit_b = gb.get("commit") if gb else None
    if (ga is None) != (gb is None) or commit_a != commit_b:
        out["commit"] = {"a": commit_a if ga else None, "b": commit_b if gb else None}
    if bool(ga and ga.get("dirty")) != bool(gb and gb.get("dirty")):
        out["dirty"] = {"a": bool(ga and ga.get("dirty")), "b": bool(gb and gb.get("dirty"))}
    files = _differing_files(a, b, same_commit="commit" not in out)
    if files:
        out["files"] = files
    elif (ga and gb and "commit" not in out and (ga.get("changed_more") or gb.get("changed_more"))
          and ga.get("diff_digest") != gb.get("diff_digest")):
        # more changed files than were listed: the diffs are all there is to compare
        out["diff"] = {"a": ga.get("diff_digest"), "b": gb.get("diff_digest")}
    ea, eb = a.get("entry"), b.get("entry")
    if (ea or {}).get("digest") != (eb or {}).get("digest"):
        out["entry"] = {"a": ea, "b": eb}
    pa, pb = a.get("packages") or {}, b.get("packages") or {}
    packages: dict[str, Change[str | None]] = {k: {"a": pa.get(k), "b": pb.get(k)}
                                                for k in sorted(pa.keys() | pb.keys()) if pa.get(k) != pb.get(k)}
    if packages:
        out["packages"] = packages
    for key in ("python", "device"):
        if a.get(key) != b.get(key):
            out[key] = {"a": a.get(key), "b": b.get(key)}
    if a.get("argv") != b.get("argv"):
        out["argv"] = {"a": a.get("argv"), "b": b.get("argv")}
    return out


def _differing_files(a: CodeIdentity, b: CodeIdentity, *, same_commit: bool) -> list[str]:
    """Paths whose content differs, from the record alone: on one commit, the changed files'
    digests (a path one run did not change has the commit's content); outside git, the
    digests of the files that ran. Across commits the record cannot tell (the commits
    name the difference), so nothing is listed."""
    ga, gb = a.get("git"), b.get("git")
    if ga is not None and gb is not None:
        if not same_commit:
            return []
        ca, cb = ga.get("changed") or {}, gb.get("changed") or {}
        return sorted(p for p in ca.keys() | cb.keys() if ca.get(p, "HEAD") != cb.get(p, "HEAD"))
    if ga is None and gb is None:
        fa, fb = a.get("files") or {}, b.get("files") or {}
        return sorted(p for p in fa.keys() | fb.keys() if fa.get(p) != fb.get(p))
    return []
