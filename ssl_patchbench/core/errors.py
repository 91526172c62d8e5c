"""The one exception type a user can cause; the CLI turns it into one line on stderr and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem the user can fix (bad name, missing data, bad spec). Its message states the fix."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean: a, b?)' suffix naming the closest valid choices, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""
