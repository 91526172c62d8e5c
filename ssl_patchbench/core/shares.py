"""Work on many small files in a thread pool, one task per share of them.

A task per file costs more than a header or file read itself (measured: a JPEG header in 82 us as a task of its
own against 31 us in shares, on 2 cores; a 108 KB file in 74 us as a task of its own against 20 us read in one
thread, on the H200 machine), so the files are cut into one consecutive share per thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def submit_shares(
    pool: ThreadPoolExecutor, task: Callable[[Sequence[Item]], list[Result]], items: Sequence[Item], shares: int
) -> list[Future[list[Result]]]:
    """``task`` over ``items`` cut into at most ``shares`` consecutive parts, one pool task each; the futures in
    the items' order (none for no items)."""
    step = max(1, -(-len(items) // shares))
    return [pool.submit(task, items[lo : lo + step]) for lo in range(0, len(items), step)]
