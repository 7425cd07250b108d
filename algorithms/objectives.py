"""Policy objectives: the "what is optimised" axis of the design space (METHODS.md section 4).

An objective is a pure function of per-pair likelihood estimates (any estimator of algorithms/estimators.py):

    fn(e_theta, e_old, advantages, *, use_ratio, clip_range) -> (scalar loss, metrics)

`e_theta` (N,) carries the gradient, `e_old` (N,) is the same estimator evaluated by the old snapshot on the same
input, `advantages` (N,) are already in the objective's scale. With `lr = sg(e_theta) - e_old` and the detached
importance weight `rho = exp(lr)` (1 when `use_ratio` is false):

    epg    -rho A e_theta                                    REINFORCE on the likelihood estimate
    pepg   -rho (A - lr) e_theta                             EPG with the log-ratio as a proximal penalty (the paper's best)
    par    0.5 rho (A - (e_theta - e_old))^2                 regression of the log-ratio onto the advantage
    grpo   mean max(-A' r, -A' clip(r, 1 - eps, 1 + eps)),  r = exp(e_theta - e_old),  A' = clip(A, +-adv_clip_max)
           (PPO/GRPO-clip; needs the ratio; the only objective that clips the advantages, as in the original)

Identities (tests/test_estimators_objectives.py): at old == theta, lr = 0 exactly, rho = 1, and pepg == epg; par and
pepg have equal gradients everywhere (d/de 0.5 rho (A - e + e_old)^2 = -rho (A - lr)); grpo's gradient at r = 1 is
epg's.

A new objective is one decorated function in a new module (see docs/new_objective.md):

    @objective("my_objective")
    def my_objective(e_theta, e_old, advantages, *, use_ratio, clip_range): ...

An objective registered with `clips_advantages=True` also receives `adv_clip_max=` and clips the advantages itself;
the others get them unclipped.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from diffrl_bench.algorithms.flow_grpo import grpo_loss
from diffrl_bench.registry import Registry

OBJECTIVES: Registry = Registry("policy objective")
ADVANTAGE_KINDS = ("centered", "standard", "coupled")

Metrics = Dict[str, torch.Tensor]


def objective(name: str, *, default_advantage: str = "centered_0.1", requires_ratio: bool = False,
              clips_advantages: bool = False) -> Callable:
    """Register a policy objective under `name`.

    Args:
        default_advantage: what `algo.advantage: auto` means for it: `centered_<scale>` (`scale (R - group mean)`,
            no std, no clip; the ELBO paper's choice for EPG/PEPG/PAR) or `standard` (the run's group advantages,
            std-normalised; what PPO-style objectives expect).
        requires_ratio: the objective is meaningless without the importance ratio; configs with
            `use_ratio: false` are then rejected at load time.
        clips_advantages: the objective clips the advantages itself and takes `adv_clip_max=` (grpo); the plugin
            passes the advantages unclipped to every objective, as the original does.
    """
    parse_advantage(default_advantage)

    def decorator(fn: Callable) -> Callable:
        fn.default_advantage = default_advantage
        fn.requires_ratio = requires_ratio
        fn.clips_advantages = clips_advantages
        return OBJECTIVES.register(name)(fn)

    return decorator


def parse_advantage(spec: str) -> Tuple[str, float]:
    """`centered_0.1` -> ("centered", 0.1); `standard` -> ("standard", 1.0); `standard_4` -> ("standard", 4.0);
    `coupled_0.001` -> ("coupled", 0.001), whose number is the original's ALPHA, not a scale (`advantage_scale`)."""
    if spec == "standard":
        return "standard", 1.0
    head, _, scale = spec.partition("_")
    if head in ADVANTAGE_KINDS and scale:
        try:
            value = float(scale)
        except ValueError:
            value = float("nan")
        if value > 0:
            return head, value
    raise ValueError(f"advantage {spec!r} is not `auto`, `standard[_<scale>]`, `centered_<scale>` (e.g. "
                     f"centered_0.1) or `coupled_<alpha>` (e.g. coupled_0.001)")


def advantage_scale(kind: str, value: float, kl_beta: float) -> float:
    """The factor on `R - group mean` (centered, coupled) or on the std-normalised advantage (standard).

    `coupled` is the original's `ADV=exact`: `A = BETA (R - mean) / ALPHA`, where BETA is also the KL weight
    [jaemoo-choi/rethinking-diffusion-rl@c2570002:src/utils/__init__.py:167-172], so scaling the KL rescales the
    advantage too. `centered_<s>` is the same advantage with the scale set on its own (ours, the default)."""
    if kind == "coupled":
        if not kl_beta > 0:
            raise ValueError("advantage coupled_<alpha> is kl_beta / alpha (R - group mean) and needs kl_beta > 0; "
                             "with kl_beta = 0 the original falls back to a fixed scale: use centered_<scale>")
        return kl_beta / value
    if kind not in ADVANTAGE_KINDS:
        raise ValueError(f"advantage kind {kind!r} is not one of {ADVANTAGE_KINDS}")
    return value


def importance_weight(e_theta: torch.Tensor, e_old: torch.Tensor, use_ratio: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(lr, rho)`, both detached: `lr = sg(e_theta) - e_old` and `rho = exp(lr)`, or 1 without the ratio.

    When old == theta the two estimates are computed by the same arithmetic on bit-identical velocities, so lr is
    exactly 0 and rho exactly 1."""
    lr = e_theta.detach() - e_old.detach()
    rho = torch.exp(lr) if use_ratio else torch.ones_like(lr)
    return lr, rho


def _ratio_metrics(lr: torch.Tensor, rho: torch.Tensor) -> Metrics:
    ratio = torch.exp(lr)
    return {"ratio": ratio, "ratio_mean": ratio.mean(), "ratio_min": ratio.min(), "ratio_max": ratio.max(),
            "rho_mean": rho.mean(), "approx_kl": 0.5 * lr.square().mean()}


@objective("epg")
def epg(e_theta, e_old, advantages, *, use_ratio=True, clip_range=1e-3):
    """`mean -rho A e_theta`."""
    lr, rho = importance_weight(e_theta, e_old, use_ratio)
    loss = (-rho * advantages * e_theta).mean()
    return loss, _ratio_metrics(lr, rho)


@objective("pepg")
def pepg(e_theta, e_old, advantages, *, use_ratio=True, clip_range=1e-3):
    """`mean -rho (A - lr) e_theta`: moving e_theta past e_old by more than A costs as much as it gains."""
    lr, rho = importance_weight(e_theta, e_old, use_ratio)
    loss = (-rho * (advantages - lr) * e_theta).mean()
    return loss, _ratio_metrics(lr, rho)


@objective("par")
def par(e_theta, e_old, advantages, *, use_ratio=True, clip_range=1e-3):
    """`mean 0.5 rho (A - (e_theta - e_old))^2`: the log-ratio regressed onto the advantage."""
    lr, rho = importance_weight(e_theta, e_old, use_ratio)
    loss = (0.5 * rho * (advantages - (e_theta - e_old.detach())).square()).mean()
    return loss, _ratio_metrics(lr, rho)


@objective("grpo", default_advantage="standard", requires_ratio=True, clips_advantages=True)
def grpo(e_theta, e_old, advantages, *, use_ratio=True, clip_range=1e-3, adv_clip_max=5.0):
    """PPO-clip on `r = exp(e_theta - e_old)` with `A' = clip(A, +-adv_clip_max)` (Flow-GRPO's `grpo_loss`; the
    original clips here and only here, +-5 and ratio clip 1e-3 [jaemoo-choi/rethinking-diffusion-rl@c2570002:
    src/utils/base.py:309-315]). Without the ratio there is nothing to clip and this is epg, hence `requires_ratio`."""
    if not use_ratio:
        raise ValueError("grpo needs the importance ratio (use objective epg for the ratio-free form)")
    lr = e_theta.detach() - e_old.detach()
    loss, metrics = grpo_loss(e_theta, e_old, advantages, clip_range=clip_range, adv_clip_max=adv_clip_max)
    metrics = {k: v for k, v in metrics.items() if k not in ("loss", "policy_loss")}
    return loss, {**_ratio_metrics(lr, torch.exp(lr)), **metrics}
