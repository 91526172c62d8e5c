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
