"""Every built-in parity runner, in one place: one function per case kind (format: tests/data/parity/README.md).

A runner rebuilds a case's inputs as float64 tensors, calls our implementation and returns its outputs by name;
`diffrl_bench.parity` compares them with the original's. The machinery lives in the harness (diffrl_bench/parity.py),
the runners here, in the plugin layer, because they call the plugins' pure losses: the harness never imports a plugin
(it imports this package through `discover_parity_kinds`, as the registry does). A new kind is one decorated
function in this file (or, third party, in a module under the `diffrl_bench.parity` entry-point group):

    @register_parity_kind("my_loss")
    def _run_my_loss(case: dict) -> Dict[str, np.ndarray]:
        v_theta = case_leaf(case, "v_theta")
        loss, metrics = my_loss(v_theta, case_tensor(case, "advantages"), beta=float(case["params"]["beta"]))
        return to_numpy({**metrics, "grad_v_theta": grad_of(loss, v_theta)})
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from diffrl_bench.advantages import group_advantages, group_mean_centered
from diffrl_bench.algorithms.awm import awm_loss
from diffrl_bench.algorithms.crd import crd_loss
from diffrl_bench.algorithms.dgpo import dgpo_loss
from diffrl_bench.algorithms.estimators import ESTIMATORS, guidance_divisor
from diffrl_bench.algorithms.flow_dppo import dppo_advantages, dppo_loss, dppo_sigma_t
from diffrl_bench.algorithms.flow_grpo import grpo_loss
from diffrl_bench.algorithms.forward_items import noise_from_latent
from diffrl_bench.algorithms.grpo_guard import grpo_guard_loss
from diffrl_bench.algorithms.nft import nft_loss
from diffrl_bench.algorithms.objectives import OBJECTIVES, advantage_scale
from diffrl_bench.algorithms.policy_gradient import elbo_pg_loss, forward_estimates, original_loss_terms
from diffrl_bench.flow import forward_noise, mean_chw
from diffrl_bench.timesteps import quantize_times
from diffrl_bench.parity import (WITHIN_GROUP_PREFIX, case_leaf, case_long, case_tensor, grad_of,
                                 register_parity_kind, to_numpy)
from diffrl_bench.sampling import StateRecorder, dpm2_sample
from diffrl_bench.schedules import DECAY_PRESETS, DecaySchedule
from diffrl_bench.sde import sde_step_logprob

# ---------------------------------------------------------------------------------------------------------------
# Harness pieces: advantages, decay schedules, samplers


@register_parity_kind("advantages")
def _run_advantages(case: dict) -> Dict[str, np.ndarray]:
    std = "global" if case["params"]["global_std"] else "group"
    adv = group_advantages(case_tensor(case, "rewards"), case_long(case, "group_ids"), std=std)
    return to_numpy({"advantages": adv})


def _decay_from_params(params: dict):
    """The DecaySchedule equivalent to the original function named in `params["function"]`."""
    function = params.get("function", "")
    if function == "DiffusionNFT return_decay":
        by_type = {0: "on_policy", 1: "nft", 2: "nft_ocr"}
        if params["decay_type"] not in by_type:
            raise ValueError(f"unknown DiffusionNFT decay_type {params['decay_type']!r}")
        return DECAY_PRESETS[by_type[params["decay_type"]]]
    if function == "Flow-Factory CRD compute_decay":
        return DecaySchedule.from_spec(params["decay_spec"])
    if function == "AWM kl_ema_decay_type='linear'":
        return DecaySchedule(start_step=0, start_value=0.0, slope=0.001, max_value=float(params["kl_ema_decay"]))
    raise ValueError(f"unknown decay_schedule function {function!r}")


@register_parity_kind("decay_schedule")
def _run_decay_schedule(case: dict) -> Dict[str, np.ndarray]:
    schedule = _decay_from_params(case["params"])
    steps = [int(s) for s in case["inputs"]["steps"]]
    return {"decay": np.array([schedule(s) for s in steps], dtype=np.float64)}


@register_parity_kind("dpm2_sampler")
def _run_dpm2_sampler(case: dict) -> Dict[str, np.ndarray]:
    params = case["params"]
    a, b = float(params["a"]), float(params["b"])
    taus: List[torch.Tensor] = []

    def velocity(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        taus.append(tau[0])
        return a * x + b * tau.reshape(-1, *([1] * (x.ndim - 1)))

    recorder = StateRecorder(velocity)
    rollout = dpm2_sample(recorder, case_tensor(case, "z_init"), case_tensor(case, "sigmas"),
                          model_time=params["model_time"])  # the named modes a config sets
    return to_numpy({"final": rollout.x0, "all_latents": recorder.trajectory(rollout.x0),
                     "model_time_per_step": torch.stack(taus)})


@register_parity_kind("sde_step_logprob")
def _run_sde_step_logprob(case: dict) -> Dict[str, np.ndarray]:
    params = case["params"]
    sigmas = case_tensor(case, "sigmas")
    step_index = case_long(case, "step_index")
    # The original looks the index up from the timestep; the case gives both, so insist they agree.
    if "timestep" in case["inputs"] and "scheduler_timesteps" in case["inputs"]:
        table = case_tensor(case, "scheduler_timesteps")
        if not torch.equal(table[step_index], case_tensor(case, "timestep")):
            raise ValueError("timestep does not match scheduler_timesteps[step_index]")
    step = sde_step_logprob(
        case_tensor(case, "sample"), case_tensor(case, "model_output"),
        sigmas[step_index], sigmas[step_index + 1], sigmas[1],
        noise_level=float(params["noise_level"]), sde_type=params["sde_type"],
        prev_sample=case_tensor(case, "prev_sample"),
    )
    return to_numpy({"prev_sample_mean": step.mean, "std_dev_t": step.std, "sqrt_neg_dt": step.sqrt_neg_dt,
                     "log_prob": step.log_prob})


# ---------------------------------------------------------------------------------------------------------------
# Objective plugins' pure losses


@register_parity_kind("nft_loss")
def _run_nft_loss(case: dict) -> Dict[str, np.ndarray]:
    params = case["params"]
    if params.get("adv_mode", "all") != "all":
        raise ValueError(f"adv_mode {params['adv_mode']!r} is not supported")
    x0, t = case_tensor(case, "x0"), case_tensor(case, "t")
    x_t = forward_noise(x0, case_tensor(case, "eps"), t)
    v_theta = case_leaf(case, "v_theta")
    loss, metrics = nft_loss(
        v_theta, case_tensor(case, "v_old"), case_tensor(case, "v_ref"), x0, x_t, t, case_tensor(case, "advantages"),
        nft_beta=float(params["nft_beta"]), kl_beta=float(params["kl_beta"]),
        adv_clip_max=float(params["adv_clip_max"]),
    )
    grad = grad_of(loss, v_theta)
    # The original logs the total loss under the name policy_loss (an in-place `+=` on the same tensor).
    return to_numpy({**metrics, "x_t": x_t, "grad_v_theta": grad, "logged_policy_loss": metrics["loss"]})


@register_parity_kind("grpo_loss")
def _run_grpo_loss(case: dict) -> Dict[str, np.ndarray]:
    params = case["params"]
    log_prob = case_leaf(case, "log_prob")
    loss, metrics = grpo_loss(
        log_prob, case_tensor(case, "old_log_prob"), case_tensor(case, "advantages"),
        clip_range=float(params["clip_range"]), adv_clip_max=float(params["adv_clip_max"]),
        beta=float(params["beta"]), mean=case_tensor(case, "prev_sample_mean"),
        ref_mean=case_tensor(case, "prev_sample_mean_ref"), std=case_tensor(case, "std_dev_t"),
    )
    grad = grad_of(loss, log_prob)
    return to_numpy({**metrics, "grad_log_prob": grad})


@register_parity_kind("awm_loss")
def _run_awm_loss(case: dict) -> Dict[str, np.ndarray]:
    params = case["params"]
    v_theta = case_leaf(case, "v_theta")
    loss, metrics = awm_loss(
        v_theta, case_tensor(case, "v_ref"), case_tensor(case, "v_ema"), case_tensor(case, "x0"),
        case_tensor(case, "eps"), case_tensor(case, "t"), case_tensor(case, "advantages"),
        weighting=params.get("weighting", "ghuber"), ghuber_power=float(params.get("ghuber_power", 0.25)),
        beta=float(params["beta"]), ema_beta=float(params.get("ema_beta", 1.0)),
        adv_clip_max=float(params.get("adv_clip_max", 5.0)),
        advantage_max=None if params.get("advantage_max", 1.0) is None else float(params.get("advantage_max", 1.0)),
        clip_range=float(params.get("clip_range", 1.0)), loss_type=params.get("loss_type", "exp_first"),
        kl_weight=params.get("kl_weight", "Uniform"), kl_ema_weight=params.get("kl_ema_weight", "Uniform"),
    )
    grad = grad_of(loss, v_theta)
    return to_numpy({**metrics, "grad_v_theta": grad})


def _crd_case_outputs(case: dict, centering: str) -> Dict[str, torch.Tensor]:
    """Run `crd_loss` on a parity case with the port's hyperparameters; metrics plus `grad_v_theta`."""
    params = case["params"]
    if float(params.get("weight_temp", -1.0)) >= 0:
        raise ValueError("only weight_temp < 0 (uniform centring) is implemented; "
                         f"got weight_temp={params['weight_temp']}")
    kl_beta = float(params.get("kl_beta", 0.1))
    t = case_tensor(case, "timesteps").div(1000).clamp(0, 1)  # the port's flow_match_sigma
    v_theta = case_leaf(case, "v_theta")
    loss, metrics = crd_loss(
        v_theta, case_tensor(case, "v_old"), case_tensor(case, "v_ref"), case_tensor(case, "x0"),
        case_tensor(case, "eps"), t, case_tensor(case, "advantages"), case_long(case, "group_ids"),
        crd_beta=float(params.get("crd_beta", 1.0)), loss_type=params.get("crd_loss_type", "mse"),
        kl_beta=kl_beta, reward_adaptive_kl=bool(params.get("reward_adaptive_kl", True)),
        c_min=1e-4 / max(kl_beta, 1e-8),  # the port's floor: base_beta 1e-4 over kl_beta
        adv_clip_range=params.get("adv_clip_range", (-5.0, 5.0)), centering=centering,
        adaptive=bool(params.get("adaptive_logp", True)),
    )
    grad = grad_of(loss, v_theta)
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


# ---------------------------------------------------------------------------------------------------------------
# ELBO-PG: the estimators with their guidance divisor, and the whole loss (sections 9-10 of the parity README).
# Only the CFG combination `u + G (c - u)` of a stored (uncond, text) pair is written here: in a run the backend
# does it before the loss sees the velocity.

ELBO_WEIGHTINGS = {"adaptive": "elbo_adaptive", "t": "elbo_t2", "uniform": "elbo_uniform", "exact": "elbo_exact"}
"""The original's `config.train.elbo` -> our estimator name."""


def _elbo_estimator(weighting: str):
    if weighting not in ELBO_WEIGHTINGS:
        raise ValueError(f"unknown ELBO weighting {weighting!r}; expected one of {sorted(ELBO_WEIGHTINGS)}")
    return ESTIMATORS.get(ELBO_WEIGHTINGS[weighting])


def _elbo_xt_and_noise(case: dict, from_latents: bool):
    x0, t = case_tensor(case, "x0"), case_tensor(case, "t")
    if from_latents:
        x_t = case_tensor(case, "latents")
        return x0, t, x_t, noise_from_latent(x_t, x0, t)
    eps = case_tensor(case, "eps")
    return x0, t, forward_noise(x0, eps, t), eps


@register_parity_kind("elbo_estimate")
def _run_elbo_estimate(case: dict) -> Dict[str, np.ndarray]:
    params = case["params"]
    if params["xt_source"] not in ("forward_noise", "latents"):
        raise ValueError(f"unknown xt_source {params['xt_source']!r}")
    estimate = _elbo_estimator(params["weighting"])
    x0, t, x_t, noise = _elbo_xt_and_noise(case, params["xt_source"] == "latents")
    v = case_leaf(case, "v")
    elbo = estimate(v, x_t, x0, noise, t) / guidance_divisor(estimate, float(params["guidance_scale"]))
    return to_numpy({"x_t": x_t, "noise": noise, "elbo": elbo, "grad_v": grad_of(elbo.sum(), v)})


def _elbo_velocity(case: dict, name: str, guidance_scale: float) -> torch.Tensor:
    """The stored velocity, or the CFG combination of its stored halves when the adapter ran with guidance."""
    if f"{name}_uncond" in case["inputs"]:
        uncond, text = case_tensor(case, f"{name}_uncond"), case_tensor(case, f"{name}_text")
        return uncond + guidance_scale * (text - uncond)
    return case_tensor(case, name)


def _elbo_advantages(case: dict) -> torch.Tensor:
    """The original tracker's advantages for `adv` exact (coupled, or a fixed scale when beta = 0) or standard."""
    p = case["params"]
    rewards, group_ids = case_tensor(case, "rewards"), case_long(case, "group_ids")
    if p["adv"] == "exact":
        beta = float(p["beta"])
        if beta != 0:
            return group_mean_centered(rewards, group_ids, advantage_scale("coupled", float(p["alpha"]), beta))
        return group_mean_centered(rewards, group_ids, advantage_scale("centered", float(p["scale"]), beta))
    if p["adv"] == "standard":
        std = "global" if p["global_std"] else "group"
        return advantage_scale("standard", float(p["scale"]), 0.0) * group_advantages(rewards, group_ids, std=std)
    raise ValueError(f"unknown adv {p['adv']!r}")


@register_parity_kind("elbo_pg_loss")
def _run_elbo_pg_loss(case: dict) -> Dict[str, np.ndarray]:
    p = case["params"]
    if p.get("kl_method", "girsanov") != "girsanov":
        raise ValueError(f"kl_method {p['kl_method']!r} is not supported (only girsanov)")
    g_train, g_sample, g_ref = (float(p[k]) for k in ("train_guidance_scale", "sample_guidance_scale",
                                                      "ref_guidance_scale"))
    estimate, objective = _elbo_estimator(p["elbo"]), OBJECTIVES.get(p["objective"])
    advantages = _elbo_advantages(case)
    x0, t, x_t, noise = _elbo_xt_and_noise(case, bool(p["xt_from_latents"]))
    v_theta = _elbo_velocity(case, "v_theta", g_train).requires_grad_(True)
    v_old, v_ref = _elbo_velocity(case, "v_old", g_sample), _elbo_velocity(case, "v_ref", g_ref)
    e_theta, e_old = forward_estimates(estimate, v_theta, v_old, x_t, x0, noise, t, g_train)
    beta = float(p["beta"])
    loss, metrics = elbo_pg_loss(objective, e_theta, e_old, advantages, v_theta, v_ref,
                                 use_ratio=bool(p["use_ratio"]), clip_range=float(p["grpo_clip_range"]),
                                 adv_clip_max=float(p["grpo_adv_clip"]), kl_beta=beta)
    grad_v, grad_e = torch.autograd.grad(loss, (v_theta, e_theta))
    kl_per_sample = mean_chw((v_theta - v_ref).square())
    terms = original_loss_terms(e_theta, e_old, advantages, metrics["policy_loss"], loss, kl_beta=beta,
                                theta_cfg_scale=g_train, x0=x0, v_theta=v_theta, v_old=v_old, v_ref=v_ref)
    out = {"advantages": advantages, "x_t": x_t, "noise": noise, "forward_elbo": e_theta, "old_elbo": e_old,
           "kl_div_per_sample": kl_per_sample, "kl_div_loss": kl_per_sample.mean(),
           "policy_loss": metrics["policy_loss"], "loss": loss, "grad_v_theta": grad_v, "grad_forward_elbo": grad_e,
           **terms}
    for name, velocity, g in (("v_theta", v_theta, g_train), ("v_old", v_old, g_sample), ("v_ref", v_ref, g_ref)):
        if f"{name}_uncond" in case["inputs"]:
            out[name] = velocity
    return to_numpy(out)


@register_parity_kind("dgpo_loss")
def _run_dgpo_loss(case: dict) -> Dict[str, np.ndarray]:
    """The original trains at `t = timesteps / 1000` in float32; the case gives that t, so the runner insists they
    agree (through `quantize_times`, the harness's integer-time option), and builds the CFG-guided reference itself
    when `kl_cfg > 1` (the plugin gets it from the harness with `snapshot_cfg {"ref": kl_cfg}`)."""
    params = case["params"]
    x0, noise = case_tensor(case, "x0"), case_tensor(case, "noise")
    t = case_tensor(case, "t")
    timesteps = case_long(case, "timesteps")
    if not torch.equal(t, (timesteps / 1000).to(torch.float64)):
        raise ValueError("input t does not equal float32(timesteps / 1000)")
    if not torch.equal(quantize_times(t.to(torch.float32), "floor1000").double(), t):
        raise ValueError("quantize_times(t, 'floor1000') does not reproduce the case's integer-timestep t")
    x_t = forward_noise(x0, noise, t)
    target = noise - x0
    kl_cfg = float(params["kl_cfg"])
    if kl_cfg > 1:
        uncond, text = case_tensor(case, "v_ref_uncond"), case_tensor(case, "v_ref_text")
        v_ref = uncond + kl_cfg * (text - uncond)
    else:
        v_ref = case_tensor(case, "v_ref")
    v_old = case_tensor(case, "v_old") if "v_old" in case["inputs"] else None
    v_theta = case_leaf(case, "v_theta")
    loss, metrics = dgpo_loss(
        v_theta, target, case_tensor(case, "advantages"), case_long(case, "group_ids"), v_ref=v_ref, v_old=v_old,
        beta_dpo=float(params["beta_dpo"]), group_size=int(params["group_size"]),
        clip_range=float(params["clip_range"]), clip_dsm=bool(params["clip_dsm"]), clip_kl=bool(params["clip_kl"]),
        beta=float(params["beta"]), use_ema_ref=bool(params["use_ema_ref"]),
        adv_clip_max=float(params["adv_clip_max"]),
    )
    out = {**metrics, "t": t, "x_t": x_t, "target_v": target, "grad_v_theta": grad_of(loss, v_theta)}
    if kl_cfg > 1:
        out["v_ref_guided"] = v_ref
    return to_numpy(out)


@register_parity_kind("grpo_guard_loss")
def _run_grpo_guard_loss(case: dict) -> Dict[str, np.ndarray]:
    params = case["params"]
    log_prob, mean = case_leaf(case, "log_prob"), case_leaf(case, "prev_sample_mean")
    loss, metrics = grpo_guard_loss(
        log_prob, case_tensor(case, "old_log_prob"), case_tensor(case, "advantages"),
        mean=mean, old_mean=case_tensor(case, "old_prev_sample_mean"), std=case_tensor(case, "std_dev_t"),
        sqrt_dt=case_tensor(case, "sqrt_dt"), clip_range=float(params["clip_range"]),
        adv_clip_max=float(params["adv_clip_max"]), beta=float(params["beta"]),
        ref_mean=case_tensor(case, "prev_sample_mean_ref"), rationorm=bool(params["rationorm"]),
    )
    grad_log_prob, grad_mean = torch.autograd.grad(loss, (log_prob, mean), allow_unused=True)
    if grad_mean is None:  # rationorm off and no KL: the mean does not enter the loss
        grad_mean = torch.zeros_like(mean)
    return to_numpy({**metrics, "grad_log_prob": grad_log_prob, "grad_prev_sample_mean": grad_mean})


@register_parity_kind("dppo_loss")
def _run_dppo_loss(case: dict) -> Dict[str, np.ndarray]:
    params = case["params"]
    sigma_t = dppo_sigma_t(case_tensor(case, "sigmas"), case_long(case, "sde_indices"), float(params["eta"]),
                           add_kl_coefficient=bool(params["add_kl_coefficient"]))
    new_logp = case_leaf(case, "new_logp")
    loss, metrics = dppo_loss(
        new_logp, case_tensor(case, "old_logp"), case_tensor(case, "advantages"),
        new_means=case_tensor(case, "new_means"), old_means=case_tensor(case, "old_means"), sigma_t=sigma_t,
        kl_threshold=float(params["kl_mask_threshold"]),
    )
    # The original scales each micro-batch's loss by 1 / its number of micro-batches before backward.
    return to_numpy({**metrics, "sigma_t": sigma_t,
                     "grad_new_logp": grad_of(loss * float(params.get("loss_scale", 1.0)), new_logp)})


@register_parity_kind("dppo_advantages")
def _run_dppo_advantages(case: dict) -> Dict[str, np.ndarray]:
    params = case["params"]
    rewards, group_ids = case_tensor(case, "rewards"), case_long(case, "group_ids")
    if params.get("root_track"):  # UniRL gives the root track of a tree rollout zero advantage
        return {"advantages": np.zeros(rewards.shape, dtype=np.float64)}
    adv = dppo_advantages(rewards, group_ids, scope=params["scope"], use_global_std=bool(params["use_global_std"]),
                          normalize=bool(params["normalize"]), eps=float(params["eps"]))
    return to_numpy({"advantages": adv})
