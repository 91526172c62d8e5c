"""Typed access to results records: which fields change the numbers, dates, metrics, flat rows, filters, which
records may share a table or a curve, export.

Every reader of records (tables, the CI gate, figures, the report, ``patchbench results``) goes through here, so
they all agree on what a record measured and on which records must not be compared.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.core.labels import aggregation_label
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


def record_date(record: dict) -> str:
    """When a record was measured (ISO 8601 text, sortable; empty when unknown)."""
    return str((record.get("environment") or {}).get("date") or "")


def display_date(record: dict) -> str:
    """``2026-12-01 19:24`` (UTC, as recorded): the whole date and the minute, for tables people read."""
    return record_date(record)[:16].replace("T", " ")


def newest_first(records: Iterable[dict]) -> list[dict]:
    """``records`` from the newest to the oldest (the order of the file for equal dates)."""
    return sorted(records, key=record_date, reverse=True)


def is_reused(record: dict) -> bool:
    """Whether a record was computed from features all reused from an earlier run (not a new measurement)."""
    return record.get("reused_features") is True


def drop_reused_duplicates(records: Sequence[dict]) -> tuple[list[dict], int]:
    """``records`` without the reruns on reused features that another record already measured, and how many
    were dropped: the same features under the same protocol give the same numbers, so they count once."""
    measured = {_measurement(r) for r in records if not is_reused(r)}
    kept = [r for r in records if not (is_reused(r) and _measurement(r) in measured)]
    return kept, len(records) - len(kept)


def _measurement(record: dict) -> str:
    return json.dumps([representation_key(record), provenance(record)], sort_keys=True, default=str)


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
    return dotted(picked)


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


# ---------------------------------------------------------------- which records may be compared

# What two records must agree on to share a curve, a table or a figure; each aspect names record fields.
ASPECTS = {
    "checkpoint": ("checkpoint_sha256", "zoo_entry"),
    "data": ("dataset", "data", "n_train", "n_test"),
    "protocol": ("precision", "store_dtype", "seed", "protocol"),
}
# The full standard splits (train, test images) of the datasets patchbench opens by name.
FULL_SPLITS = {
    "cifar10": (50_000, 10_000),
    "cifar100": (50_000, 10_000),
    "stl10": (5_000, 8_000),
    "imagenet": (1_281_167, 50_000),
    "imagenet100": (126_689, 5_000),
    "imagenette": (9_469, 3_925),
}


@dataclass
class Comparable:
    """The records that agree with a reference on the asked aspects, and a note for each kind left out."""

    kept: list[dict]
    left_out: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def comparable(records: Sequence[dict], aspects: Sequence[str], *, what: str = "the rest") -> Comparable:
    """Split ``records`` into those agreeing on every aspect with a reference and those left out, with one
    sentence per reason (``what`` names the records kept, e.g. ``the curve of scale 0.2``).

    The reference is a record of the largest group that agrees exactly (the newest one on a tie), so a stray run
    on another subset is what is left out, not the bulk of the results.
    """
    if not records:
        return Comparable([])
    flat = [provenance(r) for r in records]
    keys = [_aspect_key(f, aspects) for f in flat]
    counts = Counter(keys)
    best = max(range(len(records)), key=lambda i: (counts[keys[i]], record_date(records[i]), i))
    reference, reference_flat = records[best], flat[best]
    kept: list[dict] = []
    out: dict[str, list[dict]] = {}
    for record, record_flat in zip(records, flat, strict=True):
        differ = _by_aspect(_differing([reference_flat, record_flat]), aspects)
        if differ:
            out.setdefault(_reason(reference, record, differ), []).append(record)
        else:
            kept.append(record)
    notes = [f"{_records(len(left))} left out: {reason}, unlike {what}" for reason, left in out.items()]
    return Comparable(kept, [r for left in out.values() for r in left], notes)


def _records(n: int) -> str:
    return f"{n} record" + ("s" if n != 1 else "")


def _aspect_key(flat: dict[str, object], aspects: Sequence[str]) -> str:
    fields = {k: v for k, v in flat.items() if k.split(".")[0] in _aspect_fields(aspects)}
    return json.dumps(fields, sort_keys=True, default=str)


def _aspect_fields(aspects: Sequence[str]) -> set[str]:
    return {name for aspect in aspects for name in ASPECTS[aspect]}


def _by_aspect(fields: list[str], aspects: Sequence[str]) -> dict[str, list[str]]:
    """Aspect -> the differing dotted fields that belong to it (aspects without any left out)."""
    out = {}
    for aspect in aspects:
        found = [f for f in fields if f.split(".")[0] in ASPECTS[aspect]]
        if found:
            out[aspect] = found
    return out


def _reason(reference: dict, record: dict, differ: dict[str, list[str]]) -> str:
    parts = []
    if "checkpoint" in differ:
        sha = str(record.get("checkpoint_sha256") or "?")[:8]
        parts.append(f"checkpoint {sha}" if "checkpoint_sha256" in differ["checkpoint"] else "another zoo entry")
    if "data" in differ:
        mine, theirs = data_sizes(record), data_sizes(reference)
        parts.append(f"measured on {mine}" if mine != theirs else "measured on other image files")
    if "protocol" in differ:
        parts.append(f"another protocol ({', '.join(differ['protocol'])})")
    return "; ".join(parts)


def data_sizes(record: dict) -> str:
    """``cifar10, train 1,000 / test 1,000 images`` (per class when the run took a per-class subset)."""
    data = record.get("data") or {}
    parts = []
    for split in ("train", "test"):
        n, per_class = record.get(f"n_{split}"), (data.get(split) or {}).get("per_class")
        count = "?" if n is None else f"{n:,}"
        parts.append(f"{split} {count}" + (f" ({per_class}/class)" if per_class else ""))
    return f"{record.get('dataset')}, {' / '.join(parts)} images"


def subset_note(record: dict) -> str | None:
    """A sentence when ``record`` was not measured on its dataset's full standard split, else None.

    A per-class subset, or sizes unlike the standard split (a folder written by ``materialize.py --per-class``),
    are subsets; a dataset without a known standard split states its sizes.
    """
    full = FULL_SPLITS.get(str(record.get("dataset")))
    data = record.get("data") or {}
    per_class = any((data.get(s) or {}).get("per_class") for s in ("train", "test"))
    if full is None:
        return f"measured on {data_sizes(record)} (no standard split known)"
    if not per_class and (record.get("n_train"), record.get("n_test")) == full:
        return None
    return f"subset: measured on {data_sizes(record)}; the full split is {full[0]:,} / {full[1]:,}"


def is_subset(record: dict) -> bool:
    """Whether ``record`` was measured on less (or other) than its dataset's full standard split."""
    return str(record.get("dataset")) in FULL_SPLITS and subset_note(record) is not None


def skipped_images(record: dict) -> dict[str, dict[str, str]]:
    """Split -> {file: problem} of the image files ``--skip-bad-images`` left out (empty for older records and
    runs without the option)."""
    found = record.get("skipped_images") or {}
    return {split: dict(files) for split, files in found.items() if files}


def skipped_notes(record: dict, *, shown: int = 3) -> list[str]:
    """One sentence per split that had files left out, naming the first ``shown`` of them and their problem."""
    notes = []
    for split, files in skipped_images(record).items():
        named = ", ".join(f"{name} ({problem})" for name, problem in list(files.items())[:shown])
        more = f" and {len(files) - shown:,} more" if len(files) > shown else ""
        count = f"{len(files):,} image file" + ("s" if len(files) != 1 else "")
        notes.append(f"{split}: left out {count} that cannot be decoded (--skip-bad-images): {named}{more}")
    return notes


def _differing(flat: list[dict[str, object]]) -> list[str]:
    keys = sorted({k for f in flat for k in f})
    differing = []
    for key in keys:
        values = {json.dumps(f[key], sort_keys=True, default=str) for f in flat if f.get(key) is not None}
        if len(values) > 1:
            differing.append(key)
    return differing


def dotted(value: dict) -> dict[str, object]:
    """Nested mappings as one flat mapping with dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``); lists stay
    values and an empty mapping holds no field."""
    import pandas as pd

    return pd.json_normalize(value, sep=".").to_dict(orient="records")[0] if value else {}


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
        "scale": scale_label(p.get("scale")) if p.get("mode") == "random" and p.get("size") is None else None,
        "size": p.get("size"),
        "stride": p.get("stride"),
        "aggregation": record.get("aggregation"),
        "space": record.get("space"),
        "readout": readout_label(record),
        "seed": record.get("seed"),
        "precision": record.get("precision"),
        "reused_features": is_reused(record),
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


def scale_label(value: object) -> str | None:
    """A patch or crop scale as tables and figures print it: ``[0.2, 0.2]`` -> ``0.2``, ``[0.08, 1]`` -> ``0.08-1``."""
    if not isinstance(value, (list, tuple)) or not value:
        return None
    lo, hi = float(value[0]), float(value[-1])
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


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
    wanted = {"model": model, "dataset": dataset, "representation": representation}
    agg = aggregation_label(aggregation) if aggregation else None
    kept = []
    for record in records:
        if any(v is not None and str(record.get(k)) != v for k, v in wanted.items()):
            continue
        if space and record.get("space", "embedding") != space:  # records from before projections: embedding
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
