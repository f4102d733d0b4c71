"""Output files that survive a kill, a full disk and a planted symlink; JSON reads that fail in one line.

`write_atomic` writes a temp file in the destination's folder, fsyncs it and `os.replace`s it over the
destination: a reader (or the next run) sees the old file or the new one, never a half-written or empty
one, whatever happens mid-write (SIGKILL, ENOSPC). `os.replace` swaps the directory entry, so a symlink
planted at the destination is replaced by the file and its target is left untouched.

`read_json` turns a missing/empty/damaged file into a `UserError` naming the path and what to do (or
returns None when the caller would rather rebuild it). Pure Python, layer 1.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from typing import Any

from clrlab.errors import UserError


def write_atomic(path: str, data: str | bytes) -> None:
    """Replaces `path` by a file holding `data` (str is written as UTF-8), atomically.

    On any error the temp file is removed and `path` keeps its previous content; an OSError (disk full,
    read-only folder, `path` being a folder) becomes a one-line `UserError` naming the path and what to do.
    """
    try:
        replace_file(path, data)
    except OSError as e:
        raise UserError(f"cannot write {os.fspath(path)}: {e.strerror or e}; {os_error_advice(e)}, then rerun "
                        "(the previous file, if any, is unchanged).") from e


def replace_file(path: str, data: str | bytes) -> None:
    """`write_atomic` without the wording: an OSError propagates (after the temp file is removed and with
    `path` unchanged), for callers that word the failure themselves (a run's history.json)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    _replace_with(path, folder, data.encode("utf-8") if isinstance(data, str) else bytes(data))
    _fsync_folder(folder)


_ADVICE = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some space (disk quota exceeded)",
           errno.EACCES: "fix the folder's permissions", errno.EPERM: "fix the folder's permissions",
           errno.EROFS: "make it writable (the file system is read-only)",
           errno.EISDIR: "a folder stands where a file is written: remove or rename it",
           errno.ENOTDIR: "a file stands where a folder is needed: move it away",
           errno.EEXIST: "a file stands where a folder is needed: move it away",
           errno.ENOENT: "check that the folder exists (a dangling symlink?)"}


def os_error_advice(error: OSError, default: str = "remove what is in the way or fix the path") -> str:
    """What the user should do about a failed write, by errno ("free some disk space", ...)."""
    return _ADVICE.get(error.errno, default)


def _replace_with(path: str, folder: str, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; keep the permissions open() would give
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def make_unique_dir(base: str) -> str:
    """Creates a new folder `base`, or `base-2`, `base-3`, ... when taken, and returns its path.

    `os.mkdir` is exclusive, so concurrent callers (threads or processes) always get distinct folders.
    Missing parents are created.
    """
    parent = os.path.dirname(base)
    if parent:
        os.makedirs(parent, exist_ok=True)
    for n in range(1, 10_000):
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise UserError(f"cannot create a new folder {base}-N: 10000 names are taken; clean up {parent or '.'}.")


def write_json(path: str, value: Any, *, indent: int | None = 1) -> None:
    """`write_atomic` of `json.dumps(value, indent=indent)`."""
    write_atomic(path, json.dumps(value, indent=indent))


def read_json(path: str, what: str, *, fix: str | None = None, missing_ok: bool = True,
              rebuild: bool = False) -> Any:
    """The JSON value in `path`; `what` names the file for the user ("the run's settings").

    A missing file gives None when `missing_ok`, else a `UserError`. An empty, truncated or otherwise
    unreadable file gives None when `rebuild` (the caller rebuilds it), else a one-line `UserError` naming
    the path, the problem and `fix` (what to do; default: delete the file).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise UserError(f"{path} ({what}) does not exist.") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({what}): {e.strerror or e}.") from None
    try:
        if not raw.strip():
            raise ValueError("the file is empty")
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        if rebuild:
            return None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} ({what}) is damaged ({reason}); {fix or 'delete it and rerun'}.") from None


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask can only be read by setting it (not thread-safe)


def _fsync_folder(folder: str) -> None:
    """Makes the rename itself durable (best effort: some file systems refuse to fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
