import numpy as np
import pytest
from PIL import Image

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.data.datasets import first_per_class, open_split


def test_first_per_class_keeps_dataset_order():
    labels = np.array([2, 0, 2, 1, 0, 2, 0, 1, 2])
    by_hand = [i for i, y in enumerate(labels) if list(labels[:i]).count(y) < 2]
    assert first_per_class(labels, 2).tolist() == by_hand


def test_image_folder_tree_from_materialize(cifar_dir, tmp_path):
    train = open_split("cifar10", "train", data_dir=cifar_dir.parent, cache_dir=tmp_path / "images")
    assert len(train) == 200 and train.classes[0] == "airplane" and len(train.classes) == 10
    assert train.array is not None and train.array.shape == (200, 32, 32, 3)
    first = sorted((cifar_dir / "train" / "airplane").iterdir())[0]
    np.testing.assert_array_equal(train.image(0), np.asarray(Image.open(first).convert("RGB")))
    again = open_split("cifar10", "train", data_dir=cifar_dir, cache_dir=tmp_path / "images")
    np.testing.assert_array_equal(again.array, train.array)
    assert list((tmp_path / "images").glob("*.npy"))  # decoded once, cached


def test_test_split_and_per_class_subset(cifar_dir):
    test = open_split("cifar10", "test", data_dir=cifar_dir, per_class=3)
    assert len(test) == 30 and np.bincount(test.labels).tolist() == [3] * 10
    assert test.identity["per_class"] == 3 and test.identity["split"] == "test"


def test_large_or_uneven_images_stay_on_disk(tmp_path):
    for cls, size in (("a", (120, 100)), ("b", (130, 90))):
        for split in ("train", "val"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", size, color=(10, 20, 30)).save(tmp_path / split / cls / "x.png")
    split = open_split("folder", "test", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert split.array is None and split.image(1).shape == (90, 130, 3)


def test_digits_are_offline_32px_and_disjoint():
    train, test = open_split("digits", "train"), open_split("digits", "test")
    assert train.array.shape[1:] == (32, 32, 3) and len(train) + len(test) == 1797
    assert len(train.classes) == 10


@pytest.mark.parametrize(
    "name,data_dir,match",
    [
        ("cifra10", None, "did you mean: cifar10"),
        ("imagenet", None, "--data-dir"),
        ("cifar10", "/nonexistent", "--data-dir"),
    ],
)
def test_missing_or_unknown_data_is_a_user_error(name, data_dir, match):
    with pytest.raises(UserError, match=match):
        open_split(name, "train", data_dir=data_dir)


def test_a_folder_is_listed_as_pathlib_lists_it(tmp_path):
    """The listing (os.scandir) finds what ``Path.rglob`` + ``is_file`` finds: nested folders, upper-case
    suffixes and links to files count; folders that are links, broken links and other files do not; the store
    key's file hash is over the names relative to the split folder."""
    import hashlib
    import os

    from ssl_patchbench.data.datasets import IMAGE_SUFFIXES

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls / "deep" / "er").mkdir(parents=True)
            for name in ("x.jpg", "deep/y.PNG", "deep/er/z.jpeg", "notes.txt"):
                Image.new("RGB", (5, 4)).save(tmp_path / split / cls / name, format="PNG")
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (5, 4)).save(outside / "o.jpg")
    (tmp_path / "train" / "a" / "linked_dir").symlink_to(outside, target_is_directory=True)
    (tmp_path / "train" / "a" / "linked.jpg").symlink_to(outside / "o.jpg")
    (tmp_path / "train" / "a" / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    split = open_split("folder", "train", data_dir=tmp_path)
    folder = tmp_path / "train"
    expected = [
        str(p)
        for cls in ("a", "b")
        for p in sorted((folder / cls).rglob("*"), key=str)
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    ]
    assert split.paths == sorted(expected[:4]) + sorted(expected[4:]) and len(expected) == 7
    relative = "\n".join(os.path.relpath(p, folder) for p in expected)
    assert split.identity["files_sha256"] == hashlib.sha256(relative.encode()).hexdigest()
