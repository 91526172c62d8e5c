"""What a filled table prints: the commands that fill its empty cells, footnotes, Markdown, LaTeX, CSV, JSON.

Every format is built from the same cells, so the numbers, notes and commands agree whatever is printed.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from ssl_patchbench.core.labels import aggregation_label
from ssl_patchbench.reporting.tables import (
    SUBSET_MARK,
    UNBOUND,
    Binding,
    Cell,
    FilledTable,
    TableSpec,
    fill,
    scale_pair,
)
from ssl_patchbench.results.records import newest_first, record_date

_PLACEHOLDER = re.compile(r"[^A-Za-z0-9]+")
LEGEND = (
    f"Cells: ours / paper (ours - paper), top-1 %; {SUBSET_MARK}: measured on a subset of the dataset (sizes in its "
    "note); [n]: notes and the commands that fill empty cells."
)


def build(
    specs: Sequence[TableSpec], records: Sequence[dict], bindings: dict[str, Binding], *, results: str | None = None
) -> list[FilledTable]:
    """Fill each table, give its empty cells a fill command (appending to ``results`` when given), number notes."""
    filled = []
    for spec in specs:
        table = fill(spec, records, bindings)
        add_commands(table.cells, records, bindings, results)
        filled.append(number_footnotes(table))
    return filled


# ---------------------------------------------------------------- commands that fill empty cells


def add_commands(cells: list[Cell], records: Sequence[dict], bindings: dict[str, Binding], results: str | None) -> None:
    """One ``patchbench eval`` per slot and patch layout; central cells ride with the slot's first layout."""
    groups: dict[tuple, list[Cell]] = {}
    for cell in (c for c in cells if c.ours is None):
        s = cell.selector
        layout = (
            None
            if s.get("representation", "central") == "central"
            else tuple(str(s.get(k)) for k in ("mode", "scale", "size", "stride", "grid", "space"))
        )
        groups.setdefault((cell.slot, layout), []).append(cell)
    for (slot, layout), members in list(groups.items()):
        if layout is None and any(k[0] == slot and k[1] is not None for k in groups):
            partner = next(k for k in groups if k[0] == slot and k[1] is not None)
            groups[partner].extend(members)
            del groups[(slot, layout)]
    for members in groups.values():
        command = eval_command(members, records, bindings.get(members[0].slot, Binding()), results)
        for cell in members:
            cell.command = command


def eval_command(cells: Sequence[Cell], records: Sequence[dict], binding: Binding, results: str | None) -> str:
    """The exact ``patchbench eval`` that measures every cell of ``cells`` (one slot, one patch layout)."""
    s = next((c.selector for c in cells if c.selector.get("representation", "central") != "central"), cells[0].selector)
    args = ["patchbench", "eval", "--model", s.get("model") or "ZOO_ENTRY", "--dataset", s["dataset"]]
    checkpoint = _checkpoint_arg(s, binding, records, cells[0].slot)
    args += ["--checkpoint", checkpoint] if checkpoint else []
    args += _data_args(s["dataset"], records)
    reps = {c.selector.get("representation", "central") for c in cells}
    args += ["--patches", ",".join(sorted(reps, key=lambda r: (r != "central", int(r) if r.isdigit() else 0)))]
    args += _layout_args(s, cells) if reps != {"central"} else []
    args += ["--space", s["space"]] if s.get("space", "embedding") != "embedding" else []
    args += _eval_args([c.selector["metric"] for c in cells])
    args += ["--results", results] if results else []
    return shlex.join(args)


def _layout_args(s: dict, cells: Sequence[Cell]) -> list[str]:
    """Mode, scale, window and aggregation options of the non-central cells."""
    mode = s.get("mode") or "random"
    args = ["--mode", mode] if mode != "random" else []
    if mode == "random" and "scale" in s:
        lo, hi = scale_pair(s["scale"]) or (0.0, 0.0)
        args += ["--patch-scale", f"{lo:g}" if lo == hi else f"{lo:g},{hi:g}"]
    args += ["--patch-size", str(s["size"])] if s.get("size") else []
    args += ["--stride", str(s["stride"])] if s.get("stride") else []
    patch_cells = [c for c in cells if c.selector.get("representation") != "central"]
    aggs = sorted({aggregation_label(c.selector.get("aggregation", "mean")) for c in patch_cells})
    if aggs != ["mean"]:  # gridpool(3,2) -> gridpool:3:2, no shell quoting needed
        args += ["--aggregate", ",".join(re.sub(r"[(,]", ":", a).rstrip(")") for a in aggs)]
    return args


def _checkpoint_arg(selector: dict, binding: Binding, records: Sequence[dict], slot: str) -> str | None:
    if binding.path:
        return binding.path
    if binding.checkpoint:
        for record in reversed(records):
            path = record.get("checkpoint")
            if (
                str(record.get("checkpoint_sha256", "")).startswith(binding.checkpoint)
                and path
                and Path(path).is_file()
            ):
                return str(path)
        return f"CKPT_{binding.checkpoint[:8].upper()}"
    if selector.get("checkpoint") in UNBOUND:
        return _PLACEHOLDER.sub("_", slot.split("/", 1)[-1]).strip("_").upper() + "_CKPT"
    return None


def _data_args(dataset: str, records: Sequence[dict]) -> list[str]:
    """Reuse the data folder and per-class subset of the latest record on this dataset, so cells compare."""
    latest = next((r for r in newest_first(records) if r.get("dataset") == dataset), None)
    data = (latest or {}).get("data") or {}
    root = (data.get("train") or {}).get("root")
    args = ["--data-dir", str(Path(root).parent) if root and Path(root).is_dir() else f"{dataset.upper()}_DIR"]
    for split in ("train", "test"):
        per_class = (data.get(split) or {}).get("per_class")
        args += [f"--{split}-per-class", str(per_class)] if per_class else []
    return args


def _eval_args(metrics: Sequence[str]) -> list[str]:
    names = {m.partition("/")[0] for m in metrics}
    evals = sorted({"linear" if n == "linear" else "knn" for n in names})
    ks = sorted({int(n.split("@")[1]) for n in names if n.startswith("knn@")})
    args = ["--eval", ",".join(evals)] if evals != ["knn", "linear"] else []
    return args + (["--knn-k", ",".join(map(str, ks))] if not set(ks) <= {20, 200} else [])


def number_footnotes(table: FilledTable) -> FilledTable:
    """Number each distinct note and fill command of the table; each cell refers to its numbers."""
    for cell in table.cells:
        texts = cell.notes + ([f"fill with: {cell.command}"] if cell.command else [])
        for text in texts:
            if text not in table.footnotes:
                table.footnotes.append(text)
        table.refs[id(cell)] = [table.footnotes.index(t) + 1 for t in texts]
    return table


# ---------------------------------------------------------------- formats


def headers(spec: TableSpec) -> list[str]:
    """Column headers; grouped columns read ``group: column`` where a format has no spanning headers."""
    return [spec.row_header] + [f"{c.group}: {c.label}" if c.group else c.label for c in spec.columns]


def markdown(tables: Sequence[FilledTable], *, paper_only: bool = False) -> str:
    """GitHub-flavoured Markdown, one section per table, notes and fill commands below it."""
    parts = []
    for table in tables:
        head = headers(table.spec)
        lines = [f"### {table.spec.title}", "", "Paper's numbers (top-1 %)." if paper_only else LEGEND, ""]
        lines += ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
        lines += ["| " + " | ".join(_md(x) for x in row) + " |" for row in table.grid(paper_only=paper_only)]
        if not paper_only and table.footnotes:
            lines += [""] + [f"{i}. {_md_note(note)}" for i, note in enumerate(table.footnotes, start=1)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _md_note(note: str) -> str:
    prefix = "fill with: "
    return f"fill with: `{note[len(prefix) :]}`" if note.startswith(prefix) else _md(note)


def latex(tables: Sequence[FilledTable], *, paper_only: bool = False) -> str:
    """One booktabs ``table`` per table (needs ``\\usepackage{booktabs}``), notes as a footnotesize list."""
    return "\n\n".join(_latex_table(t, paper_only) for t in tables) + "\n"


def _latex_table(table: FilledTable, paper_only: bool) -> str:
    spec = table.spec
    groups = spec.groups
    lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{_tex(spec.title)}}}"]
    lines.append("\\begin{tabular}{l" + "r" * len(spec.columns) + "}")
    lines.append("\\toprule")
    if groups != [None]:
        width = len(spec.columns) // len(groups)
        spans = [f"\\multicolumn{{{width}}}{{c}}{{{_tex(str(g))}}}" for g in groups]
        rules = [f"\\cmidrule(lr){{{2 + i * width}-{1 + (i + 1) * width}}}" for i in range(len(groups))]
        lines += [" & " + " & ".join(spans) + " \\\\", " ".join(rules)]
    lines.append(" & ".join(_tex(h) for h in [spec.row_header] + [c.label for c in spec.columns]) + " \\\\")
    lines.append("\\midrule")
    lines += [" & ".join(_tex(x) for x in row) + " \\\\" for row in table.grid(paper_only=paper_only)]
    lines += ["\\bottomrule", "\\end{tabular}"]
    if not paper_only and table.footnotes:
        notes = [f"[{i}] {_tex(n)}" for i, n in enumerate(table.footnotes, start=1)]
        lines += ["\\par\\smallskip\\raggedright\\footnotesize " + " \\\\\n".join(notes)]
    lines.append("\\end{table}")
    return "\n".join(lines)


_TEX = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}"}
_TEX |= {
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
    "—": "---",
    "⚠": r"(!)",
    SUBSET_MARK: r"\textsuperscript{\dag}",
}


def _tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def cell_dict(table: FilledTable, cell: Cell, *, paper_only: bool = False) -> dict:
    """Everything known about one cell, for JSON and CSV."""
    base = {"table": table.spec.id, "row": cell.row, "group": cell.group, "column": cell.column, "paper": cell.paper}
    if paper_only:
        return base
    latest = cell.records[-1] if cell.records else {}
    return {
        **base,
        "ours": cell.ours,
        "diff": cell.diff,
        "slot": cell.slot,
        "records": len(cell.records),
        "checkpoint_sha256": latest.get("checkpoint_sha256"),
        "n_train": latest.get("n_train"),
        "n_test": latest.get("n_test"),
        "subset": cell.subset,
        "date": record_date(latest) or None,
        "sources": sorted({str(r.get("_source")) for r in cell.records if r.get("_source")}),
        "conflicts": cell.conflicts.get("numbers", []),
        "environment_differs": cell.conflicts.get("environment", []),
        "notes": cell.notes,
        "command": cell.command,
        "selector": cell.selector,
    }


def json_text(tables: Sequence[FilledTable], *, paper_only: bool = False) -> str:
    """A JSON list of tables, each with its title, headers and cells."""
    out = [
        {
            "id": t.spec.id,
            "title": t.spec.title,
            "headers": headers(t.spec),
            "cells": [cell_dict(t, c, paper_only=paper_only) for c in t.cells],
        }
        for t in tables
    ]
    return json.dumps(out, indent=2) + "\n"


def csv_text(tables: Sequence[FilledTable], *, paper_only: bool = False) -> str:
    """One CSV line per cell (long format), lists joined by ``; ``."""
    rows = [cell_dict(t, c, paper_only=paper_only) for t in tables for c in t.cells]
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[k for k in rows[0] if k != "selector"], extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "; ".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()})
    return buffer.getvalue()
