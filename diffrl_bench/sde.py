"""Flow-GRPO's stochastic sampler: SDE (or CPS) steps with a closed-form Gaussian log-likelihood per step.

Every step `x -> x'` of this sampler is a Gaussian with a closed-form mean and std, so the log-likelihood of a stored
transition can be recomputed under any policy: that is what trajectory-likelihood methods (Flow-GRPO, the ELBO
paper's `trajectory` estimator, and GRPO-Guard / Flow-DPPO to come) train on. `sde_step_logprob` is the step;
`flow_grpo_sde_sample` (registered as the sampler `flow_grpo_sde`) runs it over a grid, optionally only on a window
of steps (Flow-GRPO-Fast), and records the transitions the harness keeps for training.

The step's settings (`SDE_STEP_OPTIONS`: noise_level, sde_type) are options of the sampler, with their defaults
written once (`DEFAULT_NOISE_LEVEL`, `DEFAULT_SDE_TYPE`) into its signature; the harness resolves the run's options once
(`config.resolve_sampler_options`) and hands them to the algorithm on the batch (`RolloutBatch.sampler_options`),
so training recomputes each step's likelihood with exactly the settings that sampled it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from diffrl_bench.flow import mean_chw
from diffrl_bench.registry import SAMPLERS
from diffrl_bench.sampling import Rollout, Transitions, VelocityFn

SDE_TYPES = ("sde", "cps")
DEFAULT_NOISE_LEVEL = 0.7
DEFAULT_SDE_TYPE = "sde"
"""Flow-GRPO's step settings; written once here for the step and the sampler signatures (Flow-GRPO-Fast: 0.8, cps)"""
SDE_STEP_OPTIONS = ("noise_level", "sde_type")
"""the sampler options that define one step's density, which training must reuse (`sde_step_options`)"""
STEP_SET_OPTIONS = ("window_size", "window_range", "window_start", "sde_steps", "sde_pool", "sde_count")
"""the sampler options that choose which steps are stochastic (`stochastic_steps`)"""


@dataclass
class SDEStep:
    """One stochastic sampler step, all float32.

    prev_sample: (B, ...) the next state x' (sampled, or the one given, detached).
    mean: (B, ...) the Gaussian mean mu of x' given x (carries gradient through `v`).
    std: (B,) `std_dev_t` as the original names it: the SDE diffusion coefficient sigma_t (the step's std is
        `std * sqrt_neg_dt`), or for CPS the step's std itself.
    sqrt_neg_dt: (B,) `sqrt(sigma - sigma_next)`.
    log_prob: (B,) log-likelihood of `prev_sample`, averaged (not summed) over the non-batch dimensions.
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    sqrt_neg_dt: torch.Tensor
    log_prob: torch.Tensor


def _as_batch_sigma(sigma: Union[float, torch.Tensor], batch: int, device) -> torch.Tensor:
    """Per-sample sigma as a float32 (B,) tensor (a scalar is broadcast to the batch)."""
    s = torch.as_tensor(sigma, device=device).to(torch.float32)
    if s.ndim == 0:
        s = s.expand(batch)
    if s.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or of shape ({batch},), got {tuple(s.shape)}")
    return s


def sde_step_logprob(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: Union[float, torch.Tensor],
    sigma_next: Union[float, torch.Tensor],
    sigma_first_next: Union[float, torch.Tensor],
    *,
    noise_level: float = DEFAULT_NOISE_LEVEL,
    sde_type: str = DEFAULT_SDE_TYPE,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> SDEStep:
    """One step of Flow-GRPO's stochastic sampler from `sigma` to `sigma_next < sigma`, with its log-likelihood.

    With `dt = sigma_next - sigma < 0` and noise level `a`:

    sde (the reverse-time SDE that keeps the marginals of the flow ODE `dx = v dt`):
        std_t = a sqrt(sigma / (1 - sigma~)),  sigma~ = sigma, except `sigma_first_next` where sigma == 1
        mu    = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt
        x'    = mu + std_t sqrt(-dt) z
        log p(x') = mean_CHW [ -(x' - mu)^2 / (2 std_t^2 (-dt)) - log(std_t sqrt(-dt)) - log sqrt(2 pi) ]
    cps (coefficient-preserving sampling):
        s  = sigma_next sin(a pi / 2)
        mu = x0^ (1 - sigma_next) + x1^ sqrt(sigma_next^2 - s^2),  x0^ = x - sigma v,  x1^ = x + (1 - sigma) v
        x' = mu + s z,   log p(x') = mean_CHW -(x' - mu)^2   (constants and the 1/(2 s^2) factor dropped)

    As in the released code everything is computed in float32 (inputs are cast), and the log-likelihood is of the
    detached `x'`, so its gradient flows only through `mu` (i.e. through `v`). With `a = 0` the sde step is exactly
    the Euler step `x + v dt` (its log-likelihood is then undefined).

    Args:
        x: (B, ...) current state; v: (B, ...) velocity at (x, sigma) (with CFG already applied).
        sigma, sigma_next: (B,) per-sample grid values (or scalars).
        sigma_first_next: the grid's second value, used in place of sigma in `1 - sigma~` where sigma == 1.
        noise_level: `a` (0.7 in Flow-GRPO); sde_type: "sde" or "cps" (the sampler's options; see
            `sde_step_options`).
        prev_sample: a stored x' to score (training); None samples a fresh one (rollout).
        generator: torch generator for the noise z when sampling.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"unknown sde_type {sde_type!r}; expected one of {SDE_TYPES}")
    x = x.float()
    v = v.float()
    batch = x.shape[0]
    shape = (batch, *([1] * (x.ndim - 1)))
    sig = _as_batch_sigma(sigma, batch, x.device)
    sig_next = _as_batch_sigma(sigma_next, batch, x.device)
    s_b = sig.reshape(shape)
    s_next_b = sig_next.reshape(shape)
    dt = s_next_b - s_b
    sqrt_neg_dt = torch.sqrt(-dt)

    if sde_type == "sde":
        first_next = torch.as_tensor(sigma_first_next, device=x.device).to(torch.float32)
        sigma_tilde = torch.where(s_b == 1, first_next, s_b)
        std = torch.sqrt(s_b / (1 - sigma_tilde)) * noise_level
        mean = x * (1 + std**2 / (2 * s_b) * dt) + v * (1 + std**2 * (1 - s_b) / (2 * s_b)) * dt
        step_std = std * sqrt_neg_dt
    else:
        std = s_next_b * math.sin(noise_level * math.pi / 2)
        x0_hat = x - s_b * v
        x1_hat = x + v * (1 - s_b)
        mean = x0_hat * (1 - s_next_b) + x1_hat * torch.sqrt(s_next_b**2 - std**2)
        step_std = std

    if prev_sample is None:
        # Draw on the generator's device (a CPU generator keeps rollouts reproducible across devices), then move.
        noise_device = generator.device if generator is not None else x.device
        z = torch.randn(x.shape, generator=generator, device=noise_device, dtype=torch.float32).to(x.device)
        prev_sample = mean + step_std * z
    prev_sample = prev_sample.detach().float()

    if sde_type == "sde":
        log_prob = (
            -((prev_sample - mean) ** 2) / (2 * step_std**2)
            - torch.log(step_std)
            - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi, dtype=torch.float32)))
        )
    else:
        log_prob = -((prev_sample - mean) ** 2)
    return SDEStep(
        prev_sample=prev_sample,
        mean=mean,
        std=std.reshape(batch),
        sqrt_neg_dt=sqrt_neg_dt.reshape(batch),
        log_prob=mean_chw(log_prob),
    )


def sde_step_options(sampler_options: dict) -> dict:
    """The step settings (`SDE_STEP_OPTIONS`) out of a rollout sampler's resolved options."""
    missing = [name for name in SDE_STEP_OPTIONS if name not in sampler_options]
    if missing:
        raise ValueError(f"the rollout sampler's options lack {missing}: trajectory likelihoods need a sampler with "
                         f"SDE steps (rollout.sampler.name: flow_grpo_sde)")
    return {name: sampler_options[name] for name in SDE_STEP_OPTIONS}


# ---------------------------------------------------------------------------------------------------------------
# Which steps are stochastic: all, a window (Flow-GRPO-Fast), or a set of steps (Flow-DPPO)


def draw_sde_steps(rollout_id: int, pool: Sequence[int], count: int) -> List[int]:
    """`count` distinct step indices of `range(pool[0], pool[1])`, sorted, drawn as UniRL's `AllSDEScheduler` does:
    `numpy.random.default_rng(rollout_id).choice(pool, count, replace=False)`. The draw depends on the rollout's
    index only (not on the run seed), so every chunk and process of one rollout draws the same set. With `count`
    equal to the pool's size every pool step is taken (no draw).
    Source: Tencent-Hunyuan/UniRL@1a7b501e8fe8517b432a130220d2ff462f9b5afa:unirl/utils/scheduler_utils.py:86-124."""
    lo, hi = int(pool[0]), int(pool[1])
    steps = list(range(lo, hi))
    if not 0 < count <= len(steps):
        raise ValueError(f"sde_count {count} must be between 1 and the {len(steps)} steps of sde_pool [{lo}, {hi})")
    if count == len(steps):
        return steps
    chosen = np.random.default_rng(int(rollout_id)).choice(steps, size=count, replace=False)
    return sorted(int(i) for i in chosen)


def stochastic_steps(steps: int, *, window_size: int = 0, window_range: Optional[Sequence[int]] = None,
                     window_start: Optional[int] = None, sde_steps: Optional[Sequence[int]] = None,
                     sde_pool: Optional[Sequence[int]] = None, sde_count: int = 0,
                     rollout_id: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(steps,) bool: which sampler steps are SDE steps (the others are Euler ODE steps). At most one of a window
    (`window_size`), an explicit set (`sde_steps`) or a drawn set (`sde_pool` + `sde_count`, seeded by
    `rollout_id`) may be given; none makes every step stochastic. See `flow_grpo_sde_sample` for the options."""
    chosen = [name for name, on in (("window_size", window_size), ("sde_steps", sde_steps is not None),
                                    ("sde_count", sde_count)) if on]
    if len(chosen) > 1:
        raise ValueError(f"the sampler options {chosen} each choose the SDE steps; give only one")
    stochastic = torch.ones(steps, dtype=torch.bool)
    if sde_count:
        if sde_pool is None or len(sde_pool) != 2:
            raise ValueError(f"sde_count {sde_count} needs sde_pool: [lo, hi) of step indices, got {sde_pool}")
        if not 0 <= int(sde_pool[0]) < int(sde_pool[1]) <= steps:
            raise ValueError(f"sde_pool {list(sde_pool)} must lie in [0, {steps}]")
        if rollout_id is None:
            raise ValueError("sde_count draws the SDE steps per rollout and needs the rollout's index (rollout_id)")
        sde_steps = draw_sde_steps(rollout_id, sde_pool, sde_count)
    if sde_steps is not None:
        chosen_steps = sorted({int(i) for i in sde_steps})
        if not chosen_steps or chosen_steps[0] < 0 or chosen_steps[-1] >= steps:
            raise ValueError(f"sde_steps {list(sde_steps)} must be a non-empty set of step indices in [0, {steps})")
        stochastic[:] = False
        stochastic[chosen_steps] = True
        return stochastic
    if window_size < 0 or window_size > steps:
        raise ValueError(f"window_size {window_size} must be between 0 (all steps) and the {steps} sampler steps")
    if window_size:
        lo, hi = (0, steps) if window_range is None else (int(window_range[0]), int(window_range[1]))
        if not (0 <= lo and hi <= steps and hi - lo >= window_size):
            raise ValueError(f"window_range {[lo, hi]} must lie in [0, {steps}] and hold a window of {window_size}")
        if window_start is None:
            window_start = int(torch.randint(lo, hi - window_size + 1, (1,), generator=generator))
        if not 0 <= window_start <= steps - window_size:
            raise ValueError(f"window_start {window_start} does not fit a window of {window_size} in {steps} steps")
        stochastic[:] = False
        stochastic[window_start:window_start + window_size] = True
    return stochastic


# ---------------------------------------------------------------------------------------------------------------
# The rollout sampler: SDE steps with log-probs, optionally only inside a window (Flow-GRPO-Fast) or on a step set


@SAMPLERS.register("flow_grpo_sde")
def flow_grpo_sde_sample(velocity_fn: VelocityFn, x_init: torch.Tensor, sigmas: torch.Tensor,
                         *, noise_level: float = DEFAULT_NOISE_LEVEL,
                         sde_type: str = DEFAULT_SDE_TYPE,
                         window_size: int = 0, window_range: Optional[Sequence[int]] = None,
                         window_start: Optional[int] = None, shared_prefix: bool = False,
                         sde_steps: Optional[Sequence[int]] = None, sde_pool: Optional[Sequence[int]] = None,
                         sde_count: int = 0,
                         record_before: Optional[int] = None, record_means: bool = False,
                         groups: Optional[torch.Tensor] = None, rollout_id: Optional[int] = None,
                         generator: Optional[torch.Generator] = None) -> Rollout:
    """Flow-GRPO's stochastic sampler: `sde_step_logprob` on every step, or only on a window of consecutive steps.

    Options (`rollout.sampler.options` in a run config):
        noise_level, sde_type: of `sde_step_logprob` (0.7 and "sde" in Flow-GRPO; Flow-GRPO-Fast uses 0.8 and "cps").
        window_size: 0 makes every step stochastic (Flow-GRPO). W > 0 (Flow-GRPO-Fast) makes W consecutive steps
            stochastic and the others Euler ODE steps; the window's start is drawn uniformly (from `generator`) so that
            the window lies inside `window_range = [lo, hi)` of step indices (default the whole grid; the Fast
            recipe uses [0, N // 2)). `window_start` fixes it instead (tests).
        shared_prefix: with a window, integrate the deterministic ODE prefix before it once per group (`groups`,
            given by the harness) instead of once per sample; needs the same initial noise within each group
            (`rollout.same_noise_per_group`). The velocity function must then accept `rows=` (the harness's does).
        sde_steps: an explicit set of stochastic step indices, not necessarily consecutive (ODE elsewhere).
        sde_pool, sde_count: Flow-DPPO's per-rollout step set: `sde_count` distinct steps of `[lo, hi)` drawn by
            `draw_sde_steps(rollout_id, ...)` (the recipe: 3 of [0, 5) on 10 steps), the same for every chunk of a
            rollout. Only one of window_size, sde_steps, sde_count may be set.

    Harness arguments: `record_before` asks for `Rollout.transitions`: the stochastic steps with index
    < record_before (the trained ones), as latents, grid indices and behaviour log-probs; `record_means` adds
    each recorded step's behaviour mean (`Transitions.means`); `groups` (B,) prompt-group ids and `rollout_id`
    (the RL step's index), passed by the harness to every sampler that names them.

    Returns the final sample, the per-step behaviour log-probs (NaN on ODE steps), which steps were stochastic, and
    the transitions when asked.
    """
    grid = [float(s) for s in sigmas]
    steps = len(grid) - 1
    stochastic = stochastic_steps(steps, window_size=window_size, window_range=window_range,
                                  window_start=window_start, sde_steps=sde_steps, sde_pool=sde_pool,
                                  sde_count=sde_count, rollout_id=rollout_id, generator=generator)
    first_stochastic = int(stochastic.nonzero()[0])
    recorded = stochastic.clone()
    if record_before is not None:
        recorded[record_before:] = False

    x = x_init
    batch = x.shape[0]
    total_nfe = steps * batch
    start_step = 0
    if shared_prefix and first_stochastic > 0:
        x, prefix_nfe = _shared_ode_prefix(velocity_fn, x_init, grid[:first_stochastic + 1], groups)
        total_nfe -= first_stochastic * batch - prefix_nfe
        start_step = first_stochastic
    log_probs = torch.full((steps, batch), float("nan"), dtype=torch.float32)
    befores: List[torch.Tensor] = []
    afters: List[torch.Tensor] = []
    means: List[torch.Tensor] = []
    kept_steps: List[int] = []
    for i in range(start_step, steps):
        sigma, sigma_next = grid[i], grid[i + 1]
        if recorded[i]:
            befores.append(x)
        v = velocity_fn(x, torch.full((batch,), sigma, dtype=x.dtype, device=x.device))
        if stochastic[i]:
            step = sde_step_logprob(x, v, sigma, sigma_next, grid[1], noise_level=noise_level, sde_type=sde_type,
                                    generator=generator)
            x = step.prev_sample.to(x_init.dtype)
            log_probs[i] = step.log_prob.detach().float().cpu()
            if recorded[i] and record_means:
                means.append(step.mean.detach().float())
        else:
            x = x + v * (sigma_next - sigma)
        if recorded[i]:
            afters.append(x)
            kept_steps.append(i)
    transitions = None
    if record_before is not None:
        if not kept_steps:
            raise ValueError(f"no stochastic step before record_before={record_before} "
                             f"(stochastic steps: {stochastic.nonzero().flatten().tolist()})")
        index = torch.tensor(kept_steps)
        consecutive = kept_steps == list(range(kept_steps[0], kept_steps[-1] + 1))
        # Consecutive steps share their states (R + 1 latents); a step set keeps each step's before and after.
        transitions = Transitions(
            latents=torch.stack([befores[0], *afters] if consecutive else befores),
            steps=index[:, None].expand(-1, batch).clone(), log_probs=log_probs[index].clone(),
            next_latents=None if consecutive else torch.stack(afters),
            means=torch.stack(means) if record_means else None)
    return Rollout(x0=x, sigmas=sigmas, nfe=steps, log_probs=log_probs, stochastic=stochastic, transitions=transitions, total_nfe=total_nfe)


flow_grpo_sde_sample.records_transitions = True


def _shared_ode_prefix(velocity_fn: VelocityFn, x_init: torch.Tensor, grid: List[float],
                       groups: Optional[torch.Tensor]) -> Tuple[torch.Tensor, int]:
    """Euler steps over `grid` computed on one representative per group, then broadcast back to every sample."""
    if groups is None:
        raise ValueError("shared_prefix needs the prompt-group ids (the harness passes them as `groups`)")
    groups = groups.to(torch.long).cpu()
    ids, first = _first_of_each(groups)
    reps = x_init[first]
    expanded = reps[torch.searchsorted(ids, groups)]
    if not torch.equal(expanded, x_init):
        raise ValueError("shared_prefix needs the same initial noise within each group "
                         "(set rollout.same_noise_per_group: true)")
    x = reps
    for sigma, sigma_next in zip(grid[:-1], grid[1:]):
        v = velocity_fn(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device), rows=first)
        x = x + v * (sigma_next - sigma)
    return x[torch.searchsorted(ids, groups)], (len(grid) - 1) * len(first)


def _first_of_each(groups: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sorted distinct ids and the row of each id's first occurrence."""
    ids = torch.unique(groups)
    first = torch.tensor([int((groups == g).nonzero()[0]) for g in ids], dtype=torch.long)
    return ids, first
