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
from typing import Any, Dict, List, Tuple

import torch

from diffrl_bench.advantages import group_mean_centered
from diffrl_bench.algorithm import OptionError, RolloutBatch, RolloutRequest, TrainingItem, require
from diffrl_bench.algorithms.checks import check_decays, check_time_distribution, check_training_times
from diffrl_bench.algorithms.estimators import ESTIMATORS
from diffrl_bench.algorithms.forward_items import forward_process_items
from diffrl_bench.algorithms.objectives import OBJECTIVES, parse_advantage
from diffrl_bench.algorithms.transition_items import (check_trained_transitions, records_transitions,
                                                      trained_transition_steps, transition_items)
from diffrl_bench.flow import mean_chw
from diffrl_bench.registry import ALGORITHMS
from diffrl_bench.schedules import decay_schedule
from diffrl_bench.timesteps import sample_train_times


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
    `standard`: the run's group advantages (advantage.std), clipped to +-adv_clip_max (the paper's A for grpo);
    `auto`: the objective's own default (centered_0.1, or standard for grpo)"""
    adv_clip_max: float = 5.0
    """clip of the `standard` advantages"""
    kl_beta: float = 1e-4
    """weight of the velocity-space KL `mean (v_theta - v_ref)^2` to the frozen base (0 drops the ref snapshot)"""
    ref_cfg_scale: float = 1.0
    """guidance of the base inside the KL: 1.0 the unguided base (the paper), > 1 a CFG-guided anchor as CRD's"""
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
                parse_advantage(self.advantage)
            except ValueError as error:
                raise OptionError("advantage", str(error)) from None
        require(self.clip_range > 0, "clip_range", f"must be positive, got {self.clip_range}")
        require(self.adv_clip_max > 0, "adv_clip_max", f"must be positive, got {self.adv_clip_max}")
        require(self.kl_beta >= 0, "kl_beta", f"must be non-negative, got {self.kl_beta}")
        require(self.ref_cfg_scale > 0, "ref_cfg_scale", f"must be positive, got {self.ref_cfg_scale}")
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
                                               f"densities; {run.rollout.sampler.name} is a deterministic ODE solver, "
                                               f"whose steps have no density (use rollout.sampler.name=flow_grpo_sde, "
                                               f"or a forward estimator such as elbo_adaptive, which needs only the "
                                               f"final sample)")
            check_trained_transitions(config.timestep_fraction, run)
        else:
            check_training_times(config, run)

    def __init__(self, config: ELBOPGConfig, run: Any = None):
        self.config = config
        self.estimate = ESTIMATORS.get(config.estimator)
        self.objective = OBJECTIVES.get(config.objective)
        self.trajectory = self.estimate.kind == "trajectory"
        spec = self.objective.default_advantage if config.advantage == "auto" else config.advantage
        self.advantage_kind, self.advantage_scale = parse_advantage(spec)
        record_before = None
        if self.trajectory and run is not None:
            record_before = trained_transition_steps(run, config.timestep_fraction)
        # The sampler is the old snapshot; forward estimators need x0 only, the trajectory one its transitions only.
        self.rollout = RolloutRequest(snapshot="old", keep_x0=not self.trajectory, record_before=record_before)
        self.snapshots = {"old": decay_schedule(config.sampler_decay)}
        if config.kl_beta > 0:
            self.snapshots["ref"] = None
        needs = ("theta",) if self.trajectory else ("theta", "old")
        self._needs = needs + (("ref",) if config.kl_beta > 0 else ())
        self._snapshot_cfg = {"ref": config.ref_cfg_scale} if config.kl_beta > 0 and config.ref_cfg_scale != 1.0 else {}

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        """(B,) float64 advantages in the objective's scale; group means are over the whole step's groups."""
        if self.advantage_kind == "centered":
            # Group means over the whole step, so a prompt group split between processes keeps its one mean.
            rewards, group_ids = batch.whole_step()
            return group_mean_centered(rewards, group_ids, self.advantage_scale)[batch.local_slice()]
        c = self.config.adv_clip_max
        return batch.advantages.to(torch.float64).clamp(-c, c)

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
        return forward_process_items(x0, indices, times, generator, micro_batch_size, self._needs,
                                     per_sample={"advantages": self.advantages(batch)[indices]},
                                     snapshot_cfg=self._snapshot_cfg)

    def estimates(self, item: TrainingItem, velocities: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(e_theta with gradient, e_old), (N,) float64, on the item's shared inputs."""
        d = item.data
        if self.trajectory:
            e_theta = self.estimate(item.x, velocities["theta"], item.sigma, d["sigma_next"], d["sigma_first_next"][0],
                                    d["x_next"], **item.options)
            return e_theta, d["old_log_prob"].to(torch.float64)
        args = (item.x, d["x0"], d["eps"], d["t"])
        return self.estimate(velocities["theta"], *args), self.estimate(velocities["old"], *args).detach()

    def loss(self, item: TrainingItem, velocities: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        c = self.config
        e_theta, e_old = self.estimates(item, velocities)
        advantages = item.data["advantages"].to(e_theta)
        policy_loss, metrics = self.objective(e_theta, e_old, advantages, use_ratio=c.use_ratio,
                                              clip_range=c.clip_range)
        loss = policy_loss
        if c.kl_beta > 0:
            kl_loss = mean_chw((velocities["theta"] - velocities["ref"].detach()).square()).mean()
            loss = loss + c.kl_beta * kl_loss
            metrics["kl_loss"] = kl_loss
        metrics.update(policy_loss=policy_loss, loss=loss, estimate_theta=e_theta.mean(),
                       advantage_abs=advantages.abs().mean())
        return loss, {name: value.detach() for name, value in metrics.items()}
