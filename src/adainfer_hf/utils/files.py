"""File helpers shared by the default model's conversion and the benchmarks' real-model conversions: an advisory
lock, a streamed sha256, and whether a converted Hugging Face directory is complete."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

__all__ = ["file_lock", "is_converted_dir", "sha256_file"]

_BLOCK = 1 << 20


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path`, held for the block. The lock file itself is left in place: deleting
    it would let a third process lock a fresh inode while a second still waits on the old one. Off POSIX there is
    no lock (the callers' atomic renames alone keep their targets consistent)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def is_converted_dir(path: Path, source_file: str) -> bool:
    """Whether `path` holds a finished conversion: a config, the weights (one file or a sharded index) and the
    `source_file` marker the conversion writes last."""
    path = Path(path)
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return has_weights and (path / "config.json").is_file() and (path / source_file).is_file()
