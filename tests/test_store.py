import json
import os

import numpy as np
import pytest

from ssl_patchbench.features.store import FeatureStore, store_key


def _fill(store: FeatureStore, rows: np.ndarray, labels: np.ndarray, chunks=None, chunk_rows=4):
    writer = store.writer(labels=labels, dim=rows.shape[1], dtype="float16", chunk_rows=chunk_rows, meta={"m": 1})
    for chunk in writer.pending_chunks() if chunks is None else chunks:
        lo, hi = writer.chunk_range(chunk)
        writer.write_chunk(chunk, rows[lo:hi])
    return writer


def test_roundtrip_and_manifest(tmp_path):
    rows, labels = np.random.rand(10, 3).astype(np.float16), np.arange(10) % 3
    store = FeatureStore(tmp_path, "k")
    assert not store.is_complete()
    _fill(store, rows, labels).seal({"extraction": {"seconds": 1.0}})
    loaded = store.load()
    np.testing.assert_array_equal(loaded.features, rows)
    np.testing.assert_array_equal(loaded.labels, labels)
    assert loaded.meta["m"] == 1 and loaded.meta["complete"] and loaded.meta["shape"] == [10, 3]
    assert loaded.meta["extraction"]["seconds"] == 1.0


def test_unsealed_store_is_never_read_and_resumes_missing_chunks(tmp_path):
    rows, labels = np.random.rand(10, 3).astype(np.float16), np.zeros(10, dtype=int)
    store = FeatureStore(tmp_path, "k")
    _fill(store, rows, labels, chunks=[0, 2])
    assert not store.is_complete()
    writer = store.writer(labels=labels, dim=3, dtype="float16", chunk_rows=4, meta={})
    assert writer.pending_chunks() == [1]
    with pytest.raises(RuntimeError):
        writer.seal()
    _fill(store, rows, labels).seal()
    np.testing.assert_array_equal(store.load().features, rows)


def test_a_chunk_line_cut_by_a_crash_does_not_count(tmp_path):
    rows, labels = np.random.rand(8, 2).astype(np.float16), np.zeros(8, dtype=int)
    store = FeatureStore(tmp_path, "k")
    writer = _fill(store, rows, labels, chunks=[0])
    with open(store.path / "chunks.log", "a") as f:
        f.write("1")  # no newline: the process died mid-write
    assert writer.pending_chunks() == [1]


def test_tampered_store_is_unsealed_and_rebuilt(tmp_path):
    rows, labels = np.random.rand(8, 2).astype(np.float16), np.zeros(8, dtype=int)
    store = FeatureStore(tmp_path, "k")
    _fill(store, rows, labels).seal()
    with open(store.path / "features.npy", "r+b") as f:
        f.seek(-2, 2)
        f.write(b"\x00\x7c")
    assert not store.is_complete()
    assert not (store.path / "meta.json").exists()


def test_changed_layout_starts_over(tmp_path):
    labels = np.zeros(8, dtype=int)
    store = FeatureStore(tmp_path, "k")
    _fill(store, np.ones((8, 2), np.float16), labels, chunks=[0])
    writer = store.writer(labels=labels, dim=5, dtype="float16", chunk_rows=4, meta={})
    assert writer.pending_chunks() == [0, 1]
    assert writer.features.shape == (8, 5)


def test_key_changes_with_any_material():
    base = {"checkpoint_sha256": "a", "patches": {"n": 16}, "seed": 0}
    assert store_key(base) == store_key(json.loads(json.dumps(base)))
    assert store_key(base) != store_key({**base, "seed": 1})
    assert store_key(base) != store_key({**base, "patches": {"n": 256}})


def test_the_key_is_the_hash_of_the_materials_canonical_json_and_protocol_version():
    """Pinned to its formula: a refactor that changed it would orphan every cache users have."""
    import hashlib

    from ssl_patchbench.features.store import PROTOCOL_VERSION

    material = {"seed": 0, "checkpoint_sha256": "a", "patches": {"n": 16, "mode": "random"}}
    text = json.dumps({**material, "protocol_version": PROTOCOL_VERSION}, sort_keys=True)
    assert store_key(material) == hashlib.sha256(text.encode()).hexdigest()[:24]


def test_sealed_store_is_checked_by_its_fingerprint_and_hashed_whole_only_when_it_changed(tmp_path, monkeypatch):
    import ssl_patchbench.features.store as store_module

    rows, labels = np.random.rand(64, 3).astype(np.float16), np.zeros(64, dtype=int)
    store = FeatureStore(tmp_path, "k")
    _fill(store, rows, labels, chunk_rows=16).seal()
    hashed = []
    real = store_module.file_sha256
    monkeypatch.setattr(store_module, "file_sha256", lambda path: hashed.append(path.name) or real(path))
    assert store.is_complete() and hashed == []  # size, mtime and sampled blocks as sealed: no full hash
    features = store.path / "features.npy"
    os.utime(features, ns=(features.stat().st_atime_ns, features.stat().st_mtime_ns + 10**9))  # touched
    assert store.is_complete() and hashed == ["features.npy"]  # same bytes: still sealed
