"""One pass per split (every representation cut from one decoded copy; nested bags share forwards) and the
multi-process decoder (same features as decoding in this process; padding of mixed sizes never read)."""

import io
import logging
import math
import multiprocessing
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.data.batches import (
    _for_nvjpeg,
    _read,
    join_padded,
    nvjpeg_batches,
    nvjpeg_decode,
    pad_chw,
    pad_numpy,
    process_pieces,
    read_shares,
)
from ssl_patchbench.data.datasets import ImageSplit, open_split
from ssl_patchbench.data.decode import decode, image_size, jpeg_header
from ssl_patchbench.features.extract import ExtractSettings, Target, extract, extract_pass
from ssl_patchbench.features.store import FeatureStore, StoreWriter
from ssl_patchbench.models.encoder import Encoder
from ssl_patchbench.models.loading import load_model
from ssl_patchbench.results.store import read_records
from ssl_patchbench.sampling.aggregate import Aggregation
from ssl_patchbench.sampling.patches import PatchSpec

from .clitools import model_args, run_cli

CPU = torch.device("cpu")
SLIDING = PatchSpec(mode="sliding", size=16, stride=8, out_size=32)
SPECS = {
    PatchSpec(mode="central", out_size=32): ("mean",),
    PatchSpec(mode="random", n=2, scale=(0.2, 0.5), seed=4): ("mean",),
    PatchSpec(mode="random", n=5, scale=(0.2, 0.5), seed=4): ("mean", "concat"),
    SLIDING: ("mean", "gridpool:2:1"),
}


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint):
    return Encoder(load_model("tiny_cifar", checkpoint=tiny_checkpoint), "embedding")


@pytest.fixture(scope="module")
def split(cifar_dir):
    return open_split("cifar10", "test", data_dir=cifar_dir, per_class=2)  # 20 files, decoded per batch


def _writers(encoder, split, spec, aggs, root, key, chunk_rows=8, dim=None):
    return {
        Aggregation.parse(a): FeatureStore(root, f"{key}-{spec.mode}{spec.num_patches}-{a}").writer(
            labels=split.labels,
            dim=Aggregation.parse(a).output_dim(dim or encoder.dim, spec),
            dtype="float32",
            chunk_rows=chunk_rows,
            meta={},
        )
        for a in aggs
    }


def _features(writers):
    return {agg.label: np.array(w.features) for agg, w in writers.items()}


def test_one_pass_gives_each_representations_own_features_and_forwards_nested_bags_once(encoder, split, tmp_path):
    settings = ExtractSettings(device=CPU)
    alone = {}
    for spec, aggs in SPECS.items():
        writers = _writers(encoder, split, spec, aggs, tmp_path, "alone")
        extract(encoder, split, spec, writers, settings)
        alone[spec] = _features(writers)
    targets = [
        Target(spec, _writers(encoder, split, spec, aggs, tmp_path, "pass"), settings) for spec, aggs in SPECS.items()
    ]
    forwarded = []
    stats = extract_pass(encoder, split, targets, progress=lambda images, patches: forwarded.append(patches))
    for target in targets:
        for label, features in _features(target.writers).items():
            np.testing.assert_allclose(features, alone[target.spec][label], atol=1e-5, rtol=1e-5)
    # central 1 + the 5-patch bag (the 2-patch bag is its prefix) + 9 sliding windows, per image
    assert sum(forwarded) == stats.patches == len(split) * (1 + 5 + SLIDING.num_patches)


def test_both_spaces_of_a_spec_come_from_one_backbone_forward(tiny_checkpoint, split, tmp_path):
    model = load_model("tiny_cifar", checkpoint=tiny_checkpoint)
    settings = ExtractSettings(device=CPU)
    central, bag = PatchSpec(mode="central", out_size=32), PatchSpec(mode="random", n=3, scale=(0.2, 0.5), seed=4)
    both = Encoder(model, ("embedding", "projection"))
    assert both.dim == model.embed_dim + model.projection_dim
    forwarded = []
    hook = both.backbone.register_forward_pre_hook(lambda module, args: forwarded.append(len(args[0])))
    targets = [
        Target(
            spec, _writers(both, split, spec, aggs, tmp_path, f"both-{space}", dim=both.dims[space]), settings, space
        )
        for space in ("embedding", "projection")
        for spec, aggs in ((central, ("mean",)), (bag, ("mean", "concat")))
    ]
    extract_pass(both, split, targets)
    hook.remove()
    assert sum(forwarded) == len(split) * (1 + 3)  # the projection columns cost no backbone forward of their own
    for target in targets:
        alone_encoder = Encoder(model, target.space)
        alone = _writers(alone_encoder, split, target.spec, ("mean", "concat"), tmp_path, f"alone-{target.space}")
        extract(alone_encoder, split, target.spec, alone, settings)
        for label, features in _features(target.writers).items():
            np.testing.assert_allclose(features, _features(alone)[label], atol=1e-5, rtol=1e-5)
    h, z = (_features(t.writers)["mean"] for t in targets if t.spec == central)
    with torch.no_grad():  # independent: the checkpoint's projector applied to the stored embedding
        np.testing.assert_allclose(z, model.projector(torch.from_numpy(h)).numpy(), atol=1e-4, rtol=1e-4)


def test_one_pass_fills_only_the_pending_chunks_of_each_store(encoder, split, tmp_path):
    settings = ExtractSettings(device=CPU)
    central, bag = PatchSpec(mode="central", out_size=32), PatchSpec(mode="random", n=3, seed=1)
    done = _writers(encoder, split, central, ("mean",), tmp_path, "done")
    extract(encoder, split, central, done, settings)
    expected_central = _features(done)["mean"]
    reopened = _writers(encoder, split, central, ("mean",), tmp_path, "done")  # all 3 chunks verified
    assert next(iter(reopened.values())).pending_chunks() == []
    fresh = _writers(encoder, split, bag, ("mean",), tmp_path, "fresh")
    stats = extract_pass(encoder, split, [Target(central, reopened, settings), Target(bag, fresh, settings)])
    assert stats.patches == len(split) * 3  # nothing forwarded for the complete store
    np.testing.assert_array_equal(_features(reopened)["mean"], expected_central)


@pytest.fixture(scope="module")
def mixed_split(tmp_path_factory):
    """Eight JPEGs of different sizes (a batch pads them to its largest), smooth content."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(40, 52), (64, 48), (33, 90), (70, 70), (48, 36), (90, 41), (50, 50), (37, 61)]):
        yy, xx = np.mgrid[0:h, 0:w]
        image = np.stack([(xx * 4 + i * 20) % 256, (yy * 3) % 256, rng.integers(0, 256, (h, w))], axis=-1)
        path = root / f"{i}.jpg"
        Image.fromarray(image.astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    labels = np.arange(8) % 2
    return ImageSplit(labels=labels, classes=["a", "b"], identity={"n": 8}, paths=paths)


@pytest.mark.slow
def test_worker_processes_decode_exactly_what_this_process_decodes(encoder, mixed_split, tmp_path):
    spec = PatchSpec(mode="random", n=3, scale=(0.2, 0.6), seed=2)
    got = {}
    for workers in (0, 2):
        writers = _writers(encoder, mixed_split, spec, ("concat",), tmp_path, f"w{workers}", chunk_rows=3)
        extract(encoder, mixed_split, spec, writers, ExtractSettings(device=CPU, decode_workers=workers))
        got[workers] = _features(writers)["concat"]
    np.testing.assert_array_equal(got[2], got[0])


def test_padding_a_batch_of_mixed_sizes_changes_no_feature(encoder, mixed_split, tmp_path):
    spec = PatchSpec(mode="random", n=3, scale=(0.5, 1.0), seed=2)  # large boxes reach the images' edges
    got = {}
    for max_patches in (3, 100):  # one image per batch (no padding) / all eight in one padded batch
        writers = _writers(encoder, mixed_split, spec, ("concat",), tmp_path, f"p{max_patches}")
        settings = ExtractSettings(device=CPU, max_patches=max_patches, decode_workers=0)
        extract(encoder, mixed_split, spec, writers, settings)
        got[max_patches] = _features(writers)["concat"]
    np.testing.assert_allclose(got[100], got[3], atol=1e-5, rtol=1e-5)


def test_file_headers_are_read_as_the_decoding_goes_not_before_the_first_batch(
    encoder, mixed_split, tmp_path, monkeypatch
):
    """The pass plans its padding groups from file headers batch by batch, as the decoder draws them: when the
    first batch is done only about one batch of headers has been read (on ImageNet, reading all 1.28M first
    would delay the first result), and every header is read once in all."""
    read: list[int] = []
    sizes = ImageSplit.sizes

    def counted(self, indices):
        read.extend(np.asarray(indices).tolist())
        return sizes(self, indices)

    monkeypatch.setattr(ImageSplit, "sizes", counted)
    seen_at_first: list[int] = []

    def progress(images: int, patches: int) -> None:
        if not seen_at_first:
            seen_at_first.append(len(read))

    spec = PatchSpec(mode="random", n=3, scale=(0.2, 0.6), seed=2)
    writers = _writers(encoder, mixed_split, spec, ("mean",), tmp_path, "lazy", chunk_rows=8)
    settings = ExtractSettings(device=CPU, max_patches=3, decode_workers=0)  # one image per batch
    extract(encoder, mixed_split, spec, writers, settings, progress=progress)
    assert seen_at_first[0] <= 2 < len(mixed_split)
    assert sorted(read) == list(range(len(mixed_split)))


def _with_a_truncated_jpeg(mixed_split, tmp_path) -> list[str]:
    """The first 7 files of ``mixed_split`` and, last, the first half of its 4th (``broken.jpg``)."""
    broken = tmp_path / "broken.jpg"
    data = Path(mixed_split.paths[3]).read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    return [*mixed_split.paths[:7], str(broken)]


def test_a_truncated_jpeg_is_one_error_naming_it(encoder, mixed_split, tmp_path):
    paths = _with_a_truncated_jpeg(mixed_split, tmp_path)
    split = ImageSplit(labels=mixed_split.labels, classes=mixed_split.classes, identity={}, paths=paths)
    spec = PatchSpec(mode="central", out_size=32)
    writers = _writers(encoder, split, spec, ("mean",), tmp_path, "broken")
    with pytest.raises(UserError, match=r"broken\.jpg"):
        extract(encoder, split, spec, writers, ExtractSettings(device=CPU, decode_workers=2))


def test_a_decoding_error_stops_the_worker_processes_before_it_reaches_the_caller(mixed_split, tmp_path):
    paths = _with_a_truncated_jpeg(mixed_split, tmp_path)
    before = set(multiprocessing.active_children())
    with pytest.raises(UserError, match=r"broken\.jpg"):
        list(process_pieces(paths, [np.arange(4), np.arange(4, 8)], workers=2))
    # pytest keeps the error, whose traceback holds the generator's frame: the workers must not wait for it
    assert set(multiprocessing.active_children()) <= before


def test_jpeg_header_gives_pils_size_and_components(mixed_split, tmp_path):
    grey = tmp_path / "grey.jpg"
    Image.new("L", (31, 17), 128).save(grey)
    progressive = tmp_path / "progressive.jpg"
    Image.open(mixed_split.paths[2]).save(progressive, progressive=True)
    for path in [*mixed_split.paths, str(grey), str(progressive)]:
        with Image.open(path) as im:
            expected = (im.height, im.width, len(im.getbands()))
        assert jpeg_header(Path(path).read_bytes()) == expected
    assert jpeg_header(b"\x89PNG\r\n\x1a\n....") is None


def test_image_size_reads_jpeg_frame_headers_as_pillow_and_refuses_a_bomb(mixed_split, tmp_path, monkeypatch):
    """A JPEG's size comes from its frame header (Pillow is not asked); a PNG named .jpg, a frame header behind
    more metadata than the first bytes read, and a missing file go through Pillow, with its size or its error;
    a header over the pixel limit is refused before anything is decoded."""
    seen = []
    real = Image.open
    monkeypatch.setattr("ssl_patchbench.data.decode.Image.open", lambda *a, **k: seen.append(a[0]) or real(*a, **k))
    png = tmp_path / "png.jpg"
    Image.new("RGB", (13, 9)).save(png, format="PNG")
    commented = tmp_path / "commented.jpg"  # a 6,000-byte comment segment before the frame header
    raw = Path(mixed_split.paths[0]).read_bytes()
    commented.write_bytes(raw[:2] + b"\xff\xfe" + (6002).to_bytes(2, "big") + b"x" * 6000 + raw[2:])
    for path in [*mixed_split.paths, str(png), str(commented)]:
        with real(path) as im:
            assert image_size(path) == (im.height, im.width)
    assert seen == [str(png), str(commented)]  # the eight plain JPEGs never reached Pillow
    order = np.array([5, 0, 7, 2, 2, 6, 1, 3, 4])  # in shares of the pool's threads, back in this order
    expected = []
    for i in order:
        with real(mixed_split.paths[i]) as im:
            expected.append((im.height, im.width))
    np.testing.assert_array_equal(mixed_split.sizes(order), expected)
    with pytest.raises(UserError, match=r"cannot read image .*missing\.jpg"):
        image_size(str(tmp_path / "missing.jpg"))
    at = raw.index(b"\xff\xc0") + 5  # baseline frame header: length (2), precision (1), then height, width
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(raw[:at] + (20000).to_bytes(2, "big") + (20000).to_bytes(2, "big") + raw[at + 4 :])
    with pytest.raises(UserError, match=r"bomb\.jpg is 20000x20000 px"):
        image_size(str(bomb))


def test_nvjpeg_takes_only_whole_three_component_jpegs_and_reads_them_as_pil_does(mixed_split, tmp_path):
    """The nvJPEG routing reads a file as uint8 (``_read``) and sends grey, truncated and non-JPEG files to the
    CPU decoder; a frame header behind metadata larger than the first bytes read is still found."""
    good = mixed_split.paths[0]
    data = _read(good)
    assert data.dtype == torch.uint8 and data.numpy().tobytes() == Path(good).read_bytes()
    assert _for_nvjpeg(good, data)
    grey = tmp_path / "grey.jpg"
    Image.new("L", (31, 17), 128).save(grey)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(Path(good).read_bytes()[:-600])
    png = tmp_path / "image.jpg"
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    for path in (grey, truncated, png):
        assert not _for_nvjpeg(str(path), _read(str(path)))
    commented = tmp_path / "commented.jpg"  # a 6,000-byte comment segment before the frame header
    raw = Path(good).read_bytes()
    comment = b"\xff\xfe" + (6002).to_bytes(2, "big") + b"x" * 6000
    commented.write_bytes(raw[:2] + comment + raw[2:])
    assert _for_nvjpeg(str(commented), _read(str(commented)))
    with Image.open(commented) as im:
        assert im.size == Image.open(good).size


def test_files_read_in_shares_come_back_whole_and_in_order(mixed_split):
    from concurrent.futures import ThreadPoolExecutor

    paths = [*mixed_split.paths, mixed_split.paths[0]]  # 9 files: shares of 3, 3 and 3 for 4 readers
    with ThreadPoolExecutor(max_workers=4) as readers:
        got = [data for share in read_shares(readers, paths) for data in share.result()]
    assert [d.numpy().tobytes() for d in got] == [Path(p).read_bytes() for p in paths]
    with ThreadPoolExecutor(max_workers=4) as readers:
        assert read_shares(readers, []) == []


def test_files_read_and_checked_in_shares_say_which_go_to_nvjpeg(mixed_split, tmp_path, monkeypatch):
    """The decoder's readers also run the nvJPEG check, each file's verdict beside its bytes; a file over the
    pixel limit is the check's error, raised where the share is collected."""
    from concurrent.futures import ThreadPoolExecutor

    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(Path(mixed_split.paths[0]).read_bytes()[:-600])
    paths = [mixed_split.paths[0], str(truncated), *mixed_split.paths[1:3]]
    with ThreadPoolExecutor(max_workers=4) as readers:
        got = [pair for share in read_shares(readers, paths, check=True) for pair in share.result()]
    assert [ok for _, ok in got] == [True, False, True, True]
    assert [d.numpy().tobytes() for d, _ in got] == [Path(p).read_bytes() for p in paths]
    monkeypatch.setattr("ssl_patchbench.data.decode.MAX_PIXELS", 100)
    with ThreadPoolExecutor(max_workers=4) as readers, pytest.raises(UserError, match=r"0\.jpg"):
        [share.result() for share in read_shares(readers, paths, check=True)]


class _NoStream:
    """Stands in for a CUDA stream or event where the test runs the nvJPEG decoder's threads on the CPU."""

    cuda_stream = 0

    def __init__(self, *_args) -> None:
        pass

    def wait_event(self, _event) -> None:
        pass

    def record(self, _stream=None) -> None:
        pass


@pytest.fixture
def cpu_streams(monkeypatch):
    """CUDA's streams and events stubbed: the GPU decoders' threads run on the CPU."""
    from contextlib import nullcontext

    monkeypatch.setattr(torch.cuda, "Stream", _NoStream)
    monkeypatch.setattr(torch.cuda, "Event", _NoStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda _stream: nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", _NoStream)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)


@pytest.mark.filterwarnings("error:The given NumPy array is not writable")  # the grey file's CPU fallback
def test_the_nvjpeg_decoders_threads_give_each_batch_in_order_padded_and_name_a_bad_file(
    mixed_split, tmp_path, cpu_streams
):
    """The planner, reader and decoding threads of ``nvjpeg_batches`` run on the CPU (torchvision's CPU decoder in
    nvJPEG's place, CUDA's streams and events stubbed): every batch comes back in the order drawn, as the files
    decoded one by one and edge-padded, a grey JPEG through the CPU decoder; a truncated file is its error line."""
    from torchvision.io import ImageReadMode, decode_jpeg

    grey = tmp_path / "grey.jpg"
    Image.new("L", (31, 17), 99).save(grey)
    paths = [*mixed_split.paths, str(grey)]
    batches = [np.array([0, 1, 2]), np.array([8, 3]), np.array([4, 5, 6, 7])]
    got = list(nvjpeg_batches(paths, iter(batches), torch.device("cpu")))
    assert len(got) == len(batches)
    for indices, (pixels, sizes) in zip(batches, got, strict=True):
        images = [
            torch.tensor(decode(paths[i])).permute(2, 0, 1)
            if paths[i] == str(grey)
            else decode_jpeg(torch.from_numpy(np.fromfile(paths[i], dtype=np.uint8)), mode=ImageReadMode.RGB)
            for i in indices
        ]
        expected, expected_sizes = pad_numpy([im.permute(1, 2, 0).numpy() for im in images])
        np.testing.assert_array_equal(pixels.permute(0, 2, 3, 1).numpy(), expected.numpy())
        np.testing.assert_array_equal(sizes, expected_sizes)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(Path(paths[0]).read_bytes()[:300])
    with pytest.raises(UserError, match=r"truncated\.jpg"):
        list(nvjpeg_batches([*paths, str(truncated)], iter([np.array([0, 1]), np.array([9, 2])]), torch.device("cpu")))


def test_a_refused_jpeg_sends_only_itself_to_the_cpu_decoder(monkeypatch):
    """nvJPEG fails a whole call for one JPEG it cannot decode: the call is split until only the refused images
    are left to the CPU decoder (None), every other image decoded, in order, in a few calls."""
    import torchvision.io

    calls = []

    def fake_decode_jpeg(datas, mode, device):
        calls.append(len(datas))
        if any(int(d[0]) == 0 for d in datas):
            raise RuntimeError("Error while decoding JPEG images")
        return [d.view(1, 1, 1).expand(3, 1, 1) for d in datas]

    monkeypatch.setattr(torchvision.io, "decode_jpeg", fake_decode_jpeg)
    datas = [torch.tensor([v], dtype=torch.uint8) for v in (5, 0, *range(1, 60), 0)]
    got = nvjpeg_decode(datas, torch.device("cpu"))
    assert [i for i, image in enumerate(got) if image is None] == [1, len(datas) - 1]
    assert all(int(image[2, 0, 0]) == int(d[0]) for image, d in zip(got, datas, strict=True) if image is not None)
    assert calls[0] == len(datas) and len(calls) <= 4 * math.ceil(math.log2(len(datas))) + 1


def _fake_nvimgcodec(refuse: bytes = b"", fail: str = "") -> types.ModuleType:
    """nvImageCodec's API as ``hardware_decode`` uses it, the JPEG engines played by Pillow (whose pixels they
    match to within one level): ``refuse``: a bitstream containing these bytes comes back as None;
    ``fail``: making a decoder raises this, as on a GPU without JPEG engines."""
    module = types.ModuleType("nvidia.nvimgcodec")
    module.BackendKind = types.SimpleNamespace(HW_GPU_ONLY="hw")
    module.Backend = lambda kind: kind
    module.CodeStream = lambda array: array.tobytes()
    module.calls = []

    class Decoder:
        def __init__(self, device_id, backends):
            if fail:
                raise RuntimeError(fail)
            assert backends == ["hw"]

        def decode(self, streams, cuda_stream):
            module.calls.append(len(streams))
            return [
                None if refuse and refuse in data else np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                for data in streams
            ]

    module.Decoder = Decoder
    return module


def _use_nvimgcodec(monkeypatch, module: types.ModuleType | None) -> None:
    from ssl_patchbench.data import batches

    monkeypatch.setitem(sys.modules, "nvidia", types.ModuleType("nvidia"))
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", module)  # None: the import fails
    monkeypatch.setattr(batches, "_HARDWARE_DECODERS", {})


def test_the_hardware_decoders_batches_are_its_images_padded_and_a_refused_one_is_pils(
    mixed_split, monkeypatch, cpu_streams
):
    """``--decode hw`` runs the nvJPEG thread with the JPEG engines' call in nvJPEG's place: every batch comes
    back in order as the engines' images (``[H, W, 3]``, read as ``[3, H, W]``) edge-padded, and an image they
    refuse is decoded by Pillow in its place."""
    paths = mixed_split.paths
    refused = Path(paths[5]).read_bytes()[-40:]  # bytes of file 5's entropy-coded data, in no other file
    assert not any(refused in Path(p).read_bytes() for i, p in enumerate(paths) if i != 5)
    engines = _fake_nvimgcodec(refuse=refused)
    _use_nvimgcodec(monkeypatch, engines)
    batches = [np.array([5, 0, 2]), np.array([7, 1, 3, 4, 6])]
    got = list(nvjpeg_batches(paths, iter(batches), torch.device("cpu"), hardware=True))
    for indices, (pixels, sizes) in zip(batches, got, strict=True):
        expected, expected_sizes = pad_numpy([decode(paths[i]) for i in indices])
        np.testing.assert_array_equal(pixels.permute(0, 2, 3, 1).numpy(), expected.numpy())
        np.testing.assert_array_equal(sizes, expected_sizes)
    assert engines.calls == [3, 5]  # one call per batch


def test_decode_hw_without_nvimgcodec_or_jpeg_engines_is_one_error_line(monkeypatch):
    from ssl_patchbench.data.batches import hardware_decoder

    _use_nvimgcodec(monkeypatch, None)
    with pytest.raises(UserError, match=r"--decode hw needs nvImageCodec: pip install -e '\.\[hw-jpeg-cu1[23]\]'"):
        hardware_decoder(torch.device("cuda"))
    _use_nvimgcodec(monkeypatch, _fake_nvimgcodec(fail="Could not create decoder"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla T4")
    with pytest.raises(UserError, match=r"Tesla T4 has no hardware JPEG decoder .*use --decode gpu"):
        hardware_decoder(torch.device("cuda"))


def test_the_decoder_follows_the_decode_setting_the_device_and_the_files(mixed_split, tmp_path):
    from ssl_patchbench.features.extract import decoder

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [decoder(mixed_split, cuda, decode=d) for d in ("cpu", "gpu", "hw")] == ["processes", "nvjpeg", "nvjpeg-hw"]
    assert decoder(mixed_split, cpu, decode="hw") == "processes"
    png = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(png)
    with_png = ImageSplit(
        labels=np.arange(9) % 2, classes=["a", "b"], identity={}, paths=[*mixed_split.paths, str(png)]
    )
    assert decoder(with_png, cuda, decode="hw") == "processes"


def test_an_unreadable_file_for_nvjpeg_is_the_cpu_paths_error_line(tmp_path):
    with pytest.raises(UserError, match=r"cannot read image .*missing\.jpg: No such file or directory"):
        _read(str(tmp_path / "missing.jpg"))


def test_a_rerun_on_complete_stores_is_marked_reused_and_claims_no_extraction(
    capsys, monkeypatch, caplog, tiny_checkpoint, cifar_dir, tmp_path
):
    args = ["eval", *model_args(tiny_checkpoint, cifar_dir), "--patches", "central,2,4", "--eval", "knn"]
    args += ["--train-per-class", "3", "--test-per-class", "2", "--home", str(tmp_path), "--json"]
    assert run_cli(capsys, monkeypatch, *args)[0] == 0
    with caplog.at_level(logging.WARNING):
        assert run_cli(capsys, monkeypatch, *args)[0] == 0
    first, second = read_records(tmp_path / "results.jsonl")[:3], read_records(tmp_path / "results.jsonl")[3:]
    assert [r["representation"] for r in second] == ["central", "2", "4"]
    for old, new in zip(first, second, strict=True):
        assert not old["reused_features"] and new["reused_features"]
        assert old["timings"]["extraction_train"]["pass"]["representations"] == ["central", "2", "4"]
        assert old["timings"]["extraction_train"]["pass"]["forwarded_patches"] == 30 * (1 + 4)  # 2 nests in 4
        assert new["timings"]["extraction_train"] is None and new["timings"]["extraction_test"] is None
        assert new["metrics"] == old["metrics"]
    assert caplog.text.count("reused cached features") == 3


def test_batches_that_straddle_chunks_and_a_resumed_gap_give_the_same_rows(encoder, split, tmp_path):
    spec = PatchSpec(mode="random", n=5, scale=(0.2, 0.5), seed=4)
    reference = _writers(encoder, split, spec, ("mean",), tmp_path, "ref", chunk_rows=8)
    extract(encoder, split, spec, reference, ExtractSettings(device=CPU))
    expected = _features(reference)["mean"]
    straddling = _writers(encoder, split, spec, ("mean",), tmp_path, "odd", chunk_rows=7)  # batches of 3 images
    extract(encoder, split, spec, straddling, ExtractSettings(device=CPU, max_patches=15))
    np.testing.assert_allclose(_features(straddling)["mean"], expected, atol=1e-5, rtol=1e-5)
    damaged = next(iter(straddling.values())).features
    damaged[7:14] = 0  # chunk 1 of 0..2 damaged: reopened, it is a stretch of one chunk between two done ones
    damaged.flush()
    resumed = _writers(encoder, split, spec, ("mean",), tmp_path, "odd", chunk_rows=7)
    assert next(iter(resumed.values())).pending_chunks() == [1]
    extract(encoder, split, spec, resumed, ExtractSettings(device=CPU, max_patches=15))
    np.testing.assert_allclose(_features(resumed)["mean"], expected, atol=1e-5, rtol=1e-5)


def test_pieces_joined_and_gpu_style_padding_equal_one_edge_padding_of_the_batch(monkeypatch):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(5, 9), (8, 4), (3, 3), (7, 10), (6, 2)]]
    expected, sizes = pad_numpy(images)  # np.pad(mode="edge") of each image to the largest
    height, width = sizes.max(axis=0)
    for i, image in enumerate(images):  # independent check of the reference: every pad pixel is its edge's
        padded = expected[i].numpy()
        np.testing.assert_array_equal(padded[: image.shape[0], : image.shape[1]], image)
        np.testing.assert_array_equal(
            padded[:, image.shape[1] :], np.repeat(padded[:, image.shape[1] - 1 :][:, :1], width - image.shape[1], 1)
        )
    joined, joined_sizes = join_padded([pad_numpy(images[:2]), pad_numpy(images[2:3]), pad_numpy(images[3:])])
    np.testing.assert_array_equal(joined.numpy(), expected.numpy())
    np.testing.assert_array_equal(joined_sizes, sizes)
    chw_images = [torch.from_numpy(im).permute(2, 0, 1) for im in images]
    for elements in (1 << 25, 2 * 3 * 8 * 10, 1):  # the gather in one chunk, in chunks of 2 images, of 1
        monkeypatch.setattr("ssl_patchbench.data.batches._PAD_INDEX_ELEMENTS", elements)
        chw, chw_sizes = pad_chw(chw_images)
        np.testing.assert_array_equal(chw.permute(0, 2, 3, 1).numpy(), expected.numpy())
        np.testing.assert_array_equal(chw_sizes, sizes)
    same = [chw_images[3], chw_images[3].flip(1)]  # equal sizes: nothing to pad
    np.testing.assert_array_equal(pad_chw(same)[0].numpy(), torch.stack(same).numpy())
    assert (height, width) == (8, 10)


def test_a_chunk_that_fails_to_store_stops_the_pass_with_its_error_and_keeps_the_others(
    encoder, split, tmp_path, monkeypatch
):
    """Chunks are stored by a background thread: a failure (here the store's check refusing chunk 1) is still
    the pass's one error, and the chunks stored before it stay done (the next run redoes only chunk 1 and on)."""
    real = StoreWriter.write_chunk

    def refuse_chunk_1(self, chunk, rows):
        if chunk == 1:
            raise UserError("the model returned non-finite (NaN or inf) rows")
        real(self, chunk, rows)

    monkeypatch.setattr(StoreWriter, "write_chunk", refuse_chunk_1)
    spec = PatchSpec(mode="random", n=2, seed=3)
    writers = _writers(encoder, split, spec, ("mean",), tmp_path, "fail", chunk_rows=8)  # 20 images: 3 chunks
    with pytest.raises(UserError, match="non-finite"):
        extract(encoder, split, spec, writers, ExtractSettings(device=CPU, max_patches=4, decode_workers=0))
    (writer,) = writers.values()
    assert 0 not in writer.pending_chunks() and 1 in writer.pending_chunks()
