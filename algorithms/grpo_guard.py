"""GRPO-Guard: Flow-GRPO with a normalised likelihood ratio and a per-step gradient reweighting (arXiv 2510.22319).

Flow-GRPO's per-step log-ratio `log p_theta(x'|x) - log p_old(x'|x)` is, for the Gaussian SDE step, a noisy quantity
whose mean sits below 0 and whose spread changes with the step's noise, so a fixed PPO clip range bites at some
steps and never at others. GRPO-Guard shifts the log-ratio by the (batch-mean) squared drift of the step mean and
rescales it by the step's noise scale before the clip, then divides the step's policy loss by `dt` so every step
contributes a gradient of comparable size.

This module holds the pure pieces, `guard_ratio` (the normalised ratio) and `grpo_guard_loss` (the per-timestep loss
block), and the plugin: Flow-GRPO's loop with the behaviour step means stored at rollout
(`RolloutRequest.record_means`), so the ratio norm compares the current mean with the sampling policy's on every
optimizer step of a rollout. Source: zhtmike/flow_grpo@9745241cf1101407e9b518dd4f10498092150522:scripts/train_sd3_GRPO_Guard.py:909-971
(upstream yifan123/flow_grpo commit 2e2f712).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from diffrl_bench.algorithm import RolloutBatch, RolloutRequest, TrainingItem, require
from diffrl_bench.algorithms.transition_items import (check_trained_transitions, clip_diagnostics, placeholder_loss,
                                                      require_transition_sampler, trained_transition_steps,
                                                      transition_items, transition_step)
from diffrl_bench.config import resolve_sampler_options
from diffrl_bench.flow import mean_chw
from diffrl_bench.registry import ALGORITHMS


def guard_ratio(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    std: torch.Tensor,
    sqrt_dt: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO-Guard's normalised likelihood ratio ("RatioNorm") for one micro-batch at one step.

        s    = mean_B std_t                  d = mean_B sqrt(sigma - sigma_next)
        bias = mean over all B*C*H*W elements of (mu - mu_old)^2 / (2 (d s)^2)      (one scalar per micro-batch)
        ratio_i = exp((log p_i - log p_old_i + bias) d s)

    `bias` is a single number for the whole micro-batch, exactly as the original computes it: its
    `.mean(dim=tuple(range(1, log_prob.ndim)))` is `.mean(dim=())` for a (B,) log-prob, which torch treats as a
    reduction over every dimension. Its gradient therefore reaches every sample's mean. `s` and `d` are batch means
    too (the original's samples share one step; with mixed steps they are still averaged).

    Args:
        log_prob: (B,) current log-likelihoods (carry gradient); old_log_prob: (B,) the behaviour ones (detached).
        mean: (B, ...) current step mean mu (carries gradient); old_mean: (B, ...) the behaviour mean stored at
            rollout (detached).
        std: (B,) the SDE's `std_dev_t`; sqrt_dt: (B,) `sqrt(sigma - sigma_next)`.

    Returns:
        (ratio (B,), bias (scalar), s (scalar), d (scalar)).
    """
    sigma_t = std.reshape(-1).mean()
    dt_scale = sqrt_dt.reshape(-1).mean()
    bias = (mean - old_mean.detach()).pow(2).mean() / (2 * (dt_scale * sigma_t) ** 2)
    ratio = torch.exp((log_prob - old_log_prob.detach() + bias) * (dt_scale * sigma_t))
    return ratio, bias, sigma_t, dt_scale


def grpo_guard_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    std: torch.Tensor,
    sqrt_dt: torch.Tensor,
    clip_range: float,
    adv_clip_max: float = 5.0,
    beta: float = 0.0,
    ref_mean: Optional[torch.Tensor] = None,
    rationorm: bool = True,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GRPO-Guard's loss for one stored timestep of a micro-batch.

        A      = clip(advantages, -adv_clip_max, adv_clip_max)
        ratio  = guard_ratio(...)                       (normalised, see `guard_ratio`)
        policy = mean_B max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) / d^2          d = mean_B sqrt(-dt)
        kl     = mean_B mean_CHW (mu - mu_ref)^2 / (2 std_t^2)                          (only when beta > 0)
        loss   = policy + beta kl

    The `/ d^2` is the paper's gradient reweighting. The KL is Flow-GRPO's (per-sample std, no dt). The logged
    `approx_kl = 0.5 mean_B (log p - log p_old)^2` uses the raw log-ratio, and the clip fractions compare the
    normalised ratio with eps, as the original logs them. The configs' `highclip_range` is never read by the original.

    With `rationorm=False` this is exactly Flow-GRPO's loss (the original script's other branch; tested equal to
    `flow_grpo.grpo_loss`).

    Args:
        log_prob, old_log_prob: (B,) current / behaviour log-likelihoods; advantages: (B,) raw (clipped here).
        mean, old_mean: (B, ...) current / behaviour (stored at rollout) step means.
        std, sqrt_dt: (B,) `std_dev_t` and `sqrt(sigma - sigma_next)` of each sample's step.
        clip_range: PPO eps (2e-6 GenEval/OCR, 4e-6 PickScore in the released configs).
        beta: KL weight (0 in every released GRPO-Guard config); when > 0, `ref_mean` (B, ...) is required.

    Returns:
        The scalar loss and detached metrics: `ratio` (B,), scalars `ratio_mean_bias`, `sigma_t`, `policy_loss`
        (already divided by d^2), `kl_loss` (only when beta > 0), `loss`, `approx_kl`, `clipfrac`,
        `clipfrac_gt_one`, `clipfrac_lt_one` (float32, as the original's `.float()` means), `ratio_mean`,
        `ratio_min`, `ratio_max`.
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be positive, got {clip_range}")
    if beta > 0 and ref_mean is None:
        raise ValueError("grpo_guard_loss with beta > 0 needs ref_mean for the KL term")
    adv = torch.clamp(advantages.detach(), -adv_clip_max, adv_clip_max)
    if rationorm:
        ratio, bias, sigma_t, dt_scale = guard_ratio(log_prob, old_log_prob, mean, old_mean, std, sqrt_dt)
        weight = 1 / dt_scale**2
        metrics: Dict[str, torch.Tensor] = {"ratio_mean_bias": bias, "sigma_t": sigma_t}
    else:  # Flow-GRPO's plain ratio and step weight (written here: a plugin does not import another plugin)
        ratio, weight, metrics = torch.exp(log_prob - old_log_prob.detach()), 1.0, {}
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped, clipped)) * weight
    metrics.update(ratio=ratio, policy_loss=policy_loss)
    if beta > 0:
        kl_loss = torch.mean(mean_chw((mean - ref_mean.detach()) ** 2) / (2 * std.reshape(-1) ** 2))
        loss = policy_loss + beta * kl_loss
        metrics["kl_loss"] = kl_loss
    else:
        loss = policy_loss
    metrics["loss"] = loss
    metrics.update(clip_diagnostics(log_prob - old_log_prob, ratio, clip_range))
    return loss, {name: value.detach() for name, value in metrics.items()}


# ---------------------------------------------------------------------------------------------------------------
# The plugin: Flow-GRPO's harness requests plus the stored behaviour means.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class GRPOGuardConfig:
    """Options of GRPO-Guard (the `algo` section). Defaults: the released SD3.5 GenEval recipe
    (zhtmike/flow_grpo@9745241:config/grpo_guard.py:geneval_sd3_rationorm, 157-176).

    As for Flow-GRPO, the sampler's noise level / SDE type and the CFG scale are not repeated: training recomputes
    each step with the rollout's settings (`RolloutBatch.sampler_options`, `cfg_scale`)."""

    clip_range: float = 2e-6
    """PPO eps on the *normalised* ratio (2e-6 GenEval/OCR, 4e-6 PickScore: config/grpo_guard.py:173, 76, 124)"""
    adv_clip_max: float = 5.0
    """advantages are clipped to +-this inside the loss (config/base.py:97)"""
    kl_beta: float = 0.0
    """KL to the frozen reference on the step means (0 in every released config; > 0 adds the ref snapshot)"""
    timestep_fraction: float = 0.99
    """train on the first int(N * fraction) sampler steps (9 of 10; config/grpo_guard.py:157)"""
    keep_zero_advantage: bool = False
    """false (the original, whose script keeps Flow-GRPO's filter): samples whose advantage is exactly 0 are not
    trained [yifan123/flow_grpo@ac4c86e8:scripts/train_sd3.py:796-817]; true trains them too"""
    rationorm: bool = True
    """the normalised ratio and 1/dt reweighting; false is exactly Flow-GRPO's loss (the original's other branch)"""

    def validate(self) -> None:
        require(self.clip_range > 0, "clip_range", f"must be positive, got {self.clip_range}")
        require(self.adv_clip_max > 0, "adv_clip_max", f"must be positive, got {self.adv_clip_max}")
        require(self.kl_beta >= 0, "kl_beta", f"must be non-negative, got {self.kl_beta}")
        require(0 < self.timestep_fraction <= 1, "timestep_fraction", f"must be in (0, 1], got {self.timestep_fraction}")


@ALGORITHMS.register("grpo_guard")
class GRPOGuard:
    """GRPO-Guard (arXiv 2510.22319; zhtmike/flow_grpo scripts/train_sd3_GRPO_Guard.py): Flow-GRPO with RatioNorm."""

    Config = GRPOGuardConfig

    @staticmethod
    def check_run(config: GRPOGuardConfig, run: Any) -> None:
        require_transition_sampler(run, "grpo_guard")
        sde_type = resolve_sampler_options(run.rollout.sampler).get("sde_type")
        # The ratio norm divides by the SDE's std_t sqrt(-dt); CPS's std has another meaning and no released recipe.
        if config.rationorm:
            require(sde_type == "sde", "rationorm", f"needs rollout.sampler.options.sde_type 'sde', got {sde_type!r}")
        check_trained_transitions(config.timestep_fraction, run)

    def __init__(self, config: GRPOGuardConfig, run: Any = None):
        self.config = config
        record_before = None if run is None else trained_transition_steps(run, config.timestep_fraction)
        # The behaviour means are stored, never recomputed: the second optimizer step of a rollout still compares
        # with the sampling policy (the original keeps `prev_sample_mean` from the rollout).
        self.rollout = RolloutRequest(snapshot="theta", keep_x0=False, record_before=record_before,
                                      record_means=config.rationorm)
        self.snapshots = {"ref": None} if config.kl_beta > 0 else {}
        self._needs = ("theta", "ref") if config.kl_beta > 0 else ("theta",)

    def training_items(self, batch: RolloutBatch, indices, micro_batch_size: int, generator) -> List[TrainingItem]:
        """Every recorded transition, with its behaviour mean (`transition_items` adds `old_mean`)."""
        return transition_items(batch, indices, micro_batch_size, self._needs, batch.advantages, "grpo_guard",
                                drop_zero_advantage=not self.config.keep_zero_advantage)

    def loss(self, item: TrainingItem, velocities: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        c, d = self.config, item.data
        if item.placeholder:  # every sample of this step had advantage 0 (keep_zero_advantage false)
            return placeholder_loss(velocities)
        step = transition_step(item, velocities["theta"])
        ref_mean = transition_step(item, velocities["ref"]).mean if c.kl_beta > 0 else None
        old_mean = d["old_mean"].to(step.mean) if c.rationorm else step.mean.detach()
        loss, metrics = grpo_guard_loss(
            step.log_prob, d["old_log_prob"].to(step.log_prob), d["advantages"].to(step.log_prob),
            mean=step.mean, old_mean=old_mean, std=step.std, sqrt_dt=step.sqrt_neg_dt, clip_range=c.clip_range,
            adv_clip_max=c.adv_clip_max, beta=c.kl_beta, ref_mean=ref_mean, rationorm=c.rationorm)
        return loss, metrics
