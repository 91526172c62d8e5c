"""Pretraining checkpoints: CPU snapshots, atomic writes off the training thread, and resuming.

A snapshot is taken between steps (one device-to-host copy), then written by a background thread while
the next epoch trains; the file is replaced by an atomic rename, so a kill at any moment leaves the
previous complete checkpoint. Loading uses ``weights_only=True``: the file holds tensors, numbers and
strings only.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.core.files import atomic_path


def snapshot(obj):
    """A deep copy of nested dicts/lists with every tensor copied to the CPU (never aliasing live weights)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes one checkpoint at a time in a background thread; ``wait`` re-raises a failed write."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, path: Path, payload: dict) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(path, payload), daemon=False)
        self._thread.start()

    def _write(self, path: Path, payload: dict) -> None:
        try:
            with atomic_path(path) as tmp:
                torch.save(payload, tmp)
        except BaseException as err:  # surfaced by wait() on the training thread
            self._error = err

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise UserError(f"could not write the checkpoint: {error}") from error


def load_training_state(
    path: Path, identity: dict, model: nn.Module, optimiser: torch.optim.Optimizer, gen: torch.Generator
) -> int:
    """Restore model, optimiser and RNG from ``path``; returns the number of epochs already done."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file: say so, never start over silently
        raise UserError(f"cannot resume from {path} ({err}): delete it or pass --no-resume") from err
    if not isinstance(state, dict) or "optimizer" not in state:
        raise UserError(f"{path} holds no training state to resume from: use another --out or pass --no-resume")
    saved = state.get("config", {})
    changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} there, {identity.get(k)!r} now" for k in changed)
        raise UserError(f"{path} is a different run ({detail}): use another --out or pass --no-resume")
    model.load_state_dict(state["state_dict"])
    optimiser.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    return int(state["epoch"])
