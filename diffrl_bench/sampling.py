"""Deterministic rollout samplers for rectified-flow models: ODE Euler and DPM-Solver++(2M).

Conventions (see METHODS.md): `x_t = (1 - t) x0 + t eps`, t = sigma in [0, 1], t = 1 is pure noise, and the model
predicts a velocity `v ~ eps - x0`. A sampler integrates from `sigmas[0]` (usually 1) down to `sigmas[-1] = 0`.

Both samplers are pure functions of a velocity callable, an initial latent and a sigma grid, and return a `Rollout`.
They are registered in `SAMPLERS` as "euler" and "dpm2".

Every registered sampler has the signature `sampler(velocity_fn, x_init, sigmas, *, generator=None, **options)`:
`generator` draws any sampling noise (deterministic samplers ignore it) and `options` are the sampler's own settings,
given in a run config as `rollout.sampler.options` (their defaults are the signature's). A sampler that can record
stochastic transitions for trajectory-likelihood training sets the attribute `records_transitions = True` and
accepts `record_before`; one that works per prompt group accepts `groups` (see diffrl_bench/sde.py). Samplers keep
no trajectory: `StateRecorder` rebuilds one where a test or a parity check needs it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch

from diffrl_bench.registry import SAMPLERS
from diffrl_bench.timesteps import INTEGER_TIME_SLACK

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`v = fn(x, sigma)`: `x` is (B, ...), `sigma` a (B,) tensor holding the same per-step time (0-1 scale) for every
sample."""


@dataclass
class Transitions:
    """The stochastic steps a trajectory-likelihood method trains on, and nothing else.

    Recorded steps are usually consecutive for each sample (a prefix of the grid, or an SDE window), so R transitions
    need only R + 1 latents: transition r goes from `latents[r]` to `latents[r + 1]`. A non-contiguous step set (the
    sampler's `sde_steps` / `sde_count` options, Flow-DPPO) stores the states after each step in `next_latents`.

    Attributes:
        latents: (R + 1, B, ...) the states around the recorded steps; (R, B, ...) the states before them when
            `next_latents` is given.
        steps: (R, B) long, the grid index of each transition (its sigma is `sigmas[step]`, its target `sigmas[step + 1]`).
        log_probs: (R, B) float32 behaviour log-likelihood of each transition under the sampling policy.
        next_latents: (R, B, ...) the state after each recorded step, or None when the steps are consecutive.
        means: (R, B, ...) float32 behaviour step mean of each transition (`RolloutRequest.record_means`), or None.
            GRPO-Guard normalises its ratio with it, Flow-DPPO anchors its KL trust region on it; stored, it stays
            the behaviour policy's across all optimizer steps of a rollout without a replay.
    """

    latents: torch.Tensor
    steps: torch.Tensor
    log_probs: torch.Tensor
    next_latents: Optional[torch.Tensor] = None
    means: Optional[torch.Tensor] = None

    @property
    def num_steps(self) -> int:
        return self.steps.shape[0]

    def before(self, r: int) -> torch.Tensor:
        """(B, ...) the state transition r starts from."""
        return self.latents[r]

    def after(self, r: int) -> torch.Tensor:
        """(B, ...) the state transition r ends in."""
        return self.latents[r + 1] if self.next_latents is None else self.next_latents[r]

    @staticmethod
    def cat(parts: List["Transitions"]) -> "Transitions":
        """Join chunks along the sample axis (chunks may have drawn different windows, but of one length)."""
        lengths = {p.num_steps for p in parts}
        if len(lengths) != 1:
            raise ValueError(f"rollout chunks recorded different numbers of transitions: {sorted(lengths)}")
        for name in ("next_latents", "means"):
            if len({getattr(p, name) is None for p in parts}) != 1:
                raise ValueError(f"rollout chunks disagree on whether they recorded {name}")

        def join(name: str) -> Optional[torch.Tensor]:
            if getattr(parts[0], name) is None:
                return None
            return torch.cat([getattr(p, name) for p in parts], dim=1)

        return Transitions(latents=join("latents"), steps=join("steps"), log_probs=join("log_probs"),
                           next_latents=join("next_latents"), means=join("means"))


@dataclass
class Rollout:
    """What a sampler returns.

    Attributes:
        x0: the final sample (B, ...).
        sigmas: the sigma grid that was integrated over, (N+1,).
        nfe: number of model (velocity) calls made.
        log_probs: (N, B) behaviour log-likelihood of each transition, NaN for deterministic steps (SDE samplers).
        stochastic: (N,) bool, which steps were stochastic (SDE samplers; the SDE window of Flow-GRPO-Fast).
        transitions: the recorded stochastic transitions, when the sampler was asked for them (`record_before`).
        total_nfe: velocity evaluations summed over samples, when not simply `nfe * B` (a shared ODE prefix).
        trajectory: (N+1, B, ...) the latent at each grid point, set by the sampling loop when asked
            (`sample_chunks(keep_trajectory=True)`).
    """

    x0: torch.Tensor
    sigmas: torch.Tensor
    nfe: int
    log_probs: Optional[torch.Tensor] = None
    stochastic: Optional[torch.Tensor] = None
    transitions: Optional[Transitions] = None
    total_nfe: Optional[int] = None
    trajectory: Optional[torch.Tensor] = None

    def sample_nfe(self) -> int:
        """Velocity evaluations summed over the batch (what the cost ledger counts)."""
        return self.total_nfe if self.total_nfe is not None else self.nfe * self.x0.shape[0]


class StateRecorder:
    """A velocity function that keeps every state it is evaluated at.

    A sampler that calls the model once per step on the current state (euler, dpm2, flow_grpo_sde without a shared
    prefix) then leaves the whole trajectory behind: `trajectory(rollout.x0)` is (N+1, B, ...), start and end
    included. Tests, parity checks and benchmarks use it; training keeps only what the algorithm asks for.
    """

    def __init__(self, velocity_fn: VelocityFn):
        self.velocity_fn = velocity_fn
        self.states: List[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        self.states.append(x)
        return self.velocity_fn(x, sigma, **kwargs)

    def trajectory(self, x0: torch.Tensor) -> torch.Tensor:
        return torch.stack([*self.states, x0])


def flow_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """The sigma grid of diffusers' `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)`.

    Reproduced value for value (diffusers rounds the grid to float32; the float32 values are returned as float64).
    The scheduler first builds its 1000-step training grid in float32 to find `sigma_min`/`sigma_max`, then
    spaces `num_steps` points between them in float64, applies the shift and casts to float32; each of those roundings
    is mirrored here so the grid matches bit for bit.

    Returns:
        float64 tensor of shape (num_steps + 1,), decreasing, ending in 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    num_train = 1000
    # The scheduler's training grid, float32: only its two ends are used (sigma(t=1000) and sigma(t=1)).
    train_t = torch.tensor([float(num_train), 1.0], dtype=torch.float32)
    train_s = train_t / num_train
    train_s = shift * train_s / (1 + (shift - 1) * train_s)
    sigma_max, sigma_min = (float(v) for v in train_s)
    # Inference grid: float64 numpy linspace on the 0-1000 scale, shift again, then round to float32.
    timesteps = np.linspace(sigma_max * num_train, sigma_min * num_train, num_steps)
    sig = timesteps / num_train
    sig = shift * sig / (1 + (shift - 1) * sig)
    sig32 = torch.from_numpy(sig).to(torch.float32)
    return torch.cat([sig32, torch.zeros(1, dtype=torch.float32)]).to(torch.float64)


def dpm_flow_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The sigma grid of diffusers' `DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)`, DGPO's
    rollout sampler (Luo-Yihong/DGPO@01ceb4b:scripts/train_sd3_dgpo.py:557-559).

    Unlike the Euler grid it does not start at 1: it shifts `1 - linspace(1, 1/T, N + 1)` (T = num_train_timesteps),
    reverses it, drops the final point and appends 0, so it starts at shift(0.999) (0.99967 for shift 3) and the
    DPM-Solver++(2M) correction is already active at step 1. The scheduler stores the grid in float32; those values
    are returned as float64. Its integer timesteps are `floor(1000 sigma)` of the float64 values, which
    `timesteps.quantize_times(..., "floor1000")` recovers from these.

    Returns:
        float64 tensor of shape (num_steps + 1,), decreasing, ending in 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = 1.0 - np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)
    s = np.flip(shift * s / (1 + (shift - 1) * s))[:-1].copy()
    grid = torch.cat([torch.from_numpy(s), torch.zeros(1, dtype=torch.float64)])
    return grid.to(torch.float32).to(torch.float64)


GRIDS = {"flow": flow_sigmas, "dpm_flow": dpm_flow_sigmas}
"""rollout sigma grids by name (`rollout.sampler.grid`): `flow` = the flow-matching Euler scheduler's, `dpm_flow` =
diffusers' DPM-Solver scheduler's with flow sigmas"""


def sigma_grid(name: str, num_steps: int, shift: float) -> torch.Tensor:
    """The named grid (see `GRIDS`)."""
    if name not in GRIDS:
        raise ValueError(f"unknown sigma grid {name!r}; expected one of {sorted(GRIDS)}")
    return GRIDS[name](num_steps, shift)


def _floor1000(sigma: torch.Tensor) -> torch.Tensor:
    # The float32 grid can sit just below an integer the scheduler truncated from float64 (0.875 -> 0.87499994).
    return torch.floor(sigma * 1000 + INTEGER_TIME_SLACK) / 1000


def time_dtype(x: torch.Tensor) -> torch.dtype:
    """The latent's dtype, but never below float32: bf16 would move e.g. sigma 0.9601 to 0.9609."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _sigma_batch(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The (B,) time tensor handed to the model, on the latent's device."""
    return torch.full((x.shape[0],), sigma, dtype=time_dtype(x), device=x.device)


ModelTime = Union[None, str, Callable[[torch.Tensor], torch.Tensor]]

MODEL_TIMES: Dict[str, Optional[Callable[[torch.Tensor], torch.Tensor]]] = {
    "sigma": None,
    "floor1000": _floor1000,
}
"""Named `model_time` modes a config can set. `sigma`: the model sees the true sigma. `floor1000`: it sees
`long(sigma * 1000) / 1000`, what the SD3 pipeline's integer timesteps hand the transformer in DiffusionNFT's and the
ELBO-PG code's rollouts and evaluation (DiffusionNFT@24af5554:flow_grpo/diffusers_patch/pipeline_with_logprob.py:213)."""


def _model_time_map(model_time: ModelTime):
    if model_time is None or callable(model_time):
        return model_time
    if model_time not in MODEL_TIMES:
        raise ValueError(f"sampler option model_time={model_time!r} is not one of {sorted(MODEL_TIMES)} "
                         "(or a callable)")
    return MODEL_TIMES[model_time]


def _model_sigma(x: torch.Tensor, sigma: float, model_time: ModelTime):
    """Sigma as seen by the model: optionally remapped (e.g. the SD3 pipeline's integer-timestep truncation).

    The map is applied in float64 so that e.g. `floor(sigma * 1000)` sees the exact grid value, then cast."""
    tau = torch.full((x.shape[0],), sigma, dtype=torch.float64, device=x.device)
    remap = _model_time_map(model_time)
    if remap is not None:
        tau = remap(tau)
    return tau.to(time_dtype(x))


@SAMPLERS.register("euler")
def euler_sample(
    velocity_fn: VelocityFn,
    x_init: torch.Tensor,
    sigmas: torch.Tensor,
    model_time: ModelTime = None,
    *,
    generator: Optional[torch.Generator] = None,
) -> Rollout:
    """First-order ODE sampler: `x' = x + v(x, sigma) (sigma' - sigma)`, one model call per step (deterministic:
    `generator` is unused). `model_time`: what the model is told the time is (`MODEL_TIMES`; the update always
    uses the true sigmas)."""
    grid = [float(s) for s in sigmas]
    x = x_init
    _model_time_map(model_time)  # a bad name fails before the first model call
    for sigma, sigma_next in zip(grid[:-1], grid[1:]):
        v = velocity_fn(x, _sigma_batch(x, sigma) if model_time is None else _model_sigma(x, sigma, model_time))
        x = x + v * (sigma_next - sigma)
    return Rollout(x0=x, sigmas=sigmas, nfe=len(grid) - 1)


def _log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma; -inf at sigma = 1 and +inf at sigma = 0 on purpose."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


@SAMPLERS.register("dpm2")
def dpm2_sample(
    velocity_fn: VelocityFn,
    x_init: torch.Tensor,
    sigmas: torch.Tensor,
    model_time: ModelTime = None,
    *,
    generator: Optional[torch.Generator] = None,
) -> Rollout:
    """DPM-Solver++(2M), data-prediction form, on flow sigmas (alpha = 1 - sigma).

    Each step predicts `m = x - sigma v` (the x0-prediction) and moves from sigma_s to sigma_t, h = lambda_t - lambda_s:
      first order (DDIM, eta 0):  x_t = (sigma_t / sigma_s) x - alpha_t expm1(-h) m
      second order (multistep):   ... - 0.5 alpha_t expm1(-h) (h / h_prev) (m - m_prev)
    The first and the last step are first order (the last one lands on sigma = 0, where it returns `m` exactly).
    At step 1 the previous step started at sigma = 1, so h_prev = +inf and the correction is exactly 0, as in the
    original solver, where `lambda(1) = -inf` propagates; it is special-cased here instead of relying on inf arithmetic.

    Deterministic: `generator` is unused.

    Args:
        model_time: a `MODEL_TIMES` name or a map of the (B,) float64 sigma handed to the model (e.g.
            `floor1000`, what the SD3 pipeline's integer timesteps give the transformer). The update formulas always
            use the true sigmas.
    """
    grid = [float(s) for s in sigmas]
    num_steps = len(grid) - 1
    x = x_init
    _model_time_map(model_time)
    m_prev: Optional[torch.Tensor] = None
    h_prev = math.inf
    for i in range(num_steps):
        s, t = grid[i], grid[i + 1]
        v = velocity_fn(x, _model_sigma(x, s, model_time))
        m = x - s * v
        lam_s, lam_t = _log_snr(s), _log_snr(t)
        h = lam_t - lam_s
        alpha_t = 1.0 - t
        # -expm1(-h) = 1 - sigma_t alpha_s / (alpha_t sigma_s); h = +inf (start at 1 or land on 0) gives exactly 1.
        phi = -math.expm1(-h)
        x_next = (t / s) * x + (alpha_t * phi) * m
        second_order = 0 < i < num_steps - 1 and m_prev is not None and math.isfinite(h_prev)
        if second_order:
            x_next = x_next + (0.5 * alpha_t * phi * h / h_prev) * (m - m_prev)
        x, m_prev, h_prev = x_next, m, h
    return Rollout(x0=x, sigmas=sigmas, nfe=num_steps)
