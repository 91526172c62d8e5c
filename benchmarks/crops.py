"""Crop-and-resize alone on the GPU: microseconds per box of each path ``crop_and_resize`` can take, on batches
shaped as an eval's, and how far each lands from ``roi_align`` / the float32 Pillow path.

    python benchmarks/crops.py [--iters 20]

Cases: ImageNet-size images (280-420 x 330-470 px, as ``imagenet_like.py`` writes) with 16 random boxes and with
the central view (Pillow's filter), ViT-benchmark images (500x375) with 16 boxes, CIFAR (32 px) with 16 boxes.
Paths: ``roi_align`` on the uint8 batch converted to float32 (random patches), the Pillow path in float32 and
in float16 (the central view; float16 is what a bf16 eval on CUDA runs). One JSON line per case and path.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from breakdown import cuda_ms
from common import emit

from ssl_patchbench.sampling.patches import PatchSpec, crop_and_resize


def batch(images: int, heights: tuple[int, int], widths: tuple[int, int], seed: int = 0):
    """Random uint8 images padded to the largest (as a decoded batch is), channels-last, and their true sizes."""
    rng = np.random.default_rng(seed)
    sizes = np.stack([rng.integers(*heights, images, endpoint=True), rng.integers(*widths, images, endpoint=True)], 1)
    height, width = sizes.max(0)
    pixels = torch.randint(0, 256, (images, int(height), int(width), 3), dtype=torch.uint8, device="cuda")
    return pixels.permute(0, 3, 1, 2), sizes


def case(name: str, spec: PatchSpec, images: int, heights, widths, iters: int) -> None:
    pixels, sizes = batch(images, heights, widths)
    boxes = spec.boxes(np.arange(images), sizes[:, 0], sizes[:, 1]).reshape(-1, 4)
    boxes_t = torch.from_numpy(boxes).float().cuda()
    owner = torch.arange(images, device="cuda").repeat_interleave(spec.num_patches)
    paths = {  # name -> (antialias, dtype)
        "roi_align_fp32": ("box", None),
        "pillow_fp32": ("pillow", None),
        "pillow_fp16": ("pillow", torch.float16),
    }
    if spec.antialias == "pillow":
        paths = {k: v for k, v in paths.items() if k.startswith("pillow")}
    reference = {}
    for path, (antialias, dtype) in paths.items():

        def crops(antialias=antialias, dtype=dtype) -> torch.Tensor:
            return crop_and_resize(pixels, boxes_t, owner, spec.out_size, spec.interpolation, antialias, dtype)

        out = crops().float()
        reference.setdefault(antialias, out)
        ms = cuda_ms(crops, repeat=iters)
        diff = (out - reference[antialias]).abs()
        emit(
            bench="crops",
            case=name,
            path=path,
            images=images,
            height=int(pixels.shape[2]),
            width=int(pixels.shape[3]),
            boxes=len(boxes),
            out_size=spec.out_size,
            us_per_box=round(1e3 * ms / len(boxes), 3),
            max_abs_diff=round(float(diff.max()), 4),
            mean_abs_diff=round(float(diff.mean()), 5),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    imagenet = ((280, 420), (330, 470))
    case("imagenet 16 random", PatchSpec("random", n=16, out_size=224), 124, *imagenet, args.iters)
    case("imagenet 48 random", PatchSpec("random", n=48, out_size=224), 41, *imagenet, args.iters)
    case("imagenet central", PatchSpec("central", out_size=224, resize=256), 1992, *imagenet, args.iters)
    case("vit 500x375 16 random", PatchSpec("random", n=16, out_size=224), 124, (375, 375), (500, 500), args.iters)
    case("cifar 16 random", PatchSpec("random", n=16, out_size=32), 6000, (32, 32), (32, 32), args.iters)


if __name__ == "__main__":
    main()
