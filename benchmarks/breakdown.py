"""Where extraction time goes: each stage of one batch timed with CUDA events (boxes on the CPU, crop op,
model forward eager and under ``torch.compile``), for ResNet-50 at 224 px on ImageNet-size images and
ResNet-18 at 32 px; then the whole compiled ResNet-50 pipeline under the profiler (GPU-busy share, top kernels).

    python benchmarks/breakdown.py [--autotune]   # --autotune: ResNet-50 only, adds max-autotune (minutes)
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from common import emit, kernel_profile
from extraction import head, ours, random_model, synthetic

from ssl_patchbench.features.extract import default_max_patches
from ssl_patchbench.models.encoder import Encoder
from ssl_patchbench.sampling.patches import PatchSpec, crop_and_resize


def cuda_ms(fn, repeat: int = 10) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def compiled_times(forward, x: torch.Tensor) -> tuple[float, float]:
    """Seconds of the first call of a compiled ``forward`` (the compilation), then CUDA ms per call."""
    start = time.perf_counter()
    forward(x)
    torch.cuda.synchronize()
    return time.perf_counter() - start, cuda_ms(lambda: forward(x))


def stage_times(entry: str, size: int, n: int, height: int, width: int, *, autotune: bool = False) -> None:
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    model = random_model(entry)
    encoder = Encoder(model, "embedding").to(device).eval().to(memory_format=torch.channels_last)
    pre = model.entry.preprocessing
    spec = PatchSpec(mode="random", n=n, scale=model.entry.patch_scale, out_size=size, resize=pre.resize)
    per_batch = max(1, default_max_patches(device, size) // n)
    images = torch.randint(0, 256, (per_batch, height, width, 3), dtype=torch.uint8, device=device)
    indices = np.arange(per_batch)
    t0 = time.perf_counter()
    boxes = spec.boxes(indices, np.full(per_batch, height), np.full(per_batch, width)).reshape(-1, 4)
    boxes_ms = (time.perf_counter() - t0) * 1000
    boxes_t = torch.from_numpy(boxes).float().to(device)
    owner = torch.arange(per_batch, device=device).repeat_interleave(n)
    pixels = images.permute(0, 3, 1, 2).float()
    crops = crop_and_resize(pixels, boxes_t, owner, size)
    crops_cl = crops.contiguous(memory_format=torch.channels_last)  # what the pipeline feeds the encoder
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        times = {
            "boxes_cpu_ms": boxes_ms,
            "to_float_ms": cuda_ms(lambda: images.permute(0, 3, 1, 2).float()),
            "crop_resize_ms": cuda_ms(lambda: crop_and_resize(pixels, boxes_t, owner, size)),
            "crop_resize_fp16_ms": cuda_ms(lambda: crop_and_resize(pixels.half(), boxes_t.half(), owner, size)),
            "to_channels_last_ms": cuda_ms(lambda: crops.contiguous(memory_format=torch.channels_last)),
            "forward_bf16_ms": cuda_ms(lambda: encoder(crops_cl)),
        }
        variants = [  # torch.compile is lazy: each compiles on its first call, timed by compiled_times
            ("compile_seconds", "forward_bf16_compiled_ms", encoder.compiled()),
            (  # weights as constants
                "compile_frozen_seconds",
                "forward_bf16_compiled_frozen_ms",
                torch.compile(encoder, dynamic=False, options={"freezing": True}),
            ),
        ]
        if autotune:  # Triton convolution templates with fused epilogues, chosen by benchmarking: minutes
            variants.append(
                (
                    "compile_max_autotune_seconds",
                    "forward_bf16_max_autotune_ms",
                    torch.compile(encoder, dynamic=False, mode="max-autotune-no-cudagraphs"),
                )
            )
        for seconds_key, ms_key, forward in variants:
            times[seconds_key], times[ms_key] = compiled_times(forward, crops_cl)
    emit(
        bench="breakdown",
        model=entry,
        input_px=size,
        image=f"{width}x{height}",
        patches_per_batch=len(boxes),
        **{k: round(v, 2) for k, v in times.items()},
    )


def pipeline_profile(images: int = 2048, n: int = 48) -> None:
    """The compiled ResNet-50 pipeline (sampler, crop, model, mean, float16 store) under the profiler, after a
    warm-up run: the share of wall time the GPU spends in kernels and the kernels that take it."""
    device = torch.device("cuda")
    model = random_model("vicreg_rn50")
    encoder = Encoder(model, "embedding")
    pre = model.entry.preprocessing
    spec = PatchSpec(mode="random", n=n, scale=model.entry.patch_scale, out_size=224, resize=pre.resize)
    split = synthetic(images)
    ours(encoder, head(split, 128), spec, device, compile_model=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        result = ours(encoder, split, spec, device, compile_model=True)
    kernel_s, top = kernel_profile(profile, top=12)
    emit(
        bench="pipeline-profile",
        model="vicreg_rn50",
        patches_per_image=n,
        images=images,
        seconds=round(result["seconds"], 3),
        patches_per_s=round(result["patches"] / result["seconds"]),
        gpu_kernel_s=round(kernel_s, 3),
        gpu_busy=round(kernel_s / result["seconds"], 3),
        top_kernels_ms=top,
    )


if __name__ == "__main__":
    if "--autotune" in sys.argv:
        stage_times("vicreg_rn50", 224, 48, 375, 500, autotune=True)
    else:
        stage_times("vicreg_rn50", 224, 48, 375, 500)
        stage_times("resnet18_cifar", 32, 256, 32, 32)
        pipeline_profile()
