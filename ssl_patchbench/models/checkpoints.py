"""Checkpoint files: fetch (verified, atomic), hash and load them safely.

Everything here turns bytes into tensors; what the tensors mean (key layout, architecture) is the zoo's job.
A checkpoint that needs pickle is refused unless the caller trusts it, because unpickling runs code.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import pickle
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.core.files import ensure_dir, file_sha256, write_error
from ssl_patchbench.models.sources import cache_path

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_NEEDS_PICKLE = ("GLOBAL", "add_safe_globals", "unrecognized function")


def sha256_file(path: Path) -> str:
    """SHA-256 of a checkpoint file; a missing file is a user error."""
    _require_file(path)
    return file_sha256(path)


def fetch(url: str, *, sha256: str | None, cache_dir: Path) -> tuple[Path, str]:
    """Local path and SHA-256 of the file at `url`, downloading it once into `cache_dir`."""
    dest = cache_path(url, cache_dir)
    digest = verify_sha256(dest, sha256) if dest.is_file() else _download(url, dest, sha256)
    if sha256 is None:
        log.warning("no sha256 recorded for %s; computed sha256 %s (recorded with the results)", url, digest)
    return dest, digest


def _download(url: str, dest: Path, sha256: str | None) -> str:
    """Download through a temporary file that becomes `dest` only once complete and verified."""
    log.info("downloading %s to %s", url, dest)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=ensure_dir(dest.parent), prefix=f".{dest.name}.")
    except OSError as err:
        raise write_error(dest, err) from err
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _stream_to(url, out, dest)
        _check_hash(digest, sha256, what=url, fix="the download is corrupt or changed upstream; retry")
        os.replace(tmp, dest)
    except OSError as err:
        raise write_error(dest, err) from err
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def _stream_to(url: str, out: BinaryIO, dest: Path) -> str:
    """Copy `url` into `out`, hashing as it goes; a network error says where to put the file by hand."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except (OSError, http.client.HTTPException) as err:
        raise UserError(f"could not download {url} ({err}): copy the file to {dest} or pass --checkpoint PATH") from err
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str | None) -> str:
    """SHA-256 of a local file, refused if it differs from the recorded one (None: nothing recorded)."""
    digest = sha256_file(path)
    _check_hash(digest, expected, what=str(path), fix="replace the file with the published one")
    return digest


def _check_hash(actual: str, expected: str | None, *, what: str, fix: str) -> None:
    """Refuse a file whose hash differs from the recorded one."""
    if expected is not None and actual != expected.lower():
        raise UserError(f"sha256 mismatch for {what}: expected {expected}, got {actual}; {fix}")


def load_file(path: Path, *, trust_pickle: bool = False) -> object:
    """Load a checkpoint without running code from it (safetensors or weights-only torch.load)."""
    _require_file(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not any(marker in str(err) for marker in _NEEDS_PICKLE):
            raise _corrupt(path, err) from err
        if not trust_pickle:
            raise UserError(
                f"{path} needs pickle to load, which can run arbitrary code: "
                "pass --trust-checkpoint only if you trust its source"
            ) from err
        return _load_pickle(path)
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError... for damaged files
        raise _corrupt(path, err) from err


def _require_file(path: Path) -> None:
    """A missing checkpoint is a user error, not a traceback."""
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}; pass an existing file with --checkpoint PATH")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a damaged header or body is a UserError."""
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except Exception as err:  # SafetensorError, OSError
        raise _corrupt(path, err) from err


def _load_pickle(path: Path) -> object:
    """Full-pickle load, only reached when the user trusts the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise _corrupt(path, err) from err


def _corrupt(path: Path, err: Exception) -> UserError:
    """The error for an unreadable file: the fix is a fresh copy."""
    return UserError(f"{path} is truncated or corrupt ({_reason(err)}): download or copy it again")


def _reason(err: Exception) -> str:
    """The gist of a loader's error: its first sentence, without torch's advice to load with weights_only=False."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(err).__name__


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Content hash of in-memory weights, for provenance when no checkpoint file exists (timm pretrained)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
