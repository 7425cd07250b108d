"""Numeric settings of the device that a run config may change (`train.allow_tf32`)."""
from __future__ import annotations

import torch


def apply_tf32(allow: bool, device: torch.device) -> bool:
    """Let fp32 matmuls and convolutions on a CUDA device use TF32 tensor cores when `allow` (the ELBO-PG original
    runs fp32 with `allow_tf32 = True` [jaemoo-choi/rethinking-diffusion-rl@c2570002:config/base.py:55]).

    Returns whether the setting was applied. Nothing changes off CUDA or when `allow` is false: torch's own defaults
    (matmul TF32 off, cuDNN TF32 on) then stay as they are."""
    if not allow or torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True
