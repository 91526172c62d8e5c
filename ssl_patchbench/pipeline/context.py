"""The run context: everything one ``evaluate`` resolves once (model, data, device, precision, ranks, environment)
and passes down, and the one place that says what identifies a result. The network is built only when an
extraction needs it: a rerun whose stores are all complete reads and hashes the checkpoint, builds nothing."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from ssl_patchbench.core.devices import resolve_device, use_available_cores
from ssl_patchbench.core.distributed import Ranks
from ssl_patchbench.core.environment import environment
from ssl_patchbench.core.errors import UserError
from ssl_patchbench.core.paths import home
from ssl_patchbench.data.batches import decode_workers, hardware_decoder
from ssl_patchbench.data.datasets import ImageSplit, open_split
from ssl_patchbench.evaluators import probe
from ssl_patchbench.features.extract import (
    GPU_DECODERS,
    ExtractSettings,
    ProgressFactory,
    decoder,
    decodes_on_gpu,
    nested_groups,
    resolve_precision,
)
from ssl_patchbench.models.encoder import Encoder, check_spaces
from ssl_patchbench.models.loading import ResolvedModel, build_model, resolve_model
from ssl_patchbench.pipeline.config import EvalConfig
from ssl_patchbench.pipeline.representations import space_names
from ssl_patchbench.results.records import DESCRIPTIVE_ZOO_FIELDS, FEATURE_FIELDS, NUMBER_FIELDS
from ssl_patchbench.sampling.aggregate import Aggregation
from ssl_patchbench.sampling.patches import PatchSpec

# Patches one eval's pass forwards (train + test, all its representations) from which ``--compile auto``
# compiles. The compilation (5 s for ResNet-18 at 32 px, 11-19 s for ResNet-50 at 224 px, on an H100) is won back
# after about 2M and 0.4M patches; on an H200 the compiled ResNet-50 central pass saves about 25 us an image over
# its cold 16 s compile, i.e. from about 650k images (benchmarks/RESULTS.md, run 11). 1M compiles an ImageNet
# central pass (1.33M) and keeps CIFAR-10's central and 16-patch passes (0.06M, 0.96M) eager.
AUTO_COMPILE_MIN_PATCHES = 1_000_000


@dataclass(frozen=True)
class RunContext:
    """One evaluation's resolved inputs; built once, read by every stage."""

    cfg: EvalConfig
    model: ResolvedModel
    spaces: tuple[str, ...]  # what --space lists, each one the model can give
    splits: dict[str, ImageSplit]
    device: torch.device
    precision: str  # resolved: bf16, fp16 or fp32
    ranks: Ranks
    root: Path
    progress: ProgressFactory | None
    environment: dict

    @classmethod
    def build(cls, cfg: EvalConfig, ranks: Ranks, progress: ProgressFactory | None) -> RunContext:
        device = resolve_device(cfg.device)
        if device.type == "cuda" and ranks.active:
            device = torch.device("cuda", ranks.local_rank)
        if device.type == "cpu":
            use_available_cores()
        root = cfg.home or home()
        model = resolve_model(  # a ViT's readout (--pool, --last-blocks) lands in model.entry, so in zoo_entry
            cfg.model,
            checkpoint=cfg.checkpoint,
            trust_pickle=cfg.trust_checkpoint,
            cache_dir=root / "checkpoints",
            norm_stats=cfg.norm_stats,
            pool=cfg.pool,
            last_blocks=cfg.last_blocks,
        )
        splits = {
            split: open_split(
                cfg.dataset,
                split,
                data_dir=cfg.data_dir,
                per_class=per_class,
                cache_dir=root / "images",
                download=cfg.download,
                skip_bad_images=cfg.skip_bad_images,
            )
            for split, per_class in (("train", cfg.train_per_class), ("test", cfg.test_per_class))
        }
        return cls(
            cfg=cfg,
            model=model,
            spaces=check_spaces(model, space_names(cfg)),
            splits=splits,
            device=device,
            precision=resolve_precision(cfg.precision, device),
            ranks=ranks,
            root=root,
            progress=progress if ranks.is_main else None,
            environment=environment(device),
        )

    def identity(self, spec: PatchSpec, agg: Aggregation, space: str) -> dict:
        """What a result's numbers depend on: the record's ``NUMBER_FIELDS``, from which every store key derives.
        One record per (spec, aggregation, space): a space's numbers do not depend on the other spaces listed."""
        cfg = self.cfg
        if space not in self.spaces:
            raise ValueError(f"space {space!r} is not one of this run's ({', '.join(self.spaces)})")
        entry = {k: v for k, v in self.model.entry.to_dict().items() if k not in DESCRIPTIVE_ZOO_FIELDS}
        found = {
            "checkpoint_sha256": self.model.checkpoint_sha256,
            "zoo_entry": entry,
            "dataset": cfg.dataset,
            "data": self.data_identities,
            "n_train": len(self.splits["train"]),
            "n_test": len(self.splits["test"]),
            "patches": spec.to_dict(),
            "aggregation": agg.label,
            "space": space,
            "precision": self.precision,
            "store_dtype": cfg.store_dtype,
            "seed": cfg.seed,
            "protocol": {
                "knn": {
                    "ks": list(cfg.knn_ks),
                    "temperature": cfg.temperature,
                    "weighted": True,
                    "backend": cfg.knn_backend,
                },
                "linear": {
                    "kind": "cached-feature multinomial logistic regression, wd chosen on 10% of train",
                    "solver": probe.SCIPY,  # and from large_from_weights (classes x (dim + 1)) on, large_solver
                    "large_solver": probe.TORCH,
                    "large_from_weights": probe.LARGE_PROBE_WEIGHTS,
                    "tolerance": probe.TOLERANCE,
                },
            },
        }
        assert tuple(found) == NUMBER_FIELDS, "identity() and results.NUMBER_FIELDS must name the same fields"
        return found

    @functools.cached_property
    def encoder(self) -> Encoder:
        """The network, built on the first extraction: one per run, computing every listed space in one forward,
        reused by every extraction (a missing or unexpected key is an error here)."""
        return Encoder(build_model(self.model, release=True), self.spaces)  # no second copy of the weights

    @functools.cached_property
    def data_identities(self) -> dict[str, dict]:
        """Each split's identity, and the decoder when it is on the GPU (whose pixels differ slightly from PIL's);
        worked out once per run (every store key and record reads it). ``--decode hw`` where it cannot run is an
        error here, before any work."""
        found = {}
        for split, data in self.splits.items():
            name = decoder(data, self.device, decode=self.cfg.decode)
            if name == GPU_DECODERS["hw"]:
                hardware_decoder(self.device)
            found[split] = {**data.identity, "decoder": name} if decodes_on_gpu(name) else data.identity
        return found

    def store_material(self, split: str, spec: PatchSpec, agg: Aggregation, space: str) -> dict:
        """What one split's stored features depend on: the feature fields of :meth:`identity`, for that split."""
        identity = self.identity(spec, agg, space)
        return {**{k: identity[k] for k in FEATURE_FIELDS}, "data": identity["data"][split]}

    def settings(self, specs: list[PatchSpec]) -> ExtractSettings:
        """How the one pass over each split for ``specs`` runs (both splits alike, so the test split reuses
        compiled kernels): compiled when the pass forwards enough patches in all (the largest bag of each nested
        group, on train + test), since every forward slice of a pass has one shape; the ranks of one host share
        its cores for decoding."""
        per_image = sum(group[0].num_patches for group in nested_groups(list(dict.fromkeys(specs))))
        patches = per_image * sum(len(data) for data in self.splits.values())
        return ExtractSettings(
            device=self.device,
            precision=self.precision,
            max_patches=self.cfg.max_patches,
            compile_model=compiles(self.cfg.compile, self.device, patches),
            shard=(self.ranks.rank, self.ranks.world),
            decode_workers=max(1, decode_workers() // self.ranks.world) if self.ranks.active else None,
            decode=self.cfg.decode,
        )


def compiles(setting: str, device: torch.device, patches: int) -> bool:
    """Whether a representation's extractions run the encoder under ``torch.compile`` (speed only: the stores
    do not depend on it)."""
    if setting not in ("auto", "on", "off"):
        raise UserError(f"unknown compile setting {setting!r}: choose auto, on or off")
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda" and patches >= AUTO_COMPILE_MIN_PATCHES and _triton_available(device)


def _triton_available(device: torch.device) -> bool:
    """Inductor's GPU kernels need Triton and a GPU of compute capability 7.0 or newer."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.get_device_capability(device) >= (7, 0)
