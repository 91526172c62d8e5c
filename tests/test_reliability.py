"""Reliability and security (issue 8): bad inputs, disk full, kill -9, tampered stores, untrusted checkpoints.

Every bad input goes through the real CLI entry point and must end with one line on stderr, exit code 2,
no traceback, and nothing a later run could read as complete. docs/reliability.md lists the same cases.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.features import store
from ssl_patchbench.features.store import FeatureStore
from ssl_patchbench.models import checkpoints
from ssl_patchbench.models.registry import get_entry
from ssl_patchbench.pipeline.evaluate import EvalConfig, evaluate
from ssl_patchbench.results.store import append_record, read_records

from .clitools import run_cli
from .factories import DATA, Ctx, assert_user_error

REPO = Path(__file__).resolve().parents[1]


def assert_nothing_half_done(home: Path) -> None:
    """No results record, and every sealed store intact: nothing half-written a later run could take as finished."""
    for manifest in home.rglob("meta.json"):
        assert FeatureStore(manifest.parent.parent, manifest.parent.name).is_complete()
    assert read_records(home / "results.jsonl") == []


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pickle_payload(marker: Path) -> object:
    class RunsCode:
        """Unpickling this runs code: it would create `marker`."""

        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    return RunsCode()


def _bad_checkpoint(ctx: Ctx, kind: str) -> Path:
    good = ctx.ckpt.read_bytes()
    if kind == "truncated":
        return ctx.file("truncated.ckpt", good[: len(good) // 2])
    if kind == "garbage":
        return ctx.file("garbage.ckpt", bytes(random.Random(0).randrange(256) for _ in range(4096)))
    if kind == "empty":
        return ctx.file("empty.ckpt", b"")
    path = ctx.tmp / "pickled.ckpt"
    torch.save({**torch.load(ctx.ckpt, weights_only=True), "hparams": _pickle_payload(ctx.tmp / "marker")}, path)
    return path


def _wrong_arch(ctx: Ctx) -> list[str]:
    return ["--model", "resnet18_cifar", "--checkpoint", str(ctx.ckpt), "--data-dir", str(ctx.data)]


def _download_with_wrong_sha(ctx: Ctx) -> list[str]:
    return ctx.zoo(needs_checkpoint=False, source={"url": ctx.ckpt.as_uri(), "sha256": "0" * 64})


def _broken_zoo(ctx: Ctx) -> list[str]:
    ctx.monkeypatch.setenv("PATCHBENCH_ZOO", str(ctx.file("zoo.yaml", b"models: [")))
    return ctx.tiny()


def _alias_bomb(ctx: Ctx) -> list[str]:
    """324 bytes of YAML whose aliases expand to 9**9 items."""
    text = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    text += "".join(f"{c}: &{c} [" + ",".join([f"*{chr(ord(c) - 1)}"] * 9) + "]\n" for c in "bcdefghi")
    ctx.monkeypatch.setenv("PATCHBENCH_ZOO", str(ctx.file("bomb.yaml", text.encode())))
    return ctx.tiny()


def _string_keys_only(ctx: Ctx) -> Path:
    path = ctx.tmp / "intkey.ckpt"
    state = torch.load(ctx.ckpt, weights_only=True)
    torch.save({**state, "state_dict": {**state["state_dict"], 3: torch.zeros(1)}}, path)
    return path


def _test_split_lacking_a_class(ctx: Ctx) -> list[str]:
    tree = ctx.tmp / "lacking"
    shutil.copytree(ctx.data, tree)
    shutil.rmtree(tree / "test" / "airplane")
    return [*ctx.tiny(), "--dataset", "folder", "--data-dir", str(tree)]


def _empty_dir(ctx: Ctx) -> str:
    (ctx.tmp / "empty").mkdir(exist_ok=True)
    return str(ctx.tmp / "empty")


# (id, args builder, expected part of the one-line message); docs/reliability.md has the same table.
CASES: list[tuple[str, Callable[[Ctx], list[str]], str]] = [
    ("unknown model", lambda c: [*c.tiny(), "--model", "tiny_cifra"], "'tiny_cifra' (did you mean: tiny_cifar"),
    ("unknown dataset", lambda c: [*c.tiny(), "--dataset", "cifar11"], "'cifar11' (did you mean: cifar10"),
    ("missing data, torchvision", lambda c: [*c.tiny(), "--data-dir", _empty_dir(c)], "rerun with --download"),
    (
        "missing data, ImageFolder",
        lambda c: [*c.tiny(), "--dataset", "imagenet", "--data-dir", _empty_dir(c)],
        "pass --data-dir DIR holding DIR/train/<class>/*",
    ),
    (
        "sliding window larger than the image",
        lambda c: [*c.tiny(), "--mode", "sliding", "--patch-size", "48", "--stride", "4", "--patches", "all"],
        "patch size 48 px is larger than the 32 px image view",
    ),
    (
        "random square larger than the image",
        lambda c: [*c.tiny(), "--patch-size", "48", "--patches", "2"],
        "patch size 48 px is larger than an image of 32x32 px",
    ),
    ("zero patches", lambda c: [*c.tiny(), "--patches", "0"], "the number of patches must be positive, got 0"),
    ("negative patches", lambda c: [*c.tiny(), "--patches", "-3"], "the number of patches must be positive, got -3"),
    ("non-square grid", lambda c: [*c.tiny(), "--mode", "grid", "--patches", "2"], "square number of patches"),
    (
        "zero images per class",
        lambda c: [*c.tiny(), "--train-per-class", "0"],
        "Invalid value for '--train-per-class': 0 is not in the range x>=1",
    ),
    (
        "zero stride",
        lambda c: [*c.tiny(), "--mode", "sliding", "--patch-size", "16", "--stride", "0"],
        "Invalid value for '--stride': 0 is not in the range x>=1",
    ),
    (
        "negative stride",
        lambda c: [*c.tiny(), "--mode", "sliding", "--patch-size", "16", "--stride", "-4"],
        "Invalid value for '--stride': -4 is not in the range x>=1",
    ),
    (
        "sliding without a stride",
        lambda c: [*c.tiny(), "--mode", "sliding", "--patch-size", "16"],
        "sliding mode needs --patch-size PX and --stride PX",
    ),
    ("scale above 1", lambda c: [*c.tiny(), "--patch-scale", "1.5"], "patch scale must satisfy 0 < min <= max <= 1"),
    ("scale 0", lambda c: [*c.tiny(), "--patch-scale", "0"], "patch scale must satisfy 0 < min <= max <= 1"),
    ("scale range reversed", lambda c: [*c.tiny(), "--patch-scale", "0.5,0.2"], "patch scale must satisfy"),
    ("scale not a number", lambda c: [*c.tiny(), "--patch-scale", "big"], "'--patch-scale': takes a number or a pair"),
    ("scale with three numbers", lambda c: [*c.tiny(), "--patch-scale", "0.1,0.2,0.3"], "takes a number or a pair"),
    ("negative seed", lambda c: [*c.tiny(), "--seed", "-1"], "Invalid value for '--seed': -1 is not in the range 0<=x"),
    ("zero kNN k", lambda c: [*c.tiny(), "--knn-k", "0"], "'--knn-k': takes positive integers"),
    ("zero temperature", lambda c: [*c.tiny(), "--temperature", "0"], "'--temperature': 0.0 is not in the range x>0.0"),
    ("temperature not a number", lambda c: [*c.tiny(), "--temperature", "nan"], "'nan' is not a finite number"),
    ("empty representation list", lambda c: [*c.tiny(), "--aggregate", ""], "--aggregate is empty"),
    ("unknown store dtype", lambda c: [*c.tiny(), "--store-dtype", "int8"], "'int8' is not one of"),
    ("seed beyond 64 bits", lambda c: [*c.tiny(), "--seed", str(2**64)], "not in the range 0<=x<=18446744073709551615"),
    ("unknown evaluator", lambda c: [*c.tiny(), "--eval", "svm"], "unknown evaluator 'svm'"),
    ("unknown aggregation", lambda c: [*c.tiny(), "--aggregate", "max"], "unknown aggregation 'max'"),
    ("unknown compile setting", lambda c: [*c.tiny(), "--compile", "yes"], "Invalid value for '--compile': 'yes'"),
    ("zoo entry: wrong type", lambda c: c.zoo(patch_scale="big"), "entry 'mine', field 'patch_scale': expected"),
    (
        "zoo entry: old field name",
        lambda c: c.zoo(pretrain_scale=[0.2, 1.0]),
        "field 'pretrain_scale' is now 'patch_scale'",
    ),
    ("zoo entry: unknown field", lambda c: c.zoo(stems="cifar"), "unknown field 'stems' (did you mean: stem"),
    ("zoo entry: name is a path", lambda c: c.zoo(name="../../evil"), "entry '../../evil', field 'name'"),
    (
        "zoo entry: url leaves the cache",
        lambda c: c.zoo(needs_checkpoint=False, source={"url": "https://host/../../../etc/x"}),
        "entry 'mine', field 'source.url'",
    ),
    ("zoo file not YAML", _broken_zoo, "cannot read zoo file"),
    ("zoo file: alias bomb", _alias_bomb, "its aliases expand to more than 200,000 YAML nodes (an alias bomb?)"),
    (
        "zoo entry: input size out of range",
        lambda c: c.zoo(preprocessing={**get_entry("tiny_cifar").to_dict()["preprocessing"], "input_size": 10**6}),
        "field 'preprocessing.input_size': expected 8 to 1024 px, got 1000000",
    ),
    ("checkpoint missing", lambda c: c.tiny(c.tmp / "nope.ckpt"), "checkpoint not found"),
    ("checkpoint truncated", lambda c: c.tiny(_bad_checkpoint(c, "truncated")), "is truncated or corrupt"),
    ("checkpoint corrupt", lambda c: c.tiny(_bad_checkpoint(c, "garbage")), "is truncated or corrupt"),
    ("checkpoint empty", lambda c: c.tiny(_bad_checkpoint(c, "empty")), "is truncated or corrupt"),
    (
        "checkpoint runs code when unpickled",
        lambda c: c.tiny(_bad_checkpoint(c, "pickle")),
        "pass --trust-checkpoint only if you trust its source",
    ),
    (
        "checksum mismatch, local file",
        lambda c: c.zoo(needs_checkpoint=False, source={"path": str(c.ckpt), "sha256": "0" * 64}),
        "sha256 mismatch",
    ),
    ("checksum mismatch, download", _download_with_wrong_sha, "sha256 mismatch"),
    (
        "checkpoint URL leaves the cache",
        lambda c: c.tiny("https://host/../../../etc/x.pth"),
        "refusing https://host/../../../etc/x.pth",
    ),
    ("state dict with a non-string key", lambda c: c.tiny(_string_keys_only(c)), "key 3 (of type int) is not a"),
    ("weights of another architecture", _wrong_arch, "weights do not fit the architecture"),
    ("classes differ between splits", _test_split_lacking_a_class, "class 'airplane' has images in"),
    ("unknown device", lambda c: [*c.tiny(), "--device", "tpu"], "unknown device 'tpu'"),
    (
        "cache folder below a regular file",
        lambda c: [*c.tiny(), "--home", str(c.file("f", b"x") / "home")],
        "cannot write",
    ),
    (
        "results file below a regular file",
        lambda c: [*c.tiny(), "--results", str(c.file("g", b"x") / "r.jsonl")],
        "cannot write",
    ),
]


@pytest.mark.parametrize(("build", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_complete(capsys, monkeypatch, ctx, build, message):
    code, out, err = run_cli(capsys, monkeypatch, "eval", *DATA, *build(ctx))
    assert_user_error(code, err, message)
    assert out == ""
    assert_nothing_half_done(Path(os.environ["PATCHBENCH_HOME"]))
    assert not list((Path(os.environ["PATCHBENCH_HOME"]) / "checkpoints").rglob("*.ckpt"))  # no bad download kept


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu(capsys, monkeypatch, ctx):
    code, _, err = run_cli(capsys, monkeypatch, "eval", *DATA, *ctx.tiny(), "--device", "cuda")
    assert_user_error(code, err, "no CUDA GPU is visible; use --device cpu")


@pytest.mark.slow
def test_real_process_prints_one_line_and_no_traceback(ctx):
    """The same through ``python -m ssl_patchbench`` in a fresh process (what a shell sees)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "ssl_patchbench", "eval", *DATA, *ctx.tiny(), "--patch-scale", "0.5,0.2"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert_user_error(done.returncode, done.stderr, "patch scale must satisfy 0 < min <= max <= 1")


# ---------------------------------------------------------------- untrusted checkpoints


def test_code_in_a_checkpoint_never_runs_by_default(capsys, monkeypatch, ctx):
    path, marker = _bad_checkpoint(ctx, "pickle"), ctx.tmp / "marker"
    code, _, err = run_cli(capsys, monkeypatch, "eval", *DATA, *ctx.tiny(path))
    assert_user_error(code, err, "--trust-checkpoint")
    assert not marker.exists()
    checkpoints.load_file(path, trust_pickle=True)  # the payload is real: trusting the file runs it
    assert marker.exists()


@pytest.mark.parametrize(
    "url",
    [
        "https://host/../../etc/x",
        "https://host/a/../../../x.pth",
        "https://../x.pth",
        "https://host/",
        "file:///../../etc/passwd",
        "https://host/a/%00/x.pth\0",
    ],
)
def test_no_url_writes_outside_the_checkpoint_cache(tmp_path, url):
    with pytest.raises(UserError, match=r"refusing|must name a file"):
        checkpoints.cache_path(url, tmp_path / "cache")


def test_cache_paths_mirror_host_and_path_inside_the_cache(tmp_path):
    cache = tmp_path / "cache"
    assert checkpoints.cache_path("https://user:pw@host:8080/a/./b.pth?x=1", cache) == cache / "host:8080/a/b.pth"
    assert checkpoints.cache_path("file:///etc/passwd", cache) == cache / "etc/passwd"


def test_download_goes_through_a_verified_temporary_file(ctx, monkeypatch):
    """The cache never holds a partial or unverified file: bytes land in a temp file, checked, then renamed."""
    seen: list[tuple[str, bool]] = []
    real_replace = os.replace

    def watch(src, dst):
        seen.append((Path(src).name, Path(dst).exists()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", watch)
    path, digest = checkpoints.fetch(ctx.ckpt.as_uri(), sha256=_sha(ctx.ckpt), cache_dir=ctx.tmp / "cache")
    assert digest == _sha(ctx.ckpt) and path.read_bytes() == ctx.ckpt.read_bytes()
    assert len(seen) == 1 and seen[0][0].startswith(f".{path.name}.") and not seen[0][1]
    assert [p.name for p in (ctx.tmp / "cache").rglob("*") if p.is_file()] == [path.name]


# ---------------------------------------------------------------- disk full


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_fsync_of(fragment: str, monkeypatch) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        if fragment in os.readlink(f"/proc/self/fd/{fd}"):
            raise _enospc()
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _fail_preallocation(monkeypatch) -> None:
    monkeypatch.setattr(os, "posix_fallocate", lambda *a: (_ for _ in ()).throw(_enospc()))


def _half_write_results(monkeypatch) -> None:
    """The results line is half written, then the disk is full."""
    real = os.write

    def write(fd: int, data) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith("results.jsonl"):
            return real(fd, data)
        if getattr(write, "failed", False):
            raise _enospc()
        write.failed = True
        return real(fd, bytes(data[: len(data) // 2]))

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize(
    "inject",
    [
        _fail_preallocation,
        lambda m: _fail_fsync_of(".layout.tmp", m),
        lambda m: _fail_fsync_of("chunks.log", m),
        lambda m: _fail_fsync_of(".meta.tmp", m),
        _half_write_results,
    ],
    ids=["preallocating features.npy", "layout.json", "chunks.log", "manifest", "results line"],
)
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to find the file being written")
def test_disk_full_is_one_line_then_the_next_run_completes(capsys, monkeypatch, ctx, inject):
    home = Path(os.environ["PATCHBENCH_HOME"])
    with monkeypatch.context() as m:
        inject(m)
        code, _, err = run_cli(capsys, monkeypatch, "eval", *DATA, *ctx.tiny())
    assert_user_error(code, err, "No space left on device")
    if (home / "results.jsonl").exists():  # the half line is there, and is not a record
        assert read_records(home / "results.jsonl") == []
    else:
        assert_nothing_half_done(home)
    code, out, err = run_cli(capsys, monkeypatch, "eval", *DATA, *ctx.tiny())
    assert code == 0, err
    assert len(read_records(home / "results.jsonl")) == 1 and json.loads(out)["n_train"] == 20


def test_disk_full_while_preallocating_gives_the_space_back(tmp_path, monkeypatch):
    _fail_preallocation(monkeypatch)
    with pytest.raises(UserError, match="No space left on device"):
        FeatureStore(tmp_path, "k").writer(labels=np.zeros(64), dim=8, dtype="float16", chunk_rows=8, meta={})
    assert not (tmp_path / "k" / "features.npy").exists() and not (tmp_path / "k" / "layout.json").exists()


# ---------------------------------------------------------------- tampered and half-written stores


def _writer(root: Path, labels: np.ndarray, dim: int = 3) -> store.StoreWriter:
    return FeatureStore(root, "k").writer(labels=labels, dim=dim, dtype="float16", chunk_rows=4, meta={"m": 1})


def _fill(writer: store.StoreWriter, rows: np.ndarray, chunks: list[int] | None = None) -> None:
    for chunk in writer.pending_chunks() if chunks is None else chunks:
        lo, hi = writer.chunk_range(chunk)
        writer.write_chunk(chunk, rows[lo:hi])


ROWS = np.arange(30, dtype=np.float16).reshape(10, 3) + 1
LABELS = np.arange(10) % 3


def test_truncated_features_of_an_unsealed_store_start_over(tmp_path):
    """open_memmap(r+) would zero-extend a truncated file, and the logged chunks would be sealed as zeros."""
    _fill(_writer(tmp_path, LABELS), ROWS, chunks=[0, 1])
    features = tmp_path / "k" / "features.npy"
    features.write_bytes(features.read_bytes()[:-20])
    writer = _writer(tmp_path, LABELS)
    assert writer.pending_chunks() == [0, 1, 2]
    _fill(writer, ROWS)
    writer.seal()
    np.testing.assert_array_equal(FeatureStore(tmp_path, "k").load().features, ROWS)


@pytest.mark.parametrize(
    "log_text",
    ["0\n1\n2\n", "0 " + "0" * 64 + "\n", "garbage\n\x00\xff", "2 abc\n7 def\n-1 x\n"],
    ids=["old format without hashes", "wrong hash", "binary garbage", "unknown chunks"],
)
def test_chunks_log_claims_are_checked_against_the_rows(tmp_path, log_text):
    _fill(_writer(tmp_path, LABELS), ROWS, chunks=[1])
    (tmp_path / "k" / "chunks.log").write_bytes(log_text.encode("latin-1"))
    assert _writer(tmp_path, LABELS).pending_chunks() == [0, 1, 2]


def test_rows_changed_after_logging_are_redone(tmp_path):
    _fill(_writer(tmp_path, LABELS), ROWS, chunks=[0, 1])
    with open(tmp_path / "k" / "features.npy", "r+b") as f:
        f.seek(-2 * 3 * 4, os.SEEK_END)  # a row of chunk 1 (rows 4-7)
        f.write(b"\x00\x7c")
    assert _writer(tmp_path, LABELS).pending_chunks() == [1, 2]


def test_unreadable_or_orphaned_layout_starts_over(tmp_path):
    _fill(_writer(tmp_path, LABELS), ROWS, chunks=[0])
    (tmp_path / "k" / "layout.json").write_text("{not json")
    assert _writer(tmp_path, LABELS).pending_chunks() == [0, 1, 2]
    _fill(_writer(tmp_path, LABELS), ROWS, chunks=[0])
    (tmp_path / "k" / "features.npy").unlink()  # a crash between creating the folder and preallocating
    assert _writer(tmp_path, LABELS).pending_chunks() == [0, 1, 2]


def test_other_labels_under_the_same_key_start_over(tmp_path):
    _fill(_writer(tmp_path, LABELS), ROWS, chunks=[0, 1])
    other = LABELS[::-1].copy()
    writer = _writer(tmp_path, other)
    assert writer.pending_chunks() == [0, 1, 2]
    _fill(writer, ROWS)
    writer.seal()
    np.testing.assert_array_equal(FeatureStore(tmp_path, "k").load().labels, other)


def test_a_cut_log_line_is_dropped_before_the_next_append(tmp_path):
    _fill(_writer(tmp_path, LABELS), ROWS, chunks=[0])
    with open(tmp_path / "k" / "chunks.log", "a") as f:
        f.write("1 12")  # killed mid-line
    writer = _writer(tmp_path, LABELS)
    _fill(writer, ROWS, chunks=[1])
    lines = (tmp_path / "k" / "chunks.log").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1"] and all(len(line.split()[1]) == 64 for line in lines)
    assert _writer(tmp_path, LABELS).pending_chunks() == [2]


def test_manifest_that_is_not_an_object_is_not_complete(tmp_path):
    writer = _writer(tmp_path, LABELS)
    _fill(writer, ROWS)
    writer.seal()
    (tmp_path / "k" / "meta.json").write_text("[1, 2]")
    assert not FeatureStore(tmp_path, "k").is_complete()
    with pytest.raises(UserError, match="not complete"):
        FeatureStore(tmp_path, "k").load()


def test_temporary_files_of_a_killed_writer_are_removed_when_sealing(tmp_path):
    _fill(_writer(tmp_path, LABELS), ROWS, chunks=[0])
    (tmp_path / "k" / ".labels.tmp999.npy").write_bytes(b"half")
    writer = _writer(tmp_path, LABELS)
    _fill(writer, ROWS)
    writer.seal()
    assert not list((tmp_path / "k").glob(".*"))


def _small_eval(ctx: Ctx, home: Path, **changes) -> EvalConfig:
    """4 patches of 40 train and 20 test images, in chunks of 8 rows (or ``changes``)."""
    settings = dict(patches=("4",), evals=("knn",), train_per_class=4, test_per_class=2, device="cpu", chunk_rows=8)
    settings.update(changes)
    return EvalConfig(
        model="tiny_cifar", checkpoint=str(ctx.ckpt), dataset="cifar10", data_dir=str(ctx.data), home=home, **settings
    )


def _features_by_key(home: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted((home / "features").glob("*/features.npy"))}


def _tamper(path: Path) -> None:
    if path.name == "features.npy":
        path.write_bytes(path.read_bytes()[:-7])
    elif path.name == "labels.npy":
        data = bytearray(path.read_bytes())
        data[-8] ^= 1
        path.write_bytes(bytes(data))
    else:
        path.write_text("{")


@pytest.mark.parametrize("name", ["features.npy", "labels.npy", "meta.json", "chunks.log", "layout.json"])
def test_tampered_store_file_is_rebuilt_never_read(ctx, name):
    """A sealed store with a damaged file gives the same numbers as an untouched one (rebuilt or not read)."""
    home = ctx.tmp / "home"
    first = evaluate(_small_eval(ctx, home))[0].row()
    reference = _features_by_key(home)
    for path in (home / "features").glob(f"*/{name}"):
        _tamper(path)
    again = evaluate(_small_eval(ctx, home))[0].row()
    assert again["knn@20"] == first["knn@20"]
    assert _features_by_key(home) == reference
    for key in reference:
        assert FeatureStore(home / "features", key).is_complete()


# ---------------------------------------------------------------- kill -9 during extraction

_EXTRACT = """
import sys
import time
from pathlib import Path
from ssl_patchbench.features.store import StoreWriter
from ssl_patchbench.pipeline.evaluate import EvalConfig, evaluate
ckpt, data, home = sys.argv[1:4]
unpaced = StoreWriter.write_chunk
def paced(self, chunk, rows):  # ~20 ms a chunk, not ~3: a poll that comes late on a busy machine still kills mid-store
    time.sleep(0.02)
    unpaced(self, chunk, rows)
StoreWriter.write_chunk = paced
evaluate(EvalConfig(
    model="tiny_cifar", checkpoint=ckpt, dataset="cifar10", data_dir=data, patches=("4",), evals=("knn",),
    train_per_class=4, test_per_class=2, device="cpu", chunk_rows=2, max_patches=8, home=Path(home),
))
"""


def _logged(home: Path) -> dict[str, tuple[bool, int]]:
    """Per store: sealed or not, and how many complete chunk lines its log holds."""
    stores = [p for p in (home / "features").glob("*") if p.is_dir()]
    return {p.name: ((p / "meta.json").exists(), _lines(p / "chunks.log")) for p in stores}


def _lines(path: Path) -> int:
    return path.read_text(errors="replace").count("\n") if path.exists() else 0


def _logged_chunks(home: Path) -> int:
    return sum(lines for _, lines in _logged(home).values())


def _kill_when(proc: subprocess.Popen, home: Path, chunks: int, delay: float) -> bool:
    """SIGKILL ``proc`` once ``chunks`` chunks are logged (plus ``delay`` s); False when it finished first."""
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if (home / "features").is_dir() and _logged_chunks(home) >= chunks:
            time.sleep(delay)
            break
        time.sleep(0.001)
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_gives_identical_features(ctx):
    home, rng = ctx.tmp / "killed", random.Random(8)
    total = 20 + 10  # train 40 images and test 20 images, 2 rows a chunk
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed_midway = 0
    for target in (0, *sorted(rng.sample(range(1, total), 2))):
        proc = subprocess.Popen(
            [sys.executable, "-c", _EXTRACT, str(ctx.ckpt), str(ctx.data), str(home)], cwd=REPO, env=env
        )
        killed_midway += _kill_when(proc, home, target, rng.uniform(0, 0.01))
    assert killed_midway >= 2
    assert not read_records(home / "results.jsonl")  # every run was killed before its results
    before = _logged(home)
    assert any(not sealed and lines for sealed, lines in before.values()), "a kill left a half-done store"
    resumed = evaluate(_small_eval(ctx, home, chunk_rows=2, max_patches=8))
    fresh = evaluate(_small_eval(ctx, ctx.tmp / "fresh", chunk_rows=2, max_patches=8))
    assert _features_by_key(home) == _features_by_key(ctx.tmp / "fresh") and len(_features_by_key(home)) == 2
    assert resumed[0].row()["knn@20"] == fresh[0].row()["knn@20"]
    for key, (sealed, lines) in before.items():  # the resumed run computed exactly the chunks not yet done
        meta = json.loads((home / "features" / key / "meta.json").read_text())
        assert sealed or meta["extraction"]["images"] == meta["shape"][0] - 2 * lines


# ---------------------------------------------------------------- results store


def test_a_results_line_cut_by_a_crash_costs_only_itself(tmp_path):
    path = tmp_path / "results.jsonl"
    append_record(path, {"n": 1})
    with open(path, "a") as f:
        f.write('{"n": 2, "metr')  # killed mid-write
    append_record(path, {"n": 3})
    assert [r["n"] for r in read_records(path)] == [1, 3]
