"""Batches images through the patch sampler and the model, aggregates per image, streams rows into stores.

The work per batch: uint8 images on the device, the batch's boxes cut and resized (only the images a cut
needs converted to float), normalised, forwarded in bf16 (channels-last convolutions) on CUDA (float32 on CPU)
in slices of ``max_patches`` that run on across batches, then aggregated per image. Memory is one decoded batch
and one slice of crops whatever the dataset size, and the forward slice halves itself on CUDA out-of-memory. On
CUDA and with ``compile_model`` the last slice of a stretch is padded to the full size (static shapes), so a
model compiles and cuDNN autotunes once. One pass serves every representation of a split.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
import torch

from ssl_patchbench.core.devices import exact_fp32
from ssl_patchbench.core.errors import UserError
from ssl_patchbench.data.batches import all_jpeg, join_padded, nvjpeg_batches, process_pieces
from ssl_patchbench.data.datasets import ImageSplit
from ssl_patchbench.features.store import StoreWriter
from ssl_patchbench.models.encoder import Encoder
from ssl_patchbench.sampling.aggregate import Aggregation
from ssl_patchbench.sampling.patches import PatchSpec, crop_and_resize

log = logging.getLogger(__name__)

Tag = TypeVar("Tag")  # what a caller of ImageSource.iterate attaches to a batch
Progress = Callable[[int, int], None]  # (images, patches) done since the last call
ProgressFactory = Callable[[str, int, int], Progress]  # (description, images, patches to do) -> callback
_GPU_RESIDENT_MAX_BYTES = 8 << 30  # in-memory datasets up to this size are moved to the GPU once
# uint8 bytes of a padded batch of decoded images: 2,000 ImageNet-size images fit (so a batch is one forward
# slice of the central view); one much larger image among them makes a group of its own
_PADDED_MAX_BYTES = 2 << 30
_PADDING_MAX_RATIO = 4.0  # padded pixels of a group / its images' own pixels
# nvJPEG batches hold at least this many images whatever the patches per image: alone on one H200 it decoded
# 3,072 images/s in batches of 124 (a 16-patch slice's images) and 6,367 in batches of 1,992
_NVJPEG_MIN_IMAGES = 1024


@dataclass(frozen=True)
class ExtractStats:
    """One pass over a split: the images it covered, the patches it forwarded and its wall time; and its first
    forward: the decoded batches up to and including the one whose patches first reached the model (a batch of
    fewer patches than a slice forwards nothing), when they were done (unix time: how long a user waits for a
    first result, compilation and autotuning included), their seconds, images and patches (the rest of the pass
    is the steady rate a larger dataset runs at)."""

    images: int
    patches: int
    seconds: float
    first_forward_at: float | None = None
    first_forward: tuple[float, int, int] = (0.0, 0, 0)  # seconds, images, forwarded patches
    padded: int = 0  # patches forwarded only to fill the last slice of a stretch (static shapes)

    def after_first_forward(self) -> dict[str, float] | None:
        """Images/s and forwarded patches/s after the first forward (None when nothing came after it)."""
        seconds, images, patches = self.first_forward
        if images >= self.images or self.seconds <= seconds:
            return None
        rest = self.seconds - seconds
        return {
            "images_per_s": (self.images - images) / rest,
            "forwarded_patches_per_s": (self.patches - patches) / rest,
        }


@dataclass(frozen=True)
class ExtractSettings:
    """How every extraction of a run executes (none of it changes the numbers beyond float rounding).

    ``shard=(rank, world)`` keeps the chunks ``c`` with ``c % world == rank``: ranks share one store.
    ``decode_workers``: processes decoding image files on the CPU path (None: one per core; 0: in this one);
    ``decode``: ``cpu`` (PIL in processes), ``gpu`` (JPEG folders on CUDA by nvJPEG: its pixels differ slightly)
    or ``hw`` (by the GPU's JPEG engines); the run context records a GPU decoder in the data identity, so its
    stores are apart.
    """

    device: torch.device
    precision: str = "auto"
    max_patches: int | None = None
    compile_model: bool = False
    shard: tuple[int, int] = (0, 1)
    decode_workers: int | None = None
    decode: str = "cpu"


@dataclass(frozen=True)
class Target:
    """One representation a pass fills: its spec, one store writer per aggregation, how its forwards run, and
    its space (None: the encoder's only one). Targets of one spec in several spaces share their forwards."""

    spec: PatchSpec
    writers: dict[Aggregation, StoreWriter]
    settings: ExtractSettings
    space: str | None = None


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


def _forward_groups(targets: list[Target]) -> list[list[Target]]:
    """The targets of each group of specs that share forwards (:func:`nested_groups`), those of its largest spec
    first: every space of a spec, and every nested bag, is cut from the largest spec's forward."""
    by_spec: dict[PatchSpec, list[Target]] = {}
    for target in targets:
        by_spec.setdefault(target.spec, []).append(target)
    return [[t for spec in group for t in by_spec[spec]] for group in nested_groups(list(by_spec))]


@dataclass(frozen=True)
class _Stretch:
    """Consecutive pending chunks, and the groups (indices into the pass's nested groups) that need any of them."""

    chunks: list[int]
    groups: list[int]


def _stretches(groups: list[list[Target]], shard: tuple[int, int]) -> list[_Stretch]:
    """The pending chunks of this rank in runs of consecutive chunks (a rank's chunks are never consecutive
    when there are several ranks: each chunk is then a run of its own)."""
    rank, world = shard
    needs = [set().union(*(w.pending_chunks() for t in targets for w in t.writers.values())) for targets in groups]
    chunks = sorted(c for c in set().union(*needs) if c % world == rank)
    runs: list[list[int]] = []
    for chunk in chunks:
        if runs and runs[-1][-1] == chunk - 1:
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    return [_Stretch(run, [g for g, need in enumerate(needs) if need.intersection(run)]) for run in runs]


def extract_pass(
    encoder: Encoder, split: ImageSplit, targets: list[Target], *, progress: Progress | None = None
) -> ExtractStats:
    """Fill every target's pending chunks in one pass over ``split``: each batch of images is decoded once and
    cut into every representation; nested random bags run the model once, on the largest bag.

    Batches run on across the chunks of a stretch of consecutive pending chunks (a chunk is written once its
    last row is done), so that every batch but a stretch's last has one size."""
    if not targets:
        return ExtractStats(0, 0, 0.0)
    settings = targets[0].settings
    device = settings.device
    encoder = encoder.to(device).eval()
    if device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
    writers = [w for t in targets for w in t.writers.values()]
    first = writers[0]
    if any(w.chunk_rows != first.chunk_rows or w.rows != first.rows for w in writers):
        raise ValueError("the stores of one pass must share their rows and chunking")
    groups = _forward_groups(targets)
    runners = [PatchRunner(encoder, g[0].spec, g[0].settings, max_images=first.chunk_rows) for g in groups]
    images = ImageSource(split, device, workers=settings.decode_workers, decode=settings.decode)
    fewest = _NVJPEG_MIN_IMAGES if decodes_on_gpu(decoder(split, device, decode=settings.decode)) else 1
    plan = _plan(split, _stretches(groups, settings.shard), runners, first, min(fewest, first.chunk_rows))
    start = time.perf_counter()
    done_images = forwarded = 0
    first_forward_at, first_forward = None, (0.0, 0, 0)
    rows: dict[int, _Rows] = {}
    written = 0
    writes = _ChunkWrites()
    try:
        for (stretch, ends), batch, pixels, sizes in images.iterate(plan):
            active = [t for g in stretch.groups for t in groups[g]]
            if int(batch[0]) == first.chunk_range(stretch.chunks[0])[0]:  # a stretch begins
                rows = {id(w): _Rows() for t in active for w in t.writers.values()}
                written = 0
            patches = 0
            for g in stretch.groups:
                runner = runners[g]
                for features in (runner.feed(pixels, sizes, batch), runner.finish() if ends else None):
                    if features is None:
                        continue
                    for target in groups[g]:
                        cut = features[:, : target.spec.num_patches, encoder.columns(target.space)]
                        for agg, writer in target.writers.items():  # stays on the device: no sync per batch
                            rows[id(writer)].add(agg(cut, target.spec))
                patches += len(batch) * runner.spec.num_patches
            done_images += len(batch)
            forwarded += patches
            if first_forward_at is None and any(r.slices for r in runners):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # once per pass
                first_forward_at = time.time()
                first_forward = (time.perf_counter() - start, done_images, forwarded)
            if progress is not None:
                progress(len(batch), patches)
            while written < len(stretch.chunks) and _chunk_ready(first, stretch.chunks[written], rows.values()):
                _write_chunk(stretch.chunks[written], active, rows, writes)
                written += 1
    except BaseException:
        writes.close()  # the finished chunks still land; the pass's own error is the one raised
        raise
    writes.finish()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    padded = sum(r.padded for r in runners)
    return ExtractStats(done_images, forwarded, seconds, first_forward_at, first_forward, padded)


def _plan(
    split: ImageSplit, stretches: list[_Stretch], runners: list[PatchRunner], writer: StoreWriter, fewest: int
) -> Iterator[tuple[tuple[_Stretch, bool], np.ndarray]]:
    """The pass's decoded batches, drawn as the decoding goes: ``((stretch, whether it is the stretch's last),
    image indices)``. A batch fills about one slice of the stretch's group with the fewest patches, and holds at
    least ``fewest`` images (the forward slices run on across batches, so a batch's size changes no feature),
    cut into the padding groups of its file headers (read here, so only as far ahead as the decoder reads, not
    for the whole split before the first batch)."""
    for stretch in stretches:
        size = max(fewest, *(runners[g].images_per_batch for g in stretch.groups))
        lo, hi = writer.chunk_range(stretch.chunks[0])[0], writer.chunk_range(stretch.chunks[-1])[1]
        batches = list(_batches(lo, hi, size))  # index ranges: no header read yet
        for b, indices in enumerate(batches):
            parts = _bounded(split, indices)
            for i, part in enumerate(parts):
                yield (stretch, b + 1 == len(batches) and i + 1 == len(parts)), part


class _Rows:
    """One store's aggregated rows of a stretch, in row order, handed out chunk by chunk."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []

    @property
    def count(self) -> int:
        return sum(len(part) for part in self.parts)

    def add(self, rows: torch.Tensor) -> None:
        self.parts.append(rows)

    def take(self, count: int) -> torch.Tensor:
        """The next ``count`` rows (the rest stays for the next chunk)."""
        rows = torch.cat(self.parts) if len(self.parts) > 1 else self.parts[0]
        self.parts = [rows[count:]] if len(rows) > count else []
        return rows[:count]


def _chunk_ready(writer: StoreWriter, chunk: int, rows: Iterable[_Rows]) -> bool:
    """Whether every store of the stretch holds the rows of its next chunk (forwards lag behind the decoding)."""
    lo, hi = writer.chunk_range(chunk)
    return all(r.count >= hi - lo for r in rows)


def _write_chunk(chunk: int, targets: list[Target], rows: dict[int, _Rows], writes: _ChunkWrites) -> None:
    for target in targets:
        for writer in target.writers.values():
            lo, hi = writer.chunk_range(chunk)
            done = rows[id(writer)].take(hi - lo)
            if chunk in writer.pending_chunks():  # a complete store's rows of a shared stretch are dropped
                writes.submit(writer, chunk, done)


class _ChunkWrites:
    """Finished chunks written by a background thread while the model runs on. The rows reach the host without a
    sync (a pinned copy on CUDA, behind the work that made them); the checks, the file write, its hash and its
    fsync (about 0.1 s a 4,096-row chunk, the GPU idle meanwhile when done in line) run off the main thread.
    Writes keep their order, and the first that fails is raised at the next chunk or at the end of the pass."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._jobs: list[Future] = []

    def submit(self, writer: StoreWriter, chunk: int, rows: torch.Tensor) -> None:
        self._raise_failed()
        rows = rows.float()  # float32: checked before the store's cast
        ready = None
        if rows.is_cuda:
            host = torch.empty(rows.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(rows, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            rows = host
        self._jobs.append(self._pool.submit(_store_rows, writer, chunk, rows, ready))

    def _raise_failed(self) -> None:
        for job in self._jobs:
            if job.done() and job.exception() is not None:
                raise job.exception()  # type: ignore[misc]
        self._jobs = [job for job in self._jobs if not job.done()]

    def finish(self) -> None:
        """Wait for every write; raise the first failure."""
        try:
            for job in self._jobs:
                job.result()
        finally:
            self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _store_rows(writer: StoreWriter, chunk: int, rows: torch.Tensor, ready: torch.cuda.Event | None) -> None:
    if ready is not None:
        ready.synchronize()  # the copy to the host is done (waits without the GIL)
    writer.write_chunk(chunk, rows.numpy())


def planned_patches(targets: list[Target]) -> int:
    """Patches one process forwards for these targets: per group of nested bags, its largest bag on every image
    of a stretch of pending chunks that the group needs."""
    groups = _forward_groups(targets)
    first = next(iter(targets[0].writers.values()))
    total = 0
    for stretch in _stretches(groups, (0, 1)):
        images = sum(first.chunk_range(c)[1] - first.chunk_range(c)[0] for c in stretch.chunks)
        total += images * sum(groups[g][0].spec.num_patches for g in stretch.groups)
    return total


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting: a pageable host-to-GPU copy blocks the host until the GPU
    has drained its queue (one idle gap per batch), a pinned one is queued behind the running work."""
    if device.type != "cuda":
        return tensor.to(device)
    pinned = tensor if tensor.is_pinned() else tensor.pin_memory()  # the loader's pieces come pinned already
    return pinned.to(device, non_blocking=True)


def input_layout(device: torch.device, *, compiled: bool) -> torch.memory_format:
    """The memory format forward slices reach the encoder in. Eager CUDA forwards take channels-last (cuDNN's
    fast layout, kept through the normalisation); a compiled encoder takes the crops as cut, because its first
    fused kernel normalises them into the convolutions' channels-last itself (a copy before it would be one more
    pass over every slice: about 1% of a 16-patch pass on one H200)."""
    return torch.channels_last if device.type == "cuda" and not compiled else torch.contiguous_format


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
    """Sampler + model for a stream of image batches: each batch's boxes are cut as it comes and forwarded in slices
    of ``max_patches`` that run on across batches (a batch's size, or a large image's group of its own, never
    decides a forward's size), with out-of-memory back-off."""

    def __init__(
        self,
        encoder: Encoder,
        spec: PatchSpec,
        settings: ExtractSettings,
        *,
        max_images: int | None = None,
        pad: bool | None = None,
    ) -> None:
        self.encoder, self.spec, self.device = encoder, spec, settings.device
        self.dtype = _AUTOCAST[resolve_precision(settings.precision, settings.device)]
        # Pillow-resampled crops (the central view) for a reduced-precision forward are computed in float16 on
        # tensor cores (their rounding is below the bf16 rounding of the model's input); float32 runs and CPUs
        # keep float32 crops
        self.crop_dtype = torch.float16 if self.dtype is not None and self.device.type == "cuda" else None
        max_patches = settings.max_patches
        if max_patches is not None and max_patches < 1:
            raise UserError(f"--max-patches must be positive, got {max_patches}")
        self.max_patches = max_patches or default_max_patches(self.device, spec.out_size)
        self.images_per_batch = max(1, min(self.max_patches // spec.num_patches, max_images or sys.maxsize))
        self.forward = encoder.compiled() if settings.compile_model else encoder
        self.layout = input_layout(self.device, compiled=settings.compile_model)
        # a compiled encoder is traced for one input dtype: float16 central crops and float32 box-filtered
        # patches in one pass would compile it twice (2.6 s more on one H200), so it takes float32 (exact)
        self.input_dtype = torch.float32 if settings.compile_model else None
        # static shapes: one compilation, and on CUDA one cuDNN autotuning (about 1.5 s for a ResNet-50 slice of
        # 2k patches), serves every slice: a stream's last slice is padded to full size
        self.pad_slices = (settings.compile_model or self.device.type == "cuda") if pad is None else pad
        self.padded = 0  # patches forwarded only to fill a last slice
        self.slices = 0  # forwards run
        self._crops: list[torch.Tensor] = []  # cut, not yet forwarded
        self._features: list[torch.Tensor] = []  # forwarded, not yet handed out (images still incomplete)

    @property
    def _pending(self) -> int:
        return sum(len(crops) for crops in self._crops)

    @torch.inference_mode()
    def feed(self, pixels: torch.Tensor, sizes: np.ndarray, indices: np.ndarray) -> torch.Tensor | None:
        """Cut a batch's boxes (``pixels``: uint8 or float ``[B, 3, H, W]`` on the device) and forward every full
        slice; returns the patch embeddings ``[k, n, d]`` (float32) of the images whose patches are now all
        forwarded, in order, or None. Each cut converts only its own images to float: a batch stays uint8."""
        spec, n = self.spec, self.spec.num_patches
        boxes = spec.boxes(indices, sizes[:, 0], sizes[:, 1]).reshape(-1, 4)
        boxes_t = to_device(torch.from_numpy(boxes.astype(np.float32)), self.device)
        owner = torch.arange(len(indices), device=self.device).repeat_interleave(n)
        start = 0
        while start < len(boxes):
            end = min(start + max(1, self.max_patches - self._pending), len(boxes))
            first, last = start // n, (end - 1) // n + 1  # the images these boxes belong to
            try:
                crops = crop_and_resize(
                    pixels[first:last],
                    boxes_t[start:end],
                    owner[start:end] - first,
                    spec.out_size,
                    spec.interpolation,
                    spec.antialias,
                    self.crop_dtype,
                )
            except torch.cuda.OutOfMemoryError:
                self._back_off()
                continue
            self._crops.append(crops)
            start = end
            if self._pending >= self.max_patches:
                self._run_pending()
        return self._complete_images()

    @torch.inference_mode()
    def finish(self) -> torch.Tensor | None:
        """Forward what is left (the stream's last slice) and hand out the last images' embeddings."""
        self._run_pending()
        out = self._complete_images()
        assert not self._features, "a stream ended inside an image"
        return out

    def __call__(self, pixels: torch.Tensor, sizes: np.ndarray, indices: np.ndarray) -> torch.Tensor:
        """One batch as a stream of its own: patch embeddings ``[B, n, d]`` (float32)."""
        parts = [p for p in (self.feed(pixels, sizes, indices), self.finish()) if p is not None]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _run_pending(self) -> None:
        """Forward the pending crops in slices of ``max_patches``, taken piece by piece (no concatenation)."""
        pieces, self._crops = self._crops, []
        while pieces:
            taken: list[torch.Tensor] = []
            count = 0
            while pieces and count < self.max_patches:
                piece, need = pieces.pop(0), self.max_patches - count
                if len(piece) > need:
                    piece, rest = piece[:need], piece[need:]
                    pieces.insert(0, rest)
                taken.append(piece)
                count += len(piece)
            try:
                self._features.append(self._forward(taken, count))
            except torch.cuda.OutOfMemoryError:
                self._back_off()
                pieces = taken + pieces

    def _forward(self, pieces: list[torch.Tensor], real: int) -> torch.Tensor:
        """One slice: its pieces copied once into the model's input (in :func:`input_layout`, and float32 for a
        compiled encoder), the last crop repeated to the full size where slices are padded (rows are independent
        in eval mode)."""
        size = self.max_patches if self.pad_slices and real < self.max_patches else real
        first = pieces[0]
        dtype = self.input_dtype or first.dtype
        if len(pieces) == 1 and size == real:
            crops = first.to(dtype, memory_format=self.layout)
        else:
            shape = (size, *first.shape[1:])
            crops = torch.empty(shape, dtype=dtype, device=first.device, memory_format=self.layout)
            offset = 0
            for piece in pieces:
                crops[offset : offset + len(piece)].copy_(piece)
                offset += len(piece)
            crops[real:].copy_(pieces[-1][-1:].expand(size - real, *first.shape[1:]))
        autocast = torch.autocast(self.device.type, self.dtype) if self.dtype is not None else exact_fp32()
        with autocast:
            features = self.forward(crops)[:real].float()
        self.slices += 1  # counted once it ran (an out-of-memory slice is retried smaller)
        self.padded += size - real
        return features

    def _complete_images(self) -> torch.Tensor | None:
        n = self.spec.num_patches
        done = sum(len(f) for f in self._features) // n * n
        if not done:
            return None
        features = torch.cat(self._features) if len(self._features) > 1 else self._features[0]
        self._features = [features[done:]] if len(features) > done else []
        return features[:done].view(done // n, n, -1)

    def _back_off(self) -> None:
        torch.cuda.empty_cache()
        if self.max_patches == 1:
            raise UserError("out of GPU memory even for one patch per forward; use --device cpu")
        self.max_patches //= 2
        log.warning("CUDA out of memory: forward slices reduced to %d patches", self.max_patches)


GPU_DECODERS = {"gpu": "nvjpeg", "hw": "nvjpeg-hw"}  # --decode setting -> the decoder's recorded name


def decodes_on_gpu(name: str) -> bool:
    """Whether the decoder ``name`` (as :func:`decoder` names it) runs on the GPU: its pixels differ slightly
    from Pillow's, so the split's identity names it."""
    return name in GPU_DECODERS.values()


def decoder(split: ImageSplit, device: torch.device, *, decode: str = "cpu") -> str:
    """Which decoder reads a split's images: ``memory`` (none), for JPEG files on CUDA with ``decode`` gpu or hw
    ``nvjpeg`` (nvJPEG's CUDA decoder) or ``nvjpeg-hw`` (the GPU's JPEG engines), else ``processes`` (PIL)."""
    if split.array is not None:
        return "memory"
    if decode in GPU_DECODERS and device.type == "cuda" and all_jpeg(split.paths or []):
        return GPU_DECODERS[decode]
    return "processes"


class ImageSource:
    """Images by index as uint8 ``[B, 3, H, W]`` on the device, with their true sizes.

    In-memory splits are moved to the device once (uint8). File-backed splits are decoded ahead of the model
    (:mod:`ssl_patchbench.data.batches`): by one process per core, or, with ``decode`` gpu or hw, JPEG folders on
    CUDA by nvJPEG or the GPU's JPEG engines; each batch padded to its largest image (boxes never leave an
    image's own area, so padding is never sampled).
    """

    def __init__(
        self, split: ImageSplit, device: torch.device, *, workers: int | None = None, decode: str = "cpu"
    ) -> None:
        self.split, self.device, self.workers, self.decode = split, device, workers, decode
        self.resident: torch.Tensor | None = None
        if split.array is not None:
            array = torch.from_numpy(np.ascontiguousarray(split.array))
            fits = device.type != "cuda" or array.numel() <= _GPU_RESIDENT_MAX_BYTES
            self.resident = array.to(device) if fits else array

    def iterate(
        self, batches: Iterable[tuple[Tag, np.ndarray]]
    ) -> Iterator[tuple[Tag, np.ndarray, torch.Tensor, np.ndarray]]:
        """Yield ``(tag, indices, pixels, sizes)`` per ``(tag, indices)`` of ``batches`` (uint8 pixels), decoding
        the next batches while this one runs. ``batches`` is drawn by the decoder alone (a background thread for
        nvJPEG), as far ahead as it reads; the tags come back in order."""
        drawn: deque[tuple[Tag, np.ndarray]] = deque()  # appends and pops are atomic: safe across the threads

        def indices() -> Iterator[np.ndarray]:
            for tag, batch in batches:
                drawn.append((tag, batch))
                yield batch

        for pixels, sizes in self._decoded(indices()):
            tag, batch = drawn.popleft()
            yield tag, batch, pixels, sizes

    def _decoded(self, batches: Iterator[np.ndarray]) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        if self.resident is not None:
            for indices in batches:
                yield self._slice(indices)
            return
        paths = self.split.paths or []
        name = decoder(self.split, self.device, decode=self.decode)
        if decodes_on_gpu(name):
            yield from nvjpeg_batches(paths, batches, self.device, hardware=name == GPU_DECODERS["hw"])
            return
        # each piece goes to the device as it comes (pinned by the loader) and the batch is joined there
        for parts in process_pieces(paths, batches, workers=self.workers, pin=self.device.type == "cuda"):
            uint8, sizes = join_padded([(to_device(pixels, self.device), part_sizes) for pixels, part_sizes in parts])
            yield uint8.permute(0, 3, 1, 2), sizes

    def _slice(self, indices: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        index = torch.from_numpy(indices)
        if self.resident.is_cuda:  # type: ignore[union-attr]
            batch = self.resident[to_device(index, self.device)]  # type: ignore[index]
        else:
            batch = to_device(self.resident[index], self.device)  # type: ignore[index]
        sizes = np.tile(batch.shape[1:3], (len(indices), 1))
        return batch.permute(0, 3, 1, 2), sizes


def _bounded(split: ImageSplit, batch: np.ndarray) -> list[np.ndarray]:
    """``batch`` cut into the padding groups of :func:`padding_groups` (sizes from the file headers): one large
    image among small ones is not padded into, nor makes the whole batch padded to its size."""
    if split.paths is None:
        return [batch]
    return [batch[lo:hi] for lo, hi in padding_groups(split.sizes(batch), _PADDED_MAX_BYTES)]


def padding_groups(sizes: np.ndarray, max_bytes: int, max_ratio: float = _PADDING_MAX_RATIO) -> list[tuple[int, int]]:
    """``(lo, hi)`` ranges of consecutive images whose uint8 RGB copies, padded to the group's largest height and
    width, take at most ``max_bytes`` and at most ``max_ratio`` times the images' own pixels (an image larger than
    that on its own is a group of one): ImageNet's mixed sizes pad by about 1.4x, while small images beside a huge
    photo would each be held, and converted to float, at the photo's size."""
    groups: list[tuple[int, int]] = []
    lo, height, width, own = 0, 0, 0, 0
    for i, (h, w) in enumerate(sizes.tolist()):
        grown_h, grown_w = max(height, h), max(width, w)
        padded = (i - lo + 1) * grown_h * grown_w
        if i > lo and (padded * 3 > max_bytes or padded > max_ratio * (own + h * w)):
            groups.append((lo, i))
            lo, grown_h, grown_w, own = i, h, w, 0
        height, width, own = grown_h, grown_w, own + h * w
    groups.append((lo, len(sizes)))
    return groups
