"""The one function a notebook or the CLI calls: zoo -> data -> extract -> store -> evaluators -> results."""

from __future__ import annotations

import importlib.util
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .aggregate import Aggregation
from .data import ImageSplit, open_split
from .devices import resolve_device
from .distributed import Ranks, from_environment, shutdown
from .errors import UserError
from .extract import Encoder, Progress, extract
from .knn import knn_classify
from .patches import PatchSpec
from .paths import home
from .probe import linear_probe
from .results import append_record, environment
from .store import FeatureStore, StoredFeatures, StoreWriter, store_key
from .zoo import LoadedModel, load_model

log = logging.getLogger(__name__)

EVALUATORS = ("knn", "linear")
ProgressFactory = Callable[[str, int, int], Progress]  # (description, images, patches) -> per-batch callback


@dataclass(frozen=True)
class EvalConfig:
    """Everything one ``patchbench eval`` needs; defaults follow DESIGN §1."""

    model: str
    dataset: str
    checkpoint: str | None = None
    data_dir: str | None = None
    patches: tuple[str, ...] = ("central", "1", "16")
    mode: str = "random"
    scale: tuple[float, float] | None = None  # None: the zoo entry's pretraining scale
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    size: int | None = None
    stride: int | None = None
    aggregations: tuple[str, ...] = ("mean",)
    space: str = "embedding"
    evals: tuple[str, ...] = EVALUATORS
    train_per_class: int | None = None
    test_per_class: int | None = None
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    knn_ks: tuple[int, ...] = (20, 200)
    temperature: float = 0.07
    knn_backend: str = "auto"
    max_patches: int | None = None
    compile: str = "auto"  # torch.compile the encoder: auto (large CUDA extractions), on or off
    store_dtype: str = "float16"
    chunk_rows: int = 4096
    home: Path | None = None
    results_path: Path | None = None
    trust_checkpoint: bool = False
    download: bool = False


@dataclass(frozen=True)
class RepresentationResult:
    """One row of the results table: one representation of both splits and its metrics."""

    spec: PatchSpec
    aggregation: Aggregation
    knn: dict[int, dict] = field(default_factory=dict)
    linear: dict | None = None
    n_train: int = 0
    n_test: int = 0
    dim: int = 0
    images_per_s: float = 0.0
    patches_per_s: float = 0.0
    record: dict = field(default_factory=dict)

    def row(self) -> dict:
        """The flat JSON row of ``patchbench eval --json``."""
        patches: str | int = self.spec.label if self.spec.mode == "central" else self.spec.num_patches
        row = {"patches": patches, "mode": self.spec.mode, "aggregation": self.aggregation.label}
        for k, metrics in sorted(self.knn.items()):
            row[f"knn@{k}"] = metrics["top1"]
        row.setdefault("knn@20", None)
        row.setdefault("knn@200", None)
        row["linear"] = None if self.linear is None else self.linear["top1"]
        row.update(
            n_train=self.n_train,
            n_test=self.n_test,
            dim=self.dim,
            images_per_s=round(self.images_per_s, 1),
            patches_per_s=round(self.patches_per_s, 1),
        )
        return row


def representations(cfg: EvalConfig, model: LoadedModel) -> list[PatchSpec]:
    """The patch specs named by ``cfg.patches`` ("central", counts, or "all" sliding windows)."""
    pre = model.entry.preprocessing
    common = {"out_size": pre.input_size, "resize": pre.resize, "seed": cfg.seed}
    specs = []
    for token in cfg.patches:
        if token == "central":
            specs.append(PatchSpec(mode="central", **common))
            continue
        specs.append(_patch_spec(cfg, model, token, common))
    if not specs:
        raise UserError("--patches is empty: give e.g. central,1,16")
    return specs


def _patch_spec(cfg: EvalConfig, model: LoadedModel, token: str, common: dict) -> PatchSpec:
    if cfg.mode == "sliding":
        spec = PatchSpec(mode="sliding", size=cfg.size, stride=cfg.stride, **common)
        if token not in ("all", str(spec.num_patches)):
            raise UserError(
                f"sliding {cfg.size} px windows at stride {cfg.stride} give {spec.num_patches} patches, "
                f"not {token}: use --patches {spec.num_patches} (or all)"
            )
        return spec
    n = _count(token)
    if cfg.mode == "grid":
        side = math.isqrt(n)
        if side * side != n:
            raise UserError(f"grid mode needs a square number of patches (g*g), got {n}")
        return PatchSpec(mode="grid", grid=side, **common)
    if cfg.mode != "random":
        raise UserError(f"unknown patch mode {cfg.mode!r}: choose random, grid or sliding")
    scale = cfg.scale or model.entry.pretrain_scale
    return PatchSpec(mode="random", n=n, scale=tuple(scale), ratio=cfg.ratio, size=cfg.size, **common)


def _count(token: str) -> int:
    try:
        n = int(token)
    except ValueError:
        raise UserError(f"--patches takes central, all or positive counts, got {token!r}") from None
    if n <= 0:
        raise UserError(f"the number of patches must be positive, got {n}")
    return n


def evaluate(cfg: EvalConfig, *, progress: ProgressFactory | None = None) -> list[RepresentationResult]:
    """Evaluate every representation of ``cfg``; each result is also appended to the results store."""
    for name in cfg.evals:
        if name not in EVALUATORS:
            raise UserError(f"unknown evaluator {name!r}: choose from {', '.join(EVALUATORS)}")
    ranks = from_environment()
    try:
        return _evaluate(cfg, ranks, progress if ranks.is_main else None)
    finally:
        shutdown()


def _evaluate(cfg: EvalConfig, ranks: Ranks, progress: ProgressFactory | None) -> list[RepresentationResult]:
    device = resolve_device(cfg.device)
    if device.type == "cuda" and ranks.active:
        device = torch.device("cuda", ranks.local_rank)
    root = cfg.home or home()
    model = load_model(
        cfg.model, checkpoint=cfg.checkpoint, trust_pickle=cfg.trust_checkpoint, cache_dir=root / "checkpoints"
    )
    splits = {
        split: open_split(
            cfg.dataset,
            split,
            data_dir=cfg.data_dir,
            per_class=per_class,
            cache_dir=root / "images",
            download=cfg.download,
        )
        for split, per_class in (("train", cfg.train_per_class), ("test", cfg.test_per_class))
    }
    aggregations = [Aggregation.parse(a) for a in cfg.aggregations]
    specs = representations(cfg, model)
    for spec, data in itertools.product(specs, splits.values()):
        _check_fits(spec, data)
    encoder = Encoder(model, cfg.space)  # one per run: a compiled encoder is reused by every extraction
    results = []
    for spec in specs:
        aggs = [Aggregation()] if spec.mode == "central" else aggregations
        for agg in aggs:
            agg.check(spec)
        compiled = _compiles(cfg, device, spec.num_patches * sum(len(data) for data in splits.values()))
        stored = {
            split: _features(cfg, model, encoder, compiled, data, spec, aggs, device, root, progress, ranks)
            for split, data in splits.items()
        }
        if not ranks.is_main:
            continue
        for agg in aggs:
            result = _evaluate_one(cfg, model, splits, spec, agg, stored["train"][agg], stored["test"][agg], device)
            append_record(cfg.results_path or root / "results.jsonl", result.record)
            results.append(result)
    return results


def _check_fits(spec: PatchSpec, split: ImageSplit) -> None:
    """Refuse a patch larger than the images before any store is laid out (in-memory splits share one size)."""
    if split.array is not None and len(split):
        height, width = split.array.shape[1:3]
        spec.boxes(np.zeros(1, dtype=np.int64), np.array([height]), np.array([width]))


def _store_material(
    cfg: EvalConfig, model: LoadedModel, split: ImageSplit, spec: PatchSpec, agg: Aggregation, device: torch.device
) -> dict:
    return {
        "checkpoint_sha256": model.checkpoint_sha256,
        "zoo_entry": model.entry.to_dict(),
        "data": split.identity,
        "patches": spec.to_dict(),
        "aggregation": agg.label,
        "space": cfg.space,
        "dtype": cfg.store_dtype,
        "precision": _precision(cfg, device),
    }


def _precision(cfg: EvalConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if device.type == "cuda" else "fp32"


# Patches of one representation (train + test) from which ``--compile auto`` compiles. Measured on an H100: the
# compilation (5 s for ResNet-18 at 32 px, 11-19 s for ResNet-50 at 224 px) is won back after about 2M and 0.4M
# patches; 4M keeps small runs (e.g. 25 sliding windows on CIFAR-10, 1.5M patches) on the eager encoder.
AUTO_COMPILE_MIN_PATCHES = 4_000_000


def _compiles(cfg: EvalConfig, device: torch.device, patches: int) -> bool:
    """Whether a representation's extractions run the encoder under ``torch.compile`` (speed only: the stores
    do not depend on it). Both splits decide together, so the test split reuses the train split's kernels."""
    if cfg.compile not in ("auto", "on", "off"):
        raise UserError(f"unknown compile setting {cfg.compile!r}: choose auto, on or off")
    if cfg.compile != "auto":
        return cfg.compile == "on"
    return device.type == "cuda" and patches >= AUTO_COMPILE_MIN_PATCHES and _triton_available(device)


def _triton_available(device: torch.device) -> bool:
    """Inductor's GPU kernels need Triton and a GPU of compute capability 7.0 or newer."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.get_device_capability(device) >= (7, 0)


def _features(
    cfg: EvalConfig,
    model: LoadedModel,
    encoder: Encoder,
    compiled: bool,
    split: ImageSplit,
    spec: PatchSpec,
    aggs: Sequence[Aggregation],
    device: torch.device,
    root: Path,
    progress: ProgressFactory | None,
    ranks: Ranks,
) -> dict[Aggregation, StoredFeatures]:
    """Stored features of one split for each aggregation, extracting (or resuming) what is missing.

    Rank 0 decides what is missing and holds the locks; every rank extracts its share of the chunks.
    """
    materials = {agg: _store_material(cfg, model, split, spec, agg, device) for agg in aggs}
    stores = {agg: FeatureStore(root / "features", store_key(m)) for agg, m in materials.items()}
    with ExitStack() as stack:
        todo: list[Aggregation] = []
        if ranks.is_main:
            missing = [agg for agg, store in stores.items() if not store.is_complete()]  # each store hashed once
            for agg in sorted(missing, key=lambda a: stores[a].key):  # one lock order: no deadlock between runs
                stack.enter_context(stores[agg].lock())
            todo = [agg for agg in missing if not stores[agg].is_complete()]
        labels = ranks.broadcast([agg.label for agg in todo])
        todo = [agg for agg in aggs if agg.label in labels]
        if todo:
            todo_stores = {a: stores[a] for a in todo}
            _extract_into(cfg, encoder, compiled, split, spec, todo_stores, materials, device, progress, ranks)
    return {agg: store.load() for agg, store in stores.items()} if ranks.is_main else {}


def _extract_into(
    cfg: EvalConfig,
    encoder: Encoder,
    compiled: bool,
    split: ImageSplit,
    spec: PatchSpec,
    stores: dict[Aggregation, FeatureStore],
    materials: dict[Aggregation, dict],
    device: torch.device,
    progress: ProgressFactory | None,
    ranks: Ranks,
) -> None:
    def open_writers() -> dict[Aggregation, StoreWriter]:
        return {
            agg: store.writer(
                labels=split.labels,
                dim=agg.output_dim(encoder.dim, spec),
                dtype=cfg.store_dtype,
                chunk_rows=cfg.chunk_rows,
                meta={**materials[agg], "key": store.key},
            )
            for agg, store in stores.items()
        }

    writers = open_writers() if ranks.is_main else {}  # rank 0 lays the files out first
    ranks.barrier()
    writers = writers or open_writers()
    ranks.barrier()  # every rank has opened (and tidied the chunk log) before anyone appends to it
    first = next(iter(writers.values()))
    remaining = sum(first.chunk_range(c)[1] - first.chunk_range(c)[0] for c in first.pending_chunks())
    label = f"{split.identity['split']} {spec.label}{'' if spec.mode == 'central' else ' ' + spec.mode}"
    callback = progress(label, remaining, remaining * spec.num_patches) if progress else None
    start = time.perf_counter()
    stats = extract(
        encoder,
        split,
        spec,
        writers,
        device=device,
        precision=_precision(cfg, device),
        max_patches=cfg.max_patches,
        compile_model=compiled,
        progress=callback,
        shard=(ranks.rank, ranks.world),
    )
    ranks.barrier()
    if not ranks.is_main:
        return
    for writer in writers.values():
        writer.refresh()  # the chunks the other ranks wrote
    seconds = time.perf_counter() - start if ranks.active else stats.seconds
    extra = {
        "extraction": {
            "images": remaining,
            "patches": remaining * spec.num_patches,
            "seconds": round(seconds, 3),
            "images_per_s": remaining / seconds if seconds > 0 else 0.0,
            "patches_per_s": remaining * spec.num_patches / seconds if seconds > 0 else 0.0,
            "device": environment(device)["device"],
            "processes": ranks.world,
            "compiled": compiled,
        }
    }
    for writer in writers.values():
        writer.seal(extra)


def _evaluate_one(
    cfg: EvalConfig,
    model: LoadedModel,
    splits: dict[str, ImageSplit],
    spec: PatchSpec,
    agg: Aggregation,
    train: StoredFeatures,
    test: StoredFeatures,
    device: torch.device,
) -> RepresentationResult:
    x_train = torch.from_numpy(np.array(train.features))  # stored dtype (float16); evaluators cast per tile
    x_test = torch.from_numpy(np.array(test.features))
    y_train, y_test = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    num_classes = len(splits["train"].classes)
    timings: dict[str, float] = {}
    knn: dict[int, dict] = {}
    if "knn" in cfg.evals:
        start = time.perf_counter()
        found = knn_classify(
            x_train,
            y_train,
            x_test,
            y_test,
            ks=cfg.knn_ks,
            temperature=cfg.temperature,
            num_classes=num_classes,
            device=device,
            backend=cfg.knn_backend,
        )
        knn = {k: {"top1": r.top1, "top5": r.top5} for k, r in found.items()}
        timings["knn_seconds"] = time.perf_counter() - start
    linear = None
    if "linear" in cfg.evals:
        probe = linear_probe(x_train, y_train, x_test, y_test, seed=cfg.seed, device=device, num_classes=num_classes)
        linear = {
            "top1": probe.top1,
            "top5": probe.top5,
            "weight_decay": probe.weight_decay,
            "val_top1": {str(k): v for k, v in probe.val_top1.items()},
            "n_iter": probe.n_iter,
        }
        timings["probe_seconds"] = probe.seconds
    speed = train.meta.get("extraction", {})
    result = RepresentationResult(
        spec=spec,
        aggregation=agg,
        knn=knn,
        linear=linear,
        n_train=len(y_train),
        n_test=len(y_test),
        dim=x_train.shape[1],
        images_per_s=speed.get("images_per_s", 0.0),
        patches_per_s=speed.get("patches_per_s", 0.0),
    )
    record = _record(cfg, model, splits, result, timings, train, test, device)
    return RepresentationResult(**{**result.__dict__, "record": record})


def _record(
    cfg: EvalConfig,
    model: LoadedModel,
    splits: dict[str, ImageSplit],
    result: RepresentationResult,
    timings: dict[str, float],
    train: StoredFeatures,
    test: StoredFeatures,
    device: torch.device,
) -> dict:
    return {
        "model": model.entry.name,
        "checkpoint": model.checkpoint,
        "checkpoint_sha256": model.checkpoint_sha256,
        "zoo_entry": model.entry.to_dict(),
        "dataset": cfg.dataset,
        "data": {split: data.identity for split, data in splits.items()},
        "n_train": result.n_train,
        "n_test": result.n_test,
        "patches": result.spec.to_dict(),
        "representation": result.spec.label,
        "aggregation": result.aggregation.label,
        "space": cfg.space,
        "precision": _precision(cfg, device),
        "store_dtype": cfg.store_dtype,
        "seed": cfg.seed,
        "protocol": {
            "knn": {
                "ks": list(cfg.knn_ks),
                "temperature": cfg.temperature,
                "weighted": True,
                "backend": cfg.knn_backend,
            },
            "linear": {"kind": "cached-feature multinomial logistic regression (L-BFGS), wd chosen on 10% of train"},
        },
        "metrics": {**{f"knn@{k}": m for k, m in result.knn.items()}, "linear": result.linear},
        "dim": result.dim,
        "timings": {
            **timings,
            "extraction_train": train.meta.get("extraction"),
            "extraction_test": test.meta.get("extraction"),
        },
        "feature_stores": {"train": train.meta.get("key"), "test": test.meta.get("key")},
        "environment": environment(device),
    }
