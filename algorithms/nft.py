"""DiffusionNFT: negative-aware fine-tuning on the forward process (METHODS.md section 2).

The loss is a pure function of the velocities of three policy snapshots at the same noised sample `x_t`:
`v_theta` (trained), `v_old` (the behaviour policy that sampled the rollout) and `v_ref` (the frozen base model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from diffrl_bench.advantages import optimality_probability
from diffrl_bench.algorithm import RolloutBatch, RolloutRequest, TrainingItem, require
from diffrl_bench.algorithms.checks import check_decays, check_time_distribution, check_training_times
from diffrl_bench.algorithms.forward_items import forward_process_items
from diffrl_bench.algorithms.weighting import adaptive_x0_loss
from diffrl_bench.flow import mean_chw, per_sample
from diffrl_bench.registry import ALGORITHMS
from diffrl_bench.schedules import decay_schedule
from diffrl_bench.timesteps import sample_train_times

NFT_LOSS_FORMS = ("adaptive_x0", "velocity")


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    v_ref: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    advantages: torch.Tensor,
    *,
    nft_beta: float = 1.0,
    kl_beta: float = 1e-4,
    adv_clip_max: float = 5.0,
    form: str = "adaptive_x0",
    eps: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """DiffusionNFT loss for one training time per sample.

    The optimality probability `r = clip(0.5 + clip(A, -c, c) / (2c), 0, 1)` mixes two implicit policies built from
    the trained and the (stop-gradient) old velocity:
        v+ = beta v_theta + (1 - beta) v_old      (pulled towards good samples, weight r)
        v- = (1 + beta) v_old - beta v_theta      (pushed away from bad samples, weight 1 - r)
    form "adaptive_x0" (the released code, default): x0 predictions `x_t - t v+-` scored with the self-normalised
        x0 loss L; policy loss `c * mean(r L+ + (1 - r) L-) / beta` (c = adv_clip_max).
    form "velocity" (the paper): `mean(r mean_CHW (v+ - v*)^2 + (1 - r) mean_CHW (v- - v*)^2)`, `v* = eps - x0`
        (needs `eps`); no extra scaling.
    Total: `policy + kl_beta * mean_B mean_CHW (v_theta - v_ref)^2`.

    Args:
        v_theta, v_old, v_ref: (B, ...) velocities at `x_t`; only `v_theta` should carry gradient (the others are
            detached here regardless).
        x0: (B, ...) clean rollout samples; x_t: (B, ...) their noised versions at time `t` (B,).
        advantages: (B,) raw group advantages (clipped inside).
        nft_beta: NFT guidance strength (config `beta`), not the KL weight.
        kl_beta: weight of the velocity-space KL to the reference.

    Returns:
        The scalar loss and detached metrics: per-sample `r`, `positive_loss`, `negative_loss` (B,), and scalars
        `policy_loss`, `unweighted_policy_loss` (the policy loss before the factor c, as the original logs it; equal to
        `policy_loss` in the velocity form), `kl_loss`, `loss`.
    """
    if form not in NFT_LOSS_FORMS:
        raise ValueError(f"unknown NFT loss form {form!r}; expected one of {NFT_LOSS_FORMS}")
    if nft_beta <= 0:
        raise ValueError(f"nft_beta must be > 0, got {nft_beta}")
    r = optimality_probability(advantages, adv_clip_max)
    v_old = v_old.detach()
    v_pos = nft_beta * v_theta + (1 - nft_beta) * v_old
    v_neg = (1 + nft_beta) * v_old - nft_beta * v_theta

    if form == "adaptive_x0":
        tb = per_sample(t, x_t)
        positive_loss = adaptive_x0_loss(x_t - tb * v_pos, x0)
        negative_loss = adaptive_x0_loss(x_t - tb * v_neg, x0)
        # Scaled by 1 / beta so the gradient's size does not shrink with beta (d v+- / d v_theta = +-beta).
        sample_loss = r * positive_loss / nft_beta + (1 - r) * negative_loss / nft_beta
        unweighted_policy_loss = sample_loss.mean()
        policy_loss = (sample_loss * adv_clip_max).mean()
    else:
        if eps is None:
            raise ValueError("NFT loss form 'velocity' needs the noise eps (its target is v* = eps - x0)")
        target = eps - x0
        positive_loss = mean_chw((v_pos - target).square())
        negative_loss = mean_chw((v_neg - target).square())
        unweighted_policy_loss = (r * positive_loss + (1 - r) * negative_loss).mean()
        policy_loss = unweighted_policy_loss

    kl_loss = mean_chw((v_theta - v_ref.detach()).square()).mean()
    loss = policy_loss + kl_beta * kl_loss
    metrics = {
        "r": r,
        "positive_loss": positive_loss,
        "negative_loss": negative_loss,
        "policy_loss": policy_loss,
        "unweighted_policy_loss": unweighted_policy_loss,
        "kl_loss": kl_loss,
        "loss": loss,
    }
    return loss, {name: value.detach() for name, value in metrics.items()}


# ---------------------------------------------------------------------------------------------------------------
# The plugin: what DiffusionNFT asks of the harness.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class NFTConfig:
    """Options of DiffusionNFT (the `algo` section of a run config). Defaults are the released code's."""

    nft_beta: float = 1.0
    """NFT guidance strength beta in v+- (0.1 for OCR and multi-reward in the paper); not the KL weight"""
    kl_beta: float = 1e-4
    """weight of the velocity-space KL to the frozen reference (0 drops the reference snapshot)"""
    adv_clip_max: float = 5.0
    """advantages are clipped to +-this before the [0, 1] optimality map"""
    loss_form: str = "adaptive_x0"
    """`adaptive_x0` (the released code: self-normalised x0-space loss) or `velocity` (the paper's form)"""
    old_decay: Any = "nft"
    """decay schedule of the `old` (= sampler) snapshot: a preset name, "start-value-slope-max", or a dict"""
    time_distribution: str = "grid_subset"
    """training-time distribution: grid_subset (the original: rollout grid points), stratified_grid, uniform, logit_normal"""
    num_train_times: int = 9
    """training times per sample and step (the original: 9 of the 10 grid points)"""

    def validate(self) -> None:
        require(self.loss_form in NFT_LOSS_FORMS, "loss_form", f"{self.loss_form!r} is not one of {NFT_LOSS_FORMS}")
        require(self.nft_beta > 0, "nft_beta", f"must be positive, got {self.nft_beta}")
        require(self.kl_beta >= 0, "kl_beta", f"must be non-negative, got {self.kl_beta}")
        check_time_distribution(self)
        check_decays(self, "old_decay")


@ALGORITHMS.register("nft")
class DiffusionNFT:
    """DiffusionNFT (Zheng et al., 2025; NVlabs/DiffusionNFT): negative-aware fine-tuning on the forward process."""

    Config = NFTConfig

    @staticmethod
    def check_run(config: NFTConfig, run: Any) -> None:
        check_training_times(config, run)

    def __init__(self, config: NFTConfig, run: Any = None):
        self.config = config
        # Rollouts come from the lagging `old` policy (the original's sampler == old), and only x0 is stored.
        self.rollout = RolloutRequest(snapshot="old")
        self.snapshots = {"old": decay_schedule(config.old_decay)}
        if config.kl_beta > 0:
            self.snapshots["ref"] = None  # the frozen base
        self._needs = ("theta", "old", "ref") if config.kl_beta > 0 else ("theta", "old")

    def training_items(self, batch: RolloutBatch, indices, micro_batch_size: int,
                       generator) -> List[TrainingItem]:
        """Each sample is noised at `num_train_times` times with fresh noise per (sample, time).

        The (time, sample) pairs are flattened time-major and cut into micro-batches of `micro_batch_size` pairs,
        so one forward can cover several training times. Times and noise are drawn for the whole optimizer step
        first, so the gradient does not depend on the micro-batch size.
        """
        c = self.config
        x0 = batch.x0[indices]
        times = sample_train_times(c.time_distribution, len(indices), c.num_train_times, generator, grid=batch.sigmas)
        return forward_process_items(x0, indices, times, generator, micro_batch_size, self._needs,
                                     per_sample={"advantages": batch.advantages[indices]})

    def loss(self, item: TrainingItem, velocities: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        c = self.config
        v_theta = velocities["theta"]
        v_ref = velocities.get("ref", v_theta.detach())
        return nft_loss(v_theta, velocities["old"], v_ref, item.data["x0"], item.x, item.data["t"],
                        item.data["advantages"], nft_beta=c.nft_beta, kl_beta=c.kl_beta,
                        adv_clip_max=c.adv_clip_max, form=c.loss_form, eps=item.data["eps"])
