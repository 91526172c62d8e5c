"""Small file primitives: streamed sha256, and writes that readers never see half-done.

A failed write (full disk, read-only or missing cache folder) becomes a :class:`UserError` that names the
path, so the CLI ends with one line instead of a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ssl_patchbench.core.errors import UserError

_BLOCK = 1 << 22


def canonical_digest(value: object) -> str:
    """A short hash (24 hex digits) of ``value`` as canonical JSON (sorted keys; other objects as ``str``): the
    name of a cache entry that everything in ``value`` determines."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, streamed so large files never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def write_error(path: Path, exc: OSError) -> UserError:
    """The user-facing error for a failed write: what, where, why, and the two usual fixes."""
    return UserError(
        f"cannot write {path}: {exc.strerror or exc}; free disk space or point --home "
        "($PATCHBENCH_HOME) at a writable folder"
    )


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents); a path below a regular file or a read-only mount is a UserError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise UserError(f"cannot write {path}: {blocker} is a file, not a folder") from exc
    except OSError as exc:
        raise write_error(path, exc) from exc
    return path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it only if the block finishes without error.

    The temporary name keeps ``path``'s suffix, since some writers (``np.save``) append one otherwise.
    An ``OSError`` while writing (e.g. ENOSPC) leaves ``path`` untouched and is raised as a UserError.
    """
    ensure_dir(path.parent)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON through a temporary file, fsync it, then rename it into place."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
