"""Analyses and figures above the pipeline floor: convergence, patch neighbours, similarity heatmaps, scales, report.

Each analysis is a pure function (tensors or records in, a dataclass or DataFrame out); plotting lives in
separate ``plot_*`` functions that import matplotlib lazily; the CLI only wires options to them.
"""
