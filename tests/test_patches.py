import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from sklearn.datasets import load_sample_image
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.sampling.patches import PatchSpec, central_boxes, crop_and_resize


def _crop(image: torch.Tensor, box: tuple[float, float, float, float], out: int) -> torch.Tensor:
    boxes = torch.tensor([box], dtype=torch.float64).float()
    return crop_and_resize(image[None].float(), boxes, torch.zeros(1, dtype=torch.long), out)[0]


@pytest.mark.parametrize("top,left,h,w,out", [(5, 7, 20, 16, 32), (0, 0, 9, 9, 32), (10, 3, 14, 14, 28)])
def test_crop_matches_torchvision_resized_crop_away_from_borders(top, left, h, w, out):
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = _crop(image, (left, top, left + w, top + h), out)
    ref = TF.resized_crop(image.float(), top, left, h, w, [out, out], InterpolationMode.BILINEAR, antialias=False)
    m = int(np.ceil(0.5 * out / min(h, w)))  # output pixels whose samples fall outside the crop
    torch.testing.assert_close(ours[:, m:-m, m:-m], ref[:, m:-m, m:-m], atol=1e-3, rtol=0)


def test_whole_image_at_its_own_size_is_the_identity():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(_crop(image, (0, 0, 32, 32), 32), image.float())


def test_whole_image_upsampled_matches_interpolate_everywhere():
    image = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8).float()
    ours = _crop(image, (0, 0, 24, 20), 32)
    ref = torch.nn.functional.interpolate(image[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)


def test_sliding_16_at_stride_4_on_32px_gives_the_25_windows():
    spec = PatchSpec(mode="sliding", size=16, stride=4, out_size=32)
    boxes = spec.boxes(np.array([3]), np.array([32]), np.array([32]))[0]
    expected = [(x, y, x + 16, y + 16) for y in range(0, 17, 4) for x in range(0, 17, 4)]
    assert spec.num_patches == 25
    assert [tuple(b) for b in boxes.tolist()] == expected


def test_grid_tiles_the_image_exactly():
    spec = PatchSpec(mode="grid", grid=4, out_size=32)
    boxes = spec.boxes(np.array([0]), np.array([32]), np.array([32]))[0]
    assert boxes.shape == (16, 4)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert areas.sum() == pytest.approx(32 * 32)
    assert {tuple(b[:2]) for b in boxes.tolist()} == {(x, y) for x in range(0, 32, 8) for y in range(0, 32, 8)}


def test_random_boxes_do_not_depend_on_batching_or_order():
    spec = PatchSpec(mode="random", n=16, scale=(0.08, 1.0), seed=7)
    idx = np.arange(50)
    sizes = np.full(50, 32)
    whole = spec.boxes(idx, sizes, sizes)
    one_by_one = np.concatenate([spec.boxes(idx[i : i + 1], sizes[:1], sizes[:1]) for i in range(50)])
    reversed_ = spec.boxes(idx[::-1], sizes, sizes)[::-1]
    np.testing.assert_array_equal(whole, one_by_one)
    np.testing.assert_array_equal(whole, reversed_)
    assert not np.array_equal(whole, PatchSpec(mode="random", n=16, seed=8).boxes(idx, sizes, sizes))


def test_first_patches_are_shared_between_counts():
    idx, sizes = np.arange(5), np.full(5, 32)
    few = PatchSpec(mode="random", n=4, seed=1).boxes(idx, sizes, sizes)
    many = PatchSpec(mode="random", n=64, seed=1).boxes(idx, sizes, sizes)
    np.testing.assert_array_equal(few, many[:, :4])


def test_random_boxes_follow_random_resized_crop():
    """Integer boxes inside the image, area in range (up to rounding), and torchvision's size distribution."""
    spec = PatchSpec(mode="random", n=4000, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), seed=3)
    boxes = spec.boxes(np.array([0]), np.array([32]), np.array([32]))[0]
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert np.all(boxes == np.round(boxes))
    assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= 32 and boxes[:, 3].max() <= 32
    area = w * h / 1024
    assert area.min() >= 0.08 * 0.7 and area.max() <= 1.0
    torch.manual_seed(0)
    ref = np.array(
        [RandomResizedCrop.get_params(torch.zeros(3, 32, 32), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)]
    )
    assert abs(w.mean() - ref[:, 3].mean()) < 0.5
    assert abs(h.mean() - ref[:, 2].mean()) < 0.5
    assert abs(boxes[:, 0].mean() - ref[:, 1].mean()) < 0.5


def test_fixed_scale_on_cifar_is_about_14px():
    spec = PatchSpec(mode="random", n=1000, scale=(0.2, 0.2), seed=0)
    boxes = spec.boxes(np.array([0]), np.array([32]), np.array([32]))[0]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert np.sqrt(area).mean() == pytest.approx(14.3, abs=0.5)


def _photo(h: int, w: int) -> np.ndarray:
    """A real photograph (scikit-learn's china.jpg, 427x640) resized by Pillow to ``h`` x ``w``: edges and texture."""
    photo = Image.fromarray(load_sample_image("china.jpg"))
    return np.asarray(photo if photo.size == (w, h) else photo.resize((w, h), Image.BILINEAR))


def _central(image: np.ndarray, interpolation: str, resize: int | None = 256, out: int = 224) -> torch.Tensor:
    """Our central view: the spec's box, cut with the spec's resampler."""
    spec = PatchSpec(mode="central", out_size=out, resize=resize, interpolation=interpolation)
    box = torch.from_numpy(spec.boxes(np.array([0]), np.array([image.shape[0]]), np.array([image.shape[1]])))
    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
    crop = crop_and_resize(pixels, box[0].float(), torch.zeros(1, dtype=torch.long), out, *_resampling(spec))
    return crop[0]


def _resampling(spec: PatchSpec) -> tuple[str, str]:
    return spec.interpolation, spec.antialias


def _upstream(image: np.ndarray, mode: InterpolationMode) -> torch.Tensor:
    """The authors' evaluation transform on the PIL image: Resize(256) + CenterCrop(224) (Pillow antialiases)."""
    crop = T.Compose([T.Resize(256, interpolation=mode), T.CenterCrop(224)])(Image.fromarray(image))
    return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float()


# Odd sizes, including short sides under 224 (upsampled: Imagenette-160 is 160x213) and extreme aspect ratios.
ODD_SIZES = [(200, 300), (160, 213), (97, 500), (1000, 37), (427, 640)]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", ODD_SIZES)
def test_central_view_is_torchvision_resize_then_centre_crop_on_pil(size, interpolation):
    """Pillow rounds to uint8 after each of its two passes, we keep floats: at most one grey level apart."""
    image = _photo(*size)
    mode = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
    diff = (_central(image, interpolation) - _upstream(image, mode)).abs()
    assert diff.max() <= 1.1 and diff.mean() < 0.35


@pytest.mark.parametrize("size", ODD_SIZES)
def test_central_view_bicubic_matches_torchvision_tensor_resize(size):
    """torchvision.transforms.v2 on a uint8 tensor (its antialiased bicubic, Pillow's kernel and clipping, rounded
    to integers) as a second reference: the same one-grey-level bound."""
    image = _photo(*size)
    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)
    ref = TF.center_crop(TF.resize(pixels, 256, InterpolationMode.BICUBIC, antialias=True), [224, 224]).float()
    diff = (_central(image, "bicubic") - ref).abs()
    assert diff.max() <= 1.1 and diff.mean() < 0.35


def test_central_box_is_torchvisions_region():
    """The box is what Resize(256) + CenterCrop(224) keeps, with torchvision's truncation and rounding."""
    for h, w in [*ODD_SIZES, (300, 400), (32, 32)]:
        resized = T.Resize(256)(Image.new("RGB", (w, h))).size  # (width, height)
        top, left = round((resized[1] - 224) / 2), round((resized[0] - 224) / 2)
        expected = [
            left * w / resized[0],
            top * h / resized[1],
            (left + 224) * w / resized[0],
            (top + 224) * h / resized[1],
        ]
        np.testing.assert_allclose(central_boxes(np.array([h]), np.array([w]), 256, 224)[0], expected, rtol=1e-12)


def test_whole_image_only_without_resize():
    np.testing.assert_array_equal(central_boxes(np.array([96]), np.array([96]), None, 32), [[0, 0, 96, 96]])
    np.testing.assert_array_equal(central_boxes(np.array([200]), np.array([300]), None, 32), [[0, 0, 300, 200]])


def test_bilinear_patches_keep_the_box_filter_and_bicubic_patches_follow_pillow():
    """Patches: bilinear is roi_align's box filter (cheaper); bicubic crops equal Pillow's resize of the box."""
    assert PatchSpec(mode="random", n=4).antialias == "box"
    assert PatchSpec(mode="random", n=4, interpolation="bicubic").antialias == "pillow"
    assert PatchSpec(mode="central", out_size=32).antialias == "pillow"
    image = _photo(200, 300)
    box = (37.0, 21.0, 37.0 + 150.0, 21.0 + 120.0)  # downscaled 150x120 -> 64: the kernel widens
    ours = crop_and_resize(
        torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float(),
        torch.tensor([box]),
        torch.zeros(1, dtype=torch.long),
        64,
        "bicubic",
        "pillow",
    )[0]
    ref = np.asarray(Image.fromarray(image).resize((64, 64), Image.BICUBIC, box=box))
    diff = (ours - torch.from_numpy(ref.copy()).permute(2, 0, 1).float()).abs()
    assert diff.max() <= 1.1 and diff.mean() < 0.35


def test_bicubic_crops_ignore_edge_replicated_padding():
    """A file-backed batch pads small images by edge replication: their crops must not depend on it."""
    image = torch.from_numpy(_photo(40, 50).copy()).permute(2, 0, 1).float()
    padded = torch.nn.functional.pad(image[None], (0, 30, 0, 20), mode="replicate")
    boxes = torch.tensor([[0.0, 0.0, 50.0, 40.0], [10.5, 3.0, 49.0, 39.5]])
    owner = torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(
        crop_and_resize(padded, boxes, owner, 32, "bicubic", "pillow"),
        crop_and_resize(image[None], boxes, owner, 32, "bicubic", "pillow"),
    )


@pytest.mark.parametrize(
    "interpolation,antialias", [("bilinear", "box"), ("bilinear", "pillow"), ("bicubic", "pillow")]
)
def test_uint8_images_give_the_crops_of_their_float_copy(interpolation, antialias):
    """Decoded batches stay uint8 until a forward slice needs them: resampling converts what it reads."""
    images = torch.from_numpy(np.stack([_photo(40, 50), _photo(40, 50)[::-1].copy()])).permute(0, 3, 1, 2)
    boxes = torch.tensor([[0.0, 0.0, 50.0, 40.0], [10.5, 3.0, 49.0, 39.5], [2.0, 5.0, 20.0, 30.0]])
    owner = torch.tensor([0, 1, 1])
    ours = crop_and_resize(images, boxes, owner, 24, interpolation, antialias)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, crop_and_resize(images.float(), boxes, owner, 24, interpolation, antialias))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "random", "n": 0},
        {"mode": "random", "n": -3},
        {"mode": "random", "scale": (0.5, 1.2)},
        {"mode": "random", "scale": (0.0, 0.5)},
        {"mode": "sliding", "size": 40, "stride": 4, "out_size": 32},
        {"mode": "sliding", "size": 16, "stride": 0},
        {"mode": "grid", "grid": 0},
        {"mode": "spiral"},
        {"mode": "central", "interpolation": "nearest"},
    ],
)
def test_bad_specs_are_user_errors(kwargs):
    with pytest.raises(UserError):
        PatchSpec(**kwargs)


def test_fixed_size_patch_larger_than_the_image_is_a_user_error():
    spec = PatchSpec(mode="random", n=2, size=40)
    with pytest.raises(UserError, match="larger than"):
        spec.boxes(np.array([0]), np.array([32]), np.array([32]))


def _box_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three images of different true sizes padded into one uint8 batch, with random boxes (up- and down-scaled,
    some on the edges) inside each image's own area."""
    rng = np.random.default_rng(seed)
    sizes = np.array([[57, 83], [40, 83], [57, 30]])
    images = torch.from_numpy(rng.integers(0, 256, (3, 3, 57, 83), dtype=np.uint8))
    spec = PatchSpec(mode="random", n=30, scale=(0.005, 1.0), ratio=(0.3, 3.0))
    boxes = spec.boxes(np.arange(3), sizes[:, 0], sizes[:, 1]).reshape(-1, 4)
    edges = [[0, 0, 83, 57], [82, 39, 83, 40], [0.3, 0.2, 5.1, 3.3], [29.5, 0, 30, 57]]
    boxes = torch.from_numpy(np.concatenate([boxes, edges])).float()
    owner = torch.cat([torch.arange(3).repeat_interleave(30), torch.tensor([0, 1, 1, 2])])
    return images, boxes, owner


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_float16_pillow_crops_differ_from_float32_by_its_rounding_only(interpolation):
    """A bf16 eval on CUDA resamples Pillow's way in float16: within float16's rounding of values up to 255
    (2^-11 relative, a few roundings deep), far below the model input's bf16 rounding (2^-8)."""
    images, boxes, owner = _box_batch(1)
    exact = crop_and_resize(images, boxes, owner, 24, interpolation, "pillow")
    half = crop_and_resize(images, boxes, owner, 24, interpolation, "pillow", torch.float16)
    assert half.dtype == torch.float16 and exact.dtype == torch.float32
    diff = (half.float() - exact).abs()
    assert diff.max() <= 4 * 255 * 2**-11 and diff.mean() <= 255 * 2**-11


def test_the_box_filter_is_roi_align_in_float32_whatever_dtype_is_asked():
    images, boxes, owner = _box_batch(2)
    rois = torch.cat([owner.float()[:, None], boxes], dim=1)
    expected = roi_align(images.float(), rois, output_size=24, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    torch.testing.assert_close(crop_and_resize(images, boxes, owner, 24, dtype=torch.float16), expected)
