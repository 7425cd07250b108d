"""Flow-DPPO: PPO's ratio clip replaced by an exact Gaussian-KL trust region (arXiv 2606.11025).

Each SDE step of Flow-GRPO's sampler is a Gaussian with the same covariance under the old and the new policy, so
their KL is the squared distance of the two step means over twice the step variance: an exact, per-element measure
of how far the policy moved, where PPO's ratio is a one-sample estimate. Flow-DPPO keeps the plain `-A ratio`
surrogate and masks an element only when that KL is above a threshold *and* the ratio moved further in the
advantage's direction; corrective moves always pass.

The rollout trains only a few SDE steps (3 drawn among the first 5 of 10 per rollout, the other steps are Euler ODE
steps: the sampler's `sde_pool` / `sde_count` options, `diffrl_bench.sde.draw_sde_steps`), the old policy is the
behaviour one frozen for the rollout's optimizer steps (log-probs and step means stored at rollout:
`RolloutRequest.record_means`), and the advantages are UniRL's own normalisation (per-group mean, one
Bessel-corrected batch std, eps 1e-8).

Pure pieces: `dppo_sigma_t`, `gaussian_mean_kl`, `dppo_mask`, `dppo_loss`, `dppo_advantages`; then the plugin.
Source: Tencent-Hunyuan/UniRL@1a7b501e8fe8517b432a130220d2ff462f9b5afa:unirl/algorithms/flowdppo.py
(`_flowdppo_kl_adv_loss` 54-138, `compute_loss_and_backward` 268-332, `_compute_sigma_t` 342-368) and
unirl/types/rollout_resp.py:RolloutTrack.compute_advantages (220-333).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch

from diffrl_bench.advantages import group_mean_centered
from diffrl_bench.algorithm import RolloutBatch, RolloutRequest, TrainingItem, require
from diffrl_bench.algorithms.transition_items import (require_transition_sampler, transition_items,
                                                      transition_step)
from diffrl_bench.config import resolve_sampler_options
from diffrl_bench.registry import ALGORITHMS
from diffrl_bench.sde import STEP_SET_OPTIONS, stochastic_steps

ADVANTAGE_SCOPES = ("group", "global")


def dppo_sigma_t(sigmas: torch.Tensor, steps: torch.Tensor, eta: float, *,
                 add_kl_coefficient: bool = True) -> torch.Tensor:
    """The step noise scale Flow-DPPO normalises its KL by, (S,) float32.

        sigma_t = sqrt(s / (1 - min(s, 0.99))) eta sqrt(s - s_next),     s = sigmas[step], s_next = sigmas[step + 1]

    This is the SDE step's std (`std_dev_t sqrt(-dt)`) except at s = 1: the sampler uses `sigmas[1]` in place of s
    under the square root there, this normalisation uses 0.99, so at step 0 sigma_t is about twice the transition
    std (1.3977 against 0.699 with eta 0.7 on the 10-step shift-3 grid) and the KL about 4x smaller. Computed in
    float32 as the original. With `add_kl_coefficient` false it is 1 (the KL is then a plain mean squared distance).
    """
    steps = torch.as_tensor(steps, dtype=torch.long)
    if not add_kl_coefficient:
        return torch.ones(steps.shape, dtype=torch.float32)
    grid = sigmas.to(torch.float32)
    s, s_next = grid[steps], grid[steps + 1]
    std = torch.sqrt(s / (1.0 - torch.clamp(s, max=0.99))) * eta
    return std * torch.sqrt(s - s_next)


def gaussian_mean_kl(new_means: torch.Tensor, old_means: torch.Tensor, sigma_t: torch.Tensor,
                     event_dims: int = 3) -> torch.Tensor:
    """Per-element KL of two Gaussians with the same std `sigma_t`: `mean over the latent of (mu - mu_old)^2 / (2 sigma_t^2)`.

    Args:
        new_means, old_means: (*L, C, H, W) step means; the last `event_dims` dimensions are averaged.
        sigma_t: broadcastable to L (e.g. (S,) for L = (B, S), or a scalar).

    Returns:
        (*L,) the KL of each element (sample, step).
    """
    sq = (new_means - old_means).pow(2)
    per_elem = sq.reshape(*sq.shape[: sq.ndim - event_dims], -1).mean(dim=-1)
    return per_elem / (2 * sigma_t**2)


def dppo_mask(kl: torch.Tensor, ratio: torch.Tensor, advantages: torch.Tensor,
              kl_threshold: float) -> Dict[str, torch.Tensor]:
    """Flow-DPPO's asymmetric trust-region mask (all boolean, same shape as `kl`).

        kl_mask = kl < tau                         (strict: kl == tau counts as outside the region)
        pos_rm  = !kl_mask & ratio > 1 & A > 0     (moving further towards a good sample)
        neg_rm  = !kl_mask & ratio < 1 & A < 0     (moving further away from a bad sample)
        keep    = !(pos_rm | neg_rm)
    """
    with torch.no_grad():
        kl_mask = kl < kl_threshold
        pos_rm = ~kl_mask & (ratio > 1.0) & (advantages > 0)
        neg_rm = ~kl_mask & (ratio < 1.0) & (advantages < 0)
        keep = ~(pos_rm | neg_rm)
    return {"kl_mask": kl_mask, "pos_rm_mask": pos_rm, "neg_rm_mask": neg_rm, "keep_mask": keep}


def dppo_loss(
    new_logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    new_means: torch.Tensor,
    old_means: torch.Tensor,
    sigma_t: torch.Tensor,
    kl_threshold: float = 1e-5,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Flow-DPPO's loss for a micro-batch of recorded SDE steps.

        ratio = exp(log p_new - log p_old)                         (old = frozen anchor of the rollout)
        kl    = mean_CHW (mu_new - mu_old)^2 / (2 sigma_t^2)      (`gaussian_mean_kl`, no gradient use)
        keep  = `dppo_mask(kl, ratio, A, tau)`
        loss  = mean over all elements of (keep ? -A ratio : 0)

    No clip, no KL penalty: the means only decide the mask, so they get no gradient. The zero is selected (not
    multiplied), as the original does, so an overflowing ratio in a masked element cannot make a NaN.

    Args:
        new_logp, old_logp: (*L) per-element log-likelihoods, e.g. (B, S) for B samples x S steps or (B,) for one
            step; new carries gradient. advantages: (B,) raw (Flow-DPPO does not clip them), broadcast over steps.
        new_means, old_means: (*L, C, H, W) step means; sigma_t: broadcastable to L (`dppo_sigma_t`).
        kl_threshold: tau (1e-5 in the SD3.5 recipe).

    Returns:
        The scalar loss and detached metrics: per-element `ratio`, `kl_per_sample`, `loss_per_elem` and the four
        masks (0/1); scalars `policy_loss`, `loss`, `ratio_mean`, `ratio_std` (Bessel; 0 for one element),
        `ratio_min`, `ratio_max`, `approx_kl`, `kl_new_old_mean`, `kl_new_old_max`, `kl_mask_fraction` (fraction of
        elements *above* tau, the original's name), `pos_rm_fraction`, `neg_rm_fraction`, `masked_fraction`,
        `unmasked_fraction` (the fractions float32, as the original).
    """
    if new_logp.shape != old_logp.shape:
        raise ValueError(f"new_logp {tuple(new_logp.shape)} and old_logp {tuple(old_logp.shape)} differ in shape")
    lead = new_logp.shape
    if new_means.shape[: len(lead)] != lead or new_means.shape != old_means.shape:
        raise ValueError(f"means {tuple(new_means.shape)} / {tuple(old_means.shape)} must be {tuple(lead)} + latent")
    adv = advantages.detach().to(new_logp.dtype).reshape(advantages.shape[0], *([1] * (len(lead) - 1))).expand(lead)
    log_diff = new_logp - old_logp.detach()
    ratio = torch.exp(log_diff)
    with torch.no_grad():
        kl = gaussian_mean_kl(new_means.detach(), old_means.detach(), sigma_t,
                              event_dims=new_means.ndim - len(lead))
    masks = dppo_mask(kl, ratio.detach(), adv, kl_threshold)
    loss_per_elem = torch.where(masks["keep_mask"], -adv * ratio, torch.zeros((), dtype=ratio.dtype))
    loss = loss_per_elem.mean()
    r = ratio.detach()
    metrics: Dict[str, torch.Tensor] = {
        "ratio": r,
        "kl_per_sample": kl,
        "loss_per_elem": loss_per_elem,
        **{name: m.to(r.dtype) for name, m in masks.items()},
        "policy_loss": loss,
        "loss": loss,
        "ratio_mean": r.mean(),
        "ratio_std": r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype),
        "ratio_min": r.min(),
        "ratio_max": r.max(),
        "approx_kl": (0.5 * log_diff.detach() ** 2).mean(),
        "kl_new_old_mean": kl.mean(),
        "kl_new_old_max": kl.max(),
        "kl_mask_fraction": (~masks["kl_mask"]).float().mean(),
        "pos_rm_fraction": masks["pos_rm_mask"].float().mean(),
        "neg_rm_fraction": masks["neg_rm_mask"].float().mean(),
        "masked_fraction": (~masks["keep_mask"]).float().mean(),
        "unmasked_fraction": masks["keep_mask"].float().mean(),
    }
    return loss, {name: value.detach() for name, value in metrics.items()}


def dppo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, scope: str = "group",
                    use_global_std: bool = True, normalize: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """UniRL's group advantage (the Flow-DPPO recipe: scope "group", use_global_std, eps 1e-8). float64.

        group + use_global_std:  (R - mean_g R) / (std_unbiased(all R) + eps)           (the recipe)
        group:                   (R - mean_g R) / sqrt(var_pop(group) + eps)            (eps inside the sqrt)
        global:                  (R - mean R) / (std_unbiased(all R) + eps)
        normalize false:         the numerator only

    Differs from Flow-GRPO's (`group_advantages`): Bessel-corrected std and eps 1e-8 (not 1e-4). The original computes
    in float32 and requires contiguous equal-size groups; this takes any `group_ids` and computes in float64 (the
    parity tolerance is sized for an exact computation). Zero-variance groups get exactly 0.
    """
    if scope not in ADVANTAGE_SCOPES:
        raise ValueError(f"unknown advantage scope {scope!r}; expected one of {ADVANTAGE_SCOPES}")
    r = rewards.to(torch.float64)
    if scope == "global":
        centered = r - r.mean()
        return centered / (r.std() + eps) if normalize else centered
    centered = group_mean_centered(r, group_ids)
    if not normalize:
        return centered
    if use_global_std:
        return centered / (r.std() + eps)
    _, index = torch.unique(group_ids, return_inverse=True)
    sq_sums = torch.zeros(int(index.max()) + 1, dtype=r.dtype).index_add_(0, index, centered.square())
    counts = torch.bincount(index).to(r.dtype)
    return centered / ((sq_sums / counts)[index] + eps).sqrt()


# ---------------------------------------------------------------------------------------------------------------
# The plugin
# ---------------------------------------------------------------------------------------------------------------

ADVANTAGE_MODES = ("dppo", "run")


@dataclass
class FlowDPPOConfig:
    """Options of Flow-DPPO (the `algo` section). Defaults: the released SD3.5 PickScore recipe
    (Tencent-Hunyuan/UniRL@1a7b501e8fe8517b432a130220d2ff462f9b5afa:examples/diffusion/sd3_flowdppo.yaml).

    The SDE step set (3 of the first 5 steps per rollout) and noise level are options of the rollout sampler
    (`rollout.sampler.options: {sde_pool: [0, 5], sde_count: 3, noise_level: 0.7}`); training reuses them."""

    kl_threshold: float = 1e-5
    """tau: an element whose step-mean KL to the behaviour policy is >= tau is masked when it moves further in the
    advantage's direction (`kl_mask_threshold`, yaml:116)"""
    add_kl_coefficient: bool = True
    """normalise the KL by the step's noise scale sigma_t (`dppo_sigma_t`); false: a plain mean squared distance
    (yaml:117)"""
    advantage: str = "dppo"
    """"dppo": UniRL's normalisation over the whole step (group mean / (Bessel std of all rewards + 1e-8), no clip;
    yaml:23-27); "run": the harness's `advantage` section"""

    def validate(self) -> None:
        require(self.kl_threshold > 0, "kl_threshold", f"must be positive, got {self.kl_threshold}")
        require(self.advantage in ADVANTAGE_MODES, "advantage",
                f"{self.advantage!r} is not one of {ADVANTAGE_MODES}")


@ALGORITHMS.register("flow_dppo")
class FlowDPPO:
    """Flow-DPPO (arXiv 2606.11025; Tencent-Hunyuan/UniRL unirl/algorithms/flowdppo.py): a Gaussian-KL trust
    region in place of PPO's ratio clip, on a few SDE steps per rollout."""

    Config = FlowDPPOConfig

    @staticmethod
    def check_run(config: FlowDPPOConfig, run: Any) -> None:
        require_transition_sampler(run, "flow_dppo")
        options = resolve_sampler_options(run.rollout.sampler)
        sde_type = options.get("sde_type")
        try:  # the step set is drawn per rollout: try the first one now, so a bad pool fails at load time
            stochastic_steps(run.rollout.sampler.num_steps, rollout_id=0,
                             **{k: options[k] for k in STEP_SET_OPTIONS if k in options})
        except ValueError as error:
            raise ValueError(f"bad config key 'rollout.sampler.options': {error}") from None
        # The KL of two step Gaussians with one std is the mean distance over 2 sigma_t^2 only for the "sde" step.
        require(sde_type == "sde", "kl_threshold", f"the KL region needs rollout.sampler.options.sde_type 'sde', "
                                                   f"got {sde_type!r}")

    def __init__(self, config: FlowDPPOConfig, run: Any = None):
        self.config = config
        # Every SDE step of the rollout is trained (UniRL's `_resolve_target_steps` = all); with a step set those
        # are the 3 drawn ones. Log-probs and means stay the behaviour policy's for all optimizer steps.
        record_before = None if run is None else run.rollout.sampler.num_steps
        self.rollout = RolloutRequest(snapshot="theta", keep_x0=False, record_before=record_before,
                                      record_means=True)
        self.snapshots = {}

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        """(B,) float64: UniRL's advantages over the whole step (group means and the std across processes)."""
        if self.config.advantage == "run":
            return batch.advantages.to(torch.float64)
        rewards, group_ids = batch.whole_step()
        return dppo_advantages(rewards, group_ids, scope="group", use_global_std=True)[batch.local_slice()]

    def training_items(self, batch: RolloutBatch, indices, micro_batch_size: int, generator) -> List[TrainingItem]:
        items = transition_items(batch, indices, micro_batch_size, ("theta",), self.advantages(batch), "flow_dppo")
        eta = float(batch.sampler_options["noise_level"])
        for item in items:
            item.data["sigma_t"] = dppo_sigma_t(batch.sigmas, item.data["step"], eta,
                                                add_kl_coefficient=self.config.add_kl_coefficient)
        return items

    def loss(self, item: TrainingItem, velocities: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        d = item.data
        step = transition_step(item, velocities["theta"])
        return dppo_loss(step.log_prob, d["old_log_prob"].to(step.log_prob), d["advantages"].to(step.log_prob),
                         new_means=step.mean, old_means=d["old_mean"].to(step.mean),
                         sigma_t=d["sigma_t"].to(step.mean), kl_threshold=self.config.kl_threshold)
