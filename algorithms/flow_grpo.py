"""Flow-GRPO: trajectory likelihood of an SDE sampler, trained with PPO-clip (METHODS.md section 1).

Rollouts use a stochastic sampler whose every step `x -> x'` is a Gaussian with a closed-form mean and std, so the
log-likelihood of a stored transition can be recomputed under the current policy. The policy gradient is the
clipped-ratio surrogate of PPO on these per-step log-likelihoods, optionally with a KL to the frozen reference
written as the squared distance of the two Gaussian means.

The step and its log-likelihood (`sde_step_logprob`) and the rollout sampler (`flow_grpo_sde`) are shared harness
code in diffrl_bench/sde.py, the transition items in algorithms/transition_items.py; this module holds the pure
loss `grpo_loss` (the per-timestep loss block) and the plugin.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from diffrl_bench.algorithm import RolloutBatch, RolloutRequest, TrainingItem, require
from diffrl_bench.algorithms.transition_items import (clip_diagnostics, placeholder_loss, require_transition_sampler,
                                                      trained_transition_steps, transition_items, transition_step)
from diffrl_bench.flow import mean_chw
from diffrl_bench.registry import ALGORITHMS


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
    metrics.update(clip_diagnostics(log_ratio, ratio, clip_range))
    return loss, {name: value.detach() for name, value in metrics.items()}


# ---------------------------------------------------------------------------------------------------------------
# The plugin: what Flow-GRPO asks of the harness.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FlowGRPOConfig:
    """Options of Flow-GRPO (the `algo` section of a run config). Defaults are the released code's SD3.5 recipes.

    The sampler's noise level and SDE type are not repeated here: training recomputes log-probs with exactly the
    settings the rollout sampler ran with (`RolloutBatch.sampler_options`, and its CFG scale)."""

    clip_range: float = 1e-4
    """PPO clip range eps on the per-step likelihood ratio (1e-5 with the CPS sampler)"""
    adv_clip_max: float = 5.0
    """advantages are clipped to +-this inside the loss"""
    kl_beta: float = 0.04
    """weight of the KL between the step means of theta and the frozen reference (0.04 GenEval/OCR, 0.01 PickScore;
    0 drops the reference snapshot)"""
    timestep_fraction: float = 0.99
    """train on the first int(N * fraction) sampler steps (without an SDE window); with a window, on the window"""
    keep_zero_advantage: bool = False
    """false (the original): samples whose advantage is exactly 0, i.e. every sample of a prompt group whose rewards
    are all equal, are not trained [yifan123/flow_grpo@ac4c86e8:scripts/train_sd3.py:796-817]; true trains them
    too (their loss is then the KL term only)"""

    def validate(self) -> None:
        require(self.clip_range > 0, "clip_range", f"must be positive, got {self.clip_range}")
        require(self.kl_beta >= 0, "kl_beta", f"must be non-negative, got {self.kl_beta}")
        require(0 < self.timestep_fraction <= 1, "timestep_fraction", f"must be in (0, 1], got {self.timestep_fraction}")


@ALGORITHMS.register("flow_grpo")
class FlowGRPO:
    """Flow-GRPO (Liu et al., 2025; yifan123/flow_grpo): PPO-clip on the SDE sampler's per-step likelihoods."""

    Config = FlowGRPOConfig

    @staticmethod
    def check_run(config: FlowGRPOConfig, run: Any) -> None:
        require_transition_sampler(run, "flow_grpo")
        # Checked with or without an SDE window (a window trains all its steps, but a fraction of 0 steps is a typo).
        steps = run.rollout.sampler.num_steps
        require(int(steps * config.timestep_fraction) >= 1, "timestep_fraction",
                f"int({steps} x {config.timestep_fraction}) = 0 steps would be trained")

    def __init__(self, config: FlowGRPOConfig, run: Any = None):
        self.config = config
        # Rollouts come from the current policy; only the trained transitions are kept.
        record_before = None if run is None else trained_transition_steps(run, config.timestep_fraction)
        self.rollout = RolloutRequest(snapshot="theta", keep_x0=False, record_before=record_before)
        self.snapshots = {"ref": None} if config.kl_beta > 0 else {}
        self._needs = ("theta", "ref") if config.kl_beta > 0 else ("theta",)

    def training_items(self, batch: RolloutBatch, indices, micro_batch_size: int, generator) -> List[TrainingItem]:
        """Every recorded transition of the step's samples (`transition_items`: the rollout's layout is kept)."""
        return transition_items(batch, indices, micro_batch_size, self._needs, batch.advantages, "flow_grpo",
                                drop_zero_advantage=not self.config.keep_zero_advantage)

    def loss(self, item: TrainingItem, velocities: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        c, d = self.config, item.data
        if item.placeholder:  # every sample of this step had advantage 0 (keep_zero_advantage false)
            return placeholder_loss(velocities)
        step = transition_step(item, velocities["theta"])
        ref_mean = transition_step(item, velocities["ref"]).mean if c.kl_beta > 0 else None
        return grpo_loss(step.log_prob, d["old_log_prob"].to(step.log_prob), d["advantages"].to(step.log_prob),
                         clip_range=c.clip_range, adv_clip_max=c.adv_clip_max, beta=c.kl_beta, mean=step.mean,
                         ref_mean=ref_mean, std=step.std)
