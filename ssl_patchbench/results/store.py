"""Append-only results store: one JSON line per evaluation, with full provenance.

Lines are appended whole under a file lock (raw ``O_APPEND`` writes, then fsync), so concurrent writers never
interleave, a line cut short by a crash is closed before the next one, and a reader skips nothing but it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from filelock import FileLock

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.core.files import ensure_dir, write_error
from ssl_patchbench.results.schema import record_problem

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def append_record(path: Path, record: dict) -> None:
    """Append one record as one line; the schema version is stamped on it."""
    line = json.dumps({"schema_version": SCHEMA_VERSION, **record}, sort_keys=True, default=str) + "\n"
    try:
        ensure_dir(path.parent)
        with FileLock(str(path) + ".lock"):
            _append_line(path, line.encode())
    except OSError as exc:
        raise write_error(path, exc) from exc


def _append_line(path: Path, data: bytes) -> None:
    """Write ``data`` at the end of ``path`` with raw O_APPEND writes, then fsync (call under the lock).

    A line cut short by a crash (or a full disk) is closed with a newline first, so it costs only itself:
    the new record never lands on the end of the broken one.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size and _last_byte(path) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def read_records(path: Path) -> list[dict]:
    """Every valid record, oldest first. A line that is not a JSON object (cut by a crash) or whose fields do not
    have the schema's types (``results.schema``) is skipped with a warning naming the file and line."""
    try:
        if not path.is_file():
            return []
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read results file {path}: {exc.strerror or exc}") from exc
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            record = None
        problem = record_problem(record) if isinstance(record, dict) else "not a complete record"
        if problem is None:
            records.append(record)
        elif line.strip():
            log.warning("%s:%d skipped: %s", path, number, problem)
    return records
