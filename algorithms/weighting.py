"""The self-normalising (adaptive) weight of DiffusionNFT's x0 loss, shared by NFT, the ELBO estimators and CRD."""
from __future__ import annotations

import torch

from diffrl_bench.flow import mean_chw, per_sample

ADAPTIVE_WEIGHT_FLOOR = 1e-5
"""lower bound of the adaptive weight, so a sample the model already fits exactly is not divided by 0"""


def adaptive_weight(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`sg(max(mean_CHW |pred - target|, 1e-5))` per sample, (B,), in float64 whatever the inputs' dtype.

    Dividing a squared error by it makes every sample's loss O(error) whatever its noise level t, which is what keeps
    the NFT update stable; float64 and no gradient, as the released code computes it.
    """
    with torch.no_grad():
        return mean_chw((pred.detach().double() - target.detach().double()).abs()).clamp(min=ADAPTIVE_WEIGHT_FLOOR)


def adaptive_x0_loss(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Self-normalised x0 regression, per sample (B,):

        L = mean_CHW (x0_pred - x0)^2 / adaptive_weight(x0_pred, x0)

    The float64 weight divides the squared error elementwise, so the result is float64 even for float32/bf16 inputs
    (type promotion), and the gradient is that of a squared error scaled by 1 / weight.
    """
    diff = x0_pred - x0
    return mean_chw(diff.square() / per_sample(adaptive_weight(x0_pred, x0), diff))
