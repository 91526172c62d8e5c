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
from ssl_patchbench.features.extract import ProgressFactory, extract
from ssl_patchbench.features.store import FeatureStore, StoredFeatures, StoreWriter, store_key
from ssl_patchbench.pipeline.config import EvalConfig
from ssl_patchbench.pipeline.context import RunContext
from ssl_patchbench.pipeline.representations import representations
from ssl_patchbench.results.store import append_record
from ssl_patchbench.sampling.aggregate import Aggregation
from ssl_patchbench.sampling.patches import PatchSpec

log = logging.getLogger(__name__)


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


def evaluate(cfg: EvalConfig, *, progress: ProgressFactory | None = None) -> list[RepresentationResult]:
    """Evaluate every representation of ``cfg``; each result is also appended to the results store."""
    ranks = from_environment()
    try:
        return _evaluate(RunContext.build(cfg, ranks, progress))
    finally:
        shutdown()


def _evaluate(ctx: RunContext) -> list[RepresentationResult]:
    aggregations = [Aggregation.parse(a) for a in ctx.cfg.aggregations]
    specs = representations(ctx.cfg, ctx.model.entry)
    for spec, data in itertools.product(specs, ctx.splits.values()):
        _check_fits(spec, data)
    results = []
    for spec in specs:
        aggs = [Aggregation()] if spec.mode == "central" else aggregations
        for agg in aggs:
            agg.check(spec)
        stored = {split: _features(ctx, split, spec, aggs) for split in ctx.splits}
        if not ctx.ranks.is_main:
            continue
        for agg in aggs:
            result = _evaluate_one(ctx, spec, agg, stored["train"][agg], stored["test"][agg])
            append_record(ctx.cfg.results_path or ctx.root / "results.jsonl", result.record)
            results.append(result)
    return results


def _check_fits(spec: PatchSpec, split: ImageSplit) -> None:
    """Refuse a patch larger than the images before any store is laid out (in-memory splits share one size)."""
    if split.array is not None and len(split):
        height, width = split.array.shape[1:3]
        spec.boxes(np.zeros(1, dtype=np.int64), np.array([height]), np.array([width]))


def _features(
    ctx: RunContext, split: str, spec: PatchSpec, aggs: list[Aggregation]
) -> dict[Aggregation, StoredFeatures]:
    """Stored features of one split for each aggregation, extracting (or resuming) what is missing.

    Rank 0 decides what is missing and holds the locks; every rank extracts its share of the chunks.
    """
    materials = {agg: ctx.store_material(split, spec, agg) for agg in aggs}
    stores = {agg: FeatureStore(ctx.root / "features", store_key(m)) for agg, m in materials.items()}
    ranks = ctx.ranks
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
            _extract_into(ctx, split, spec, {a: stores[a] for a in todo}, materials)
    return {agg: store.load() for agg, store in stores.items()} if ranks.is_main else {}


def _extract_into(
    ctx: RunContext,
    split: str,
    spec: PatchSpec,
    stores: dict[Aggregation, FeatureStore],
    materials: dict[Aggregation, dict],
) -> None:
    data, ranks = ctx.splits[split], ctx.ranks

    def open_writers() -> dict[Aggregation, StoreWriter]:
        return {
            agg: store.writer(
                labels=data.labels,
                dim=agg.output_dim(ctx.encoder.dim, spec),
                dtype=ctx.cfg.store_dtype,
                chunk_rows=ctx.cfg.chunk_rows,
                meta={**materials[agg], "key": store.key},
                label=_features_label(split, spec, agg),
            )
            for agg, store in stores.items()
        }

    writers = open_writers() if ranks.is_main else {}  # rank 0 lays the files out first
    ranks.barrier()
    writers = writers or open_writers()
    ranks.barrier()  # every rank has opened (and tidied the chunk log) before anyone appends to it
    first = next(iter(writers.values()))
    remaining = sum(first.chunk_range(c)[1] - first.chunk_range(c)[0] for c in first.pending_chunks())
    label = f"{split} {spec.label}{'' if spec.mode == 'central' else ' ' + spec.mode}"
    callback = ctx.progress(label, remaining, remaining * spec.num_patches) if ctx.progress else None
    settings = ctx.settings(spec)
    start = time.perf_counter()
    stats = extract(ctx.encoder, data, spec, writers, settings, progress=callback)
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
            "device": ctx.environment["device"],
            "processes": ranks.world,
            "compiled": settings.compile_model,
        }
    }
    for writer in writers.values():
        writer.seal(extra)


def _features_label(split: str, spec: PatchSpec, agg: Aggregation) -> str:
    """How errors about stored rows name them: ``train features of representation 16 (mean)``."""
    return f"{split} features of representation {spec.label} ({agg.label})"


def _evaluate_one(
    ctx: RunContext, spec: PatchSpec, agg: Aggregation, train: StoredFeatures, test: StoredFeatures
) -> RepresentationResult:
    cfg = ctx.cfg
    x_train = torch.from_numpy(np.array(train.features))  # stored dtype (float16); evaluators cast per tile
    x_test = torch.from_numpy(np.array(test.features))
    for split, features in (("train", x_train), ("test", x_test)):
        check_usable_features(features, _features_label(split, spec, agg))  # before anything is recorded
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
    return replace(result, record=_record(ctx, result, timings, train, test))


def _record(
    ctx: RunContext,
    result: RepresentationResult,
    timings: dict[str, float],
    train: StoredFeatures,
    test: StoredFeatures,
) -> dict:
    """The results record: the identity of the numbers, the numbers, and where and how fast they were measured."""
    return {
        **ctx.identity(result.spec, result.aggregation),
        "model": ctx.model.entry.name,
        "checkpoint": ctx.model.checkpoint,
        "representation": result.spec.label,
        "metrics": {**{f"knn@{k}": m for k, m in result.knn.items()}, "linear": result.linear},
        "dim": result.dim,
        "timings": {
            **timings,
            "extraction_train": train.meta.get("extraction"),
            "extraction_test": test.meta.get("extraction"),
        },
        "feature_stores": {"train": train.meta.get("key"), "test": test.meta.get("key")},
        "environment": ctx.environment,
    }
