"""The one grammar of aggregation names that every room reads and writes: ``gridpool``, ``gridpool:K:S``,
``gridpool(K,S)``; the rest are plain names (``mean``, ``concat``)."""

from __future__ import annotations

import re

_GRIDPOOL = re.compile(r"gridpool(?:[:(](\d+)[,:](\d+)\)?)?")
GRIDPOOL_DEFAULT = (3, 2)  # kernel, stride: 5x5 sliding windows pooled into 2x2 (the paper's Table 5)


def gridpool_params(text: str) -> tuple[int, int] | None:
    """(kernel, stride) of a gridpool name (the defaults when it names none), or None for any other name."""
    found = _GRIDPOOL.fullmatch(text.strip().lower())
    if found is None:
        return None
    return (int(found.group(1)), int(found.group(2))) if found.group(1) else GRIDPOOL_DEFAULT


def aggregation_label(text: str) -> str:
    """The canonical name records carry: ``gridpool`` / ``gridpool:3:2`` / ``gridpool(3,2)`` -> ``gridpool(3,2)``."""
    params = gridpool_params(text)
    return text.strip().lower() if params is None else f"gridpool({params[0]},{params[1]})"
