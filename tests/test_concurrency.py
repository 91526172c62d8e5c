"""Concurrent runs: two ``patchbench eval`` on one key (one computes, the other waits and reuses), and
several processes appending to one results file (no line interleaved or lost)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssl_patchbench.results.store import read_records

pytestmark = pytest.mark.slow  # every test here starts processes

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _eval(ctx_args: list[str], home: Path, log: Path, *, verbose: bool = False) -> subprocess.Popen:
    """``patchbench [-vv] eval ...`` in its own process; stdout is the JSON row, stderr goes to ``log``."""
    command = [sys.executable, "-m", "ssl_patchbench", *(["-vv"] if verbose else []), "eval", *ctx_args]
    return subprocess.Popen(
        [*command, "--home", str(home), "--json"],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),
        text=True,
    )


def _extracting(home: Path) -> Path | None:
    """A store being written right now: its layout is recorded but it is not sealed."""
    for store in (home / "features").glob("*/layout.json"):
        if not (store.parent / "meta.json").exists():
            return store.parent
    return None


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (Linux: state T in /proc/PID/stat; SIGSTOP takes effect asynchronously)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def _stop_mid_extraction(process: subprocess.Popen, home: Path, log: Path) -> Path:
    """SIGSTOP ``process`` while it holds a store's lock: a store seen unsealed may be sealed before the signal
    lands, so the store is checked again once the process has stopped, and another one is waited for if so (a
    sealed store stays sealed: the search skips it)."""
    while True:
        store = _wait_for(lambda: _extracting(home) if process.poll() is None else "exited")
        assert store != "exited", log.read_text()
        process.send_signal(signal.SIGSTOP)
        _wait_for(lambda: _stopped(process.pid), timeout=10.0)
        if not (store / "meta.json").exists():
            return store  # stopped between writing its layout and sealing it: under its lock
        process.send_signal(signal.SIGCONT)


def _wait_for(predicate, timeout: float = 300.0, step: float = 0.001):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        time.sleep(step)
    raise AssertionError("timed out")


def test_second_eval_on_the_same_key_waits_then_reuses(tmp_path, tiny_checkpoint, cifar_dir):
    """A is paused (SIGSTOP) while it holds a store's lock mid-extraction; B must wait on that lock, then
    read A's stores: every chunk is computed once, and both print the same numbers."""
    args = ["--model", "tiny_cifar", "--checkpoint", str(tiny_checkpoint), "--dataset", "cifar10"]
    args += ["--data-dir", str(cifar_dir), "--patches", "16", "--eval", "knn", "--test-per-class", "5"]
    home = tmp_path / "home"
    first = _eval(args, home, tmp_path / "a.log")
    store = _stop_mid_extraction(first, home, tmp_path / "a.log")
    try:
        second = _eval(args, home, tmp_path / "b.log", verbose=True)
        waiting = f"not acquired on {store}.lock"
        _wait_for(lambda: waiting in (tmp_path / "b.log").read_text() or second.poll() is not None, step=0.05)
    finally:
        first.send_signal(signal.SIGCONT)
    out_a, out_b = first.communicate(timeout=600)[0], second.communicate(timeout=600)[0]
    assert first.returncode == second.returncode == 0, (tmp_path / "b.log").read_text()[-2000:]
    assert waiting in (tmp_path / "b.log").read_text(), "B did not wait on A's lock"
    row_a, row_b = json.loads(out_a), json.loads(out_b)
    assert (row_a.pop("reused_features"), row_b.pop("reused_features")) == (False, True)
    assert row_b["images_per_s"] == row_b["patches_per_s"] == 0  # B measured no extraction: it claims none
    assert {k: v for k, v in row_a.items() if not k.endswith("_per_s")} == {
        k: v for k, v in row_b.items() if not k.endswith("_per_s")
    }  # the same numbers
    for log in (home / "features").glob("*/chunks.log"):
        chunks = [line.split()[0] for line in log.read_text().splitlines()]
        assert chunks == ["0"], f"{log}: every chunk is extracted exactly once"
    # A's record and B's, told apart by what they claim (both append after their kNN: either may come first)
    a, b = sorted(read_records(home / "results.jsonl"), key=lambda record: record["reused_features"])
    assert a["timings"]["extraction_train"]["images"] == a["n_train"] and not a["reused_features"]
    assert b["reused_features"] and b["timings"]["extraction_train"] is b["timings"]["extraction_test"] is None
    assert a["feature_stores"] == b["feature_stores"]


_WRITER = """
import sys
from pathlib import Path
from ssl_patchbench.results.store import append_record
path, writer, start = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
import time
time.sleep(max(0.0, start - time.time()))
for i in range(50):
    append_record(path, {"writer": writer, "i": i, "payload": str(writer) * (20_000 + 997 * i)})
"""


def test_results_lines_are_never_interleaved_or_lost(tmp_path):
    path = tmp_path / "results.jsonl"
    start = time.time() + 2.0  # all four start appending at once
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(w), str(start)], cwd=REPO, env=ENV)
        for w in range(4)
    ]
    assert all(w.wait(timeout=300) == 0 for w in writers)
    lines = path.read_text().splitlines()
    assert len(lines) == 200
    records = [json.loads(line) for line in lines]  # every line parses: none interleaved
    assert sorted((r["writer"], r["i"]) for r in records) == [(w, i) for w in range(4) for i in range(50)]
    assert all(r["payload"] == str(r["writer"]) * (20_000 + 997 * r["i"]) for r in records)
    for w in range(4):  # each writer's lines stay in its order
        assert [r["i"] for r in records if r["writer"] == w] == list(range(50))


def test_work_in_shares_is_one_task_per_consecutive_share_in_order():
    from concurrent.futures import ThreadPoolExecutor

    from ssl_patchbench.core.shares import submit_shares

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = submit_shares(pool, lambda part: [(len(part), x * x) for x in part], list(range(10)), 3)
        got = [pair for future in futures for pair in future.result()]
        assert submit_shares(pool, lambda part: list(part), [], 3) == []
    assert [x for _, x in got] == [x * x for x in range(10)]
    assert [n for n, _ in got] == [4] * 4 + [4] * 4 + [2] * 2  # ceil(10 / 3) = 4 items a share: 4, 4, 2
