"""Append-only results store: one JSON line per evaluation, with full provenance.

Lines are appended under a file lock in one ``write`` of a complete line, so concurrent writers never
interleave, and a reader skips nothing but a line cut short by a crash.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import subprocess
from pathlib import Path

import torch
from filelock import FileLock

from . import __version__
from .errors import UserError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def append_record(path: Path, record: dict) -> None:
    """Append one record as one line; the schema version is stamped on it."""
    line = json.dumps({"schema_version": SCHEMA_VERSION, **record}, sort_keys=True, default=str) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"), open(path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise UserError(f"cannot write results to {path}: {exc.strerror or exc}") from exc


def read_records(path: Path) -> list[dict]:
    """Every complete record, oldest first."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d is not a complete record; skipped", path, number)
    return records


def environment(device: torch.device) -> dict:
    """Where and with what a number was measured."""
    return {
        "device": _device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "package_version": __version__,
        "git_sha": _git_sha(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
