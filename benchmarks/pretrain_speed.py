"""Pretraining speed: seconds per CIFAR-10 epoch through ``patchbench pretrain`` (eager and compiled), and
where a step's time goes (views, forward + loss + backward, LARS), each stage timed with CUDA events.

    python benchmarks/pretrain_speed.py --data DIR [--epochs 4] [--modes eager,compiled,reduce-overhead] [--profile]

DIR holds cifar10/{train,test} (``python ../shared/data/materialize.py cifar10 DIR``). The reference the
issue names: an eager PyTorch VICReg ResNet-18 at batch 512 with GPU augmentations, 2.7 s per epoch on an H100.
One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from breakdown import cuda_ms
from common import emit, kernel_profile

from ssl_patchbench.pretrain.augment import byol_augments, make_views
from ssl_patchbench.pretrain.lars import LARS, lars_param_groups
from ssl_patchbench.pretrain.losses import vicreg_views
from ssl_patchbench.pretrain.train import PretrainConfig, arch_entry, build_trainee, load_images, pretrain


def epochs_timed(cfg: PretrainConfig, epochs: int) -> dict:
    """The first ``epochs`` of a real run: the median epoch after the first (autotuning, compilation)."""
    with tempfile.TemporaryDirectory() as out:
        result = pretrain(cfg, Path(out), resume=False, stop_after=epochs)
    later = result.epoch_seconds[1:] or result.epoch_seconds
    return {
        "first_epoch_s": round(result.epoch_seconds[0], 2),
        "seconds_per_epoch": round(statistics.median(later), 3),
        "images_per_s": round(result.images_per_s or 0.0),
    }


def gpu_busy(cfg: PretrainConfig) -> dict:
    """Kernel time on the GPU during one epoch (the second of a run) over that epoch's unprofiled time:
    well below 1 means the step waits on the host (kernel launches, Python), not on the GPU."""
    with tempfile.TemporaryDirectory() as out:
        first = pretrain(cfg, Path(out), resume=False, stop_after=2)
        activities = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profile:
            pretrain(cfg, Path(out), resume=True, stop_after=1)
    kernel_s, top = kernel_profile(profile)
    return {
        "gpu_kernel_s_per_epoch": round(kernel_s, 3),
        "gpu_busy": round(kernel_s / first.epoch_seconds[-1], 3),
        "top_kernels_ms": top,
    }


def stage_times(cfg: PretrainConfig, mode: str) -> dict:
    """Milliseconds per step of each stage on real CIFAR-10 images, the same work as ``pretrain``'s step.

    ``mode``: eager, compiled, or reduce-overhead (compiled model replayed as CUDA graphs; stages only)."""
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    entry = arch_entry(cfg.arch)
    images, _ = load_images(cfg, device)
    model = build_trainee(entry).to(device).train().to(memory_format=torch.channels_last)
    forward = model if mode == "eager" else torch.compile(model, mode=None if mode == "compiled" else mode)
    views_of = make_views if mode == "eager" else torch.compile(make_views)
    optimiser = LARS(lars_param_groups(model), lr=0.6, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed(0)
    pre = entry.preprocessing
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
    batch = images[: cfg.batch_size]

    def views() -> torch.Tensor:
        return views_of(batch, n_views=2, out_size=pre.input_size, scale=cfg.scale, ratio=cfg.ratio,
                        augments=byol_augments(pre.input_size), gen=gen)  # fmt: skip

    fixed = views()

    def forward_backward() -> None:
        with torch.autocast("cuda", torch.bfloat16):
            z = [forward(((v - mean) / std).contiguous(memory_format=torch.channels_last)) for v in fixed]
        vicreg_views(torch.stack([zk.float() for zk in z])).backward()

    for _ in range(3):  # compilation and autotuning
        views()
        forward_backward()
    return {
        "views_ms": round(cuda_ms(views), 2),
        "forward_loss_backward_ms": round(cuda_ms(forward_backward), 2),
        "lars_step_ms": round(cuda_ms(optimiser.step), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="folder holding cifar10/{train,test}")
    parser.add_argument("--epochs", type=int, default=4, help="epochs timed, of a 150-epoch schedule")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--profile", action="store_true", help="also the GPU-busy share of an epoch")
    args = parser.parse_args()
    home = tempfile.mkdtemp()
    for mode in args.modes.split(","):
        runs = mode in ("eager", "compiled")  # what `patchbench pretrain` offers end to end
        cfg = PretrainConfig(arch="resnet18_cifar", dataset="cifar10", data_dir=args.data, scale=(0.08, 1.0),
                             epochs=150, batch_size=args.batch_size, compile=mode == "compiled",
                             log_every=10**9, home=home)  # fmt: skip
        fields = {"bench": "pretrain-speed", "mode": mode, "batch_size": args.batch_size, "epochs": args.epochs}
        timed = epochs_timed(cfg, args.epochs) if runs else {}
        busy = gpu_busy(cfg) if args.profile and runs else {}
        emit(**fields, **stage_times(cfg, mode), **timed, **busy)


if __name__ == "__main__":
    main()
