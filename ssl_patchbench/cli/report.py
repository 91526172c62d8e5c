"""Click commands that read or gate results: ``table``, ``results`` and ``check``.

Wiring only: options become calls of ``tables``/``tables_render``, ``results`` and ``check``. torch is imported
only by ``check`` (it evaluates), inside the command, so ``patchbench --help`` stays instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from ssl_patchbench.cli.common import FiniteFloat, build_config, eval_options, progress, stderr, stdout, write_text
from ssl_patchbench.core.errors import UserError
from ssl_patchbench.core.files import ensure_dir

FORMATS = ("terminal", "markdown", "latex", "csv", "json")


def _results_paths(paths: tuple[str, ...]) -> list[Path]:
    """The results files named (each must exist), else ``$PATCHBENCH_HOME/results.jsonl``."""
    from ssl_patchbench.core.paths import home

    for path in paths:
        if not Path(path).expanduser().is_file():
            raise UserError(f"no results file {path}: run patchbench eval (--results FILE) first")
    return [Path(p).expanduser() for p in paths] or [home() / "results.jsonl"]


# ---------------------------------------------------------------- patchbench table


@click.command("table")
@click.argument("names", nargs=-1)
@click.option("--results", "paths", multiple=True, type=click.Path(dir_okay=False), help="Results JSONL (repeatable).")
@click.option("--bind", "binds", multiple=True, help="SLOT=MODEL@CKPT: a checkpoint file or sha256 prefix per row.")
@click.option("--bindings", type=click.Path(dir_okay=False), help="YAML mapping of slot -> MODEL@CKPT.")
@click.option("--spec", "specs", multiple=True, type=click.Path(dir_okay=False), help="Extra table YAML (repeatable).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="terminal",
    show_default=True,
    help="How to print the tables.",
)
@click.option("--paper/--no-paper", default=False, show_default=True, help="The paper's numbers alone.")
@click.option("--slots/--no-slots", default=False, show_default=True, help="List the slots and their bindings.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to a file instead of stdout.")
def table(names, paths, binds, bindings, specs, fmt, paper, slots, output) -> None:
    """The paper's tables, filled from stored results.

    table1..table5 and figure2 (all by default). Each cell reads ours / paper (ours - paper); an empty cell's
    footnote is the `patchbench eval` that fills it.
    """
    from ssl_patchbench.reporting import render as R
    from ssl_patchbench.reporting import tables as T
    from ssl_patchbench.results.records import read_many

    all_specs, bound = T.load_tables([Path(s) for s in specs])
    if bindings:
        bound.update(T.load_bindings(Path(bindings), all_specs))
    bound.update(T.resolve_bindings(all_specs, dict(T.parse_binding(b) for b in binds)))
    chosen = T.select_tables(all_specs, names)
    if slots:
        _print_slots(chosen, bound)
        return
    files = _results_paths(paths)
    records = [] if paper else read_many(p for p in files if p.is_file())
    filled = R.build(chosen, records, bound, results=str(files[0]) if len(paths) == 1 else None)
    if fmt == "terminal" and output is None:
        _print_tables(filled, paper_only=paper)
        return
    render = {"markdown": R.markdown, "latex": R.latex, "csv": R.csv_text, "json": R.json_text}
    write_text(render["markdown" if fmt == "terminal" else fmt](filled, paper_only=paper), output)


def _print_slots(specs, bound) -> None:
    grid = Table(title="table slots (bind with --bind SLOT=MODEL@CKPT)")
    for column in ("slot", "model", "checkpoint", "note"):
        grid.add_column(column)
    for spec in specs:
        for row in spec.rows:
            for group in spec.groups:
                slot = spec.slot(row, group)
                b = bound.get(slot)
                model = (b and b.model) or {**spec.select, **row.select}.get("model") or ""
                grid.add_row(slot, model, (b and (b.path or b.checkpoint)) or "", (b and b.note) or "")
    stdout.print(grid)


def _print_tables(filled, *, paper_only: bool) -> None:
    from ssl_patchbench.reporting.render import LEGEND, headers

    for t in filled:
        caption = None if paper_only else escape(LEGEND)
        grid = Table(title=escape(t.spec.title), caption=caption, title_justify="left")
        for i, header in enumerate(headers(t.spec)):
            grid.add_column(escape(header), justify="left" if i == 0 else "right")
        for cells, row in zip(_rows(t), t.grid(paper_only=paper_only), strict=True):
            grid.add_row(escape(row[0]), *(_styled(c, text) for c, text in zip(cells, row[1:], strict=True)))
        stdout.print(grid)
        if not paper_only:
            for i, note in enumerate(t.footnotes, start=1):
                stdout.print(f"[{i}] {note}", soft_wrap=True, markup=False, highlight=False)
        stdout.print()


def _rows(t) -> list[list]:
    width = len(t.spec.columns)
    return [t.cells[i : i + width] for i in range(0, len(t.cells), width)]


def _styled(cell, text: str) -> str:
    if cell.ours is None:
        return f"[dim]{escape(text)}[/dim]"
    if cell.conflicts.get("numbers"):
        return f"[yellow]{escape(text)}[/yellow]"
    return escape(text)


# ---------------------------------------------------------------- patchbench results


@click.command("results")
@click.option("--results", "paths", multiple=True, type=click.Path(dir_okay=False), help="Results JSONL (repeatable).")
@click.option("--model", help="Zoo entry name.")
@click.option("--dataset", help="Dataset name, e.g. cifar10.")
@click.option("--checkpoint", help="sha256 prefix of the weights.")
@click.option("--representation", help="central or a patch count.")
@click.option("--mode", type=click.Choice(["central", "random", "grid", "sliding"]), help="How patches were sampled.")
@click.option("--aggregation", help="mean, concat, gridpool(K,S).")
@click.option("--space", type=click.Choice(["embedding", "projection"]), help="Backbone or projector features.")
@click.option("--protocol", help="Records that measured knn, linear or a metric such as knn@200.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["terminal", "csv", "json"]),
    default="terminal",
    show_default=True,
    help="A table for people, or every field as CSV or JSON lines.",
)
@click.option("--export", "export_path", type=click.Path(dir_okay=False), help="Write a .csv or .parquet file.")
def results(paths, model, dataset, checkpoint, representation, mode, aggregation, space, protocol, fmt, export_path):
    """List, filter and export stored results.

    One row per evaluation; a rerun on reused cached features is marked (it measured nothing new).
    """
    from ssl_patchbench.results.records import export_rows, flatten, read_many, select_records

    files = _results_paths(paths)
    records = read_many(p for p in files if p.is_file())
    criteria = dict(model=model, dataset=dataset, checkpoint=checkpoint, representation=representation)
    criteria.update(mode=mode, aggregation=aggregation, space=space, protocol=protocol)
    chosen = select_records(records, **criteria)
    rows = [flatten(r) for r in chosen]
    if export_path:
        stderr.print(f"wrote {len(rows)} results to {export_rows(rows, Path(export_path))}")
        return
    if fmt == "json":
        click.echo("".join(json.dumps(r, default=str) + "\n" for r in rows), nl=False)
    elif fmt == "csv":
        import pandas as pd

        click.echo(pd.DataFrame(rows).to_csv(index=False), nl=False)
    elif not rows:
        stderr.print(f"no results match in {', '.join(map(str, files))}")
    else:
        stdout.print(_results_table(chosen))


def _results_table(records: list[dict]) -> Table:
    """One line per record at 120 columns: the full date, what was measured on what, rounded top-1 numbers.

    A rerun on reused cached features is marked ↺ (not a new measurement), a record of a subset † (sizes shown);
    a column shrinks (``…``) rather than wrap a row over several lines.
    """
    from ssl_patchbench.results.records import display_date, flatten, is_reused, is_subset, metric_names

    rows = [flatten(r) for r in records]
    metrics = sorted({m for r in records for m in metric_names(r)}, key=lambda m: (m == "linear", len(m), m))
    reused = sum(map(is_reused, records))
    title = f"{len(records)} stored results" + (f" ({reused} rerun(s) on reused cached features, ↺)" if reused else "")
    grid = Table(title=title, box=None, pad_edge=False, collapse_padding=True, header_style="bold underline")
    for column in ("date", "model", "sha256", "data (train/test)", "patches", "agg", "space", *metrics):
        fixed = {"date": 16, "sha256": 8}.get(column, len(column) if column in metrics else None)  # never shrink
        grid.add_column(column, no_wrap=True, justify="right" if column in metrics else "left", min_width=fixed)
    for record, r in zip(records, rows, strict=True):
        patches = _patches_text(r) + (" ↺" if is_reused(record) else "")
        data = f"{r['dataset']} {_count(r['n_train'])}/{_count(r['n_test'])}" + ("†" if is_subset(record) else "")
        grid.add_row(
            display_date(record),
            str(r["model"]),
            str(r["checkpoint_sha256"] or "")[:8],
            data,
            patches,
            str(r["aggregation"]),
            str(r["space"]),
            *("—" if r.get(m) is None else f"{r[m]:.2f}" for m in metrics),
        )
    return grid


def _count(n: int | None) -> str:
    """``50000`` -> ``50k`` (round thousands from ten thousand up), any other count exact."""
    if n is None:
        return "?"
    return f"{n // 1000}k" if n >= 10_000 and n % 1000 == 0 else str(n)


def _patches_text(row: dict) -> str:
    """``central``, ``16 × 0.2`` (RandomResizedCrop boxes of that scale), ``25 sliding``, ``9 grid``."""
    if row["mode"] == "central":
        return "central"
    if row["scale"] is not None:
        return f"{row['representation']} × {row['scale']}"
    return f"{row['representation']} {row['mode']}"


# ---------------------------------------------------------------- patchbench check


@click.command("check")
@click.option("--baseline", help="A results JSONL to match, or 'zoo' (the model's reference numbers).")
@click.option("--min", "minimums", multiple=True, help="Floor [REPRESENTATION[/AGGREGATION]/]METRIC=VALUE.")
@click.option(
    "--tolerance", type=FiniteFloat(min=0.0), default=0.2, show_default=True, help="Points below baseline allowed."
)
@click.option("--report-dir", type=click.Path(file_okay=False), help="Write check.json, check.md, junit.xml.")
@eval_options
def check(baseline, minimums, tolerance, report_dir, as_json, nproc, **options) -> None:
    """CI gate: evaluate and fail on a regression.

    Compares each metric with baseline - tolerance; exit 1 on a regression.
    """
    from ssl_patchbench.reporting.check import load_baselines, run_check, write_reports

    if nproc != 1:
        raise UserError("patchbench check runs in one process: drop --nproc")
    cfg = build_config(options)
    expectations = load_baselines(baseline, minimums, model=cfg.model, dataset=cfg.dataset)  # before evaluating
    if report_dir:
        ensure_dir(Path(report_dir))  # a folder below a file fails now, not after the evaluation
    with progress() as factory:
        report = run_check(cfg, expectations, tolerance=tolerance, progress=factory)
    if report_dir:
        for kind, path in write_reports(report, Path(report_dir)).items():
            stderr.print(f"{kind} report: {path}")
    if as_json:
        click.echo(json.dumps(report.to_dict(), default=str))
    else:
        _print_check(report)
    if not report.passed:
        sys.exit(1)


def _print_check(report) -> None:
    grid = Table(title=f"patchbench check: {report.model} on {report.dataset} (tolerance {report.tolerance:g})")
    for column in ("representation", "aggregation", "metric", "value", "baseline", "floor", "diff", "status", "source"):
        grid.add_column(column, justify="right" if column in ("value", "baseline", "floor", "diff") else "left")
    for c in report.comparisons:
        status = "[green]ok[/green]" if c.passed else "[bold red]REGRESSION[/bold red]"
        numbers = (f"{c.value:.2f}", f"{c.baseline:.2f}", f"{c.floor:.2f}", f"{c.diff:+.2f}")
        grid.add_row(c.representation, c.aggregation, c.metric, *numbers, status, c.source)
    stdout.print(grid)
    for note in dict.fromkeys(n for c in report.comparisons for n in c.notes):  # each sentence once
        stderr.print(f"note: {note}", markup=False, soft_wrap=True)
    if report.passed:
        stdout.print(f"check passed: {len(report.comparisons)} metrics at or above their floor")
    else:
        stdout.print(f"check FAILED: {len(report.regressions)} of {len(report.comparisons)} metrics regressed")
