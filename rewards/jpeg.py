"""JPEG (in)compressibility, the classic DDPO tasks: the size of the image saved as a JPEG. No weights needed."""
from __future__ import annotations

import io
from typing import Any, Dict, List, Sequence

import torch
from PIL import Image

from diffrl_bench.registry import REWARDS
from diffrl_bench.rewards._common import check_images, option, to_uint8_hwc


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB (1 kB = 1000 bytes) of each image as a baseline JPEG of `quality`, from its uint8 rounding."""
    sizes = []
    for array in to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class _JpegReward:
    name = ""
    sign = 0.0

    def __init__(self, quality: int = 95, divisor: float = 1.0):
        self.quality = option(self.name, "quality", quality, int, lambda v: 1 <= v <= 100, "is not in 1..100")
        self.divisor = option(self.name, "divisor", divisor, float, lambda v: v > 0, "is not positive")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 metadata: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        check_images(self.name, images, prompts)
        kb = jpeg_kilobytes(images, self.quality)
        return {self.name: self.sign * kb / self.divisor, f"{self.name}.kb": kb}


@REWARDS.register("jpeg_compressibility")
class JpegCompressibility(_JpegReward):
    """Reward = -(JPEG size in kB) / divisor: smaller files score higher (always <= 0).

    Options: `quality` (95, DDPO's), `divisor` (1 = DDPO's kB; Flow-GRPO's compressibility divides by 500).
    `jpeg_compressibility.kb` logs the positive size in kB.
    """

    name = "jpeg_compressibility"
    sign = -1.0


@REWARDS.register("jpeg_incompressibility")
class JpegIncompressibility(_JpegReward):
    """Reward = +(JPEG size in kB) / divisor: larger files score higher (always > 0).

    Options as `jpeg_compressibility`; `jpeg_incompressibility.kb` logs the size in kB.
    """

    name = "jpeg_incompressibility"
    sign = 1.0
