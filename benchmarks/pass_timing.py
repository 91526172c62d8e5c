"""Where a file-backed extraction pass waits: its decoder alone, the pass with the main thread's time split into
waiting for decoded batches and the rest, and the same pass on images already in memory (no decoder).

    python benchmarks/pass_timing.py --data DIR --checkpoint RN50.pth [--images 4000] [--profile DIR]

DIR is an ImageFolder written by ``imagenet_like.py`` (``DIR/train``); the checkpoint a ResNet-50 as VICReg's
file. The encoder is compiled once, on a warm-up pass, so every timed pass is steady state. One JSON line per
measurement: images/s, and for a pass the seconds the main thread spent waiting for batches.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import emit
from torch.autograd import DeviceType

from ssl_patchbench.data.datasets import ImageSplit, open_split
from ssl_patchbench.data.decode import decode
from ssl_patchbench.features.extract import ExtractSettings, ImageSource, decoder, default_max_patches, extract
from ssl_patchbench.features.store import FeatureStore
from ssl_patchbench.models.encoder import Encoder
from ssl_patchbench.models.loading import load_model
from ssl_patchbench.sampling.aggregate import Aggregation
from ssl_patchbench.sampling.patches import PatchSpec

CUDA = torch.device("cuda")


def decoder_alone(split: ImageSplit, batch: int, *, decode: str) -> None:
    batches = [np.arange(i, min(i + batch, len(split))) for i in range(0, len(split), batch)]
    source = ImageSource(split, CUDA, decode=decode)
    start = time.perf_counter()
    for _ in source.iterate((None, b) for b in batches):
        pass
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    emit(measurement="decoder_alone", decoder=decoder(split, CUDA, decode=decode), batch=batch,
         images_per_s=round(len(split) / seconds))  # fmt: skip


class _Waits:
    """Wraps ``ImageSource.iterate``: the seconds the consumer waited for each batch."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.batches = 0
        self._iterate = ImageSource.iterate

    def __enter__(self) -> _Waits:
        waits = self

        def iterate(source, batches):
            items = self._iterate(source, batches)
            while True:
                start = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    return
                waits.seconds += time.perf_counter() - start
                waits.batches += 1
                yield item

        ImageSource.iterate = iterate
        return self

    def __exit__(self, *_) -> None:
        ImageSource.iterate = self._iterate


def timed_pass(name: str, encoder: Encoder, split: ImageSplit, spec: PatchSpec, *, decode: str = "cpu") -> None:
    with tempfile.TemporaryDirectory() as tmp, _Waits() as waits:
        writer = FeatureStore(Path(tmp), "s").writer(
            labels=split.labels, dim=encoder.dim, dtype="float16", chunk_rows=4096, meta={}
        )
        settings = ExtractSettings(device=CUDA, compile_model=True, decode=decode)
        stats = extract(encoder, split, spec, {Aggregation(): writer}, settings)
    emit(
        measurement="pass",
        run=name,
        images=stats.images,
        patches=spec.num_patches,
        seconds=round(stats.seconds, 2),
        images_per_s=round(stats.images / stats.seconds),
        patches_per_s=round(stats.patches / stats.seconds),
        batches=waits.batches,
        waiting_for_batches_s=round(waits.seconds, 2),
        after_first_forward=stats.after_first_forward(),
    )


def in_memory(split: ImageSplit, size: tuple[int, int]) -> ImageSplit:
    """The split decoded once, every image cut to ``size`` (the folder's smallest), as an in-memory split."""
    h, w = size
    array = np.stack([decode(p)[:h, :w] for p in split.paths or []])
    return ImageSplit(labels=split.labels, classes=split.classes, identity={}, array=array)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--skip", default="")
    parser.add_argument(
        "--profile", type=Path, help="also profile the central pass and the in-memory 16-patch pass: a folder"
    )
    parser.add_argument("--profile-decoders", default="gpu", help="the central passes profiled: --decode values")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    full = open_split("imagenet", "train", data_dir=args.data)
    keep = np.arange(min(args.images, len(full)))
    split = ImageSplit(labels=full.labels[keep], classes=full.classes, identity={}, paths=[full.paths[i] for i in keep])
    encoder = Encoder(load_model("vicreg_rn50", checkpoint=args.checkpoint), "embedding")
    warm = ImageSplit(labels=split.labels[:64], classes=split.classes, identity={}, paths=split.paths[:64])
    central = PatchSpec(mode="central", out_size=224, resize=256)
    sixteen, forty_eight = PatchSpec(mode="random", n=16, out_size=224), PatchSpec(mode="random", n=48, out_size=224)
    slice_images = default_max_patches(CUDA, 224)
    steps = {
        "warm-up": lambda: timed_pass("warm-up (compiles)", encoder, warm, sixteen),
        "decoder 124": lambda: decoder_alone(split, slice_images // 16, decode="cpu"),
        "decoder 1992": lambda: decoder_alone(split, slice_images, decode="cpu"),
        "nvjpeg 124": lambda: decoder_alone(split, slice_images // 16, decode="gpu"),
        "nvjpeg 1992": lambda: decoder_alone(split, slice_images, decode="gpu"),
        "engines 1992": lambda: decoder_alone(split, slice_images, decode="hw"),
        "pass 16": lambda: timed_pass("16 processes", encoder, split, sixteen),
        "pass 16 nvjpeg": lambda: timed_pass("16 nvjpeg", encoder, split, sixteen, decode="gpu"),
        "pass 48": lambda: timed_pass("48 processes", encoder, split, forty_eight),
        "pass central": lambda: timed_pass("central processes", encoder, split, central),
        "pass central nvjpeg": lambda: timed_pass("central nvjpeg", encoder, split, central, decode="gpu"),
        "pass central engines": lambda: timed_pass("central engines", encoder, split, central, decode="hw"),
    }
    for name, step in steps.items():
        if name not in skip:
            step()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        for decode in args.profile_decoders.split(","):
            name = decoder(split, CUDA, decode=decode)  # the eval's name for it, as in its records
            profiled_pass(
                f"central {name}", encoder, split, central, args.profile / f"central_{name}.json.gz", decode=decode
            )
    if "memory" not in skip:
        memory = in_memory(split, (280, 330))
        timed_pass("16 in memory", encoder, memory, sixteen)
        timed_pass("48 in memory", encoder, memory, forty_eight)
        if args.profile:
            profiled_pass("16 in memory", encoder, memory, sixteen, args.profile / "16_in_memory.json.gz")


def profiled_pass(
    name: str, encoder: Encoder, split: ImageSplit, spec: PatchSpec, trace: Path, *, decode: str = "cpu"
) -> None:
    """A pass under the PyTorch profiler (host and GPU): its GPU kernel seconds against its wall time, its top
    operators by GPU time and by host time, and a gzipped Chrome trace at ``trace`` whose gaps between kernels
    show what the GPU waits for. (Run 5: the in-memory overhead over the model fits 85 us per image + 2.4 us
    per patch, and the central nvJPEG pass ran at a third of nvJPEG's ceiling; this is where to look.)"""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as profile:
        timed_pass(f"{name}, profiled", encoder, split, spec, decode=decode)
    wall = time.perf_counter() - start
    profile.export_chrome_trace(str(trace))
    averages = profile.key_averages()
    kernel_s = sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA) / 1e6
    emit(measurement="profile", run=name, wall_s=round(wall, 2), gpu_kernel_s=round(kernel_s, 2))
    for column in ("self_device_time_total", "self_cpu_time_total"):
        top = sorted(averages, key=lambda e: getattr(e, column), reverse=True)[:25]
        emit(
            measurement="profile",
            run=name,
            by=column,
            top_ms={e.key[:80]: round(getattr(e, column) / 1e3, 1) for e in top},
        )


if __name__ == "__main__":
    main()
