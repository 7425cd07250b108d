"""`rft`: best-of-K rejection-sampling fine-tuning, the control arm.

None of the papers reports it, yet every speedup claim should be read against it: sample K images per prompt with the
current policy, keep the best `top_k` of each group by reward, and train plain flow matching on them,
`mean_CHW (v_theta(x_t, t) - (eps - x0))^2`, at a few sampled times, on the same rollout budget as every other
method. Nothing is pushed away from bad samples, there are no advantages, ratios or snapshots (only an optional KL
to the frozen base), so whatever a method gains over this floor is what its objective buys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from diffrl_bench.advantages import zero_variance_mask
from diffrl_bench.algorithm import OptionError, RolloutBatch, RolloutRequest, TrainingItem, require
from diffrl_bench.algorithms.checks import check_time_distribution, check_training_times
from diffrl_bench.algorithms.forward_items import forward_process_items
from diffrl_bench.flow import mean_chw
from diffrl_bench.registry import ALGORITHMS
from diffrl_bench.timesteps import sample_train_times


@dataclass
class RFTConfig:
    """Options of `rft` (the `algo` section of a run config)."""

    top_k: int = 1
    """samples kept per prompt group (the best by reward; ties go to the lower index)"""
    top_fraction: float = 0.0
    """when > 0, keep ceil(top_fraction * group size) per group instead of top_k"""
    skip_flat_groups: bool = True
    """keep nothing from a group whose rewards are all equal: it has no best sample (and if all failed, its
    samples would be reinforced failures)"""
    min_reward: Optional[float] = None
    """also drop kept samples whose reward is below this (a verifier's threshold, e.g. 0.5 for the toy reward with
    strict_weight 0.5: only fully correct images); None keeps the best of each group whatever it scored"""
    kl_beta: float = 0.0
    """weight of the velocity-space KL `mean (v_theta - v_ref)^2` to the frozen base (0: no ref snapshot)"""
    time_distribution: str = "logit_normal"
    """training times: logit_normal (the base model's own pretraining distribution), uniform, grid_subset,
    stratified_grid"""
    num_train_times: int = 9
    """training times per kept sample, each with fresh noise"""

    def validate(self) -> None:
        require(self.top_k >= 1, "top_k", f"must be at least 1, got {self.top_k}")
        require(0 <= self.top_fraction <= 1, "top_fraction", f"must be in [0, 1] (0: use top_k), got {self.top_fraction}")
        require(self.kl_beta >= 0, "kl_beta", f"must be non-negative, got {self.kl_beta}")
        check_time_distribution(self)


def best_of_group(rewards: torch.Tensor, group_ids: torch.Tensor, top_k: int = 1, top_fraction: float = 0.0,
                  skip_flat_groups: bool = True, min_reward: Optional[float] = None) -> torch.Tensor:
    """(B,) bool: the `top_k` highest rewards of each group (ceil(top_fraction * size) when top_fraction > 0),
    ties broken towards the lower index; groups with identical rewards keep nothing when `skip_flat_groups`, and
    samples below `min_reward` are dropped."""
    keep = torch.zeros(rewards.shape[0], dtype=torch.bool)
    flat = zero_variance_mask(rewards, group_ids).cpu()
    for g in torch.unique(group_ids):
        members = (group_ids == g).nonzero().flatten().cpu()
        if skip_flat_groups and bool(flat[members[0]]):
            continue
        k = math.ceil(top_fraction * len(members)) if top_fraction > 0 else top_k
        # Sorting by (-reward, index): a stable sort of the negated rewards keeps the lower index first on ties.
        order = torch.sort(-rewards[members].double().cpu(), stable=True).indices
        keep[members[order[:min(k, len(members))]]] = True
    if min_reward is not None:
        keep &= rewards.cpu() >= min_reward
    return keep


@ALGORITHMS.register("rft")
class RejectionSamplingFineTuning:
    """Best-of-K rejection-sampling fine-tuning: plain flow matching on each group's best samples (control arm)."""

    Config = RFTConfig

    @staticmethod
    def check_run(config: RFTConfig, run: Any) -> None:
        check_training_times(config, run)
        if config.top_fraction == 0 and config.top_k >= run.rollout.images_per_prompt:
            raise OptionError("top_k", f"keeping {config.top_k} of {run.rollout.images_per_prompt} images per prompt "
                                       f"rejects nothing, which is plain self-distillation, not best-of-K")

    def __init__(self, config: RFTConfig, run: Any = None):
        self.config = config
        self.rollout = RolloutRequest(snapshot="theta", keep_x0=True)
        self.snapshots = {"ref": None} if config.kl_beta > 0 else {}
        self._needs = ("theta", "ref") if config.kl_beta > 0 else ("theta",)

    def training_items(self, batch: RolloutBatch, indices, micro_batch_size: int, generator) -> List[TrainingItem]:
        """(time, kept sample) pairs, time-major, in micro-batches of pairs. Selection is over whole groups of the
        step (across processes); an optimizer step trains the kept samples among its `indices`.

        When none of them is kept, one placeholder item with a zero loss is returned instead of none: every process
        then still runs the step's forward and backward passes (collectives under DDP and DeepSpeed), with the same
        snapshots as a real item, the gradient is exactly zero, and the logged `fm_loss` of that step is left empty."""
        c = self.config
        # Selected over the whole step, so a prompt group split between processes keeps its one best sample.
        rewards, group_ids = batch.whole_step()
        keep = best_of_group(rewards, group_ids, c.top_k, c.top_fraction, c.skip_flat_groups,
                             c.min_reward)[batch.local_slice()]
        chosen = indices[keep[indices]]
        B, T = len(chosen), c.num_train_times
        # Times and noise are drawn even when nothing is kept, so the training stream does not depend on rewards.
        times = sample_train_times(c.time_distribution, max(B, 1), T, generator, grid=batch.sigmas)
        if B == 0:
            first = indices[:1]
            x = batch.x0[first]
            return [TrainingItem(index=first, x=x, sigma=times[0, :1].to(x.dtype), snapshots=self._needs,
                                 placeholder=True)]
        return forward_process_items(batch.x0[chosen], chosen, times, generator, micro_batch_size, self._needs,
                                     per_sample={"reward": batch.rewards[chosen]})

    def loss(self, item: TrainingItem, velocities: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        d = item.data
        v_theta = velocities["theta"]
        if item.placeholder:
            loss = 0.0 * v_theta.sum()
            return loss, {"loss": loss.detach()}
        fm_loss = mean_chw((v_theta - (d["eps"] - d["x0"])).square()).mean()
        loss = fm_loss
        metrics = {"fm_loss": fm_loss, "kept_reward": d["reward"].mean()}
        if self.config.kl_beta > 0:
            kl_loss = mean_chw((v_theta - velocities["ref"].detach()).square()).mean()
            loss = loss + self.config.kl_beta * kl_loss
            metrics["kl_loss"] = kl_loss
        metrics["loss"] = loss
        return loss, {name: value.detach() for name, value in metrics.items()}
