"""Figure 2: accuracy against the pretraining crop scale and the number of patches, from stored results.

Records are grouped by the checkpoint's pretraining scale (``zoo_entry.pretrain_crop_scale``, taken from the
checkpoint's own metadata where it has some; ``pretrain_scale`` in records of protocol 1; or a label the
user maps to a model name, checkpoint path or sha256 prefix) and by representation (central, 1, 16, ...).
One figure holds only records of one data split and protocol, one curve only records of one checkpoint (those
most records share); the others are left out with a note saying why. When a point holds several records the
newest wins, as in the append-only results store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.results.records import (
    comparable,
    drop_reused_duplicates,
    is_subset,
    metric_value,
    record_date,
    scale_label,
    select_records,
)

METRICS = ("linear", "knn@20", "knn@200")


def _scale_sort(label: str) -> tuple:
    """Fixed scales first by size, then ranges (the paper's Figure 2 order); unparsable labels last."""
    try:
        parts = [float(p) for p in label.split("-")]
    except ValueError:
        return (2, 0.0, 0.0, label)
    return (0 if len(parts) == 1 else 1, parts[0], parts[-1], label)


def _representation_sort(rep: str) -> tuple[int, int]:
    return (0, 0) if rep == "central" else (1, int(rep)) if rep.isdigit() else (2, 0)


def _record_scale(record: dict, mapping: dict[str, str]) -> str:
    """The user's label for this record's model, checkpoint or sha256 prefix, else the zoo entry's scale."""
    checkpoint = str(record.get("checkpoint") or "")
    sha = str(record.get("checkpoint_sha256") or "")
    for key, label in mapping.items():
        if key in (record.get("model"), checkpoint, Path(checkpoint).name) or (len(key) >= 6 and sha.startswith(key)):
            return label
    entry = record.get("zoo_entry") or {}
    return scale_label(entry.get("pretrain_crop_scale") or entry.get("pretrain_scale")) or "unknown"


@dataclass
class ScaleTable:
    """The figure's points (one row per pretraining scale and representation) and why records were left out."""

    table: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def scale_table(
    records: list[dict],
    *,
    metric: str = "linear",
    dataset: str | None = None,
    space: str = "embedding",
    labels: dict[str, str] | None = None,
    model: str | None = None,
) -> ScaleTable:
    """One row per (pretraining scale, representation): the accuracy of the newest comparable record.

    The figure keeps the data split and protocol most of the records share, each curve the checkpoint most
    of its records share (the newest on a tie); what does not fit is left out with a note. Reruns on reused
    features count once.
    """
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}: choose {', '.join(METRICS)}")
    if not records:
        raise UserError("no results records found: run `patchbench eval ...` first, or pass --results FILE")
    chosen = select_records(records, model=model, dataset=dataset, space=space, aggregation="mean")
    found = [r for r in chosen if metric_value(r, metric) is not None]  # mean-aggregated bags and central views
    if not found:
        raise UserError(f"no results records with {metric} for space {space}" + (f" on {dataset}" if dataset else ""))
    datasets = sorted({str(r.get("dataset")) for r in found})
    if len(datasets) > 1:
        raise UserError(f"the records hold several datasets ({', '.join(datasets)}): pick one with --dataset")
    found, reused = drop_reused_duplicates(sorted(found, key=record_date))
    notes = [f"{reused} rerun(s) on reused cached features counted once"] if reused else []
    figure = comparable(found, ("data", "protocol"), what="the records shown")
    notes += figure.notes
    by_scale: dict[str, list[dict]] = {}
    for record in figure.kept:
        by_scale.setdefault(_record_scale(record, labels or {}), []).append(record)
    kept = []
    for scale, group in by_scale.items():
        curve = comparable(group, ("checkpoint",), what=f"the curve of scale {scale}")
        kept += curve.kept
        notes += [f"{note}; tell checkpoints apart with --scale-label KEY=LABEL" for note in curve.notes]
    frame = pd.DataFrame([_row(r, metric, labels or {}) for r in sorted(kept, key=record_date)])
    grouped = frame.groupby(["scale", "representation"], sort=False)
    table = grouped.tail(1).set_index(["scale", "representation"])
    table["n_records"] = grouped.size()
    table = table.reset_index()
    table["_order"] = [
        (_scale_sort(s), _representation_sort(r)) for s, r in zip(table.scale, table.representation, strict=True)
    ]
    return ScaleTable(table.sort_values("_order").drop(columns="_order").reset_index(drop=True), notes)


def _row(record: dict, metric: str, labels: dict[str, str]) -> dict:
    patches = record.get("patches") or {}
    return {
        "scale": _record_scale(record, labels),
        "representation": str(record.get("representation")),
        "mode": patches.get("mode"),
        "dataset": record.get("dataset"),
        "model": record.get("model"),
        "checkpoint_sha256": record.get("checkpoint_sha256"),
        "metric": metric,
        "accuracy": metric_value(record, metric),
        "n_train": record.get("n_train"),
        "n_test": record.get("n_test"),
        "subset": is_subset(record),
        "date": record_date(record) or None,
    }


def parse_labels(pairs: tuple[str, ...]) -> dict[str, str]:
    """``KEY=LABEL`` pairs (KEY: model name, checkpoint path or file name, or sha256 prefix)."""
    labels = {}
    for pair in pairs:
        key, sep, label = pair.partition("=")
        if not sep or not key or not label:
            raise UserError(f"--scale-label takes KEY=LABEL (e.g. my_ckpt.ckpt=0.2), got {pair!r}")
        labels[key] = label
    return labels


def plot_scales(table: pd.DataFrame):
    """Accuracy against the number of patches, one line per pretraining scale; with two or more scales also
    accuracy against the scale, one line per representation (the paper's Figure 2 layout)."""
    from .figures import COLUMN_IN, DOUBLE_IN, SERIES_COLORS, new_figure, styled

    scales = list(dict.fromkeys(table.scale))
    reps = sorted(dict.fromkeys(table.representation), key=_representation_sort)
    metric = table.metric.iloc[0]
    with styled():
        fig = new_figure(COLUMN_IN if len(scales) < 2 else DOUBLE_IN, 2.3)
        axes = fig.subplots(1, 1 if len(scales) < 2 else 2, squeeze=False)[0]
        for i, scale in enumerate(scales):
            rows = table[table.scale == scale].set_index("representation").reindex(reps)
            axes[0].plot(range(len(reps)), rows.accuracy, "-o", color=SERIES_COLORS[i % 8], label=f"scale {scale}")
        _axis(axes[0], reps, "representation (number of patches averaged)", metric)
        axes[0].legend(title="pretraining crop scale" if len(scales) > 1 else None, loc="best")
        if len(scales) >= 2:
            for j, rep in enumerate(reps):
                rows = table[table.representation == rep].set_index("scale").reindex(scales)
                label = rep if rep == "central" else f"{rep} patch" + ("es" if rep != "1" else "")
                axes[1].plot(range(len(scales)), rows.accuracy, "-o", color=SERIES_COLORS[j % 8], label=label)
            _axis(axes[1], scales, "pretraining crop scale", metric)
            axes[1].legend(loc="best")
        title = f"{table.dataset.iloc[0]}, {table.n_train.iloc[0]:,} train / {table.n_test.iloc[0]:,} test images"
        if table.subset.any():
            title += " (a subset)"
        fig.suptitle(title, fontsize=7)
    return fig


def _axis(ax, ticks: list[str], xlabel: str, metric: str) -> None:
    ax.set_xticks(range(len(ticks)), ticks)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} top-1 accuracy (%)")
    ax.grid(alpha=0.3, linewidth=0.4)


def write_scales(table: pd.DataFrame, out: Path) -> list[Path]:
    """``scales.csv`` and ``scales.png`` under ``out``."""
    from .figures import save_png

    out.mkdir(parents=True, exist_ok=True)
    csv = out / "scales.csv"
    table.to_csv(csv, index=False, float_format="%.4f")
    return [csv, save_png(plot_scales(table), out / "scales.png")]
