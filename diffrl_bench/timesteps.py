"""Training-time distributions for forward-process losses (NFT, AWM, ELBO, CRD).

These losses noise a clean rollout sample to `x_t = (1 - t) x0 + t eps` at some t and regress the velocity there.
The originals train on the rollout sampler's own sigma grid; any distribution on (0, 1] is allowed, so the choice is
a component. Every kind returns a `(num_times, batch_size)` tensor: row k holds the k-th training time of each sample.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

TIME_DISTRIBUTIONS = ("grid_subset", "stratified_grid", "grid_prefix", "uniform", "logit_normal")
TIME_QUANTIZERS = ("none", "floor1000")
INTEGER_TIME_SLACK = 2e-4
"""timestep units a float32 grid value may sit below the integer its float64 value truncates to"""


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


def _grid_prefix(batch_size: int, num_times: int, generator: torch.Generator, grid: Optional[torch.Tensor],
                 pool: int = 5):
    """`num_times` distinct points drawn from the first `pool` non-zero grid points (the noisiest end), in random
    order, shared by every sample of the call.

    DGPO trains on 4 of the first 5 grid indices (`random.sample(range(trunc_steps + 1), 4)`), drawn once per epoch
    and shared by every batch and process: hand this a generator that is the same on every process.
    """
    points = _nonzero_grid(grid, "grid_prefix", num_times)
    if not num_times <= pool <= points.numel():
        raise ValueError(f"time distribution 'grid_prefix': pool={pool} must be between num_times={num_times} and "
                         f"the {points.numel()} non-zero grid points")
    keys = torch.rand(pool, generator=generator, device=generator.device)
    index = keys.argsort()[:num_times].to(points.device)
    return points[index].unsqueeze(1).expand(num_times, batch_size).contiguous()


def quantize_times(times: torch.Tensor, kind: str = "none") -> torch.Tensor:
    """Training times as a model with integer timesteps sees them.

    "floor1000": `t = floor(1000 t) / 1000`, then rounded to float32 as the SD3 pipelines compute `timesteps / 1000`
    (DGPO trains at `t = timesteps / 1000` with the scheduler's int64 timesteps, Luo-Yihong/DGPO@01ceb4b:
    scripts/train_sd3_dgpo.py:1099-1100), so x_t and the model share the truncated time. Grid values are float32
    roundings of float64 points (e.g. 0.875 stored as 0.87499994); the floor allows for that 2e-4 timestep slack,
    so it gives the integers the scheduler truncated from the float64 grid (checked against diffusers for shifts 3
    and 5; at shift 1 some float64 points lie just below an integer, e.g. 332.99999, and come out one higher here).
    "none" returns `times` unchanged.
    """
    if kind == "none":
        return times
    if kind != "floor1000":
        raise ValueError(f"unknown time quantizer {kind!r}; expected one of {TIME_QUANTIZERS}")
    steps = torch.floor(times.double() * 1000 + INTEGER_TIME_SLACK)
    return (steps / 1000).to(torch.float32).to(times.dtype)


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
    "grid_prefix": _grid_prefix,
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
        grid: the rollout's (N+1,) sigma grid; required by "grid_subset", "stratified_grid" and "grid_prefix".
        options: "grid_prefix": `pool` (5); "uniform": `t_min`, `t_max` (0.001, 0.999); "logit_normal": `mean`, `std` (0, 1).
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
