"""Batched view augmentation on the device: crops of given boxes, flip, BYOL colour augmentation.

The crop boxes come from ``sampling.geometry`` (drawn per epoch, see ``pretrain.train``). Every other random
draw comes from one ``torch.Generator`` on the images' device, all of a step's at once (``draw_views``) before
any image is touched, so the augmentation itself (``render_views``) is a pure function that ``torch.compile``
traces as one graph. Every operation acts on the whole batch at once with per-image parameters (no per-image
Python loop, no host sync), so a GPU step never waits on the CPU. The colour operations match torchvision's
functional ones image by image (tested): ColorJitter with its random order of the four operations, grayscale,
solarisation, blur.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ssl_patchbench.sampling.patches import crop_and_resize

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
BLUR_MIN_SIZE = 64  # blur only views at least this large: at CIFAR's 32 px it destroys the signal


@dataclass(frozen=True)
class ViewAugment:
    """Probabilities and strengths of one view's augmentations (BYOL's recipe by default)."""

    flip: float = 0.5
    jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.2
    blur: float = 0.0
    solarize: float = 0.0


def byol_augments(out_size: int) -> tuple[ViewAugment, ViewAugment]:
    """The two views' recipes: BYOL's asymmetric blur/solarisation at ImageNet sizes; at small sizes no blur
    and solarisation 0.1 on both views (solo-learn's CIFAR recipe, and the shared checkpoint's)."""
    if out_size < BLUR_MIN_SIZE:
        return ViewAugment(solarize=0.1), ViewAugment(solarize=0.1)
    return ViewAugment(blur=1.0, solarize=0.0), ViewAugment(blur=0.1, solarize=0.2)


def _uniform(shape: tuple[int, ...], gen: torch.Generator, device: torch.device, lo=0.0, hi=1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen, device=device)


class ViewDraws(NamedTuple):
    """Every random number of one recipe's augmentation of ``N`` images, drawn before any image is touched, so
    that the augmentation itself (``apply_augment``) is a pure function the compiler can fuse whole."""

    flip: torch.Tensor  # [N] bool
    jitter: torch.Tensor  # [N] bool: colour jitter applied
    factors: torch.Tensor  # [3, N] brightness, contrast, saturation factors (1 where no jitter)
    shift: torch.Tensor  # [N] hue shift (0 where no jitter)
    order: torch.Tensor  # [N, 4] each image's order of the four jitter operations (a permutation of 0..3)
    gray: torch.Tensor  # [N] bool
    sigma: torch.Tensor  # [N] blur sigma, 0 = no blur
    solarize: torch.Tensor  # [N] bool


def draw_augment(n: int, aug: ViewAugment, gen: torch.Generator, device: torch.device) -> ViewDraws:
    """The draws of ``apply_augment`` for ``n`` images, in the order it applies them (flip, jitter: on/off, three
    factors, hue shift, order; grayscale; blur: on/off, sigma; solarisation)."""
    flip = torch.rand(n, generator=gen, device=device) < aug.flip
    on = torch.rand(n, generator=gen, device=device) < aug.jitter
    factors = torch.stack(
        [_uniform((n,), gen, device, max(0.0, 1 - s), 1 + s) for s in (aug.brightness, aug.contrast, aug.saturation)]
    )
    factors = torch.where(on, factors, torch.ones_like(factors))
    shift = torch.where(on, _uniform((n,), gen, device, -aug.hue, aug.hue), torch.zeros(n, device=device))
    order = torch.argsort(torch.rand((n, 4), generator=gen, device=device), dim=1)  # a random permutation per image
    gray = torch.rand(n, generator=gen, device=device) < aug.grayscale
    sigma = torch.zeros(n, device=device)
    if aug.blur > 0:
        blur = torch.rand(n, generator=gen, device=device) < aug.blur
        sigma = torch.where(blur, _uniform((n,), gen, device, 0.1, 2.0), sigma)
    solarize = torch.rand(n, generator=gen, device=device) < aug.solarize
    return ViewDraws(flip, on, factors, shift, order, gray, sigma, solarize)


def gray(x: torch.Tensor) -> torch.Tensor:
    """Luma ``[N, 1, H, W]`` with torchvision's weights."""
    r, g, b = x.unbind(dim=1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``: ``clamp(f x + (1 - f) other, 0, 1)`` with a per-image factor ``[N]``."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` on float images with a per-image hue shift ``[N]`` in [-0.5, 0.5]."""
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(h, s, maxc)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HSV ``[N, H, W]`` channels to RGB by the closed form ``v - v s clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6h) mod 6``, n = 5, 3, 1: torchvision's sector table without its ``[N, 6, H, W]`` masks."""
    n = torch.arange(5, 0, -2, device=h.device, dtype=h.dtype).view(1, 3, 1, 1)  # 5, 3, 1 without a host copy
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return v.unsqueeze(1) * (1.0 - s.unsqueeze(1) * ramp)


def color_jitter(x: torch.Tensor, d: ViewDraws) -> torch.Tensor:
    """ColorJitter(brightness, contrast, saturation, hue) where ``d.jitter``, with the factors of ``d``.

    As torchvision: factors uniform in ``[max(0, 1-s), 1+s]`` (hue in ``[-h, h]``), the four operations in
    a random order per image. Slot by slot each image applies the operation its order names there; the
    three blends share one formula (blend towards 0, the mean luma or the luma), hue is a separate op.
    """
    for slot in range(4):
        op = d.order[:, slot]
        x = _blend_slot(x, op, d.factors)
        hue = (op == 3) & d.jitter
        x = torch.where(hue.view(-1, 1, 1, 1), adjust_hue(x, d.shift), x)
    return x


def _blend_slot(x: torch.Tensor, op: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness (op 0), contrast (1) or saturation (2) per image; op 3 (hue) leaves ``x`` as it is."""
    luma = gray(x)
    mean_luma = luma.mean(dim=(1, 2, 3), keepdim=True)
    other = torch.where((op == 1).view(-1, 1, 1, 1), mean_luma, torch.where((op == 2).view(-1, 1, 1, 1), luma, 0.0))
    factor = torch.where(op < 3, factors.gather(0, op.clamp(max=2)[None])[0], torch.ones_like(factors[0]))
    return _blend(x, other, factor)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` (reflect padding) with a per-image sigma ``[N]``; sigma 0 = identity."""
    n, c, h, w = x.shape
    half = (kernel_size - 1) / 2
    grid = torch.linspace(-half, half, kernel_size, device=x.device)
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    kernel = torch.exp(-0.5 * (grid[None] / safe[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    delta = (grid == 0).to(kernel.dtype).expand_as(kernel)
    kernel = torch.where((sigma > 0)[:, None], kernel, delta).repeat_interleave(c, dim=0)  # [N*C, k]
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, h, w)


def apply_augment(x: torch.Tensor, d: ViewDraws, *, blur: bool) -> torch.Tensor:
    """BYOL's order on ``[N, 3, S, S]`` floats in [0, 1]: flip, colour jitter, grayscale, blur (only if
    ``blur``: the recipe blurs at all), solarise; every random number comes from ``d``."""
    x = torch.where(d.flip.view(-1, 1, 1, 1), x.flip(-1), x)
    x = color_jitter(x, d)
    x = torch.where(d.gray.view(-1, 1, 1, 1), gray(x).expand_as(x), x)
    if blur:
        x = gaussian_blur(x, d.sigma, kernel_size=max(3, int(0.1 * x.shape[-1]) // 2 * 2 + 1))
    return torch.where(d.solarize.view(-1, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)


def draw_views(
    b: int, n_views: int, augments: Sequence[ViewAugment], gen: torch.Generator, device: torch.device
) -> tuple[tuple[ViewDraws, ...], tuple[bool, ...]]:
    """The draws of ``render_views`` for ``n_views`` views of ``b`` images (view k with recipe
    ``augments[k % len(augments)]``) and whether each recipe blurs: one ``ViewDraws`` over all ``K * B`` views
    when every view has the same recipe (CIFAR), else one per view."""
    recipes = augments[:1] if len(set(augments)) == 1 else [augments[k % len(augments)] for k in range(n_views)]
    rows = b * n_views // len(recipes)
    return tuple(draw_augment(rows, a, gen, device) for a in recipes), tuple(a.blur > 0 for a in recipes)


def render_views(
    images: torch.Tensor,
    boxes: torch.Tensor,
    draws: tuple[ViewDraws, ...],
    *,
    blurs: tuple[bool, ...],
    out_size: int,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """``[K, B, 3, S, S]`` views in [0, 1] of uint8 images ``[B, 3, H, W]`` cut at ``boxes`` ``[K * B, 4]``
    (view k of image b at row ``k * B + b``) and augmented with ``draws`` (``draw_views``; ``blurs``: whether
    each of its recipes blurs). A pure function of its inputs, so ``torch.compile`` fuses it whole.

    The crops are resampled as ``RandomResizedCrop`` does to a PIL image (``crop_and_resize``'s Pillow path;
    bicubic, as solo-learn's and VICReg's recipes), all views in one call."""
    b = len(images)
    n_views = len(boxes) // b
    owner = torch.arange(b, device=images.device).repeat(n_views)
    crops = crop_and_resize(images.float(), boxes, owner, out_size, interpolation=interpolation, antialias="pillow")
    crops = crops.div_(255.0).view(n_views, b, 3, out_size, out_size)
    if len(draws) == 1:  # one recipe for every view: one batched pass, half the kernel launches
        return apply_augment(crops.flatten(0, 1), draws[0], blur=blurs[0]).view_as(crops)
    pairs = zip(crops, draws, blurs, strict=True)
    return torch.stack([apply_augment(view, d, blur=blur) for view, d, blur in pairs])


def make_views(
    images: torch.Tensor,
    boxes: torch.Tensor,
    *,
    n_views: int,
    out_size: int,
    augments: Sequence[ViewAugment],
    gen: torch.Generator,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """``render_views`` with fresh draws from ``gen`` (view k uses ``augments[k % len(augments)]``)."""
    draws, blurs = draw_views(len(images), n_views, augments, gen, images.device)
    return render_views(images, boxes, draws, blurs=blurs, out_size=out_size, interpolation=interpolation)
