"""LARS (layer-wise adaptive rate scaling) and the warm-up + cosine learning-rate schedule.

For each weight tensor ``g <- (g + wd * w) * eta * |w| / (|g| + wd * |w| + eps)``, then SGD with momentum
(solo-learn's / NVIDIA LARC's form, and ``timm.optim.Lars``'s). Biases and normalisation parameters (1-d
tensors) skip both the weight decay and the adaptation, as in VICReg's reference (``exclude_bias_and_norm``).
The update runs as ``torch._foreach_*`` kernels with the trust ratios kept on the device, so a step never
waits on the host (no ``.item()``, no Python branch on a tensor value). (``timm.optim.Lars`` computes the
same numbers -- tested by hand -- but the timm on the GPU machine, like every timm before its ``foreach``
version, loops over the parameters one by one.)

Trust clipping (LARC's ``min(ratio / lr, 1)``, solo-learn's ``clip_lr``) is off by default: with it the
weight step is ``min(lr |g|, eta |w|)``, so once ``lr |g|`` exceeds ``eta |w|`` -- within a few steps of a
short warm-up -- every weight moves by the full ``eta |w|`` whatever the warm-up says, and a ResNet-18
diverged within the first epoch of a 1-epoch warm-up (issue 18). Unclipped, every weight step is
``lr * eta * |w|``: the schedule scales it from the first step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


def lars_param_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights (LARS + weight decay) and biases/norm parameters (plain momentum SGD)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "lars": True},
        {"params": [p for p in params if p.ndim <= 1], "lars": False},
    ]


def build_lars(
    model: nn.Module,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    eta: float,
    trust_clip: bool = False,
    compiled: bool = False,
) -> LARS:
    """The trainer's optimiser over ``lars_param_groups``."""
    groups = lars_param_groups(model)
    return LARS(
        groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip_lr=trust_clip, compiled=compiled
    )


class LARS(torch.optim.Optimizer):
    """SGD with momentum and LARS trust ratios on the groups marked ``lars=True``.

    ``compiled`` runs each group's update (norms, ratios, momentum, weights) under ``torch.compile``: a few
    fused kernels in place of about fifteen ``foreach`` launches and their temporaries. The learning rate enters
    as a tensor on the device, so the schedule changing it every step does not recompile the update."""

    def __init__(
        self,
        params: Iterable,
        *,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        eta: float = 0.02,
        eps: float = 1e-8,
        clip_lr: bool = False,
        compiled: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "eps": eps,
            "clip_lr": clip_lr,
            "lars": True,
        }
        super().__init__(params, defaults)
        self._update = torch.compile(lars_update_, dynamic=False) if compiled else lars_update_
        self._lr_tensors: dict[int, torch.Tensor] = {}  # not in the state dict: ``group["lr"]`` is

    @torch.no_grad()
    def step(self, closure=None):
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr = self._lr_tensor(index, params[0].device)
            lr.fill_(group["lr"])
            self._update(
                params,
                [p.grad for p in params],
                [self._buffer(p) for p in params],
                lr,
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                eta=group["eta"],
                eps=group["eps"],
                clip_lr=group["clip_lr"],
                lars=group["lars"],
            )

    def _lr_tensor(self, index: int, device: torch.device) -> torch.Tensor:
        """The device tensor that carries group ``index``'s learning rate into the update."""
        if index not in self._lr_tensors:
            self._lr_tensors[index] = torch.zeros((), device=device)
        return self._lr_tensors[index]

    def _buffer(self, p: torch.Tensor) -> torch.Tensor:
        """The momentum buffer of ``p`` (zeros at first, so step 1 moves by exactly the update)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]


def lars_update_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    buffers: list[torch.Tensor],
    lr: torch.Tensor,
    *,
    momentum: float,
    weight_decay: float,
    eta: float,
    eps: float,
    clip_lr: bool,
    lars: bool,
) -> None:
    """One step in place: ``buffers <- momentum * buffers + u``, ``params <- params - lr * buffers``, where
    ``u`` is the LARS update (``lars``) or the gradient itself."""
    updates = _lars_updates(params, grads, lr, weight_decay, eta, eps, clip_lr) if lars else grads
    torch._foreach_mul_(buffers, momentum)
    torch._foreach_add_(buffers, updates)
    torch._foreach_sub_(params, torch._foreach_mul(buffers, lr))


def _lars_updates(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    lr: torch.Tensor,
    wd: float,
    eta: float,
    eps: float,
    clip_lr: bool,
) -> list[torch.Tensor]:
    """``(g + wd w) * ratio`` where both norms are positive, else ``g`` unchanged (as LARC does)."""
    p_norm = torch.stack(torch._foreach_norm(params))
    g_norm = torch.stack(torch._foreach_norm(grads))
    ratio = eta * p_norm / (g_norm + wd * p_norm + eps)
    if clip_lr:
        ratio = torch.clamp(ratio / lr.clamp_min(1e-12), max=1.0)
    ok = (p_norm > 0) & (g_norm > 0)
    scale = torch.where(ok, ratio, torch.ones_like(ratio))
    decay = torch.where(ok, ratio * wd, torch.zeros_like(ratio))
    updates = torch._foreach_mul(grads, list(scale.unbind()))
    torch._foreach_add_(updates, torch._foreach_mul(params, list(decay.unbind())))
    return updates


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up from ``base_lr / warmup_steps`` to ``base_lr``, then cosine decay to ``final_lr``.

    A pure function of the global step, so resuming needs only the step count.
    """

    base_lr: float
    warmup_steps: int
    total_steps: int
    final_lr: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.final_lr + 0.5 * (self.base_lr - self.final_lr) * (1.0 + math.cos(math.pi * progress))
