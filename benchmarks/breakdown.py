"""Where extraction time goes: each stage of one batch timed with CUDA events (boxes on the CPU, crop op,
model forward eager and under ``torch.compile``), for ResNet-50 at 224 px on ImageNet-size images and
ResNet-18 at 32 px.

    python benchmarks/breakdown.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import emit
from extraction import random_model

from ssl_patchbench.extract import Encoder, default_max_patches
from ssl_patchbench.patches import PatchSpec, crop_and_resize


def cuda_ms(fn, repeat: int = 10) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def stage_times(entry: str, size: int, n: int, height: int, width: int) -> None:
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    model = random_model(entry)
    encoder = Encoder(model, "embedding").to(device).eval().to(memory_format=torch.channels_last)
    pre = model.entry.preprocessing
    spec = PatchSpec(mode="random", n=n, scale=model.entry.pretrain_scale, out_size=size, resize=pre.resize)
    per_batch = max(1, default_max_patches(device, size) // n)
    images = torch.randint(0, 256, (per_batch, height, width, 3), dtype=torch.uint8, device=device)
    indices = np.arange(per_batch)
    t0 = time.perf_counter()
    boxes = spec.boxes(indices, np.full(per_batch, height), np.full(per_batch, width)).reshape(-1, 4)
    boxes_ms = (time.perf_counter() - t0) * 1000
    boxes_t = torch.from_numpy(boxes).float().to(device)
    owner = torch.arange(per_batch, device=device).repeat_interleave(n)
    pixels = images.permute(0, 3, 1, 2).float()
    crops = crop_and_resize(pixels, boxes_t, owner, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        times = {
            "boxes_cpu_ms": boxes_ms,
            "to_float_ms": cuda_ms(lambda: images.permute(0, 3, 1, 2).float()),
            "crop_resize_ms": cuda_ms(lambda: crop_and_resize(pixels, boxes_t, owner, size)),
            "forward_bf16_ms": cuda_ms(lambda: encoder(crops)),
        }
        start = time.perf_counter()
        compiled = encoder.compiled()
        compiled(crops)
        torch.cuda.synchronize()
        times["compile_seconds"] = time.perf_counter() - start
        times["forward_bf16_compiled_ms"] = cuda_ms(lambda: compiled(crops))
        start = time.perf_counter()
        frozen = torch.compile(encoder, dynamic=False, options={"freezing": True})  # weights as constants
        frozen(crops)
        torch.cuda.synchronize()
        times["compile_frozen_seconds"] = time.perf_counter() - start
        times["forward_bf16_compiled_frozen_ms"] = cuda_ms(lambda: frozen(crops))
    emit(
        bench="breakdown",
        model=entry,
        input_px=size,
        image=f"{width}x{height}",
        patches_per_batch=len(boxes),
        **{k: round(v, 2) for k, v in times.items()},
    )


if __name__ == "__main__":
    stage_times("vicreg_rn50", 224, 48, 375, 500)
    stage_times("resnet18_cifar", 32, 256, 32, 32)
