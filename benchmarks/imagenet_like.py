"""ImageNet-scale input (issue 13): an ImageNet-like JPEG ImageFolder, and in one run the decode ceilings, what
``patchbench eval`` does on it, the compiled model alone, and the baseline a user would write.

    python benchmarks/imagenet_like.py --root DIR [--train 12000 --val 1200 --classes 10] [--against OLD_TREE]

The folder: photo-like JPEGs (gradients + smooth noise at several scales + grain), 280-420 x 330-470 px (about
350x400 on average), quality 90, about 110 KB each: ImageNet's size and byte statistics. The model: a random
ResNet-50 saved as VICReg's file (a torchvision state dict without ``fc.*``); speed does not depend on weights.
Measured, one JSON line each:
- ``pil_decode``: PIL (``data.decode.decode``) in one process per core, every train file;
- ``gpu_decode``: ``torchvision.io.decode_jpeg(device="cuda")`` in batches of 256, the files already in memory
  (``gpu_decode_pinned``: in pinned memory);
- ``model_only``: the compiled encoder (bf16) on ready 224 px batches of the eval's slice size, in the eval's
  input layout (``model_only_channels_last``: handed over in channels-last instead, the layout before 2026-12-02);
- ``eval``: ``patchbench eval --decode gpu`` as a user runs it (a fresh process and cache): central, 16, 48,
  central+16+48 in one call, a rerun on complete stores, central with the default (PIL) decoder and with the
  compiled encoder; wall seconds and the stores' extraction rates; ``central py-spy``: central under py-spy (where
  it is installed), every thread's stacks and the GIL holder's, as raw files beside the folder;
- ``nvjpeg_vs_pil``: central features of the val split with nvJPEG and with PIL decoding (same model, bf16);
- where nvImageCodec is installed, the GPU's hardware JPEG engines: ``hw_decode`` (alone, files in memory),
  ``central hw``, ``central hw compiled`` and ``16 hw`` (``eval --decode hw``), ``central hw py-spy``,
  ``hw_vs_pil`` (as ``nvjpeg_vs_pil``);
- ``contention``: the eager encoder on a ready batch beside nvJPEG decoding (a thread with calls of 256 to 2048
  images, another process), the encoder as one CUDA graph or kept at most two batches ahead: how the two share
  the GPU; ``central_decode_batches``: the eval's central extraction in-process with nvJPEG calls of 256 to 1992;
- ``user_baseline``: torchvision ``ImageFolder`` + ``DataLoader`` (one worker per core) cutting 16
  ``RandomResizedCrop`` patches per image on the CPU, the same eager model in bf16 on the GPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import timm
import torch
from common import cache_bytecode, emit
from PIL import Image

from ssl_patchbench.data.batches import decode_workers
from ssl_patchbench.data.decode import decode
from ssl_patchbench.features.extract import (
    ExtractSettings,
    ExtractStats,
    decoder,
    default_max_patches,
    extract,
    input_layout,
)
from ssl_patchbench.features.store import FeatureStore
from ssl_patchbench.models.encoder import Encoder
from ssl_patchbench.models.loading import load_model
from ssl_patchbench.sampling.aggregate import Aggregation
from ssl_patchbench.sampling.patches import PatchSpec

_OCTAVES = ((64, 0.9), (16, 0.6), (4, 1.1), (2, 1.1))  # (cell px, amplitude) of the smooth noise layers
_GRAIN = 26.0


def photo(seed: int) -> tuple[bytes, tuple[int, int]]:
    """One photo-like JPEG (quality 90), 280-420 px high and 330-470 px wide (350x400 on average)."""
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(280, 421)), int(rng.integers(330, 471))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    slope = rng.uniform(-1, 1, (2, 3))
    image = 128 + 60 * (xx[..., None] * slope[0] + yy[..., None] * slope[1])
    for cell, amplitude in _OCTAVES:
        gh, gw = h // cell + 2, w // cell + 2
        coarse = ((rng.normal(0, 1, (gh, gw, 3)) + 4) * 32).clip(0, 255).astype(np.uint8)
        layer = Image.fromarray(coarse).resize((gw * cell, gh * cell), Image.BICUBIC)
        image += (np.asarray(layer, dtype=np.float32)[:h, :w] - 128) * amplitude
    image += rng.normal(0, _GRAIN, (h, w, 3))
    buffer = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue(), (h, w)


def _write(job: tuple[str, int]) -> tuple[int, int, int]:
    path, seed = job
    data, (h, w) = photo(seed)
    Path(path).write_bytes(data)
    return len(data), h, w


def write_folder(root: Path, train: int, val: int, classes: int) -> dict[str, list[str]]:
    jobs, paths = [], {"train": [], "val": []}
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            path = str(folder / f"{split}_{i:07d}.JPEG")
            jobs.append((path, (0 if split == "train" else 1 << 32) + i))
            paths[split].append(path)
    start = time.perf_counter()
    with Pool(decode_workers()) as pool:
        stats = np.array(pool.map(_write, jobs, chunksize=64))
    emit(
        measurement="dataset",
        train=train,
        val=val,
        classes=classes,
        mean_kb=round(stats[:, 0].mean() / 1e3, 1),
        mean_height=round(stats[:, 1].mean(), 1),
        mean_width=round(stats[:, 2].mean(), 1),
        seconds=round(time.perf_counter() - start, 1),
    )
    return paths


def _decoded_size(path: str) -> tuple[int, ...]:
    return decode(path).shape


def pil_decode(paths: list[str]) -> None:
    workers = decode_workers()
    with Pool(workers) as pool:
        pool.map(_decoded_size, paths[: workers * 8])  # workers started and warm
        start = time.perf_counter()
        pool.map(_decoded_size, paths, chunksize=64)
        seconds = time.perf_counter() - start
    emit(measurement="pil_decode", processes=workers, images=len(paths), images_per_s=round(len(paths) / seconds))


def gpu_decode(paths: list[str], batch: int = 256, *, pinned: bool = False) -> None:
    """nvJPEG alone on files already in memory; ``pinned``: their bytes in one pinned buffer (views of it), so that
    nvJPEG's copy of each bitstream to the GPU is asynchronous (run 6's profile: 21.6 us an image from pageable
    memory, in the decoding thread)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths]
    if pinned:
        buffer = torch.cat(data).pin_memory()  # alive until the end: nvJPEG's copies of it are not tracked
        data = list(buffer.split([len(d) for d in data]))
    decode_jpeg(data[:batch], mode=ImageReadMode.RGB, device="cuda")  # nvJPEG handles created
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(data), batch):
        decode_jpeg(data[i : i + batch], mode=ImageReadMode.RGB, device="cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    emit(
        measurement="gpu_decode",
        batch=batch,
        pinned=pinned,
        images=len(paths),
        images_per_s=round(len(paths) / seconds),
    )


def _decode_for(data: list[torch.Tensor], stop: Callable[[], bool], batch: int = 256) -> tuple[int, float]:
    """nvJPEG on ``data`` in batches of ``batch``, round and round until ``stop()``: (images, seconds)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    done, start = 0, time.perf_counter()
    while not stop():
        i = done % len(data)
        done += len(decode_jpeg(data[i : i + batch], mode=ImageReadMode.RGB, device="cuda"))
    torch.cuda.synchronize()
    return done, time.perf_counter() - start


def _decoding_process(paths: list[str], ready, go, halt, results) -> None:
    """``contention``'s other process: its own CUDA context, decoding from ``go`` to ``halt``."""
    data = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths]
    _decode_for(data[:512], iter([False, False, True]).__next__)  # handles created, two batches
    ready.set()
    go.wait()
    results.put(_decode_for(data, halt.is_set))


def contention(checkpoint: Path, paths: list[str], seconds: float = 4.0) -> None:
    """Why central runs at half of nvJPEG's ceiling while the GPU idles (run 7's py-spy: the main thread spent
    4.2 s of a 5.4 s pass inside the eager encoder's calls): the eager ResNet-50 on a ready batch of 256 and
    nvJPEG decoding batches of 256, each alone, then at once with the decoder in a thread of the same process,
    with the encoder replayed as one CUDA graph, and with the decoder in another process. ``host_ms`` is the
    host's time inside one encoder call (once the GPU is behind, it includes waiting for room in the launch
    queue): if it grows beside the decoder while the encoder's rate falls, launches wait on the decoder."""
    import multiprocessing as mp
    import threading

    data = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths[:2048]]
    encoder = Encoder(load_model("vicreg_rn50", checkpoint=checkpoint), "embedding").cuda().eval()
    encoder = encoder.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True
    x = torch.rand(256, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
        for _ in range(3):
            encoder(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            encoder(x)
    _decode_for(data[:512], iter([False, False, True]).__next__)

    def encode_for(forward: Callable[[], object], until: float) -> tuple[float, float]:
        """(images/s, host ms per call) of ``forward`` until ``until``."""
        calls, host = 0, 0.0
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
            while time.perf_counter() < until:
                t = time.perf_counter()
                forward()
                host += time.perf_counter() - t
                calls += 1
            torch.cuda.synchronize()
        return 256 * calls / (time.perf_counter() - start), 1e3 * host / max(calls, 1)

    def throttled() -> None:
        """The encoder with at most two of its batches queued on the GPU (the eval queues as many as it can)."""
        encoder(x)
        in_flight.append(torch.cuda.Event())
        in_flight[-1].record()
        if len(in_flight) > 2:
            in_flight.popleft().synchronize()

    in_flight: deque[torch.cuda.Event] = deque()

    def row(case: str, forward: Callable[[], object] | None, decoder: str | None, batch: int = 256) -> None:
        decoded, fields, until = {}, {}, time.perf_counter() + seconds
        if decoder == "process":
            ctx = mp.get_context("spawn")
            ready, go, halt, results = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
            child = ctx.Process(target=_decoding_process, args=(paths[:2048], ready, go, halt, results))
            child.start()
            ready.wait()
            until = time.perf_counter() + seconds
            go.set()
        elif decoder == "thread":

            def decode_thread() -> None:
                decoded["r"] = _decode_for(data, lambda: time.perf_counter() > until, batch)

            thread = threading.Thread(target=decode_thread)
            thread.start()
        if forward is not None:
            rate, host = encode_for(forward, until)
            fields.update(encoder_images_per_s=round(rate), host_ms=round(host, 2))
        if decoder == "process":
            halt.set()
            decoded["r"] = results.get()
            child.join()
        elif decoder == "thread":
            thread.join()
        if decoded:
            fields["decoded_images_per_s"] = round(decoded["r"][0] / decoded["r"][1])
        emit(measurement="contention", case=case, decode_batch=batch, **fields)

    row("encoder alone", lambda: encoder(x), None)
    row("encoder graph alone", graph.replay, None)
    for batch in (256, 1024):
        row("nvjpeg alone", None, "thread", batch)
    for batch in (256, 1024, 2048):
        row("encoder + nvjpeg thread", lambda: encoder(x), "thread", batch)
    for batch in (256, 1024):
        row("encoder at most 2 batches ahead + nvjpeg thread", throttled, "thread", batch)
    row("encoder graph + nvjpeg thread", graph.replay, "thread")
    row("encoder + nvjpeg process", lambda: encoder(x), "process")


def central_decode_batches(checkpoint: Path, data: Path) -> None:
    """Central features of the train split through the eval's own pipeline (``extract``, nvJPEG) with each
    nvJPEG call decoding 256, 1024 or 1992 images: ``contention`` finds the decoder starved beside the encoder
    at 256, and a larger call pays its per-call waits on fewer images."""
    from ssl_patchbench.data import batches
    from ssl_patchbench.data.datasets import open_split

    encoder = Encoder(load_model("vicreg_rn50", checkpoint=checkpoint), "embedding")
    split = open_split("imagenet", "train", data_dir=data)
    default = batches._NVJPEG_BATCH
    try:
        for size in (256, 1024, 1992, 256):  # 256 twice: the first call also pays cuDNN's autotuning
            batches._NVJPEG_BATCH = size
            rates = _central_rates(encoder, split, ExtractSettings(device=torch.device("cuda"), decode="gpu"))
            emit(measurement="central_decode_batch", nvjpeg_batch=size, **rates)
    finally:
        batches._NVJPEG_BATCH = default


def _central_rates(encoder: Encoder, split, settings: ExtractSettings) -> dict:
    """Images per second of :func:`_central_features` (store and first batch included) and after its first
    forward (the pass's steady rate), and when that forward was done."""
    start = time.perf_counter()
    stats = _central_features(encoder, split, settings)[1]
    steady = stats.after_first_forward()
    return {
        "images_per_s": round(len(split) / (time.perf_counter() - start)),
        "after_first_forward_images_per_s": round(steady["images_per_s"]) if steady else None,
        "first_forward_at_s": round(stats.first_forward[0], 2),
    }


def model_only(checkpoint: Path, *, compiled: bool, iters: int = 30, layout: torch.memory_format | None = None) -> None:
    """The encoder alone on one ready batch of the eval's slice size, handed over in the eval's layout
    (``input_layout``) unless ``layout`` says otherwise."""
    encoder = Encoder(load_model("vicreg_rn50", checkpoint=checkpoint), "embedding").cuda().eval()
    encoder = encoder.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True
    size = default_max_patches(torch.device("cuda"), 224)
    layout = layout or input_layout(torch.device("cuda"), compiled=compiled)
    x = torch.rand(size, 3, 224, 224, device="cuda").mul(255).contiguous(memory_format=layout)
    forward = encoder.compiled() if compiled else encoder
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        start = time.perf_counter()
        forward(x)
        torch.cuda.synchronize()
        first_seconds = time.perf_counter() - start
        for _ in range(3):
            forward(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            forward(x)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    emit(
        measurement="model_only",
        compiled=compiled,
        layout="channels_last" if layout == torch.channels_last else "contiguous",
        batch=size,
        patches_per_s=round(size * iters / seconds),
        first_call_seconds=round(first_seconds, 1),
    )


AGAINST: list[Path] = []
"""``--against DIR``: another checkout of the package (e.g. ``git archive REV | tar -x -C DIR``); every eval then
runs with this tree's package and right after with DIR's, each in a home of its own, the second's ``run`` named
``NAME [against]``: old and new code side by side in one call."""


def run_eval(
    name: str,
    checkpoint: Path,
    data: Path,
    home: Path,
    *extra: str,
    profile: bool = False,
    model: str = "vicreg_rn50",
    prefix: tuple[str, ...] = (),
) -> list[dict]:
    """``patchbench eval`` in a fresh process, as a user runs it; its records, wall seconds and the seconds from
    the command's start to its first batch done (``profile``: under cProfile, whose top entries by cumulative
    time are emitted too; ``prefix``: a command it runs under, such as a sampling profiler); with ``--against``
    also with the other tree's package (the records returned are this tree's)."""
    mine = _eval_once(name, checkpoint, data, home, extra, profile, model, prefix, None)
    for tree in AGAINST:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
        against = home.with_name(home.name + "_against")
        _eval_once(f"{name} [against]", checkpoint, data, against, extra, profile, model, prefix, env, cwd=tree)
    return mine


def _eval_once(
    name: str,
    checkpoint: Path,
    data: Path,
    home: Path,
    extra: tuple[str, ...],
    profile: bool,
    model: str,
    prefix: tuple[str, ...],
    env: dict | None,
    cwd: Path | None = None,
) -> list[dict]:
    """One eval; ``cwd``: where it starts (``-m`` imports the package found there first)."""
    checkpoint, data, home = checkpoint.resolve(), data.resolve(), home.resolve()
    profiler = ["-m", "cProfile", "-o", str(home / "eval.prof")] if profile else []
    command = [*prefix, sys.executable, *profiler, "-m", "ssl_patchbench", "eval", "--model", model, "--checkpoint"]
    command += [str(checkpoint), "--dataset", "imagenet", "--data-dir", str(data), "--eval", "knn", "--json"]
    command += ["--home", str(home), *extra]
    launched = time.time()
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=cwd)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        emit(measurement="eval", run=name, error=done.stderr[-2000:])
        return []
    if profile:
        emit_profile(name, home / "eval.prof", wall)
    records = [json.loads(line) for line in (home / "results.jsonl").read_text().splitlines()]
    mine = records[-len(done.stdout.splitlines()) :]
    for record in mine:
        train, test = (record["timings"].get(f"extraction_{s}") or {} for s in ("train", "test"))
        first_forward = (train.get("pass") or {}).get("first_forward_at")
        emit(
            measurement="eval",
            run=name,
            model=model,
            wall_seconds=round(wall, 1),
            first_forward_after_seconds=None if first_forward is None else round(first_forward - launched, 1),
            representation=record["representation"],
            reused_features=record["reused_features"],
            train_images_per_s=round(train.get("images_per_s", 0)),
            train_patches_per_s=round(train.get("patches_per_s", 0)),
            train_seconds=train.get("seconds"),
            after_first_forward=(train.get("pass") or {}).get("after_first_forward"),
            test_seconds=test.get("seconds"),
            forwarded_patches_per_s=round((train.get("pass") or {}).get("forwarded_patches_per_s", 0)),
            decoder=(train.get("pass") or {}).get("decoder"),
            compiled=train.get("compiled"),
            knn_seconds=round(record["timings"].get("knn_seconds", 0), 2),
        )
    return mine


def spied_central(checkpoint: Path, data: Path, root: Path, decode: str = "gpu") -> None:
    """The central ``--decode DECODE`` eval under py-spy (where installed), twice: every thread's samples while
    it runs (``central_DECODE_threads.spy``) and only the thread holding the GIL (``central_DECODE_gil.spy``), as
    raw stacks."""
    if shutil.which("py-spy") is None:
        emit(measurement="central py-spy", error="py-spy is not installed")
        return
    for kind, flags in (("threads", ()), ("gil", ("--gil",))):
        out = root / f"central_{decode}_{kind}.spy"
        spy = ("py-spy", "record", "--threads", "--rate", "250", "--format", "raw", "--output", str(out), *flags, "--")
        home, args = root / f"home_spy_{decode}_{kind}", ("--patches", "central", "--decode", decode)
        run_eval(f"central py-spy {decode} {kind}", checkpoint, data, home, *args, prefix=spy)


def emit_profile(name: str, path: Path, wall: float, top: int = 25) -> None:
    """The package's own functions by cumulative time (imports are measured apart, by ``imports``)."""
    import pstats

    stats = pstats.Stats(str(path)).stats  # (file, line, function) -> (calls, ..., total time, cumulative time)
    ours = [(key, value) for key, value in stats.items() if "ssl_patchbench" in key[0] and key[2] != "<module>"]
    ranked = sorted(ours, key=lambda item: item[1][3], reverse=True)[:top]
    rows = [[f"{Path(f).name}:{line}:{fn}", round(cum, 2)] for (f, line, fn), (_, _, _, cum, _) in ranked]
    emit(measurement="overhead_profile", run=name, wall_seconds=round(wall, 1), cumulative_seconds=rows)


def imports() -> None:
    """Seconds to import what an ``eval`` imports (torch, torchvision, timm and the package), in a fresh process."""
    code = (
        "import time; t = time.perf_counter(); import ssl_patchbench.pipeline.evaluate; print(time.perf_counter() - t)"
    )
    seconds = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    code = "import time; t = time.perf_counter(); import torch; torch.zeros(1, device='cuda')"
    code += "; print(time.perf_counter() - t)"
    cuda = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    emit(measurement="imports", eval_imports_seconds=round(seconds, 2), torch_and_cuda_init_seconds=round(cuda, 2))


def decoders(data: Path) -> None:
    """The eval's decoders alone (no model): batches of the central view's slice size, as eval reads them (the
    GPU's JPEG engines where nvImageCodec is installed)."""
    from ssl_patchbench.data.datasets import open_split
    from ssl_patchbench.features.extract import ImageSource

    split = open_split("imagenet", "train", data_dir=data)
    size = default_max_patches(torch.device("cuda"), 224)
    batches = [np.arange(i, min(i + size, len(split))) for i in range(0, len(split), size)]
    for setting in ("gpu", "hw", "cpu") if _has_nvimgcodec() else ("gpu", "cpu"):
        source = ImageSource(split, torch.device("cuda"), decode=setting)
        start = time.perf_counter()
        for _ in source.iterate((None, b) for b in batches):
            pass
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        emit(
            measurement="eval_decoder",
            decoder=decoder(split, torch.device("cuda"), decode=setting),
            images_per_s=round(len(split) / seconds),
        )


def nvjpeg_phases(paths: list[str], batch: int = 1992) -> None:
    """The nvJPEG decoder's steps one after another (no overlap), microseconds per image: where its time goes."""
    from concurrent.futures import ThreadPoolExecutor

    from torchvision.io import ImageReadMode, decode_jpeg

    from ssl_patchbench.data.batches import _NVJPEG_BATCH, _READERS, _for_nvjpeg, pad_chw, read_shares

    phases = dict.fromkeys(("read", "check", "decode", "pad"), 0.0)

    def step(name: str, fn):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        phases[name] += time.perf_counter() - start
        return out

    with ThreadPoolExecutor(_READERS) as readers:
        for lo in range(0, len(paths), batch):
            names = paths[lo : lo + batch]
            datas = step("read", lambda names=names: [d for f in read_shares(readers, names) for d in f.result()])
            step(
                "check", lambda names=names, datas=datas: [_for_nvjpeg(n, d) for n, d in zip(names, datas, strict=True)]
            )
            images = step(
                "decode",
                lambda encoded=datas: [
                    im
                    for i in range(0, len(encoded), _NVJPEG_BATCH)
                    for im in decode_jpeg(encoded[i : i + _NVJPEG_BATCH], mode=ImageReadMode.RGB, device="cuda")
                ],
            )
            step("pad", lambda images=images: pad_chw(images))
    emit(
        measurement="nvjpeg_phases",
        images=len(paths),
        **{f"{k}_us_per_image": round(v / len(paths) * 1e6, 1) for k, v in phases.items()},
    )


class _FilePieces(torch.utils.data.Dataset):
    """Pieces of 32 files read by a worker process: their bytes as one uint8 tensor (one shared-memory block)
    and the files' lengths."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return (len(self.paths) + 31) // 32

    def __getitem__(self, piece: int) -> tuple[torch.Tensor, list[int]]:
        datas = [Path(p).read_bytes() for p in self.paths[piece * 32 : piece * 32 + 32]]
        return torch.frombuffer(bytearray(b"".join(datas)), dtype=torch.uint8), [len(d) for d in datas]


def file_reads(paths: list[str]) -> None:
    """Reading the JPEG files into uint8 tensors for nvJPEG, microseconds per file, four ways: a 16-thread pool
    of Python reads (bytes, then a bytearray copy: the eval's way before), the same pool calling
    ``torchvision.io.read_file`` (C++, no Python copies: the eval's way now), that call in one thread, and one
    process per core reading pieces of 32 files into one tensor each (split into views in this process)."""
    from concurrent.futures import ThreadPoolExecutor

    from torchvision.io import read_file

    def python_pool() -> list:
        with ThreadPoolExecutor(16) as pool:
            return [
                torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in pool.map(Path.read_bytes, map(Path, paths))
            ]

    def read_file_pool() -> list:
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(read_file, paths))

    def workers() -> list:
        loader = torch.utils.data.DataLoader(
            _FilePieces(paths), batch_size=None, num_workers=decode_workers(), prefetch_factor=4
        )
        return [part for data, lengths in loader for part in torch.split(data, lengths)]

    ways = {
        "python_pool": python_pool,
        "read_file_pool": read_file_pool,
        "read_file_serial": lambda: [read_file(p) for p in paths],
        "worker_processes": workers,
    }
    for way, read in ways.items():
        start = time.perf_counter()
        read()
        seconds = time.perf_counter() - start
        emit(measurement="file_reads", way=way, files=len(paths), us_per_file=round(seconds / len(paths) * 1e6, 1))


def bf16_noise(checkpoint: Path, data: Path) -> None:
    """The yardstick for nvjpeg_vs_pil: the same PIL-decoded central features in bf16 and in fp32."""
    _compare(
        checkpoint,
        data,
        "bf16_vs_fp32",
        {"precision": "bf16"},
        {"precision": "fp32"},
    )


def nvjpeg_vs_pil(checkpoint: Path, data: Path) -> None:
    _compare(checkpoint, data, "nvjpeg_vs_pil", {"decode": "gpu"}, {"decode": "cpu"})


def hw_vs_pil(checkpoint: Path, data: Path) -> None:
    """The GPU's JPEG engines' central features against Pillow's (``--decode hw`` against ``cpu``)."""
    _compare(checkpoint, data, "hw_vs_pil", {"decode": "hw"}, {"decode": "cpu"})


def hw_decode(paths: list[str], batch: int = 2048) -> None:
    """The GPU's JPEG engines alone (nvImageCodec, :func:`hardware_decode`) on files already in memory."""
    from ssl_patchbench.data.batches import hardware_decode

    data = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths]
    device = torch.device("cuda")
    hardware_decode(data[:batch], device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    refused = sum(
        im is None for lo in range(0, len(data), batch) for im in hardware_decode(data[lo : lo + batch], device)
    )
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    emit(
        measurement="hw_decode", batch=batch, images=len(data), refused=refused, images_per_s=round(len(data) / seconds)
    )


def _has_nvimgcodec() -> bool:
    import importlib.util

    return importlib.util.find_spec("nvidia.nvimgcodec") is not None


def _compare(checkpoint: Path, data: Path, name: str, a_settings: dict, b_settings: dict) -> None:
    """Central features of the val split under two extraction settings, compared row by row."""
    from ssl_patchbench.data.datasets import open_split

    encoder = Encoder(load_model("vicreg_rn50", checkpoint=checkpoint), "embedding")
    split = open_split("imagenet", "test", data_dir=data)
    a, b = (_central_features(encoder, split, ExtractSettings(device=torch.device("cuda"), **extra))[0]
            for extra in (a_settings, b_settings))  # fmt: skip
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    emit(
        measurement=name,
        images=len(a),
        min_cosine=float(cosine.min()),
        mean_cosine=float(cosine.mean()),
        max_abs_diff=float(np.abs(a - b).max()),
        relative_l2=float(np.linalg.norm(a - b) / np.linalg.norm(b)),
    )


def _central_features(encoder: Encoder, split, settings: ExtractSettings) -> tuple[np.ndarray, ExtractStats]:
    """The central view's float32 features of ``split`` through the eval's ``extract``, in a throwaway store, and
    the pass's statistics."""
    spec = PatchSpec(mode="central", out_size=224, resize=256)
    with tempfile.TemporaryDirectory() as tmp:
        writer = FeatureStore(Path(tmp), "c").writer(
            labels=split.labels, dim=encoder.dim, dtype="float32", chunk_rows=4096, meta={}
        )
        stats = extract(encoder, split, spec, {Aggregation(): writer}, settings)
        return np.array(writer.features), stats


class _Patches:
    """The user's transform: ``n`` RandomResizedCrop patches of one PIL image, as a normalised float stack."""

    def __init__(self, n: int) -> None:
        from torchvision import transforms

        self.n = n
        self.crop = transforms.Compose(
            [
                transforms.RandomResizedCrop(224, scale=(0.08, 1.0)),
                transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([self.crop(image) for _ in range(self.n)])


def user_baseline(checkpoint: Path, data: Path, images: int, n: int = 16, batch: int = 32) -> None:
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(data / "train"), transform=_Patches(n))
    subset = torch.utils.data.Subset(dataset, np.random.default_rng(0).permutation(len(dataset))[:images].tolist())
    loader = torch.utils.data.DataLoader(subset, batch_size=batch, num_workers=decode_workers(), pin_memory=True)
    model = load_model("vicreg_rn50", checkpoint=checkpoint).backbone.cuda().eval()
    model = model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True
    done, start = 0, None
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        for step, (x, _) in enumerate(loader):
            if step == 2:  # workers started, cuDNN tuned
                torch.cuda.synchronize()
                start, done = time.perf_counter(), 0
            x = x.cuda(non_blocking=True).flatten(0, 1).contiguous(memory_format=torch.channels_last)
            model(x).mean()
            done += len(x)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    emit(
        measurement="user_baseline",
        patches=n,
        images=images,
        workers=decode_workers(),
        patches_per_s=round(done / seconds),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="where the folder (and caches) are written")
    parser.add_argument("--train", type=int, default=10000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--baseline-images", type=int, default=2000)
    parser.add_argument("--skip", default="", help="comma-separated measurements to leave out")
    parser.add_argument("--only", default="", help="comma-separated measurements to run (in their usual order)")
    parser.add_argument("--against", type=Path, help="another checkout of the package: every eval runs with both")
    args = parser.parse_args()
    if args.against is not None:
        if not (args.against / "ssl_patchbench" / "__init__.py").is_file():
            parser.error(f"--against {args.against}: no ssl_patchbench package there")
        AGAINST.append(args.against.resolve())
    skip = set(args.skip.split(","))
    data = args.root / "imagenet_like"
    checkpoint = args.root / "vicreg_rn50_random.pth"
    vit_checkpoint = args.root / "dino_vits16_random.pth"  # DINO's file layout is timm's key names
    gpu, hw = ("--decode", "gpu"), ("--decode", "hw")
    compiled = ("--compile", "on")  # what --compile auto does at ImageNet size (from 1M patches)
    root = args.root
    steps = {  # the targets' measurements first: a run cut by its time limit keeps them
        "pil_decode": lambda: pil_decode(paths["train"]),
        "gpu_decode": lambda: gpu_decode(paths["train"]),
        "gpu_decode_pinned": lambda: gpu_decode(paths["train"], pinned=True),
        "model_only_compiled": lambda: model_only(checkpoint, compiled=True),
        "model_only_channels_last": lambda: model_only(checkpoint, compiled=True, layout=torch.channels_last),
        "central": lambda: run_eval("central", checkpoint, data, root / "home_c", "--patches", "central", *gpu),
        "central compiled": lambda: run_eval(
            "central compiled", checkpoint, data, root / "home_cc", "--patches", "central", *gpu, *compiled
        ),
        "central cpu": lambda: run_eval("central cpu", checkpoint, data, root / "home_cpu", "--patches", "central"),
        "hw_decode": lambda: hw_decode(paths["train"]),
        "central hw": lambda: run_eval("central hw", checkpoint, data, root / "home_hw", "--patches", "central", *hw),
        "central hw compiled": lambda: run_eval(
            "central hw compiled", checkpoint, data, root / "home_hwc", "--patches", "central", *hw, *compiled
        ),
        "16 hw": lambda: run_eval("16 hw", checkpoint, data, root / "home_16hw", "--patches", "16", *hw, *compiled),
        "16": lambda: run_eval("16", checkpoint, data, root / "home_16", "--patches", "16", *compiled),
        "48": lambda: run_eval("48", checkpoint, data, root / "home_48", "--patches", "48", *compiled),
        "user_baseline": lambda: user_baseline(checkpoint, data, args.baseline_images),
        "central rerun": lambda: run_eval(
            "central rerun", checkpoint, data, root / "home_c", "--patches", "central", *gpu, profile=True
        ),
        "vit": lambda: run_eval(
            "vit central,16",
            vit_checkpoint,
            data,
            root / "home_vit",
            "--patches",
            "central,16",
            *compiled,
            model="dino_vits16",
        ),
        "central+16+48": lambda: run_eval(
            "central+16+48", checkpoint, data, root / "home_all", "--patches", "central,16,48", *compiled
        ),
        "central py-spy": lambda: spied_central(checkpoint, data, root),
        "central hw py-spy": lambda: spied_central(checkpoint, data, root, decode="hw"),
        "imports": imports,
        "nvjpeg_phases": lambda: nvjpeg_phases(paths["train"]),
        "file_reads": lambda: file_reads(paths["train"]),
        "eval_decoder": lambda: decoders(data),
        "nvjpeg_vs_pil": lambda: nvjpeg_vs_pil(checkpoint, data),
        "hw_vs_pil": lambda: hw_vs_pil(checkpoint, data),
        "bf16_noise": lambda: bf16_noise(checkpoint, data),
        "model_only": lambda: model_only(checkpoint, compiled=False),
        "contention": lambda: contention(checkpoint, paths["train"]),
        "central_decode_batches": lambda: central_decode_batches(checkpoint, data),
    }
    only = set(args.only.split(",")) - {""}
    if only - steps.keys():  # before the minutes of writing below
        parser.error(f"--only: no measurement named {', '.join(sorted(only - steps.keys()))}")
    cache_bytecode(args.root / "pycache")  # every eval below starts as on a usual install
    paths = write_folder(data, args.train, args.val, args.classes)  # the steps read it when they run
    import torchvision

    state = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    torch.save(state, checkpoint)
    torch.save(timm.create_model("vit_small_patch16_224", num_classes=0).state_dict(), vit_checkpoint)
    for name, step in steps.items():
        if name in skip or (only and name not in only):
            continue
        try:
            step()
        except Exception as exc:  # one failed measurement must not cost the others
            emit(measurement=name, error=f"{type(exc).__name__}: {exc}"[-2000:])


if __name__ == "__main__":
    main()
