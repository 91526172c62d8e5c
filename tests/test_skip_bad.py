"""Bad image files in a folder (issue 13): one `error:` line naming the file, or, with `--skip-bad-images`, left out
by a cheap check before the extraction, recorded in the results and the data identity; never a wrong label or a
half-written store. docs/reliability.md lists the cases."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.data.check import bad_files, file_problem
from ssl_patchbench.data.datasets import open_split
from ssl_patchbench.data.decode import MAX_PIXELS, decode
from ssl_patchbench.features.store import FeatureStore
from ssl_patchbench.results.schema import record_problem
from ssl_patchbench.results.store import read_records

from .clitools import run_cli
from .factories import assert_user_error
from .test_reliability import assert_nothing_half_done

# The broken files of the tree (relative to their split) and the problem the check names for each.
BAD = {
    "train": {"cat/cut.jpg": "truncated or corrupt", "dog/empty.png": "empty", "dog/notes.jpg": "not an image"},
    "test": {"dog/cut.jpg": "truncated or corrupt"},
}
GOOD = {"train": {"cat": 3, "dog": 3}, "test": {"cat": 2, "dog": 2}}


def _image(seed: int, height: int, width: int | None = None) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width or height, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def _tree(root: Path, *, side: int, bad: bool) -> Path:
    """Good JPEG and PNG files of two classes (``side`` px square when small, so the split is decoded into the
    cache; of different sizes from ``side`` px up when large, so it is decoded on the fly), and with ``bad`` the
    broken files of ``BAD`` beside them."""
    seed = 0
    for split, classes in GOOD.items():
        for cls, n in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                seed += 1
                image = _image(seed, side) if side <= 96 else _image(seed, side + 3 * seed, side + seed)
                if i % 2:
                    image.save(folder / f"{i}.png")
                else:
                    (folder / f"{i}.jpg").write_bytes(_jpeg(image))
        if bad:
            whole = _jpeg(_image(99, side))
            contents = {"cut.jpg": whole[: len(whole) * 2 // 3], "empty.png": b"", "notes.jpg": b"a text file\n"}
            for name in BAD[split]:
                (root / split / name).write_bytes(contents[Path(name).name])
    return root


@pytest.fixture
def eval_args(tiny_checkpoint):
    """``patchbench eval`` of the tiny model on a folder: the central view and one random patch, kNN only."""

    def build(data: Path, *extra: str) -> list[str]:
        return [
            "eval", "--model", "tiny_cifar", "--checkpoint", str(tiny_checkpoint), "--dataset", "folder",
            "--data-dir", str(data), "--patches", "central,1", "--eval", "knn", "--knn-k", "1,3", "--device", "cpu",
            "--json", *extra,
        ]  # fmt: skip

    return build


@pytest.fixture
def home() -> Path:
    return Path(os.environ["PATCHBENCH_HOME"])  # each test's own (conftest)


# ---------------------------------------------------------------- the check itself


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the bomb, seen by Pillow
def test_the_check_names_each_broken_file_and_passes_whole_ones(tmp_path):
    whole = _jpeg(_image(1, 40))
    sof = whole.index(b"\xff\xc0")
    bomb = bytearray(whole)
    bomb[sof + 5 : sof + 9] = (9000).to_bytes(2, "big") * 2  # a header claiming 9000x9000 px
    png = io.BytesIO()
    _image(2, 40).save(png, "PNG")
    files = {
        "whole.jpg": (whole, None),
        "padded.jpg": (whole + b"\x00" * 5000, None),  # zero padding after the end marker
        "trailer.jpg": (whole + b"camera metadata" * 100, None),  # bytes after the marker: it decodes, it is kept
        "png-named.jpg": (png.getvalue(), None),  # the content decides, not the name
        "no-iend.png": (png.getvalue()[:-12], None),  # only the end chunk missing: Pillow decodes it, so it is kept
        "cut.jpg": (whole[: len(whole) // 2], "truncated or corrupt"),
        "cut-header.jpg": (whole[:40], "truncated or corrupt"),
        "cut.png": (png.getvalue()[: len(png.getvalue()) // 2], "truncated or corrupt"),
        "empty.jpg": (b"", "empty"),
        "text.jpg": (b"not an image", "not an image"),
        "bomb.jpg": (bytes(bomb), "over the pixel limit"),
    }
    assert MAX_PIXELS < 9000 * 9000
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [str(tmp_path / name) for name in files] + [str(tmp_path / "missing.jpg")]
    expected = {i: problem for i, (_, problem) in enumerate(files.values()) if problem is not None}
    expected[len(files)] = "unreadable (No such file or directory)"
    assert bad_files(paths, workers=2) == bad_files(paths, workers=0) == expected
    for name, (data, problem) in files.items():  # what the check passes decodes, to Pillow's pixels
        if problem is None:
            assert np.array_equal(decode(str(tmp_path / name)), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize("side", [32, 100], ids=["small, decoded into the cache", "large, decoded on the fly"])
def test_skipping_drops_paths_and_labels_together_like_imagefolder_of_the_good_files(tmp_path, side):
    bad, good = _tree(tmp_path / "bad", side=side, bad=True), _tree(tmp_path / "good", side=side, bad=False)
    for split in ("train", "test"):
        opened = open_split("folder", split, data_dir=bad, cache_dir=tmp_path / "cache", skip_bad_images=True)
        reference = ImageFolder(str(good / split))
        assert opened.classes == reference.classes
        assert opened.labels.tolist() == reference.targets
        assert opened.skipped == BAD[split]
        assert opened.identity["skipped"] == sorted(BAD[split]) and opened.identity["n"] == len(reference)
        images = [np.asarray(Image.open(p).convert("RGB")) for p, _ in reference.samples]
        assert all(np.array_equal(opened.image(i), im) for i, im in enumerate(images))  # the same files, in order
        assert (opened.array is not None) == (side <= 96)
        if opened.paths is not None:
            relative = [os.path.relpath(p, good / split) for p, _ in reference.samples]
            assert [os.path.relpath(p, bad / split) for p in opened.paths] == relative
        plain = open_split("folder", split, data_dir=good, skip_bad_images=True)
        assert plain.skipped == {} and plain.identity == open_split("folder", split, data_dir=good).identity


def test_a_per_class_subset_takes_the_first_good_files(tmp_path):
    bad = _tree(tmp_path / "bad", side=100, bad=True)
    shutil.copy(bad / "train" / "cat" / "0.jpg", bad / "train" / "cat" / "00.jpg")  # sorts before 1.png
    (bad / "train" / "cat" / "0.jpg").write_bytes(b"")  # the first file of cat is now broken
    opened = open_split("folder", "train", data_dir=bad, per_class=2, skip_bad_images=True)
    names = [os.path.relpath(p, bad / "train") for p in opened.paths]
    assert names == ["cat/00.jpg", "cat/1.png", "dog/0.jpg", "dog/1.png"]
    assert opened.labels.tolist() == [0, 0, 1, 1]
    assert opened.skipped == {"cat/0.jpg": "empty", **BAD["train"]} and opened.identity["per_class"] == 2


def test_in_memory_datasets_are_unaffected():
    checked, plain = open_split("digits", "test", skip_bad_images=True), open_split("digits", "test")
    assert checked.skipped is None and checked.identity == plain.identity and len(checked) == len(plain)


def test_a_folder_with_no_decodable_image_is_one_error(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "x.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"train: none of its 1 image files can be decoded \(e\.g\. a/x\.jpg: empty\)"):
        open_split("folder", "train", data_dir=root, skip_bad_images=True)


# ---------------------------------------------------------------- through the command


@pytest.mark.parametrize("side", [32, 100], ids=["small", "large"])
def test_eval_skips_and_records_the_bad_files_and_matches_a_folder_without_them(
    capsys, monkeypatch, tmp_path, eval_args, home, side
):
    bad, good = _tree(tmp_path / "bad", side=side, bad=True), _tree(tmp_path / "good", side=side, bad=False)
    code, out, err = run_cli(capsys, monkeypatch, *eval_args(bad, "--skip-bad-images"))
    assert code == 0 and len(out.splitlines()) == 2, err  # the JSON rows of central and 1
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: train: left out 3 image files that cannot be decoded (--skip-bad-images): cat/cut.jpg (truncated "
        "or corrupt), dog/empty.png (empty), dog/notes.jpg (not an image)",
        "warning: test: left out 1 image file that cannot be decoded (--skip-bad-images): dog/cut.jpg (truncated or "
        "corrupt)",
    ]
    skipped = read_records(home / "results.jsonl")
    assert len(skipped) == 2 and all(r["skipped_images"] == BAD for r in skipped)
    assert all(record_problem(r) is None for r in skipped)
    for split in ("train", "test"):
        assert skipped[0]["data"][split]["skipped"] == sorted(BAD[split])
        stored = FeatureStore(home / "features", skipped[0]["feature_stores"][split]).load()
        assert stored.labels.tolist() == ImageFolder(str(good / split)).targets  # each row's label is its folder's

    code, _, err = run_cli(capsys, monkeypatch, *eval_args(good))
    assert code == 0, err
    plain = read_records(home / "results.jsonl")[2:]
    for with_bad, without in zip(skipped, plain, strict=True):
        assert with_bad["data"] != without["data"] and with_bad["feature_stores"] != without["feature_stores"]
        assert with_bad["metrics"] == without["metrics"]  # the same good images: the same numbers
        assert "skipped_images" not in without and not without["reused_features"]


def test_the_option_on_a_folder_without_bad_files_changes_nothing(capsys, monkeypatch, tmp_path, eval_args, home):
    good = _tree(tmp_path / "good", side=100, bad=False)
    assert run_cli(capsys, monkeypatch, *eval_args(good))[0] == 0
    code, _, err = run_cli(capsys, monkeypatch, *eval_args(good, "--skip-bad-images"))
    assert code == 0 and "warning:" not in err, err
    records = read_records(home / "results.jsonl")
    for first, second in zip(records[:2], records[2:], strict=True):  # the same stores, so the same numbers
        assert second["reused_features"] and second["feature_stores"] == first["feature_stores"]
        assert second["data"] == first["data"] and second["skipped_images"] == {"train": {}, "test": {}}


@pytest.mark.parametrize("side", [32, 100], ids=["small", "large"])
def test_without_the_option_a_bad_file_is_one_error_line_naming_it(
    capsys, monkeypatch, tmp_path, eval_args, home, side
):
    bad = _tree(tmp_path / "bad", side=side, bad=True)
    code, out, err = run_cli(capsys, monkeypatch, *eval_args(bad))
    assert_user_error(code, err, "or rerun with --skip-bad-images to leave out every file that cannot be decoded")
    assert out == ""
    named = [name for split, files in BAD.items() for name in files if str(bad / split / name) in err]
    assert len(named) == 1 and "error: cannot read image" in err, err
    assert_nothing_half_done(home)


def test_without_the_option_a_truncated_jpeg_ends_the_extraction_in_one_line(
    capsys, monkeypatch, tmp_path, eval_args, home
):
    bad = _tree(tmp_path / "bad", side=100, bad=True)
    for name in ("empty.png", "notes.jpg"):  # leave the truncated JPEGs: their headers read, their pixels do not
        (bad / "train" / "dog" / name).unlink()
    code, out, err = run_cli(capsys, monkeypatch, *eval_args(bad))
    assert_user_error(code, err, f"cannot read image {bad / 'train' / 'cat' / 'cut.jpg'}: image file is truncated")
    assert err.strip().endswith(
        "--skip-bad-images to leave out every file that cannot be decoded (each is named in the results)"
    )
    assert out == ""
    assert list(home.rglob("layout.json")), "the stores were laid out before the file was met"
    assert_nothing_half_done(home)


def test_a_file_that_passes_the_check_but_does_not_decode_is_one_error_line(
    capsys, monkeypatch, tmp_path, eval_args, home
):
    bad = _tree(tmp_path / "bad", side=100, bad=True)
    png = bad / "train" / "dog" / "1.png"
    data = bytearray(png.read_bytes())
    start = data.index(b"IDAT") + 20
    data[start : start + 8] = bytes(b ^ 0xFF for b in data[start : start + 8])  # damage inside; the end is whole
    png.write_bytes(bytes(data))
    assert file_problem(str(png)) is None
    code, out, err = run_cli(capsys, monkeypatch, *eval_args(bad, "--skip-bad-images"))
    assert_user_error(code, err, f"cannot read image {png}: broken data stream")
    assert out == ""
    assert "--skip-bad-images" not in err.splitlines()[-1]  # it was given: no advice to give it
    assert_nothing_half_done(home)


def test_records_without_the_field_stay_readable_and_a_malformed_one_is_refused():
    assert record_problem({"model": "m", "n_train": 3}) is None
    assert record_problem({"skipped_images": {"train": {"a.jpg": "empty"}, "test": {}}}) is None
    assert record_problem({"skipped_images": {"train": ["a.jpg"]}}) == (
        "field 'skipped_images.train' has type list, expected dict"
    )
    assert record_problem({"skipped_images": {"train": {"a.jpg": 3}}}) == (
        "field 'skipped_images.train.a.jpg' has type int, expected str"
    )
