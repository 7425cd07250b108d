"""Flow-GRPO: trajectory likelihood of an SDE sampler, trained with PPO-clip (METHODS.md section 1).

Rollouts use a stochastic sampler whose every step `x -> x'` is a Gaussian with a closed-form mean and std, so the
log-likelihood of a stored transition can be recomputed under the current policy. The policy gradient is the
clipped-ratio surrogate of PPO on these per-step log-likelihoods, optionally with a KL to the frozen reference
written as the squared distance of the two Gaussian means.

This module holds the two pure pieces: `sde_step_logprob` (one sampler step with its log-likelihood) and
`grpo_loss` (the per-timestep loss block), plus their parity runners.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from diffrl_bench.algorithms.weighting import mean_chw
from diffrl_bench.parity import case_long, case_tensor, register_parity_kind, to_numpy

SDE_TYPES = ("sde", "cps")


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
    noise_level: float = 0.7,
    sde_type: str = "sde",
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
        noise_level: `a` (0.7 in Flow-GRPO).
        sde_type: "sde" or "cps".
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
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
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


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    adv_clip_max: float = 5.0,
    beta: float = 0.0,
    mean: Optional[torch.Tensor] = None,
    ref_mean: Optional[torch.Tensor] = None,
    std: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Flow-GRPO's loss for one stored timestep of a micro-batch.

        A      = clip(advantages, -adv_clip_max, adv_clip_max)
        ratio  = exp(log p_theta(x'|x) - log p_old(x'|x))
        policy = mean_B max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))
        kl     = mean_B mean_CHW (mu_theta - mu_ref)^2 / (2 std_t^2)      (only when beta > 0)
        loss   = policy + beta kl

    The KL is that of two Gaussians with the same covariance, but, as in the released code, divided by `2 std_t^2`
    with the SDE's `std_dev_t` and no `-dt` factor; `std` is per sample and broadcast over the latent.

    Args:
        log_prob: (B,) current log-likelihoods (carry gradient); old_log_prob: (B,) the rollout's (detached here).
        advantages: (B,) raw advantages (clipped here).
        clip_range: PPO's eps (1e-4 in Flow-GRPO, 1e-5 with CPS).
        beta: KL weight; when > 0, `mean`, `ref_mean` (B, ...) and `std` (B,) are required.

    Returns:
        The scalar loss and detached metrics: `ratio` (B,), scalars `policy_loss`, `kl_loss` (only when beta > 0),
        `loss`, `approx_kl = 0.5 mean (log ratio)^2`, `clipfrac` (|ratio - 1| > eps), `clipfrac_gt_one`,
        `clipfrac_lt_one` (the three clip fractions are float32, as the original's `.float()` means), `ratio_mean`,
        `ratio_min`, `ratio_max`.
    """
    old_log_prob = old_log_prob.detach()
    adv = torch.clamp(advantages.detach(), -adv_clip_max, adv_clip_max)
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped, clipped))
    metrics: Dict[str, torch.Tensor] = {"ratio": ratio, "policy_loss": policy_loss}
    if beta > 0:
        if mean is None or ref_mean is None or std is None:
            raise ValueError("grpo_loss with beta > 0 needs mean, ref_mean and std for the KL term")
        kl = mean_chw((mean - ref_mean.detach()) ** 2) / (2 * std.reshape(-1) ** 2)
        kl_loss = torch.mean(kl)
        loss = policy_loss + beta * kl_loss
        metrics["kl_loss"] = kl_loss
    else:
        loss = policy_loss
    metrics["loss"] = loss
    with torch.no_grad():
        metrics["approx_kl"] = 0.5 * torch.mean(log_ratio**2)
        metrics["clipfrac"] = torch.mean((torch.abs(ratio - 1.0) > clip_range).float())
        metrics["clipfrac_gt_one"] = torch.mean((ratio - 1.0 > clip_range).float())
        metrics["clipfrac_lt_one"] = torch.mean((1.0 - ratio > clip_range).float())
        metrics["ratio_mean"] = ratio.mean()
        metrics["ratio_min"] = ratio.min()
        metrics["ratio_max"] = ratio.max()
    return loss, {name: value.detach() for name, value in metrics.items()}


# ---------------------------------------------------------------------------------------------------------------
# Parity runners (tests/data/parity/README.md, kinds 1 and 2)


@register_parity_kind("sde_step_logprob")
def _run_sde_step_logprob(case: dict) -> Dict[str, np.ndarray]:
    params = case["params"]
    sigmas = case_tensor(case, "sigmas")
    step_index = case_long(case, "step_index")
    # The original looks the index up from the timestep; the case gives both, so insist they agree.
    if "timestep" in case["inputs"] and "scheduler_timesteps" in case["inputs"]:
        table = case_tensor(case, "scheduler_timesteps")
        if not torch.equal(table[step_index], case_tensor(case, "timestep")):
            raise ValueError("timestep does not match scheduler_timesteps[step_index]")
    step = sde_step_logprob(
        case_tensor(case, "sample"), case_tensor(case, "model_output"),
        sigmas[step_index], sigmas[step_index + 1], sigmas[1],
        noise_level=float(params["noise_level"]), sde_type=params["sde_type"],
        prev_sample=case_tensor(case, "prev_sample"),
    )
    return to_numpy({"prev_sample_mean": step.mean, "std_dev_t": step.std, "sqrt_neg_dt": step.sqrt_neg_dt,
                     "log_prob": step.log_prob})


@register_parity_kind("grpo_loss")
def _run_grpo_loss(case: dict) -> Dict[str, np.ndarray]:
    params = case["params"]
    log_prob = case_tensor(case, "log_prob").clone().requires_grad_(True)
    loss, metrics = grpo_loss(
        log_prob, case_tensor(case, "old_log_prob"), case_tensor(case, "advantages"),
        clip_range=float(params["clip_range"]), adv_clip_max=float(params["adv_clip_max"]),
        beta=float(params["beta"]), mean=case_tensor(case, "prev_sample_mean"),
        ref_mean=case_tensor(case, "prev_sample_mean_ref"), std=case_tensor(case, "std_dev_t"),
    )
    (grad,) = torch.autograd.grad(loss, log_prob)
    return to_numpy({**metrics, "grad_log_prob": grad})


# ---------------------------------------------------------------------------------------------------------------
# The rollout sampler: SDE steps with log-probs, optionally only inside a window (Flow-GRPO-Fast)
# ---------------------------------------------------------------------------------------------------------------
from diffrl_bench.registry import SAMPLERS  # noqa: E402
from diffrl_bench.sampling import Rollout, VelocityFn  # noqa: E402


@SAMPLERS.register("flow_grpo_sde")
def flow_grpo_sde_sample(velocity_fn: VelocityFn, x_init: torch.Tensor, sigmas: torch.Tensor,
                         keep_trajectory: bool = True, *, noise_level: float = 0.7, sde_type: str = "sde",
                         window_size: int = 0, window_start: Optional[int] = None,
                         generator: Optional[torch.Generator] = None) -> Rollout:
    """Flow-GRPO's stochastic sampler: `sde_step_logprob` on every step, or only on a window of consecutive steps.

    `window_size = 0` makes every step stochastic (Flow-GRPO). With `window_size = W > 0` (Flow-GRPO-Fast) steps
    `window_start .. window_start + W - 1` are stochastic and the rest are Euler ODE steps; `window_start` is drawn
    uniformly from `generator` when not given. Returns the final sample, the per-step behaviour log-probs (NaN on
    ODE steps) and which steps were stochastic; the trajectory when `keep_trajectory`.
    """
    grid = [float(s) for s in sigmas]
    steps = len(grid) - 1
    if window_size < 0 or window_size > steps:
        raise ValueError(f"window_size {window_size} must be between 0 (all steps) and the {steps} sampler steps")
    stochastic = torch.ones(steps, dtype=torch.bool)
    if window_size:
        if window_start is None:
            window_start = int(torch.randint(0, steps - window_size + 1, (1,), generator=generator))
        if not 0 <= window_start <= steps - window_size:
            raise ValueError(f"window_start {window_start} does not fit a window of {window_size} in {steps} steps")
        stochastic[:] = False
        stochastic[window_start:window_start + window_size] = True
    x = x_init
    batch = x.shape[0]
    states = [x] if keep_trajectory else []
    log_probs = torch.full((steps, batch), float("nan"), dtype=torch.float32)
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:])):
        v = velocity_fn(x, torch.full((batch,), sigma, dtype=x.dtype, device=x.device))
        if stochastic[i]:
            step = sde_step_logprob(x, v, sigma, sigma_next, grid[1], noise_level=noise_level, sde_type=sde_type,
                                    generator=generator)
            x = step.prev_sample.to(x_init.dtype)
            log_probs[i] = step.log_prob.detach().float().cpu()
        else:
            x = x + v * (sigma_next - sigma)
        if keep_trajectory:
            states.append(x)
    return Rollout(x0=x, sigmas=sigmas, nfe=steps, trajectory=torch.stack(states) if keep_trajectory else None,
                   log_probs=log_probs, stochastic=stochastic)
