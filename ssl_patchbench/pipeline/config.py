"""``EvalConfig``: the one declaration of what an evaluation takes; the CLI options are built from its fields.

Each field says, in its metadata, how the command line spells it (``option``), what it means (``help``), the
kind of value it takes (``kind``: text, csv, ints, pair, int, float, choice, flag, path) with its bounds, and
whether it changes the numbers (``numbers``) or only how fast or where they are computed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_patchbench.core.errors import UserError

EVALUATORS = ("knn", "linear")
STORE_DTYPES = ("float16", "float32")


REQUIRED = dataclasses.MISSING


def _opt(default: Any, help: str, kind: str = "text", *, numbers: bool, option: str | None = None, **extra: Any):
    """A config field with its command-line form; ``option=None`` derives ``--field-name``."""
    meta = {"help": help, "kind": kind, "numbers": numbers, "option": option, **extra}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class EvalConfig:
    """Everything one ``patchbench eval`` needs; defaults follow the protocol (docs/protocol.md)."""

    model: str = _opt(REQUIRED, "Zoo entry (patchbench zoo list).", numbers=True)
    dataset: str = _opt(
        REQUIRED, "cifar10, cifar100, stl10, imagenet, imagenet100, imagenette, folder, digits.", numbers=True
    )
    checkpoint: str | None = _opt(
        None, "Checkpoint file (path or URL); overrides the zoo entry's source.", numbers=False
    )  # inputs are identified by their content (checkpoint sha256, data identity), not by where they lie
    data_dir: str | None = _opt(None, "ImageFolder tree or torchvision root.", "path", numbers=False)
    patches: tuple[str, ...] = _opt(
        ("central", "1", "16"),
        "Representations, mixed freely: central, patch counts (random bags, or g*g grids with --mode grid), and "
        "sliding (the windows of --patch-size/--stride; all is the same), e.g. central,1,16,256,sliding.",
        "csv",
        numbers=True,
    )
    mode: str = _opt(
        "random",
        "How the counts of --patches are laid out (sliding: a count names the sliding windows, as the token "
        "sliding does).",
        "choice",
        numbers=True,
        choices=("random", "grid", "sliding"),
    )
    scale: tuple[float, float] | None = _opt(
        None,
        "Area fraction of random patches (0.2) or a range (0.08,1.0); default: the entry's patch scale.",
        "pair",
        numbers=True,
        option="--patch-scale",
    )
    ratio: tuple[float, float] = _opt(
        (3 / 4, 4 / 3),
        "Aspect-ratio range (w/h) of random patches; default 3/4,4/3.",
        "pair",
        numbers=True,
        option="--patch-ratio",
    )
    size: int | None = _opt(
        None,
        "Patch side in px: of the sliding windows, or, when --patches has no sliding windows, of fixed-size "
        "random squares.",
        "int",
        numbers=True,
        option="--patch-size",
        min=1,
    )
    stride: int | None = _opt(None, "Sliding-window stride in px.", "int", numbers=True, min=1)
    aggregations: tuple[str, ...] = _opt(
        ("mean",),
        "mean, concat, gridpool[:K:S], comma-separated; each applies to every bag it is defined for (gridpool: "
        "grid and sliding layouts); central is its one patch.",
        "csv",
        numbers=True,
        option="--aggregate",
    )
    space: tuple[str, ...] = _opt(
        ("embedding",),
        "embedding (backbone output h), projection (projector output z), or both from one forward "
        "(embedding,projection); SPACE:central+16 evaluates only those --patches tokens in SPACE.",
        "csv",
        numbers=True,
    )
    norm_stats: str = _opt(
        "auto",
        "Normalisation statistics: auto (the checkpoint's training set where its solo-learn configuration names "
        "it, else the entry's), entry, or solo-learn's for a dataset.",
        "choice",
        numbers=True,
        choices=("auto", "entry", "cifar10", "cifar100", "stl10", "imagenet100", "imagenet"),
    )
    pool: str | None = _opt(
        None,
        "ViT readout per block: class token, mean patch token, or both (default: the zoo entry's).",
        "choice",
        numbers=True,
        choices=("cls", "mean", "cls+mean"),
    )
    last_blocks: int | None = _opt(
        None,
        "ViT readout: concatenate the pooling of the last N blocks (default: the zoo entry's).",
        "int",
        numbers=True,
        min=1,
    )
    evals: tuple[str, ...] = _opt(
        EVALUATORS, "knn, linear or both.", "csv", numbers=False, option="--eval"
    )  # which, not what
    train_per_class: int | None = _opt(None, "Keep the first N train images of each class.", "int", numbers=True, min=1)
    test_per_class: int | None = _opt(None, "Keep the first N test images of each class.", "int", numbers=True, min=1)
    device: str = _opt("auto", "auto, cpu or cuda[:i].", numbers=False)
    precision: str = _opt(
        "auto",
        "Forward precision (auto: bf16 on CUDA, fp32 on CPU).",
        "choice",
        numbers=True,
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    decode: str = _opt(
        "cpu",
        "Image-file decoder: cpu (PIL, one process per core), gpu (nvJPEG for JPEG folders on CUDA: faster, its "
        "pixels differ slightly from PIL's, so its stores and records are kept apart) or hw (the GPU's hardware "
        "JPEG engines through nvImageCodec, an optional package: PIL's pixels to within one level; kept apart too).",
        "choice",
        numbers=True,
        choices=("cpu", "gpu", "hw"),
    )
    seed: int = _opt(0, "Seed of the patch boxes.", "int", numbers=True, min=0, max=2**64 - 1)
    knn_ks: tuple[int, ...] = _opt((20, 200), "Neighbour counts of the kNN.", "ints", numbers=True, option="--knn-k")
    temperature: float = _opt(0.07, "kNN vote temperature.", "float", numbers=True, min=0.0, min_open=True)
    knn_backend: str = _opt(
        "auto",
        "auto: tiled matmul on the device; faiss: IndexFlatIP on the CPU.",
        "choice",
        numbers=True,
        choices=("auto", "torch", "faiss"),
    )
    max_patches: int | None = _opt(
        None, "Patches per forward pass (default: from the GPU budget).", "int", numbers=False, min=1
    )
    compile: str = _opt(
        "auto",
        "torch.compile the model (auto: on CUDA when one eval forwards at least 1M patches, train + test).",
        "choice",
        numbers=False,
        choices=("auto", "on", "off"),
    )
    store_dtype: str = _opt(
        "float16",
        "dtype of stored features (float32 for features beyond float16's range).",
        "choice",
        numbers=True,
        choices=STORE_DTYPES,
    )
    chunk_rows: int = _opt(
        4096, "Images per resumable store chunk (and per rank's share of work).", "int", numbers=False, min=1
    )
    home: Path | None = _opt(None, "Cache root (default $PATCHBENCH_HOME).", "path", numbers=False)
    results_path: Path | None = _opt(
        None, "Results JSONL (default HOME/results.jsonl).", "path", numbers=False, option="--results"
    )
    trust_checkpoint: bool = _opt(
        False, "Allow checkpoints that need pickle (can run code: only for files you trust).", "flag", numbers=False
    )
    download: bool = _opt(False, "Let torchvision download CIFAR/STL (needs internet).", "flag", numbers=False)
    skip_bad_images: bool = _opt(
        False,
        "Check every image file first and leave out those that cannot be decoded (empty, not an image, truncated, "
        "over the pixel limit); they are listed in the results and the data identity. Default: such a file is an "
        "error.",
        "flag",
        numbers=False,
    )  # the files left out change the numbers through the data identity, not the flag itself

    def __post_init__(self) -> None:
        for name, option in (
            ("patches", "--patches"),
            ("aggregations", "--aggregate"),
            ("space", "--space"),
            ("evals", "--eval"),
        ):
            if isinstance(getattr(self, name), str):  # one value, e.g. EvalConfig(space="projection") as before
                object.__setattr__(self, name, (getattr(self, name),))
            if not getattr(self, name):
                raise UserError(f"{option} is empty: give at least one value (see patchbench eval --help)")
        unknown = [e for e in self.evals if e not in EVALUATORS]
        if unknown:
            raise UserError(f"unknown evaluator {unknown[0]!r}: choose from {', '.join(EVALUATORS)}")

    def identity(self) -> dict[str, Any]:
        """The settings that change the numbers; everything else (device, batch sizes, paths) only changes speed."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["numbers"]}


def option_fields() -> list[dataclasses.Field]:
    """The fields of :class:`EvalConfig` in declaration order, each with its command-line metadata."""
    return list(dataclasses.fields(EvalConfig))
