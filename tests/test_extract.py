import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from ssl_patchbench.data.datasets import open_split
from ssl_patchbench.features.extract import (
    ExtractSettings,
    ExtractStats,
    PatchRunner,
    Target,
    _plan,
    _stretches,
    extract,
    input_layout,
)
from ssl_patchbench.features.store import FeatureStore
from ssl_patchbench.models.encoder import Encoder
from ssl_patchbench.models.loading import load_model
from ssl_patchbench.sampling.aggregate import Aggregation
from ssl_patchbench.sampling.patches import PatchSpec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model("tiny_cifar", checkpoint=tiny_checkpoint)


@pytest.fixture(scope="module")
def split(cifar_dir):
    return open_split("cifar10", "test", data_dir=cifar_dir, per_class=3)


def _run(
    model,
    split,
    spec,
    tmp_path,
    *,
    aggs=("mean",),
    space="embedding",
    chunk_rows=8,
    max_patches=None,
    progress=None,
    key="k",
    compile_model=False,
):
    writers = {
        Aggregation.parse(a): FeatureStore(tmp_path, f"{key}-{a}").writer(
            labels=split.labels,
            dim=Aggregation.parse(a).output_dim(
                model.projection_dim if space == "projection" else model.embed_dim, spec
            ),
            dtype="float32",
            chunk_rows=chunk_rows,
            meta={},
        )
        for a in aggs
    }
    encoder = Encoder(model, space)
    settings = ExtractSettings(device=CPU, max_patches=max_patches, compile_model=compile_model)
    extract(encoder, split, spec, writers, settings, progress=progress)
    return {agg.label: np.array(w.features) for agg, w in writers.items()}


def test_central_features_equal_a_direct_forward_with_torchvision_normalisation(model, split, tmp_path):
    spec = PatchSpec(mode="central", out_size=32)
    ours = _run(model, split, spec, tmp_path)["mean"]
    pre = model.entry.preprocessing
    pixels = torch.from_numpy(np.stack([split.image(i) for i in range(len(split))])).permute(0, 3, 1, 2)
    normalised = TF.normalize(TF.to_dtype(pixels, torch.float32, scale=True), list(pre.mean), list(pre.std))
    with torch.no_grad():
        direct = model.backbone(normalised)
    np.testing.assert_allclose(ours, direct.numpy(), atol=1e-4, rtol=1e-4)


def test_projection_space_applies_the_projector(model, split, tmp_path):
    spec = PatchSpec(mode="central", out_size=32)
    h = _run(model, split, spec, tmp_path, key="h")["mean"]
    z = _run(model, split, spec, tmp_path, space="projection", key="z")["mean"]
    with torch.no_grad():
        expected = model.projector(torch.from_numpy(h))
    np.testing.assert_allclose(z, expected.numpy(), atol=1e-4, rtol=1e-4)


def test_mean_of_patches_is_the_mean_of_each_patch_forward(model, split, tmp_path):
    spec = PatchSpec(mode="sliding", size=16, stride=8, out_size=32)
    got = _run(model, split, spec, tmp_path, aggs=("mean", "concat"))
    per_patch = got["concat"].reshape(len(split), spec.num_patches, -1)
    np.testing.assert_allclose(got["mean"], per_patch.mean(axis=1), atol=1e-5, rtol=1e-5)
    image = torch.from_numpy(split.image(4).copy()).permute(2, 0, 1).float()
    crop = TF.resized_crop(image, 8, 16, 16, 16, [32, 32], antialias=False)  # window (row 1, col 2)
    pre = model.entry.preprocessing
    normalised = TF.normalize(crop / 255.0, list(pre.mean), list(pre.std))
    with torch.no_grad():
        direct = model.backbone(normalised[None])[0].numpy()
    # the sampler reads real neighbouring pixels at the window's edge, resized_crop clamps: close, not equal
    assert np.corrcoef(per_patch[4, 5], direct)[0, 1] > 0.99


def test_features_do_not_depend_on_the_forward_slice_size(model, split, tmp_path):
    spec = PatchSpec(mode="random", n=5, scale=(0.2, 0.5), seed=3)
    big = _run(model, split, spec, tmp_path, max_patches=1000, key="big")["mean"]
    odd = _run(model, split, spec, tmp_path, max_patches=7, key="odd")["mean"]
    np.testing.assert_allclose(big, odd, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("max_patches", [15, 3])
def test_compiled_encoder_with_padded_slices_gives_the_eager_features(model, split, tmp_path, max_patches):
    # 30 images, chunks of 8, 5 patches each. 15: batches of 3, 3, 2 images (the last padded from 10 to 15
    # patches); 3: one image per batch in slices of 3 and 2 patches (the second padded to 3)
    spec = PatchSpec(mode="random", n=5, scale=(0.2, 0.5), seed=3)
    eager = _run(model, split, spec, tmp_path, max_patches=max_patches, key="eager")["mean"]
    compiled = _run(model, split, spec, tmp_path, max_patches=max_patches, key="compiled", compile_model=True)["mean"]
    np.testing.assert_allclose(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_float16_central_crops_and_float32_patches_share_one_compilation(model):
    """On CUDA under bf16 the central view's crops are float16 and box-filtered patches float32. A pass holding
    both must compile the encoder once (a second compilation cost 2.6 s on one H200), and the central features
    must be the eager forward's of the same float16 crops."""
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (4, 3, 40, 36), dtype=torch.uint8)
    sizes, indices = np.full((4, 2), (40, 36)), np.arange(4)
    encoder = Encoder(model, "embedding")
    central, patches = PatchSpec(mode="central", out_size=32), PatchSpec(mode="random", n=3, out_size=32)
    compiled = ExtractSettings(device=CPU, max_patches=12, compile_model=True)
    eager_central = PatchRunner(encoder, central, ExtractSettings(device=CPU, max_patches=12), pad=True)
    compiled_central = PatchRunner(encoder, central, compiled, pad=True)
    for runner in (eager_central, compiled_central):
        runner.crop_dtype = torch.float16  # as on CUDA under bf16 (this CPU would crop in float32)
    got = compiled_central(pixels, sizes, indices)
    with torch._dynamo.config.patch(error_on_recompile=True):
        PatchRunner(encoder, patches, compiled, pad=True)(pixels, sizes, indices)
    torch.testing.assert_close(got, eager_central(pixels, sizes, indices), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_the_compiled_encoder_is_frozen_its_weights_constants_of_the_graph(tiny_checkpoint):
    """Inductor's freezing folds the weights into the compiled graph (the speed-up measured on the GPU): the
    compiled encoder gives the eager features, and a weight changed after its first call no longer reaches it,
    which only a frozen graph does (extraction never changes weights after compiling)."""
    encoder = Encoder(load_model("tiny_cifar", checkpoint=str(tiny_checkpoint)), "embedding").eval()
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255
    with torch.inference_mode():
        eager = encoder(x)
        np.testing.assert_allclose(encoder.compiled()(x).numpy(), eager.numpy(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        next(encoder.parameters()).mul_(3.0)
    with torch.inference_mode():
        assert not torch.allclose(encoder(x), eager, atol=1e-4)
        np.testing.assert_allclose(encoder.compiled()(x).numpy(), eager.numpy(), atol=1e-5, rtol=1e-5)


def test_interrupted_extraction_resumes_to_identical_features(model, split, tmp_path):
    spec = PatchSpec(mode="random", n=4, seed=1)
    expected = _run(model, split, spec, tmp_path, key="whole")["mean"]
    calls = []

    def die_in_the_second_chunk(images: int, patches: int) -> None:
        calls.append(images)
        if len(calls) == 3:  # two batches make a chunk: the first chunk is stored, the second is cut
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(model, split, spec, tmp_path, key="cut", max_patches=16, progress=die_in_the_second_chunk)
    store = FeatureStore(tmp_path, "cut-mean")
    writer = store.writer(labels=split.labels, dim=model.embed_dim, dtype="float32", chunk_rows=8, meta={})
    assert 0 < len(writer.pending_chunks()) < writer.num_chunks
    resumed = _run(model, split, spec, tmp_path, key="cut", max_patches=16)["mean"]
    np.testing.assert_array_equal(resumed, expected)


def test_forward_slices_run_on_across_batches_and_only_the_last_is_padded(model):
    """Batches of 1, 3 and 2 images (3 patches each, 18 in all) through slices of 7: two full slices and a last
    of 4 padded by 3; each batch hands out exactly the images completed so far; the features equal one
    unpadded forward of all six images."""
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    sizes = np.full((6, 2), 32)
    spec = PatchSpec(mode="random", n=3, out_size=32)
    encoder = Encoder(model, "embedding")
    runner = PatchRunner(encoder, spec, ExtractSettings(device=CPU, max_patches=7), pad=True)
    blocks = [runner.feed(pixels[lo:hi], sizes[lo:hi], np.arange(lo, hi)) for lo, hi in ((0, 1), (1, 4), (4, 6))]
    blocks.append(runner.finish())
    # 3 patches cut (none forwarded), then 12 (7 forwarded: 2 images), then 18 (14: 4 images), then the rest
    assert [0 if b is None else len(b) for b in blocks] == [0, 2, 2, 2]
    assert runner.padded == 3
    whole = PatchRunner(encoder, spec, ExtractSettings(device=CPU, max_patches=1000), pad=False)
    expected = whole(pixels, sizes, np.arange(6))
    torch.testing.assert_close(torch.cat([b for b in blocks if b is not None]), expected, rtol=1e-5, atol=1e-5)
    assert whole.padded == 0


def test_slices_reach_the_encoder_in_the_layout_chosen_and_the_features_do_not_depend_on_it(model):
    """Eager CUDA forwards take channels-last slices, compiled ones (and CPUs) the crops as cut; whichever layout
    a slice is assembled in (one piece, or pieces plus padding), the encoder sees it so and returns the same rows."""
    cuda = torch.device("cuda")
    assert input_layout(cuda, compiled=False) == torch.channels_last
    assert input_layout(cuda, compiled=True) == input_layout(CPU, compiled=False) == torch.contiguous_format
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    sizes, spec = np.full((4, 2), 32), PatchSpec(mode="random", n=3, out_size=32)
    encoder = Encoder(model, "embedding")
    rows = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        for max_patches in (12, 5):  # one piece per slice; several pieces and a padded last slice
            seen = []
            runner = PatchRunner(encoder, spec, ExtractSettings(device=CPU, max_patches=max_patches), pad=True)
            runner.layout = layout
            runner.forward = lambda x, seen=seen, fmt=layout: (
                seen.append(x.is_contiguous(memory_format=fmt)) or encoder(x)
            )
            rows[layout, max_patches] = runner(pixels, sizes, np.arange(4))
            assert seen and all(seen)
    for got in rows.values():
        torch.testing.assert_close(got, rows[torch.contiguous_format, 12], rtol=1e-5, atol=1e-5)


def test_the_rate_after_the_first_forward_leaves_out_its_start_up():
    stats = ExtractStats(images=100, patches=1000, seconds=10.0, first_forward_at=None, first_forward=(1.0, 10, 100))
    assert stats.after_first_forward() == {"images_per_s": 10.0, "forwarded_patches_per_s": 100.0}
    assert ExtractStats(10, 100, 1.0, None, (1.0, 10, 100)).after_first_forward() is None


def test_a_pass_over_files_cut_into_many_padding_groups_gives_the_features_of_one_group(model, tmp_path, monkeypatch):
    """Mixed-size files: with a tiny padding bound every image is a group of its own; the slices run on across
    the groups and the chunks (5 images each), so the stored features are those of whole batches."""
    from PIL import Image

    from ssl_patchbench.features import extract as extract_module

    rng = np.random.default_rng(0)
    for i in range(12):
        folder = tmp_path / "d" / "train" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        shape = (int(rng.integers(33, 60)), int(rng.integers(33, 60)), 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i}.png")
    split = open_split("folder", "train", data_dir=tmp_path / "d", cache_dir=tmp_path / "cache")
    assert split.paths is not None  # decoded from the files during the pass
    spec = PatchSpec(mode="random", n=3, out_size=32)
    whole = _run(model, split, spec, tmp_path, key="whole", chunk_rows=5, max_patches=7)["mean"]
    monkeypatch.setattr(extract_module, "_PADDED_MAX_BYTES", 1)
    assert len(extract_module._bounded(split, np.arange(12))) == 12
    apart = _run(model, split, spec, tmp_path, key="apart", chunk_rows=5, max_patches=7)["mean"]
    np.testing.assert_allclose(apart, whole, rtol=1e-5, atol=1e-5)


def test_out_of_memory_halves_the_slices_and_loses_no_patch(model):
    """A forward that runs out of memory above 4 patches: the slices halve from 16 to 4, every patch is still
    forwarded once, in order, and the features equal an unhindered run's."""
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    sizes = np.full((5, 2), 32)
    spec = PatchSpec(mode="random", n=3, out_size=32)
    encoder = Encoder(model, "embedding")
    expected = PatchRunner(encoder, spec, ExtractSettings(device=CPU, max_patches=1000))(pixels, sizes, np.arange(5))
    runner = PatchRunner(encoder, spec, ExtractSettings(device=CPU, max_patches=16), pad=True)
    seen: list[int] = []

    def scarce(crops: torch.Tensor) -> torch.Tensor:
        seen.append(len(crops))
        if len(crops) > 4:
            raise torch.cuda.OutOfMemoryError("simulated")
        return encoder(crops)

    runner.forward = scarce
    got = runner(pixels, sizes, np.arange(5))
    assert runner.max_patches == 4 and seen[:3] == [16, 8, 4]
    assert runner.slices == 4 and runner.padded == 1  # 15 patches in slices of 4: the last holds 3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_decoded_batches_hold_at_least_the_decoders_fewest_images(model, split, tmp_path):
    """A 4-patch pass in slices of 8 forwards 2 images a slice; with ``fewest=5`` (the nvJPEG decoder's minimum
    is 1,024) each decoded batch still holds 5 images, the stretch of all 30 images (chunks of 8) ends on exactly
    one batch marked last, and every image is planned once, in order."""
    spec = PatchSpec(mode="random", n=4, out_size=32)
    writer = FeatureStore(tmp_path, "plan").writer(labels=split.labels, dim=8, dtype="float32", chunk_rows=8, meta={})
    runner = PatchRunner(Encoder(model, "embedding"), spec, ExtractSettings(device=CPU, max_patches=8))
    stretches = _stretches([[Target(spec, {Aggregation(): writer}, ExtractSettings(device=CPU))]], (0, 1))
    assert len(split) == 30
    for fewest, sizes in ((1, [2] * 15), (5, [5] * 6)):
        planned = list(_plan(split, stretches, [runner], writer, fewest))
        assert [len(batch) for _, batch in planned] == sizes
        assert [last for (_, last), _ in planned] == [False] * (len(sizes) - 1) + [True]
        np.testing.assert_array_equal(np.concatenate([batch for _, batch in planned]), np.arange(len(split)))
