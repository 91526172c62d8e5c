"""One self-contained static HTML page: results tables and figures (inlined as base64 PNG), no external assets.

A report is built from sections (text, tables, figures) so that it can hold a set of results records, the
image analyses of one model, or both. Rendering is plain string assembly with escaping: no template engine.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
from dataclasses import dataclass, field

import pandas as pd

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.results.records import display_date, drop_reused_duplicates, flatten, is_subset

from .. import __version__

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;
color:#222;line-height:1.45}
h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:32px}
h3{font-size:15px;margin:18px 0 6px}.meta{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:8px 0 14px}th,td{padding:3px 9px;text-align:right}
th{border-bottom:2px solid #444;background:#f4f4f4}td{border-bottom:1px solid #e4e4e4;white-space:nowrap}
td:first-child,th:first-child{text-align:left}figure{margin:10px 0 18px}
figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#444;margin-top:4px}
.small img{max-width:520px}
"""


@dataclass
class Section:
    """A titled part of the report: paragraphs, then tables, then figures (PNG bytes)."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figures: list[tuple[str, bytes]] = field(default_factory=list)
    small_figures: bool = False


def _table_html(caption: str, table: pd.DataFrame) -> str:
    body = table.to_html(index=False, border=0, na_rep="—", float_format=lambda v: f"{v:.3f}", escape=True)
    return f"<h3>{html.escape(caption)}</h3>\n{body}"


def _png_width(png: bytes) -> int:
    """Pixel width from the PNG header (0 when not a PNG)."""
    return int.from_bytes(png[16:20], "big") if png[:8] == b"\x89PNG\r\n\x1a\n" else 0


def _figure_html(caption: str, png: bytes, small: bool) -> str:
    """Column-width figures (under ~5 in at 300 dpi) are shown at column size, full-width ones at page width."""
    data = base64.b64encode(png).decode("ascii")
    css = ' class="small"' if small or 0 < _png_width(png) < 1500 else ""
    return (
        f'<figure{css}><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def render_html(title: str, sections: list[Section], meta: dict[str, str] | None = None) -> str:
    """The whole page as one string; every asset is inline, so the file can be mailed or archived alone."""
    if not sections:
        raise UserError("nothing to report: give results records (--results) or a model (--model)")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {**(meta or {}), "generated": f"{stamp} by patchbench {__version__}"}
    lines = " · ".join(f"{html.escape(k)}: {html.escape(str(v))}" for k, v in meta.items())
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f'<h1>{html.escape(title)}</h1><p class="meta">{lines}</p>',
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [f"<p>{html.escape(p)}</p>" for p in section.paragraphs]
        parts += [_table_html(caption, table) for caption, table in section.tables]
        parts += [_figure_html(caption, png, section.small_figures) for caption, png in section.figures]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def results_frame(records: list[dict]) -> pd.DataFrame:
    """The results records as one table, a row per evaluation (newest last), with the checkpoint it measured."""
    columns = {"model": "model", "checkpoint": "checkpoint", "dataset": "dataset", "representation": "representation"}
    columns |= {"mode": "mode", "aggregation": "aggregation", "space": "space"}
    columns |= {"knn@20": "kNN@20", "knn@200": "kNN@200", "linear": "linear", "device": "device"}
    rows = []
    for record in records:
        flat = {**flatten(record), "checkpoint": str(record.get("checkpoint_sha256") or "")[:8] or None}
        row = {name: flat.get(key) for key, name in columns.items()}
        row["train/test"] = f"{record.get('n_train')}/{record.get('n_test')}" + ("†" if is_subset(record) else "")
        row["date"] = display_date(record)
        rows.append(row)
    return pd.DataFrame(rows)


def records_sections(records: list[dict], *, metric: str = "linear") -> list[Section]:
    """The results table, then the scale figure of each dataset the records hold (comparable records only)."""
    from .figures import png_bytes
    from .scales import plot_scales, scale_table

    if not records:
        return []
    records, reused = drop_reused_duplicates(records)
    intro = f"{len(records)} evaluations, oldest first; †: measured on a subset of the dataset's full split."
    if reused:
        intro += f" {reused} rerun(s) on reused cached features left out: they measured nothing new."
    sections = [Section("Results records", [intro], [("Evaluations", results_frame(records))])]
    for dataset in sorted({str(r.get("dataset")) for r in records}):
        try:
            scales = scale_table(records, metric=metric, dataset=dataset)  # already one model's records when asked
        except UserError as exc:
            sections[0].paragraphs.append(f"{dataset}: no scale figure ({exc}).")
            continue
        table = scales.table
        shown = table[["scale", "representation", "checkpoint_sha256", "accuracy", "n_records", "n_train", "n_test"]]
        shown = shown.assign(checkpoint_sha256=shown.checkpoint_sha256.str[:8]).rename(
            columns={"checkpoint_sha256": "checkpoint"}
        )
        sections.append(
            Section(
                f"{dataset}: accuracy against pretraining scale and patches (paper Fig. 2)",
                [
                    f"Metric: {metric} top-1 (%), embedding space, mean aggregation; the newest record of each cell, "
                    "one checkpoint per curve, one data split and protocol per figure.",
                    *(f"Note: {note}." for note in scales.notes),
                ],
                [("Accuracy by pretraining scale and representation", shown)],
                [("Accuracy against the number of patches averaged", png_bytes(plot_scales(table)))],
            )  # one panel is column-sized, two (several scales) take the page width
        )
    return sections


def model_sections(
    inputs, embedder, *, converge_images, bank_images, heatmap_images, queries: int = 300, k: int = 10, seed: int = 0
) -> list[Section]:
    """Convergence, neighbour statistics and heatmaps of one model on one split (the image analyses)."""
    from .converge import plot_converge, run_converge
    from .figures import png_bytes
    from .heatmap import plot_heatmaps, run_heatmap
    from .neighbors import run_neighbors
    from .neighbors_plot import plot_neighbor_grid, plot_neighbor_stats

    spaces = ("embedding", "projection") if inputs.model.projector is not None else ("embedding",)
    conv = run_converge(inputs, embedder, images=converge_images, spaces=spaces, seed=seed)
    conv_table = conv.table.pivot_table(index="n_patches", columns=["space", "reference"], values="mean")
    conv_table.columns = [f"{s} vs {r}" for s, r in conv_table.columns]
    nb = run_neighbors(inputs, embedder, images=bank_images, spaces=spaces, queries=queries, k=k, seed=seed)
    stats = pd.DataFrame({space: vars(s) for space, s in nb.stats.items()}).T.rename_axis("space").reset_index()
    heat = run_heatmap(inputs, embedder, images=heatmap_images, spaces=spaces)
    return [
        Section(
            "Convergence of the bag of patches (paper Fig. 3a)",
            [f"{conv.images} images, {conv.windows} windows of {conv.patch_size} px at stride {conv.stride}."],
            [("Mean cosine similarity of the N-patch mean", conv_table.reset_index())],
            [("Cosine similarity against N", png_bytes(plot_converge(conv)))],
            small_figures=True,
        ),
        Section(
            "Nearest patches (paper Fig. 4)",
            [
                f"{nb.settings['queries']} queries, k = {k}, bank of {nb.settings['bank_patches']} patches from "
                f"{nb.settings['images']} images; chance: {', '.join(f'{n} {v:.3f}' for n, v in nb.chance.items())}."
            ],
            [("Where the nearest patches come from", stats)],
            [
                ("Share of neighbours by relation to the query", png_bytes(plot_neighbor_stats(nb))),
                ("Queries and their nearest patches", png_bytes(plot_neighbor_grid(nb, inputs))),
            ],
        ),
        Section(
            "Patch similarity heatmaps (paper Fig. 5)",
            figures=[("Similarity of every window to the query window", png_bytes(plot_heatmaps(heat, inputs)))],
            small_figures=True,
        ),
    ]
