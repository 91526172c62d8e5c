"""RandomResizedCrop's box geometry, written once for the evaluation's random patches and the training views.

Pure numpy on uniforms the caller supplies: the evaluation feeds its counter-based hash of (seed, image,
patch), so its boxes are a pure function of those; training feeds uniforms from its own generator. As
``torchvision.transforms.RandomResizedCrop.get_params``: area fraction uniform in ``scale``, log-aspect
uniform in ``ratio``, rounded integer sides, ten tries (the first that fits is kept), then the central
fallback; integer positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

ATTEMPTS = 10  # RandomResizedCrop's tries before its central fallback

# (attempt, rows still without a box) -> [len(rows), 4] uniforms in [0, 1): area, log-aspect, top, left
Uniforms = Callable[[int, np.ndarray], np.ndarray]


def random_resized_boxes(
    uniforms: Uniforms,
    heights: np.ndarray,
    widths: np.ndarray,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> np.ndarray:
    """Boxes ``[M, 4]`` (x1, y1, x2, y2, float64) for images of ``heights`` x ``widths`` ``[M]``.

    Uniforms are asked for only for the rows still without a box (after the first try, few are).
    """
    h, w = np.asarray(heights, dtype=np.float64), np.asarray(widths, dtype=np.float64)
    boxes = np.empty((len(h), 4))
    pending = np.arange(len(h))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(ATTEMPTS):
        u = uniforms(attempt, pending)
        ph, pw = h[pending], w[pending]
        area = ph * pw * (scale[0] + u[:, 0] * (scale[1] - scale[0]))
        aspect = np.exp(log_lo + u[:, 1] * (log_hi - log_lo))
        cw, ch = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
        ok = (cw > 0) & (cw <= pw) & (ch > 0) & (ch <= ph)
        top = np.floor(u[ok, 2] * (ph[ok] - ch[ok] + 1))
        left = np.floor(u[ok, 3] * (pw[ok] - cw[ok] + 1))
        boxes[pending[ok]] = np.stack([left, top, left + cw[ok], top + ch[ok]], axis=1)
        pending = pending[~ok]
        if not len(pending):
            return boxes
    left, top, cw, ch = fallback_crop(h[pending], w[pending], ratio)
    boxes[pending] = np.stack([left, top, left + cw, top + ch], axis=1)
    return boxes


def uniforms_from_array(u: np.ndarray) -> Uniforms:
    """The ``Uniforms`` of pre-drawn ``[M, ATTEMPTS, 4]`` values (training draws them all at once)."""
    return lambda attempt, rows: u[rows, attempt]


def fallback_crop(h: np.ndarray, w: np.ndarray, ratio: tuple[float, float]) -> tuple[np.ndarray, ...]:
    """RandomResizedCrop's central crop after ten failed tries (extreme images, scales or ratios).

    At least 1 px a side: for ratios so extreme that torchvision would round a side to 0 (and fail).
    """
    in_ratio = w / h
    cw = np.where(in_ratio < ratio[0], w, np.where(in_ratio > ratio[1], np.maximum(np.round(h * ratio[1]), 1), w))
    ch = np.where(in_ratio < ratio[0], np.maximum(np.round(w / ratio[0]), 1), h)
    return np.floor((w - cw) / 2), np.floor((h - ch) / 2), cw, ch
