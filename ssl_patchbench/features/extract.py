"""Batches images through the patch sampler and the model, aggregates per image, streams rows into stores.

The work per batch: uint8 images on the device, every box of the batch cut and resized in one op,
normalised, forwarded in bf16/channels_last on CUDA (float32 on CPU) in slices of at most
``max_patches``, then aggregated. Memory is O(batch x patches x d) whatever the dataset size, and the
forward slice halves itself on CUDA out-of-memory. With ``compile_model`` the encoder runs under
``torch.compile`` with static shapes: every slice is padded to the run's one full slice size, so a model
compiles once per slice size and the last batch of a chunk reuses those kernels.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from ssl_patchbench.core.devices import exact_fp32
from ssl_patchbench.core.errors import UserError
from ssl_patchbench.data.batches import all_jpeg, nvjpeg_batches, process_batches
from ssl_patchbench.data.datasets import ImageSplit
from ssl_patchbench.features.store import StoreWriter
from ssl_patchbench.models.encoder import Encoder
from ssl_patchbench.sampling.aggregate import Aggregation
from ssl_patchbench.sampling.patches import PatchSpec, crop_and_resize

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (images, patches) done since the last call
ProgressFactory = Callable[[str, int, int], Progress]  # (description, images, patches to do) -> callback
_GPU_RESIDENT_MAX_BYTES = 8 << 30  # in-memory datasets up to this size are moved to the GPU once


@dataclass(frozen=True)
class ExtractStats:
    """One pass over a split: the images it covered, the patches it forwarded and its wall time."""

    images: int
    patches: int
    seconds: float


@dataclass(frozen=True)
class ExtractSettings:
    """How every extraction of a run executes (none of it changes the numbers beyond float rounding).

    ``shard=(rank, world)`` keeps the chunks ``c`` with ``c % world == rank``: ranks share one store.
    ``decode_workers``: processes decoding image files on the CPU path (None: one per core; 0: in this one);
    ``gpu_decode``: JPEG folders on CUDA are decoded by nvJPEG (False: by the CPU processes).
    """

    device: torch.device
    precision: str = "auto"
    max_patches: int | None = None
    compile_model: bool = False
    shard: tuple[int, int] = (0, 1)
    decode_workers: int | None = None
    gpu_decode: bool = True


@dataclass(frozen=True)
class Target:
    """One representation a pass fills: its spec, one store writer per aggregation, and how its forwards run."""

    spec: PatchSpec
    writers: dict[Aggregation, StoreWriter]
    settings: ExtractSettings


def default_max_patches(device: torch.device, input_size: int) -> int:
    """Patches per forward: about 100 M input pixels on a GPU, 1 M on a CPU (cache-sized), capped at 16k."""
    budget = 100_000_000 if device.type == "cuda" else 1_000_000
    return int(max(1, min(16384, budget // (input_size * input_size))))


def extract(
    encoder: Encoder,
    split: ImageSplit,
    spec: PatchSpec,
    writers: dict[Aggregation, StoreWriter],
    settings: ExtractSettings,
    *,
    progress: Progress | None = None,
) -> ExtractStats:
    """Fill the writers' pending chunks with the aggregated representation of ``split`` under ``spec``."""
    return extract_pass(encoder, split, [Target(spec, writers, settings)], progress=progress)


def nested_groups(specs: list[PatchSpec]) -> list[list[PatchSpec]]:
    """Specs that share forwards, the largest first: random bags that differ only in their count (patch ``j``
    does not depend on the count, so a smaller bag is a prefix of the largest). Every other spec is alone."""
    groups: dict[PatchSpec, list[PatchSpec]] = {}
    for spec in specs:
        groups.setdefault(replace(spec, n=1) if spec.mode == "random" else spec, []).append(spec)
    return [sorted(members, key=lambda s: -s.num_patches) for members in groups.values()]


def extract_pass(
    encoder: Encoder, split: ImageSplit, targets: list[Target], *, progress: Progress | None = None
) -> ExtractStats:
    """Fill every target's pending chunks in one pass over ``split``: each batch of images is decoded once and
    cut into every representation; nested random bags run the model once, on the largest bag."""
    if not targets:
        return ExtractStats(0, 0, 0.0)
    settings = targets[0].settings
    device = settings.device
    encoder = encoder.to(device).eval()
    if device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
    by_spec = {t.spec: t for t in targets}
    writers = [w for t in targets for w in t.writers.values()]
    first = writers[0]
    if any(w.chunk_rows != first.chunk_rows or w.rows != first.rows for w in writers):
        raise ValueError("the stores of one pass must share their rows and chunking")
    groups = [
        (members, PatchRunner(encoder, members[0], by_spec[members[0]].settings, max_images=first.chunk_rows))
        for members in nested_groups(list(by_spec))
    ]
    rank, world = settings.shard
    pending = {id(w): set(w.pending_chunks()) for w in writers}
    chunks = sorted(c for c in set().union(*pending.values()) if c % world == rank)
    plan: list[tuple[int, np.ndarray]] = []  # (chunk, image indices) per decoded batch
    for chunk in chunks:
        active = [runner for members, runner in groups if _needs(members, by_spec, pending, chunk)]
        lo, hi = first.chunk_range(chunk)
        plan.extend((chunk, b) for b in _batches(lo, hi, max(r.images_per_batch for r in active)))
    images = ImageSource(split, device, workers=settings.decode_workers, gpu_decode=settings.gpu_decode)
    start = time.perf_counter()
    done_images = forwarded = 0
    rows: dict[int, list[torch.Tensor]] = defaultdict(list)  # per writer: the chunk's rows so far
    decoded = images.iterate([indices for _, indices in plan])
    for step, ((chunk, _), (batch, pixels, sizes)) in enumerate(zip(plan, decoded, strict=True)):
        patches = 0
        for members, runner in groups:
            todo = [s for s in members if _needs([s], by_spec, pending, chunk)]
            if not todo:
                continue
            for lo in range(0, len(batch), runner.images_per_batch):
                part = slice(lo, lo + runner.images_per_batch)
                features = runner(pixels[part], sizes[part], batch[part])
                for spec in todo:
                    for agg, writer in by_spec[spec].writers.items():
                        if chunk in pending[id(writer)]:  # stays on the device: no sync per batch
                            rows[id(writer)].append(agg(features[:, : spec.num_patches], spec))
            patches += len(batch) * runner.spec.num_patches
        done_images += len(batch)
        forwarded += patches
        if progress is not None:
            progress(len(batch), patches)
        if step + 1 == len(plan) or plan[step + 1][0] != chunk:
            _write_chunk(chunk, targets, pending, rows)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ExtractStats(images=done_images, patches=forwarded, seconds=time.perf_counter() - start)


def planned_patches(targets: list[Target]) -> int:
    """Patches a pass forwards over all ranks: per group of nested bags, its largest bag on every pending chunk."""
    by_spec = {t.spec: t for t in targets}
    total = 0
    for members in nested_groups(list(by_spec)):
        writers = [w for spec in members for w in by_spec[spec].writers.values()]
        chunks = set().union(*(w.pending_chunks() for w in writers))
        images = sum(writers[0].chunk_range(c)[1] - writers[0].chunk_range(c)[0] for c in chunks)
        total += images * members[0].num_patches
    return total


def _needs(members: list[PatchSpec], by_spec: dict[PatchSpec, Target], pending: dict, chunk: int) -> bool:
    return any(chunk in pending[id(w)] for spec in members for w in by_spec[spec].writers.values())


def _write_chunk(chunk: int, targets: list[Target], pending: dict, rows: dict) -> None:
    for target in targets:
        for writer in target.writers.values():
            if chunk in pending[id(writer)]:
                parts = rows.pop(id(writer))
                writer.write_chunk(chunk, torch.cat(parts).cpu().numpy().astype(writer.features.dtype))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting: a pageable host-to-GPU copy blocks the host until the GPU
    has drained its queue (one idle gap per batch), a pinned one is queued behind the running work."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on CUDA and fp32 elsewhere; the resolved name is what stores and records carry."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in _AUTOCAST:
        raise UserError(f"unknown precision {precision!r}: choose auto, bf16, fp16 or fp32")
    return precision


_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def _batches(lo: int, hi: int, size: int) -> Iterator[np.ndarray]:
    for start in range(lo, hi, size):
        yield np.arange(start, min(start + size, hi))


class PatchRunner:
    """Sampler + model for one batch of images, with out-of-memory back-off on the forward slice."""

    def __init__(
        self, encoder: Encoder, spec: PatchSpec, settings: ExtractSettings, *, max_images: int | None = None
    ) -> None:
        self.encoder, self.spec, self.device = encoder, spec, settings.device
        self.dtype = _AUTOCAST[resolve_precision(settings.precision, settings.device)]
        max_patches = settings.max_patches
        if max_patches is not None and max_patches < 1:
            raise UserError(f"--max-patches must be positive, got {max_patches}")
        self.max_patches = max_patches or default_max_patches(self.device, spec.out_size)
        self.images_per_batch = max(1, min(self.max_patches // spec.num_patches, max_images or sys.maxsize))
        self.forward = encoder.compiled() if settings.compile_model else encoder
        self.pad_slices = settings.compile_model  # static shapes: one compilation serves every slice

    @property
    def slice_patches(self) -> int:
        """The patches of a full forward slice: what a padded slice is padded to."""
        return min(self.max_patches, self.images_per_batch * self.spec.num_patches)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor, sizes: np.ndarray, indices: np.ndarray) -> torch.Tensor:
        """``pixels``: float ``[B, 3, H, W]`` on the device -> patch embeddings ``[B, n, d]`` (float32)."""
        n = self.spec.num_patches
        boxes = self.spec.boxes(indices, sizes[:, 0], sizes[:, 1]).reshape(-1, 4)
        boxes_t = to_device(torch.from_numpy(boxes.astype(np.float32)), self.device)
        owner = torch.arange(len(indices), device=self.device).repeat_interleave(n)
        out = torch.empty(len(boxes), self.encoder.dim, device=self.device)
        start = 0
        while start < len(boxes):
            end = min(start + self.max_patches, len(boxes))
            try:
                out[start:end] = self._forward(pixels, boxes_t[start:end], owner[start:end])
            except torch.cuda.OutOfMemoryError:
                self._back_off()
                continue
            start = end
        return out.view(len(indices), n, -1)

    def _forward(self, pixels: torch.Tensor, boxes: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        real = len(boxes)
        if self.pad_slices and real < self.slice_patches:  # repeat the last box: rows are independent in eval mode
            boxes = torch.cat([boxes, boxes[-1:].expand(self.slice_patches - real, 4)])
            owner = torch.cat([owner, owner[-1:].expand(self.slice_patches - real)])
        crops = crop_and_resize(pixels, boxes, owner, self.spec.out_size)
        if self.device.type == "cuda":
            crops = crops.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self.device.type, self.dtype) if self.dtype is not None else exact_fp32()
        with autocast:
            return self.forward(crops)[:real].float()

    def _back_off(self) -> None:
        torch.cuda.empty_cache()
        if self.max_patches == 1:
            raise UserError("out of GPU memory even for one patch per forward; use --device cpu")
        self.max_patches //= 2
        log.warning("CUDA out of memory: forward slices reduced to %d patches", self.max_patches)


def decoder(split: ImageSplit, device: torch.device, *, gpu_decode: bool = True) -> str:
    """Which decoder reads a split's images: ``memory`` (none), ``nvjpeg`` (JPEG files on CUDA) or ``processes``."""
    if split.array is not None:
        return "memory"
    return "nvjpeg" if gpu_decode and device.type == "cuda" and all_jpeg(split.paths or []) else "processes"


class ImageSource:
    """Images by index as float ``[B, 3, H, W]`` on the device, with their true sizes.

    In-memory splits are moved to the device once (uint8). File-backed splits are decoded ahead of the model:
    JPEG folders by nvJPEG on CUDA, everything else by one process per core (:mod:`ssl_patchbench.data.batches`),
    each batch padded to its largest image (boxes never leave an image's own area, so padding is never sampled).
    """

    def __init__(
        self, split: ImageSplit, device: torch.device, *, workers: int | None = None, gpu_decode: bool = True
    ) -> None:
        self.split, self.device, self.workers, self.gpu_decode = split, device, workers, gpu_decode
        self.resident: torch.Tensor | None = None
        if split.array is not None:
            array = torch.from_numpy(np.ascontiguousarray(split.array))
            fits = device.type != "cuda" or array.numel() <= _GPU_RESIDENT_MAX_BYTES
            self.resident = array.to(device) if fits else array

    def iterate(self, batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor, np.ndarray]]:
        """Yield ``(indices, pixels, sizes)`` per batch, decoding the next batches while this one runs."""
        if self.resident is not None:
            for indices in batches:
                yield (indices, *self._slice(indices))
            return
        paths = self.split.paths or []
        if decoder(self.split, self.device, gpu_decode=self.gpu_decode) == "nvjpeg":
            for indices, (pixels, sizes) in zip(batches, nvjpeg_batches(paths, batches, self.device), strict=True):
                yield indices, pixels.float(), sizes
            return
        pin = self.device.type == "cuda"
        decoded = process_batches(paths, batches, workers=self.workers, pin=pin)
        for indices, (uint8, sizes) in zip(batches, decoded, strict=True):
            yield indices, to_device(uint8, self.device).permute(0, 3, 1, 2).float(), sizes

    def _slice(self, indices: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        index = torch.from_numpy(indices)
        if self.resident.is_cuda:  # type: ignore[union-attr]
            batch = self.resident[to_device(index, self.device)]  # type: ignore[index]
        else:
            batch = to_device(self.resident[index], self.device)  # type: ignore[index]
        sizes = np.tile(batch.shape[1:3], (len(indices), 1))
        return batch.permute(0, 3, 1, 2).float(), sizes
