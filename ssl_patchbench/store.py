"""Memory-mapped feature stores keyed by a content hash: resumable, lock-protected, complete only when sealed.

One folder per key: ``features.npy`` (``np.lib.format.open_memmap``, so it carries dtype and shape),
``labels.npy``, ``chunks.log`` (one line per finished chunk of rows, appended and fsynced after the
rows are flushed) and ``meta.json``, the manifest, written last by atomic rename with the sha256 of
both arrays. A store without a valid manifest is never read; a tampered or truncated one is unsealed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from .errors import UserError
from .files import atomic_path, file_sha256, write_json_atomic

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1  # bump when anything that changes stored numbers changes
_MANIFEST = "meta.json"


def store_key(material: dict) -> str:
    """A short hash of everything that changes the numbers (canonical JSON)."""
    blob = json.dumps({**material, "protocol_version": PROTOCOL_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _reserve_disk(path: Path) -> None:
    """Allocate the whole file now: a full disk fails here with ENOSPC, not later as a memory-map fault."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


@dataclass(frozen=True)
class StoredFeatures:
    features: np.ndarray
    labels: np.ndarray
    meta: dict


class FeatureStore:
    """The folder of one key under ``root``."""

    def __init__(self, root: Path, key: str) -> None:
        self.key = key
        self.path = Path(root) / key

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's file lock; a second run on the same key waits here, then finds it complete."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.path) + ".lock")
        except OSError as exc:
            raise UserError(f"cannot write the cache folder {self.path.parent}: {exc.strerror}") from exc
        with lock:
            yield

    def is_complete(self, *, verify: bool = True) -> bool:
        """True when sealed and intact; a store whose files no longer match its manifest is unsealed."""
        manifest = self.path / _MANIFEST
        if not manifest.exists():
            return False
        try:
            meta = json.loads(manifest.read_text())
            ok = not verify or all(
                file_sha256(self.path / name) == meta["sha256"][name] for name in ("features.npy", "labels.npy")
            )
        except (OSError, ValueError, KeyError):
            ok = False
        if not ok:
            log.warning("feature store %s does not match its manifest; it will be rebuilt", self.path)
            manifest.unlink(missing_ok=True)
        return ok

    def load(self) -> StoredFeatures:
        """The sealed features (memory-mapped) and labels."""
        if not self.is_complete(verify=False):
            raise UserError(f"feature store {self.path} is not complete; rerun the evaluation to finish it")
        meta = json.loads((self.path / _MANIFEST).read_text())
        features = np.load(self.path / "features.npy", mmap_mode="r")
        labels = np.load(self.path / "labels.npy")
        return StoredFeatures(features=features, labels=labels, meta=meta)

    def writer(self, *, labels: np.ndarray, dim: int, dtype: str, chunk_rows: int, meta: dict) -> StoreWriter:
        """Open for writing (call under :meth:`lock`); resumes the finished chunks of an earlier run."""
        return StoreWriter(self.path, labels=labels, dim=dim, dtype=dtype, chunk_rows=chunk_rows, meta=meta)


class StoreWriter:
    """Rows are written chunk by chunk; a chunk counts once its rows are flushed and logged."""

    def __init__(self, path: Path, *, labels: np.ndarray, dim: int, dtype: str, chunk_rows: int, meta: dict) -> None:
        self.path = path
        self.rows = len(labels)
        self.chunk_rows = chunk_rows
        self.meta = meta
        layout = {"rows": self.rows, "dim": dim, "dtype": dtype, "chunk_rows": chunk_rows}
        try:
            self._open(layout, labels)
        except OSError as exc:
            raise UserError(f"cannot write feature store {path}: {exc.strerror or exc}") from exc

    def _open(self, layout: dict, labels: np.ndarray) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        layout_file = self.path / "layout.json"
        same = layout_file.exists() and json.loads(layout_file.read_text()) == layout
        features_file = self.path / "features.npy"
        if same and features_file.exists():
            self.features = np.lib.format.open_memmap(features_file, mode="r+")
        else:
            for stale in self.path.iterdir():
                stale.unlink() if stale.is_file() else shutil.rmtree(stale)
            shape = (layout["rows"], layout["dim"])
            self.features = np.lib.format.open_memmap(features_file, mode="w+", dtype=layout["dtype"], shape=shape)
            _reserve_disk(features_file)
            write_json_atomic(layout_file, layout)
        with atomic_path(self.path / "labels.npy") as tmp:
            np.save(tmp, np.asarray(labels, dtype=np.int64))

    @property
    def num_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.rows)

    def done_chunks(self) -> set[int]:
        log_file = self.path / "chunks.log"
        if not log_file.exists():
            return set()
        lines = log_file.read_text().split("\n")[:-1]  # an unterminated last line was cut by a crash
        return {int(line) for line in lines if line.isdigit()}

    def pending_chunks(self) -> list[int]:
        done = self.done_chunks()
        return [c for c in range(self.num_chunks) if c not in done]

    def write_chunk(self, chunk: int, rows: np.ndarray) -> None:
        """Store a whole chunk's rows, flush them, then log the chunk as done."""
        start, end = self.chunk_range(chunk)
        if rows.shape != (end - start, self.features.shape[1]):
            raise ValueError(f"chunk {chunk} expects {(end - start, self.features.shape[1])}, got {rows.shape}")
        try:
            self.features[start:end] = rows
            self.features.flush()
            with open(self.path / "chunks.log", "a") as f:
                f.write(f"{chunk}\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise UserError(f"cannot write feature store {self.path}: {exc.strerror or exc}") from exc

    def seal(self, extra: dict | None = None) -> None:
        """Write the manifest last (``extra``: e.g. extraction timings): from here on the store is complete."""
        if self.pending_chunks():
            raise RuntimeError(f"cannot seal {self.path}: chunks {self.pending_chunks()[:5]} are missing")
        self.features.flush()
        hashes = {name: file_sha256(self.path / name) for name in ("features.npy", "labels.npy")}
        shape = list(self.features.shape)
        manifest = {
            **self.meta,
            **(extra or {}),
            "complete": True,
            "shape": shape,
            "dtype": str(self.features.dtype),
            "sha256": hashes,
        }
        write_json_atomic(self.path / _MANIFEST, manifest)
