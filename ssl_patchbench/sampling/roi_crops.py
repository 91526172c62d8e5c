"""``roi_align``'s crops (``aligned=True``, adaptive sampling, scale 1) cut straight from a uint8 batch on CUDA.

torchvision's ``roi_align`` wants float32 NCHW input, so a decoded channels-last uint8 batch is first converted to
float32 and then copied to NCHW, and its kernel recomputes every sample's coordinates for each channel. The Triton
kernel here reads the batch as it is (any dtype and strides), computes each output pixel's sample points once for
all channels, and returns the same float32 ``[M, C, out, out]`` crops, equal to ``roi_align``'s up to float32
rounding (the order of a few multiply-adds). Elsewhere (CPU, no Triton) the crops come from ``roi_align`` itself.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

BLOCK = 1024
"""Output pixels per Triton program (one box each): a 32 px crop is one program, a 224 px crop 49."""


def roi_crops(images: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor, out_size: int) -> torch.Tensor:
    """``roi_align(images.float(), [image_index, boxes], out_size, 1.0, -1, aligned=True)``.

    ``images``: ``[B, C, H, W]`` in [0, 255], uint8 or float, any memory layout; ``boxes``: ``[M, 4]`` (x1, y1,
    x2, y2) in pixels; ``image_index``: ``[M]``. Returns float32 ``[M, C, out_size, out_size]``, contiguous.
    """
    if images.is_cuda and _triton_available():
        return _triton_crops(images, boxes, image_index, out_size)
    from torchvision.ops import roi_align  # imported when cropping: torchvision pulls in torch._dynamo

    floating = images if images.is_floating_point() else images.float()
    rois = torch.cat([image_index.to(boxes.dtype)[:, None], boxes], dim=1)
    return roi_align(floating, rois, output_size=out_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_crops(images: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor, out_size: int) -> torch.Tensor:
    import triton

    batch, channels, height, width = images.shape
    out = torch.empty(len(boxes), channels, out_size, out_size, dtype=torch.float32, device=images.device)
    if len(boxes) and batch:
        grid = (len(boxes), triton.cdiv(out_size * out_size, BLOCK))
        _kernel()[grid](
            images,
            boxes.float().contiguous(),
            image_index.long().contiguous(),
            out,
            height,
            width,
            *images.stride(),
            OUT=out_size,
            CHANNELS=channels,
            CHANNELS_POW2=triton.next_power_of_2(channels),
            BLOCK=BLOCK,
        )
    return out


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (``triton`` is imported only where it runs)."""
    import triton
    import triton.language as tl

    @triton.jit
    def roi_align_kernel(
        images,
        boxes,
        owners,
        out,
        height,
        width,
        stride_b,
        stride_c,
        stride_h,
        stride_w,
        OUT: tl.constexpr,
        CHANNELS: tl.constexpr,
        CHANNELS_POW2: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        box = tl.program_id(0).to(tl.int64)  # M x C x OUT^2 outputs can pass 2^31
        pixel = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        in_crop = pixel < OUT * OUT
        row = (pixel // OUT).to(tl.float32)
        col = (pixel % OUT).to(tl.float32)
        channel = tl.arange(0, CHANNELS_POW2)
        is_channel = channel < CHANNELS
        base = images + tl.load(owners + box) * stride_b + channel[:, None] * stride_c
        start_x = tl.load(boxes + box * 4) - 0.5
        start_y = tl.load(boxes + box * 4 + 1) - 0.5
        roi_w = (tl.load(boxes + box * 4 + 2) - 0.5) - start_x
        roi_h = (tl.load(boxes + box * 4 + 3) - 0.5) - start_y
        bin_w = roi_w / OUT
        bin_h = roi_h / OUT
        grid_w = tl.ceil(roi_w / OUT).to(tl.int32)  # roi_align's adaptive sampling_ratio (-1)
        grid_h = tl.ceil(roi_h / OUT).to(tl.int32)
        total = tl.zeros([CHANNELS_POW2, BLOCK], dtype=tl.float32)
        for iy in range(grid_h):
            y = start_y + row * bin_h + (iy + 0.5) * bin_h / grid_h
            y_in = (y >= -1.0) & (y <= height)
            y = tl.maximum(y, 0.0)
            y_low = y.to(tl.int32)  # y >= 0: truncation is floor
            at_edge = y_low >= height - 1
            y_low = tl.where(at_edge, height - 1, y_low)
            y_high = tl.where(at_edge, height - 1, y_low + 1)
            y = tl.where(at_edge, y_low.to(tl.float32), y)
            ly = y - y_low
            hy = 1.0 - ly
            for ix in range(grid_w):
                x = start_x + col * bin_w + (ix + 0.5) * bin_w / grid_w
                inside = y_in & (x >= -1.0) & (x <= width)
                x = tl.maximum(x, 0.0)
                x_low = x.to(tl.int32)
                x_edge = x_low >= width - 1
                x_low = tl.where(x_edge, width - 1, x_low)
                x_high = tl.where(x_edge, width - 1, x_low + 1)
                x = tl.where(x_edge, x_low.to(tl.float32), x)
                lx = x - x_low
                hx = 1.0 - lx
                mask = is_channel[:, None] & (in_crop & inside)[None, :]
                top = base + (y_low * stride_h)[None, :]
                bottom = base + (y_high * stride_h)[None, :]
                v1 = tl.load(top + (x_low * stride_w)[None, :], mask=mask, other=0).to(tl.float32)
                v2 = tl.load(top + (x_high * stride_w)[None, :], mask=mask, other=0).to(tl.float32)
                v3 = tl.load(bottom + (x_low * stride_w)[None, :], mask=mask, other=0).to(tl.float32)
                v4 = tl.load(bottom + (x_high * stride_w)[None, :], mask=mask, other=0).to(tl.float32)
                w1 = (hy * hx)[None, :]
                w2 = (hy * lx)[None, :]
                w3 = (ly * hx)[None, :]
                w4 = (ly * lx)[None, :]
                total += w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4
        count = tl.maximum(grid_h * grid_w, 1).to(tl.float32)
        target = out + box * (CHANNELS * OUT * OUT) + channel[:, None] * (OUT * OUT) + pixel[None, :]
        tl.store(target, total / count, mask=is_channel[:, None] & in_crop[None, :])

    return roi_align_kernel
