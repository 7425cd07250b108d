"""Rectified-flow conventions every method shares: the forward process and per-sample tensor shapes.

`x_t = (1 - t) x0 + t eps`, t in [0, 1] (t = 1 is pure noise), and the model predicts a velocity `v ~ eps - x0`
(METHODS.md). Samplers, objectives and item builders all index tensors as (B, ...) with one scalar per sample; the
two helpers below are the only places that broadcast or reduce over the non-batch dimensions.
"""
from __future__ import annotations

import torch


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) so a per-sample scalar (a time, a weight) broadcasts against `like`."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def mean_chw(x: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over all non-batch dimensions, (B, ...) -> (B,).

    Written with a reshape because `x.mean(dim=())` would reduce over *every* dimension for a 1-D input.
    """
    return x.reshape(x.shape[0], -1).mean(dim=1)


def forward_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The forward process `x_t = (1 - t) x0 + t eps`, with `t` of shape (B,)."""
    tb = per_sample(t, x0)
    return (1 - tb) * x0 + tb * eps
