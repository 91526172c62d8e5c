"""``python -m ssl_patchbench`` is ``patchbench`` (torchrun launches it this way)."""

from ssl_patchbench.cli.main import entry

entry()
