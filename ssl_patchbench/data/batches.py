"""Batches of decoded images for file-backed splits, several batches ahead of the model.

Two decoders, both padding every image of a batch to the batch's largest by replicating its last row and
column (``roi_align`` clamps at an image's edge the same way, and boxes never leave an image, so padding
never changes a feature):

- :func:`process_batches`: :func:`ssl_patchbench.data.decode.decode` (PIL) in worker processes, one per
  core, through a torch ``DataLoader`` (decoding is CPU-bound: threads of one process share one GIL).
- :func:`nvjpeg_batches`: JPEG files decoded on the GPU by nvJPEG (``torchvision.io.decode_jpeg``) in a
  background thread on a side CUDA stream, two batches ahead; a planner thread draws the next batch and a
  thread pool reads and checks its files (``torchvision.io.read_file``) while the current one decodes. JPEGs
  nvJPEG should not see (not 3 components, e.g. grey or CMYK; no end marker, e.g. truncated) and other files
  go through the CPU decoder, which names a bad file in one error line. With a CPU share, Pillow processes
  decode a fixed part of every batch (by image index) at the same time, and both parts are padded into one
  batch on the GPU (:func:`pad_mixed`).
"""

from __future__ import annotations

import functools
import multiprocessing
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress

import numpy as np
import torch

from ssl_patchbench.core.devices import available_cores
from ssl_patchbench.core.errors import UserError
from ssl_patchbench.core.shares import submit_shares
from ssl_patchbench.data.check import TAIL_BYTES, ends_whole
from ssl_patchbench.data.decode import HEADER_BYTES, JPEG_SUFFIXES, checked_jpeg_header, decode, unreadable_file

Batch = tuple[torch.Tensor, np.ndarray]  # (uint8 pixels, true sizes [B, 2] as (height, width))
_AHEAD = 2  # decoded batches waiting for the model (per worker process: pieces)
_PIECE = 32  # images one decoding process hands back at a time
_NVJPEG_BATCH = 2048  # images per nvJPEG call: a central batch in one (beside the encoder, calls of 256 starve)
_READERS = 4  # threads reading a batch's files for nvJPEG, each a share (read_file releases the GIL)
_PAD_INDEX_ELEMENTS = 1 << 25  # gather indices (int64) that pad_chw builds at a time: 256 MB
SHARE_OF = 8  # a mixed batch gives Pillow a share of every SHARE_OF images (cpu_rows)


def pad_numpy(images: Sequence[np.ndarray]) -> Batch:
    """``[h, w, 3]`` uint8 images -> ``[B, H, W, 3]`` (edge-replicated to the largest) and their sizes.

    Written in place into one array (``np.pad`` + ``np.stack`` cost a quarter of a JPEG's decode)."""
    sizes = np.array([im.shape[:2] for im in images])
    height, width = sizes.max(axis=0)
    out = np.empty((len(images), height, width, 3), dtype=np.uint8)
    for row, im in zip(out, images, strict=True):
        h, w = im.shape[:2]
        row[:h, :w] = im
        row[:h, w:] = im[:, w - 1 : w]
        row[h:] = row[h - 1 : h]
    return torch.from_numpy(out), sizes


def pad_chw(images: Sequence[torch.Tensor]) -> Batch:
    """``[3, h, w]`` images (any device) -> ``[B, 3, H, W]`` (edge-replicated to the largest) and their sizes."""
    sizes = np.array([im.shape[1:] for im in images])
    if (sizes == sizes[0]).all():
        return torch.stack(list(images)), sizes
    return pad_mixed(images, [], np.zeros(len(images), dtype=bool))


def pad_mixed(chw: Sequence[torch.Tensor], hwc_runs: Sequence[Batch], is_hwc: np.ndarray) -> Batch:
    """One ``[B, 3, H, W]`` batch (edge-replicated to the largest image) and its sizes, from two kinds of images
    on one device: ``[3, h, w]`` tensors (nvJPEG's) for the rows where ``is_hwc`` is False, and flat runs of
    consecutive ``[h, w, 3]`` images with their sizes (the CPU decoders', unpadded) for the rows where it is True,
    each kind in row order.

    The images are joined end to end (one ``cat``), then every padded pixel is read from its image, at its row
    and column clamped to the image and at its layout's strides (``index_select`` of a few chunks of images): a
    few dozen kernels per batch, where a copy per image would be thousands, whose launches fill the GPU's queue
    behind the model's work."""
    chw_sizes = np.array([im.shape[1:] for im in chw], dtype=np.int64).reshape(-1, 2)
    hwc_sizes = np.concatenate([s for _, s in hwc_runs]) if hwc_runs else np.zeros((0, 2), dtype=np.int64)
    chw_starts = _run_starts(chw_sizes)
    hwc_starts = _run_starts(hwc_sizes) + 3 * int((chw_sizes[:, 0] * chw_sizes[:, 1]).sum())
    sizes = np.empty((len(is_hwc), 2), dtype=np.int64)
    starts = np.empty(len(is_hwc), dtype=np.int64)
    sizes[~is_hwc], starts[~is_hwc] = chw_sizes, chw_starts
    sizes[is_hwc], starts[is_hwc] = hwc_sizes, hwc_starts
    h, w = sizes[:, 0], sizes[:, 1]
    # element (channel, row, column) of an image lies at start + channel * cs + row * rs + column * ks
    strides = np.where(is_hwc[:, None], np.stack([np.ones_like(h), 3 * w, np.full_like(h, 3)], 1),
                       np.stack([h * w, w, np.ones_like(h)], 1))  # fmt: skip
    device = chw[0].device if len(chw) else hwc_runs[0][0].device
    flat = torch.cat([im.reshape(-1) for im in chw] + [run for run, _ in hwc_runs])
    meta = torch.from_numpy(np.concatenate([starts[:, None], strides, sizes], axis=1)).to(device, non_blocking=True)
    height, width = (int(v) for v in sizes.max(axis=0))
    out = torch.empty((len(sizes), 3, height, width), dtype=torch.uint8, device=device)
    rows, cols, channels = (torch.arange(n, device=device) for n in (height, width, 3))
    step = max(1, _PAD_INDEX_ELEMENTS // (3 * height * width))
    for lo in range(0, len(sizes), step):
        start, cs, rs, ks, h, w = meta[lo : lo + step].unbind(1)
        row_starts = rows.minimum(h[:, None] - 1) * rs[:, None]  # [b, H]: row r reads row min(r, h - 1)
        col = cols.minimum(w[:, None] - 1) * ks[:, None]  # [b, W]
        plane_starts = start[:, None] + channels * cs[:, None]  # [b, 3]
        index = plane_starts[:, :, None, None] + row_starts[:, None, :, None] + col[:, None, None, :]
        torch.index_select(flat, 0, index.view(-1), out=out[lo : lo + step].view(-1))
    return out, sizes


def _run_starts(sizes: np.ndarray) -> np.ndarray:
    """Where each of consecutive RGB images of ``sizes`` starts in their flat run."""
    lengths = 3 * sizes[:, 0].astype(np.int64) * sizes[:, 1]
    return np.cumsum(lengths) - lengths


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray | UserError:
        try:
            return decode(self.paths[index])
        except UserError as exc:  # handed to the parent as a value: one error line there, no worker traceback
            return exc


def flat_run(images: Sequence[np.ndarray]) -> Batch:
    """``[h, w, 3]`` uint8 images -> their bytes end to end (one flat tensor) and their sizes: the CPU share of a
    mixed batch, padded on the GPU with the nvJPEG share (:func:`pad_mixed`)."""
    sizes = np.array([im.shape[:2] for im in images])
    return torch.from_numpy(np.concatenate([im.reshape(-1) for im in images])), sizes


def _collate(images: list[np.ndarray | UserError], join: Callable[[Sequence[np.ndarray]], Batch]) -> Batch | UserError:
    errors = [im for im in images if isinstance(im, UserError)]
    return errors[0] if errors else join(images)  # type: ignore[arg-type]


def decode_workers() -> int:
    """One decoding process per core this process may use."""
    return available_cores()


def process_batches(
    paths: Sequence[str], batches: Iterable[np.ndarray], *, workers: int | None = None
) -> Iterator[Batch]:
    """``[B, H, W, 3]`` uint8 batches of ``paths[indices]``, decoded by ``workers`` processes (0: in this one)."""
    for parts in process_pieces(paths, batches, workers=workers):
        yield join_padded(parts)


def process_pieces(
    paths: Sequence[str],
    batches: Iterable[np.ndarray],
    *,
    workers: int | None = None,
    pin: bool = False,
    flat: bool = False,
) -> Iterator[list[Batch]]:
    """Per batch, its decoded pieces: ``[b, h, w, 3]`` uint8 runs of at most ``_PIECE`` consecutive images, each
    edge-padded to its own largest (:func:`join_padded` makes the batch, on whichever device they are moved to);
    ``flat``: each piece unpadded, its images' bytes end to end (:func:`flat_run`). A batch of no images has none.

    Each process decodes pieces (a batch of two thousand is thus shared by every core, not decoded by one);
    ``pin``: the loader's own thread copies each piece into pinned memory, ready for an asynchronous copy to a
    GPU, so the consumer never copies a whole batch on the host. ``batches`` is drawn only as far as the
    loader reads ahead (a plan that reads file headers reads them as the decoding goes)."""
    workers = decode_workers() if workers is None else workers
    workers = min(workers, -(-len(paths) // _PIECE))
    counts: deque[int] = deque()  # pieces per batch, in the order the loader drew them

    def pieces() -> Iterator[list[int]]:
        for indices in batches:
            cut = [indices[i : i + _PIECE].tolist() for i in range(0, len(indices), _PIECE)]
            counts.append(len(cut))
            yield from cut

    loader = torch.utils.data.DataLoader(
        _Files(paths),
        batch_sampler=pieces(),
        num_workers=workers,
        collate_fn=functools.partial(_collate, join=flat_run if flat else pad_numpy),
        pin_memory=pin,
        prefetch_factor=_AHEAD if workers else None,
        multiprocessing_context=_fork() if workers else None,
    )
    decoded = iter(loader)
    for first in decoded:  # a batch's first piece is drawn after its count was, and after those of empty batches
        while counts[0] == 0:
            counts.popleft()
            yield []
        parts = [first, *(next(decoded) for _ in range(counts.popleft() - 1))]
        for part in parts:
            if isinstance(part, UserError):
                raise part
        yield parts
    for _ in counts:  # the empty batches after the last piece
        yield []


def join_padded(parts: Sequence[Batch]) -> Batch:
    """Edge-padded ``[b, h, w, 3]`` pieces (on one device) -> one ``[B, H, W, 3]`` batch there, each piece
    edge-padded further (an edge-padded image padded again by its last row and column is the image edge-padded
    once)."""
    if len(parts) == 1:
        return parts[0]
    sizes = np.concatenate([s for _, s in parts])
    height, width = (int(v) for v in sizes.max(axis=0))
    out = torch.empty((len(sizes), height, width, 3), dtype=torch.uint8, device=parts[0][0].device)
    start = 0
    for pixels, _ in parts:
        b, h, w = pixels.shape[:3]
        rows = out[start : start + b]
        rows[:, :h, :w] = pixels
        rows[:, :h, w:] = pixels[:, :, w - 1 : w]
        rows[:, h:] = rows[:, h - 1 : h]
        start += b
    return out, sizes


def _fork() -> multiprocessing.context.BaseContext | None:
    """fork starts workers in milliseconds (they only run PIL, never CUDA); elsewhere the platform default."""
    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


def all_jpeg(paths: Sequence[str]) -> bool:
    """Whether every file is named as a JPEG (the nvJPEG decoder's case)."""
    return bool(paths) and all(p.lower().endswith(JPEG_SUFFIXES) for p in paths)


def _for_nvjpeg(path: str, data: torch.Tensor) -> bool:
    """True for a complete 3-component JPEG within the pixel limit; False sends the file to the CPU decoder."""
    raw = data.numpy()  # a view: numpy slices cost a fraction of tensor slices
    header = checked_jpeg_header(path, raw[:HEADER_BYTES].tobytes())
    if header is None and len(raw) > HEADER_BYTES:  # a frame header behind large metadata segments
        header = checked_jpeg_header(path, raw.tobytes())
    return header is not None and header[2] == 3 and ends_whole(raw[-TAIL_BYTES:].tobytes(), "JPEG")


def _read(path: str) -> torch.Tensor:
    """A file's bytes as a uint8 tensor, read in C++ (``torchvision.io.read_file``: no Python bytes copied,
    the GIL released: a thread pool reads in parallel)."""
    from torchvision.io import read_file

    try:
        return read_file(path)
    except RuntimeError:  # its message is C++'s: Python's open names the cause, in the CPU path's words
        try:
            with open(path, "rb") as f:
                return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        except OSError as exc:
            raise unreadable_file(path, exc) from exc


def _read_all(paths: Sequence[str]) -> list[torch.Tensor]:
    return [_read(path) for path in paths]


def _read_checked(paths: Sequence[str]) -> list[tuple[torch.Tensor, bool]]:
    return [(data, _for_nvjpeg(path, data)) for path, data in zip(paths, _read_all(paths), strict=True)]


def read_shares(readers: ThreadPoolExecutor, paths: Sequence[str], *, check: bool = False) -> list[Future]:
    """The files read by ``readers`` (``_READERS`` threads), one task per share of them
    (:mod:`ssl_patchbench.core.shares`); each future gives its share's tensors, in order. ``check``: each tensor
    comes with whether nvJPEG may decode it (:func:`_for_nvjpeg`, run in the readers, off the decoder's thread)."""
    return submit_shares(readers, _read_checked if check else _read_all, paths, _READERS)


def nvjpeg_batches(
    paths: Sequence[str],
    batches: Iterable[np.ndarray],
    device: torch.device,
    *,
    cpu_share: int = 0,
    workers: int | None = None,
) -> Iterator[Batch]:
    """``[B, 3, H, W]`` uint8 batches on ``device``, decoded by nvJPEG up to two batches ahead of the caller.

    ``cpu_share``: of every ``SHARE_OF`` consecutive images (by index, :func:`cpu_rows`) that many are decoded by
    ``workers`` Pillow processes (:func:`process_pieces`) while nvJPEG decodes the others, the two halves of
    each batch joined on the device: beside the model nvJPEG alone is held to about half its rate, and the CPU's
    cores add theirs. Each batch is ready for the caller's current stream when yielded (it waits on the decode
    stream's event). ``batches`` is drawn by one planner thread one batch ahead of the decoding (its files read
    meanwhile) and, for the CPU share, by the decoding processes' loader as far ahead as it reads.
    """
    out: queue.Queue = queue.Queue(maxsize=_AHEAD)
    stop = threading.Event()
    args = (paths, batches, device, cpu_share, workers, out, stop)
    producer = threading.Thread(target=_produce, args=args, daemon=True)
    producer.start()
    try:
        while True:
            item = _take(out, stop)
            if item is None:
                return
            pixels, sizes, ready = item
            stream = torch.cuda.current_stream(device)
            stream.wait_event(ready)
            pixels.record_stream(stream)  # its memory is not reused before this stream is done with it
            yield pixels, sizes
    finally:
        stop.set()
        producer.join()


def cpu_rows(indices: np.ndarray, cpu_share: int) -> np.ndarray:
    """Which of ``indices`` the CPU decodes in a mixed batch: ``cpu_share`` of every ``SHARE_OF`` by image index,
    so that an image's pixels never depend on how a pass cuts its batches."""
    return (indices % SHARE_OF) < cpu_share


def nvjpeg_cpu_share(workers: int) -> int:
    """The CPU's share of a mixed batch for ``workers`` decoding processes: about its part of the two decoders'
    rate (one H200 machine, 2026-12-02: Pillow about 460 images/s a core at ImageNet sizes, nvJPEG about 8,500
    beside a ResNet-50), at most half; below 4 cores nvJPEG decodes alone."""
    return min(SHARE_OF // 2, workers // 4)


def nvjpeg_name(cpu_share: int) -> str:
    """The nvJPEG decoder's name in records and store keys: ``nvjpeg``, or ``nvjpeg+pil 4/8`` where Pillow decodes
    4 of every 8 images (whose pixels are then Pillow's)."""
    return f"nvjpeg+pil {cpu_share}/{SHARE_OF}" if cpu_share else "nvjpeg"


def nvjpeg_decode(datas: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """The JPEG bitstreams ``datas`` decoded by nvJPEG in one call, ``[3, H, W]`` each on ``device``.

    Where nvJPEG refuses a call (one JPEG it cannot decode fails the whole call), each half is tried again, down
    to single images: only the refused ones come back as None, for the CPU decoder."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        if len(datas) == 1:
            return [None]
        half = len(datas) // 2
        return nvjpeg_decode(datas[:half], device) + nvjpeg_decode(datas[half:], device)


class _Tee:
    """One iterator read in order by ``readers`` threads, each seeing every item: whichever reader is ahead draws
    the next item (under a lock; the others' copies wait in their queues)."""

    def __init__(self, items: Iterable, readers: int) -> None:
        self._items, self._lock = iter(items), threading.Lock()
        self._queues: list[deque] = [deque() for _ in range(readers)]

    def reader(self, k: int) -> Iterator:
        while True:
            with self._lock:
                if not self._queues[k]:
                    item = next(self._items, _END)
                    for q in self._queues:
                        q.append(item)
                item = self._queues[k].popleft()
            if item is _END:
                return
            yield item


_END = object()


def _put(out: queue.Queue, stop: threading.Event, item: object) -> bool:
    """``item`` into ``out`` once there is room; False (dropped) once ``stop`` is set."""
    while not stop.is_set():
        with suppress(queue.Full):
            out.put(item, timeout=0.1)
            return True
    return False


def _take(source: queue.Queue, stop: threading.Event) -> object:
    """The next item of ``source`` (an exception is raised here, in the taker's thread); None once ``stop`` is set
    or the producer said it is done."""
    while not stop.is_set():
        with suppress(queue.Empty):
            item = source.get(timeout=0.1)
            if isinstance(item, BaseException):
                raise item
            return item
    return None


def _decode_cpu_share(
    paths: Sequence[str],
    plan: Iterator[np.ndarray],
    cpu_share: int,
    workers: int | None,
    pin: bool,
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    """Each planned batch's CPU rows decoded by processes, as flat runs (pinned for a GPU), one item per batch."""
    try:
        shares = (indices[cpu_rows(indices, cpu_share)] for indices in plan)
        for parts in process_pieces(paths, shares, workers=workers, pin=pin, flat=True):
            if not _put(out, stop, parts):
                return
    except BaseException as exc:  # re-raised in the decoding thread, which hands it on
        _put(out, stop, exc)


def _decode_gpu_share(names: Sequence[str], checked: Sequence[tuple[torch.Tensor, bool]], device: torch.device):
    """The files ``names`` (read and checked: ``(bytes, whether nvJPEG may decode it)``) as ``[3, h, w]`` images on
    ``device``: nvJPEG in calls of up to ``_NVJPEG_BATCH``; the files it may not or will not decode by Pillow."""
    images: list[torch.Tensor | None] = [None] * len(names)
    gpu = [i for i, (_, ok) in enumerate(checked) if ok]
    for lo in range(0, len(gpu), _NVJPEG_BATCH):
        part = gpu[lo : lo + _NVJPEG_BATCH]
        for i, image in zip(part, nvjpeg_decode([checked[i][0] for i in part], device), strict=True):
            images[i] = image
    for i, image in enumerate(images):
        if image is None:  # torch.tensor copies Pillow's read-only array
            images[i] = torch.tensor(decode(names[i]), device=device).permute(2, 0, 1)
    return images


def _produce(
    paths: Sequence[str],
    batches: Iterable[np.ndarray],
    device: torch.device,
    cpu_share: int,
    workers: int | None,
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    stream = torch.cuda.Stream(device)
    plan = _Tee(batches, 2 if cpu_share else 1)
    cpu_done: queue.Queue = queue.Queue(maxsize=_AHEAD)
    try:
        if cpu_share:
            args = (paths, plan.reader(1), cpu_share, workers, device.type == "cuda", cpu_done, stop)
            threading.Thread(target=_decode_cpu_share, args=args, daemon=True).start()
        with ThreadPoolExecutor(max_workers=_READERS) as readers, ThreadPoolExecutor(max_workers=1) as planner:
            upcoming = plan.reader(0)

            def draw() -> tuple[np.ndarray | None, np.ndarray, list[Future]]:
                """The next batch, which of its rows the CPU decodes, the other files' reads under way (in the
                planner thread: drawing a batch reads its file headers, which then overlaps this thread's
                decoding)."""
                indices = next(upcoming, None)
                if indices is None:
                    return None, np.zeros(0, dtype=bool), []
                on_cpu = cpu_rows(indices, cpu_share)
                return indices, on_cpu, read_shares(readers, [paths[i] for i in indices[~on_cpu].tolist()], check=True)

            ahead = planner.submit(draw)
            while True:
                indices, on_cpu, pending = ahead.result()
                if indices is None or stop.is_set():
                    break
                checked = [c for f in pending for c in f.result()]
                ahead = planner.submit(draw)
                with torch.cuda.stream(stream):
                    images = _decode_gpu_share([paths[i] for i in indices[~on_cpu].tolist()], checked, device)
                    runs = _take(cpu_done, stop) if cpu_share else []  # one item per batch, [] for no CPU rows
                    if runs is None:
                        break
                    if on_cpu.any():
                        runs = [(run.to(device, non_blocking=True), run_sizes) for run, run_sizes in runs]
                        pixels, sizes = pad_mixed(images, runs, on_cpu)
                    else:
                        pixels, sizes = pad_chw(images)
                    ready = torch.cuda.Event()
                    ready.record(stream)
                if not _put(out, stop, (pixels, sizes, ready)):
                    break
        _put(out, stop, None)
    except BaseException as exc:  # re-raised in the consumer's thread
        _put(out, stop, exc)
