"""Extraction throughput through the whole pipeline (sampler + model + aggregation + store), its MFU, and the
baseline a user would otherwise write: the same patches cut on the CPU by torchvision transforms in a
DataLoader with one worker per core, feeding the same model in the same precision.

    python benchmarks/extraction.py --cifar DIR [--imagenette DIR] [--quick] [--modes eager,compiled]

DIR holds ImageFolder trees (``python ../shared/data/materialize.py cifar10 DIR``). Weights are random:
speed does not depend on them. One JSON line per measurement. Each timed run follows an untimed warm-up of
the same patch count (cuDNN autotuning; for ``compiled``, the compilation, reported as ``warmup_seconds``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import emit, peak_flops, timed
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from ssl_patchbench.data.datasets import ImageSplit, open_split
from ssl_patchbench.features.extract import ExtractSettings, default_max_patches, extract
from ssl_patchbench.features.store import FeatureStore
from ssl_patchbench.models.archs import build_backbone
from ssl_patchbench.models.encoder import Encoder
from ssl_patchbench.models.loading import LoadedModel
from ssl_patchbench.models.registry import get_entry
from ssl_patchbench.sampling.aggregate import Aggregation
from ssl_patchbench.sampling.patches import PatchSpec


def random_model(entry_name: str) -> LoadedModel:
    entry = get_entry(entry_name)
    backbone, dim = build_backbone(entry.arch, stem=entry.stem)
    return LoadedModel(entry, backbone.eval(), None, dim, None, "random-init", "random-init")


def flops_per_patch(model: LoadedModel, size: int) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.backbone(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def synthetic(n: int, height: int = 375, width: int = 500) -> ImageSplit:
    """ImageNet-size uint8 images (the median ImageNet photo is about 500x375)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)
    return ImageSplit(np.zeros(n, dtype=np.int64), ["x"], {"dataset": "synthetic", "n": n}, array=pixels)


def head(split: ImageSplit, n: int) -> ImageSplit:
    keep = np.arange(min(n, len(split)))
    return ImageSplit(
        split.labels[keep],
        split.classes,
        {**split.identity, "n": len(keep)},
        array=None if split.array is None else split.array[keep],
        paths=None if split.paths is None else [split.paths[i] for i in keep],
    )


def ours(
    encoder: Encoder, split: ImageSplit, spec: PatchSpec, device: torch.device, *, compile_model: bool = False
) -> dict:
    """Our pipeline end to end, into a float16 store on local disk: ``seconds`` the whole call (an in-memory
    split's one-off copy to the GPU and the store's layout included), ``pass_seconds`` the pass alone, and
    ``steady`` its rates after the first forward."""
    with tempfile.TemporaryDirectory() as root:
        writer = FeatureStore(Path(root), "bench").writer(
            labels=split.labels, dim=encoder.dim, dtype="float16", chunk_rows=4096, meta={}
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # creates the context: peak stats need it
            torch.cuda.reset_peak_memory_stats(device)
        stats, seconds = timed(
            lambda: extract(
                encoder, split, spec, {Aggregation(): writer}, ExtractSettings(device, compile_model=compile_model)
            ),
            device=device,
        )
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "seconds": seconds,
        "pass_seconds": stats.seconds,
        "steady": stats.after_first_forward(),
        "images": stats.images,
        "patches": stats.patches,
        "peak_gpu_gib": peak,
    }


class _CpuPatches(Dataset):
    """The baseline's dataset: decode (or wrap) one image, cut ``n`` patches with torchvision transforms."""

    def __init__(self, split: ImageSplit, n: int, size: int, scale: tuple[float, float], mean, std) -> None:
        self.split, self.n = split, n
        self.transform = transforms.Compose(
            [transforms.RandomResizedCrop(size, scale=scale), transforms.ToTensor(), transforms.Normalize(mean, std)]
        )

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        image = Image.fromarray(self.split.image(index))
        return torch.stack([self.transform(image) for _ in range(self.n)])


def baseline(model: LoadedModel, split: ImageSplit, spec: PatchSpec, device: torch.device, workers: int) -> dict:
    """torchvision transforms on every CPU core in a DataLoader, then the same bf16 channels_last model."""
    pre = model.entry.preprocessing
    data = _CpuPatches(split, spec.num_patches, spec.out_size, spec.scale, pre.mean, pre.std)
    per_batch = max(1, 1024 // spec.num_patches)
    loader = DataLoader(data, batch_size=per_batch, num_workers=workers, pin_memory=True)
    backbone = model.backbone.to(device).to(memory_format=torch.channels_last)

    def run() -> int:
        done = 0
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            for batch in loader:
                x = batch.to(device, non_blocking=True).flatten(0, 1).contiguous(memory_format=torch.channels_last)
                backbone(x).float().view(len(batch), spec.num_patches, -1).mean(1).cpu()
                done += len(batch)
        return done

    images, seconds = timed(run, device=device)
    return {"seconds": seconds, "images": images, "patches": images * spec.num_patches}


def report(kind: str, model_name: str, source: str, spec: PatchSpec, result: dict, flops: float, **extra) -> dict:
    rate = result["patches"] / result["seconds"]
    peak = peak_flops()
    fields = {
        "bench": "extraction",
        "pipeline": kind,
        **extra,
        "model": model_name,
        "source": source,
        "patches_per_image": spec.num_patches,
        "input_px": spec.out_size,
        "patches_per_s": round(rate),
        "images_per_s": round(result["images"] / result["seconds"], 1),
        "gflops_per_patch": round(flops / 1e9, 3),
        "mfu": round(flops * rate / peak, 4) if peak else None,
        **{k: v for k, v in result.items() if k in ("seconds", "images", "patches", "peak_gpu_gib")},
    }
    emit(**fields)
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cifar", required=True, help="folder holding cifar10/{train,test}")
    parser.add_argument("--imagenette", help="folder holding imagenette/{train,test} (ResNet-50 rows on it)")
    parser.add_argument("--models", default="rn50,rn18", help="rn50 (224 px) and/or rn18 (CIFAR stem, 32 px)")
    parser.add_argument("--rn50-patches", type=int, default=150_000, help="patches per timed ResNet-50 run")
    parser.add_argument("--synthetic-images", type=int, default=2048, help="ImageNet-size images held on the GPU")
    parser.add_argument("--counts", default="1,16,48,256")
    parser.add_argument("--modes", default="eager,compiled", help="encoder modes to time: eager, compiled")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU smoke run")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="baseline DataLoader workers")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    counts = [int(c) for c in args.counts.split(",")]
    modes = args.modes.split(",")
    budget = {"rn18": 2_000 if args.quick else 1_000_000, "rn50": 64 if args.quick else args.rn50_patches}
    cache = Path(tempfile.mkdtemp()) / "images"
    cifar = open_split("cifar10", "train", data_dir=args.cifar, cache_dir=cache)
    sources = {
        "rn18": [("cifar10", cifar)],
        "rn50": [("synthetic-500x375", synthetic(64 if args.quick else args.synthetic_images))],
    }
    if args.imagenette:
        sources["rn50"].append(("imagenette-160", open_split("imagenette", "train", data_dir=args.imagenette)))
    models = {"rn50": ("vicreg_rn50", 224), "rn18": ("resnet18_cifar", 32)}
    for key in args.models.split(","):
        entry, size = models[key]
        model = random_model(entry)
        flops = flops_per_patch(model, size)
        encoder = Encoder(model, "embedding")
        pre = model.entry.preprocessing
        for source, split in sources[key]:
            for n in counts:
                spec = PatchSpec(mode="random", n=n, scale=model.entry.patch_scale, out_size=size, resize=pre.resize)
                subset = head(split, max(16, budget[key] // n))
                warm_split = head(split, 2 * max(1, default_max_patches(device, size) // n))  # two full batches
                rates = {}
                for mode in modes:
                    compiled = mode == "compiled"
                    warm = ours(encoder, warm_split, spec, device, compile_model=compiled)
                    result = ours(encoder, subset, spec, device, compile_model=compiled)
                    line = report(
                        "patchbench",
                        entry,
                        source,
                        spec,
                        result,
                        flops,
                        encoder_mode=mode,
                        warmup_seconds=round(warm["seconds"], 2),
                    )
                    rates[mode] = line["patches_per_s"]
                if n == 48 or (key == "rn18" and n == 16):
                    small = head(split, max(8, budget[key] // (8 * n)))
                    base = report(
                        "cpu-transforms-dataloader",
                        entry,
                        source,
                        spec,
                        baseline(model, small, spec, device, args.workers),
                        flops,
                    )
                    emit(
                        bench="extraction-ratio",
                        model=entry,
                        source=source,
                        patches_per_image=n,
                        **{f"speedup_{m}": round(r / base["patches_per_s"], 2) for m, r in rates.items()},
                    )


if __name__ == "__main__":
    main()
