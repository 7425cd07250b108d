"""`elbo_pg`: likelihood-based policy gradient with the estimator, the objective and the sampler as independent axes.

"Rethinking the design space of RL for diffusion models" (arXiv 2602.04663; METHODS.md section 4) separates (i) the
policy objective, (ii) the likelihood estimator and (iii) the rollout sampler. This plugin composes them:

    estimator  algorithms/estimators.py  (elbo_adaptive | elbo_t2 | elbo_uniform | elbo_exact | fm_* | trajectory)
    objective  algorithms/objectives.py  (epg | pepg | par | grpo, each with or without the importance ratio)
    sampler    rollout.sampler.name      (dpm2 | euler | flow_grpo_sde, ...)

The defaults are the paper's headline recipe: PEPG on the adaptive ELBO of the final sample, DPM-Solver++(2M)
rollouts by the `old` snapshot (soft-updated with `min(0.001 step, 0.5)`), `A = 0.1 (R - group mean)`, 9 grid times
per sample, velocity-space KL 1e-4 to the frozen base.

Forward estimators train on (sample, time) pairs exactly like DiffusionNFT: the harness evaluates theta, old and ref
on one `x_t` (same eps), so `e_theta - e_old` is exactly 0 while old == theta. The trajectory estimator trains on
the rollout's stored SDE transitions like Flow-GRPO and takes `e_old` from the behaviour log-probs the sampler
recorded (the sampler *is* the old snapshot, which does not move within an RL step), saving one forward per item.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from diffrl_bench.advantages import group_mean_centered
from diffrl_bench.algorithm import OptionError, RolloutBatch, RolloutRequest, TrainingItem, require
from diffrl_bench.algorithms.checks import (GRID_TIME_DISTRIBUTIONS, check_decays, check_time_distribution,
                                            check_training_times)
from diffrl_bench.algorithms.estimators import ESTIMATORS, guidance_divisor
from diffrl_bench.algorithms.forward_items import forward_process_items
from diffrl_bench.algorithms.objectives import OBJECTIVES, advantage_scale, parse_advantage
from diffrl_bench.algorithms.transition_items import (check_trained_transitions, records_transitions, sampler_kind,
                                                      trained_transition_steps, transition_items)
from diffrl_bench.flow import mean_chw
from diffrl_bench.registry import ALGORITHMS
from diffrl_bench.schedules import decay_schedule
from diffrl_bench.timesteps import sample_train_times

XT_SOURCES = ("forward_noise", "latents")


@dataclass
class ELBOPGConfig:
    """Options of `elbo_pg` (the `algo` section of a run config). Defaults are the ELBO paper's headline recipe."""

    estimator: str = "elbo_adaptive"
    """likelihood estimator: elbo_adaptive, elbo_t2, elbo_uniform, elbo_exact (ELBO from the final sample),
    fm_ghuber, fm_uniform, fm_t, fm_t2 (AWM's flow-matching surrogates) or trajectory (Flow-GRPO's SDE step
    log-prob; needs a stochastic sampler such as flow_grpo_sde)"""
    objective: str = "pepg"
    """policy objective: epg (REINFORCE), pepg (proximal EPG, the paper's best), par (advantage regression) or
    grpo (PPO-clip); any name registered with `@objective` (docs/new_objective.md)"""
    use_ratio: bool = True
    """weight by the importance ratio rho = exp(sg(E_theta) - E_old); false gives the paper's "noratio" variants
    (not allowed for grpo, whose clip acts on the ratio)"""
    clip_range: float = 1e-3
    """grpo's clip range eps on exp(E_theta - E_old)"""
    advantage: str = "auto"
    """`centered_<s>`: s (R - group mean), no std, no clip (the paper's A for epg/pepg/par, s = 0.1);
    `coupled_<alpha>`: (kl_beta / alpha) (R - group mean), the original's `ADV=exact`, whose scale moves with the KL
    weight (its GenEval scripts: kl_beta 1e-4, alpha 1e-3, so the same 0.1 as centered_0.1);
    `standard` or `standard_<s>`: s times the run's group advantages (advantage.std), not clipped here (the paper's
    A for grpo); `auto`: the objective's own default (centered_0.1, or standard for grpo)"""
    adv_clip_max: float = 5.0
    """clip of the advantages inside objectives that clip them (grpo: +-5, as the original hard-codes); the other
    objectives get them unclipped, as in the original"""
    kl_beta: float = 1e-4
    """weight of the velocity-space KL `mean (v_theta - v_ref)^2` to the frozen base (0 drops the ref snapshot)"""
    ref_cfg_scale: float = 1.0
    """guidance of the base inside the KL: 1.0 the unguided base (the paper), > 1 a CFG-guided anchor as CRD's
    (the original's train.ref_guidance_scale)"""
    theta_cfg_scale: float = 1.0
    """forward estimators: guidance theta is evaluated with in the loss (the original's train.guidance_scale); it is
    also the G that elbo_adaptive (1 / G) and elbo_uniform (1 / G^2) divide by, for theta and old alike"""
    old_cfg_scale: Optional[float] = None
    """forward estimators: guidance of the old snapshot in the loss; None: the rollout's rollout.sampler.cfg_scale,
    as in the original, where old is the sampler and is called with sample.guidance_scale"""
    xt_source: str = "forward_noise"
    """forward estimators: `forward_noise`, x_t = (1 - t) x0 + t eps with fresh eps; `latents`, the rollout's own
    latent at the (grid) training time, eps back-solved from it (the original's XT_FROM_LATENTS=1; needs
    time_distribution grid_subset or stratified_grid, and keeps the rollout trajectories)"""
    time_distribution: str = "grid_subset"
    """forward estimators' training times: grid_subset (9 of the 10 rollout grid points per sample, the original),
    stratified_grid, uniform, logit_normal"""
    num_train_times: int = 9
    """forward estimators: training times per sample (each with fresh noise)"""
    sampler_decay: Any = "nft"
    """decay of the `old` snapshot, which is also the sampler: a preset of schedules.DECAY_PRESETS (nft =
    min(0.001 step, 0.5), on_policy = 0, ...), a "start-value-slope-max" string or a dict"""
    timestep_fraction: float = 0.99
    """trajectory estimator: train on the first int(N * fraction) sampler steps (every window step with an SDE window)"""

    def validate(self) -> None:
        require(self.estimator in ESTIMATORS, "estimator",
                f"{self.estimator!r} is not one of {ESTIMATORS.names()}")
        require(self.objective in OBJECTIVES, "objective",
                f"{self.objective!r} is not one of {OBJECTIVES.names()}")
        if self.advantage != "auto":
            try:
                kind, value = parse_advantage(self.advantage)
                advantage_scale(kind, value, self.kl_beta)
            except ValueError as error:
                raise OptionError("advantage", str(error)) from None
        require(self.clip_range > 0, "clip_range", f"must be positive, got {self.clip_range}")
        require(self.adv_clip_max > 0, "adv_clip_max", f"must be positive, got {self.adv_clip_max}")
        require(self.kl_beta >= 0, "kl_beta", f"must be non-negative, got {self.kl_beta}")
        for key in ("ref_cfg_scale", "theta_cfg_scale", "old_cfg_scale"):
            value = getattr(self, key)
            require(value is None or value > 0, key, f"must be positive, got {value}")
        require(self.xt_source in XT_SOURCES, "xt_source", f"{self.xt_source!r} is not one of {XT_SOURCES}")
        require(0 < self.timestep_fraction <= 1, "timestep_fraction", f"must be in (0, 1], got {self.timestep_fraction}")
        check_time_distribution(self)
        check_decays(self, "sampler_decay")


@ALGORITHMS.register("elbo_pg")
class ELBOPolicyGradient:
    """ELBO-likelihood policy gradient (arXiv 2602.04663): estimator x objective x sampler, each selectable."""

    Config = ELBOPGConfig

    @staticmethod
    def check_run(config: ELBOPGConfig, run: Any) -> None:
        objective = OBJECTIVES.get(config.objective)
        if getattr(objective, "requires_ratio", False) and not config.use_ratio:
            raise OptionError("use_ratio", f"objective {config.objective!r} clips the importance ratio, so without it "
                                           f"nothing is left to clip and it is plain epg; use algo.objective=epg "
                                           f"algo.use_ratio=false for the ratio-free policy gradient")
        if ESTIMATORS.get(config.estimator).kind == "trajectory":
            if not records_transitions(run):
                raise OptionError("estimator", f"the trajectory estimator needs a stochastic sampler's transition "
                                               f"densities; {run.rollout.sampler.name} is {sampler_kind(run)}, "
                                               f"whose steps have no density (use rollout.sampler.name=flow_grpo_sde, "
                                               f"or a forward estimator such as elbo_adaptive, which needs only the "
                                               f"final sample)")
            check_trained_transitions(config.timestep_fraction, run)
            for key, default in (("theta_cfg_scale", 1.0), ("old_cfg_scale", None), ("xt_source", "forward_noise")):
                require(getattr(config, key) == default, key,
                        "it applies to forward estimators only; the trajectory estimator rescores the rollout's "
                        "transitions with its own guidance")
        else:
            check_training_times(config, run)
            if config.xt_source == "latents" and config.time_distribution not in GRID_TIME_DISTRIBUTIONS:
                raise OptionError("xt_source", f"latents are stored at the rollout grid's times only, so "
                                               f"time_distribution must be one of {GRID_TIME_DISTRIBUTIONS}, not "
                                               f"{config.time_distribution!r}")

    def __init__(self, config: ELBOPGConfig, run: Any = None):
        self.config = config
        self.estimate = ESTIMATORS.get(config.estimator)
        self.objective = OBJECTIVES.get(config.objective)
        self.trajectory = self.estimate.kind == "trajectory"
        spec = self.objective.default_advantage if config.advantage == "auto" else config.advantage
        self.advantage_kind, value = parse_advantage(spec)
        self.advantage_scale = advantage_scale(self.advantage_kind, value, config.kl_beta)
        self.from_latents = not self.trajectory and config.xt_source == "latents"
        record_before = None
        if self.trajectory and run is not None:
            record_before = trained_transition_steps(run, config.timestep_fraction)
        # The sampler is the old snapshot; forward estimators need x0 only, the trajectory one its transitions only.
        self.rollout = RolloutRequest(snapshot="old", keep_x0=not self.trajectory, record_before=record_before,
                                      keep_trajectory=self.from_latents)
        self.snapshots = {"old": decay_schedule(config.sampler_decay)}
        if config.kl_beta > 0:
            self.snapshots["ref"] = None
        needs = ("theta",) if self.trajectory else ("theta", "old")
        self._needs = needs + (("ref",) if config.kl_beta > 0 else ())
        # The trajectory estimator rescores the stored transitions with the rollout's guidance (transition_items);
        # forward estimators set each snapshot's guidance per batch (snapshot_guidance).
        self._snapshot_cfg = {"ref": config.ref_cfg_scale} if config.kl_beta > 0 and config.ref_cfg_scale != 1.0 else {}

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        """(B,) float64 advantages in the objective's scale, unclipped (objectives that clip do it themselves);
        group means are over the whole step's groups."""
        if self.advantage_kind in ("centered", "coupled"):
            # Group means over the whole step, so a prompt group split between processes keeps its one mean.
            rewards, group_ids = batch.whole_step()
            return group_mean_centered(rewards, group_ids, self.advantage_scale)[batch.local_slice()]
        return self.advantage_scale * batch.advantages.to(torch.float64)

    def snapshot_guidance(self, batch: RolloutBatch) -> Dict[str, float]:
        """Guidance of each snapshot in the loss, where it is not 1 (forward estimators)."""
        c = self.config
        scales = {"theta": c.theta_cfg_scale, "old": batch.cfg_scale if c.old_cfg_scale is None else c.old_cfg_scale}
        if c.kl_beta > 0:
            scales["ref"] = c.ref_cfg_scale
        return {name: float(g) for name, g in scales.items() if g != 1.0}

    def training_items(self, batch: RolloutBatch, indices, micro_batch_size: int, generator) -> List[TrainingItem]:
        if self.trajectory:
            return transition_items(batch, indices, micro_batch_size, self._needs, self.advantages(batch),
                                    "elbo_pg with the trajectory estimator", self._snapshot_cfg)
        return self._forward_items(batch, indices, micro_batch_size, generator)

    def _forward_items(self, batch, indices, micro_batch_size, generator) -> List[TrainingItem]:
        """(time, sample) pairs with fresh noise each, time-major, cut into micro-batches of pairs; times and noise
        are drawn for the whole optimizer step first, so the gradient does not depend on the micro-batch size."""
        c = self.config
        if batch.x0 is None:
            raise ValueError("elbo_pg with a forward estimator needs the rollout's final samples")
        x0 = batch.x0[indices]
        times = sample_train_times(c.time_distribution, len(indices), c.num_train_times, generator, grid=batch.sigmas)
        latents = stored_latents(batch, indices, times) if self.from_latents else None
        return forward_process_items(x0, indices, times, generator, micro_batch_size, self._needs,
                                     per_sample={"advantages": self.advantages(batch)[indices]},
                                     snapshot_cfg=self.snapshot_guidance(batch), latents=latents)

    def estimates(self, item: TrainingItem, velocities: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(e_theta with gradient, e_old), (N,) float64, on the item's shared inputs."""
        d = item.data
        if self.trajectory:
            e_theta = self.estimate(item.x, velocities["theta"], item.sigma, d["sigma_next"], d["sigma_first_next"][0],
                                    d["x_next"], **item.options)
            return e_theta, d["old_log_prob"].to(torch.float64)
        return forward_estimates(self.estimate, velocities["theta"], velocities["old"], item.x, d["x0"], d["eps"],
                                 d["t"], self.config.theta_cfg_scale)

    def loss(self, item: TrainingItem, velocities: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        c = self.config
        e_theta, e_old = self.estimates(item, velocities)
        advantages = item.data["advantages"].to(e_theta)
        v_ref = velocities.get("ref") if c.kl_beta > 0 else None
        loss, metrics = elbo_pg_loss(self.objective, e_theta, e_old, advantages, velocities["theta"], v_ref,
                                     use_ratio=c.use_ratio, clip_range=c.clip_range, adv_clip_max=c.adv_clip_max,
                                     kl_beta=c.kl_beta)
        metrics.update(estimate_theta=e_theta.mean(), advantage_abs=advantages.abs().mean())
        with torch.no_grad():
            metrics.update(original_loss_terms(
                e_theta, e_old, advantages, metrics["policy_loss"], loss, kl_beta=c.kl_beta,
                theta_cfg_scale=c.theta_cfg_scale, x0=None if self.trajectory else item.data["x0"],
                v_theta=velocities["theta"], v_old=velocities.get("old"), v_ref=v_ref))
        return loss, {name: value.detach() for name, value in metrics.items()}


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces (also run by the parity kinds elbo_estimate and elbo_pg_loss)


def stored_latents(batch: RolloutBatch, indices: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """(T, B, ...) the rollout latents of samples `indices` at the grid times `times` (T, B): `trajectory[k]` is the
    latent at `sigmas[k]`, the input of sampler step k, as the original's `latents[:, j]` at `timesteps[:, j]`."""
    if batch.trajectory is None:
        raise ValueError("elbo_pg with xt_source latents needs the rollout trajectories (keep_trajectory)")
    grid = batch.sigmas.to(times)
    match = times.unsqueeze(-1) == grid
    if not bool(match.any(-1).all()):
        raise ValueError("elbo_pg with xt_source latents: a training time is not a point of the rollout grid")
    step = match.to(torch.int64).argmax(-1)  # (T, B); grid points are distinct, so the match is unique
    return batch.trajectory[step.to(batch.trajectory.device), indices.to(batch.trajectory.device).unsqueeze(0)]


def forward_estimates(estimate: Callable, v_theta: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor,
                      x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                      theta_cfg_scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(E_theta with gradient, E_old detached), (B,) float64, both divided by `guidance_divisor(estimate, G)` with
    the *training* guidance G, as the original divides its old ELBO too."""
    divisor = guidance_divisor(estimate, theta_cfg_scale)
    e_theta = estimate(v_theta, x_t, x0, eps, t) / divisor
    e_old = estimate(v_old, x_t, x0, eps, t).detach() / divisor
    return e_theta, e_old


def elbo_pg_loss(objective: Callable, e_theta: torch.Tensor, e_old: torch.Tensor, advantages: torch.Tensor,
                 v_theta: torch.Tensor, v_ref: Optional[torch.Tensor], *, use_ratio: bool, clip_range: float,
                 adv_clip_max: float, kl_beta: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """`objective(E_theta, E_old, A) + kl_beta mean_B mean_CHW (v_theta - v_ref)^2` and the objective's metrics plus
    `policy_loss`, `loss` and (with kl_beta > 0) `kl_loss`. The advantages arrive unclipped; an objective registered
    with `clips_advantages` gets `adv_clip_max`."""
    options = {"adv_clip_max": adv_clip_max} if getattr(objective, "clips_advantages", False) else {}
    policy_loss, metrics = objective(e_theta, e_old, advantages, use_ratio=use_ratio, clip_range=clip_range,
                                     **options)
    loss = policy_loss
    if kl_beta > 0:
        if v_ref is None:
            raise ValueError("elbo_pg_loss: kl_beta > 0 needs the reference velocity")
        kl_loss = mean_chw((v_theta - v_ref.detach()).square()).mean()
        loss = loss + kl_beta * kl_loss
        metrics["kl_loss"] = kl_loss
    metrics.update(policy_loss=policy_loss, loss=loss)
    return loss, metrics


def original_loss_terms(e_theta: torch.Tensor, e_old: torch.Tensor, advantages: torch.Tensor,
                        policy_loss: torch.Tensor, loss: torch.Tensor, *, kl_beta: float, theta_cfg_scale: float,
                        x0: Optional[torch.Tensor] = None, v_theta: Optional[torch.Tensor] = None,
                        v_old: Optional[torch.Tensor] = None,
                        v_ref: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The diagnostics the original logs for one micro-batch, under its names [jaemoo-choi/rethinking-diffusion-rl@
    c2570002:src/utils/base.py:851-910], so runs can be read against its logs. Terms whose inputs are missing (no
    x0 with the trajectory estimator, no old velocity there, no ref without the KL) are left out.

    `policy_dir_cosine_adv` is the cosine between A and PEPG's effective weight `A - (E_theta - E_old)`: near 1 the
    update still follows the reward, near 0 or below the log-ratio penalty dominates it."""
    e_theta, e_old = e_theta.detach(), e_old.detach()
    adv = advantages.detach().to(e_theta)
    diff = e_theta - e_old
    weight = adv - diff
    correction = (diff * e_theta).mean()
    adv_elbo = adv * e_theta
    terms = {
        "policy_loss_abs": policy_loss.detach().abs(),
        "correction_term_mean": correction,
        "correction_term_abs_mean": correction.abs(),
        "policy_dir_cosine_adv": (adv * weight).sum() / (adv.norm() * weight.norm() + 1e-8),
        "eff_weight_abs_mean": weight.abs().mean(),
        "forward_elbo_mean": e_theta.mean(),
        "forward_elbo_std": e_theta.std(unbiased=False),
        "old_elbo_mean": e_old.mean(),
        "elbo_diff_std": diff.std(unbiased=False),
        "adv_elbo_mean": adv_elbo.mean(),
        "adv_elbo_abs_mean": adv_elbo.abs().mean(),
        "total_loss": loss.detach(),
    }
    if x0 is not None:
        terms.update(x0_norm=x0.square().mean(), x0_norm_max=x0.square().max())
    if v_theta is not None and v_old is not None:
        deviate = (v_theta.detach() - v_old.detach()).square()
        terms.update(old_deviate=deviate.mean(), old_deviate_max=deviate.max())
    if v_theta is not None and v_ref is not None:
        kl_div = mean_chw((v_theta.detach() - v_ref.detach()).square()).mean()
        # The KL between two CFG-guided velocities grows like G^2; the original reports it normalised too.
        cfg_norm = 1.0 / theta_cfg_scale ** 2 if theta_cfg_scale > 1.0 else 1.0
        terms.update(kl_div=kl_div, kl_div_loss=kl_div, kl_div_cfg_normalized=kl_div * cfg_norm,
                     kl_term_weighted_abs=(kl_beta * kl_div).abs())
        if v_old is not None:
            terms["old_kl_div"] = mean_chw((v_old.detach() - v_ref.detach()).square()).mean()
    return terms
