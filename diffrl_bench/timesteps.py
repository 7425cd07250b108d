"""Training-time distributions for forward-process losses (NFT, AWM, ELBO, CRD).

These losses noise a clean rollout sample to `x_t = (1 - t) x0 + t eps` at some t and regress the velocity there.
The originals train on the rollout sampler's own sigma grid; any distribution on (0, 1] is allowed, so the choice is
a component. Every kind returns a `(num_times, batch_size)` tensor: row k holds the k-th training time of each sample.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

TIME_DISTRIBUTIONS = ("grid_subset", "stratified_grid", "grid_prefix", "stratified_index", "uniform", "logit_normal")
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

    One time per stratum keeps the times spread over the whole trajectory, and sharing them within a micro-batch
    lets the model see one t per forward. An approximation of AWM's strata (which `stratified_index` reproduces):
    its strata cover all non-zero points, so t = 1 is always in.
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


def stratum_bounds(lo: int, hi: int, num_times: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper grid index of each of `num_times` strata over the index span [lo, hi]: the float32
    `linspace(lo, hi, num_times + 1)` truncated to integers, as AWM and Flow-Factory compute it
    (scxue/advantage_weighted_matching@be513723:
    advantage_weighted_matching/scripts/train_sd3_awm.py:1197-1202, X-GenGroup/Flow-Factory@a0b2bc5a:
    src/flow_factory/utils/noise_schedule.py:256-257). The float32 spacing is kept on purpose: for some spans it
    truncates a boundary one below its exact value, and the originals' strata are the reference.

    A stratum covers the indices [lower, upper); one with lower == upper (more strata than indices) holds `lower`.
    """
    bounds = torch.linspace(float(lo), float(hi), num_times + 1, dtype=torch.float32).long()
    return bounds[:-1], bounds[1:]


def _stratified_index(batch_size: int, num_times: int, generator: torch.Generator, grid: Optional[torch.Tensor],
                      index_range: Optional[Sequence[int]] = None):
    """One grid index per stratum of `stratum_bounds(lo, hi, num_times)`, `lower + floor(u (upper - lower))` with
    u ~ U[0, 1), shared by every sample of the call.

    Indices count the non-zero grid points from the noisy end (index 0 is t = 1 on the Euler grid); `index_range`
    [lo, hi] defaults to [0, number of non-zero points]. Index `hi` itself is never drawn. AWM's `discrete_wo_init`
    is [1, int(0.9 N)] (t = 1 never drawn), its `discrete` [0, int(0.9 N)]; Flow-Factory's CRD `discrete` spans the
    indices whose times lie in its timestep range. With more strata than indices the strata have width <= 1 and
    the times are fixed (CRD's 20 times on the 10-step grid).
    """
    if grid is None:
        raise ValueError("time distribution 'stratified_index' needs the rollout sigma grid (grid=...)")
    points = grid[grid > 0]
    n = points.numel()
    span = [0, n] if index_range is None else list(index_range)
    if not (len(span) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
            and 0 <= span[0] < span[1] <= n):
        raise ValueError(f"time distribution 'stratified_index': index_range={span} must be two integers "
                         f"0 <= lo < hi <= {n} (the grid's non-zero points)")
    lo, hi = span
    lower, upper = stratum_bounds(lo, hi, num_times)
    u = torch.rand(num_times, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    index = lower + torch.floor(u * (upper - lower)).long()
    return points[index.to(points.device)].unsqueeze(1).expand(num_times, batch_size).contiguous()


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
    "stratified_index": _stratified_index,
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
        grid: the rollout's (N+1,) sigma grid; required by "grid_subset", "stratified_grid", "grid_prefix" and
            "stratified_index".
        options: "grid_prefix": `pool` (5); "stratified_index": `index_range` ([0, N]); "uniform": `t_min`, `t_max` (0.001, 0.999); "logit_normal": `mean`, `std` (0, 1).
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
