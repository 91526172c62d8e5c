"""The one schema a results record is checked against when it is read back.

Every field is optional (older schemas lack some, tests and tools write partial records), but a field that is
present must have its type, nested fields included: a hand-edited or foreign line with ``"n_train": "40"`` or
``"metrics": "high"`` is skipped with a warning instead of reaching a table, a check or a figure as a number.
"""

from __future__ import annotations

from typing import Any

Number = (int, float)
Text = (str,)
Count = (int,)
Mapping = (dict,)

# top-level field -> accepted types; representation is "central" or a patch count (older records: an int)
FIELDS: dict[str, tuple[type, ...]] = {
    "schema_version": Count,
    "model": Text,
    "dataset": Text,
    "checkpoint": Text,
    "checkpoint_sha256": Text,
    "representation": (str, int),
    "aggregation": Text,
    "space": Text,
    "precision": Text,
    "store_dtype": Text,
    "n_train": Count,
    "n_test": Count,
    "seed": Count,
    "dim": Count,
    "patches": Mapping,
    "data": Mapping,
    "protocol": Mapping,
    "zoo_entry": Mapping,
    "environment": Mapping,
    "timings": Mapping,
    "metrics": Mapping,
    "feature_stores": Mapping,
    "skipped_images": Mapping,  # split -> {file: problem}, from --skip-bad-images (newer records only)
}
PATCH_FIELDS: dict[str, tuple[type, ...]] = {
    "mode": Text,
    "n": Count,
    "size": Count,
    "stride": Count,
    "grid": Count,
    "out_size": Count,
    "resize": Count,
    "seed": Count,
}


def record_problem(record: dict[str, Any]) -> str | None:
    """What makes ``record`` unusable (``"field 'n_train' has type str, expected int"``), or None when it is fine."""
    problem = _fields(record, FIELDS, "")
    nested = (
        ("patches", lambda v: _fields(v, PATCH_FIELDS, "patches.") or _pairs(v)),
        ("metrics", _metrics),
        ("data", lambda v: _fields(v, dict.fromkeys(v, Mapping), "data.")),
        ("environment", lambda v: _fields(v, {"date": Text, "device": Text}, "environment.")),
        ("timings", lambda v: _fields(v, {"extraction_train": Mapping, "extraction_test": Mapping}, "timings.")),
        ("skipped_images", _skipped),
    )
    for name, check in nested:
        if problem is None and isinstance(record.get(name), dict):
            problem = check(record[name])
    return problem


def _ok(value: object, types: tuple[type, ...]) -> bool:
    """``value`` is None or one of ``types`` (a bool is not a number here, though Python says it is an int)."""
    return value is None or (isinstance(value, types) and not isinstance(value, bool))


def _kind(value: object) -> str:
    return type(value).__name__


def _fields(obj: dict, fields: dict[str, tuple[type, ...]], prefix: str) -> str | None:
    for name, types in fields.items():
        if name in obj and not _ok(obj[name], types):
            expected = " or ".join(t.__name__ for t in types)
            return f"field '{prefix}{name}' has type {_kind(obj[name])}, expected {expected}"
    return None


def _pairs(patches: dict) -> str | None:
    for name in ("scale", "ratio"):
        value = patches.get(name)
        if value is not None and not (
            isinstance(value, list) and 1 <= len(value) <= 2 and all(_ok(v, Number) and v is not None for v in value)
        ):
            return f"field 'patches.{name}' is {value!r}, expected one or two numbers"
    return None


def _skipped(skipped: dict) -> str | None:
    problem = _fields(skipped, dict.fromkeys(skipped, Mapping), "skipped_images.")
    for split, files in skipped.items():
        if problem is None and isinstance(files, dict):
            problem = _fields(files, dict.fromkeys(files, Text), f"skipped_images.{split}.")
    return problem


def _metrics(metrics: dict) -> str | None:
    for name, found in metrics.items():
        if found is None:
            continue
        if not isinstance(found, dict):
            return f"field 'metrics.{name}' has type {_kind(found)}, expected an object or null"
        for key, value in found.items():
            if key.startswith("top") and value is not None and not (_ok(value, Number) and 0 <= value <= 100):
                return f"field 'metrics.{name}.{key}' is {value!r}, expected an accuracy from 0 to 100 or null"
    return None
