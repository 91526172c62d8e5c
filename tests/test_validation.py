"""No silent wrong numbers (issue 16): what goes in is validated, what cannot be trusted is refused.

Each case ends with exit 0 and the right numbers, or one ``error:`` line and exit 2 with nothing recorded.
docs/reliability.md lists the same cases.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from PIL import Image

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.core.yamlfile import MAX_YAML_BYTES, read_yaml
from ssl_patchbench.data import decode as D
from ssl_patchbench.data.datasets import open_split
from ssl_patchbench.evaluators.inputs import check_usable_features
from ssl_patchbench.features.extract import padding_groups
from ssl_patchbench.features.store import check_storable
from ssl_patchbench.models import registry
from ssl_patchbench.models.encoder import Encoder
from ssl_patchbench.models.loading import _find_state_dict
from ssl_patchbench.pipeline.evaluate import EvalConfig, evaluate
from ssl_patchbench.reporting import tables as T
from ssl_patchbench.reporting.check import _compare, load_baselines, results_baseline
from ssl_patchbench.results.records import comparable
from ssl_patchbench.results.store import append_record, read_records

from .clitools import run_cli
from .factories import DATA, assert_user_error, record


def _png(path: Path, pixels: np.ndarray | None = None, *, size: tuple[int, int] | None = None) -> Path:
    """A 16-bit PNG written by hand (Pillow writes no 16-bit colour): ``pixels`` uint16 [H, W] or [H, W, 3]; or
    only a header claiming ``size`` (width, height), as a decompression bomb does."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if pixels is None:
        (width, height), colour, rows = size, 0, b""  # type: ignore[misc]
    else:
        height, width = pixels.shape[:2]
        colour = 0 if pixels.ndim == 2 else 2
        rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


# ---------------------------------------------------------------- decoding


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = _png(tmp_path / "bomb.png", size=(100_000, 100_000))
    for read in (D.decode, D.image_size):
        with pytest.raises(UserError, match="decompression bomb"):
            read(str(bomb))
    side = int(D.MAX_PIXELS**0.5)
    assert side * side <= D.MAX_PIXELS < (side + 1) * (side + 1)  # one limit: 8192 x 8192


def test_16_bit_grey_decodes_like_pillow_decodes_16_bit_colour(tmp_path):
    grey = np.random.default_rng(0).integers(0, 65536, (6, 7)).astype(np.uint16)
    decoded = D.decode(str(_png(tmp_path / "grey.png", grey)))
    colour = D.decode(str(_png(tmp_path / "rgb.png", np.repeat(grey[..., None], 3, axis=-1))))  # Pillow's mapping
    np.testing.assert_array_equal(decoded, colour)
    np.testing.assert_array_equal(decoded[..., 0], grey // 256)  # the high byte: 65535 -> 255, never clipped white


def test_float_images_in_0_1_are_scaled_and_others_refused(tmp_path):
    values = np.random.default_rng(1).random((5, 4)).astype(np.float32)
    Image.fromarray(values).save(tmp_path / "unit.tif")
    np.testing.assert_array_equal(D.decode(str(tmp_path / "unit.tif"))[..., 1], np.round(values * 255))
    Image.fromarray(values * 1000).save(tmp_path / "big.tif")
    with pytest.raises(UserError, match="outside \\[0, 1\\]"):
        D.decode(str(tmp_path / "big.tif"))
    Image.fromarray((values * 1e6).astype(np.int32)).save(tmp_path / "int.tif")
    with pytest.raises(UserError, match="holds signed or 32-bit integers"):
        D.decode(str(tmp_path / "int.tif"))


def _tree(root: Path, classes: dict[str, dict[str, int]]) -> Path:
    """``{split: {class: n_images}}`` of 8x8 images whose red value is the class's index in sorted order."""
    for split, counts in classes.items():
        for cls, n in counts.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (sorted(counts).index(cls) * 20, i, 0)).save(root / split / cls / f"{i}.png")
    return root


def test_a_file_name_of_any_bytes_is_listed_hashed_and_named(tmp_path):
    root = _tree(tmp_path / "d", {"train": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}})
    odd = os.fsdecode(bytes(root / "train" / "a") + b"/\xff\xfe.png")
    Image.new("RGB", (8, 8)).save(odd, format="PNG")
    split = open_split("folder", "train", data_dir=root)
    assert len(split) == 3 and json.dumps(split.identity)
    Path(odd).write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"cannot read image .*\\xff\\xfe\.png") as caught:
        split.image(split.paths.index(odd))
    str(caught.value).encode("utf-8")  # printable: no lone surrogates


def test_classes_are_matched_by_name_across_splits(tmp_path, caplog):
    lacking = _tree(tmp_path / "lacking", {"train": {"a": 2, "b": 2, "c": 2}, "test": {"b": 1, "c": 1}})
    with pytest.raises(UserError, match=r"class 'a' has images in .*train but none in .*test"):
        open_split("folder", "test", data_dir=lacking)
    empty = _tree(tmp_path / "empty", {"train": {"b": 2, "c": 2}, "test": {"b": 1, "c": 1}})
    (empty / "train" / "a").mkdir()  # sorts first: it used to shift every train label by one
    with caplog.at_level(logging.WARNING):
        train, test = open_split("folder", "train", data_dir=empty), open_split("folder", "test", data_dir=empty)
    assert "without images are ignored: a" in caplog.text
    assert train.classes == test.classes == ["b", "c"]
    for split in (train, test):  # each image's label names the folder it came from
        assert [split.classes[y] for y in split.labels] == [Path(p).parent.name for p in split.paths]


def test_one_large_image_among_small_ones_is_never_held_at_the_large_size(tmp_path):
    root = _tree(tmp_path / "d", {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}})
    Image.new("RGB", (400, 300)).save(root / "train" / "a" / "9.png")
    split = open_split("folder", "train", data_dir=root, cache_dir=tmp_path / "cache")
    assert split.array is None and not list((tmp_path / "cache").glob("*.npy"))  # lazy files, no cache written
    large = (root / "train" / "a" / "9.png").read_bytes()
    (root / "train" / "a" / "9.png").write_bytes(large[: len(large) // 2])  # its header whole, its pixels not
    again = open_split("folder", "train", data_dir=root, cache_dir=tmp_path / "cache")  # from its header only:
    assert again.array is None  # had it been decoded, its truncated pixels would have been an error
    with pytest.raises(UserError, match=r"cannot read image .*9\.png"):
        again.image(again.paths.index(str(root / "train" / "a" / "9.png")))
    sizes = np.array([[8, 8], [8, 8], [300, 400], [8, 8], [8, 8]])
    assert padding_groups(sizes, max_bytes=8 * 8 * 3 * 2) == [(0, 2), (2, 3), (3, 5)]  # the large one alone
    assert padding_groups(sizes, max_bytes=1 << 40, max_ratio=1.0) == [(0, 2), (2, 3), (3, 5)]  # no padding at all
    for lo, hi in padding_groups(sizes, max_bytes=1 << 40):  # padded to the photo: at most 4x the own pixels
        assert (hi - lo) * sizes[lo:hi].max(axis=0).prod() <= 4 * sizes[lo:hi].prod(axis=1).sum()
    assert padding_groups(sizes, max_bytes=1 << 40) == [(0, 4), (4, 5)]
    assert padding_groups(sizes, max_bytes=1 << 40, max_ratio=float("inf")) == [(0, 5)]
    mixed = np.array([[375, 500], [500, 375], [333, 500], [500, 400]])  # ImageNet's usual shapes: 1.4x padding
    assert padding_groups(mixed, max_bytes=1 << 40) == [(0, 4)]


# ---------------------------------------------------------------- what the model returns


def test_rows_float16_cannot_hold_are_refused_before_the_cast():
    healthy = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    check_storable(healthy, np.dtype("float16"), "x")
    for rows, message in (
        (healthy * 1e-9, "too small for float16.*--store-dtype float32"),
        (healthy * 1e6, "beyond float16's range.*--store-dtype float32"),
        (np.where(healthy > 1, np.nan, healthy), "non-finite"),
    ):
        with pytest.raises(UserError, match=message):
            check_storable(rows, np.dtype("float16"), "train features of representation 1 (mean)")
    check_storable(healthy * 1e-9, np.dtype("float32"), "x")  # float32 holds them


def test_collapsed_or_empty_features_are_refused():
    healthy = torch.randn(5, 8)
    check_usable_features(healthy, "x")
    for features, message in (
        (torch.zeros(5, 8), "all zero"),
        (healthy[:1].expand(5, 8), "the same for every image"),
        (healthy.masked_fill(healthy > 1, float("inf")), "NaN or inf"),
    ):
        with pytest.raises(UserError, match=message):
            check_usable_features(features, "test features of representation central (mean)")


def test_features_that_underflow_float16_are_refused_then_right_in_float32(capsys, monkeypatch, ctx):
    args = ("eval", *DATA, *ctx.tiny(), "--patches", "central", "--home", str(ctx.tmp / "h"))
    code, out, err = run_cli(capsys, monkeypatch, *args, "--store-dtype", "float32")
    assert code == 0, err
    reference = json.loads(out)
    forward = Encoder.forward
    monkeypatch.setattr(Encoder, "forward", lambda self, pixels: forward(self, pixels) * 1e-9)
    code, out, err = run_cli(capsys, monkeypatch, *args)
    assert_user_error(code, err, "too small for float16")
    assert "--store-dtype float32" in err and len(read_records(ctx.tmp / "h" / "results.jsonl")) == 1
    code, out, err = run_cli(capsys, monkeypatch, *args, "--store-dtype", "float32")
    assert code == 0, err
    scaled = json.loads(out)  # kNN votes on cosine similarity: scaling every feature changes nothing
    assert (scaled["knn@20"], scaled["knn@200"]) == (reference["knn@20"], reference["knn@200"])


# ---------------------------------------------------------------- zoo files and checkpoints


def test_zoo_yaml_alias_bombs_and_oversized_files_are_refused(tmp_path):
    bomb = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        bomb += f"{level}: &{level} [" + ",".join([f"*{previous}"] * 9) + "]\n"
    (tmp_path / "bomb.yaml").write_text(bomb)
    assert len(bomb) < 600
    with pytest.raises(UserError, match="alias bomb"):
        read_yaml(tmp_path / "bomb.yaml", "zoo file ")
    (tmp_path / "loop.yaml").write_text("a: &a [1, *a]\n")
    with pytest.raises(UserError, match="refers to a node that contains it"):
        read_yaml(tmp_path / "loop.yaml")
    (tmp_path / "big.yaml").write_text("#" * (MAX_YAML_BYTES + 1))
    with pytest.raises(UserError, match="more than the"):
        read_yaml(tmp_path / "big.yaml")
    (tmp_path / "ok.yaml").write_text("a: &x [1]\nb: *x\n")  # a few aliases, as the packaged zoo uses, are fine
    assert read_yaml(tmp_path / "ok.yaml") == {"a": [1], "b": [1]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"preprocessing": {"input_size": 1_000_000, "mean": [0.5] * 3, "std": [0.2] * 3, "resize": None}},
            "'preprocessing.input_size'",
        ),
        (
            {"preprocessing": {"input_size": 32, "mean": [127] * 3, "std": [0.2] * 3, "resize": None}},
            "'preprocessing.mean'",
        ),
        ({"pretrain_ratio": [0.75, float("inf")]}, "'pretrain_ratio\\[1\\]': expected a finite number"),
        ({"references": {"cifar10/linear/central": 250}}, "'references': expected accuracies"),
        ({"projector": [10**9]}, "'projector'"),
    ],
)
def test_zoo_numbers_are_range_checked(tmp_path, monkeypatch, change, message):
    entry = json.loads(json.dumps(registry.get_entry("tiny_cifar").to_dict()))
    entry.update({"name": "mine", **change})
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump({"models": [entry]}))
    monkeypatch.setenv("PATCHBENCH_ZOO", str(tmp_path / "zoo.yaml"))
    with pytest.raises(UserError, match=message):
        registry.get_entry("mine")


def test_integer_weights_and_odd_state_dicts_are_refused(capsys, monkeypatch, ctx):
    state = torch.load(ctx.ckpt, weights_only=True)["state_dict"]
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    quantized = {k: v.to(torch.int8) if v.is_floating_point() else v for k, v in backbone.items()}
    path = ctx.tmp / "int8.safetensors"
    safetensors.torch.save_file({k.removeprefix("backbone."): v for k, v in quantized.items()}, str(path))
    monkeypatch.setenv("PATCHBENCH_ZOO", str(ctx.file("zoo.yaml", _entry_without_containers())))
    code, _, err = run_cli(capsys, monkeypatch, "eval", *DATA, "--model", "mine", "--checkpoint", str(path),
                           "--data-dir", str(ctx.data))  # fmt: skip
    assert_user_error(code, err, "holds torch.int8 values where the model has float weights")
    with pytest.raises(UserError, match="key 3 \\(of type int\\) is not a parameter name"):
        _find_state_dict({3: torch.zeros(1), "a": torch.zeros(1)}, (), Path("x.ckpt"))


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch deprecates quantized tensors
def test_quantized_tensors_load_only_when_the_entry_says_so():
    packed = torch.quantize_per_tensor(torch.randn(3, 4), 0.05, 0, torch.qint8)
    with pytest.raises(UserError, match="set quantized: true"):
        _find_state_dict({"w": packed}, (), Path("q.ckpt"))
    loaded = _find_state_dict({"w": packed}, (), Path("q.ckpt"), quantized=True)["w"]
    assert loaded.dtype == torch.float32 and torch.equal(loaded, packed.int_repr().float() * 0.05)


def _entry_without_containers() -> bytes:
    entry = json.loads(json.dumps(registry.get_entry("tiny_cifar").to_dict()))
    entry.update(name="mine", weights={"allow_missing": list(entry["weights"]["allow_missing"])})
    return yaml.safe_dump({"models": [entry]}).encode()


# ---------------------------------------------------------------- results, tables and check


def test_results_lines_of_wrong_types_are_skipped_by_every_reader(capsys, monkeypatch, tmp_path, caplog):
    path = tmp_path / "r.jsonl"
    append_record(path, record())
    for bad in ({"n_train": "40"}, {"metrics": "high"}, {"metrics": {"linear": {"top1": "x"}}}, {"patches": 3}):
        append_record(path, record(**bad))
    with caplog.at_level(logging.WARNING):
        assert read_records(path) == [json.loads(path.read_text().splitlines()[0])]
    assert f"{path}:2 skipped: field 'n_train' has type str, expected int" in caplog.text
    assert f"{path}:3 skipped" in caplog.text and f"{path}:5 skipped" in caplog.text
    for args in (("results",), ("table", "table1"), ("viz", "scales", "--out", str(tmp_path / "o")), ("report",)):
        code, _, err = run_cli(capsys, monkeypatch, *args, "--results", str(path), *_report_out(args, tmp_path))
        assert code in (0, 2) and "Traceback" not in err, (args, err)
        assert code == 0 or len(err.strip().splitlines()) == 1, (args, err)


def _report_out(args: tuple, tmp_path: Path) -> tuple[str, ...]:
    return ("--out", str(tmp_path / "r.html")) if args == ("report",) else ()


def test_table_specs_and_bindings_are_checked_field_by_field(tmp_path):
    good = {"id": "t", "select": {"metric": "linear"}, "columns": [{"label": "c"}], "rows": [{"label": "r"}]}
    for change, message in (
        ({"columns": None}, "'columns': expected a non-empty list"),
        ({"rows": [{"label": "r", "paper": ["high"]}]}, "needs 1 paper numbers"),
        ({"rows": ["r"]}, "rows 1: expected a mapping"),
        ({"select": [1]}, "'select': expected a mapping"),
    ):
        (tmp_path / "t.yaml").write_text(yaml.safe_dump({"tables": [{**good, **change}]}))
        with pytest.raises(UserError, match=message):
            T.load_tables([tmp_path / "t.yaml"])
    specs, _ = T.load_tables()
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"table5/VICReg": 3}))
    with pytest.raises(UserError, match="expected MODEL@CHECKPOINT"):
        T.load_bindings(tmp_path / "b.yaml", specs)
    (tmp_path / "b.yaml").write_text("- a\n")
    with pytest.raises(UserError, match="expected a mapping"):
        T.load_bindings(tmp_path / "b.yaml", specs)


def test_check_refuses_another_model_or_protocol_and_notes_subsets_in_one_sentence(tmp_path):
    path = tmp_path / "base.jsonl"
    append_record(path, record(model="resnet18_cifar"))
    with pytest.raises(UserError, match="holds cifar10 results of model resnet18_cifar, not tiny_cifar"):
        load_baselines(str(path), (), model="tiny_cifar", dataset="cifar10")
    with pytest.raises(UserError, match="holds no stl10 results \\(it holds: cifar10\\)"):
        results_baseline(path, dataset="stl10")
    expectation = results_baseline(path, dataset="cifar10", model="resnet18_cifar")[0]
    hotter = record()
    hotter["protocol"] = {**hotter["protocol"], "knn": {**hotter["protocol"]["knn"], "temperature": 0.5}}
    with pytest.raises(UserError, match=r"another experiment: kNN temperature 0\.07, this run 0\.5;"):
        _compare(hotter, 50.0, expectation, 0.2)
    smaller = record(n_train=20, n_test=10, seed=3)
    smaller["data"] = {s: {**d, "n": d["n"] // 10, "per_class": 2} for s, d in smaller["data"].items()}
    (note,) = _compare(smaller, 50.0, expectation, 0.2).notes
    assert note == (
        "the baseline differs from this run in its images (200 train / 100 test, this run 20 / 10) and patch seed "
        "(0, this run 3): the numbers are not strictly comparable, but this alone does not fail the check"
    )


def test_a_baseline_of_the_unconverged_probe_is_refused_and_left_out_of_tables(ctx):
    """Records made before 2026-12-04 probed at tolerance 1e-3 (up to 0.19 points from the converged number) and
    carry only the probe's old description: a check refuses them as a baseline, a table leaves them out."""
    home = ctx.tmp / "home"
    evaluate(EvalConfig(
        model="tiny_cifar", checkpoint=str(ctx.ckpt), dataset="cifar10", data_dir=str(ctx.data), home=home,
        patches=("central",), evals=("linear",), train_per_class=4, test_per_class=2, device="cpu",
    ))  # fmt: skip
    (new,) = read_records(home / "results.jsonl")
    old = json.loads(json.dumps(new))
    old["protocol"]["linear"] = {
        "kind": "cached-feature multinomial logistic regression (L-BFGS), wd chosen on 10% of train"
    }
    append_record(ctx.tmp / "old.jsonl", old)
    (expectation,) = results_baseline(ctx.tmp / "old.jsonl", dataset="cifar10", model="tiny_cifar")
    with pytest.raises(UserError, match=r"another experiment: linear probe kind cached-feature .*\(L-BFGS\)"):
        _compare(new, new["metrics"]["linear"]["top1"], expectation, 0.2)
    shared = comparable([new, new, old], ["protocol"])
    assert shared.kept == [new, new] and shared.left_out == [old]
    assert shared.notes == ["1 record left out: another protocol (protocol.linear.kind), unlike the rest"]


def test_check_options_are_refused_before_anything_is_evaluated(capsys, monkeypatch, ctx):
    results = ctx.tmp / "r.jsonl"
    base = ctx.tmp / "base.jsonl"
    append_record(base, record(model="tiny_cifar"))
    common = ("check", *DATA, *ctx.tiny(), "--results", str(results), "--baseline", str(base))
    for extra, message in (
        (("--tolerance", "-1"), "'--tolerance': -1.0 is not in the range x>=0.0"),
        (("--tolerance", "nan"), "'--tolerance': 'nan' is not a finite number"),
        (("--report-dir", str(ctx.file("f", b"x") / "reports")), "is a file, not a folder"),
        (("--temperature", "nan"), "'--temperature': 'nan' is not a finite number"),
        (("--aggregate", ""), "--aggregate is empty"),
    ):
        code, _, err = run_cli(capsys, monkeypatch, *common, *extra)
        assert_user_error(code, err, message)
        assert not results.exists()  # nothing was evaluated


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--lr", "-1"), "'--lr': -1.0 is not in the range x>0.0"),
        (("--method", "tcr", "--tcr-eps", "0"), "'--tcr-eps': 0.0 is not in the range x>0.0"),
        (("--batch-size", "1"), "'--batch-size': 1 is not in the range x>=2"),
    ],
)
def test_pretrain_numbers_are_refused_at_the_boundary(capsys, monkeypatch, tmp_path, args, message):
    code, _, err = run_cli(capsys, monkeypatch, "pretrain", "--dataset", "digits", "--out", str(tmp_path / "o"), *args)
    assert_user_error(code, err, message)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_output_folders_below_a_file_are_one_line(capsys, monkeypatch, tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    for args in (
        ("pretrain", "--dataset", "digits", "--out", str(blocker / "run")),
        ("converge", "--model", "tiny_cifar", "--dataset", "digits", "--out", str(blocker / "o")),
        ("viz", "scales", "--out", str(blocker / "o")),
        ("report", "--out", str(blocker / "r.html")),
    ):
        code, _, err = run_cli(capsys, monkeypatch, *args)
        assert_user_error(code, err, f"{blocker} is a file, not a folder")
