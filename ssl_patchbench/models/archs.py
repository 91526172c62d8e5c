"""Backbones and projectors with the exact module names published SSL checkpoints use.

Bottom floor: knows torch, torchvision and timm, nothing about checkpoints or the zoo. Every backbone
maps a normalised float batch (B, 3, S, S) to its (B, D) embedding, so callers never special-case an arch.
torchvision and timm are imported by the functions that build from them: importing torchvision pulls in
torch._dynamo (seconds), which a rerun on stored features never needs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from ssl_patchbench.core.errors import UserError, did_you_mean
from ssl_patchbench.models.registry import TIMM_PREFIX, TINY_ARCH, ZooEntry, check_arch
from ssl_patchbench.models.vit import VitReadout, build_vit


def build_backbone(arch: str, *, stem: str = "imagenet", pretrained: bool = False) -> tuple[nn.Module, int]:
    """Backbone (random init) and its embedding size; `pretrained` (timm archs only) loads timm's weights."""
    check_arch(arch, stem)
    if pretrained and not arch.startswith(TIMM_PREFIX):
        raise UserError(f"pretrained weights come from timm only: '{arch}' needs a checkpoint")
    if arch.startswith(TIMM_PREFIX):
        return _timm_backbone(arch.removeprefix(TIMM_PREFIX), pretrained=pretrained)
    if arch == TINY_ARCH:
        model = TinyResNet()
        return model, model.embed_dim
    return _torchvision_resnet(arch, stem)


def build_entry_backbone(entry: ZooEntry) -> tuple[nn.Module, int]:
    """A zoo entry's backbone (random init) and its embedding size: a ViT entry's timm model behind its readout,
    any other entry's :func:`build_backbone`."""
    if entry.vit is None:
        return build_backbone(entry.arch, stem=entry.stem)
    readout = VitReadout(build_vit(entry), entry.vit, name=entry.name)
    return readout, readout.dim


def _timm_backbone(name: str, *, pretrained: bool) -> tuple[nn.Module, int]:
    """timm model with its classifier removed, so forward returns the pooled features."""
    import timm  # imported when used: about a second of every run that builds no timm model

    if not timm.is_model(name):
        raise UserError(f"unknown timm model '{name}'{did_you_mean(name, timm.list_models())}: use a timm model name")
    if not pretrained:
        model = timm.create_model(name, num_classes=0)
        return model, model.num_features
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as err:  # offline, hub error, missing file: all fixed the same way
        raise UserError(
            f"could not get timm's pretrained weights for '{name}' ({err}): "
            "run once with network access or pass --checkpoint PATH"
        ) from err
    return model, model.num_features


def _torchvision_resnet(arch: str, stem: str) -> tuple[nn.Module, int]:
    """torchvision ResNet with `fc` removed, so state-dict names are torchvision's minus `fc.*`."""
    from torchvision import models

    model = getattr(models, arch)(weights=None)
    dim = model.fc.in_features
    model.fc = nn.Identity()
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
        model.maxpool = nn.Identity()
    elif stem == "tf_same":
        _use_tf_same_padding(model)
    return model, dim


def _use_tf_same_padding(model: nn.Module) -> None:
    """Swap strided convs and the max-pool for TF 'SAME' versions (converted JAX/TF weights need them)."""
    from timm.layers import Conv2dSame
    from timm.layers.pool2d_same import MaxPool2dSame

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv2d) and max(module.stride) > 1:
            same = Conv2dSame(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                stride=module.stride,
                dilation=module.dilation,
                groups=module.groups,
                bias=module.bias is not None,
            )
            model.set_submodule(name, same)
        elif isinstance(module, nn.MaxPool2d):
            model.set_submodule(name, MaxPool2dSame(module.kernel_size, module.stride))


class TinyResNet(nn.Module):
    """Tiny ResNet-like mock backbone (64-d, ~8 M multiply-adds at 32 px) for tests and the offline demo."""

    embed_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _downsampling_block(16, 32)
        self.layer2 = _downsampling_block(32, self.embed_dim)
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return torch.flatten(self.avgpool(x), 1)


def _downsampling_block(inplanes: int, planes: int) -> nn.Module:
    """A stride-2 residual block with a 1x1 projection shortcut, as in a ResNet stage entry (torchvision's)."""
    from torchvision.models.resnet import BasicBlock

    shortcut = nn.Sequential(nn.Conv2d(inplanes, planes, kernel_size=1, stride=2, bias=False), nn.BatchNorm2d(planes))
    return BasicBlock(inplanes, planes, stride=2, downsample=shortcut)


def build_projector(
    in_dim: int, layers: Sequence[int], *, batchnorm: bool = True, last_batchnorm: bool = False
) -> nn.Sequential:
    """solo-learn's MLP projector: [Linear (BN) ReLU]* Linear (BN), with its exact module indices."""
    if not layers:
        raise ValueError("a projector needs at least one layer")
    dims = [in_dim, *layers]
    modules: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        last = i == len(layers) - 1
        modules.append(nn.Linear(d_in, d_out))
        if (batchnorm and not last) or (last and last_batchnorm):
            modules.append(nn.BatchNorm1d(d_out))
        if not last:
            modules.append(nn.ReLU(inplace=True))
    return nn.Sequential(*modules)
