"""Property tests (hypothesis) for patch-spec parsing and box geometry.

Parsing: any ``--patch-scale`` text and any PatchSpec arguments either give a valid spec or a UserError,
never another exception. Geometry: every box lies inside its image, random boxes are integer and have the
requested area and aspect ratio within rounding (or are RandomResizedCrop's central fallback), and boxes
are a pure function of (seed, image index, patch index).
"""

import math

import click
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ssl_patchbench.cli.common import FloatPair
from ssl_patchbench.core.errors import UserError
from ssl_patchbench.sampling.geometry import fallback_crop
from ssl_patchbench.sampling.patches import MODES, PatchSpec, central_boxes

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sizes = st.integers(min_value=1, max_value=300)
seeds = st.integers(min_value=0, max_value=2**64 - 1)
unit = st.floats(min_value=1e-4, max_value=1.0)
ratios = st.tuples(st.floats(min_value=1e-3, max_value=1e3), st.floats(min_value=1e-3, max_value=1e3)).map(sorted)
any_float = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1.0, 1e-12, -1.0])
any_pair = st.tuples(any_float, any_float)


def _images(draw_sizes: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h = np.array([s[0] for s in draw_sizes], dtype=np.float64)
    w = np.array([s[1] for s in draw_sizes], dtype=np.float64)
    return np.arange(len(draw_sizes)) * 7919, h, w


def _inside(boxes: np.ndarray, x0, y0, x1, y1, eps: float = 1e-9) -> bool:
    bx1, by1, bx2, by2 = (boxes[..., i] for i in range(4))
    return bool(
        np.all(bx1 >= x0 - eps) and np.all(by1 >= y0 - eps) and np.all(bx2 <= x1 + eps) and np.all(by2 <= y1 + eps)
    )


# ---------------------------------------------------------------- parsing


@FUZZ
@given(st.text(max_size=20) | st.from_regex(r"[-+]?[0-9.e]{0,6}([,:][-+]?[0-9.e]{0,6}){0,2}", fullmatch=True))
def test_patch_scale_text_gives_a_valid_spec_or_one_user_error(text):
    try:
        scale = FloatPair().convert(text, None, None)
        spec = PatchSpec(mode="random", n=1, scale=scale)
    except (UserError, click.BadParameter) as err:
        assert str(err) and "\n" not in str(err)
        return
    assert 0 < spec.scale[0] <= spec.scale[1] <= 1
    assert len(text.replace(":", ",").split(",")) in (1, 2)


@FUZZ
@given(
    mode=st.sampled_from([*MODES, "tiles", ""]),
    n=st.integers(-3, 40),
    scale=st.tuples(unit, unit).map(sorted).map(tuple) | any_pair,
    ratio=ratios.map(tuple) | any_pair,
    size=st.none() | st.integers(-4, 40),
    stride=st.none() | st.integers(-4, 40),
    grid=st.none() | st.integers(-2, 6),
    out_size=st.integers(-2, 40),
    seed=st.integers(-(2**65), 2**65),
)
def test_any_spec_arguments_give_a_spec_or_a_user_error(mode, n, scale, ratio, size, stride, grid, out_size, seed):
    kwargs = dict(n=n, scale=scale, ratio=ratio, size=size, stride=stride, grid=grid, out_size=out_size, seed=seed)
    try:
        spec = PatchSpec(mode=mode, **kwargs)
        boxes = spec.boxes(np.array([0, 5]), np.array([32, 40]), np.array([32, 48]))
    except UserError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert spec.num_patches >= 1 and boxes.shape == (2, spec.num_patches, 4)
    assert _inside(boxes[0], 0, 0, 32, 32) and _inside(boxes[1], 0, 0, 48, 40)
    assert np.all(boxes[..., 2] > boxes[..., 0]) and np.all(boxes[..., 3] > boxes[..., 1])


@FUZZ
@given(seed=st.integers(-(2**70), 2**70) | st.sampled_from([-1, 2**64 - 1, 2**64]))
def test_seed_outside_64_bits_is_a_user_error(seed):
    try:
        boxes = PatchSpec(mode="random", n=2, seed=seed).boxes(np.array([3]), np.array([32]), np.array([32]))
    except UserError as err:
        assert "--seed" in str(err) and not 0 <= seed < 2**64
        return
    assert 0 <= seed < 2**64 and boxes.shape == (1, 2, 4)


# ---------------------------------------------------------------- random boxes


def _consistent_with_rounding(box: np.ndarray, area: float, spec: PatchSpec) -> bool:
    """Some (area fraction, aspect) in the spec's ranges rounds to this box's integer width and height."""
    cw, ch = box[2] - box[0], box[3] - box[1]
    lo_area, hi_area = (cw - 0.5) * (ch - 0.5), (cw + 0.5) * (ch + 0.5)
    area_ok = lo_area <= spec.scale[1] * area * (1 + 1e-9) and hi_area >= spec.scale[0] * area * (1 - 1e-9)
    lo_ratio, hi_ratio = (cw - 0.5) / (ch + 0.5), (cw + 0.5) / max(ch - 0.5, 1e-12)
    ratio_ok = lo_ratio <= spec.ratio[1] * (1 + 1e-9) and hi_ratio >= spec.ratio[0] * (1 - 1e-9)
    return area_ok and ratio_ok


@FUZZ
@example(images=[(5, 40)], n=3, scale=[0.5, 1.0], ratio=[0.01, 0.02], seed=0)  # the fallback, a side rounding to 0
@example(images=[(1, 1)], n=2, scale=[1e-4, 1e-4], ratio=None, seed=1)  # nothing fits: the fallback
@given(
    images=st.lists(st.tuples(sizes, sizes), min_size=1, max_size=4),
    n=st.integers(1, 24),
    scale=st.tuples(unit, unit).map(sorted),
    ratio=st.none() | ratios,
    seed=seeds,
)
def test_random_boxes_are_inside_integer_and_of_the_requested_area(images, n, scale, ratio, seed):
    spec = PatchSpec(mode="random", n=n, scale=tuple(scale), ratio=tuple(ratio or (3 / 4, 4 / 3)), seed=seed)
    indices, h, w = _images(images)
    boxes = spec.boxes(indices, h, w)
    assert boxes.shape == (len(images), n, 4)
    assert np.array_equal(boxes, np.round(boxes)), "random boxes have integer corners"
    fb_left, fb_top, fb_w, fb_h = fallback_crop(h[:, None], w[:, None], spec.ratio)
    for i in range(len(images)):
        assert _inside(boxes[i], 0, 0, w[i], h[i])
        assert np.all(boxes[i, :, 2] - boxes[i, :, 0] >= 1) and np.all(boxes[i, :, 3] - boxes[i, :, 1] >= 1)
        fallback = np.array([fb_left[i, 0], fb_top[i, 0], fb_left[i, 0] + fb_w[i, 0], fb_top[i, 0] + fb_h[i, 0]])
        for box in boxes[i]:
            assert np.array_equal(box, fallback) or _consistent_with_rounding(box, h[i] * w[i], spec), box


@FUZZ
@given(images=st.lists(st.tuples(sizes, sizes), min_size=1, max_size=4), n=st.integers(1, 16), seed=seeds)
def test_same_seed_same_boxes_for_any_batch_and_count(images, n, seed):
    spec = PatchSpec(mode="random", n=n, scale=(0.08, 1.0), seed=seed)
    indices, h, w = _images(images)
    boxes = spec.boxes(indices, h, w)
    assert np.array_equal(boxes, PatchSpec(mode="random", n=n, scale=(0.08, 1.0), seed=seed).boxes(indices, h, w))
    for i in range(len(images)):  # one image at a time: the batch does not matter
        assert np.array_equal(boxes[i], spec.boxes(indices[i : i + 1], h[i : i + 1], w[i : i + 1])[0])
    more = PatchSpec(mode="random", n=n + 3, scale=(0.08, 1.0), seed=seed).boxes(indices, h, w)
    assert np.array_equal(more[:, :n], boxes), "patch j does not depend on the patch count"


@FUZZ
@given(images=st.lists(st.tuples(sizes, sizes), min_size=1, max_size=4), size=st.integers(1, 40), seed=seeds)
def test_fixed_size_boxes_are_inside_or_refused(images, size, seed):
    spec = PatchSpec(mode="random", n=5, size=size, seed=seed)
    indices, h, w = _images(images)
    if size > min(h.min(), w.min()):
        with pytest.raises(UserError, match="larger than"):
            spec.boxes(indices, h, w)
        return
    boxes = spec.boxes(indices, h, w)
    assert np.array_equal(boxes, np.round(boxes))
    assert np.all(boxes[..., 2] - boxes[..., 0] == size) and np.all(boxes[..., 3] - boxes[..., 1] == size)
    for i in range(len(images)):
        assert _inside(boxes[i], 0, 0, w[i], h[i])


# ---------------------------------------------------------------- grid, sliding and central views


@FUZZ
@given(
    images=st.lists(st.tuples(st.integers(8, 600), st.integers(8, 600)), min_size=1, max_size=4),
    imagenet=st.booleans(),
    layout=st.one_of(
        st.tuples(st.just("grid"), st.integers(1, 8), st.none()),
        st.tuples(st.just("sliding"), st.integers(1, 32), st.integers(1, 16)),
    ),
)
def test_grid_and_sliding_boxes_lie_in_the_central_view(images, imagenet, layout):
    mode, first, second = layout
    out_size, resize = (224, 256) if imagenet else (32, None)
    if mode == "grid":
        spec = PatchSpec(mode="grid", grid=first, out_size=out_size, resize=resize)
    else:
        spec = PatchSpec(mode="sliding", size=first, stride=second, out_size=out_size, resize=resize)
    indices, h, w = _images(images)
    views = central_boxes(h, w, resize, out_size)
    boxes = spec.boxes(indices, h, w)
    assert boxes.shape == (len(images), spec.num_patches, 4)
    for i in range(len(images)):
        x0, y0, x1, y1 = views[i]
        assert _inside(views[i][None], 0, 0, w[i], h[i])
        assert _inside(boxes[i], x0, y0, x1, y1)
        sides = boxes[i, :, 2] - boxes[i, :, 0]
        expected = (x1 - x0) * (1 / spec.grid if mode == "grid" else spec.size / out_size)
        assert np.allclose(sides, expected), "every patch of a layout has the same size"
    if mode == "sliding":
        assert spec.grid_side == (out_size - spec.size) // spec.stride + 1


@FUZZ
@given(h=st.integers(1, 2000), w=st.integers(1, 2000), resize=st.sampled_from([None, 256, 232]))
def test_central_view_is_inside_the_image(h, w, resize):
    view = central_boxes(np.array([h]), np.array([w]), resize, 224)[0]
    assert _inside(view[None], 0, 0, w, h) and view[2] > view[0] and view[3] > view[1]
    if resize is None:
        assert np.array_equal(view, [0, 0, w, h])
    else:  # the square that Resize(resize) + CenterCrop(224) keeps, whatever the size (small images upsampled)
        assert math.isclose(view[2] - view[0], view[3] - view[1], rel_tol=0.02)
