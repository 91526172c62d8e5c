"""Pretraining speed: seconds per CIFAR-10 epoch through ``patchbench pretrain`` (modes ``eager``, ``compiled``:
``--compile on``, ``cudagraphs``: ``--compile cudagraphs``), side by side with the independent eager VICReg step
(``tests/vicreg_reference.py``, mode ``reference``), and with ``--stages`` where a step's time goes (views,
forward + loss + backward, LARS), each stage timed with CUDA events.

    python benchmarks/pretrain_speed.py --data DIR [--epochs 4] [--modes reference,eager,compiled,cudagraphs]
        [--stages] [--profile] [--schedule-epochs 150] [--seed 0] [--save FILE]

DIR holds cifar10/{train,test} (``python ../shared/data/materialize.py cifar10 DIR``). Run from the repository
root (the reference step is imported from ``tests``). One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from breakdown import cuda_ms
from common import emit, kernel_profile

from ssl_patchbench.core.devices import resolve_device
from ssl_patchbench.pretrain.augment import byol_augments, draw_views, make_views
from ssl_patchbench.pretrain.lars import WarmupCosine, build_lars
from ssl_patchbench.pretrain.train import (
    PretrainConfig,
    arch_entry,
    build_trainee,
    load_images,
    pretrain,
    save_solo_checkpoint,
    setup_run,
)
from ssl_patchbench.sampling.geometry import ATTEMPTS, random_resized_boxes, uniforms_from_array

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.vicreg_reference import ReferenceLARS, reference_step

MODES = {"eager": "off", "compiled": "on", "cudagraphs": "cudagraphs"}  # benchmark mode -> --compile


def epochs_timed(cfg: PretrainConfig, epochs: int) -> dict:
    """The first ``epochs`` of a real run: the median epoch after the first (autotuning, compilation), and
    each epoch's mean loss (the modes must agree on it: same seed, same random numbers)."""
    with tempfile.TemporaryDirectory() as out:
        result = pretrain(cfg, Path(out), resume=False, stop_after=epochs)
        losses = [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    later = result.epoch_seconds[1:] or result.epoch_seconds
    return {
        "first_epoch_s": round(result.epoch_seconds[0], 2),
        "seconds_per_epoch": round(statistics.median(later), 3),
        "images_per_s": round(result.images_per_s or 0.0),
        "epoch_losses": [round(v, 3) for v in losses],
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


def reference_epochs(cfg: PretrainConfig, epochs: int, save: Path | None = None) -> dict:
    """The independent eager step over the same data: views cut and augmented as the trainer does, then
    ``reference_step`` (VICReg's LARS, one parameter at a time; bf16 autocast; channels_last), on the trainer's
    schedule of ``cfg.epochs`` (1 warm-up epoch, cosine), seeded by ``cfg.seed``. With ``save`` its weights
    after ``epochs`` go there in solo-learn's layout, for ``patchbench eval`` (the quality side by side)."""
    device = resolve_device(cfg.device)
    torch.backends.cudnn.benchmark = True
    entry = arch_entry(cfg.arch)
    images, _ = load_images(cfg, device)
    torch.manual_seed(cfg.seed)
    model = build_trainee(entry).to(device).train().to(memory_format=torch.channels_last)
    lr = cfg.lr * cfg.batch_size / 256
    optimiser = ReferenceLARS(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    gen, rng = torch.Generator(device=device).manual_seed(cfg.seed), np.random.default_rng(cfg.seed)
    pre = entry.preprocessing
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
    steps, rows = len(images) // cfg.batch_size, 2 * cfg.batch_size
    schedule = WarmupCosine(lr, steps, steps * cfg.epochs)
    amp = torch.bfloat16 if device.type == "cuda" else None
    seconds, losses = [], []
    for epoch in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(images), generator=gen, device=device)
        u = rng.random((steps * rows, ATTEMPTS, 4))
        h, w = images.shape[-2:]
        boxes = random_resized_boxes(uniforms_from_array(u), np.full(len(u), h), np.full(len(u), w),
                                     scale=cfg.scale, ratio=cfg.ratio)  # fmt: skip
        boxes = torch.from_numpy(boxes).float().to(device).view(steps, rows, 4)
        total = torch.zeros((), device=device)
        for i in range(steps):
            batch = images[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]]
            views = make_views(batch, boxes[i], n_views=2, out_size=pre.input_size,
                               augments=byol_augments(pre.input_size), gen=gen)  # fmt: skip
            x, y = (((v - mean) / std).contiguous(memory_format=torch.channels_last) for v in views)
            total += reference_step(model, optimiser, x, y, schedule(epoch * steps + i), amp=amp)
        losses.append(round(total.item() / steps, 3))
        seconds.append(time.perf_counter() - start)
    if save is not None:
        meta = {"method": "vicreg", "arch": cfg.arch, "scale": list(cfg.scale), "epochs": epochs, "seed": cfg.seed}
        save_solo_checkpoint(save, model.backbone, model.projector, meta)
    later = seconds[1:] or seconds
    return {"first_epoch_s": round(seconds[0], 2), "seconds_per_epoch": round(statistics.median(later), 3),
            "epoch_losses": losses}  # fmt: skip


def lars_step_ms(cfg: PretrainConfig) -> dict:
    """The optimiser step alone on ResNet-18's parameters with gradients: the trainer's (foreach kernels, eager
    and under ``--compile``) and the reference's (one parameter at a time)."""
    device = torch.device("cuda")
    model = build_trainee(arch_entry(cfg.arch)).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    trainer = build_lars(model, lr=0.6, momentum=0.9, weight_decay=cfg.weight_decay, eta=cfg.eta)
    compiled = build_lars(model, lr=0.6, momentum=0.9, weight_decay=cfg.weight_decay, eta=cfg.eta, compiled=True)
    compiled.step()  # compilation
    reference = ReferenceLARS(model.parameters(), lr=0.6, weight_decay=cfg.weight_decay)
    return {
        "lars_trainer_ms": round(cuda_ms(trainer.step), 3),
        "lars_trainer_compiled_ms": round(cuda_ms(compiled.step), 3),
        "lars_reference_ms": round(cuda_ms(reference.step), 3),
    }


def stage_times(cfg: PretrainConfig) -> dict:
    """Milliseconds per step of each stage of the trainer's own step (``--compile`` as in ``cfg``) on real
    CIFAR-10 images: views (draws + the views function), forward + loss + backward, LARS."""
    run = setup_run(cfg)
    batch, boxes = torch.arange(cfg.batch_size, device=run.device), run.epoch_boxes(0)[0].to(run.device)
    state = {}

    def views() -> None:
        if run.compile == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        draws, blurs = draw_views(cfg.batch_size, cfg.num_patches, run.augments, run.gen, run.device)
        state["views"] = run.views(run.images[batch], boxes, draws, blurs)

    def forward_backward() -> None:
        run.optimiser.zero_grad(set_to_none=True)  # as the step: the last gradients may live in graph memory
        views()  # under CUDA graphs the views of the last step are overwritten: a fresh step each time
        with torch.autocast("cuda", torch.bfloat16):
            z = [run.forward(v) for v in state["views"]]
        run.objective(z).backward()

    for _ in range(3):  # compilation, CUDA-graph recording and autotuning
        forward_backward()
    views_ms = cuda_ms(views)
    return {
        "views_ms": round(views_ms, 2),
        "forward_loss_backward_ms": round(cuda_ms(forward_backward) - views_ms, 2),
        "lars_step_ms": round(cuda_ms(run.optimiser.step), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="folder holding cifar10/{train,test}")
    parser.add_argument("--epochs", type=int, default=4, help="epochs timed, of a --schedule-epochs schedule")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--modes", default="reference,eager,compiled,cudagraphs")
    parser.add_argument("--stages", action="store_true", help="also each stage's time per step")
    parser.add_argument("--profile", action="store_true", help="also the GPU-busy share of an epoch")
    parser.add_argument("--schedule-epochs", type=int, default=150, help="the schedule's length (cosine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, help="reference mode: write its weights there after --epochs")
    args = parser.parse_args()
    home = tempfile.mkdtemp()
    for mode in args.modes.split(","):
        if mode == "reference":
            cfg = PretrainConfig(arch="resnet18_cifar", dataset="cifar10", data_dir=args.data, scale=(0.08, 1.0),
                                 epochs=args.schedule_epochs, batch_size=args.batch_size, seed=args.seed,
                                 home=home)  # fmt: skip
            fields = {"bench": "pretrain-speed", "mode": mode, "batch_size": args.batch_size, "epochs": args.epochs,
                      "schedule_epochs": args.schedule_epochs, "seed": args.seed}  # fmt: skip
            lars = lars_step_ms(cfg) if torch.cuda.is_available() else {}
            emit(**fields, **reference_epochs(cfg, args.epochs, args.save), **lars)
            continue
        cfg = PretrainConfig(arch="resnet18_cifar", dataset="cifar10", data_dir=args.data, scale=(0.08, 1.0),
                             epochs=args.schedule_epochs, batch_size=args.batch_size, compile=MODES[mode],
                             log_every=10**9, home=home)  # fmt: skip
        fields = {"bench": "pretrain-speed", "mode": mode, "batch_size": args.batch_size, "epochs": args.epochs}
        try:  # a mode that fails (a compiler error) is a result too: the others still run
            timed = epochs_timed(cfg, args.epochs)
            stages = stage_times(cfg) if args.stages else {}
            busy = gpu_busy(cfg) if args.profile else {}
        except Exception as err:
            emit(**fields, error=f"{type(err).__name__}: {err}"[:2000])
            continue
        emit(**fields, **timed, **stages, **busy)


if __name__ == "__main__":
    main()
