"""Likelihood estimators: the "how is log p_theta(x0) estimated" axis of the design space (METHODS.md sections 3-4).

An estimator turns one velocity into a per-sample log-likelihood surrogate E (higher = the policy explains the
sample better). Policy objectives (algorithms/objectives.py) only see E for theta (with gradient) and for the old
snapshot, so any estimator works with any objective. Two families:

forward (need the final sample x0 only; the harness noises it to `x_t = (1 - t) x0 + t eps` and evaluates theta,
    old and ref on that same `x_t`, so E_theta - E_old is a paired difference with no noise of its own):
    `fn(v, x_t, x0, eps, t) -> (B,) float64`
    elbo_adaptive  -L(v), L the self-normalised x0 loss of DiffusionNFT/ELBO code (the ELBO paper's default)
    elbo_t2        -t^2 mean_CHW (v - v*)^2
    elbo_uniform   -mean_CHW (v - v*)^2
    elbo_exact     -((1 - t) / (t + 1e-3)) mean_CHW (v - v*)^2
    fm_ghuber, fm_uniform, fm_t, fm_t2   AWM's flow-matching surrogates (`awm_log_likelihood`)
    Under CFG the original divides elbo_adaptive by the training guidance G and elbo_uniform by G^2 (their errors
    grow like G and G^2), for theta and old alike: `guidance_power` on each estimator, applied by `guidance_divisor`.
trajectory (needs a stochastic sampler's stored transitions x -> x'):
    `fn(x, v, sigma, sigma_next, sigma_first_next, x_next, **step_options) -> (B,) float64`, `step_options` the
    rollout SDE's step settings (noise_level, sde_type) as the transition item carries them (`item.options`)
    trajectory     Flow-GRPO's per-step Gaussian log-likelihood (`sde_step_logprob`)

A new estimator is one decorated function (`@estimator("name", kind="forward")`) in any module that the registry
loads (a file in algorithms/, or a third-party module under the `diffrl_bench.algorithms` entry point).
"""
from __future__ import annotations

from typing import Callable

import torch

from diffrl_bench.algorithms.awm import awm_log_likelihood
from diffrl_bench.algorithms.weighting import adaptive_x0_loss
from diffrl_bench.flow import mean_chw, per_sample
from diffrl_bench.registry import Registry
from diffrl_bench.sde import sde_step_logprob

ESTIMATORS: Registry = Registry("likelihood estimator")
ESTIMATOR_KINDS = ("forward", "trajectory")


def estimator(name: str, *, kind: str, guidance_power: int = 0) -> Callable:
    """Register a likelihood estimator under `name`; `kind` says what the rollout must keep (x0 or transitions).

    `guidance_power` p: when theta is trained under CFG scale G, the estimate is divided by G^p (`guidance_divisor`)
    so that its magnitude, and the log-ratio E_theta - E_old, do not grow with G (1 for elbo_adaptive, 2 for
    elbo_uniform, 0 for the rest, as in the original's `compute_elbo`)."""
    if kind not in ESTIMATOR_KINDS:
        raise ValueError(f"estimator kind {kind!r} is not one of {ESTIMATOR_KINDS}")
    if guidance_power not in (0, 1, 2):
        raise ValueError(f"estimator {name!r}: guidance_power must be 0, 1 or 2, got {guidance_power!r}")

    def decorator(fn: Callable) -> Callable:
        fn.kind = kind
        fn.guidance_power = guidance_power
        return ESTIMATORS.register(name)(fn)

    return decorator


def guidance_divisor(estimate: Callable, guidance_scale: float) -> float:
    """`G ** estimate.guidance_power`: what an estimate made under training guidance G is divided by (1 at G = 1).

    The original uses the *training* G for theta and old alike, even though old's velocity was made with the
    sampling guidance [jaemoo-choi/rethinking-diffusion-rl@c2570002:src/utils/base.py:553-576;
    src/utils/__init__.py:36 (adaptive / G), :46 (uniform / G^2)]."""
    if not guidance_scale > 0:
        raise ValueError(f"guidance_scale must be positive, got {guidance_scale}")
    return float(guidance_scale) ** getattr(estimate, "guidance_power", 0)


def matching_error(v: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """`mean_CHW (v - (eps - x0))^2` per sample in float64, (B,): the flow-matching error every forward
    estimator weights."""
    return mean_chw((v.double() - (eps.double() - x0.double())).square())


def _t(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64).reshape(-1)


@estimator("elbo_adaptive", kind="forward", guidance_power=1)
def elbo_adaptive(v, x_t, x0, eps, t):
    """`-mean_CHW (x0_hat - x0)^2 / sg(max(mean_CHW |x0_hat - x0|, 1e-5))`, `x0_hat = x_t - t v`."""
    return -adaptive_x0_loss(x_t - per_sample(t.to(x_t.dtype), x_t) * v, x0).double()


@estimator("elbo_t2", kind="forward")
def elbo_t2(v, x_t, x0, eps, t):
    """`-t^2 mean_CHW (v - v*)^2` (the x0-space error `mean (x0_hat - x0)^2`)."""
    return -_t(t).square() * matching_error(v, x0, eps)


@estimator("elbo_uniform", kind="forward", guidance_power=2)
def elbo_uniform(v, x_t, x0, eps, t):
    """`-mean_CHW (v - v*)^2` (plain flow matching)."""
    return -matching_error(v, x0, eps)


EXACT_T_OFFSET = 1e-3
"""The original's `exact` weight is `(1 - t) / (t + 1e-3)` [jaemoo-choi/rethinking-diffusion-rl@c2570002:
src/utils/__init__.py:49], which keeps it finite (at most 1000) for any t in [0, 1]."""


@estimator("elbo_exact", kind="forward")
def elbo_exact(v, x_t, x0, eps, t):
    """`-((1 - t) / (t + 1e-3)) mean_CHW (v - v*)^2`: the weight that makes the time average the ELBO of a rectified
    flow, `(1 - t) / t`, with the original's offset in the denominator. It is 0 at t = 1 and 499.5 at t = 0.001."""
    tt = _t(t)
    return -((1 - tt) / (tt + EXACT_T_OFFSET)) * matching_error(v, x0, eps)


def _fm(weighting: str) -> Callable:
    def fn(v, x_t, x0, eps, t):
        return awm_log_likelihood(matching_error(v, x0, eps), _t(t), weighting)

    fn.__doc__ = f"AWM's surrogate `awm_log_likelihood(m, t, {weighting!r})`, m the flow-matching error."
    return fn


fm_ghuber = estimator("fm_ghuber", kind="forward")(_fm("ghuber"))
fm_uniform = estimator("fm_uniform", kind="forward")(_fm("Uniform"))
fm_t = estimator("fm_t", kind="forward")(_fm("t"))
fm_t2 = estimator("fm_t2", kind="forward")(_fm("t**2"))


@estimator("trajectory", kind="trajectory")
def trajectory(x, v, sigma, sigma_next, sigma_first_next, x_next, **step_options):
    """Flow-GRPO's log-likelihood of the stored step `x -> x_next` under velocity `v` (float32 inside, as released),
    with the sampler's step settings (`noise_level`, `sde_type`)."""
    step = sde_step_logprob(x, v, sigma, sigma_next, sigma_first_next, prev_sample=x_next, **step_options)
    return step.log_prob.double()
