"""How an image file becomes the vision encoder's input, shared by the PyTorch and DALI loaders.

The steps and their arithmetic are those of transformers' `SiglipImageProcessor` and
`CLIPImageProcessor` (the Pillow backend, transformers 5.x `image_processing_backends.PilBackend`
and `image_transforms`), so a published encoder sees what its own processor would give it:
  1. RGB: transparency composited onto white (`image_transforms.convert_to_rgb`), other modes
     converted by Pillow;
  2. resize, on the 8-bit image: `fixed` to size x size, or `shortest_edge`: the shorter side to
     `size`, the longer to int(size * long / short) (`get_resize_output_image_size`);
  3. optionally the centre crop of out_size x out_size, top-left at ((h - c) // 2, (w - c) // 2);
  4. x = float32(float64(x) * rescale_factor), then (x - mean) / std in float32.
Only the geometry (sizes and crop corner) is computed here; each loader runs the pixel steps with
its own library (Pillow + torch, or DALI). transformers offers no function for the geometry
alone, so these few lines are written out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_mm.config import RESAMPLE_FILTERS, RESIZE_MODES, VisionConfig


@dataclass(frozen=True)
class ImageSpec:
    """One image pipeline. `out_size` is the encoder's input side (model.vision.image_size);
    `size` the resize target (None: out_size); `center_crop` crops out_size x out_size from the
    centre after resizing (CLIP), without it the resized image must already be out_size square."""

    out_size: int = 32
    resize: str = "fixed"
    size: Optional[int] = None
    center_crop: bool = False
    resample: str = "bilinear"
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        if self.resize not in RESIZE_MODES or self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resize={self.resize!r}, resample={self.resample!r}: must be one of "
                             f"{RESIZE_MODES} and {RESAMPLE_FILTERS}")
        if self.out_size < 1 or self.target < 1 or (self.center_crop and self.target < self.out_size):
            raise ValueError(f"out_size={self.out_size}, size={self.size}: must be >= 1, and size >= out_size "
                             "when cropping")
        if not self.center_crop and (self.resize != "fixed" or self.target != self.out_size):
            raise ValueError(f"resize={self.resize}, size={self.size}: without center_crop the resize must be "
                             f"fixed to out_size={self.out_size}")

    @property
    def target(self) -> int:
        return self.out_size if self.size is None else self.size

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing an image of `width` x `height`."""
        if self.resize == "fixed":
            return self.target, self.target
        short, long = min(width, height), max(width, height)
        new_long = int(self.target * long / short)
        return (self.target, new_long) if width <= height else (new_long, self.target)

    def crop_corner(self, width: int, height: int) -> tuple[int, int]:
        """(left, top) of the out_size square cut from a resized `width` x `height` image."""
        if not self.center_crop:
            return 0, 0
        return (width - self.out_size) // 2, (height - self.out_size) // 2


def image_spec(vision: VisionConfig) -> ImageSpec:
    """The ImageSpec of model.vision (its image_size and preprocess)."""
    p = vision.preprocess
    return ImageSpec(vision.image_size, p.resize, p.size, p.center_crop, p.resample, p.rescale_factor,
                     tuple(p.mean), tuple(p.std))
