"""Memory-mapped feature stores keyed by a content hash: resumable, lock-protected, complete only when sealed.

One folder per key: ``features.npy`` (``np.lib.format.open_memmap``, so it carries dtype and shape),
``labels.npy``, ``layout.json`` (shape, dtype, chunking and the labels' hash of the rows being written),
``chunks.log`` (one line ``<chunk> <sha256 of its rows>`` per finished chunk, appended and fsynced after
the rows are flushed) and ``meta.json``, the manifest, written last by atomic rename with the sha256 of
both arrays and their fingerprints (size, mtime, sampled blocks: what lets a rerun check a sealed store of
gigabytes in milliseconds). A store without a valid manifest is never read; a tampered or truncated one is
unsealed.
A resumed writer trusts nothing it cannot check: a ``features.npy`` of the wrong size, a ``layout.json``
that differs (other labels, shape or chunking) or is unreadable starts the store over, and a logged chunk
counts only while its rows still hash to the logged value.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.core.files import (
    atomic_path,
    canonical_digest,
    ensure_dir,
    file_sha256,
    write_error,
    write_json_atomic,
)

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2  # bump when anything that changes stored numbers changes (docs/protocol.md lists versions)
_MANIFEST = "meta.json"
_LAYOUT = "layout.json"
_LOG = "chunks.log"
_ARRAYS = ("features.npy", "labels.npy")
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16  # what a sealed store's cheap check reads of each array


def store_key(material: dict) -> str:
    """A short hash of everything that changes the numbers (canonical JSON)."""
    return canonical_digest({**material, "protocol_version": PROTOCOL_VERSION})


def _reserve_disk(path: Path) -> None:
    """Allocate the whole file now: a full disk fails here with ENOSPC, not later as a memory-map fault."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


def _rows_sha256(rows: np.ndarray) -> str:
    """Hash of a chunk's stored bytes, logged with it so that a resume can tell intact rows from damaged ones."""
    return hashlib.sha256(np.ascontiguousarray(rows).tobytes()).hexdigest()


def _labels_sha256(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()


def _npy_fits(path: Path, shape: tuple[int, int], dtype: str) -> bool:
    """True when ``path`` is an ``.npy`` file of exactly this shape and dtype, with all its bytes present.

    Checked before ``open_memmap(mode="r+")``, which would silently zero-extend a truncated file.
    """
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            reader = readers.get(np.lib.format.read_magic(f))
            if reader is None:
                return False
            header = reader(f)  # (shape, fortran_order, dtype)
            offset = f.tell()
        size = path.stat().st_size
    except (OSError, ValueError, EOFError):
        return False
    found_shape, fortran, found_dtype = header
    expected = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    return tuple(found_shape) == shape and not fortran and found_dtype == np.dtype(dtype) and size == expected


def check_storable(rows: np.ndarray, dtype: np.dtype, what: str) -> None:
    """Refuse rows that the store's ``dtype`` cannot hold: non-finite values, values beyond its range, and rows that
    it would round to zeros or to something else (float16 flushes magnitudes below ~6e-8 to zero and keeps ~1e-3
    relative precision only above ~6e-5).

    A row is lost when the cast changes it by more than 1% of its norm: kNN and the probe would see other
    features than the model returned."""
    values = np.asarray(rows)
    if not np.isfinite(values).all():
        raise UserError(
            f"the model returned non-finite (NaN or inf) {what}: its weights are broken or the forward overflowed "
            "(retry with --precision fp32; check the checkpoint)"
        )
    info = np.finfo(dtype)
    peak = float(np.abs(values).max(initial=0.0))
    if peak > float(info.max):
        raise UserError(
            f"{what} reach {peak:.3g}, beyond {info.dtype}'s range (±{info.max:.5g}): rerun with --store-dtype float32"
        )
    if info.bits >= 32:
        return
    norms = np.linalg.norm(values, axis=1)
    error = np.linalg.norm(values.astype(dtype).astype(values.dtype) - values, axis=1)
    lost = (norms > 0) & (error > 0.01 * norms)
    if lost.any():
        raise UserError(
            f"{what} are too small for {info.dtype} (rows of norm down to {norms[lost].min():.3g} would be stored as "
            "zeros or rounded beyond 1%): rerun with --store-dtype float32"
        )


def _read_json(path: Path) -> object:
    """Parsed JSON, or None when the file is missing or not JSON (a crash or an edit left it unusable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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
        lock = FileLock(str(ensure_dir(self.path.parent) / f"{self.key}.lock"))
        try:
            lock.acquire()
        except OSError as exc:
            raise write_error(lock.lock_file, exc) from exc
        try:
            yield
        finally:
            lock.release()

    def is_complete(self, *, verify: bool = True) -> bool:
        """True when sealed and intact; a store whose files no longer match its manifest is unsealed."""
        manifest = self.path / _MANIFEST
        try:
            inode = manifest.stat().st_ino
        except OSError:
            return False
        meta = _read_json(manifest)
        ok = isinstance(meta, dict) and (not verify or self._matches(meta))
        if not ok:
            log.warning("feature store %s does not match its manifest; it will be rebuilt", self.path)
            _unseal(manifest, inode)
        return ok

    def _matches(self, meta: dict) -> bool:
        """Both arrays are as sealed: cheaply when a file's size, mtime and sampled blocks are the sealed ones,
        else by hashing it whole against the manifest's sha256 (e.g. after a copy that set a new mtime)."""
        hashes, prints = meta.get("sha256"), meta.get("fingerprint")
        if not isinstance(hashes, dict):
            return False
        try:
            for name in _ARRAYS:
                path = self.path / name
                known = prints.get(name) if isinstance(prints, dict) else None
                if known is not None and known.get("size") != path.stat().st_size:
                    return False
                if known != fingerprint(path) and file_sha256(path) != hashes.get(name):
                    return False
        except OSError:
            return False
        return True

    def load(self) -> StoredFeatures:
        """The sealed features (memory-mapped) and labels."""
        if not self.is_complete(verify=False):
            raise UserError(f"feature store {self.path} is not complete; rerun the evaluation to finish it")
        meta = json.loads((self.path / _MANIFEST).read_text())
        features = np.load(self.path / "features.npy", mmap_mode="r")
        labels = np.load(self.path / "labels.npy")
        return StoredFeatures(features=features, labels=labels, meta=meta)

    def writer(
        self, *, labels: np.ndarray, dim: int, dtype: str, chunk_rows: int, meta: dict, label: str = "features"
    ) -> StoreWriter:
        """Open for writing (call under :meth:`lock`); resumes the finished chunks of an earlier run.

        ``label`` names the representation in errors about the rows (non-finite, beyond the dtype's range)."""
        return StoreWriter(
            self.path, labels=labels, dim=dim, dtype=dtype, chunk_rows=chunk_rows, meta=meta, label=label
        )


def fingerprint(path: Path) -> dict:
    """Size, mtime and the sha256 of sampled blocks (head, tail and 14 between): any truncation and any later
    write (a new mtime) shows, and so does a same-tick edit of a sampled block; the rest costs a full hash."""
    stat = path.stat()
    size = stat.st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for i in range(_SAMPLES):
            f.seek(max(0, min(size - _SAMPLE_BYTES, (size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))))
            digest.update(f.read(_SAMPLE_BYTES))
    return {"size": size, "mtime_ns": stat.st_mtime_ns, "sampled_sha256": digest.hexdigest()}


def _unseal(manifest: Path, inode: int) -> None:
    """Remove a manifest that failed its check, unless a writer has meanwhile sealed a new one (new inode)."""
    with suppress(OSError):
        if manifest.stat().st_ino == inode:
            manifest.unlink()


class StoreWriter:
    """Rows are written chunk by chunk; a chunk counts once its rows are flushed and logged with their hash."""

    def __init__(
        self,
        path: Path,
        *,
        labels: np.ndarray,
        dim: int,
        dtype: str,
        chunk_rows: int,
        meta: dict,
        label: str = "features",
    ) -> None:
        if chunk_rows <= 0:
            raise UserError(f"chunk_rows must be positive, got {chunk_rows}")
        self.path = path
        self.label = label
        self.rows = len(labels)
        self.chunk_rows = chunk_rows
        self.meta = meta
        layout = {
            "rows": self.rows,
            "dim": dim,
            "dtype": str(np.dtype(dtype)),
            "chunk_rows": chunk_rows,
            "labels_sha256": _labels_sha256(labels),
        }
        try:
            self._open(layout, labels)
        except OSError as exc:
            raise write_error(path, exc) from exc

    def _open(self, layout: dict, labels: np.ndarray) -> None:
        """Resume what can be verified, else start over; either way the store is unsealed until :meth:`seal`."""
        ensure_dir(self.path)
        (self.path / _MANIFEST).unlink(missing_ok=True)
        features_file = self.path / "features.npy"
        shape = (layout["rows"], layout["dim"])
        if _read_json(self.path / _LAYOUT) == layout and _npy_fits(features_file, shape, layout["dtype"]):
            self.features = np.lib.format.open_memmap(features_file, mode="r+")
            self._done = self._verified_chunks()
        else:
            self._start_over(layout)
            self._done = {}
        self._rewrite_log()
        with atomic_path(self.path / "labels.npy") as tmp:
            np.save(tmp, np.asarray(labels, dtype=np.int64))

    def _start_over(self, layout: dict) -> None:
        """Empty the folder, preallocate ``features.npy``, and only then record the layout it was made for."""
        for stale in self.path.iterdir():
            stale.unlink() if stale.is_file() else shutil.rmtree(stale)
        features_file = self.path / "features.npy"
        shape = (layout["rows"], layout["dim"])
        try:
            self.features = np.lib.format.open_memmap(features_file, mode="w+", dtype=layout["dtype"], shape=shape)
            _reserve_disk(features_file)
            write_json_atomic(self.path / _LAYOUT, layout)
        except (OSError, UserError):
            features_file.unlink(missing_ok=True)  # give the space back; without layout.json nothing resumes it
            raise

    def _verified_chunks(self) -> dict[int, str]:
        """Logged chunks whose rows still hash to the logged value; a cut, garbled or stale line does not count."""
        try:
            lines = (self.path / _LOG).read_text().split("\n")[:-1]  # an unterminated last line was cut by a crash
        except (OSError, UnicodeDecodeError):
            return {}
        done: dict[int, str] = {}
        for line in lines:
            chunk, _, digest = line.partition(" ")
            if chunk.isdigit() and int(chunk) < self.num_chunks and digest == self._chunk_sha256(int(chunk)):
                done[int(chunk)] = digest
        return done

    def _chunk_sha256(self, chunk: int) -> str:
        start, end = self.chunk_range(chunk)
        return _rows_sha256(self.features[start:end])

    def _rewrite_log(self) -> None:
        """Keep only the verified lines, so that the next append never lands on a line cut by a crash."""
        with atomic_path(self.path / _LOG) as tmp, open(tmp, "w") as f:
            f.writelines(f"{chunk} {digest}\n" for chunk, digest in sorted(self._done.items()))
            f.flush()
            os.fsync(f.fileno())

    @property
    def num_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.rows)

    def pending_chunks(self) -> list[int]:
        return [c for c in range(self.num_chunks) if c not in self._done]

    def refresh(self) -> None:
        """Re-read the chunks other processes logged (ranks of a distributed run share one store)."""
        self._done = self._verified_chunks()

    def write_chunk(self, chunk: int, rows: np.ndarray) -> None:
        """Store a whole chunk's rows, flush them, then log the chunk and its hash as done.

        Pass the rows as computed (float32): they are checked against the store's dtype before the cast
        (:func:`check_storable`), so nothing is stored as zeros, inf or NaN without a word.
        """
        start, end = self.chunk_range(chunk)
        if rows.shape != (end - start, self.features.shape[1]):
            raise ValueError(f"chunk {chunk} expects {(end - start, self.features.shape[1])}, got {rows.shape}")
        check_storable(rows, self.features.dtype, self.label)
        try:
            self.features[start:end] = rows
            self.features.flush()
            digest = self._chunk_sha256(chunk)
            with open(self.path / _LOG, "a") as f:
                f.write(f"{chunk} {digest}\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise write_error(self.path, exc) from exc
        self._done[chunk] = digest

    def seal(self, extra: dict | None = None) -> None:
        """Write the manifest last (``extra``: e.g. extraction timings): from here on the store is complete."""
        if self.pending_chunks():
            raise RuntimeError(f"cannot seal {self.path}: chunks {self.pending_chunks()[:5]} are missing")
        try:
            self.features.flush()
            hashes = {name: file_sha256(self.path / name) for name in _ARRAYS}
            prints = {name: fingerprint(self.path / name) for name in _ARRAYS}
            for leftover in self.path.glob(".*.tmp*"):  # of killed writers (every writer is done by now)
                leftover.unlink()
        except OSError as exc:
            raise write_error(self.path, exc) from exc
        shape = list(self.features.shape)
        manifest = {
            **self.meta,
            **(extra or {}),
            "complete": True,
            "shape": shape,
            "dtype": str(self.features.dtype),
            "sha256": hashes,
            "fingerprint": prints,
        }
        write_json_atomic(self.path / _MANIFEST, manifest)
