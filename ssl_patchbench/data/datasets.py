"""Datasets as uint8 images with labels: torchvision built-ins, ImageFolder trees, scikit-learn digits.

A split is either held in memory as one ``[N, H, W, 3]`` uint8 array (small datasets; ImageFolder trees
of small images are decoded once and cached) or read lazily from files (large ones). Both give the
extractor the same thing: images by index, labels, class names, and an identity to hash into store keys.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ssl_patchbench.core.devices import available_cores
from ssl_patchbench.core.errors import UserError, did_you_mean
from ssl_patchbench.core.files import atomic_path, canonical_digest
from ssl_patchbench.core.paths import home
from ssl_patchbench.core.shares import submit_shares
from ssl_patchbench.data.batches import process_batches
from ssl_patchbench.data.check import bad_files
from ssl_patchbench.data.decode import OtherSize, decode, image_size, shown
from ssl_patchbench.data.subsets import folder_classes

log = logging.getLogger(__name__)

TORCHVISION_DATASETS = ("cifar10", "cifar100", "stl10")
FOLDER_DATASETS = ("imagenet", "imagenet100", "imagenette", "folder")
DATASETS = (*TORCHVISION_DATASETS, "digits", *FOLDER_DATASETS)
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
_DECODE_CACHE_MAX_SIDE = 96  # ImageFolder trees of images this small are decoded once into an array
_DECODE_CACHE_MAX_BYTES = 8 << 30
_DECODE_BATCH = 1024  # images per batch a decoding process hands back


@dataclass
class ImageSplit:
    """One split of a dataset: images by index, labels, class names and an identity for store keys.

    Exactly one of ``array`` (``[N, H, W, 3]`` uint8) and ``paths`` is set. ``skipped`` maps the files that
    ``--skip-bad-images`` left out (relative to the split's folder) to their problem; None when not checked.
    """

    labels: np.ndarray
    classes: list[str]
    identity: dict
    array: np.ndarray | None = None
    paths: list[str] | None = field(default=None, repr=False)
    skipped: dict[str, str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> np.ndarray:
        """Image ``index`` as ``[H, W, 3]`` uint8."""
        if self.array is not None:
            return self.array[index]
        return decode(self.paths[index])  # type: ignore[index]

    def sizes(self, indices: np.ndarray) -> np.ndarray:
        """``[B, 2]`` (height, width) of images ``indices``, from the arrays or the file headers (not decoded)."""
        if self.array is not None:
            return np.tile(self.array.shape[1:3], (len(indices), 1))
        paths = [self.paths[i] for i in indices]  # type: ignore[index]
        threads = min(8, available_cores())  # header reads wait on the disk when it is cold
        with ThreadPoolExecutor(max_workers=threads) as pool:
            found = [size for share in submit_shares(pool, _image_sizes, paths, threads) for size in share.result()]
        return np.array(found, dtype=np.int64).reshape(-1, 2)

    def subset(self, per_class: int | None) -> ImageSplit:
        """Keep the first ``per_class`` images of each class, in dataset order."""
        if per_class is None:
            return self
        if per_class <= 0:
            raise UserError(f"images per class must be positive, got {per_class}")
        keep = first_per_class(self.labels, per_class)
        return ImageSplit(
            labels=self.labels[keep],
            classes=self.classes,
            identity={**self.identity, "per_class": per_class, "n": len(keep)},
            array=None if self.array is None else self.array[keep],
            paths=None if self.paths is None else [self.paths[i] for i in keep],
            skipped=self.skipped,
        )


def _image_sizes(paths: list[str]) -> list[tuple[int, int]]:
    return [image_size(path) for path in paths]


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` rows of each label, in their original order."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(labels)) - starts
    return np.sort(order[rank < per_class])


def open_split(
    name: str,
    split: str,
    *,
    data_dir: str | Path | None = None,
    per_class: int | None = None,
    cache_dir: Path | None = None,
    download: bool = False,
    skip_bad_images: bool = False,
) -> ImageSplit:
    """Open ``split`` of dataset ``name``, from ``data_dir`` when given.

    An ImageFolder tree (``DIR/train/<class>/*``, ``DIR/test/<class>/*`` or ``DIR/val/...``, also under
    ``DIR/<name>/``) wins over a torchvision copy; ``digits`` is scikit-learn's, offline, for the demo.
    ``skip_bad_images`` leaves out the files of an ImageFolder split that fail :mod:`ssl_patchbench.data.check`
    (before the per-class subset is taken); in-memory datasets have no files to check.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: choose train or test")
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; known: {', '.join(DATASETS)}")
    root = _folder_root(name, data_dir)
    if root is not None:
        opened = open_image_folder(root, split, name=name, cache_dir=cache_dir, skip_bad_images=skip_bad_images)
    elif name == "digits":
        opened = digits_split(split)
    elif name in TORCHVISION_DATASETS:
        root = Path(data_dir).expanduser() if data_dir else home() / "datasets"
        opened = _torchvision_split(name, split, root, download)
    else:
        where = f"in {data_dir}" if data_dir else "(no --data-dir given)"
        raise UserError(
            f"no ImageFolder tree for {name} {where}: pass --data-dir DIR holding DIR/train/<class>/* "
            "and DIR/test/<class>/* (or DIR/val/)"
        )
    return opened.subset(per_class)


def _folder_root(name: str, data_dir: str | Path | None) -> Path | None:
    if data_dir is None:
        return None
    base = Path(data_dir).expanduser()
    for root in (base, base / name):
        if (root / "train").is_dir():
            return root
    return None


def _split_names(split: str) -> tuple[str, ...]:
    return ("train",) if split == "train" else ("test", "val")


def _has_split(root: Path, split: str) -> bool:
    return any((root / candidate).is_dir() for candidate in _split_names(split))


def _split_dir(root: Path, split: str) -> Path:
    names = _split_names(split)
    for candidate in names:
        if (root / candidate).is_dir():
            return root / candidate
    raise UserError(f"{shown(root)} has no {' or '.join(names)}/ folder for the {split} split")


def open_image_folder(
    root: Path, split: str, *, name: str, cache_dir: Path | None, skip_bad_images: bool = False
) -> ImageSplit:
    """An ImageFolder split; small images are decoded once into a cached array.

    Labels are indices into the sorted names of the classes that hold images, and both splits must name the same
    classes, so a class folder missing from one split never shifts the labels of the other. A class folder
    without images is ignored with a warning. ``skip_bad_images``: see :func:`without_bad_files`.
    """
    folder = _split_dir(root, split)
    by_class = _class_images(folder, folder_classes(folder, name))
    if not by_class:
        raise UserError(f"{shown(folder)} holds no class folders (expected {shown(folder)}/<class>/<image>)")
    empty = sorted(c for c, files in by_class.items() if not files)
    if empty:
        log.warning("%s: class folders without images are ignored: %s", shown(folder), ", ".join(map(shown, empty)))
    classes = sorted(c for c, files in by_class.items() if files)
    if not classes:
        raise UserError(f"{shown(folder)} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    other = "test" if split == "train" else "train"
    if _has_split(root, other):  # pretraining may read a tree that holds a train split only
        other_folder = _split_dir(root, other)
        other_classes = _classes_with_images(other_folder, folder_classes(other_folder, name))
        _check_same_classes(folder, set(classes), other_folder, other_classes)
    paths = [path for cls in classes for path in by_class[cls]]
    labels = [label for label, cls in enumerate(classes) for _ in by_class[cls]]
    prefix = len(str(folder)) + 1  # every path is folder/...: its name relative to the folder, without relpath
    relative = "\n".join(p[prefix:] for p in paths)
    listing = hashlib.sha256(os.fsencode(relative)).hexdigest()  # names of any bytes (undecodable ones included)
    identity = {
        "dataset": name,
        "split": split,
        "source": "imagefolder",
        "root": shown(folder.resolve()),
        "classes": [shown(c) for c in classes],
        "n": len(paths),
        "files_sha256": listing,
    }
    opened = ImageSplit(labels=np.asarray(labels, dtype=np.int64), classes=classes, identity=identity, paths=paths)
    if skip_bad_images:
        opened = without_bad_files(opened, folder)
    return _decoded(opened, cache_dir) if cache_dir is not None else opened


def without_bad_files(split: ImageSplit, folder: Path) -> ImageSplit:
    """``split`` without the files that fail the check (``--skip-bad-images``), paths and labels alike (the class
    names stay, so no label shifts). The sorted names of the files left out join the identity, so stores and
    records of the split with other files (or none) left out are never mixed."""
    paths = split.paths or []
    bad = bad_files(paths)
    names = {i: shown(os.path.relpath(paths[i], folder)) for i in bad}
    skipped = {names[i]: bad[i] for i in sorted(bad, key=names.__getitem__)}
    if not bad:
        return replace(split, skipped=skipped)
    if len(bad) == len(paths):
        name, problem = next(iter(skipped.items()))
        raise UserError(
            f"{shown(folder)}: none of its {len(paths):,} image files can be decoded (e.g. {name}: {problem}): "
            "check that --data-dir names the right folder"
        )
    keep = np.array([i for i in range(len(paths)) if i not in bad], dtype=np.int64)
    return ImageSplit(
        labels=split.labels[keep],
        classes=split.classes,
        identity={**split.identity, "n": len(keep), "skipped": list(skipped)},
        paths=[paths[i] for i in keep],
        skipped=skipped,
    )


def _image_files(directory: str) -> Iterator[str]:
    """The image files under ``directory``, searched recursively as ``Path.rglob`` does (folders that are symbolic
    links are not entered; links to files count): with ``os.scandir``, whose entries know their type without a
    ``stat`` per file (listing ImageNet's 1.28M files is a cost every run pays)."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from _image_files(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
                yield entry.path


def _class_images(folder: Path, classes: list[str]) -> dict[str, list[str]]:
    """Class folder name -> its image files (sorted, searched recursively)."""
    return {cls: sorted(_image_files(str(folder / cls))) for cls in classes}


def _classes_with_images(folder: Path, classes: list[str]) -> set[str]:
    """The ``classes`` of ``folder`` that hold at least one image (each search stops at the first)."""
    return {c for c in classes if next(_image_files(str(folder / c)), None) is not None}


def _check_same_classes(folder: Path, names: set[str], other: Path, other_names: set[str]) -> None:
    """Refuse splits whose classes differ: a class with images in one split only is named."""
    for here, there, only in ((folder, other, names - other_names), (other, folder, other_names - names)):
        if only:
            listed = ", ".join(repr(shown(c)) for c in sorted(only)[:5]) + (" ..." if len(only) > 5 else "")
            raise UserError(
                f"class {listed} has images in {shown(here)} but none in {shown(there)}: both splits must hold "
                "the same classes (add the images or remove the class folder)"
            )


def _decoded(split: ImageSplit, cache_dir: Path) -> ImageSplit:
    """Swap lazy files for one decoded array when every image is small and of one size (cached on disk).

    Images are decoded straight into an array of the first image's size; the first image of another size ends it
    (the split stays lazy), so one large image among small ones never makes an array at its size.
    """
    h, w = image_size(split.paths[0])  # type: ignore[index]
    if max(h, w) > _DECODE_CACHE_MAX_SIDE or len(split) * h * w * 3 > _DECODE_CACHE_MAX_BYTES:
        return split
    path = cache_dir / f"{canonical_digest(split.identity)}.npy"
    cached = _load_cached(path, (len(split), h, w, 3))
    if cached is not None:
        return replace(split, array=cached, paths=None)
    # each batch one piece: one process decodes it and hands it back whole (pieces of a few images cost more to
    # pass between processes than to decode, at these sizes)
    ranges = _ranges(len(split), _DECODE_BATCH)
    batches = process_batches(split.paths or [], ranges, size=(h, w), piece=_DECODE_BATCH)
    try:  # a process reads each image's header before decoding it: one of another size is never decoded here
        array = np.concatenate([pixels.numpy() for pixels, _ in batches])
    except OtherSize:
        return split
    with atomic_path(path) as tmp:
        np.save(tmp, array)
    return replace(split, array=array, paths=None)


def _ranges(n: int, step: int) -> list[np.ndarray]:
    return [np.arange(start, min(start + step, n)) for start in range(0, n, step)]


def _load_cached(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The decoded-image cache, or None when it is missing, damaged or of another shape (it is then rebuilt)."""
    try:
        array = np.load(path)
    except (OSError, ValueError, EOFError):
        return None
    ok = isinstance(array, np.ndarray) and array.shape == shape and array.dtype == np.uint8
    return array if ok else None


def digits_split(split: str) -> ImageSplit:
    """scikit-learn's 8x8 digits (1,797 images, offline), upsampled to 32x32 RGB; every 5th image is test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    big = np.kron(pixels, np.ones((1, 4, 4), dtype=np.uint8))
    rgb = np.repeat(big[..., None], 3, axis=-1)
    is_test = np.arange(len(rgb)) % 5 == 0
    keep = is_test if split == "test" else ~is_test
    identity = {"dataset": "digits", "split": split, "source": "sklearn.load_digits", "n": int(keep.sum())}
    return ImageSplit(
        labels=bunch.target[keep].astype(np.int64),
        classes=[str(c) for c in bunch.target_names],
        identity=identity,
        array=np.ascontiguousarray(rgb[keep]),
    )


def _torchvision_split(name: str, split: str, root: Path, download: bool) -> ImageSplit:
    from torchvision import datasets

    builders = {
        "cifar10": lambda: datasets.CIFAR10(str(root), train=split == "train", download=download),
        "cifar100": lambda: datasets.CIFAR100(str(root), train=split == "train", download=download),
        "stl10": lambda: datasets.STL10(str(root), split=split, download=download),
    }
    try:
        ds = builders[name]()
    except RuntimeError as exc:
        raise UserError(
            f"{name} not found in {root}: rerun with --download (needs internet), or pass --data-dir DIR "
            f"holding an ImageFolder tree (e.g. `python ../shared/data/materialize.py {name} DIR`)"
        ) from exc
    except OSError as exc:  # a failed download or an unwritable root
        raise UserError(
            f"could not get {name} into {root} ({exc}): check the network and that the folder is writable, "
            f"or pass --data-dir DIR holding an ImageFolder tree"
        ) from exc
    array = ds.data if name != "stl10" else ds.data.transpose(0, 2, 3, 1)
    labels = np.asarray(ds.targets if name != "stl10" else ds.labels, dtype=np.int64)
    identity = {
        "dataset": name,
        "split": split,
        "source": "torchvision",
        "n": len(labels),
        "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),  # other files under the same name: new key
    }
    return ImageSplit(labels, list(ds.classes), identity, array=np.ascontiguousarray(array))
