"""Loss pieces shared by the forward-process objectives (NFT, ELBO, CRD)."""
from __future__ import annotations

import torch


def mean_chw(x: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over all non-batch dimensions, (B, ...) -> (B,).

    Written with a reshape because `x.mean(dim=())` would reduce over *every* dimension for a 1-D input.
    """
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _broadcast_per_sample(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) so a per-sample weight broadcasts against `like`."""
    return w.reshape(w.shape[0], *([1] * (like.ndim - 1)))


def adaptive_x0_loss(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Self-normalised x0 regression, per sample (B,):

        L = mean_CHW (x0_pred - x0)^2 / sg(max(mean_CHW |x0_pred - x0|, 1e-5))

    As in DiffusionNFT, the weight is computed in float64 without gradient and divides the squared error elementwise,
    so the result is float64 even for float32/bf16 inputs (type promotion), and the gradient is that of a squared
    error scaled by 1 / weight. Normalising by the sample's own mean absolute error makes every sample's loss O(error)
    whatever its noise level t, which is what keeps the NFT update stable.
    """
    diff = x0_pred - x0
    with torch.no_grad():
        weight = mean_chw((x0_pred.detach().double() - x0.detach().double()).abs()).clamp(min=1e-5)
    return mean_chw(diff.square() / _broadcast_per_sample(weight, diff))
