"""The CI regression gate: evaluate a checkpoint, compare each metric with a baseline minus a tolerance.

Baselines come from a results JSONL (matched by representation, aggregation and metric), a zoo entry's
reference numbers, or floors given on the command line. The report is JSON, Markdown and JUnit XML.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.core.labels import aggregation_label
from ssl_patchbench.features.extract import ProgressFactory
from ssl_patchbench.models.registry import get_entry
from ssl_patchbench.pipeline.config import EvalConfig
from ssl_patchbench.pipeline.evaluate import evaluate
from ssl_patchbench.results.records import (
    disagreements,
    metric_names,
    metric_value,
    provenance,
    record_date,
    representation_key,
)
from ssl_patchbench.results.store import read_records

# Baseline fields that make it another experiment (another model or protocol): such a baseline is refused.
# The checkpoint is what a check varies, so the entry's source and the weights' hash may differ.
_REFUSED = {
    "zoo_entry.arch": "architecture",
    "zoo_entry.stem": "stem",
    "zoo_entry.preprocessing.": "preprocessing",
    "protocol.knn.temperature": "kNN temperature",
    "protocol.knn.weighted": "kNN voting",
    "protocol.linear.": "linear probe",
}
# Baseline fields that make the numbers less comparable but not another experiment: one note, no failure.
_NOTED = {
    "data.": "images",
    "n_train": "images",
    "n_test": "images",
    "seed": "patch seed",
    "patches.": "patch settings",
    "precision": "forward precision",
    "store_dtype": "store dtype",
}
_ZOO_PROBES = {"linear": "linear", "knn": "knn@20"}


@dataclass(frozen=True)
class Expectation:
    """One number a metric must reach: ``value`` minus the tolerance (or exactly ``value`` for a floor)."""

    metric: str
    value: float
    source: str
    representation: str | None = None  # None: every representation evaluated
    aggregation: str | None = None
    key: tuple | None = None  # results baselines: the exact representation (results.representation_key)
    floor: bool = False  # --min: the value is the floor itself, no tolerance
    record: dict | None = field(default=None, repr=False)

    def applies_to(self, record: dict) -> bool:
        if self.key is not None:
            return representation_key(record) == self.key
        if self.representation is not None and str(record.get("representation")) != self.representation:
            return False
        return self.aggregation is None or record.get("aggregation") == aggregation_label(self.aggregation)


@dataclass(frozen=True)
class Comparison:
    representation: str
    mode: str
    aggregation: str
    metric: str
    value: float
    baseline: float
    floor: float
    source: str
    notes: tuple[str, ...] = ()

    @property
    def diff(self) -> float:
        return round(self.value - self.baseline, 2)

    @property
    def passed(self) -> bool:
        return self.value >= self.floor - 1e-9

    @property
    def name(self) -> str:
        return f"{self.representation}/{self.aggregation}/{self.metric}"

    def to_dict(self) -> dict:
        return {**asdict(self), "notes": list(self.notes), "diff": self.diff, "passed": self.passed}


@dataclass(frozen=True)
class CheckReport:
    model: str
    dataset: str
    tolerance: float
    comparisons: list[Comparison]
    records: list[dict]
    config: dict

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    @property
    def regressions(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]

    def to_dict(self) -> dict:
        first = self.records[0] if self.records else {}
        return {
            "passed": self.passed,
            "model": self.model,
            "dataset": self.dataset,
            "checkpoint_sha256": first.get("checkpoint_sha256"),
            "n_train": first.get("n_train"),
            "n_test": first.get("n_test"),
            "device": (first.get("environment") or {}).get("device"),
            "tolerance": self.tolerance,
            "regressions": len(self.regressions),
            "comparisons": [c.to_dict() for c in self.comparisons],
            "config": self.config,
            "records": self.records,
        }


# ---------------------------------------------------------------- baselines


def results_baseline(path: Path, *, dataset: str, model: str | None = None) -> list[Expectation]:
    """The latest record of each representation of ``dataset`` (and ``model``) in a results JSONL, one expectation
    per metric. A baseline that holds only other datasets or other models is refused, naming what it holds."""
    if not path.is_file():
        raise UserError(f"baseline {path} does not exist: give a results JSONL (patchbench eval --results FILE), zoo")
    records = read_records(path)
    same_data = [r for r in records if r.get("dataset") == dataset]
    if not same_data:
        held = _names(r.get("dataset") for r in records)
        raise UserError(f"baseline {path} holds no {dataset} results (it holds: {held}): use a baseline of {dataset}")
    same = [r for r in same_data if model is None or r.get("model") == model]
    if not same:
        held = _names(r.get("model") for r in same_data)
        raise UserError(
            f"baseline {path} holds {dataset} results of model {held}, not {model}: a check compares checkpoints "
            "of one zoo entry; use a baseline measured with --model " + str(model)
        )
    latest: dict[tuple, list[dict]] = {}
    for record in same:
        latest.setdefault(representation_key(record), []).append(record)
    expectations = []
    for key, records in latest.items():
        record = max(records, key=record_date)
        source = f"{path.name} ({str(record.get('checkpoint_sha256'))[:8]})"
        for metric in metric_names(record):
            value = metric_value(record, metric)
            if value is not None:
                expectations.append(Expectation(metric, value, source, key=key, record=record))
    return expectations


def _names(values) -> str:
    return ", ".join(sorted({str(v) for v in values})) or "nothing readable"


def zoo_baseline(model: str, *, dataset: str) -> list[Expectation]:
    """A zoo entry's reference numbers for ``dataset`` (keys ``<dataset>/<linear|knn>/<central|n>``)."""
    references = get_entry(model).references
    expectations = []
    for key, value in references.items():
        ref_dataset, probe, representation = [*key.split("/"), "", "", ""][:3]
        if ref_dataset == dataset and probe in _ZOO_PROBES:
            expectations.append(Expectation(_ZOO_PROBES[probe], float(value), f"zoo {model}", representation, "mean"))
    if not expectations:
        have = ", ".join(references) or "none"
        raise UserError(f"zoo entry {model} has no reference numbers for {dataset} (it has: {have}); use --min")
    return expectations


_MIN = re.compile(r"(?:(?P<rep>[^/=]+)/(?:(?P<agg>[^/=]+)/)?)?(?P<metric>(?:knn@\d+|linear)(?:/top[15])?)=(?P<v>.+)")


def parse_min(text: str) -> Expectation:
    """``[REPRESENTATION[/AGGREGATION]/]METRIC=VALUE``, e.g. ``linear=80``, ``central/knn@20=75``."""
    found = _MIN.fullmatch(text.strip())
    try:
        value = float(found["v"]) if found else None
    except ValueError:
        value = None
    if found is None or value is None:
        raise UserError(
            f"--min takes [REPRESENTATION[/AGGREGATION]/]METRIC=VALUE (e.g. central/linear=80), got {text!r}"
        )
    return Expectation(found["metric"], value, "--min", found["rep"], found["agg"], floor=True)


def load_baselines(baseline: str | None, minimums: Sequence[str], *, model: str, dataset: str) -> list[Expectation]:
    """Every expectation of a check: ``baseline`` (a results file or ``zoo``) plus ``--min`` floors."""
    expectations = [parse_min(m) for m in minimums]
    if baseline == "zoo":
        expectations += zoo_baseline(model, dataset=dataset)
    elif baseline:
        expectations += results_baseline(Path(baseline).expanduser(), dataset=dataset, model=model)
    if not expectations:
        raise UserError("nothing to check against: give --baseline FILE|zoo and/or --min METRIC=VALUE")
    return expectations


# ---------------------------------------------------------------- comparing


def compare(records: Sequence[dict], expectations: Sequence[Expectation], tolerance: float) -> list[Comparison]:
    """Each evaluated metric against each expectation that applies to it; floors never unmatched."""
    if tolerance < 0:
        raise UserError(f"--tolerance must be >= 0, got {tolerance}")
    comparisons = []
    for expectation in expectations:
        found = [(r, metric_value(r, expectation.metric)) for r in records if expectation.applies_to(r)]
        found = [(r, v) for r, v in found if v is not None]
        if not found and expectation.floor:
            where = f"{expectation.representation}/" if expectation.representation else ""
            raise UserError(f"--min {where}{expectation.metric}: no evaluated representation measures it")
        comparisons += [_compare(record, value, expectation, tolerance) for record, value in found]
    if not comparisons:
        raise UserError(
            "the baseline has no number for any representation and metric evaluated: check --patches/--eval"
        )
    return comparisons


def _compare(record: dict, value: float, expectation: Expectation, tolerance: float) -> Comparison:
    floor = expectation.value if expectation.floor else expectation.value - tolerance
    notes = ()
    if expectation.record is not None:
        differ = disagreements([expectation.record, record])["numbers"]
        refused = [d for d in differ if d.startswith(tuple(_REFUSED))]
        if refused:
            raise UserError(
                f"baseline {expectation.source} is another experiment: {_refusal(expectation.record, record, refused)}"
                "; use a baseline measured with the same zoo entry and protocol"
            )
        noted = _kinds(differ, _NOTED)
        if noted:
            notes = (_subset_note(expectation.record, record, noted),)
    return Comparison(
        representation=str(record.get("representation")),
        mode=str((record.get("patches") or {}).get("mode")),
        aggregation=str(record.get("aggregation")),
        metric=expectation.metric,
        value=value,
        baseline=expectation.value,
        floor=round(floor, 4),
        source=expectation.source,
        notes=notes,
    )


def _refusal(baseline: dict, record: dict, fields: list[str]) -> str:
    """``kNN temperature 0.5, this run 0.07; preprocessing input_size 64, this run 32`` for the fields that differ."""
    ours, theirs = provenance(record), provenance(baseline)
    parts = []
    for name in fields[:4]:
        prefix = next(p for p in _REFUSED if name.startswith(p))
        detail = name.removeprefix(prefix)
        label = _REFUSED[prefix] + (f" {detail}" if detail else "")
        parts.append(f"{label} {theirs.get(name)}, this run {ours.get(name)}")
    return "; ".join(parts) + (f"; and {len(fields) - 4} more" if len(fields) > 4 else "")


def _kinds(fields: list[str], names: dict[str, str]) -> list[str]:
    """The plain names of the kinds of ``fields`` (dotted record fields) listed in ``names``, once each."""
    found = [label for prefix, label in names.items() for f in fields if f == prefix or f.startswith(prefix)]
    return list(dict.fromkeys(found))


def _subset_note(baseline: dict, record: dict, kinds: list[str]) -> str:
    """One sentence: what differs between the baseline and this run, and that it does not fail the check."""
    values = {"patch seed": "seed", "forward precision": "precision", "store dtype": "store_dtype"}
    parts = []
    for kind in kinds:
        if kind == "images":
            parts.append(
                f"images ({baseline.get('n_train')} train / {baseline.get('n_test')} test, this run "
                f"{record.get('n_train')} / {record.get('n_test')})"
            )
        elif kind in values:
            parts.append(f"{kind} ({baseline.get(values[kind])}, this run {record.get(values[kind])})")
        else:
            parts.append(kind)
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return (
        f"the baseline differs from this run in its {listed}: the numbers are not strictly comparable, "
        "but this alone does not fail the check"
    )


def run_check(
    cfg: EvalConfig,
    expectations: Sequence[Expectation],
    *,
    tolerance: float,
    progress: ProgressFactory | None = None,
) -> CheckReport:
    """Evaluate ``cfg`` (records are appended to the results store as usual) and compare."""
    records = [r.record for r in evaluate(cfg, progress=progress)]
    comparisons = compare(records, expectations, tolerance)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    return CheckReport(cfg.model, cfg.dataset, tolerance, comparisons, records, config)


# ---------------------------------------------------------------- reports


def markdown(report: CheckReport) -> str:
    """A Markdown summary for a CI step summary (``$GITHUB_STEP_SUMMARY``)."""
    d = report.to_dict()
    verdict = "passed" if report.passed else f"FAILED: {len(report.regressions)} regression(s)"
    lines = [
        f"## patchbench check {'✅' if report.passed else '❌'} {verdict}",
        "",
        f"`{report.model}` on `{report.dataset}` (n_train {d['n_train']}, n_test {d['n_test']}), checkpoint sha256 "
        f"`{str(d['checkpoint_sha256'])[:12]}`, device {d['device']}, tolerance {report.tolerance:g} points.",
        "",
        "| representation | aggregation | metric | value | baseline | floor | diff | status | baseline source |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for c in report.comparisons:
        status = "ok" if c.passed else "**REGRESSION**"
        lines.append(
            f"| {c.representation} | {c.aggregation} | {c.metric} | {c.value:.2f} | {c.baseline:.2f} | {c.floor:.2f} "
            f"| {c.diff:+.2f} | {status} | {c.source} |"
        )
    notes = list(dict.fromkeys(n for c in report.comparisons for n in c.notes))  # each sentence once
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def junit_xml(report: CheckReport) -> str:
    """JUnit XML: one test case per compared metric, a failure element per regression."""
    suite = ET.Element(
        "testsuite",
        name="patchbench check",
        tests=str(len(report.comparisons)),
        failures=str(len(report.regressions)),
        errors="0",
    )
    for c in report.comparisons:
        case = ET.SubElement(suite, "testcase", classname=f"patchbench.{report.model}.{report.dataset}", name=c.name)
        if not c.passed:
            failure = ET.SubElement(case, "failure", message=_diff_line(c), type="regression")
            failure.text = _diff_line(c)
        elif c.notes:
            ET.SubElement(case, "system-out").text = "; ".join(c.notes)
    suites = ET.Element("testsuites", tests=suite.get("tests", "0"), failures=suite.get("failures", "0"))
    suites.append(suite)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def _diff_line(c: Comparison) -> str:
    return f"{c.name}: {c.value:.2f} < floor {c.floor:.2f} (baseline {c.baseline:.2f} from {c.source}, {c.diff:+.2f})"


def write_reports(report: CheckReport, directory: Path) -> dict[str, Path]:
    """``check.json``, ``check.md`` and ``junit.xml`` under ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"json": directory / "check.json", "markdown": directory / "check.md", "junit": directory / "junit.xml"}
        paths["json"].write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        paths["markdown"].write_text(markdown(report))
        paths["junit"].write_text(junit_xml(report))
    except OSError as exc:
        raise UserError(f"cannot write the check reports to {directory}: {exc.strerror or exc}") from exc
    return paths
