"""The cheap check of ``--skip-bad-images``: which files of a split the decoder could not use, found before any
extraction by one process per core, so that they are left out (and recorded) instead of ending a long run.

A file fails when it cannot be opened, is empty, is not an image Pillow can identify, is over the pixel limit
(all from its header), or is a JPEG or PNG whose end marker is missing and which then does not decode (a
truncated download). Only those suspicious files are decoded in full; every other file costs a header and a
tail read. A file that passes may still fail to decode later (e.g. damage inside a file that ends whole); the
extraction then stops with its one error line, as without the option.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor

from ssl_patchbench.core.devices import available_cores
from ssl_patchbench.core.errors import UserError
from ssl_patchbench.data.decode import ImageFileError, decode, image_header

# The bytes a whole file of each format ends with (JPEG: end-of-image; PNG: the IEND chunk and its CRC).
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
TAIL_BYTES = 1024  # bytes of a file's end that are looked at: room for zero padding after the marker
_CHUNKS_PER_WORKER = 16  # files are handed to the processes in this many pieces each (balances slow disks)


def file_problem(path: str) -> str | None:
    """Why the decoder could not use ``path``, in a few words (``empty``, ``not an image``, ``truncated or
    corrupt``, ...), or None when it passes the check."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty"
        kind, _, _ = image_header(path)
        if kind in END_MARKERS and not ends_whole(_tail(path, size), kind):
            decode(path)  # no end marker: only a full decode tells a truncated file from one with trailing bytes
    except ImageFileError as exc:
        return exc.problem
    except OSError as exc:  # the size or the tail read
        return f"unreadable ({exc.strerror or exc})"
    except UserError:  # a whole image whose values the decoder refuses: not a broken file, the extraction says so
        pass
    return None


def ends_whole(data: bytes, kind: str) -> bool:
    """Whether a file of ``kind`` (a key of ``END_MARKERS``) whose last bytes are ``data`` ends with its end
    marker, maybe followed by zero padding (within its last ``TAIL_BYTES`` bytes)."""
    return data[-TAIL_BYTES:].rstrip(b"\x00").endswith(END_MARKERS[kind])


def _tail(path: str, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, size - TAIL_BYTES))
        return f.read()


def bad_files(paths: Sequence[str], *, workers: int | None = None) -> dict[int, str]:
    """Index -> problem of every file of ``paths`` that fails :func:`file_problem`, checked by ``workers``
    processes (default: one per core this process may use; 0: in this process)."""
    workers = min(available_cores() if workers is None else workers, len(paths))
    if workers == 0:
        return _failed(map(file_problem, paths))
    chunk = max(1, len(paths) // (workers * _CHUNKS_PER_WORKER))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return _failed(pool.map(file_problem, paths, chunksize=chunk))


def _failed(problems: Iterable[str | None]) -> dict[int, str]:
    return {i: problem for i, problem in enumerate(problems) if problem is not None}
