"""Patch embeddings for the analyses, through the evaluation's own sampler and model path.

Boxes come from ``PatchSpec``, crops from ``crop_and_resize`` and the forward from ``extract``'s runner, so an
analysis sees exactly the patches and numbers that ``patchbench eval`` averages. Analyses always run in IEEE
float32 (no bf16, no TF32): neighbour rankings must come out the same on CPU and GPU up to float ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssl_patchbench.core.devices import exact_fp32
from ssl_patchbench.core.errors import UserError
from ssl_patchbench.core.paths import home
from ssl_patchbench.data.datasets import ImageSplit, open_split
from ssl_patchbench.features.extract import ExtractSettings, ImageSource, PatchRunner, ProgressFactory
from ssl_patchbench.models.encoder import Encoder
from ssl_patchbench.models.encoder import check_spaces as encoder_spaces
from ssl_patchbench.models.loading import LoadedModel, load_model
from ssl_patchbench.sampling.patches import PatchSpec, crop_and_resize


@dataclass(frozen=True)
class Inputs:
    """A loaded model and one split of a dataset: what every image analysis starts from."""

    model: LoadedModel
    split: ImageSplit


def open_inputs(
    *,
    model: str,
    checkpoint: str | None,
    dataset: str,
    data_dir: str | None,
    split: str = "test",
    per_class: int | None = None,
    trust_checkpoint: bool = False,
    root: Path | None = None,
) -> Inputs:
    """Load the model and open the split the same way ``patchbench eval`` does (same caches)."""
    root = root or home()
    loaded = load_model(model, checkpoint=checkpoint, trust_pickle=trust_checkpoint, cache_dir=root / "checkpoints")
    data = open_split(dataset, split, data_dir=data_dir, per_class=per_class, cache_dir=root / "images")
    return Inputs(model=loaded, split=data)


def sliding_spec(model: LoadedModel, size: int, stride: int) -> PatchSpec:
    """Every ``size`` px window at ``stride`` px of the central view, in model-input pixels (DESIGN §1)."""
    pre = model.entry.preprocessing
    return PatchSpec(
        mode="sliding",
        size=size,
        stride=stride,
        out_size=pre.input_size,
        resize=pre.resize,
        interpolation=pre.interpolation,
    )


def central_spec(model: LoadedModel) -> PatchSpec:
    """The standard evaluation view."""
    pre = model.entry.preprocessing
    return PatchSpec(mode="central", out_size=pre.input_size, resize=pre.resize, interpolation=pre.interpolation)


def check_spaces(model: LoadedModel, spaces: tuple[str, ...]) -> tuple[str, ...]:
    """The asked-for spaces, validated as an eval's (projection needs projector weights)."""
    if not spaces:
        raise UserError("no space given: choose embedding, projection or both")
    return encoder_spaces(model, tuple(dict.fromkeys(spaces)))


class PatchEmbedder:
    """Embeds the patches of chosen images: h from the backbone, z = projector(h) on demand; ``progress`` (the
    CLI's display) is told of every batch."""

    def __init__(
        self,
        model: LoadedModel,
        device: torch.device,
        max_patches: int | None = None,
        progress: ProgressFactory | None = None,
    ) -> None:
        self.model, self.device, self.max_patches, self.progress = model, device, max_patches, progress
        self.encoder = Encoder(model, "embedding").to(device).eval()
        if device.type == "cuda":
            self.encoder = self.encoder.to(memory_format=torch.channels_last)

    def embed(self, split: ImageSplit, indices: np.ndarray, spec: PatchSpec) -> torch.Tensor:
        """Embeddings h ``[B, n, d]`` (float32, CPU) of every patch of images ``indices`` under ``spec``."""
        indices = np.asarray(indices, dtype=np.int64)
        runner = PatchRunner(self.encoder, spec, ExtractSettings(self.device, "fp32", self.max_patches))
        step = runner.images_per_batch
        batches = [indices[i : i + step] for i in range(0, len(indices), step)]
        label = f"embed {spec.num_patches} {spec.mode} patches/image"
        advance = self.progress(label, len(indices), len(indices) * spec.num_patches) if self.progress else None
        out = []
        with exact_fp32():
            for _, batch, pixels, sizes in ImageSource(split, self.device).iterate((None, b) for b in batches):
                out.append(runner(pixels, sizes, batch).cpu())
                if advance is not None:
                    advance(len(batch), len(batch) * spec.num_patches)
        return torch.cat(out) if out else torch.empty(0, spec.num_patches, self.encoder.dim)

    @torch.inference_mode()
    def project(self, h: torch.Tensor) -> torch.Tensor:
        """z = projector(h) for any leading shape (float32, CPU), in slices on the device."""
        if self.model.projector is None:
            raise UserError(f"{self.model.entry.name}: the checkpoint has no projector weights; use --space embedding")
        projector = self.model.projector.to(self.device).eval()
        flat = h.reshape(-1, h.shape[-1])
        step = self.max_patches or 4096
        with exact_fp32():
            parts = [projector(flat[i : i + step].to(self.device)).float().cpu() for i in range(0, len(flat), step)]
        return torch.cat(parts).reshape(*h.shape[:-1], -1)

    def spaces(self, h: torch.Tensor, spaces: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The features of each asked-for space, from the embeddings ``h``."""
        return {space: h if space == "embedding" else self.project(h) for space in spaces}


def patch_pixels(split: ImageSplit, index: int, boxes: np.ndarray, out_size: int) -> np.ndarray:
    """The crops the model sees for ``boxes`` ``[n, 4]`` of image ``index``, as uint8 ``[n, s, s, 3]`` for display."""
    image = torch.from_numpy(np.ascontiguousarray(split.image(index))).permute(2, 0, 1)[None].float()
    boxes_t = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    crops = crop_and_resize(image, boxes_t, torch.zeros(len(boxes_t), dtype=torch.long), out_size)
    return crops.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_boxes(split: ImageSplit, indices: np.ndarray, spec: PatchSpec) -> np.ndarray:
    """Boxes ``[B, n, 4]`` of images ``indices`` in their own pixels (the sampler's, not a copy)."""
    sizes = np.array([split.image(int(i)).shape[:2] for i in indices]) if split.array is None else None
    if sizes is None:
        sizes = np.tile(split.array.shape[1:3], (len(indices), 1))  # type: ignore[union-attr]
    return spec.boxes(np.asarray(indices), sizes[:, 0], sizes[:, 1])


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two equally shaped ``[..., d]`` tensors, in float64 for exactness."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
