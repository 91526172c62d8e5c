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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ssl_patchbench.core.devices import available_cores, exact_fp32
from ssl_patchbench.core.errors import UserError
from ssl_patchbench.data.datasets import ImageSplit
from ssl_patchbench.features.store import StoreWriter
from ssl_patchbench.models.encoder import Encoder
from ssl_patchbench.sampling.aggregate import Aggregation
from ssl_patchbench.sampling.patches import PatchSpec, crop_and_resize

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (images, patches) done since the last call
ProgressFactory = Callable[[str, int, int], Progress]  # (description, images, patches to do) -> callback
_GPU_RESIDENT_MAX_BYTES = 8 << 30  # in-memory datasets up to this size are moved to the GPU once
_PADDED_MAX_BYTES = 256 << 20  # float32 bytes of a padded group of decoded images (a larger image goes alone)


@dataclass(frozen=True)
class ExtractStats:
    images: int
    patches: int
    seconds: float


@dataclass(frozen=True)
class ExtractSettings:
    """How every extraction of a run executes (none of it changes the numbers beyond float rounding).

    ``shard=(rank, world)`` keeps the chunks ``c`` with ``c % world == rank``: ranks share one store.
    """

    device: torch.device
    precision: str = "auto"
    max_patches: int | None = None
    compile_model: bool = False
    shard: tuple[int, int] = (0, 1)


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
    device = settings.device
    encoder = encoder.to(device).eval()
    if device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
    first = next(iter(writers.values()))
    runner = PatchRunner(encoder, spec, settings, max_images=first.chunk_rows)
    rank, world = settings.shard
    chunks = sorted(c for c in set().union(*(w.pending_chunks() for w in writers.values())) if c % world == rank)
    images = ImageSource(split, device)
    start = time.perf_counter()
    done_images = 0
    for chunk in chunks:
        lo, hi = first.chunk_range(chunk)
        rows: dict[Aggregation, list[torch.Tensor]] = {agg: [] for agg in writers}
        for batch, pixels, sizes in images.iterate(list(_batches(lo, hi, runner.images_per_batch))):
            patch_features = runner(pixels, sizes, batch)
            for agg in writers:
                rows[agg].append(agg(patch_features, spec))  # stays on the device: no sync per batch
            done_images += len(batch)
            if progress is not None:
                progress(len(batch), len(batch) * spec.num_patches)
        for agg, writer in writers.items():
            if chunk in writer.pending_chunks():
                writer.write_chunk(chunk, torch.cat(rows[agg]).float().cpu().numpy())  # cast after its checks
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return ExtractStats(images=done_images, patches=done_images * spec.num_patches, seconds=seconds)


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
        crops = crop_and_resize(pixels, boxes, owner, self.spec.out_size, self.spec.interpolation, self.spec.antialias)
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


class ImageSource:
    """Images by index as float ``[B, 3, H, W]`` on the device, with their true sizes.

    In-memory splits are moved to the device once (uint8). File-backed splits are decoded by a thread
    pool one batch ahead of the model, and padded by edge replication to the largest image of a group
    (boxes never leave an image's own area, so padding is never sampled). A batch is cut into consecutive
    groups of at most ``_PADDED_MAX_BYTES`` padded (as float32), so one large image among small ones goes alone.
    """

    def __init__(self, split: ImageSplit, device: torch.device) -> None:
        self.split, self.device = split, device
        self.resident: torch.Tensor | None = None
        if split.array is not None:
            array = torch.from_numpy(np.ascontiguousarray(split.array))
            fits = device.type != "cuda" or array.numel() <= _GPU_RESIDENT_MAX_BYTES
            self.resident = array.to(device) if fits else array

    def iterate(self, batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor, np.ndarray]]:
        """Yield ``(indices, pixels, sizes)`` per batch, decoding the next batch while this one runs."""
        if self.resident is not None:
            for indices in batches:
                yield (indices, *self._slice(indices))
            return
        with ThreadPoolExecutor(max_workers=min(16, available_cores())) as pool:
            pending = pool.submit(self._decode, pool, batches[0]) if batches else None
            for i in range(len(batches)):
                groups = pending.result()  # type: ignore[union-attr]
                if i + 1 < len(batches):
                    pending = pool.submit(self._decode, pool, batches[i + 1])
                for indices, uint8, sizes in groups:
                    yield indices, to_device(uint8, self.device).permute(0, 3, 1, 2).float(), sizes

    def _slice(self, indices: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        index = torch.from_numpy(indices)
        if self.resident.is_cuda:  # type: ignore[union-attr]
            batch = self.resident[to_device(index, self.device)]  # type: ignore[index]
        else:
            batch = to_device(self.resident[index], self.device)  # type: ignore[index]
        sizes = np.tile(batch.shape[1:3], (len(indices), 1))
        return batch.permute(0, 3, 1, 2).float(), sizes

    def _decode(
        self, pool: ThreadPoolExecutor, indices: np.ndarray
    ) -> list[tuple[np.ndarray, torch.Tensor, np.ndarray]]:
        images = list(pool.map(self.split.image, indices.tolist()))
        all_sizes = np.array([im.shape[:2] for im in images])
        groups = []
        for lo, hi in padding_groups(all_sizes, _PADDED_MAX_BYTES):
            sizes = all_sizes[lo:hi]
            height, width = sizes.max(axis=0)
            padded = np.stack(
                [
                    np.pad(im, ((0, height - im.shape[0]), (0, width - im.shape[1]), (0, 0)), mode="edge")
                    for im in images[lo:hi]
                ]
            )
            tensor = torch.from_numpy(padded)  # pinned here, in a worker thread: to_device then only queues the copy
            groups.append((indices[lo:hi], tensor.pin_memory() if self.device.type == "cuda" else tensor, sizes))
        return groups


def padding_groups(sizes: np.ndarray, max_bytes: int) -> list[tuple[int, int]]:
    """``(lo, hi)`` ranges of consecutive images whose float32 RGB copies, padded to the group's largest height and
    width, take at most ``max_bytes`` (an image larger than that on its own is a group of one)."""
    groups: list[tuple[int, int]] = []
    lo, height, width = 0, 0, 0
    for i, (h, w) in enumerate(sizes.tolist()):
        grown_h, grown_w = max(height, h), max(width, w)
        if i > lo and (i - lo + 1) * grown_h * grown_w * 12 > max_bytes:
            groups.append((lo, i))
            lo, grown_h, grown_w = i, h, w
        height, width = grown_h, grown_w
    groups.append((lo, len(sizes)))
    return groups
