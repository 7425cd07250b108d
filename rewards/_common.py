"""Pieces shared by the real reward plugins: image conversion, CLIP-style preprocessing on tensors, devices,
and safe loading of small weight files. (The leading underscore keeps the registry from importing it as a plugin.)
"""
from __future__ import annotations

import os
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

# OpenAI CLIP's normalisation; OpenCLIP ViT-H-14 (HPSv2) and BLIP (ImageReward) use the same numbers.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def option(reward: str, key: str, value: Any, kind: type, valid=None, why: str = "") -> Any:
    """A constructor option converted to `kind` (int, float, bool or str) and checked with `valid`; a bad one
    raises naming its config key, `reward.options.<reward>.<key>`.

    Strict where a plain conversion would be silently wrong: a bool must be true/false (bool("false") is True),
    an int must be integral (int(2.7) is 2)."""
    from diffrl_bench.reward_harness import option_error

    if kind is bool:
        if not isinstance(value, bool):
            raise option_error(reward, key, value, "is not true or false")
        converted = value
    elif kind is str:
        if not isinstance(value, str):
            raise option_error(reward, key, value, "is not a string")
        converted = value
    else:
        try:
            if isinstance(value, bool) or (kind is int and float(value) != int(float(value))):
                raise ValueError
            converted = kind(value)
        except (TypeError, ValueError, OverflowError):
            raise option_error(reward, key, value, f"is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and converted != converted:
            raise option_error(reward, key, value, "is not a number")
    if valid is not None and not valid(converted):
        raise option_error(reward, key, value, why)
    return converted


def check_images(name: str, images: torch.Tensor, prompts: Sequence[str]) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: images must be a float tensor (B, 3, H, W) in [0, 1], got {shape}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{name}: {images.shape[0]} images but {len(prompts)} prompts")


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8, rounded as a saved PNG would be."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name: str, dtype: str) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    option(name, "dtype", dtype, str, lambda v: v in table, f"is not one of {sorted(table)}")
    return table[dtype]


def _edge(value: Any, key: str):
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return value.get(key)
    return getattr(value, key, None)


class ClipPreprocess:
    """CLIP's image pipeline on tensors: resize the shorter side (bicubic, antialiased like PIL), centre crop,
    normalise. Working on float tensors keeps a batch exactly equal to its images scored one at a time.

    `size` is the shorter side after resizing, `crop` the (height, width) of the centre crop.
    """

    def __init__(self, size: int = 224, crop: Tuple[int, int] = (224, 224), mean=CLIP_MEAN, std=CLIP_STD):
        self.size, self.crop = int(size), (int(crop[0]), int(crop[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_config(cls, config: Dict[str, Any], default_size: int) -> "ClipPreprocess":
        """From a Hugging Face `preprocessor_config.json` dict (`size`, `crop_size`, `image_mean`, `image_std`)."""
        size = _edge(config.get("size"), "shortest_edge") or _edge(config.get("size"), "height") or default_size
        crop = config.get("crop_size", size)
        crop_hw = (_edge(crop, "height") or size, _edge(crop, "width") or size)
        return cls(size, crop_hw, config.get("image_mean", CLIP_MEAN), config.get("image_std", CLIP_STD))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().clamp(0, 1)
        h, w = x.shape[-2:]
        # The long side is truncated, as transformers' and torchvision's resize compute it.
        if h <= w:
            new_h, new_w = self.size, int(self.size * w / h)
        else:
            new_h, new_w = int(self.size * h / w), self.size
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
            # Bicubic overshoots at edges; PIL clips to the pixel range before normalising.
            x = x.clamp(0, 1)
        ch, cw = self.crop
        if new_h < ch or new_w < cw:
            raise ValueError(f"image of {h}x{w} resized to {new_h}x{new_w} is smaller than the {ch}x{cw} crop")
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
        x = x[..., top:top + ch, left:left + cw]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def load_state_dict(path: str, name: str, option: str) -> Dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch pickle (loaded with weights_only, so no code runs)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: option {option} = {path!r}: file not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling errors come in many types
        raise ValueError(f"{name}: option {option} = {path!r} is not a plain tensor checkpoint "
                         f"(loaded with weights_only=True): {error}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{name}: option {option} = {path!r} does not hold a state_dict of tensors")
    return state


def batched(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)
