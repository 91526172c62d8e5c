"""RandomResizedCrop geometry: the evaluation's random boxes pinned bit for bit, and the one geometry
function against a per-box transcription of ``RandomResizedCrop.get_params`` fed the same uniforms."""

import math

import numpy as np
import pytest

from ssl_patchbench.sampling.geometry import ATTEMPTS, random_resized_boxes, uniforms_from_array
from ssl_patchbench.sampling.patches import PatchSpec

# Values computed by the implementation of 2026-12-01 (before the geometry moved to sampling/geometry.py):
# they pin today's evaluation boxes, so stores and records made before the move stay comparable.
GOLDEN = [
    (
        {"n": 3, "scale": (0.08, 1.0), "seed": 0},
        ([0, 7, 123456], [32, 32, 32], [32, 32, 32]),
        [[1, 0, 31, 23], [4, 7, 27, 30], [2, 11, 19, 26], [9, 6, 28, 23], [2, 0, 32, 30], [0, 8, 30, 31],
         [9, 1, 23, 15], [7, 4, 29, 31], [2, 4, 28, 30]],
    ),
    (
        {"n": 2, "scale": (0.2, 0.2), "seed": 5},
        ([3, 4], [96, 160], [96, 120]),
        [[33, 16, 73, 62], [31, 47, 79, 86], [9, 41, 73, 101], [10, 23, 70, 87]],
    ),
    (  # retries: large areas at extreme aspects often do not fit a square image
        {"n": 6, "scale": (0.6, 1.0), "ratio": (0.5, 2.0), "seed": 3},
        ([2, 9], [32, 32], [32, 32]),
        [[0, 0, 32, 31], [1, 0, 32, 31], [2, 8, 29, 32], [0, 4, 32, 26], [5, 0, 30, 26], [0, 2, 24, 28],
         [4, 4, 29, 31], [4, 1, 32, 28], [1, 0, 28, 26], [3, 5, 26, 32], [6, 0, 32, 30], [2, 3, 30, 29]],
    ),
    (  # ten failed tries: torchvision's central fallback, wide and tall images
        {"n": 2, "scale": (0.9, 1.0), "ratio": (0.5, 2.0), "seed": 1},
        ([11, 12], [40, 300], [300, 40]),
        [[110, 0, 190, 40], [110, 0, 190, 40], [0, 110, 40, 190], [0, 110, 40, 190]],
    ),
    (  # fallback with the image's aspect outside the range on both sides
        {"n": 2, "scale": (0.5, 1.0), "ratio": (3.0, 4.0), "seed": 2},
        ([0, 1], [32, 64], [32, 20]),
        [[0, 10, 32, 21], [0, 10, 32, 21], [0, 28, 20, 35], [0, 28, 20, 35]],
    ),
]  # fmt: skip


@pytest.mark.parametrize("settings, images, expected", GOLDEN)
def test_random_evaluation_boxes_are_bit_identical_to_the_pinned_ones(settings, images, expected):
    indices, heights, widths = (np.array(v) for v in images)
    boxes = PatchSpec(mode="random", **settings).boxes(indices, heights, widths)
    assert boxes.dtype == np.float64 and boxes.shape == (len(indices), settings["n"], 4)
    assert np.array_equal(boxes.reshape(-1, 4), np.array(expected, dtype=np.float64))


def _get_params(u: np.ndarray, height: int, width: int, scale, ratio) -> list[float]:
    """torchvision's ``RandomResizedCrop.get_params`` for one image, its random draws replaced by ``u[try]``."""
    for area_u, aspect_u, top_u, left_u in u:
        area = height * width * (scale[0] + area_u * (scale[1] - scale[0]))
        aspect = math.exp(math.log(ratio[0]) + aspect_u * (math.log(ratio[1]) - math.log(ratio[0])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = math.floor(top_u * (height - h + 1)), math.floor(left_u * (width - w + 1))
            return [left, top, left + w, top + h]
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return [(width - w) // 2, (height - h) // 2, (width - w) // 2 + w, (height - h) // 2 + h]


@pytest.mark.parametrize(
    "scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.7, 1.0), (0.3, 3.0)), ((0.95, 1.0), (2.5, 3.0))]
)
def test_training_uniforms_give_torchvisions_boxes(scale, ratio):
    rng = np.random.default_rng(0)
    heights, widths = rng.integers(8, 64, 200), rng.integers(8, 64, 200)
    u = rng.random((200, ATTEMPTS, 4))
    boxes = random_resized_boxes(uniforms_from_array(u), heights, widths, scale=scale, ratio=ratio)
    expected = [_get_params(u[i], heights[i], widths[i], scale, ratio) for i in range(200)]
    assert np.array_equal(boxes, np.array(expected, dtype=np.float64))
