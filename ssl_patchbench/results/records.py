"""Typed access to results records: which fields change the numbers, metrics, flat rows, filters, export.

Every reader of records (tables, the CI gate, figures, the report, ``patchbench results``) goes through here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.results.store import read_records

# ---------------------------------------------------------------- reading records back (tables, checks, export)

# Record fields that change the stored features of a split (its store key hashes them, with its own data).
FEATURE_FIELDS = (
    "checkpoint_sha256",
    "zoo_entry",
    "data",
    "patches",
    "aggregation",
    "space",
    "precision",
    "store_dtype",
)
# Record fields that change the numbers; two records for one table cell must agree on all of them.
NUMBER_FIELDS = (
    "checkpoint_sha256",
    "zoo_entry",
    "dataset",
    "data",
    "n_train",
    "n_test",
    "patches",
    "aggregation",
    "space",
    "precision",
    "store_dtype",
    "seed",
    "protocol",
)
# Where and with what a number was measured: worth a note when records differ, not a conflict.
ENVIRONMENT_FIELDS = ("device", "torch", "cuda", "package_version", "git_sha")
# Zoo-entry fields that do not change a number (a new reference or licence is not a new protocol).
DESCRIPTIVE_ZOO_FIELDS = ("references", "description", "license")


def read_many(paths: Iterable[Path]) -> list[dict]:
    """Records of several results files in the order given; each carries ``_source`` (its file)."""
    records = []
    for path in paths:
        for record in read_records(Path(path)):
            records.append({**record, "_source": str(path)})
    return records


def metric_value(record: dict, metric: str) -> float | None:
    """``linear``, ``knn@20`` (top-1) or ``linear/top5`` of a record; None when it was not measured."""
    name, _, which = metric.partition("/")
    found = (record.get("metrics") or {}).get(name)
    if not isinstance(found, dict):
        return None
    value = found.get(which or "top1")
    return None if value is None else float(value)


def metric_names(record: dict) -> list[str]:
    """The top-1 metrics a record holds, e.g. ``['knn@20', 'knn@200', 'linear']``."""
    return sorted(name for name, m in (record.get("metrics") or {}).items() if isinstance(m, dict))


def representation_key(record: dict) -> tuple:
    """What makes two records the same representation (for baselines): the view, its spec and aggregation.

    Scale and ratio count only for RandomResizedCrop boxes; the seed is not part of it (it is provenance).
    """
    p = record.get("patches") or {}
    mode = p.get("mode")
    rrc = mode == "random" and p.get("size") is None
    scale = tuple(round(float(s), 6) for s in p.get("scale") or ()) if rrc else None
    ratio = tuple(round(float(s), 6) for s in p.get("ratio") or ()) if rrc else None
    layout = (p.get("size"), p.get("stride"), p.get("grid")) if mode != "central" else (None, None, None)
    return (
        str(record.get("representation")),
        mode,
        scale,
        ratio,
        *layout,
        record.get("aggregation", "mean"),
        record.get("space", "embedding"),
        readout_label(record),
    )


def readout_label(record: dict) -> str | None:
    """A ViT record's readout: ``cls``, ``mean`` or ``cls+mean``, with ``@N`` over the last N > 1 blocks; None for
    a CNN (its zoo entry has no ``vit`` block)."""
    vit = (record.get("zoo_entry") or {}).get("vit")
    if not isinstance(vit, dict):
        return None
    last = vit.get("last_blocks", 1)
    return f"{vit.get('pool')}@{last}" if last != 1 else str(vit.get("pool"))


def provenance(record: dict) -> dict[str, object]:
    """The number-changing provenance of a record as flat dotted keys (``data.test.n``, ``protocol.knn.ks``)."""
    picked: dict = {name: record.get(name) for name in NUMBER_FIELDS if name in record}
    if isinstance(picked.get("zoo_entry"), dict):
        picked["zoo_entry"] = {k: v for k, v in picked["zoo_entry"].items() if k not in DESCRIPTIVE_ZOO_FIELDS}
    if isinstance(picked.get("data"), dict):  # where the files were is not what they are
        picked["data"] = {s: {k: v for k, v in (d or {}).items() if k != "root"} for s, d in picked["data"].items()}
    return _dotted(picked)


def measured_with(record: dict) -> dict[str, object]:
    """Device and software versions of a record."""
    env = record.get("environment") or {}
    return {name: env.get(name) for name in ENVIRONMENT_FIELDS}


def disagreements(records: list[dict]) -> dict[str, list[str]]:
    """``{"numbers": [...], "environment": [...]}``: fields whose values differ between ``records``.

    A field absent from a record (an older schema) is not a disagreement; date and wall time always
    differ and are not compared.
    """
    return {
        "numbers": _differing([provenance(r) for r in records]),
        "environment": _differing([measured_with(r) for r in records]),
    }


def _differing(flat: list[dict[str, object]]) -> list[str]:
    keys = sorted({k for f in flat for k in f})
    differing = []
    for key in keys:
        values = {json.dumps(f[key], sort_keys=True, default=str) for f in flat if f.get(key) is not None}
        if len(values) > 1:
            differing.append(key)
    return differing


def _dotted(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict) and value:
        out: dict[str, object] = {}
        for key, inner in value.items():
            out.update(_dotted(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def flatten(record: dict) -> dict:
    """One flat row per record, for listing and CSV/Parquet export."""
    p = record.get("patches") or {}
    env = record.get("environment") or {}
    data = record.get("data") or {}
    row = {
        "date": env.get("date"),
        "model": record.get("model"),
        "checkpoint_sha256": record.get("checkpoint_sha256"),
        "checkpoint": record.get("checkpoint"),
        "dataset": record.get("dataset"),
        "n_train": record.get("n_train"),
        "n_test": record.get("n_test"),
        "train_per_class": (data.get("train") or {}).get("per_class"),
        "test_per_class": (data.get("test") or {}).get("per_class"),
        "representation": record.get("representation"),
        "mode": p.get("mode"),
        "scale": _pair(p.get("scale")) if p.get("mode") == "random" and p.get("size") is None else None,
        "size": p.get("size"),
        "stride": p.get("stride"),
        "aggregation": record.get("aggregation"),
        "space": record.get("space"),
        "readout": readout_label(record),
        "seed": record.get("seed"),
        "precision": record.get("precision"),
    }
    for name in ("knn@20", "knn@200", "linear"):
        row[name] = metric_value(record, name)
    for name in metric_names(record):
        row.setdefault(name, metric_value(record, name))
    extraction = (record.get("timings") or {}).get("extraction_train") or {}
    row.update(
        dim=record.get("dim"),
        patches_per_s=extraction.get("patches_per_s"),
        device=env.get("device"),
        git_sha=env.get("git_sha"),
        package_version=env.get("package_version"),
        source=record.get("_source"),
    )
    return row


def _pair(value: object) -> str | None:
    if not isinstance(value, (list, tuple)) or not value:
        return None
    lo, hi = (float(v) for v in value)
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def aggregation_label(label: str) -> str:
    """``gridpool`` / ``gridpool:3:2`` / ``gridpool(3,2)`` -> ``gridpool(3,2)``."""
    found = re.fullmatch(r"gridpool(?:[:(](\d+)[,:](\d+)\)?)?", label.strip().lower())
    if found is None:
        return label.strip().lower()
    return f"gridpool({found.group(1) or 3},{found.group(2) or 2})"


def select_records(
    records: Iterable[dict],
    *,
    model: str | None = None,
    dataset: str | None = None,
    representation: str | None = None,
    aggregation: str | None = None,
    mode: str | None = None,
    space: str | None = None,
    checkpoint: str | None = None,
    protocol: str | None = None,
) -> list[dict]:
    """Records matching every criterion given: ``checkpoint`` is a sha256 prefix, ``protocol`` an evaluator
    (``knn``, ``linear``) or a metric (``knn@200``) the record measured."""
    wanted = {"model": model, "dataset": dataset, "representation": representation, "space": space}
    agg = aggregation_label(aggregation) if aggregation else None
    kept = []
    for record in records:
        if any(v is not None and str(record.get(k)) != v for k, v in wanted.items()):
            continue
        if agg and aggregation_label(str(record.get("aggregation", "mean"))) != agg:
            continue
        if mode and (record.get("patches") or {}).get("mode") != mode:
            continue
        if checkpoint and not str(record.get("checkpoint_sha256", "")).startswith(checkpoint.lower()):
            continue
        if protocol and not any(m == protocol or m.startswith(protocol + "@") for m in metric_names(record)):
            continue
        kept.append(record)
    return kept


def export_rows(rows: list[dict], path: Path) -> Path:
    """Write flat rows as CSV or Parquet (by the file's suffix) through pandas; Parquet needs pyarrow."""
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise UserError(f"cannot export to {path.name}: use a .csv or .parquet file name")
    frame = pd.DataFrame(rows)
    try:
        if suffix == ".csv":
            frame.to_csv(path, index=False)
        else:
            _require_pyarrow()
            frame.to_parquet(path, index=False)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def _require_pyarrow() -> None:
    import importlib.util

    if importlib.util.find_spec("pyarrow") is None:
        raise UserError("Parquet export needs pyarrow: pip install pyarrow (or export to .csv)")
