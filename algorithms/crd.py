"""CRD: centered reward distillation (METHODS.md section 5; arXiv 2603.14128).

The KL-regularised optimum satisfies `beta log(p* / p_ref) = r - beta log Z(c)`. The partition term depends only on
the prompt c, so centring both sides over the images of one prompt removes it and leaves a plain regression: the
centred implicit reward of the policy, estimated from flow-matching errors against a lagging `old` snapshot, is fitted
to the centred external reward.

The pure function is `crd_loss`; its parity runner (algorithms/parity_runners.py) checks the port as written (batch
centring) against `outputs`, and within-prompt centring against `outputs_within_group` when a case has it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from diffrl_bench.advantages import group_mean
from diffrl_bench.algorithm import RolloutBatch, RolloutRequest, TrainingItem, require
from diffrl_bench.algorithms.checks import check_decays, check_time_distribution, check_training_times
from diffrl_bench.algorithms.weighting import adaptive_weight
from diffrl_bench.flow import forward_noise, mean_chw, per_sample
from diffrl_bench.registry import ALGORITHMS
from diffrl_bench.schedules import decay_schedule
from diffrl_bench.timesteps import sample_train_times

CRD_LOSS_TYPES = ("mse", "bce")
CRD_CENTERINGS = ("group", "batch")


def _clip_range(adv_clip_range: Union[float, Sequence[float]]) -> Tuple[float, float]:
    if isinstance(adv_clip_range, (int, float)):
        c = float(adv_clip_range)
        return -c, c
    lo, hi = (float(v) for v in adv_clip_range)
    return lo, hi


def crd_target(advantages: torch.Tensor, adv_clip_range: Union[float, Sequence[float]] = 5.0) -> torch.Tensor:
    """The [0, 1] reward target `r~ = clip(0.5 + clip(A, lo, hi) / (2 max(lo, hi)), 0, 1)` (0.5 + A / 10 for +-5).

    Written in the port's order of operations (`clip(A) / max / 2 + 0.5`) so it matches it bit for bit.
    """
    lo, hi = _clip_range(adv_clip_range)
    scaled = advantages.to(torch.float64).clamp(lo, hi) / max(lo, hi) / 2.0 + 0.5
    return scaled.clamp(0.0, 1.0)


def crd_implicit_reward(v_theta: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor,
                        adaptive: bool = True) -> torch.Tensor:
    """Per-sample implicit reward `r_theta = -mean_CHW (e(v_theta) - e(v_old))`, (B,).

    With `adaptive` (the port's `adaptive_logp`, default), each squared error is self-normalised in velocity space,
    `e(v) = (v - v*)^2 / sg(max(mean_CHW |v - v*|, 1e-5))` with the weight in float64; otherwise `e(v) = (v - v*)^2`.
    r_theta > 0 where the trained policy fits the sample better than the old snapshot does, and it is exactly 0
    when v_theta == v_old.
    """
    v_old = v_old.detach()
    err_theta, err_old = (v_theta - target).square(), (v_old - target).square()
    if adaptive:
        err_theta = err_theta / per_sample(adaptive_weight(v_theta, target), err_theta)
        err_old = err_old / per_sample(adaptive_weight(v_old, target), err_old)
    return mean_chw(-(err_theta - err_old))


def _centering_mean(values: torch.Tensor, group_ids: Optional[torch.Tensor], centering: str) -> torch.Tensor:
    """Per-sample mean of `values` over the sample's prompt group ("group") or the whole micro-batch ("batch"), (B,)."""
    if centering == "batch":
        return values.mean(dim=0, keepdim=True).expand_as(values)
    return group_mean(values, group_ids)


def crd_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    v_ref: Optional[torch.Tensor],
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: Optional[torch.Tensor],
    advantages: torch.Tensor,
    group_ids: Optional[torch.Tensor],
    *,
    crd_beta: float = 1.0,
    loss_type: str = "mse",
    kl_beta: float = 0.1,
    reward_adaptive_kl: bool = True,
    c_min: float = 1e-3,
    adv_clip_range: Union[float, Sequence[float]] = 5.0,
    centering: str = "group",
    adaptive: bool = True,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """CRD loss for one training time per sample (all velocities at the same `x_t`, same `eps`).

    With `v* = eps - x0`:
        r_theta = crd_implicit_reward(v_theta, v_old, v*)                   (B,)
        r~      = crd_target(A)                                             (B,) in [0, 1]
        dR      = r~ - mean r~,   dr = r_theta - sg(mean r_theta)          the means over the sample's prompt group
                                                                            ("group", the paper; default) or over the
                                                                            whole micro-batch ("batch", the port)
        mse:  L_pol = (c_hi / beta_crd) mean (beta_crd dr - dR)^2
        bce:  L_pol = (c_hi / beta_crd) mean BCE-with-logits(beta_crd dr, sigmoid(dR))
    (c_hi = the upper advantage clip, 5). The means run over the B samples; for equal-size groups this is the
    average over groups of each group's own loss, which is what running the port on one prompt at a time gives.
    KL to the (CFG-guided) base: `kl_div = mean_CHW (v_theta - v_ref)^2` per sample, weighted per sample by
    `c_min + r~ (1 - c_min)` when `reward_adaptive_kl` (bad samples are anchored less), so
    `kl_loss = kl_beta mean(weight kl_div)`. The port fixes the absolute floor `kl_beta c_min = 1e-4`, i.e.
    `c_min = 1e-4 / kl_beta` (1e-3 at the default kl_beta = 0.1); pass that to reproduce it at other kl_beta.
    Total `loss = L_pol + kl_loss`.

    Args:
        v_theta: (B, ...) trained velocities (the only input that should carry gradient).
        v_old: (B, ...) velocities of the `old` snapshot; v_ref: (B, ...) of the base (None when kl_beta == 0).
        x0, eps: (B, ...) clean samples and the noise of x_t. t: (B,) times, only reported (the loss does not use it).
        advantages: (B,) raw group advantages. group_ids: (B,) prompt labels (needed for "group" centring).
        adv_clip_range: c or (lo, hi) clip of the advantages before the [0, 1] map.
        adaptive: self-normalised errors in r_theta (the port's `adaptive_logp`).

    Returns:
        The scalar loss and detached metrics: per-sample `r_theta`, `adv_normalized` (= r~), `kl_div` (B,), and
        scalars `unweighted_policy_loss` (before the factor c_hi / beta_crd), `policy_loss`, `kl_loss`, `loss`.
    """
    if loss_type not in CRD_LOSS_TYPES:
        raise ValueError(f"unknown CRD loss_type {loss_type!r}; expected one of {CRD_LOSS_TYPES}")
    if centering not in CRD_CENTERINGS:
        raise ValueError(f"unknown CRD centering {centering!r}; expected one of {CRD_CENTERINGS}")
    if centering == "group" and group_ids is None:
        raise ValueError("centering='group' needs the group_ids")
    if kl_beta > 0 and v_ref is None:
        raise ValueError("kl_beta > 0 needs the reference velocities v_ref")
    _, hi = _clip_range(adv_clip_range)

    target = eps - x0
    r_theta = crd_implicit_reward(v_theta, v_old, target, adaptive=adaptive)
    r_tilde = crd_target(advantages, adv_clip_range).to(r_theta.dtype)
    d_reward = r_tilde - _centering_mean(r_tilde, group_ids, centering)
    d_implicit = r_theta - _centering_mean(r_theta.detach(), group_ids, centering)  # the mean is stop-gradient

    if loss_type == "bce":
        unweighted = F.binary_cross_entropy_with_logits(crd_beta * d_implicit, torch.sigmoid(d_reward),
                                                        reduction="mean")
    else:
        unweighted = (crd_beta * d_implicit - d_reward).square().mean()
    policy_loss = unweighted * hi / max(crd_beta, 1e-8)

    if v_ref is not None:
        kl_div = mean_chw((v_theta - v_ref.detach()).square())
        if reward_adaptive_kl:
            kl_loss = kl_beta * ((c_min + r_tilde * (1 - c_min)) * kl_div).mean()
        else:
            kl_loss = kl_beta * kl_div.mean()
    else:
        kl_div = torch.zeros_like(r_theta)
        kl_loss = torch.zeros((), dtype=policy_loss.dtype)
    loss = policy_loss + kl_loss

    metrics = {
        "r_theta": r_theta,
        "adv_normalized": r_tilde,
        "unweighted_policy_loss": unweighted,
        "policy_loss": policy_loss,
        "kl_div": kl_div,
        "kl_loss": kl_loss,
        "loss": loss,
    }
    if t is not None:
        metrics["t"] = t
    return loss, {name: value.detach() for name, value in metrics.items()}


# ---------------------------------------------------------------------------------------------------------------
# The plugin: what CRD asks of the harness.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CRDConfig:
    """Options of CRD (the `algo` section of a run config). Defaults are the paper's (METHODS.md section 5)."""

    crd_beta: float = 1.0
    """beta of the implicit reward `beta (r_theta - mean)`; the loss is scaled by 5 / beta"""
    loss_type: str = "mse"
    """mse (the paper's regression) or bce (BCE-with-logits against sigmoid of the centred target)"""
    centering: str = "group"
    """group: centre rewards and implicit rewards within each prompt group (the paper; removes log Z(c));
    batch: over the whole micro-batch (the public port)"""
    adaptive: bool = True
    """self-normalise each squared error in the implicit reward (the port's adaptive_logp)"""
    adv_clip_max: float = 5.0
    """advantages are clipped to +-this before the [0, 1] target map `0.5 + A / (2 c)`"""
    kl_beta: float = 0.1
    """weight of the KL anchor `mean (v_theta - v_ref)^2` to the (CFG-guided) base; 0 drops the ref snapshot"""
    reward_adaptive_kl: bool = True
    """weight each sample's KL by `c_min + r~ (1 - c_min)`, so poorly rewarded samples are anchored less"""
    c_min: float = 1e-3
    """floor of the reward-adaptive KL weight (the port fixes kl_beta * c_min = 1e-4)"""
    ref_cfg_scale: float = 4.5
    """guidance of the base inside the KL anchor (1.0: the unguided base); the policy is trained without CFG"""
    sampler_decay: Any = "crd_sampler"
    """decay of the `sampler` snapshot that draws rollouts: crd_sampler = exact copy of theta for 75 optimizer
    steps, then rising by 0.0075 a step to 0.999"""
    old_decay: Any = "crd_old"
    """decay of the `old` snapshot the implicit reward is measured against: crd_old = min(0.25 + 0.005 step, 0.999)"""
    time_distribution: str = "grid_subset"
    """training times: grid_subset (rollout grid points, as NFT; the paper does not pin this), stratified_index
    (the Flow-Factory port: one grid index per stratum of `time_index_range`, shared by the samples),
    stratified_grid, uniform, logit_normal"""
    num_train_times: int = 9
    """training times per sample, each with fresh noise"""
    time_index_range: Optional[List[int]] = None
    """[lo, hi] rollout-grid indices that stratified_index stratifies (index 0 is t = 1; hi is never drawn);
    None = every non-zero point. The port: [0, 8] on its 10-step grid (the indices whose times lie in its timestep
    range 0.99, t >= 0.01), where 20 strata have width <= 1 and fix the indices"""

    def validate(self) -> None:
        require(self.loss_type in CRD_LOSS_TYPES, "loss_type", f"{self.loss_type!r} is not one of {CRD_LOSS_TYPES}")
        require(self.centering in CRD_CENTERINGS, "centering", f"{self.centering!r} is not one of {CRD_CENTERINGS}")
        require(self.crd_beta > 0, "crd_beta", f"must be positive, got {self.crd_beta}")
        require(self.kl_beta >= 0, "kl_beta", f"must be non-negative, got {self.kl_beta}")
        require(0 <= self.c_min <= 1, "c_min", f"must be in [0, 1], got {self.c_min}")
        require(self.adv_clip_max > 0, "adv_clip_max", f"must be positive, got {self.adv_clip_max}")
        require(self.ref_cfg_scale > 0, "ref_cfg_scale", f"must be positive, got {self.ref_cfg_scale}")
        check_time_distribution(self)
        check_decays(self, "sampler_decay", "old_decay")


@ALGORITHMS.register("crd")
class CRD:
    """CRD (arXiv 2603.14128): centred reward distillation on the forward process, with separate sampler and old
    snapshots, a KL anchor to the CFG-guided base and a reward-adaptive KL weight."""

    Config = CRDConfig

    @staticmethod
    def check_run(config: CRDConfig, run: Any) -> None:
        check_training_times(config, run)

    def __init__(self, config: CRDConfig, run: Any = None):
        self.config = config
        self.rollout = RolloutRequest(snapshot="sampler", keep_x0=True)
        self.snapshots = {"sampler": decay_schedule(config.sampler_decay), "old": decay_schedule(config.old_decay)}
        if config.kl_beta > 0:
            self.snapshots["ref"] = None
        self._needs = ("theta", "old", "ref") if config.kl_beta > 0 else ("theta", "old")
        self._snapshot_cfg = {"ref": config.ref_cfg_scale} if config.kl_beta > 0 else {}

    def training_items(self, batch: RolloutBatch, indices, micro_batch_size: int, generator) -> List[TrainingItem]:
        """(time slot, sample) pairs with fresh noise each, packed into items of whole (slot, prompt group) blocks.

        Within-prompt centring runs over one block: the images of one prompt at one time slot, each block labelled
        apart in `group_ids`, so an item may hold several slots without mixing them. Items take whole blocks up to
        `micro_batch_size` pairs (at least one block), and times and noise are drawn for the whole optimizer step
        first, so with group centring the gradient does not depend on the micro-batch size. When optimizer steps
        split a prompt group, each step centres over its part of the group: log Z(c) still cancels, being constant
        over any images of the same prompt. Batch centring (the port) centres over each item, as the port does over
        its micro-batch.
        """
        c = self.config
        B, T = len(indices), c.num_train_times
        x0 = batch.x0[indices]
        # One draw per optimizer step, where the port draws per micro-batch: the same times for the port's recipe,
        # whose strata fix them, and a gradient that does not depend on the micro-batch size otherwise.
        options = {"index_range": c.time_index_range} if c.time_index_range is not None else {}
        times = sample_train_times(c.time_distribution, B, T, generator, grid=batch.sigmas, **options).to(x0)
        eps = torch.randn((T, *x0.shape), generator=generator).to(x0)
        groups = batch.group_ids[indices]
        labels, groups = torch.unique(groups, return_inverse=True)
        members = [(groups == g).nonzero().flatten() for g in range(len(labels))]
        blocks = [(k, cols) for k in range(T) for cols in members]
        advantages = batch.advantages[indices]
        items: List[TrainingItem] = []
        pending: List[Tuple[int, torch.Tensor]] = []
        for n, block in enumerate(blocks):
            pending.append(block)
            size = sum(len(cols) for _, cols in pending)
            following = len(blocks[n + 1][1]) if n + 1 < len(blocks) else 0
            if n + 1 < len(blocks) and size + following <= micro_batch_size:
                continue
            slot = torch.cat([torch.full((len(cols),), k) for k, cols in pending])
            cols = torch.cat([cols for _, cols in pending])
            pending = []
            t, noise, clean = times[slot, cols], eps[slot, cols], x0[cols]
            items.append(TrainingItem(
                index=indices[cols], x=forward_noise(clean, noise, t), sigma=t, snapshots=self._needs,
                snapshot_cfg=dict(self._snapshot_cfg),
                data={"x0": clean, "eps": noise, "t": t, "advantages": advantages[cols],
                      "group_ids": slot * len(labels) + groups[cols]}))
        return items

    def loss(self, item: TrainingItem, velocities: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        c, d = self.config, item.data
        return crd_loss(velocities["theta"], velocities["old"], velocities.get("ref"), d["x0"], d["eps"], d["t"],
                        d["advantages"], d["group_ids"], crd_beta=c.crd_beta, loss_type=c.loss_type,
                        kl_beta=c.kl_beta, reward_adaptive_kl=c.reward_adaptive_kl, c_min=c.c_min,
                        adv_clip_range=c.adv_clip_max, centering=c.centering, adaptive=c.adaptive)
