"""``python -m ssl_patchbench`` is ``patchbench`` (torchrun launches it this way)."""

from .cli import main

main()
