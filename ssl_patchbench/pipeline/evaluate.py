"""``evaluate(EvalConfig)``: zoo -> data -> extract -> store -> evaluators -> results, for every representation."""

from __future__ import annotations

import itertools
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ssl_patchbench.core.distributed import from_environment, shutdown
from ssl_patchbench.data.datasets import ImageSplit
from ssl_patchbench.evaluators.inputs import check_usable_features
from ssl_patchbench.evaluators.knn import knn_classify
from ssl_patchbench.evaluators.probe import linear_probe
from ssl_patchbench.features.extract import (
    ExtractSettings,
    ProgressFactory,
    Target,
    decoder,
    extract_pass,
    planned_patches,
)
from ssl_patchbench.features.store import FeatureStore, StoredFeatures, StoreWriter, store_key
from ssl_patchbench.pipeline.config import EvalConfig
from ssl_patchbench.pipeline.context import RunContext
from ssl_patchbench.pipeline.representations import Representation, evaluations
from ssl_patchbench.results.store import append_record
from ssl_patchbench.sampling.aggregate import Aggregation
from ssl_patchbench.sampling.patches import PatchSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepresentationResult:
    """One row of the results table: one representation of both splits and its metrics."""

    spec: PatchSpec
    aggregation: Aggregation
    space: str = "embedding"
    knn: dict[int, dict] = field(default_factory=dict)
    linear: dict | None = None
    n_train: int = 0
    n_test: int = 0
    dim: int = 0
    images_per_s: float = 0.0
    patches_per_s: float = 0.0
    reused_features: bool = False
    record: dict = field(default_factory=dict)

    def row(self) -> dict:
        """The flat JSON row of ``patchbench eval --json``."""
        patches: str | int = self.spec.label if self.spec.mode == "central" else self.spec.num_patches
        row = {"patches": patches, "mode": self.spec.mode, "aggregation": self.aggregation.label, "space": self.space}
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
            reused_features=self.reused_features,
        )
        return row


def evaluate(cfg: EvalConfig, *, progress: ProgressFactory | None = None) -> list[RepresentationResult]:
    """Evaluate every representation of ``cfg``; each result is also appended to the results store."""
    ranks = from_environment()
    try:
        return _evaluate(RunContext.build(cfg, ranks, progress))
    finally:
        shutdown()


def _evaluate(ctx: RunContext) -> list[RepresentationResult]:
    wanted = evaluations(ctx.cfg, ctx.model.entry)
    for spec, data in itertools.product(dict.fromkeys(rep.spec for rep in wanted), ctx.splits.values()):
        _check_fits(spec, data)
    stored = {split: _features(ctx, split, wanted) for split in ctx.splits}
    if not ctx.ranks.is_main:
        return []
    results = []
    for rep in wanted:
        result = _evaluate_one(ctx, rep, stored["train"][rep], stored["test"][rep])
        append_record(ctx.cfg.results_path or ctx.root / "results.jsonl", result.record)
        results.append(result)
    return results


def _check_fits(spec: PatchSpec, split: ImageSplit) -> None:
    """Refuse a patch larger than the images before any store is laid out (in-memory splits share one size)."""
    if split.array is not None and len(split):
        height, width = split.array.shape[1:3]
        spec.boxes(np.zeros(1, dtype=np.int64), np.array([height]), np.array([width]))


@dataclass(frozen=True)
class SplitFeatures:
    """One split's sealed features of one representation, and whether this run extracted any of them."""

    stored: StoredFeatures
    extracted: bool


def _features(ctx: RunContext, split: str, wanted: list[Representation]) -> dict[Representation, SplitFeatures]:
    """Stored features of one split for every representation, extracting (or resuming) what is missing in one
    pass over the images. Rank 0 decides what is missing and holds the locks; every rank extracts its share."""
    materials = {rep: ctx.store_material(split, *rep) for rep in wanted}
    stores = {rep: FeatureStore(ctx.root / "features", store_key(m)) for rep, m in materials.items()}
    ranks = ctx.ranks
    with ExitStack() as stack:
        todo: list[int] = []
        if ranks.is_main:
            missing = [rep for rep, store in stores.items() if not store.is_complete()]  # each store hashed once
            for rep in sorted(missing, key=lambda r: stores[r].key):  # one lock order: no deadlock between runs
                stack.enter_context(stores[rep].lock())
            todo = [wanted.index(rep) for rep in missing if not stores[rep].is_complete()]
        todo = ranks.broadcast(todo)  # type: ignore[assignment]
        if todo:
            settings = ctx.settings([rep.spec for rep in wanted])  # every split alike: compiled kernels reused
            _extract_into(ctx, split, {wanted[i]: stores[wanted[i]] for i in todo}, materials, settings)
    if not ranks.is_main:
        return {}
    return {rep: SplitFeatures(store.load(), wanted.index(rep) in todo) for rep, store in stores.items()}


def _extract_into(
    ctx: RunContext,
    split: str,
    stores: dict[Representation, FeatureStore],
    materials: dict[Representation, dict],
    settings: ExtractSettings,
) -> None:
    data, ranks = ctx.splits[split], ctx.ranks
    encoder = ctx.encoder  # built by every rank before any store is laid out: a checkpoint that fails, fails alike

    def open_writers() -> dict[Representation, StoreWriter]:
        return {
            rep: store.writer(
                labels=data.labels,
                dim=rep.aggregation.output_dim(encoder.dims[rep.space], rep.spec),
                dtype=ctx.cfg.store_dtype,
                chunk_rows=ctx.cfg.chunk_rows,
                meta={**materials[rep], "key": store.key},
                label=_features_label(split, rep),
            )
            for rep, store in stores.items()
        }

    writers = open_writers() if ranks.is_main else {}  # rank 0 lays the files out first
    ranks.barrier()
    writers = writers or open_writers()
    ranks.barrier()  # every rank has opened (and tidied the chunk log) before anyone appends to it
    by_target: dict[tuple[PatchSpec, str], dict[Aggregation, StoreWriter]] = {}
    for rep, writer in writers.items():
        by_target.setdefault((rep.spec, rep.space), {})[rep.aggregation] = writer
    targets = [Target(spec, aggs, settings, space) for (spec, space), aggs in by_target.items()]
    first = next(iter(writers.values()))
    pending = set().union(*(w.pending_chunks() for w in writers.values()))
    remaining = sum(first.chunk_range(c)[1] - first.chunk_range(c)[0] for c in pending)
    forwards = planned_patches(targets)
    label = f"{split} {' + '.join(_label(*target) for target in by_target)}"
    callback = ctx.progress(label, remaining, forwards) if ctx.progress else None
    start = time.perf_counter()
    stats = extract_pass(encoder, data, targets, progress=callback)
    ranks.barrier()
    if not ranks.is_main:
        return
    seconds = time.perf_counter() - start if ranks.active else stats.seconds
    shared = {
        "representations": [_label(*target) for target in by_target],
        "images": remaining,
        "forwarded_patches": forwards,
        "forwarded_patches_per_s": forwards / seconds if seconds > 0 else 0.0,
        "decoder": decoder(data, ctx.device, decode=ctx.cfg.decode),
        "first_forward_at": stats.first_forward_at,
        "padded_patches": stats.padded,
        "after_first_forward": stats.after_first_forward() if not ranks.active else None,
    }
    for target in targets:
        patches = remaining * target.spec.num_patches
        extra = {
            "extraction": {
                "images": remaining,
                "patches": patches,
                "seconds": round(seconds, 3),
                "images_per_s": remaining / seconds if seconds > 0 else 0.0,
                "patches_per_s": patches / seconds if seconds > 0 else 0.0,
                "device": ctx.environment["device"],
                "processes": ranks.world,
                "compiled": target.settings.compile_model,
                "pass": shared,
            }
        }
        for writer in target.writers.values():
            writer.refresh()  # the chunks the other ranks wrote
            writer.seal(extra)


def _label(spec: PatchSpec, space: str) -> str:
    """How progress lines and a pass's record name a representation: ``16``, ``25 sliding``, ``central projection``."""
    name = spec.label if spec.mode in ("central", "random") else f"{spec.label} {spec.mode}"
    return name if space == "embedding" else f"{name} {space}"


def _features_label(split: str, rep: Representation) -> str:
    """How errors about stored rows name them: ``train features of representation 16 (mean)``, and the space
    when it is the projection: ``... central (mean, projection)``."""
    how = rep.aggregation.label if rep.space == "embedding" else f"{rep.aggregation.label}, {rep.space}"
    return f"{split} features of representation {rep.spec.label} ({how})"


def _evaluate_one(
    ctx: RunContext, rep: Representation, train_split: SplitFeatures, test_split: SplitFeatures
) -> RepresentationResult:
    cfg, (spec, agg, space) = ctx.cfg, rep
    train, test = train_split.stored, test_split.stored
    x_train = torch.from_numpy(np.array(train.features))  # stored dtype (float16); evaluators cast per tile
    x_test = torch.from_numpy(np.array(test.features))
    for split, features in (("train", x_train), ("test", x_test)):
        check_usable_features(features, _features_label(split, rep))  # before anything is recorded
    y_train, y_test = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    num_classes = len(ctx.splits["train"].classes)
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
            device=ctx.device,
            backend=cfg.knn_backend,
        )
        knn = {k: {"top1": r.top1, "top5": r.top5} for k, r in found.items()}
        timings["knn_seconds"] = time.perf_counter() - start
    linear = None
    if "linear" in cfg.evals:
        probe = linear_probe(
            x_train, y_train, x_test, y_test, seed=cfg.seed, device=ctx.device, num_classes=num_classes
        )
        linear = {
            "top1": probe.top1,
            "top5": probe.top5,
            "weight_decay": probe.weight_decay,
            "val_top1": {str(k): v for k, v in probe.val_top1.items()},
            "n_iter": probe.n_iter,
            "solver": probe.solver,
        }
        timings["probe_seconds"] = probe.seconds
    reused = not (train_split.extracted or test_split.extracted)
    if reused:
        log.warning("%s %s: reused cached features (no extraction in this run)", _label(spec, space), agg.label)
    speed = train.meta.get("extraction", {}) if train_split.extracted else {}
    result = RepresentationResult(
        spec=spec,
        aggregation=agg,
        space=space,
        knn=knn,
        linear=linear,
        n_train=len(y_train),
        n_test=len(y_test),
        dim=x_train.shape[1],
        images_per_s=speed.get("images_per_s", 0.0),
        patches_per_s=speed.get("patches_per_s", 0.0),
        reused_features=reused,
    )
    return replace(result, record=_record(ctx, result, timings, train_split, test_split))


def _record(
    ctx: RunContext,
    result: RepresentationResult,
    timings: dict[str, float],
    train: SplitFeatures,
    test: SplitFeatures,
) -> dict:
    """The results record: the identity of the numbers, the numbers, and where and how fast they were measured.

    Extraction timings are this run's only: a split whose features were read from a complete store has none
    (``reused_features`` is true when no split was extracted), so no extraction is ever counted twice.
    """
    return {
        **ctx.identity(result.spec, result.aggregation, result.space),
        "model": ctx.model.entry.name,
        "checkpoint": ctx.model.checkpoint,
        "representation": result.spec.label,
        "metrics": {**{f"knn@{k}": m for k, m in result.knn.items()}, "linear": result.linear},
        "dim": result.dim,
        "reused_features": result.reused_features,
        "timings": {
            **timings,
            "extraction_train": train.stored.meta.get("extraction") if train.extracted else None,
            "extraction_test": test.stored.meta.get("extraction") if test.extracted else None,
        },
        "feature_stores": {"train": train.stored.meta.get("key"), "test": test.stored.meta.get("key")},
        **_skipped_images(ctx),
        "environment": ctx.environment,
    }


def _skipped_images(ctx: RunContext) -> dict:
    """``skipped_images``: for each file-backed split, the files ``--skip-bad-images`` left out (relative name ->
    problem, empty when none); absent without the option."""
    if not ctx.cfg.skip_bad_images:
        return {}
    return {"skipped_images": {s: data.skipped for s, data in ctx.splits.items() if data.skipped is not None}}
