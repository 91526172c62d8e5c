"""An independent eager VICReg step, for tests and for the speed benchmark's baseline.

Written from the VICReg paper (Bardes, Ponce, LeCun 2022) and the semantics of facebookresearch/vicreg's
``main_vicreg.py``: LARS with eta 0.001 and no trust clipping, the trust ratio on the decayed gradient
(``eta |w| / |g + wd w|``), biases and normalisation parameters (1-d) excluded from both the weight decay
and the adaptation; each view through the network separately; the loss in float32. It shares nothing with
``ssl_patchbench.pretrain`` but the network, so it is the yardstick the trainer's step is compared against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ReferenceLARS(torch.optim.Optimizer):
    """VICReg's LARS, one parameter at a time."""

    def __init__(self, params, *, lr: float, weight_decay: float, momentum: float = 0.9, eta: float = 0.001):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eta": eta})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0, torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one), one
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(dp)
                p.add_(state["mu"], alpha=-group["lr"])


def reference_vicreg_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """25 * MSE + 25 * std hinge + 1 * off-diagonal covariance, as the paper's pseudo-code."""
    x, y = x.float(), y.float()
    n, d = x.shape
    invariance = F.mse_loss(x, y)
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    std_x, std_y = torch.sqrt(x.var(dim=0) + 1e-4), torch.sqrt(y.var(dim=0) + 1e-4)
    variance = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    off = ~torch.eye(d, dtype=torch.bool, device=x.device)
    cov_x, cov_y = (x.T @ x) / (n - 1), (y.T @ y) / (n - 1)
    covariance = cov_x[off].pow(2).sum() / d + cov_y[off].pow(2).sum() / d
    return 25 * invariance + 25 * variance + covariance


def reference_step(
    model: torch.nn.Module, optimiser: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, lr: float,
    amp: torch.dtype | None = None,
) -> torch.Tensor:  # fmt: skip
    """One eager step on two normalised views; returns the loss (not synced)."""
    for group in optimiser.param_groups:
        group["lr"] = lr
    optimiser.zero_grad()
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        zx, zy = model(x), model(y)
    loss = reference_vicreg_loss(zx, zy)
    loss.backward()
    optimiser.step()
    return loss.detach()
