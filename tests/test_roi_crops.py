"""The CUDA crop kernel against torchvision's ``roi_align``: run on this CPU by Triton's interpreter (a subprocess,
since the interpreter is chosen when the kernel is defined)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from ssl_patchbench.sampling.roi_crops import roi_crops

CASES = r"""
import json
import torch
from torchvision.ops import roi_align
from ssl_patchbench.sampling.roi_crops import _triton_crops

g = torch.Generator().manual_seed(0)
report = []


def boxes_in(n, height, width):
    x1, y1 = torch.rand(n, generator=g) * (width - 1), torch.rand(n, generator=g) * (height - 1)
    w, h = 0.3 + torch.rand(n, generator=g) * width, 0.3 + torch.rand(n, generator=g) * height
    boxes = torch.stack([x1, y1, (x1 + w).clamp(max=width), (y1 + h).clamp(max=height)], 1)
    boxes[0] = torch.tensor([0.0, 0.0, width, height])  # the whole image: many samples per output pixel
    boxes[1] = torch.tensor([width - 1.0, height - 1.0, width, height])  # one corner pixel, upsampled
    return boxes


for name, images, outs in (  # (out 1 of a whole image loops over all its pixels: slow in the interpreter)
    ("uint8 channels-last", torch.randint(0, 256, (3, 37, 45, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2),
     (7, 16)),
    ("float32 contiguous", torch.rand(2, 3, 20, 33, generator=g) * 255, (4, 16)),
    ("one channel", torch.randint(0, 256, (2, 1, 9, 13), dtype=torch.uint8, generator=g), (1, 5)),
):
    batch, _, height, width = images.shape
    boxes = boxes_in(7, height, width)
    owner = torch.randint(0, batch, (7,), generator=g)
    for out in outs:
        mine = _triton_crops(images, boxes, owner, out)
        rois = torch.cat([owner.float()[:, None], boxes], 1)
        ref = roi_align(images.float(), rois, out, 1.0, -1, True)
        report.append(
            {"case": f"{name}, out {out}", "shape_ok": mine.shape == ref.shape and mine.is_contiguous(),
             "max_diff": (mine - ref).abs().max().item(), "max_value": ref.abs().max().item()}
        )
empty = _triton_crops(torch.zeros(1, 3, 4, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 5)
report.append({"case": "no boxes", "shape_ok": empty.shape == (0, 3, 5, 5), "max_diff": 0.0, "max_value": 0.0})
print(json.dumps(report))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernel_computes_roi_align_numbers() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", CASES], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(report) == 7
    for case in report:
        assert case["shape_ok"], case
        assert case["max_diff"] <= 1e-4 * max(case["max_value"], 1.0), case  # float32 rounding of 0-255 values


def test_cpu_crops_are_roi_align() -> None:
    """Off CUDA the crops are torchvision's own, whatever the batch's dtype and layout."""
    from torchvision.ops import roi_align

    images = torch.randint(0, 256, (2, 30, 40, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    boxes = torch.tensor([[0.0, 0.0, 40.0, 30.0], [3.5, 2.0, 11.0, 9.5]])
    owner = torch.tensor([1, 0])
    rois = torch.cat([owner.float()[:, None], boxes], 1)
    expected = roi_align(images.float().contiguous(), rois, 8, 1.0, -1, True)
    torch.testing.assert_close(roi_crops(images, boxes, owner, 8), expected, rtol=0, atol=0)
