"""The analyses on the tiny model: properties that must hold whatever the weights are."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from ssl_patchbench.analysis import converge, heatmap, neighbors, scales
from ssl_patchbench.analysis.embed import PatchEmbedder, open_inputs
from ssl_patchbench.core.errors import UserError

from .clitools import model_args, run_cli
from .factories import scale_record


@pytest.fixture(scope="module")
def inputs(tiny_checkpoint, cifar_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("home")
    return open_inputs(
        model="tiny_cifar",
        checkpoint=str(tiny_checkpoint),
        dataset="cifar10",
        data_dir=str(cifar_dir),
        per_class=3,
        root=root,
    )


@pytest.fixture(scope="module")
def embedder(inputs):
    return PatchEmbedder(inputs.model, torch.device("cpu"))


def test_default_counts_end_with_all_windows():
    assert converge.default_counts(25) == [1, 2, 4, 8, 16, 25]
    assert converge.default_counts(16) == [1, 2, 4, 8, 16]
    assert converge.default_counts(1) == [1]


def test_converge_reaches_one_against_the_all_patch_mean(inputs, embedder):
    result = converge.run_converge(inputs, embedder, images=np.arange(6), size=16, stride=4)
    table = result.table
    assert set(table.space) == {"embedding", "projection"} and result.windows == 25
    full = table[(table.reference == "all-patch mean") & (table.n_patches == 25)]
    assert np.allclose(full["mean"], 1.0, atol=1e-9) and np.allclose(full["std"], 0.0, atol=1e-9)
    assert ((table["mean"] <= 1 + 1e-9) & (table["q10"] <= table["q90"])).all()


def test_prefix_means_are_nested_and_orders_are_per_image():
    patches = torch.randn(2, 5, 3)
    orders = converge.patch_orders(np.array([7, 8]), 5, seed=1)
    assert (np.sort(orders, axis=1) == np.arange(5)).all()
    assert (orders == converge.patch_orders(np.array([7, 8]), 5, seed=1)).all()
    means = converge.prefix_means(patches, orders, [1, 5])
    assert torch.allclose(means[:, 0], patches[torch.arange(2), torch.from_numpy(orders[:, 0])].double())
    assert torch.allclose(means[:, 1], patches.double().mean(dim=1))


def test_heatmap_query_is_one_and_maps_share_the_grid(inputs, embedder):
    result = heatmap.run_heatmap(inputs, embedder, images=np.array([0, 4]), query=(1, 2), size=16, stride=4)
    assert result.side == 5 and result.query == 7
    for maps in result.maps.values():
        assert maps.shape == (2, 5, 5)
        assert np.allclose(maps[:, 1, 2], 1.0) and (maps <= 1 + 1e-9).all()
    table = result.table()
    assert np.allclose(table[table.is_query].similarity, 1.0) and len(table) == 2 * 2 * 25


def test_heatmap_rejects_a_query_outside_the_grid():
    with pytest.raises(UserError, match="outside"):
        heatmap.query_index((5, 0), 5)


def test_box_iou():
    a = np.array([0.0, 0, 2, 2])
    assert neighbors.box_iou(a, a) == 1.0
    assert neighbors.box_iou(a, np.array([1.0, 0, 3, 2])) == pytest.approx(1 / 3)
    assert neighbors.box_iou(a, np.array([2.0, 2, 4, 4])) == 0.0


def _neighbors(inputs, max_patches):
    emb = PatchEmbedder(inputs.model, torch.device("cpu"), max_patches=max_patches)
    return neighbors.run_neighbors(inputs, emb, images=np.arange(len(inputs.split)), queries=40, k=6, seed=3)


@pytest.fixture(scope="module")
def neighbor_result(inputs):
    return _neighbors(inputs, None)


def test_neighbor_statistics_are_shares_and_exclude_the_query(neighbor_result):
    result = neighbor_result
    for space, found in result.found.items():
        assert (found.index != found.queries[:, None]).all()
        assert (np.diff(found.similarity, axis=1) <= 1e-6).all()
        s = result.stats[space]
        assert s.same_image + s.same_class + s.other_class == pytest.approx(1.0)
        assert 0 <= (s.same_image_mean_iou or 0) <= 1
    assert sum(result.chance[key] for key in ("same_image", "same_class", "other_class")) == pytest.approx(1.0)
    assert all(0 <= s.other_images_same_class <= 1 for s in result.stats.values())
    # 25 windows per image, 30 images: a random other patch is from the same image 24 times in 749
    assert result.chance["same_image"] == pytest.approx(24 / 749)
    assert len(result.table()) == 2 * 40 * 6


def test_neighbor_statistics_are_deterministic_across_runs_and_batch_sizes(inputs, neighbor_result):
    again = _neighbors(inputs, 64)  # another run, with other forward slices
    first, second = neighbor_result.stats_json(), again.stats_json()
    for space in neighbor_result.found:
        assert (neighbor_result.found[space].index == again.found[space].index).all()
        assert np.allclose(neighbor_result.found[space].similarity, again.found[space].similarity, atol=1e-5)
        same, other = first["spaces"][space], second["spaces"][space]
        assert same.pop("mean_similarity") == pytest.approx(other.pop("mean_similarity"), abs=1e-6)
        assert same == other
    assert first["chance"] == second["chance"]


def test_scale_table_groups_by_scale_and_representation_newest_wins(tmp_path):
    records = [
        scale_record([0.08, 1.0], "central", 80.0),
        scale_record([0.2, 0.2], "16", 70.0),
        scale_record([0.2, 0.2], "central", 40.0),
        scale_record([0.2, 0.2], "16", 72.0),
        scale_record([0.2, 0.2], "16", 99.0, space="projection"),
    ]
    table = scales.scale_table(records).table
    assert list(zip(table.scale, table.representation, table.accuracy, strict=True)) == [
        ("0.2", "central", 40.0),
        ("0.2", "16", 72.0),
        ("0.08-1", "central", 80.0),
    ]
    assert table.n_records.tolist() == [1, 2, 1]
    relabelled = scales.scale_table(records, labels={"scale0.2.ckpt": "small"}, metric="knn@20").table
    assert "small" in set(relabelled.scale) and relabelled.accuracy.max() == 79.0
    paths = scales.write_scales(table, tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


def _dated(record: dict, day: int, **over) -> dict:
    return {**record, "environment": {"date": f"2026-12-{day:02d}T10:00:00+00:00"}, **over}


def test_scale_figure_keeps_one_data_split_and_one_checkpoint_per_curve():
    """Issue 17: one curve was drawn from two checkpoints and two subset sizes under a title naming one subset."""
    other = "cd" * 32
    records = [
        _dated(scale_record([0.2, 0.2], "central", 24.0), 1),
        _dated(scale_record([0.2, 0.2], "1", 70.1, n_train=1000, n_test=1000), 2),  # another subset
        _dated(scale_record([0.2, 0.2], "16", 24.0), 3, checkpoint_sha256=other),  # another checkpoint, same scale
        _dated(scale_record([0.2, 0.2], "25", 67.0), 4),
        _dated(scale_record([0.08, 1.0], "central", 50.0), 5, checkpoint_sha256=other),  # another scale: its own curve
    ]
    result = scales.scale_table(records, model="m")
    assert sorted(zip(result.table.scale, result.table.representation, strict=True)) == [
        ("0.08-1", "central"),
        ("0.2", "25"),
        ("0.2", "central"),
    ]
    assert set(result.table.n_train) == {10}
    notes = " ".join(result.notes)
    assert "1 record left out: measured on cifar10, train 1,000 / test 1,000 images" in notes
    assert f"1 record left out: checkpoint {other[:8]}" in notes and "scale 0.2" in notes


def test_scale_figure_counts_a_rerun_on_reused_features_once():
    first = _dated(scale_record([0.2, 0.2], "16", 70.0), 1)
    rerun = _dated(scale_record([0.2, 0.2], "16", 70.0), 2, reused_features=True)
    result = scales.scale_table([first, rerun])
    assert result.table.n_records.tolist() == [1] and "1 rerun(s) on reused cached features" in result.notes[0]
    alone = scales.scale_table([rerun])  # the first run's record is elsewhere: the rerun is all there is
    assert alone.table.n_records.tolist() == [1] and alone.notes == []


def test_scale_table_reads_the_pretraining_crop_and_protocol_1_records():
    new = scale_record([0.5, 0.5], "central", 60.0) | {
        "zoo_entry": {"patch_scale": [0.08, 1.0], "pretrain_crop_scale": [0.3, 0.3]}
    }
    old = scale_record([0.2, 0.2], "central", 50.0)
    assert sorted(scales.scale_table([new, old]).table.scale) == ["0.2", "0.3"]


def test_scale_table_errors_say_what_to_do():
    with pytest.raises(UserError, match="patchbench eval"):
        scales.scale_table([])
    with pytest.raises(UserError, match="--dataset"):
        scales.scale_table([scale_record([0.2], "1", 1.0), scale_record([0.2], "1", 1.0, dataset="stl10")])
    with pytest.raises(UserError, match="KEY=LABEL"):
        scales.parse_labels(("nolabel",))


def test_cli_writes_figures_and_numbers(capsys, monkeypatch, tiny_checkpoint, cifar_dir, tmp_path):
    common = [
        *model_args(tiny_checkpoint, cifar_dir),
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    code, out, err = run_cli(capsys, monkeypatch, "converge", *common, "--per-class", "1")
    assert code == 0, err
    assert "embed 1 central patches/image: 10 images in " in err  # the analyses show their progress too
    code, out, err = run_cli(capsys, monkeypatch, "viz", "neighbors", *common, "--per-class", "2", "--queries", "20")
    assert code == 0, err
    assert re.search(r"^embed \d+ sliding patches/image: 20 images in ", err, re.M)
    assert set(json.loads(out)) == {"embedding", "projection"}
    code, _, err = run_cli(capsys, monkeypatch, "viz", "heatmap", *common, "--images", "0,3", "--query", "0,0")
    assert code == 0, err
    for name in ("converge", "neighbors", "neighbors_stats", "heatmap"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = json.loads((tmp_path / "neighbors_stats.json").read_text())
    assert stats["settings"]["bank_patches"] == 20 * 25


def test_cli_scales_without_records_is_a_user_error(capsys, monkeypatch, tmp_path):
    code, _, err = run_cli(capsys, monkeypatch, "viz", "scales", "--results", str(tmp_path / "none.jsonl"))
    assert code == 2 and err.startswith("error: no results records")


@pytest.mark.slow
def test_help_imports_neither_torch_nor_matplotlib():
    code = (
        "import sys; from ssl_patchbench.cli.main import cli; from click.testing import CliRunner;"
        "CliRunner().invoke(cli, ['viz', '--help']);"
        "print(any(m in sys.modules for m in ('torch', 'matplotlib')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
