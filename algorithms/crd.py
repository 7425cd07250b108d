"""CRD: centered reward distillation (METHODS.md section 5; arXiv 2603.14128).

The KL-regularised optimum satisfies `beta log(p* / p_ref) = r - beta log Z(c)`. The partition term depends only on
the prompt c, so centring both sides over the images of one prompt removes it and leaves a plain regression: the
centred implicit reward of the policy, estimated from flow-matching errors against a lagging `old` snapshot, is fitted
to the centred external reward.

The pure function is `crd_loss`; the parity runner for kind `crd_loss` sits below it. The runner checks the port as
written (batch centring) against `outputs`, and within-prompt centring against `outputs_within_group` when a case has
it (see `_run_crd_loss`).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from diffrl_bench.advantages import _group_index, _group_mean
from diffrl_bench.algorithms.weighting import _broadcast_per_sample, mean_chw
from diffrl_bench.parity import WITHIN_GROUP_PREFIX, case_long, case_tensor, register_parity_kind, to_numpy

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
        with torch.no_grad():
            w_theta = mean_chw((v_theta.detach().double() - target.double()).abs()).clamp(min=1e-5)
            w_old = mean_chw((v_old.double() - target.double()).abs()).clamp(min=1e-5)
        err_theta = err_theta / _broadcast_per_sample(w_theta, err_theta)
        err_old = err_old / _broadcast_per_sample(w_old, err_old)
    return mean_chw(-(err_theta - err_old))


def _centering_mean(values: torch.Tensor, group_ids: Optional[torch.Tensor], centering: str) -> torch.Tensor:
    """Per-sample mean of `values` over the sample's prompt group ("group") or the whole micro-batch ("batch"), (B,)."""
    if centering == "batch":
        return values.mean(dim=0, keepdim=True).expand_as(values)
    index, num_groups = _group_index(group_ids.to(values.device))
    return _group_mean(values, index, num_groups)


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


def _crd_case_outputs(case: dict, centering: str) -> Dict[str, torch.Tensor]:
    """Run `crd_loss` on a parity case with the port's hyperparameters; metrics plus `grad_v_theta`."""
    params = case["params"]
    if float(params.get("weight_temp", -1.0)) >= 0:
        raise ValueError("only weight_temp < 0 (uniform centring) is implemented; "
                         f"got weight_temp={params['weight_temp']}")
    kl_beta = float(params.get("kl_beta", 0.1))
    t = case_tensor(case, "timesteps").div(1000).clamp(0, 1)  # the port's flow_match_sigma
    v_theta = case_tensor(case, "v_theta").clone().requires_grad_(True)
    loss, metrics = crd_loss(
        v_theta, case_tensor(case, "v_old"), case_tensor(case, "v_ref"), case_tensor(case, "x0"),
        case_tensor(case, "eps"), t, case_tensor(case, "advantages"), case_long(case, "group_ids"),
        crd_beta=float(params.get("crd_beta", 1.0)), loss_type=params.get("crd_loss_type", "mse"),
        kl_beta=kl_beta, reward_adaptive_kl=bool(params.get("reward_adaptive_kl", True)),
        c_min=1e-4 / max(kl_beta, 1e-8),  # the port's floor: base_beta 1e-4 over kl_beta
        adv_clip_range=params.get("adv_clip_range", (-5.0, 5.0)), centering=centering,
        adaptive=bool(params.get("adaptive_logp", True)),
    )
    (grad,) = torch.autograd.grad(loss, v_theta)
    return {**metrics, "grad_v_theta": grad}


@register_parity_kind("crd_loss")
def _run_crd_loss(case: dict) -> Dict[str, np.ndarray]:
    """`outputs` with batch centring (the port as written); `outputs_within_group` with within-prompt centring,
    returned under `within_group/<name>`, which is where `check_case` looks for them."""
    ours = _crd_case_outputs(case, "batch")
    if case.get("outputs_within_group"):
        grouped = _crd_case_outputs(case, "group")
        ours.update({WITHIN_GROUP_PREFIX + name: value for name, value in grouped.items()
                     if name in case["outputs_within_group"]})
    return to_numpy(ours)
