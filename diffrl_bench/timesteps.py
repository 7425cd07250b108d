"""Training-time distributions for forward-process losses (NFT, AWM, ELBO, CRD).

These losses noise a clean rollout sample to `x_t = (1 - t) x0 + t eps` at some t and regress the velocity there.
The originals train on the rollout sampler's own sigma grid; any distribution on (0, 1] is allowed, so the choice is
a component. Every kind returns a `(num_times, batch_size)` tensor: row k holds the k-th training time of each sample.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

TIME_DISTRIBUTIONS = ("grid_subset", "stratified_grid", "uniform", "logit_normal")


def _nonzero_grid(grid: Optional[torch.Tensor], kind: str, num_times: int) -> torch.Tensor:
    """The grid's non-zero sigmas (t = 0 is the clean sample: nothing to learn there)."""
    if grid is None:
        raise ValueError(f"time distribution {kind!r} needs the rollout sigma grid (grid=...)")
    points = grid[grid > 0]
    if num_times > points.numel():
        raise ValueError(
            f"time distribution {kind!r}: num_times={num_times} exceeds the {points.numel()} non-zero grid points"
        )
    return points


def _grid_subset(batch_size: int, num_times: int, generator: torch.Generator, grid: Optional[torch.Tensor]):
    """Per sample, an independent random permutation of the non-zero grid, first `num_times` entries.

    DiffusionNFT trains on 9 of the 10 grid times per sample, in random order; each sample's times are distinct.
    """
    points = _nonzero_grid(grid, "grid_subset", num_times)
    keys = torch.rand(batch_size, points.numel(), generator=generator, device=generator.device)
    order = keys.argsort(dim=1)[:, :num_times].to(points.device)
    return points[order].T.contiguous()


def _stratified_grid(batch_size: int, num_times: int, generator: torch.Generator, grid: Optional[torch.Tensor]):
    """`num_times` contiguous strata over the non-zero grid, one random point per stratum, shared across the batch.

    AWM style: one time per stratum keeps the times spread over the whole trajectory, and sharing them within a
    micro-batch lets the model see one t per forward.
    """
    points = _nonzero_grid(grid, "stratified_grid", num_times)
    n = points.numel()
    # Stratum k covers indices [floor(k n / T), floor((k + 1) n / T)); non-empty because T <= n.
    bounds = [(k * n) // num_times for k in range(num_times + 1)]
    lo = torch.tensor(bounds[:-1], dtype=torch.float64)
    width = torch.tensor(bounds[1:], dtype=torch.float64) - lo
    u = torch.rand(num_times, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    index = (lo + torch.floor(u * width)).long().clamp(max=n - 1)
    return points[index.to(points.device)].unsqueeze(1).expand(num_times, batch_size).contiguous()


def _uniform(batch_size, num_times, generator, grid, t_min: float = 0.001, t_max: float = 0.999):
    """t ~ U(t_min, t_max), independent per (time, sample)."""
    if not 0.0 < t_min <= t_max <= 1.0:
        raise ValueError(f"uniform times need 0 < t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    u = torch.rand(num_times, batch_size, generator=generator, dtype=torch.float64, device=generator.device)
    return t_min + (t_max - t_min) * u


def _logit_normal(batch_size, num_times, generator, grid, mean: float = 0.0, std: float = 1.0):
    """t = sigmoid(n), n ~ N(mean, std^2), independent per (time, sample) (the SD3 pretraining distribution)."""
    n = torch.randn(num_times, batch_size, generator=generator, dtype=torch.float64, device=generator.device)
    return torch.sigmoid(mean + std * n)


_SAMPLERS: Dict[str, Callable[..., torch.Tensor]] = {
    "grid_subset": _grid_subset,
    "stratified_grid": _stratified_grid,
    "uniform": _uniform,
    "logit_normal": _logit_normal,
}


def sample_train_times(
    kind: str,
    batch_size: int,
    num_times: int,
    generator: torch.Generator,
    grid: Optional[torch.Tensor] = None,
    **options,
) -> torch.Tensor:
    """Draw training times, shape `(num_times, batch_size)`, values in (0, 1].

    Args:
        kind: one of `TIME_DISTRIBUTIONS`.
        generator: the only source of randomness (so runs are reproducible).
        grid: the rollout's (N+1,) sigma grid; required by "grid_subset" and "stratified_grid".
        options: "uniform": `t_min`, `t_max` (0.001, 0.999); "logit_normal": `mean`, `std` (0, 1).
    """
    if kind not in _SAMPLERS:
        raise ValueError(f"unknown time distribution {kind!r}; expected one of {TIME_DISTRIBUTIONS}")
    if batch_size < 1 or num_times < 1:
        raise ValueError(f"batch_size and num_times must be >= 1, got {batch_size}, {num_times}")
    try:
        return _SAMPLERS[kind](batch_size, num_times, generator, grid, **options)
    except TypeError as err:
        if options:
            raise ValueError(f"bad options {sorted(options)} for time distribution {kind!r}: {err}") from err
        raise
