"""I²VICReg / TCR pretraining on fixed-scale patches (or RandomResizedCrop views), in solo-learn's layout.

The dataset sits on the device once as uint8; each epoch's view boxes are drawn on a host thread during the epoch
before (a pure function of seed and epoch); every step draws its augmentation's random numbers, cuts K views
per image with one batched ``crop_and_resize`` and augments them on the device (``pretrain.augment``, a pure function
of the draws), runs each view through backbone + projector under bf16 autocast (CUDA) and steps LARS on a
warm-up + cosine schedule; ``--compile`` compiles views, model and loss (optionally as CUDA graphs). The only
host syncs are the logged loss every ``log_every`` steps and the end of an epoch. After every epoch
``OUT/last.ckpt`` (``state_dict`` with ``backbone.*`` and ``projector.*``, plus optimiser, step, epoch and RNG
state) is copied on the device and moved to the host and written by a background thread while the next epoch
trains (atomic rename), so a killed run resumes where the last epoch ended and continues exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from ssl_patchbench.core.devices import resolve_device
from ssl_patchbench.core.errors import UserError
from ssl_patchbench.core.files import atomic_path, canonical_digest, write_json_atomic
from ssl_patchbench.core.paths import home
from ssl_patchbench.data.datasets import open_split
from ssl_patchbench.models.archs import build_backbone, build_projector
from ssl_patchbench.models.registry import ZooEntry, get_entry
from ssl_patchbench.pretrain.augment import ViewAugment, byol_augments, draw_views, render_views
from ssl_patchbench.pretrain.config import AUTO_COMPILE_STEPS, COMPILE_MODES, PretrainConfig, jsonable
from ssl_patchbench.pretrain.lars import WarmupCosine, build_lars
from ssl_patchbench.pretrain.losses import tcr_loss, vicreg_views
from ssl_patchbench.pretrain.state import CheckpointWriter, load_training_state, snapshot
from ssl_patchbench.sampling.geometry import ATTEMPTS, random_resized_boxes, uniforms_from_array

__all__ = ["PretrainConfig", "pretrain", "pretrain_demo_model", "save_solo_checkpoint"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.ckpt"


@dataclass
class Progress:
    """What a reporter sees: after a logged step (``loss`` of that step) or after an epoch (its mean)."""

    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    lr: float
    images_per_s: float
    seconds: float
    eta_s: float  # seconds left to the end of the run, at the mean step time of this call so far


class Reporter(Protocol):
    def on_step(self, progress: Progress) -> None: ...

    def on_epoch(self, progress: Progress) -> None: ...


class LogReporter:
    """Progress as log lines (the CLI swaps in a rich bar on a terminal)."""

    def on_step(self, p: Progress) -> None:
        log.info(
            "epoch %d/%d step %d/%d loss %.4f lr %.4f %.0f img/s eta %.0f s",
            p.epoch + 1,
            p.epochs,
            p.step,
            p.steps,
            p.loss,
            p.lr,
            p.images_per_s,
            p.eta_s,
        )

    def on_epoch(self, p: Progress) -> None:
        log.info(
            "epoch %d/%d done: loss %.4f, %.2f s, %.0f img/s", p.epoch + 1, p.epochs, p.loss, p.seconds, p.images_per_s
        )


@dataclass
class PretrainResult:
    """Where the checkpoint is and how fast the run went (epochs of this invocation only)."""

    checkpoint: Path
    epochs_done: int
    epoch_seconds: list[float] = field(default_factory=list)
    final_loss: float | None = None
    images_per_s: float | None = None


class Trainee(nn.Module):
    """Backbone + projector; its state dict names are solo-learn's ``backbone.*`` and ``projector.*``."""

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def arch_entry(arch: str) -> ZooEntry:
    """The zoo entry that defines the architecture, projector and preprocessing of ``--arch``.

    ``resnet50`` is the zoo's ``resnet50_solo`` (ImageNet ResNet-50, VICReg's 8192-8192-8192 projector), which
    ``patchbench eval --model resnet50_solo`` loads the checkpoints of.
    """
    entry = get_entry("resnet50_solo" if arch == "resnet50" else arch)
    if not entry.projector:
        raise UserError(f"zoo entry {arch!r} has no projector widths to train: use one that sets `projector`")
    return entry


def build_trainee(entry: ZooEntry) -> Trainee:
    backbone, dim = build_backbone(entry.arch, stem=entry.stem)
    projector = build_projector(dim, entry.projector, batchnorm=entry.projector_batchnorm)
    return Trainee(backbone, projector)


def load_images(cfg: PretrainConfig, device: torch.device) -> tuple[torch.Tensor, dict]:
    """The train split as one uint8 ``[N, 3, H, W]`` tensor on ``device`` (CIFAR-10: 150 MB), and its identity."""
    root = Path(cfg.home) if cfg.home else home()
    split = open_split(
        cfg.dataset,
        "train",
        data_dir=cfg.data_dir,
        per_class=cfg.train_per_class,
        cache_dir=root / "images",
        download=cfg.download,
    )
    if split.array is None:
        raise UserError(
            f"{cfg.dataset} is read from files (large or mixed-size images): pretraining needs a dataset held "
            "in memory as one array (images of at most 96 px, all the same size, e.g. CIFAR, STL-10)"
        )
    if len(split) < cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(split)} training images")
    images = torch.from_numpy(split.array).permute(0, 3, 1, 2).contiguous().to(device)
    return images, split.identity


def _objective(cfg: PretrainConfig) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The loss on the K views' projections ``[B, D]`` (any dtype; the losses compute in float32)."""
    if cfg.method == "tcr":
        loss = functools.partial(tcr_loss, eps=cfg.tcr_eps, lam=cfg.tcr_lambda)
    else:
        sim, var, cov = cfg.vicreg_coefficients
        loss = functools.partial(vicreg_views, sim=sim, var=var, cov=cov)
    return lambda z: loss(torch.stack([zk.float() for zk in z]))


def _view_maker(cfg: PretrainConfig, entry: ZooEntry, device: torch.device) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``views(images, boxes, draws, blurs)``: the K normalised model inputs ``[B, 3, S, S]`` of a step (cut,
    augmented, normalised, in the model's memory format), a pure function of its arguments."""
    pre = entry.preprocessing
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def views(images: torch.Tensor, boxes: torch.Tensor, draws: tuple, blurs: tuple[bool, ...]) -> tuple:
        cut = render_views(images, boxes, draws, blurs=blurs, out_size=pre.input_size, interpolation=cfg.interpolation)
        return tuple(((v - mean) / std).contiguous(memory_format=memory) for v in cut)

    return views


def compile_mode(cfg: PretrainConfig, device: torch.device, total_steps: int) -> str:
    """``--compile`` resolved: ``auto`` is ``cudagraphs`` on CUDA for a run long enough to pay for the
    compilation (``AUTO_COMPILE_STEPS``), else ``off`` (a CPU compiles for minutes and gains little)."""
    if cfg.compile != "auto":
        return cfg.compile
    return "cudagraphs" if device.type == "cuda" and total_steps >= AUTO_COMPILE_STEPS else "off"


def _compiled(fn: Callable, mode: str) -> Callable:
    """``fn`` itself (``off``) or under ``torch.compile`` in the mode ``mode`` names (static shapes: every step
    has the same batch)."""
    compile_as = COMPILE_MODES[mode]
    return fn if compile_as is None else torch.compile(fn, mode=compile_as, dynamic=False)


def _autocast_dtype(cfg: PretrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; ``--precision bf16`` also works on the CPU (slowly), for tests."""
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@dataclass
class TrainingRun:
    """The live state of one run: model, optimiser, schedule, RNG and the fixed inputs of a step."""

    cfg: PretrainConfig
    entry: ZooEntry
    device: torch.device
    images: torch.Tensor
    model: Trainee
    forward: Callable[[torch.Tensor], torch.Tensor]
    views: Callable[..., tuple[torch.Tensor, ...]]
    augments: tuple[ViewAugment, ...]
    optimiser: torch.optim.Optimizer
    schedule: WarmupCosine
    gen: torch.Generator
    objective: Callable[[list[torch.Tensor]], torch.Tensor]
    amp: torch.dtype | None
    steps_per_epoch: int
    compile: str  # the resolved --compile: off, on or cudagraphs
    start_epoch: int = 0
    started: float = field(default_factory=time.perf_counter)
    steps_done: int = 0  # in this call, for the ETA

    def epoch_boxes(self, epoch: int) -> torch.Tensor:
        """Every view box of ``epoch``, ``[steps, K * B, 4]`` on the host (pinned for a CUDA run): the uniforms
        from a NumPy generator keyed by (seed, epoch), the geometry by ``sampling.geometry`` (the evaluation's).

        A pure function of (seed, epoch), so the trainer draws the next epoch's boxes on a host thread while
        this one trains, and a resumed run draws what an uninterrupted one would."""
        cfg, steps = self.cfg, self.steps_per_epoch
        rows = steps * cfg.num_patches * cfg.batch_size
        u = np.random.default_rng((cfg.seed, epoch)).random((rows, ATTEMPTS, 4))
        h, w = self.images.shape[-2:]
        boxes = random_resized_boxes(
            uniforms_from_array(u), np.full(rows, h), np.full(rows, w), scale=cfg.scale, ratio=cfg.ratio
        )
        boxes = torch.from_numpy(boxes).float().view(steps, -1, 4)
        return boxes.pin_memory() if self.device.type == "cuda" else boxes

    def step(self, index: torch.Tensor, boxes: torch.Tensor, global_step: int) -> torch.Tensor:
        """One optimisation step on the images ``index`` cut at ``boxes``; returns the loss (on the device).

        The random numbers of the views are drawn first, so views, model and loss are pure functions of their
        inputs (``--compile`` compiles each whole; ``cudagraphs`` replays them as CUDA graphs)."""
        cfg = self.cfg
        self.optimiser.zero_grad(set_to_none=True)  # first: under CUDA graphs the last gradients live in graph memory
        draws, blurs = draw_views(cfg.batch_size, cfg.num_patches, self.augments, self.gen, self.device)
        if self.compile == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()  # the graphs' outputs of the last step are no longer read
        views = self.views(self.images[index], boxes, draws, blurs)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            z = [self.forward(v) for v in views]
        loss = self.objective(z)
        loss.backward()
        lr = self.schedule(global_step)
        for group in self.optimiser.param_groups:
            group["lr"] = lr
        self.optimiser.step()
        return loss.detach()


def setup_run(cfg: PretrainConfig) -> TrainingRun:
    """Data on the device, model, optimiser, schedule, generator and the step's (compiled) functions of ``cfg``."""
    device = resolve_device(cfg.device)
    entry = arch_entry(cfg.arch)
    images, _ = load_images(cfg, device)
    torch.manual_seed(cfg.seed)
    model = build_trainee(entry).to(device).train()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    steps = len(images) // cfg.batch_size
    lr = cfg.lr * cfg.batch_size / 256
    warmup = round(min(cfg.warmup_epochs, cfg.epochs / 10) * steps)
    mode = compile_mode(cfg, device, steps * cfg.epochs)
    return TrainingRun(
        cfg=cfg,
        entry=entry,
        device=device,
        images=images,
        model=model,
        forward=_compiled(model, mode),
        views=_compiled(_view_maker(cfg, entry, device), mode),
        augments=byol_augments(entry.preprocessing.input_size),
        optimiser=build_lars(
            model,
            lr=lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            eta=cfg.eta,
            trust_clip=cfg.trust_clip,
            compiled=mode != "off",
        ),
        schedule=WarmupCosine(lr, warmup, steps * cfg.epochs),
        gen=torch.Generator(device=device).manual_seed(cfg.seed),
        objective=_compiled(_objective(cfg), mode),
        amp=_autocast_dtype(cfg, device),
        steps_per_epoch=steps,
        compile=mode,
    )


def pretrain(
    cfg: PretrainConfig,
    out_dir: Path,
    *,
    resume: bool = True,
    reporter: Reporter | None = None,
    stop_after: int | None = None,
) -> PretrainResult:
    """Train, writing ``out_dir/last.ckpt`` after every ``save_every`` epochs and the last one.

    With ``resume`` an existing checkpoint of the same run (same ``identity()``) is continued; a different
    run there is an error. ``stop_after`` ends after that many epochs of this call (tests: a simulated kill).
    """
    out_dir = Path(out_dir)
    run = setup_run(cfg)
    path = out_dir / CHECKPOINT_NAME
    if resume and path.exists():
        run.start_epoch = load_training_state(path, cfg.identity(), run.model, run.optimiser, run.gen)
    elif path.exists():
        log.warning("--no-resume: %s will be overwritten", path)
    if run.start_epoch == 0:
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    _write_config(out_dir, run)
    result = PretrainResult(checkpoint=path, epochs_done=run.start_epoch)
    writer = CheckpointWriter()
    try:
        _train_epochs(run, out_dir, writer, reporter or LogReporter(), result, stop_after)
    finally:
        writer.wait()
    return result


def _train_epochs(
    run: TrainingRun,
    out_dir: Path,
    writer: CheckpointWriter,
    reporter: Reporter,
    result: PretrainResult,
    stop_after: int | None,
) -> None:
    cfg = run.cfg
    last = cfg.epochs if stop_after is None else min(cfg.epochs, run.start_epoch + stop_after)
    run.started = time.perf_counter()
    with ThreadPoolExecutor(1, thread_name_prefix="epoch-boxes") as host:
        upcoming = host.submit(run.epoch_boxes, run.start_epoch)
        for epoch in range(run.start_epoch, last):
            start = time.perf_counter()
            boxes = upcoming.result().to(run.device, non_blocking=True)
            if epoch + 1 < last:
                upcoming = host.submit(run.epoch_boxes, epoch + 1)
            progress = _run_epoch(run, epoch, boxes, reporter)
            if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
                writer.submit(out_dir / CHECKPOINT_NAME, _checkpoint_state(run, epoch + 1), run.device)
            progress.seconds = time.perf_counter() - start  # an epoch's time includes queueing its checkpoint copy
            progress.images_per_s = run.steps_per_epoch * cfg.batch_size / progress.seconds
            result.epochs_done = epoch + 1
            result.epoch_seconds.append(progress.seconds)
            result.final_loss, result.images_per_s = progress.loss, progress.images_per_s
            _append_metrics(out_dir, progress)
            reporter.on_epoch(progress)


def _run_epoch(run: TrainingRun, epoch: int, boxes: torch.Tensor, reporter: Reporter) -> Progress:
    """One pass over a fresh permutation (the last partial batch dropped), cutting the views at ``boxes``."""
    cfg, steps = run.cfg, run.steps_per_epoch
    order = torch.randperm(len(run.images), generator=run.gen, device=run.device)
    start = mark = time.perf_counter()
    total = torch.zeros((), device=run.device)
    for i in range(steps):
        loss = run.step(order[i * cfg.batch_size : (i + 1) * cfg.batch_size], boxes[i], epoch * steps + i)
        total += loss
        run.steps_done += 1
        if (i + 1) % cfg.log_every == 0:
            value, now = loss.item(), time.perf_counter()  # the one sync every log_every steps
            rate = cfg.log_every * cfg.batch_size / (now - mark)
            mark = now
            lr = run.schedule(epoch * steps + i)
            reporter.on_step(
                Progress(epoch, cfg.epochs, i + 1, steps, value, lr, rate, now - start, _eta(run, epoch, i))
            )
    mean_loss = total.item() / steps
    seconds = time.perf_counter() - start
    if not math.isfinite(mean_loss):
        raise UserError(f"the loss became {mean_loss} in epoch {epoch + 1}: lower --lr or raise --warmup-epochs")
    lr = run.schedule((epoch + 1) * steps - 1)
    rate = steps * cfg.batch_size / seconds
    return Progress(epoch, cfg.epochs, steps, steps, mean_loss, lr, rate, seconds, _eta(run, epoch, steps - 1))


def _eta(run: TrainingRun, epoch: int, step: int) -> float:
    """Seconds left to the end of the run after ``step`` of ``epoch``, at this call's mean step time."""
    left = (run.cfg.epochs - epoch) * run.steps_per_epoch - step - 1
    return left * (time.perf_counter() - run.started) / max(run.steps_done, 1)


def _checkpoint_state(run: TrainingRun, epochs_done: int) -> dict:
    """Everything a resume needs, in solo-learn's layout, as live tensors (the writer copies them)."""
    meta = {
        "method": run.cfg.method,
        "arch": run.cfg.arch,
        "scale": list(run.cfg.scale),
        "epochs": epochs_done,
        "dataset": run.cfg.dataset,
        "num_patches": run.cfg.num_patches,
    }
    return {
        "state_dict": run.model.state_dict(),
        "meta": meta,
        "epoch": epochs_done,
        "global_step": epochs_done * run.steps_per_epoch,
        "optimizer": run.optimiser.state_dict(),
        "generator": run.gen.get_state(),
        "config": run.cfg.identity(),
    }


def _write_config(out_dir: Path, run: TrainingRun) -> None:
    """``OUT/config.json``: the run's settings, the resolved zoo entry, the data and the software."""
    write_json_atomic(
        out_dir / "config.json",
        {
            "config": jsonable(asdict(run.cfg)),
            "zoo_entry": run.entry.to_dict(),
            "device": str(run.device),
            "autocast": str(run.amp),
            "compile": run.compile,
            "steps_per_epoch": run.steps_per_epoch,
            "lr": run.schedule.base_lr,
            "warmup_steps": run.schedule.warmup_steps,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else None,
        },
    )


def _append_metrics(out_dir: Path, p: Progress) -> None:
    record = {"epoch": p.epoch + 1, "loss": p.loss, "lr": p.lr, "seconds": p.seconds, "images_per_s": p.images_per_s}
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def save_solo_checkpoint(
    path: Path, backbone: nn.Module, projector: nn.Module, meta: dict, *, extra: dict | None = None
) -> None:
    """Write ``{"state_dict": {backbone.*, projector.*}, "meta": ...}`` atomically (solo-learn's layout)."""
    payload = snapshot({"state_dict": Trainee(backbone, projector).state_dict(), "meta": meta, **(extra or {})})
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


def pretrain_demo_model(out_dir: Path, *, epochs: int, device: str = "auto", reporter: Reporter | None = None) -> Path:
    """The demo's model: ``tiny_cifar`` pretrained on scikit-learn digits; reused when already trained.

    ``reporter`` shows its progress (the CLI passes its bar or line reporter; default: log lines)."""
    cfg = PretrainConfig(
        arch="tiny_cifar",
        dataset="digits",
        scale=(0.2, 1.0),
        epochs=epochs,
        batch_size=256,
        lr=2.0,
        warmup_epochs=0,
        trust_clip=True,  # the demo's measured recipe (docs/pretrain.md): lr 2.0, no warm-up, clipped steps
        device=device,
        log_every=10**9,
    )
    # named by its recipe: a home from before a change of defaults does not hand back the old model
    path = Path(out_dir) / f"tiny_vicreg_digits_{epochs}ep_{canonical_digest(cfg.identity())}.ckpt"
    if path.exists():
        return path
    run_dir = Path(out_dir) / f".run_{epochs}ep"
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted earlier demo starts over
    result = pretrain(cfg, run_dir, resume=False, reporter=reporter)
    os.replace(result.checkpoint, path)
    return path
