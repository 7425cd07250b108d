"""Group-relative advantages and the maps the objectives apply to them.

A group is the K images generated for one prompt; `group_ids` is a (B,) integer tensor naming each sample's group.
Groups may be interleaved and of unequal size. All statistics are computed in float64, as the originals do (numpy).
"""
from __future__ import annotations

from typing import Tuple

import torch

STD_MODES = ("global", "group")


def _group_index(group_ids: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Map arbitrary group labels to 0..G-1 (so labels need not be contiguous or sorted)."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0


def _group_mean(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per-sample mean of `values` over the sample's group, (B,)."""
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)
    counts = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(
        0, index, torch.ones_like(values)
    )
    return (sums / counts)[index]


def group_mean(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of `values` over the sample's group, (B,), in `values`' dtype (labels may be on any device)."""
    index, num_groups = _group_index(group_ids)  # grouped where the labels live (no sync for CPU labels)
    return _group_mean(values, index.to(values.device), num_groups)


def zero_variance_mask(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """True for samples whose group has identical rewards (no learning signal; Flow-GRPO drops them).

    Compared exactly (max == min within the group), not through a computed std that rounding could make non-zero.
    """
    index, num_groups = _group_index(group_ids)
    r = rewards.to(torch.float64)
    hi = torch.full((num_groups,), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(
        0, index, r, reduce="amax"
    )
    lo = torch.full((num_groups,), torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(
        0, index, r, reduce="amin"
    )
    return (hi == lo)[index]


def group_mean_centered(rewards: torch.Tensor, group_ids: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`scale * (R - mean_group R)`: the ELBO-PG advantage (scale 0.1 there), no std, no clipping. float64.

    Samples of zero-variance groups get exactly 0 (the group mean of identical floats can be off by an ulp).
    """
    r = rewards.to(torch.float64)
    index, num_groups = _group_index(group_ids)
    centered = r - _group_mean(r, index, num_groups)
    centered = torch.where(zero_variance_mask(r, group_ids), torch.zeros_like(centered), centered)
    return scale * centered


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, std: str = "global", eps: float = 1e-4
) -> torch.Tensor:
    """Flow-GRPO / NFT / AWM / CRD advantage: `(R - mean_group R) / (std + eps)`, float64, unclipped.

    Args:
        rewards: (B,) rewards.
        group_ids: (B,) group (prompt) labels.
        std: "global": population std (ddof 0) over all B rewards (the originals' default);
            "group": population std over the sample's own group.
        eps: added to the std (1e-4 in the originals), so zero-variance groups stay finite.
    """
    if std not in STD_MODES:
        raise ValueError(f"unknown std mode {std!r}; expected one of {STD_MODES}")
    r = rewards.to(torch.float64)
    index, num_groups = _group_index(group_ids)
    centered = group_mean_centered(r, group_ids)
    if std == "global":
        scale = r.std(unbiased=False)
    else:
        scale = _group_mean(centered.square(), index, num_groups).sqrt()
    return centered / (scale + eps)


def clip_advantages(adv: torch.Tensor, clip_max: float) -> torch.Tensor:
    """Clamp advantages to [-clip_max, clip_max] (5 in all the originals)."""
    return adv.clamp(-clip_max, clip_max)


def optimality_probability(adv: torch.Tensor, clip_max: float = 5.0) -> torch.Tensor:
    """DiffusionNFT's map of an advantage to a [0, 1] optimality probability: `0.5 + clip(A, -c, c) / (2 c)`.

    The outer clamp to [0, 1] is kept as the original has it (it only matters for rounding).
    """
    return (0.5 + clip_advantages(adv, clip_max) / (2.0 * clip_max)).clamp(0.0, 1.0)
