"""Backbones and projectors: shapes, state-dict names and TF 'SAME' padding checked against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.models.archs import build_backbone, build_projector


@pytest.mark.parametrize(("arch", "dim"), [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_torchvision_resnet_keeps_torchvision_names_without_fc(arch: str, dim: int) -> None:
    with torch.device("meta"):  # names and shapes only: skip the weight initialisation
        model, embed_dim = build_backbone(arch)
        reference = getattr(torchvision.models, arch)(weights=None).state_dict()
    assert embed_dim == dim
    assert list(model.state_dict()) == [k for k in reference if not k.startswith("fc.")]
    assert model(torch.empty(1, 3, 64, 64, device="meta")).shape == (1, dim)


def test_cifar_stem_gives_5x5_layer4_map_at_32px() -> None:
    model, _ = build_backbone("resnet18", stem="cifar")
    maps = {}
    model.layer4.register_forward_hook(lambda _m, _i, out: maps.setdefault("layer4", out))
    model.eval()(torch.randn(2, 3, 32, 32))
    assert maps["layer4"].shape == (2, 512, 5, 5)
    assert model.conv1.weight.shape == (64, 3, 3, 3)
    assert isinstance(model.maxpool, nn.Identity)


def test_tf_same_conv1_pads_2_before_and_3_after_at_224() -> None:
    model, _ = build_backbone("resnet18", stem="tf_same")
    x = torch.randn(1, 3, 224, 224)
    # out = ceil(224 / 2) = 112 needs (112 - 1) * 2 + 7 = 229 rows: 5 padding rows, TF puts the extra one after
    expected = F.conv2d(F.pad(x, (2, 3, 2, 3)), model.conv1.weight, stride=2)
    torch.testing.assert_close(model.conv1(x), expected)
    assert expected.shape == (1, 64, 112, 112)


def test_tf_same_maxpool_pads_only_after_with_minus_infinity() -> None:
    model, _ = build_backbone("resnet18", stem="tf_same")
    x = -torch.rand(1, 2, 112, 112) - 1  # all negative: zero padding would leak into the border maxima
    expected = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 3, stride=2)
    torch.testing.assert_close(model.maxpool(x), expected)
    assert expected.shape == (1, 2, 56, 56)


def test_tf_same_keeps_torchvision_names_and_strided_downsample() -> None:
    with torch.device("meta"):
        names = list(build_backbone("resnet50", stem="tf_same")[0].state_dict())
        reference = torchvision.models.resnet50(weights=None).state_dict()
    assert names == [k for k in reference if not k.startswith("fc.")]
    model, _ = build_backbone("resnet18", stem="tf_same")
    x = torch.randn(1, 128, 28, 28)  # 1x1 stride-2 shortcut on an even size needs no padding
    conv = model.layer3[0].downsample[0]
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, stride=2))


def test_tiny_cnn_is_a_64d_resnet_like_mock() -> None:
    model, dim = build_backbone("tiny_cnn")
    assert dim == 64
    assert model.eval()(torch.randn(3, 3, 32, 32)).shape == (3, 64)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_timm_arch_returns_pooled_features() -> None:
    model, dim = build_backbone("timm:resnet18")
    assert dim == 512
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 512)


@pytest.mark.parametrize(
    ("arch", "stem", "message"),
    [
        ("resnet5", "imagenet", "did you mean: resnet50"),
        ("timm:resnet5O", "imagenet", "unknown timm model"),
        ("resnet18", "cifr", "did you mean: cifar"),
        ("tiny_cnn", "cifar", "torchvision ResNets only"),
    ],
)
def test_unknown_arch_or_stem_is_a_user_error(arch: str, stem: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_backbone(arch, stem=stem)


def test_pretrained_is_for_timm_archs_only() -> None:
    with pytest.raises(UserError, match="timm only"):
        build_backbone("resnet18", pretrained=True)


def test_vicreg_projector_has_solo_learn_indices() -> None:
    projector = build_projector(512, [2048, 2048, 2048])
    names = sorted({k.split(".")[0] for k in projector.state_dict()}, key=int)
    assert names == ["0", "1", "3", "4", "6"]
    assert [type(m) for m in projector] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert projector.eval()(torch.randn(2, 512)).shape == (2, 2048)


def test_projector_without_batchnorm_and_with_last_batchnorm() -> None:
    plain = build_projector(128, [64, 32], batchnorm=False)
    assert [type(m) for m in plain] == [nn.Linear, nn.ReLU, nn.Linear]
    assert sorted({k.split(".")[0] for k in plain.state_dict()}) == ["0", "2"]
    normed = build_projector(128, [64, 32], last_batchnorm=True)
    assert [type(m) for m in normed] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
