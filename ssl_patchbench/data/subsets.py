"""Standard class subsets of ImageFolder trees: ImageNet-100 (the 100 classes of CMC, Tian et al. 2019, as
solo-learn ships them), selected from a full ImageNet-1k tree or read from a folder of exactly those classes."""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

from ssl_patchbench.core.errors import UserError

IMAGENET_CLASSES = 1000


@cache
def imagenet100_classes() -> tuple[str, ...]:
    """The 100 WordNet ids, sorted (the label order an ImageFolder of them gets)."""
    text = files("ssl_patchbench.data").joinpath("imagenet100_classes.txt").read_text()
    return tuple(sorted(text.split()))


def folder_classes(folder: Path, name: str) -> list[str]:
    """The class folders of ``folder`` that dataset ``name`` uses: all of them, or ImageNet-100's 100."""
    present = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if name != "imagenet100":
        return present
    wanted = imagenet100_classes()
    missing = sorted(set(wanted) - set(present))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise UserError(
            f"{folder} lacks {len(missing)} of the 100 ImageNet-100 classes ({shown}): pass --data-dir a full "
            "ImageNet-1k tree or a folder of exactly the ImageNet-100 classes"
        )
    extra = sorted(set(present) - set(wanted))
    if extra and len(present) != IMAGENET_CLASSES:
        raise UserError(
            f"{folder} holds {len(extra)} classes outside ImageNet-100 (e.g. {extra[0]}) and is not a full "
            f"ImageNet-1k tree ({len(present)} classes, not {IMAGENET_CLASSES}): pass --data-dir a full ImageNet-1k "
            "tree or a folder of exactly the ImageNet-100 classes"
        )
    return list(wanted)
