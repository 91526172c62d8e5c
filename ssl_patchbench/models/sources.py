"""Where checkpoint files come from and where a download is cached: plain paths and URLs, no torch."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.core.paths import home


def default_cache_dir() -> Path:
    """Where downloaded checkpoints live: `$PATCHBENCH_HOME/checkpoints` (home: ~/.cache/patchbench)."""
    return home() / "checkpoints"


def cache_path(url: str, cache_dir: Path) -> Path:
    """Cache location mirroring host and path, so two files with the same basename never collide.

    The URL is untrusted (zoo files, --checkpoint): a ``..`` segment, a NUL, or a result outside
    `cache_dir` is refused, so no URL can make a download write anywhere else.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]  # never put credentials into a file name
    names = [s for s in parts.path.split("/") if s not in ("", ".")]
    if not names or parts.path.endswith("/"):
        raise UserError(f"cannot cache {url}: the URL must name a file, like https://host/dir/file.pth")
    segments = [host, *names] if host else names
    if any(s == ".." or "\0" in s for s in segments):
        raise UserError(f"refusing {url}: its path would leave the checkpoint cache {cache_dir}")
    dest = cache_dir.joinpath(*segments)
    if not dest.resolve().is_relative_to(cache_dir.resolve()):
        raise UserError(f"refusing {url}: {dest} resolves outside the checkpoint cache {cache_dir}")
    return dest
