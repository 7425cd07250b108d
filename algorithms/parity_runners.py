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

from diffrl_bench.advantages import group_advantages
from diffrl_bench.algorithms.awm import awm_loss
from diffrl_bench.algorithms.crd import crd_loss
from diffrl_bench.algorithms.flow_dppo import dppo_advantages, dppo_loss, dppo_sigma_t
from diffrl_bench.algorithms.flow_grpo import grpo_loss
from diffrl_bench.algorithms.grpo_guard import grpo_guard_loss
from diffrl_bench.algorithms.nft import nft_loss
from diffrl_bench.flow import forward_noise
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
    modes = {"sigma": None, "floor1000": lambda s: torch.floor(s * 1000) / 1000}
    if params["model_time"] not in modes:
        raise ValueError(f"unknown model_time {params['model_time']!r}")
    taus: List[torch.Tensor] = []

    def velocity(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        taus.append(tau[0])
        return a * x + b * tau.reshape(-1, *([1] * (x.ndim - 1)))

    recorder = StateRecorder(velocity)
    rollout = dpm2_sample(recorder, case_tensor(case, "z_init"), case_tensor(case, "sigmas"),
                          model_time=modes[params["model_time"]])
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
