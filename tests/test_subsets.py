"""--dataset imagenet100: the CMC class list selected from a full ImageNet tree, or a folder of exactly it."""

import numpy as np
import pytest
from PIL import Image

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.data.datasets import open_split
from ssl_patchbench.data.subsets import imagenet100_classes

from .clitools import run_cli


def _tree(root, classes, with_image):
    for split in ("train", "val"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            if with_image(cls):
                Image.new("RGB", (8, 8), (len(cls), 0, 0)).save(root / split / cls / "a.JPEG")
    return root


def test_the_list_is_cmcs_100_distinct_wordnet_ids():
    classes = imagenet100_classes()
    assert len(set(classes)) == 100 and all(len(c) == 9 and c[0] == "n" and c[1:].isdigit() for c in classes)
    assert {"n02869837", "n01749939", "n02090622"} <= set(classes)  # first, second and last of CMC's list


def test_a_full_imagenet_tree_gives_the_100_classes_and_so_does_a_folder_of_exactly_them(tmp_path):
    wanted = set(imagenet100_classes())
    others = [f"n{90000000 + i:08d}" for i in range(900)]
    full = _tree(tmp_path / "full", [*wanted, *others], lambda c: c in wanted or c == others[0])
    exact = _tree(tmp_path / "exact", wanted, lambda c: True)
    for split in ("train", "test"):
        a = open_split("imagenet100", split, data_dir=full)
        b = open_split("imagenet100", split, data_dir=exact)
        assert a.classes == b.classes == sorted(wanted) and len(a) == len(b) == 100
        np.testing.assert_array_equal(a.labels, np.arange(100))  # the extra class's image is not read
        assert [p.split("/")[-2] for p in a.paths] == a.classes
        assert a.identity["classes"] == b.identity["classes"]


def test_a_folder_missing_classes_is_one_error_naming_them(tmp_path, capsys, monkeypatch, tiny_checkpoint):
    wanted = sorted(imagenet100_classes())
    root = _tree(tmp_path / "partial", wanted[3:], lambda c: True)
    with pytest.raises(UserError, match=f"lacks 3 of the 100 ImageNet-100 classes \\({', '.join(wanted[:3])}\\)"):
        open_split("imagenet100", "train", data_dir=root)
    code, _, err = run_cli(
        capsys,
        monkeypatch,
        "eval",
        "--model",
        "tiny_cifar",
        "--dataset",
        "imagenet100",
        "--data-dir",
        str(root),
        "--checkpoint",
        str(tiny_checkpoint),
    )
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and "lacks 3 of the 100" in err


def test_extra_classes_that_are_not_a_full_imagenet_are_refused(tmp_path):
    root = _tree(tmp_path / "extra", [*imagenet100_classes(), "cats"], lambda c: True)
    with pytest.raises(UserError, match=r"1 classes outside ImageNet-100 \(e\.g\. cats\)"):
        open_split("imagenet100", "train", data_dir=root)
