"""Vision Transformer speed: ViT-S/16 and ViT-B/16 at 224 px in bf16 with fused attention, eager and compiled,
the model alone and the whole pipeline (``features.extract.extract`` on in-memory uint8 ImageNet-size images,
16 random patches per image, into a float16 store), with MFU.

    cd benchmarks && python vit.py          # on one GPU; under 3 minutes expected on an H200 (two compilations)
    cd benchmarks && python vit.py --quick  # 4 images, 2 patches, eager only: a CPU smoke run

Model-only: the encoder (normalisation, ViT, class-token readout) on a ready batch of float pixels, the batch being
the pipeline's own forward slice, so the compiled graph is shared. Pipeline: sampler + crop/resize + encoder +
aggregation + store, timed after an untimed warm-up run (for ``compiled``: the compilation, ``warmup_seconds``).
The ratio to model-only is given three ways: ``pipeline_over_model`` times the whole call (the 2.3 GB copy of the
4,096 in-memory images to the GPU included: up to a tenth of a ViT-S run), ``pass_over_model`` the pass alone, and
``steady_over_model`` the pass after its first forward (the rate a dataset of any size runs at, as the records'
``after_first_forward``).

FLOPs per patch (written out, no FLOP-counting library): every weight matrix is used once per token at 2 FLOPs
per multiply-add, and attention adds its two T x T products per block:

    flops = 2 * T * depth * (4 D^2 + 2 D H)  +  4 * depth * T^2 * D  +  2 * N * (3 p^2) * D

with N = (224/p)^2 patches, T = N + 1 tokens, width D, MLP width H = 4D, patch p (norms, softmax and GELU are
left out: they are not matrix products). ``gflops_counted`` is torch's FlopCounterMode on the same forward, as a
check (on the CPU it misses the fused attention kernel). MFU = flops * patches/s (a patch is one 224 px forward
sample) / the GPU's dense bf16 peak (``common.PEAK_BF16_FLOPS``). Weights are random: speed does not depend on
them. One JSON line per measurement, each with the device and command.
"""

from __future__ import annotations

import argparse

import torch
from common import emit, peak_flops, timed
from extraction import head, ours, synthetic
from torch.utils.flop_counter import FlopCounterMode

from ssl_patchbench.data.datasets import ImageSplit
from ssl_patchbench.features.extract import ExtractSettings, PatchRunner, input_layout
from ssl_patchbench.models.archs import build_entry_backbone
from ssl_patchbench.models.encoder import Encoder
from ssl_patchbench.models.loading import LoadedModel
from ssl_patchbench.models.registry import get_entry
from ssl_patchbench.models.vit import VitReadout
from ssl_patchbench.sampling.patches import PatchSpec

MODELS = {"vits16": "dino_vits16", "vitb16": "dino_vitb16"}
SIZE = 224


def random_vit(name: str) -> LoadedModel:
    entry = get_entry(name)
    backbone, dim = build_entry_backbone(entry)
    return LoadedModel(entry, backbone.eval(), None, dim, None, "random-init", "random-init")


def formula_flops(readout: VitReadout, size: int) -> float:
    """The module docstring's FLOPs per image for this ViT at ``size`` px."""
    vit = readout.vit
    patch = vit.patch_embed.patch_size[0]
    n = (size // patch) ** 2
    t = n + vit.num_prefix_tokens
    d, depth = vit.embed_dim, len(vit.blocks)
    hidden = vit.blocks[0].mlp.fc1.out_features
    return 2 * t * depth * (4 * d * d + 2 * d * hidden) + 4 * depth * t * t * d + 2 * n * 3 * patch * patch * d


def counted_flops(encoder: Encoder, size: int) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def model_only(encoder: Encoder, batch: int, device: torch.device, *, compiled: bool, iters: int) -> dict:
    """Patches/s (224 px forward samples) of the encoder alone on one ready batch, bf16 on CUDA (fp32 on CPU)."""
    forward = encoder.compiled() if compiled else encoder
    x = (torch.rand(batch, 3, SIZE, SIZE, device=device) * 255).contiguous(
        memory_format=input_layout(device, compiled=compiled)
    )  # as the pipeline hands its slices over: the compiled graph is shared
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def run(n: int) -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype, enabled=device.type == "cuda"):
            for _ in range(n):
                forward(x)

    _, warm = timed(lambda: run(2), device=device)  # for compiled: the compilation
    _, seconds = timed(lambda: run(iters), device=device)
    return {"patches": batch * iters, "seconds": seconds, "warmup_seconds": round(warm, 2)}


def line(kind: str, key: str, mode: str, result: dict, flops: float, counted: float, **extra) -> dict:
    rate = result["patches"] / result["seconds"]  # one 224 px forward sample each
    peak = peak_flops()
    fields = {
        "bench": "vit",
        "measure": kind,
        "model": key,
        "encoder_mode": mode,
        "input_px": SIZE,
        "precision": "bf16" if torch.cuda.is_available() else "fp32",
        "patches_per_s": round(rate, 1),
        "gflops_per_patch": round(flops / 1e9, 3),
        "gflops_counted": round(counted / 1e9, 3),
        "mfu": round(flops * rate / peak, 4) if peak else None,
        **extra,
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()},
    }
    emit(**fields)
    return fields


def bench_model(key: str, images: ImageSplit, args: argparse.Namespace, device: torch.device) -> None:
    model = random_vit(MODELS[key])
    encoder = Encoder(model, "embedding")
    assert isinstance(model.backbone, VitReadout)
    assert all(m.fused_attn for m in model.backbone.modules() if hasattr(m, "fused_attn"))
    flops, counted = formula_flops(model.backbone, SIZE), counted_flops(encoder, SIZE)
    encoder = encoder.to(device).eval()
    if device.type == "cuda":  # as extract() does: the compiled graph's guards then hold for both measurements
        encoder = encoder.to(memory_format=torch.channels_last)
    pre = model.entry.preprocessing
    spec = PatchSpec(mode="random", n=args.patches, scale=model.entry.patch_scale, out_size=SIZE, resize=pre.resize)
    runner = PatchRunner(encoder, spec, ExtractSettings(device))
    batch = runner.max_patches  # the pipeline's forward slice: model-only and pipeline share one compiled graph
    warm_split = head(images, 2 * runner.images_per_batch)
    rates = {}
    for mode in args.modes.split(","):
        compiled = mode == "compiled"
        iters = max(3, len(images) * args.patches // batch)
        alone = line(
            "model-only",
            key,
            mode,
            model_only(encoder, batch, device, compiled=compiled, iters=iters),
            flops,
            counted,
            batch=batch,
        )
        warm = ours(encoder, warm_split, spec, device, compile_model=compiled)
        result = ours(encoder, images, spec, device, compile_model=compiled)
        piped = line(
            "pipeline",
            key,
            mode,
            result,
            flops,
            counted,
            patches_per_image=args.patches,
            batch=batch,
            warmup_seconds=round(warm["seconds"], 2),
        )
        steady = (result["steady"] or {}).get("forwarded_patches_per_s", 0.0)
        rates[mode] = (
            alone["patches_per_s"],
            piped["patches_per_s"],
            result["patches"] / result["pass_seconds"],
            steady,
        )
    emit(
        bench="vit-ratio",
        model=key,
        **{f"pipeline_over_model_{m}": round(p / a, 3) for m, (a, p, _, _) in rates.items()},
        **{f"pass_over_model_{m}": round(p / a, 3) for m, (a, _, p, _) in rates.items()},
        **{f"steady_over_model_{m}": round(p / a, 3) for m, (a, _, _, p) in rates.items()},
        target="pipeline >= 0.9 x compiled model-only",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vits16,vitb16", help="vits16 and/or vitb16")
    parser.add_argument("--modes", default="eager,compiled", help="encoder modes: eager, compiled")
    parser.add_argument("--images", type=int, default=1024, help="ImageNet-size (500x375) images per pipeline run")
    parser.add_argument("--patches", type=int, default=16, help="random patches per image")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: 4 images, 2 patches, eager")
    args = parser.parse_args()
    if args.quick:
        args.images, args.patches, args.modes = 4, 2, "eager"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = synthetic(args.images)
    for key in args.models.split(","):
        bench_model(key, images, args, device)


if __name__ == "__main__":
    main()
