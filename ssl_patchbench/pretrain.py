"""Minimal VICReg pretraining on patches, writing solo-learn-layout checkpoints that the zoo loads.

Today it serves the offline demo (a tiny model on scikit-learn digits in about a minute of CPU);
the views are cut by the same batched sampler as evaluation (``crop_and_resize``), on the device.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .archs import build_backbone, build_projector
from .data import ImageSplit, open_split
from .devices import resolve_device
from .files import atomic_path
from .patches import PatchSpec, crop_and_resize
from .zoo import ZooEntry, get_entry

log = logging.getLogger(__name__)


def vicreg_loss(
    z1: torch.Tensor, z2: torch.Tensor, *, sim: float = 25.0, var: float = 25.0, cov: float = 1.0
) -> torch.Tensor:
    """VICReg: invariance (MSE) + variance (hinge on the std of each dimension) + covariance (off-diagonal)."""
    invariance = F.mse_loss(z1, z2)
    variance = covariance = z1.new_zeros(())
    for z in (z1, z2):
        z = z - z.mean(dim=0)
        std = torch.sqrt(z.var(dim=0) + 1e-4)
        variance = variance + F.relu(1.0 - std).mean() / 2
        c = (z.T @ z) / (len(z) - 1)
        off_diagonal = c - torch.diag(torch.diag(c))
        covariance = covariance + off_diagonal.pow(2).sum() / z.shape[1] / 2
    return sim * invariance + var * variance + cov * covariance


def _views(
    images: torch.Tensor, indices: np.ndarray, spec: PatchSpec, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """One random-resized, randomly flipped and brightness-jittered view per image, normalised."""
    h, w = images.shape[2:]
    boxes = spec.boxes(indices, np.full(len(indices), h), np.full(len(indices), w)).reshape(-1, 4)
    owner = torch.arange(len(indices), device=images.device)
    crops = crop_and_resize(images, torch.from_numpy(boxes).float().to(images.device), owner, spec.out_size)
    flip = torch.rand(len(crops), device=images.device) < 0.5
    crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)
    crops = crops * (0.6 + 0.8 * torch.rand(len(crops), 1, 1, 1, device=images.device))
    return (crops.clamp(0, 255) / 255.0 - mean) / std


def pretrain_vicreg(
    entry: ZooEntry,
    split: ImageSplit,
    *,
    epochs: int,
    batch_size: int = 256,
    lr: float = 2e-3,
    scale: tuple[float, float] = (0.2, 1.0),
    device: torch.device,
    seed: int = 0,
) -> tuple[nn.Module, nn.Module]:
    """Train ``entry``'s backbone and projector with VICReg on two random views of each image."""
    torch.manual_seed(seed)
    backbone, dim = build_backbone(entry.arch, stem=entry.stem)
    projector = build_projector(dim, entry.projector or (256, 256), batchnorm=entry.projector_batchnorm)
    model = nn.Sequential(backbone, projector).to(device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    pre = entry.preprocessing
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
    images = torch.from_numpy(np.ascontiguousarray(split.array)).permute(0, 3, 1, 2).float().to(device)
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        start, losses = time.perf_counter(), []
        order = rng.permutation(len(images))
        for step in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[step : step + batch_size]
            v1, v2 = (
                _views(
                    images[idx],
                    idx,
                    PatchSpec(
                        mode="random", scale=scale, out_size=pre.input_size, seed=seed * 100_003 + epoch * 2 + view
                    ),
                    mean,
                    std,
                )
                for view in (0, 1)
            )
            loss = vicreg_loss(model(v1), model(v2))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        log.info("epoch %d loss %.3f (%.1fs)", epoch, float(np.mean(losses)), time.perf_counter() - start)
    return backbone.eval(), projector.eval()


def save_solo_checkpoint(path: Path, backbone: nn.Module, projector: nn.Module, meta: dict) -> None:
    """Write ``{"state_dict": {backbone.*, projector.*}, "meta": ...}`` atomically (solo-learn's layout)."""
    state = {f"backbone.{k}": v.detach().cpu() for k, v in backbone.state_dict().items()}
    state.update({f"projector.{k}": v.detach().cpu() for k, v in projector.state_dict().items()})
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state, "meta": meta}, tmp)


def pretrain_demo_model(out_dir: Path, *, epochs: int, device: str = "auto") -> Path:
    """The demo's model: ``tiny_cifar`` pretrained on scikit-learn digits; reused when already trained."""
    path = out_dir / f"tiny_vicreg_digits_{epochs}ep.ckpt"
    if path.exists():
        return path
    dev = resolve_device(device)
    entry = get_entry("tiny_cifar")
    backbone, projector = pretrain_vicreg(entry, open_split("digits", "train"), epochs=epochs, device=dev)
    save_solo_checkpoint(path, backbone, projector, {"method": "vicreg", "data": "digits", "epochs": epochs})
    return path
