"""Pretraining checkpoints: CPU snapshots, atomic writes off the training thread, and resuming.

Between epochs the training state is copied on its device (asynchronous kernels: the next epoch starts at
once); a background thread moves that copy to the host on a side stream, so the copy engine works while the
next epoch trains, and writes it; the file is replaced by an atomic rename, so a kill at any moment leaves
the previous complete checkpoint. Loading uses ``weights_only=True``: the file holds tensors, numbers and
strings only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ssl_patchbench.core.errors import UserError
from ssl_patchbench.core.files import atomic_path


def snapshot(obj):
    """A deep copy of nested dicts/lists with every tensor copied to the CPU (never aliasing live weights)."""
    return _map_tensors(obj, lambda t: t.detach().to("cpu", copy=True))


def _map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


class CheckpointWriter:
    """Writes one checkpoint at a time in a background thread; ``wait`` re-raises a failed write."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, path: Path, state: dict, device: torch.device) -> None:
        """Write ``state`` (live tensors on ``device`` and the CPU) as it is now, without waiting for the copy."""
        self.wait()
        if device.type == "cuda":
            staged = _map_tensors(state, lambda t: t.detach().clone())  # queued after the last step; no wait
            ready = torch.cuda.Event()
            ready.record()
        else:
            staged, ready = snapshot(state), None
        self._thread = threading.Thread(target=self._write, args=(path, staged, ready, device), daemon=False)
        self._thread.start()

    def _write(self, path: Path, staged: dict, ready: torch.cuda.Event | None, device: torch.device) -> None:
        try:
            if ready is not None:
                with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
                    torch.cuda.current_stream().wait_event(ready)
                    staged = snapshot(staged)  # a blocking copy on the side stream: the training stream runs on
            with atomic_path(path) as tmp:
                torch.save(staged, tmp)
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
