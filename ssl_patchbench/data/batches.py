"""Batches of decoded images for file-backed splits, several batches ahead of the model.

Three decoders, all padding every image of a batch to the batch's largest by replicating its last row and
column (``roi_align`` clamps at an image's edge the same way, and boxes never leave an image, so padding
never changes a feature):

- :func:`process_batches`: :func:`ssl_patchbench.data.decode.decode` (PIL) in worker processes, one per
  core, through a torch ``DataLoader`` (decoding is CPU-bound: threads of one process share one GIL).
- :func:`nvjpeg_batches`: JPEG files decoded on the GPU by nvJPEG (``torchvision.io.decode_jpeg``) in a
  background thread on a side CUDA stream, two batches ahead; a planner thread draws the next batch and a
  thread pool reads and checks its files (``torchvision.io.read_file``) while the current one decodes. JPEGs
  nvJPEG should not see (not 3 components, e.g. grey or CMYK; no end marker, e.g. truncated) and other files
  go through the CPU decoder, which names a bad file in one error line.
- the same thread with ``hardware=True``: the GPU's hardware JPEG engines (A100, H100, H200 and newer) through
  nvImageCodec (an optional package) instead of nvJPEG's CUDA decoder. Its pixels are libjpeg-turbo's (PIL's)
  to within one level in a few pixels, where the CUDA decoder's differ visibly; an image the engines refuse
  goes to the CPU decoder.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress

import numpy as np
import torch

from ssl_patchbench.core.devices import available_cores
from ssl_patchbench.core.errors import UserError
from ssl_patchbench.core.shares import submit_shares
from ssl_patchbench.data.check import TAIL_BYTES, ends_whole
from ssl_patchbench.data.decode import (
    HEADER_BYTES,
    JPEG_SUFFIXES,
    OtherSize,
    checked_jpeg_header,
    decode,
    unreadable_file,
)

Batch = tuple[torch.Tensor, np.ndarray]  # (uint8 pixels, true sizes [B, 2] as (height, width))
_AHEAD = 2  # decoded batches waiting for the model (per worker process: pieces)
_PIECE = 32  # images one decoding process hands back at a time
_NVJPEG_BATCH = 2048  # images per nvJPEG call: a central batch in one (beside the encoder, calls of 256 starve)
_READERS = 4  # threads reading a batch's files for nvJPEG, each a share (read_file releases the GIL)
_PAD_INDEX_ELEMENTS = 1 << 25  # gather indices (int64) that pad_chw builds at a time: 256 MB
_HARDWARE_DECODERS: dict[int, object] = {}  # device index -> nvImageCodec decoder (made once: it starts threads)


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
    """``[3, h, w]`` images (any device) -> ``[B, 3, H, W]`` (edge-replicated to the largest) and their sizes.

    The images are joined end to end (one ``cat``), then every padded pixel is read from its image, at its row
    and column clamped to the image (``index_select`` of a few chunks of images): a few dozen kernels per batch,
    where a copy per image would be thousands, whose launches fill the GPU's queue behind the model's work."""
    sizes = np.array([im.shape[1:] for im in images])
    height, width = (int(s) for s in sizes.max(axis=0))
    if (sizes == (height, width)).all():
        return torch.stack(list(images)), sizes
    device = images[0].device
    flat = torch.cat([im.reshape(-1) for im in images])
    planes = sizes[:, 0] * sizes[:, 1]
    starts = np.concatenate([[0], np.cumsum(3 * planes)[:-1]])
    meta = torch.from_numpy(np.stack([starts, planes, sizes[:, 0], sizes[:, 1]], axis=1).astype(np.int64))
    meta = meta.to(device, non_blocking=True)
    out = torch.empty((len(images), 3, height, width), dtype=torch.uint8, device=device)
    rows, cols, channels = (torch.arange(n, device=device) for n in (height, width, 3))
    step = max(1, _PAD_INDEX_ELEMENTS // (3 * height * width))
    for lo in range(0, len(images), step):
        start, plane, h, w = meta[lo : lo + step].unbind(1)
        row_starts = rows.minimum(h[:, None] - 1) * w[:, None]  # [b, H]: row r reads row min(r, h - 1)
        col = cols.minimum(w[:, None] - 1)  # [b, W]
        plane_starts = start[:, None] + channels * plane[:, None]  # [b, 3]
        index = plane_starts[:, :, None, None] + row_starts[:, None, :, None] + col[:, None, None, :]
        torch.index_select(flat, 0, index.view(-1), out=out[lo : lo + step].view(-1))
    return out, sizes


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], size: tuple[int, int] | None) -> None:
        self.paths = paths
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray | UserError | OtherSize:
        try:
            return decode(self.paths[index], self.size)
        except (UserError, OtherSize) as exc:  # handed to the parent as a value: no worker traceback
            return exc


def _collate(images: list[np.ndarray | UserError | OtherSize]) -> Batch | UserError | OtherSize:
    errors = [im for im in images if isinstance(im, Exception)]
    return errors[0] if errors else pad_numpy(images)  # type: ignore[arg-type]


def decode_workers() -> int:
    """One decoding process per core this process may use."""
    return available_cores()


def process_batches(
    paths: Sequence[str],
    batches: Iterable[np.ndarray],
    *,
    workers: int | None = None,
    size: tuple[int, int] | None = None,
    piece: int = _PIECE,
) -> Iterator[Batch]:
    """``[B, H, W, 3]`` uint8 batches of ``paths[indices]``, decoded by ``workers`` processes (0: in this one);
    with ``size`` (height, width), the first image of another size raises :class:`OtherSize`, undecoded."""
    for parts in process_pieces(paths, batches, workers=workers, size=size, piece=piece):
        yield join_padded(parts)


def process_pieces(
    paths: Sequence[str],
    batches: Iterable[np.ndarray],
    *,
    workers: int | None = None,
    pin: bool = False,
    size: tuple[int, int] | None = None,
    piece: int = _PIECE,
) -> Iterator[list[Batch]]:
    """Per batch, its decoded pieces: ``[b, h, w, 3]`` uint8 runs of at most ``piece`` consecutive images, each
    edge-padded to its own largest (:func:`join_padded` makes the batch, on whichever device they are moved to).

    Each process decodes pieces (a batch of two thousand is thus shared by every core, not decoded by one);
    ``pin``: the loader's own thread copies each piece into pinned memory, ready for an asynchronous copy to a
    GPU, so the consumer never copies a whole batch on the host. ``batches`` is drawn only as far as the
    loader reads ahead (a plan that reads file headers reads them as the decoding goes)."""
    workers = decode_workers() if workers is None else workers
    workers = min(workers, -(-len(paths) // piece))
    counts: deque[int] = deque()  # pieces per batch, in the order the loader drew them

    def pieces() -> Iterator[list[int]]:
        for indices in batches:
            cut = [indices[i : i + piece].tolist() for i in range(0, len(indices), piece)]
            counts.append(len(cut))
            yield from cut

    loader = torch.utils.data.DataLoader(
        _Files(paths, size),
        batch_sampler=pieces(),
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin,
        prefetch_factor=_AHEAD if workers else None,
        multiprocessing_context=_fork() if workers else None,
    )
    decoded = iter(loader)
    try:
        for first in decoded:  # a batch's first piece is drawn after its count was
            parts = [first, *(next(decoded) for _ in range(counts.popleft() - 1))]
            for part in parts:
                if isinstance(part, Exception):
                    raise part
            yield parts
    finally:
        # the workers stop now, not whenever the error's traceback (which holds this frame) is collected
        del decoded


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
    paths: Sequence[str], batches: Iterable[np.ndarray], device: torch.device, *, hardware: bool = False
) -> Iterator[Batch]:
    """``[B, 3, H, W]`` uint8 batches on ``device``, decoded by nvJPEG up to two batches ahead of the caller
    (``hardware``: by the GPU's JPEG engines, :func:`hardware_decode`).

    Each batch is ready for the caller's current stream when yielded (it waits on the decode stream's event).
    ``batches`` is drawn by one planner thread, one batch ahead of the decoding (its files read meanwhile).
    """
    out: queue.Queue = queue.Queue(maxsize=_AHEAD)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(paths, batches, device, hardware, out, stop), daemon=True)
    producer.start()
    try:
        while True:
            item = out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            pixels, sizes, ready = item
            stream = torch.cuda.current_stream(device)
            stream.wait_event(ready)
            pixels.record_stream(stream)  # its memory is not reused before this stream is done with it
            yield pixels, sizes
    finally:
        stop.set()
        while producer.is_alive():  # unblock a producer waiting on a full queue
            with suppress(queue.Empty):
                out.get(timeout=0.1)


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


def hardware_decoder(device: torch.device):  # -> nvidia.nvimgcodec.Decoder
    """The device's hardware JPEG decoder (nvImageCodec's ``HW_GPU_ONLY`` backend), made once per device; a
    UserError where nvImageCodec is not installed or the GPU has no JPEG engine."""
    index = torch.device(device).index or 0
    if index not in _HARDWARE_DECODERS:
        try:
            import nvidia.nvimgcodec as nvimgcodec
        except ImportError:
            cuda = "13" if (torch.version.cuda or "12").startswith("13") else "12"
            raise UserError(
                f"--decode hw needs nvImageCodec: pip install -e '.[hw-jpeg-cu{cuda}]' (nvidia-nvimgcodec-cu{cuda} "
                f"and nvJPEG's libraries for this torch's CUDA {torch.version.cuda})"
            ) from None
        try:
            hardware = nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)
            _HARDWARE_DECODERS[index] = nvimgcodec.Decoder(device_id=index, backends=[hardware])
        except RuntimeError as exc:
            raise UserError(
                f"--decode hw: {torch.cuda.get_device_name(index)} has no hardware JPEG decoder nvImageCodec can "
                f"use ({exc}); use --decode gpu (nvJPEG on CUDA cores) or cpu"
            ) from None
    return _HARDWARE_DECODERS[index]


def hardware_decode(datas: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """The JPEG bitstreams ``datas`` decoded by the GPU's JPEG engines in one call, ``[3, H, W]`` views of the
    decoder's ``[H, W, 3]`` images, ready on the current stream; None where the engines refuse one."""
    import nvidia.nvimgcodec as nvimgcodec

    stream = torch.cuda.current_stream(device).cuda_stream
    images = hardware_decoder(device).decode([nvimgcodec.CodeStream(d.numpy()) for d in datas], cuda_stream=stream)
    return [None if image is None else torch.from_dlpack(image).permute(2, 0, 1) for image in images]


def _produce(
    paths: Sequence[str],
    batches: Iterable[np.ndarray],
    device: torch.device,
    hardware: bool,
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    stream = torch.cuda.Stream(device)
    decode_on_gpu = hardware_decode if hardware else nvjpeg_decode

    def put(item: object) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    try:
        with ThreadPoolExecutor(max_workers=_READERS) as readers, ThreadPoolExecutor(max_workers=1) as planner:
            upcoming = iter(batches)

            def draw() -> tuple[np.ndarray | None, list[Future]]:
                """The next batch, its files' reads under way (in the planner thread: drawing a batch reads its
                file headers, which then overlaps this thread's decoding)."""
                indices = next(upcoming, None)
                if indices is None:
                    return None, []
                return indices, read_shares(readers, [paths[i] for i in indices.tolist()], check=True)

            ahead = planner.submit(draw)
            while True:
                indices, pending = ahead.result()
                if indices is None or stop.is_set():
                    break
                datas, on_gpu = zip(*[checked for f in pending for checked in f.result()], strict=True)
                ahead = planner.submit(draw)
                names = [paths[i] for i in indices.tolist()]
                with torch.cuda.stream(stream):
                    images: list[torch.Tensor | None] = [None] * len(names)
                    gpu = [i for i, ok in enumerate(on_gpu) if ok]
                    for lo in range(0, len(gpu), _NVJPEG_BATCH):
                        part = gpu[lo : lo + _NVJPEG_BATCH]
                        for i, image in zip(part, decode_on_gpu([datas[i] for i in part], device), strict=True):
                            images[i] = image
                    for i, image in enumerate(images):
                        if image is None:  # torch.tensor copies Pillow's read-only array
                            images[i] = torch.tensor(decode(names[i]), device=device).permute(2, 0, 1)
                    pixels, sizes = pad_chw(images)  # type: ignore[arg-type]
                    ready = torch.cuda.Event()
                    ready.record(stream)
                put((pixels, sizes, ready))
        put(None)
    except BaseException as exc:  # re-raised in the consumer's thread
        put(exc)
