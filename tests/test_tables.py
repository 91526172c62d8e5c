import csv
import io
import json
import shlex

import pytest

from ssl_patchbench.cli.evaluate import eval_cmd
from ssl_patchbench.core.errors import UserError
from ssl_patchbench.reporting import render as R
from ssl_patchbench.reporting import tables as T

from .clitools import run_cli
from .factories import record

SHARED_SHA = "3be869a54f609bd8bb695996d911482a3340c67aa36f33fb2df956d640abf3ea"
SLIDING = {"mode": "sliding", "n": 1, "size": 16, "stride": 4, "grid": None, "scale": [0.08, 1.0], "seed": 0}


def paper(table_id: str) -> dict:
    specs, _ = T.load_tables()
    spec = next(s for s in specs if s.id == table_id)
    return {(r.label, g): list(r.paper[g]) for r in spec.rows for g in r.paper}


def test_paper_numbers_are_those_of_design_section_7():
    t1 = paper("table1")
    assert t1[("SimCLR", "patch-based")] == [46.2, 82.1, 90.5, 90.8]
    assert t1[("BYOL", "standard")] == [90.9, 87.8, 92.3, 92.4]
    assert paper("table2")[("VICReg", "standard")] == [67.6, 61.4, 69.0, 69.3]
    assert paper("table3")[("patch-based", None)] == [41.3, 45.6, 76.1, 76.3]
    assert paper("table4")[("SwAV", None)] == [75.3, 60.8, 75.9, 76.0]
    assert paper("table5") == {
        ("SimCLR", None): [90.2, 90.7, 93.1],
        ("VICReg", None): [90.8, 91.2, 93.1],
        ("BYOL", None): [91.5, 92.6, 93.5],
    }
    specs, _ = T.load_tables()
    assert [s.id for s in specs] == ["table1", "table2", "table3", "table4", "table5", "figure2"]


def shared(representation="central", metrics=None, **over):
    r = record(checkpoint_sha256=SHARED_SHA, representation=representation, **over)
    r["metrics"] = metrics or {"knn@20": {"top1": 80.0}, "linear": {"top1": 82.5}}
    return r


def table5(records, bindings=None):
    specs, bound = T.load_tables()
    bound.update(bindings or {})
    return R.build(T.select_tables(specs, ["Table 5"]), records, bound)[0]


def cells(table):
    return {(c.row, c.column): c for c in table.cells}


def test_table5_vicreg_row_fills_from_the_shared_checkpoint_and_others_stay_empty():
    records = [
        shared(),
        shared("25", {"knn@20": {"top1": 84.25}}, patches=SLIDING, aggregation="gridpool(3,2)"),
        shared("25", {"knn@20": {"top1": 99.0}}, patches=SLIDING, aggregation="mean"),  # not Table 5's pooling
        record(representation="central"),  # another resnet18_cifar checkpoint: no row is bound to it
    ]
    got = cells(table5(records))
    assert got[("VICReg", "baseline kNN")].ours == 80.0
    assert got[("VICReg", "baseline kNN")].diff == pytest.approx(80.0 - 90.8)
    assert got[("VICReg", "baseline linear")].ours == 82.5
    assert got[("VICReg", "enhancement kNN")].ours == 84.25
    assert got[("VICReg", "enhancement kNN")].text() == "84.25† / 93.1 (-8.85)"  # 200/100 images: a subset
    for column in ("baseline kNN", "baseline linear", "enhancement kNN"):
        assert got[("SimCLR", column)].ours is None and got[("BYOL", column)].ours is None
    assert "train 200 (20/class) / test 100 (10/class) images" in " ".join(got[("VICReg", "baseline kNN")].notes)


def _folder_data(n_train: int, n_test: int) -> dict:
    """``data`` of a record from an ImageFolder tree without a per-class option (what materialize.py writes)."""
    return {
        s: {"dataset": "cifar10", "source": "imagefolder", "n": n} for s, n in (("train", n_train), ("test", n_test))
    }


def test_a_cell_from_a_smaller_folder_is_marked_and_the_full_split_is_not():
    """Issue 17: a 1,000-image folder (no --train-per-class) once filled Table 5 as if it were CIFAR-10."""
    small = shared(data=_folder_data(1000, 1000), n_train=1000, n_test=1000)
    got = cells(table5([small]))[("VICReg", "baseline kNN")]
    assert got.subset and got.text().startswith("80.00† / 90.8")
    assert any("1,000" in note and "50,000 / 10,000" in note for note in got.notes)
    full = cells(table5([shared(data=_folder_data(50_000, 10_000), n_train=50_000, n_test=10_000)]))
    cell = full[("VICReg", "baseline kNN")]
    assert not cell.subset and "†" not in cell.text() and not any("subset" in n for n in cell.notes)
    assert "†" in R.markdown([table5([small])]) and r"\textsuperscript{\dag}" in R.latex([table5([small])])


def test_fill_command_is_one_valid_eval_per_row():
    got = cells(table5([]))
    command = got[("SimCLR", "baseline kNN")].command
    assert command == got[("SimCLR", "enhancement kNN")].command  # central and sliding cells share one run
    args = shlex.split(command)
    assert args[:2] == ["patchbench", "eval"]
    ctx = eval_cmd.make_context("eval", args[2:])  # every option exists and parses
    assert ctx.params["model"] == "resnet18_cifar" and ctx.params["checkpoint"] == "SIMCLR_CKPT"
    assert (ctx.params["patches"], ctx.params["mode"], ctx.params["size"], ctx.params["stride"]) == (
        ("central", "25"),
        "sliding",
        16,
        4,
    )
    assert ctx.params["aggregations"] == ("gridpool:3:2",)
    t1 = R.build(T.select_tables(T.load_tables()[0], ["table1"]), [], {})[0]
    commands = {c.slot: c.command for c in t1.cells}
    patch_based = eval_cmd.make_context("eval", shlex.split(commands["table1/VICReg/patch-based"])[2:]).params
    standard = eval_cmd.make_context("eval", shlex.split(commands["table1/VICReg/standard"])[2:]).params
    assert (patch_based["scale"], standard["scale"]) == ((0.2, 0.2), (0.08, 1.0))
    assert patch_based["patches"] == ("central", "1", "16", "256") and patch_based["evals"] == ("linear",)


def test_records_that_disagree_on_provenance_are_flagged():
    full = shared(n_test=10000, metrics={"knn@20": {"top1": 90.0}, "linear": {"top1": 91.0}})
    full["environment"] = {"device": "H100", "date": "2026-02-01T00:00:00+00:00"}
    got = cells(table5([shared(), full]))
    cell = got[("VICReg", "baseline kNN")]
    assert cell.ours == 90.0  # the latest
    assert "n_test" in cell.conflicts["numbers"]
    assert any("disagree on" in n and "n_test" in n for n in cell.notes)
    again = cells(table5([shared(), shared()]))[("VICReg", "baseline kNN")]
    assert again.conflicts["numbers"] == [] and not any("disagree" in n for n in again.notes)


def test_binding_a_user_checkpoint_to_a_row(tmp_path):
    specs, _ = T.load_tables()
    ckpt = tmp_path / "simclr.ckpt"
    ckpt.write_bytes(b"weights")
    slot, binding = T.parse_binding(f"Table 5/SimCLR=tiny_cifar@{ckpt}")
    resolved = T.resolve_bindings(specs, {slot: binding})
    assert list(resolved) == ["table5/SimCLR"]
    sha = resolved["table5/SimCLR"].checkpoint
    ours = record(model="tiny_cifar", checkpoint_sha256=sha)
    ours["metrics"] = {"knn@20": {"top1": 55.5}}
    got = cells(table5([ours], resolved))
    assert got[("SimCLR", "baseline kNN")].ours == 55.5 and got[("SimCLR", "baseline linear")].ours is None
    assert f"--checkpoint {ckpt}" in got[("SimCLR", "baseline linear")].command
    with pytest.raises(UserError, match="table1/VICReg/patch-based and table1/VICReg/standard"):
        T.resolve_bindings(specs, {"table1/VICReg": T.Binding(checkpoint="abcdef")})
    with pytest.raises(UserError, match="did you mean"):
        T.resolve_bindings(specs, {"table5/VICRg": T.Binding(checkpoint="abcdef")})
    with pytest.raises(UserError, match="sha256 prefix"):
        T.parse_binding("table5/BYOL=resnet18_cifar@/no/such/file.ckpt")


def test_formats_are_parseable_and_paper_only_has_no_values():
    table = table5([shared()])
    md = R.markdown([table])
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | baseline kNN | baseline linear | enhancement kNN |"
    assert all(line.count("|") == 5 for line in rows) and len(rows) == 5  # header, rule, 3 methods
    assert "80.00† / 90.8 (-10.80)" in md and "fill with: `patchbench eval" in md
    data = json.loads(R.json_text([table]))
    vic = next(c for c in data[0]["cells"] if c["row"] == "VICReg" and c["column"] == "baseline linear")
    assert (vic["ours"], vic["paper"], vic["checkpoint_sha256"]) == (82.5, 91.2, SHARED_SHA)
    lines = list(csv.DictReader(io.StringIO(R.csv_text([table]))))
    assert len(lines) == 9 and lines[3]["row"] == "VICReg"
    paper_md = R.markdown([table], paper_only=True)
    assert "80.00" not in paper_md and "| VICReg | 90.8 | 91.2 | 93.1 |" in paper_md
    t1 = R.build(T.select_tables(T.load_tables()[0], ["table1"]), [], {})
    tex = R.latex(t1)
    assert r"\multicolumn{4}{c}{patch-based}" in tex and tex.count(r"\\") >= 6 and "resnet34\\_cifar" in tex


def test_user_table_spec_needs_no_code(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "mine.yaml"
    spec.write_text(
        "tables:\n"
        "  - id: mine\n"
        "    title: My sweep\n"
        "    select: {dataset: cifar10, model: tiny_cifar, metric: knn@20}\n"
        "    columns:\n"
        "      - {label: central, select: {representation: central}}\n"
        "      - {label: '4', select: {representation: '4', scale: 0.2}}\n"
        "    rows:\n"
        "      - {label: tiny, paper: [50.0, null]}\n"
    )
    results = tmp_path / "r.jsonl"
    from ssl_patchbench.results.store import append_record

    append_record(results, record(model="tiny_cifar"))
    code, out, err = run_cli(
        capsys, monkeypatch, "table", "mine", "--spec", str(spec), "--results", str(results), "--format", "markdown"
    )
    assert code == 0, err
    assert "| tiny | 60.00† / 50.0 (+10.00) [1] | — [2] |" in out
    assert "--patches 4 --patch-scale 0.2 --eval knn" in out and f"--results {results}" in out
    code, out, err = run_cli(capsys, monkeypatch, "table", "tabel5")
    assert code == 2 and "did you mean: table5" in err
