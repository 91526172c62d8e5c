"""Image files to RGB uint8 arrays: the one decoder every CPU path uses."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ssl_patchbench.core.errors import UserError


def decode(path: str) -> np.ndarray:
    """Decode an image file to RGB uint8 ``[H, W, 3]``."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise UserError(f"cannot read image {path}: {exc}") from exc


MAX_PIXELS = 89_478_485  # PIL's default decompression-bomb limit; the GPU decoder refuses larger images too
