import importlib.util
import json

import pandas as pd
import pytest

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.results.records import (
    comparable,
    disagreements,
    dotted,
    export_rows,
    flatten,
    metric_value,
    read_many,
    representation_key,
    select_records,
    subset_note,
)
from ssl_patchbench.results.store import append_record

from .clitools import run_cli
from .factories import record


def test_metric_value_reads_top1_top5_and_missing():
    r = record()
    assert metric_value(r, "knn@20") == 60.0
    assert metric_value(r, "knn@20/top5") == 90.0
    assert metric_value(r, "linear") is None  # not run
    assert metric_value(r, "knn@7") is None


def test_disagreements_ignore_date_and_data_location_but_not_weights_or_data():
    a = record()
    moved = record(environment={"device": "cpu", "torch": "2.4", "date": "2027-05-05T00:00:00+00:00"})
    moved["data"] = json.loads(json.dumps(a["data"]).replace("/x/", "/elsewhere/"))
    assert disagreements([a, moved]) == {"numbers": [], "environment": []}
    other = record(checkpoint_sha256="b" * 64, n_test=50)
    other["data"] = {**a["data"], "test": {**a["data"]["test"], "n": 50, "per_class": 5}}
    found = disagreements([a, other])["numbers"]
    assert {"checkpoint_sha256", "n_test", "data.test.n", "data.test.per_class"} <= set(found)
    gpu = record(environment={"device": "H100", "torch": "2.4", "date": "x"})
    assert disagreements([a, gpu]) == {"numbers": [], "environment": ["device"]}


def test_field_missing_from_an_older_record_is_not_a_disagreement():
    old = record(protocol={"knn": {"ks": [20, 200], "temperature": 0.07}})
    new = record(protocol={"knn": {"ks": [20, 200], "temperature": 0.07, "backend": "auto"}})
    assert disagreements([old, new])["numbers"] == []


def test_representation_key_separates_scales_only_for_random_boxes():
    random = {"mode": "random", "n": 16, "scale": [0.2, 0.2], "ratio": [0.75, 4 / 3], "size": None}
    r02 = record(representation="16", patches=random)
    r08 = record(representation="16", patches={**random, "scale": [0.08, 1.0]})
    assert representation_key(r02) != representation_key(r08)
    central_a = record()
    central_b = record(patches={**central_a["patches"], "scale": [0.2, 0.2]})
    assert representation_key(central_a) == representation_key(central_b)


def test_select_and_flatten(tmp_path):
    path = tmp_path / "r.jsonl"
    sliding = {"mode": "sliding", "n": 1, "size": 16, "stride": 4, "scale": [0.08, 1.0]}
    append_record(path, record())
    append_record(path, record(representation="25", patches=sliding, aggregation="gridpool(3,2)"))
    append_record(path, record(model="tiny_cifar", metrics={"linear": {"top1": 70.0}}))
    records = read_many([path])
    assert all(r["_source"] == str(path) for r in records)
    assert len(select_records(records, model="resnet18_cifar")) == 2
    assert [r["representation"] for r in select_records(records, aggregation="gridpool")] == ["25"]
    assert [r["model"] for r in select_records(records, protocol="linear")] == ["tiny_cifar"]
    assert len(select_records(records, protocol="knn")) == 2
    assert len(select_records(records, checkpoint="AAAA11")) == 3
    assert select_records(records, mode="sliding", dataset="cifar100") == []
    row = flatten(records[1])
    assert row["mode"] == "sliding" and row["size"] == 16 and row["scale"] is None
    assert row["knn@20"] == 60.0 and row["linear"] is None and row["train_per_class"] == 20


def test_export_csv_round_trips_and_parquet_needs_pyarrow(tmp_path, monkeypatch):
    rows = [flatten(record()), flatten(record(representation="1"))]
    out = export_rows(rows, tmp_path / "r.csv")
    frame = pd.read_csv(out)
    assert list(frame["representation"].astype(str)) == ["central", "1"] and frame["knn@20"].tolist() == [60.0, 60.0]
    with pytest.raises(UserError, match="xlsx"):
        export_rows(rows, tmp_path / "r.xlsx")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "pyarrow" else real_find_spec(n, *a))
    with pytest.raises(UserError, match="pip install pyarrow"):
        export_rows(rows, tmp_path / "r.parquet")


def test_results_command_filters_and_exports(capsys, monkeypatch, tmp_path):
    path = tmp_path / "r.jsonl"
    append_record(path, record())
    append_record(path, record(model="tiny_cifar"))
    code, out, err = run_cli(
        capsys, monkeypatch, "results", "--results", str(path), "--model", "tiny_cifar", "--format", "json"
    )
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["model"] for r in rows] == ["tiny_cifar"]
    code, out, err = run_cli(
        capsys, monkeypatch, "results", "--results", str(path), "--export", str(tmp_path / "o.csv")
    )
    assert code == 0 and len(pd.read_csv(tmp_path / "o.csv")) == 2
    code, out, err = run_cli(capsys, monkeypatch, "results", "--results", str(tmp_path / "missing.jsonl"))
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, monkeypatch, "results")  # nothing stored yet in the isolated home
    assert code == 0 and "no results" in err


def test_dotted_flattens_mappings_and_keeps_lists_as_values():
    nested = {"a": {"b": 1, "c": {"d": None, "e": [1, 2]}}, "f": "x", "g": {}}
    assert dotted(nested) == {"a.b": 1, "a.c.d": None, "a.c.e": [1, 2], "f": "x"}  # an empty mapping holds nothing
    assert dotted({}) == {}


def test_comparable_keeps_the_largest_agreeing_group_and_says_why_the_rest_is_out():
    bulk = [record(representation=r) for r in ("central", "1", "16")]
    stray = record(representation="25", n_train=50, data={**bulk[0]["data"], "train": {"n": 50, "per_class": 5}})
    stray["environment"] = {"date": "2027-01-01T00:00:00+00:00"}  # newest, yet alone
    other_seed = record(representation="4", seed=1)
    found = comparable([*bulk, stray, other_seed], ("data", "protocol"), what="the figure")
    assert found.kept == bulk and found.left_out == [stray, other_seed]
    assert found.notes == [
        "1 record left out: measured on cifar10, train 50 (5/class) / test 100 (10/class) images, unlike the figure",
        "1 record left out: another protocol (seed), unlike the figure",
    ]
    assert comparable(bulk, ("checkpoint",)).notes == []


def test_subset_note_knows_the_full_standard_splits():
    full = record(n_train=50_000, n_test=10_000, data={"train": {"n": 50_000}, "test": {"n": 10_000}})
    assert subset_note(full) is None
    assert "the full split is 50,000 / 10,000" in subset_note(record())  # 20 and 10 per class
    assert "no standard split known" in subset_note(record(dataset="digits"))
