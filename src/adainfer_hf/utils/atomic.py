"""Atomic writes: every file adainfer_hf writes (artifact files, feature tables, results) goes through here.

A file is written to a temporary name in its own directory and renamed onto its final name with `os.replace`
only once it is complete, so a reader sees the old file or the new one, never half of one. The temporary file
lives beside the target, never in a parent or system temporary directory: a rename within one directory cannot
cross a file system (no `EXDEV` when the target directory is a mount point) and needs no write access elsewhere
(a read-only parent is fine).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["abandoned_temporaries", "atomic_directory", "atomic_file"]

_TEMP_MARK = ".tmp-"


def _temporary_name(path: Path) -> Path:
    # Hidden, recognisable (`abandoned_temporaries`) and unique per writer.
    return path.with_name(f".{path.name}{_TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator:
    """Opens a temporary file beside `path` and renames it onto `path` only when the block completes.

    The file is flushed and `fsync`ed before the rename; on any exception (`KeyboardInterrupt` included) the
    temporary file is removed and `path` is left as it was. The file gets the permissions a plain `open` would
    give it (`0o666` less the umask), not the private `0o600` of `tempfile.mkstemp`.

    Args:
        path (`str` or `os.PathLike`): the file to write; its directory must exist.
        mode (`str`, *optional*, defaults to `"wb"`): a write mode of `open` (`"wb"`, `"w"`).
        open_kwargs: passed to `open` (`encoding`, `newline`, ...).

    Example:

    ```python
    >>> with atomic_file("results.json", "w", encoding="utf-8") as f:
    ...     f.write(text)
    ```
    """
    if not mode.startswith("w"):
        raise ValueError(f"atomic_file writes a new file; mode must start with 'w', got {mode!r}.")
    path = Path(path)
    while True:
        tmp = _temporary_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:  # a name another writer just took: draw again
            continue
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `path`; when the block completes it replaces `path`.

    For directories filled by other code (a converted checkpoint): an existing `path` is removed first, so the
    caller must hold whatever lock keeps other writers away. On any exception the temporary directory is removed.

    Args:
        path (`str` or `os.PathLike`): the directory to create or replace; its parent must exist.
    """
    path = Path(path)
    tmp = _temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def abandoned_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files or directories that writers of `path` left behind when they were killed.

    Only safe to remove while no other process may be writing `path` (e.g. under a lock).
    """
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}{_TEMP_MARK}*"))
