"""The paper's tables as data (``paper_tables.yaml``), filled from the results store and rendered.

Evaluation writes results; tables only read them. A cell is a record selector (model, checkpoint, dataset,
patch spec, aggregation, metric) merged from table, group, row and column, so a new table is a YAML entry.
Rows of one architecture entry (the paper's CIFAR methods) are told apart by binding a slot to a checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_patchbench.core.errors import UserError, did_you_mean
from ssl_patchbench.core.files import file_sha256
from ssl_patchbench.core.labels import aggregation_label
from ssl_patchbench.core.yamlfile import read_yaml
from ssl_patchbench.results.records import (
    disagreements,
    drop_reused_duplicates,
    is_subset,
    metric_value,
    record_date,
    subset_note,
)

SPEC_FILE = Path(__file__).with_name("paper_tables.yaml")
SELECT_KEYS = frozenset(
    {"model", "checkpoint", "dataset", "representation", "mode", "scale", "size", "stride", "grid"}
    | {"aggregation", "space", "metric"}
)
UNBOUND = ("required", "given")  # checkpoint values that name no weights
SUBSET_MARK = "†"  # on a cell whose record was measured on less than the dataset's full standard split


@dataclass(frozen=True)
class Binding:
    """Which weights a slot's records must come from; ``path`` also goes into fill commands."""

    model: str | None = None
    checkpoint: str | None = None  # sha256 prefix
    path: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Column:
    label: str
    group: str | None
    select: dict


@dataclass(frozen=True)
class Row:
    label: str
    select: dict
    paper: dict  # group label (None without groups) -> one number or None per column


@dataclass(frozen=True)
class TableSpec:
    id: str
    title: str
    row_header: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    select: dict = field(default_factory=dict)

    def slot(self, row: Row, group: str | None) -> str:
        """What a checkpoint is bound to: ``table1/VICReg/standard`` or ``table5/VICReg``."""
        return f"{self.id}/{row.label}" + (f"/{group}" if group else "")

    @property
    def groups(self) -> list[str | None]:
        return list(dict.fromkeys(c.group for c in self.columns))


@dataclass
class Cell:
    """One filled cell: our value (the latest matching record), the paper's, and why to trust it or not."""

    row: str
    group: str | None
    column: str
    slot: str
    selector: dict
    paper: float | None
    ours: float | None = None
    records: list[dict] = field(default_factory=list)
    conflicts: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    command: str | None = None
    subset: bool = False

    @property
    def diff(self) -> float | None:
        return None if self.ours is None or self.paper is None else round(self.ours - self.paper, 2)

    def text(self, refs: Sequence[int] = (), *, paper_only: bool = False) -> str:
        """``ours / paper (ours - paper)`` with footnote numbers; ``--paper``: the paper's number alone."""
        if paper_only:
            return "—" if self.paper is None else f"{self.paper:.1f}"
        ours = "—" if self.ours is None else f"{self.ours:.2f}" + (SUBSET_MARK if self.subset else "")
        text = ours if self.paper is None else f"{ours} / {self.paper:.1f}"
        if self.diff is not None:
            text += f" ({self.diff:+.2f})"
        return text + (f" [{','.join(map(str, refs))}]" if refs else "")


@dataclass
class FilledTable:
    spec: TableSpec
    cells: list[Cell]
    footnotes: list[str] = field(default_factory=list)
    refs: dict[int, list[int]] = field(default_factory=dict)  # id(cell) -> footnote numbers

    def grid(self, *, paper_only: bool = False) -> list[list[str]]:
        """Row label followed by each cell's text, in column order."""
        width = len(self.spec.columns)
        return [
            [self.cells[i].row]
            + [c.text(self.refs.get(id(c), ()), paper_only=paper_only) for c in self.cells[i : i + width]]
            for i in range(0, len(self.cells), width)
        ]


# ---------------------------------------------------------------- the table specs


def load_tables(extra: Iterable[Path] = ()) -> tuple[list[TableSpec], dict[str, Binding]]:
    """The packaged tables plus those of ``extra`` files, and their default bindings (slot -> binding)."""
    tables: list[TableSpec] = []
    raw_bindings: dict = {}
    for path in (SPEC_FILE, *extra):
        data = _read_yaml(Path(path))
        items = _typed(data.get("tables") or [], list, f"{path}, 'tables'", "a list of tables")
        tables.extend(
            _table(_typed(item, dict, f"{path}, table {i + 1}", "a mapping"), path) for i, item in enumerate(items)
        )
        raw_bindings.update(_typed(data.get("bindings") or {}, dict, f"{path}, 'bindings'", "a mapping of slots"))
    ids = [t.id for t in tables]
    if len(set(ids)) != len(ids):
        raise UserError(f"a table id is defined twice: {', '.join(sorted({i for i in ids if ids.count(i) > 1}))}")
    return tables, resolve_bindings(tables, raw_bindings)


def _read_yaml(path: Path) -> dict:
    data = read_yaml(path.expanduser())  # size-bounded, alias bombs refused
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with 'tables' and/or 'bindings'")
    return data


def _typed(value: object, kind: type, where: str, expected: str) -> Any:
    """``value`` when it is a ``kind``, else a UserError naming where it is and what was expected."""
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"{where}: expected {expected}, got {str(value)[:60]!r}")
    return value


def _labelled(items: object, where: str, what: str) -> list[dict]:
    """A non-empty list of mappings, each with a ``label`` (text or number)."""
    items = _typed(items, list, f"{where}, '{what}'", f"a non-empty list of {what}")
    for i, item in enumerate(items):
        _typed(item, dict, f"{where}, {what} {i + 1}", "a mapping with a label")
        _typed(item.get("label"), (str, int, float), f"{where}, {what} {i + 1}, 'label'", "text")
    if not items:
        raise UserError(f"{where}: '{what}' is empty; give at least one")
    return items


def _table(item: dict, path: Path) -> TableSpec:
    where = f"{path}: table {item.get('id', '?')}"
    _typed(item.get("id"), (str, int), f"{where}, 'id'", "a table id")
    groups = _labelled(item["groups"], where, "groups") if item.get("groups") else [{"label": None, "select": {}}]
    groups = [{**g, "label": None if g["label"] is None else str(g["label"])} for g in groups]
    _labelled(item.get("columns"), where, "columns")
    _labelled(item.get("rows"), where, "rows")
    columns = tuple(
        Column(str(c["label"]), g["label"], {**_select(g.get("select"), where), **_select(c.get("select"), where)})
        for g in groups
        for c in item["columns"]
    )
    rows = tuple(
        Row(str(r["label"]), _select(r.get("select"), where), _paper(r, groups, item, where)) for r in item["rows"]
    )
    spec = TableSpec(
        id=str(item["id"]),
        title=str(item.get("title", item["id"])).strip(),
        row_header=str(item.get("row_header", "method")),
        columns=columns,
        rows=rows,
        select=_select(item.get("select"), where),
    )
    for row in rows:
        for column in columns:
            if "metric" not in {**spec.select, **row.select, **column.select}:
                raise UserError(f"{where}: cell {row.label}/{column.label} names no metric")
    return spec


def _select(select: dict | None, where: str) -> dict:
    select = dict(_typed(select or {}, dict, f"{where}, 'select'", "a mapping of selector keys"))
    unknown = set(select) - SELECT_KEYS
    if unknown:
        raise UserError(f"{where}: unknown selector keys {sorted(unknown)}; known: {sorted(SELECT_KEYS)}")
    if "representation" in select:
        select["representation"] = str(select["representation"])
    return select


def _paper(row: dict, groups: list[dict], item: dict, where: str) -> dict:
    paper = row.get("paper")
    n = len(item["columns"])
    if paper is None:
        return {g["label"]: [None] * n for g in groups}
    by_group = paper if isinstance(paper, dict) else {groups[0]["label"]: paper}
    by_group = {None if k is None else str(k): v for k, v in by_group.items()}
    numbers = all(isinstance(v, list) and len(v) == n and all(_is_number(x) for x in v) for v in by_group.values())
    if set(by_group) != {g["label"] for g in groups} or not numbers:
        raise UserError(
            f"{where}: row {row['label']} needs {n} paper numbers (or null) for each of {[g['label'] for g in groups]}"
        )
    return by_group


def _is_number(value: object) -> bool:
    """A paper number: null, or a finite accuracy from 0 to 100."""
    if value is None:
        return True
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 100


# ---------------------------------------------------------------- bindings: slot -> checkpoint


def _norm(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def slots(tables: Iterable[TableSpec]) -> dict[str, str]:
    """Normalised slot name -> slot name, for every (table, row, group)."""
    return {_norm(t.slot(r, g)): t.slot(r, g) for t in tables for r in t.rows for g in t.groups}


def parse_binding(text: str) -> tuple[str, Binding]:
    """``SLOT=MODEL@CKPT``, ``SLOT=@CKPT`` or ``SLOT=MODEL``; CKPT is a checkpoint file or a sha256 prefix."""
    slot, sep, value = text.partition("=")
    if not sep or not slot.strip() or not value.strip():
        raise UserError(
            f"--bind takes SLOT=MODEL@CHECKPOINT (e.g. 'table5/VICReg=resnet18_cifar@3be869a5'), got {text!r}"
        )
    return slot.strip(), binding_from(value.strip())


def binding_from(value: str | dict) -> Binding:
    """A binding from ``MODEL@CKPT`` text or a ``{model, checkpoint, note}`` mapping (text values only)."""
    if isinstance(value, dict):
        unknown = set(value) - {"model", "checkpoint", "note"}
        if unknown or not all(isinstance(v, str | None) for v in value.values()):
            raise UserError(f"binding {str(value)[:80]!r}: expected text values for model, checkpoint and note only")
        model, ckpt, note = value.get("model"), value.get("checkpoint"), value.get("note")
    elif not isinstance(value, str):
        raise UserError(f"binding {value!r}: expected MODEL@CHECKPOINT text or a mapping with model, checkpoint, note")
    else:
        model, _, ckpt = str(value).partition("@")
        note = None
    if not ckpt:
        return Binding(model=model or None, note=note)
    path = Path(str(ckpt)).expanduser()
    if path.is_file():
        return Binding(model=model or None, checkpoint=file_sha256(path), path=str(path), note=note)
    if not re.fullmatch(r"[0-9a-fA-F]{6,64}", str(ckpt)):
        raise UserError(f"binding {value!r}: {ckpt!r} is neither an existing file nor a sha256 prefix (6+ hex digits)")
    return Binding(model=model or None, checkpoint=str(ckpt).lower(), note=note)


def resolve_bindings(tables: Sequence[TableSpec], raw: dict) -> dict[str, Binding]:
    """Check each slot name against the tables (did-you-mean on typos) and parse its binding."""
    known = slots(tables)
    resolved = {}
    for slot, value in raw.items():
        resolved[_slot_name(str(slot), known)] = value if isinstance(value, Binding) else binding_from(value)
    return resolved


def load_bindings(path: Path, tables: Sequence[TableSpec]) -> dict[str, Binding]:
    """A user's bindings file: ``slot: MODEL@CKPT`` lines (or the same under a ``bindings:`` key)."""
    data = _read_yaml(path)
    raw = _typed(data.get("bindings", data), dict, f"{path}, 'bindings'", "a mapping of slots")
    return resolve_bindings(tables, raw)


def _slot_name(slot: str, known: dict[str, str]) -> str:
    key = _norm(slot)
    if key in known:
        return known[key]
    longer = [name for k, name in known.items() if k.startswith(key + "/")]
    if longer:
        raise UserError(f"slot {slot!r} has one checkpoint per column group: bind {' and '.join(longer)}")
    raise UserError(f"unknown slot {slot!r}{did_you_mean(key, known)}; slots are TABLE/ROW[/GROUP], e.g. table5/VICReg")


# ---------------------------------------------------------------- records -> cells


def matches(record: dict, selector: dict) -> bool:
    """Whether ``record`` measured what ``selector`` describes (see paper_tables.yaml for the keys)."""
    checkpoint = selector.get("checkpoint")
    if checkpoint == "required":
        return False
    if checkpoint not in (None, "given") and not str(record.get("checkpoint_sha256", "")).startswith(checkpoint):
        return False
    if any(selector.get(k) is not None and record.get(k) != selector[k] for k in ("model", "dataset")):
        return False
    representation = selector.get("representation", "central")
    p = record.get("patches") or {}
    mode = selector.get("mode") or ("central" if representation == "central" else "random")
    if str(record.get("representation")) != representation or p.get("mode") != mode:
        return False
    layout = ("size", "stride", "grid") if mode != "random" else ("size",)
    if any(p.get(k) != selector.get(k) for k in layout if k in selector or mode == "random"):
        return False
    if mode == "random" and "scale" in selector and scale_pair(p.get("scale")) != scale_pair(selector["scale"]):
        return False
    if aggregation_label(record.get("aggregation", "mean")) != aggregation_label(selector.get("aggregation", "mean")):
        return False
    if record.get("space", "embedding") != selector.get("space", "embedding"):
        return False
    return metric_value(record, selector["metric"]) is not None


def scale_pair(value: object) -> tuple[float, float] | None:
    if value is None:
        return None
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]  # type: ignore[arg-type]
    return (round(values[0], 6), round(values[-1], 6))


def fill(spec: TableSpec, records: Sequence[dict], bindings: dict[str, Binding]) -> FilledTable:
    """Every cell of ``spec`` from ``records`` (the latest matching record wins; disagreements are noted)."""
    cells = []
    for row in spec.rows:
        for index, column in enumerate(spec.columns):
            slot = spec.slot(row, column.group)
            binding = bindings.get(slot, Binding())
            selector = {**spec.select, **row.select, **column.select}
            selector.update({k: v for k, v in (("model", binding.model), ("checkpoint", binding.checkpoint)) if v})
            paper = row.paper[column.group][index % len(row.paper[column.group])]
            cell = Cell(row.label, column.group, column.label, slot, selector, None if paper is None else float(paper))
            _fill_cell(cell, records, binding)
            cells.append(cell)
    _note_mixed_checkpoints(cells)
    return FilledTable(spec, cells)


def _fill_cell(cell: Cell, records: Sequence[dict], binding: Binding) -> None:
    found, _ = drop_reused_duplicates(sorted((r for r in records if matches(r, cell.selector)), key=record_date))
    if binding.note:
        cell.notes.append(binding.note)
    if not found:
        return
    cell.records, cell.ours = found, metric_value(found[-1], cell.selector["metric"])
    cell.conflicts = disagreements(found)
    if cell.conflicts["numbers"]:
        fields = ", ".join(cell.conflicts["numbers"][:6]) + (", ..." if len(cell.conflicts["numbers"]) > 6 else "")
        cell.notes.append(f"⚠ {len(found)} records disagree on {fields}; the latest is shown")
    elif cell.conflicts["environment"]:
        cell.notes.append(f"{len(found)} records measured with different {', '.join(cell.conflicts['environment'])}")
    values = [metric_value(r, cell.selector["metric"]) or 0.0 for r in found]
    if not cell.conflicts["numbers"] and max(values) - min(values) > 0.1:
        cell.notes.append(f"⚠ repeated runs differ by {max(values) - min(values):.2f} points; the latest is shown")
    note = subset_note(found[-1])
    if note:
        cell.subset = is_subset(found[-1])
        cell.notes.append((f"{SUBSET_MARK} " if cell.subset else "") + note)


def _note_mixed_checkpoints(cells: list[Cell]) -> None:
    by_slot: dict[str, set[str]] = {}
    for cell in cells:
        if cell.records:
            by_slot.setdefault(cell.slot, set()).add(str(cell.records[-1].get("checkpoint_sha256")))
    for cell in cells:
        shas = by_slot.get(cell.slot, set())
        if cell.records and len(shas) > 1:
            cell.notes.append(f"⚠ the cells of {cell.slot} come from {len(shas)} checkpoints; bind it to one")


def select_tables(tables: Sequence[TableSpec], names: Sequence[str]) -> list[TableSpec]:
    """The tables named (``table5``, ``"Table 5"``, ``figure2``), all when none is."""
    by_id = {_norm(t.id): t for t in tables}
    for name in names:
        if _norm(name) not in by_id:
            raise UserError(
                f"unknown table {name!r}{did_you_mean(_norm(name), by_id)}; known: {', '.join(t.id for t in tables)}"
            )
    return [by_id[_norm(n)] for n in names] if names else list(tables)
