"""Patch specs, their boxes, and one batched crop-and-resize for a whole batch of images.

Boxes are drawn on the CPU in float64 from a counter-based hash of (seed, image index, patch index),
so they are a pure function of those: the same on CPU and GPU, for any batch size or worker count.
Patch ``j`` of an image does not depend on how many patches are asked for, so the first 16 of 256
random patches are the 16-patch representation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.sampling.geometry import random_resized_boxes

Mode = Literal["central", "random", "grid", "sliding"]
MODES: tuple[str, ...] = ("central", "random", "grid", "sliding")


@dataclass(frozen=True)
class PatchSpec:
    """How one image becomes ``n`` patches of ``out_size`` pixels.

    - central: the standard evaluation view (the whole image when ``resize`` is None, else the region that
      ``Resize(resize)`` + ``CenterCrop(out_size)`` keeps).
    - random: ``n`` RandomResizedCrop boxes with ``scale`` (area fraction) and ``ratio``, or, when ``size``
      is set, ``n`` squares of ``size`` px at uniform random positions.
    - grid: a ``grid`` x ``grid`` tiling of the central view.
    - sliding: every ``size`` px window at ``stride`` px of the central view, its pixels measured at
      ``out_size`` resolution (16 px at stride 4 on a 32 px view gives 5 x 5 = 25 windows).
    """

    mode: Mode
    n: int = 1
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    size: int | None = None
    stride: int | None = None
    grid: int | None = None
    out_size: int = 32
    resize: int | None = None
    interpolation: str = "bilinear"
    seed: int = 0

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def num_patches(self) -> int:
        if self.mode == "central":
            return 1
        if self.mode == "grid":
            return self.grid_side**2
        if self.mode == "sliding":
            return self.grid_side**2
        return self.n

    @property
    def grid_side(self) -> int:
        """Patches per row of the layout (grid and sliding); gridpool needs it."""
        if self.mode == "grid":
            return int(self.grid)  # type: ignore[arg-type]
        if self.mode == "sliding":
            return (self.out_size - int(self.size)) // int(self.stride) + 1  # type: ignore[arg-type]
        raise UserError(f"mode {self.mode!r} has no patch grid: use --mode grid or --mode sliding")

    @property
    def antialias(self) -> str:
        """The central view is resampled as the authors' ``Resize`` + ``CenterCrop`` on a PIL image (Pillow's
        filter); patches use ``roi_align``'s cheaper box filter when bilinear (see ``crop_and_resize``)."""
        return "pillow" if self.mode == "central" or self.interpolation != "bilinear" else "box"

    @property
    def label(self) -> str:
        """Short name of the representation, as tables show it."""
        return "central" if self.mode == "central" else str(self.num_patches)

    def to_dict(self) -> dict:
        return asdict(self)

    def boxes(self, indices: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
        """Boxes ``[B, n, 4]`` (x1, y1, x2, y2 in pixels of each original image), float64."""
        indices = np.asarray(indices, dtype=np.uint64)
        h = np.asarray(heights, dtype=np.float64)[:, None]
        w = np.asarray(widths, dtype=np.float64)[:, None]
        if self.mode == "random":
            return self._random_boxes(indices, h, w)
        view = central_boxes(h[:, 0], w[:, 0], self.resize, self.out_size)[:, None, :]
        if self.mode == "central":
            return view
        return _place_in_view(view, self._layout_boxes())

    def _layout_boxes(self) -> np.ndarray:
        """Grid or sliding boxes ``[n, 4]`` as fractions of the central view, row-major."""
        if self.mode == "grid":
            starts = np.arange(self.grid_side) / self.grid_side
            side = 1.0 / self.grid_side
        else:
            starts = np.arange(self.grid_side) * float(self.stride) / self.out_size
            side = float(self.size) / self.out_size
        ys, xs = np.meshgrid(starts, starts, indexing="ij")
        x1, y1 = xs.ravel(), ys.ravel()
        return np.stack([x1, y1, x1 + side, y1 + side], axis=1)

    def _random_boxes(self, indices: np.ndarray, h: np.ndarray, w: np.ndarray) -> np.ndarray:
        """RandomResizedCrop boxes on the hash uniforms of (seed, image, patch): slots 4a..4a+3 for try a."""
        image = np.repeat(indices, self.n)
        patch = np.tile(np.arange(self.n, dtype=np.uint64), len(indices))
        hh, ww = np.repeat(h[:, 0], self.n), np.repeat(w[:, 0], self.n)
        if self.size is not None:
            u = uniforms(self.seed, image[:, None], patch[:, None], np.arange(2, 4, dtype=np.uint64))
            return _fixed_size_boxes(u[:, 0], u[:, 1], hh, ww, self.size).reshape(len(indices), self.n, 4)

        def tries(attempt: int, rows: np.ndarray) -> np.ndarray:
            slots = np.arange(attempt * 4, attempt * 4 + 4, dtype=np.uint64)
            return uniforms(self.seed, image[rows, None], patch[rows, None], slots)

        boxes = random_resized_boxes(tries, hh, ww, scale=self.scale, ratio=self.ratio)
        return boxes.reshape(len(indices), self.n, 4)


def _fixed_size_boxes(uy: np.ndarray, ux: np.ndarray, h: np.ndarray, w: np.ndarray, size: int) -> np.ndarray:
    """Squares of ``size`` px at uniformly random integer positions."""
    if size > np.min(h) or size > np.min(w):
        raise UserError(f"patch size {size} px is larger than an image of {int(np.min(h))}x{int(np.min(w))} px")
    top = np.floor(uy * (h - size + 1))
    left = np.floor(ux * (w - size + 1))
    return np.stack([left, top, left + size, top + size], axis=-1)


def _place_in_view(view: np.ndarray, layout: np.ndarray) -> np.ndarray:
    """Map fractional layout boxes ``[n, 4]`` into each image's view box ``[B, 1, 4]``."""
    x0, y0 = view[..., 0:1], view[..., 1:2]
    vw, vh = view[..., 2:3] - x0, view[..., 3:4] - y0
    lx1, ly1, lx2, ly2 = (layout[None, :, i : i + 1] for i in range(4))
    return np.concatenate([x0 + lx1 * vw, y0 + ly1 * vh, x0 + lx2 * vw, y0 + ly2 * vh], axis=-1)


def central_boxes(heights: np.ndarray, widths: np.ndarray, resize: int | None, out_size: int) -> np.ndarray:
    """The central view of each image as a box ``[B, 4]`` in original pixels.

    ``resize=None`` (CIFAR/STL-size entries) gives the whole image. Otherwise, whatever the image size, the
    region that ``Resize(resize)`` (shorter side) followed by ``CenterCrop(out_size)`` keeps, with torchvision's
    rounding: an image smaller than ``resize`` is upsampled, as the authors' evaluation transforms do.
    """
    h = np.asarray(heights, dtype=np.float64)
    w = np.asarray(widths, dtype=np.float64)
    if resize is None:
        return np.stack([np.zeros_like(w), np.zeros_like(h), w, h], axis=1)
    rh = np.where(h <= w, resize, np.floor(resize * h / w))
    rw = np.where(w <= h, resize, np.floor(resize * w / h))
    top = np.round((rh - out_size) / 2.0) * h / rh
    left = np.round((rw - out_size) / 2.0) * w / rw
    crop_h, crop_w = out_size * h / rh, out_size * w / rw
    return np.stack([left, top, left + crop_w, top + crop_h], axis=1)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash (SplitMix64 finaliser); integer-exact on every platform."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniforms(seed: int, indices: np.ndarray, patches: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) floats, one per broadcast (image index, patch index, slot) triple, and a pure
    function of those and ``seed`` (counter-based: any subset can be drawn in any order)."""
    base = _splitmix64(np.array([seed], dtype=np.uint64))
    image = _splitmix64(base ^ np.asarray(indices, dtype=np.uint64))
    counter = np.asarray(patches, dtype=np.uint64) * np.uint64(1 << 16) + np.asarray(slots, dtype=np.uint64)
    bits = _splitmix64(image ^ _splitmix64(counter))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def crop_and_resize(
    images: torch.Tensor,
    boxes: torch.Tensor,
    image_index: torch.Tensor,
    out_size: int,
    interpolation: str = "bilinear",
    antialias: str = "box",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Cut and resize every box of a batch in one pass.

    ``images``: uint8 or float ``[B, 3, H, W]`` in [0, 255] (uint8 is resampled in float, converted piece by
    piece where that saves memory); ``boxes``: ``[M, 4]`` (x1, y1, x2, y2) in pixels;
    ``image_index``: ``[M]`` which image each box belongs to. Returns ``[M, 3, out_size, out_size]``.

    - ``antialias="box"`` (bilinear only): ``roi_align``'s numbers. Sample points are pixel centres
      (``aligned=True``), as ``F.interpolate(align_corners=False)``; a box larger than the output is averaged
      over ``ceil(box / out)`` samples per pixel, a box filter against aliasing. The fastest path, for many
      patches.
    - ``antialias="pillow"`` (bilinear or bicubic): Pillow's resampling, what ``torchvision.transforms.Resize``
      does to a PIL image: a triangle or Keys cubic (a = -0.5) kernel widened by the downscaling factor, one
      separable pass per axis (horizontal first, clipped to [0, 255] after each). Taps beyond an image's edge
      read the edge pixel, so an image padded by edge replication gives the same crops.

    ``dtype``: what Pillow's two passes compute in (None: the images' float dtype, or float32). float16 runs
    them on tensor cores, twice as fast as float32 on an H200 (``benchmarks/crops.py``); its crops differ from
    float32's by float16's rounding (2^-11 relative), below the bf16 rounding of the model's input. The box
    filter always runs as ``roi_align`` in float32 (3 us a 224 px box there: faster than the same filter as
    two float16 matrix products).
    """
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"unknown interpolation {interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")
    if antialias not in ("box", "pillow"):
        raise ValueError(f"antialias must be 'box' or 'pillow', got {antialias!r}")
    if antialias == "box" and interpolation == "bilinear":
        from torchvision.ops import roi_align  # imported when cropping: torchvision pulls in torch._dynamo

        rois = torch.cat([image_index.to(boxes.dtype)[:, None], boxes], dim=1)
        return roi_align(
            _floating(images), rois, output_size=out_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True
        )
    return _pillow_crops(images, boxes.float(), image_index, out_size, _KERNELS[interpolation], dtype)


def _floating(images: torch.Tensor) -> torch.Tensor:
    return images if images.is_floating_point() else images.float()


def _triangle(x: torch.Tensor) -> torch.Tensor:
    """Pillow's bilinear kernel."""
    return (1 - x.abs()).clamp_(min=0)


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Pillow's bicubic kernel: Keys' cubic convolution with a = -0.5 (torchvision's antialiased bicubic too)."""
    a, x = -0.5, x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic")
_KERNELS = {"bilinear": (_triangle, 1.0), "bicubic": (_cubic, 2.0)}  # kernel and its support (px)
_CHUNK_BYTES = 256 << 20  # bound on what one chunk of Pillow-resampled boxes holds


def _pillow_crops(
    images: torch.Tensor,
    boxes: torch.Tensor,
    owner: torch.Tensor,
    out_size: int,
    kernel: tuple,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """Pillow-resampled crops in chunks of boxes, each chunk holding its boxes' images and resampling matrices
    (computed in ``dtype``: None is the images' float dtype, or float32)."""
    _, channels, height, width = images.shape
    if dtype is None:
        dtype = images.dtype if images.is_floating_point() else torch.float32
    per_box = (channels * height * (width + out_size) + out_size * (height + width)) * dtype.itemsize
    step = max(1, _CHUNK_BYTES // per_box)
    out = [torch.empty(0, channels, out_size, out_size, dtype=dtype, device=images.device)]
    for start in range(0, len(boxes), step):
        box = boxes[start : start + step]
        rows = _resampling_matrix(box[:, 1], box[:, 3], height, out_size, *kernel).to(dtype)  # [c, out, H]
        cols = _resampling_matrix(box[:, 0], box[:, 2], width, out_size, *kernel).to(dtype)  # [c, out, W]
        # the chunk's images, converted here only (and out of a channels-last batch's layout)
        chunk = images[owner[start : start + step]].to(dtype, memory_format=torch.contiguous_format)
        wide = (chunk @ cols[:, None].transpose(-1, -2)).clamp_(0, 255)
        out.append((rows[:, None] @ wide).clamp_(0, 255))  # [c, 3, out, out]
    return torch.cat(out)


def _resampling_matrix(
    lo: torch.Tensor, hi: torch.Tensor, size: int, out_size: int, kernel, support: float
) -> torch.Tensor:
    """Dense matrices ``[M, out_size, size]``: row ``o`` holds the normalised weights of output pixel ``o`` of
    each box ``[lo, hi)`` on an axis of ``size`` pixels (Pillow's coefficients; taps past an edge clamped)."""
    scale = (hi - lo) / out_size
    stretch = scale.clamp(min=1.0)[:, None, None]  # antialias: the kernel widens when downscaling
    centre = lo[:, None] + (torch.arange(out_size, device=lo.device) + 0.5) * scale[:, None]  # [M, out]
    taps = math.ceil(2 * support * max(1.0, size / out_size)) + 2  # the widest support a box on this axis has
    first = torch.floor(centre - support * stretch[..., 0] + 0.5)
    index = first[..., None] + torch.arange(taps, device=lo.device)  # [M, out, taps]
    weight = kernel((index + 0.5 - centre[..., None]) / stretch)
    weight = weight / weight.sum(-1, keepdim=True)
    dense = torch.zeros(len(lo), out_size, size, device=lo.device)
    return dense.scatter_add_(2, index.clamp(0, size - 1).long(), weight)


def _validate(spec: PatchSpec) -> None:
    if spec.mode not in MODES:
        raise UserError(f"unknown patch mode {spec.mode!r}: choose one of {', '.join(MODES)}")
    if spec.out_size <= 0:
        raise UserError(f"patch output size must be positive, got {spec.out_size}")
    if spec.interpolation not in INTERPOLATIONS:
        raise UserError(f"unknown interpolation {spec.interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")
    if not isinstance(spec.seed, int | np.integer) or not 0 <= spec.seed < 2**64:
        raise UserError(f"--seed must be an integer from 0 to 2**64 - 1 (it seeds a 64-bit hash), got {spec.seed!r}")
    if spec.mode == "random":
        _validate_random(spec)
    elif spec.mode == "grid" and (spec.grid is None or spec.grid <= 0):
        raise UserError(f"grid mode needs a positive grid side (n = g*g patches), got {spec.grid}")
    elif spec.mode == "sliding":
        _validate_sliding(spec)


def _validate_random(spec: PatchSpec) -> None:
    if spec.n <= 0:
        raise UserError(f"the number of patches must be positive, got {spec.n}")
    lo, hi = spec.scale
    if not (0 < lo <= hi <= 1):
        raise UserError(f"patch scale must satisfy 0 < min <= max <= 1 (fraction of image area), got {spec.scale}")
    if not (0 < spec.ratio[0] <= spec.ratio[1] < math.inf):
        raise UserError(f"aspect ratio range must satisfy 0 < min <= max < inf, got {spec.ratio}")
    if spec.size is not None and spec.size <= 0:
        raise UserError(f"patch size must be positive, got {spec.size} px")


def _validate_sliding(spec: PatchSpec) -> None:
    if spec.size is None or spec.stride is None:
        raise UserError("sliding mode needs --patch-size PX and --stride PX")
    if spec.size <= 0 or spec.stride <= 0:
        raise UserError(f"patch size and stride must be positive, got size {spec.size}, stride {spec.stride}")
    if spec.size > spec.out_size:
        raise UserError(f"patch size {spec.size} px is larger than the {spec.out_size} px image view")
