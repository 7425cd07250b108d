"""Training items of the trajectory-likelihood methods (Flow-GRPO, elbo_pg's `trajectory` estimator): stored
stochastic transitions `x -> x'` of the rollout sampler, with the behaviour log-prob of each.

The sampler records the transitions the algorithm asks for (`RolloutRequest.record_before`, computed by
`trained_transition_steps`); `transition_items` cuts them into items and attaches the step settings the sampler used
(`item.options`: the SDE's noise_level and sde_type, from `RolloutBatch.sampler_options`), so a loss recomputes each
step's likelihood with `sde_step_logprob(..., **item.options)` and never re-reads the run config.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from diffrl_bench.algorithm import OptionError, RolloutBatch, TrainingItem
from diffrl_bench.config import resolve_sampler_options
from diffrl_bench.registry import SAMPLERS
from diffrl_bench.sampling import time_dtype
from diffrl_bench.sde import SDEStep, sde_step_logprob, sde_step_options


def records_transitions(run: Any) -> bool:
    """Whether the run's rollout sampler can record stochastic transitions (`flow_grpo_sde`; ODE solvers cannot)."""
    return bool(getattr(SAMPLERS.get(run.rollout.sampler.name), "records_transitions", False))


def sampler_kind(run: Any) -> str:
    """What the run's rollout sampler is, for the refusal of a method that needs transition densities."""
    sampler = SAMPLERS.get(run.rollout.sampler.name)
    return getattr(sampler, "kind", "a deterministic ODE solver, whose steps have no density")


def clip_diagnostics(log_ratio: torch.Tensor, ratio: torch.Tensor, clip_range: float) -> Dict[str, torch.Tensor]:
    """PPO's logged diagnostics of a clipped ratio (no gradient): approx_kl (0.5 E[log_ratio^2]), the clipped
    fractions (both sides, above, below) and the ratio's mean/min/max."""
    with torch.no_grad():
        return {"approx_kl": 0.5 * torch.mean(log_ratio**2),
                "clipfrac": torch.mean((torch.abs(ratio - 1.0) > clip_range).float()),
                "clipfrac_gt_one": torch.mean((ratio - 1.0 > clip_range).float()),
                "clipfrac_lt_one": torch.mean((1.0 - ratio > clip_range).float()),
                "ratio_mean": ratio.mean(), "ratio_min": ratio.min(), "ratio_max": ratio.max()}


def require_transition_sampler(run: Any, algorithm: str) -> None:
    """Refuse a rollout sampler without per-step transition densities, for a method that trains on them."""
    if not records_transitions(run):
        raise ValueError(f"bad config key 'rollout.sampler.name': {algorithm} trains on the per-step likelihoods of a "
                         f"stochastic sampler, but {run.rollout.sampler.name!r} is {sampler_kind(run)}; "
                         f"use flow_grpo_sde")


def trained_transition_steps(run: Any, timestep_fraction: float) -> int:
    """How many sampler steps a trajectory method records: every step of a window or step set, or the first
    int(N * fraction)."""
    sampler = run.rollout.sampler
    options = resolve_sampler_options(sampler)
    if int(options.get("window_size", 0)) > 0 or options.get("sde_steps") is not None or options.get("sde_count"):
        return sampler.num_steps
    return int(sampler.num_steps * timestep_fraction)


def check_trained_transitions(timestep_fraction: float, run: Any) -> None:
    """Load-time check: at least one sampler step is trained (a fraction that rounds to 0 steps is a typo)."""
    if trained_transition_steps(run, timestep_fraction) < 1:
        raise OptionError("timestep_fraction", f"int({run.rollout.sampler.num_steps} x {timestep_fraction}) = 0 "
                                               f"sampler steps would be trained")


def informative_rows(indices: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """The rows of `indices` whose advantage is not exactly 0, in order.

    Flow-GRPO trains only those: a prompt group whose rewards are all equal has advantage 0 everywhere and would add
    nothing but its KL term [yifan123/flow_grpo@ac4c86e8:scripts/train_sd3.py:796-817]. (The original then turns
    back on as many dropped samples, at random, as make the kept count divisible by its number of training batches,
    so its batches have equal sizes; here each optimizer step trains its own share, which needs no padding.)"""
    return indices[advantages[indices] != 0]


def transition_items(batch: RolloutBatch, indices: torch.Tensor, micro_batch_size: int, snapshots: Sequence[str],
                     advantages: torch.Tensor, method: str,
                     snapshot_cfg: Optional[Dict[str, float]] = None,
                     drop_zero_advantage: bool = False) -> List[TrainingItem]:
    """One item per (micro-batch of samples, recorded step), samples outer and steps inner as in Flow-GRPO.

    With `drop_zero_advantage` the samples whose advantage is exactly 0 are not trained (`informative_rows`); when
    none is left, one placeholder item (the first sample's first transition, `placeholder=True`) is returned, so
    every process still runs the step's passes, and the loss must give it a zero gradient.

    With `train.shuffle: false` and `train.micro_batch_size == rollout.chunk_size` the items have exactly the
    rollout's batch layout, so the recomputed log-probs equal the behaviour ones bit for bit before the first
    optimizer step (ratio exactly 1). The model sees sigma in the dtype the sampler handed it.

    `data` holds `x_next`, `sigma_next`, `step` (grid indices), `sigma_first_next`, `old_log_prob`, `advantages`
    and, when the rollout recorded them (`RolloutRequest.record_means`), the behaviour step means `old_mean`.

    Args:
        advantages: (B,) over the whole batch, in the method's scale; `method` names the algorithm in errors.
    """
    tr = batch.transitions
    if tr is None:
        raise ValueError(f"{method} needs the rollout's transitions (rollout.sampler.name: flow_grpo_sde)")
    step_options = sde_step_options(batch.sampler_options)
    sigmas = batch.sigmas
    if drop_zero_advantage:
        kept = informative_rows(indices, advantages)
        if len(kept) == 0:
            first = indices[:1]
            x = tr.latents[0, first]
            return [TrainingItem(index=first, x=x, sigma=sigmas[tr.steps[0, first]].to(time_dtype(x)),
                                 snapshots=tuple(snapshots), cfg_scale=batch.cfg_scale,
                                 snapshot_cfg=dict(snapshot_cfg or {}), options=dict(step_options), placeholder=True)]
        indices = kept
    items = []
    for start in range(0, len(indices), micro_batch_size):
        rows = indices[start:start + micro_batch_size]
        for r in range(tr.num_steps):
            x = tr.before(r)[rows]
            step = tr.steps[r, rows]
            data = {"x_next": tr.after(r)[rows], "sigma_next": sigmas[step + 1], "step": step,
                    "sigma_first_next": sigmas[1].reshape(1), "old_log_prob": tr.log_probs[r, rows],
                    "advantages": advantages[rows]}
            if tr.means is not None:
                data["old_mean"] = tr.means[r, rows]
            items.append(TrainingItem(
                index=rows, x=x, sigma=sigmas[step].to(time_dtype(x)), snapshots=tuple(snapshots),
                cfg_scale=batch.cfg_scale, snapshot_cfg=dict(snapshot_cfg or {}), options=dict(step_options),
                data=data))
    return items


def transition_step(item: TrainingItem, velocity: torch.Tensor) -> SDEStep:
    """The SDE step of a transition item under `velocity` (theta's, or ref's for the KL), with the rollout's options."""
    d = item.data
    return sde_step_logprob(item.x, velocity, item.sigma, d["sigma_next"], d["sigma_first_next"][0],
                            prev_sample=d["x_next"], **item.options)


def placeholder_loss(velocities: Dict[str, torch.Tensor]) -> tuple:
    """Zero loss, still connected to theta, for the placeholder item of a step whose samples were all dropped."""
    loss = 0.0 * velocities["theta"].sum()
    return loss, {"loss": loss.detach()}
