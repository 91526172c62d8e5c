import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ssl_patchbench.results.store import read_records

from .clitools import model_args, run_cli

pytestmark = pytest.mark.slow  # every test here starts processes


def _args(checkpoint, data_dir, home) -> list[str]:
    return [
        "eval",
        *model_args(checkpoint, data_dir),
        "--patches",
        "central,3",
        "--train-per-class",
        "12",
        "--test-per-class",
        "6",
        "--chunk-rows",
        "16",
        "--home",
        str(home),
        "--json",
    ]


def _interrupt(store, keep: set[int]) -> int:
    """Make a sealed store look like a run killed after finishing only the chunks in ``keep`` (logged as the
    writer logs them: chunk and the sha256 of its rows); returns how many rows are left to extract."""
    (store / "meta.json").unlink()
    features = np.load(store / "features.npy", mmap_mode="r+")
    rows = np.ones(len(features), dtype=bool)
    for chunk in keep:
        rows[chunk * 16 : (chunk + 1) * 16] = False
    features[rows] = 0
    features.flush()
    digests = {c: hashlib.sha256(np.ascontiguousarray(features[c * 16 : (c + 1) * 16]).tobytes()) for c in keep}
    (store / "chunks.log").write_text("".join(f"{c} {digests[c].hexdigest()}\n" for c in sorted(keep)))
    return int(rows.sum())


def _metrics(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.endswith("_per_s")} for row in rows]


def test_two_gloo_ranks_resume_a_one_process_store_and_match_it(
    capsys, monkeypatch, tiny_checkpoint, cifar_dir, tmp_path
):
    single, multi = tmp_path / "single", tmp_path / "multi"
    code, out, err = run_cli(capsys, monkeypatch, *_args(tiny_checkpoint, cifar_dir, single))
    assert code == 0, err
    shutil.copytree(single, multi)
    (multi / "results.jsonl").unlink()
    stores = sorted((multi / "features").glob("*/"))
    left = {store: _interrupt(store, keep={0, 2}) for store in stores}  # a killed one-process run; two ranks finish it

    env = {**os.environ, "PATCHBENCH_HOME": str(multi), "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "ssl_patchbench", *_args(tiny_checkpoint, cifar_dir, multi), "--nproc", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert launched.returncode == 0, launched.stderr[-2000:]
    rows_multi = [json.loads(line) for line in launched.stdout.splitlines() if line.startswith("{")]
    rows_single = [json.loads(line) for line in out.splitlines()]
    assert _metrics(rows_multi) == _metrics(rows_single)
    for store in stores:
        reference = single / "features" / store.name
        np.testing.assert_array_equal(np.load(store / "features.npy"), np.load(reference / "features.npy"))
        extraction = json.loads((store / "meta.json").read_text())["extraction"]
        assert extraction["processes"] == 2
        assert extraction["images"] == left[store]  # the kept chunks were resumed, not extracted again
        logged = [int(line.split()[0]) for line in (store / "chunks.log").read_text().splitlines()]
        assert sorted(logged) == list(range(-(-len(np.load(store / "labels.npy")) // 16)))  # each chunk once
    records = read_records(multi / "results.jsonl")
    assert len(records) == 2  # written once, by rank 0
