"""The black-box rollout sampler: any diffusers scheduler, by class name, stepped on the run's sigma grid.

`rollout.sampler: {name: diffusers, num_steps: 14, shift: 3.0, options: {scheduler: SASolverScheduler,
scheduler_config: {...}, tau: 0.4, tau_window: [0.3, 0.9], ...}}`. The sampler keeps no per-step densities, so only
methods that train on the final sample (nft, awm, crd, rft, dgpo, elbo_pg's forward estimators) can use it; the
trajectory-likelihood methods refuse it (it does not set `records_transitions`).

How the scheduler is driven (why each choice):
- The models predict a velocity `v ~ eps - x0` (METHODS.md), which is diffusers' flow-matching model output: the
  sampler fills `prediction_type: flow_prediction` and `use_flow_sigmas: true` for schedulers that have these keys
  and refuses other values, since a VP conversion of a velocity would be wrong.
- The grid is the run's (`rollout.sampler.grid/num_steps/shift`, the one training times are drawn from), installed
  as the scheduler's `sigmas` (float32, as diffusers keeps them) with `timesteps = 1000 sigma` after
  `set_timesteps(num_steps)` has reset its multistep state. Schedulers index `sigmas` by their step counter, so they
  step exactly this grid; the scheduler's own grid keys (shift, flow_shift, karras, ...) are refused. diffusers'
  `SASolverScheduler(use_flow_sigmas=True)` would otherwise end at sigma = shift(1/N) (0.187 for 14 steps, shift 3),
  its last step a no-op, and return a noisy sample.
- `first_sigma` / `last_sigma_ratio` edit that grid for this sampler only (AWM's SA-Solver rollouts start at 0.999,
  where lambda is finite, and halve the last non-zero time; its training times stay on the unedited grid).
- `final_step: data_prediction` takes the step onto sigma = 0 as `x - sigma v` of its model call (SA-Solver cannot
  step onto sigma = 0: lambda = +inf makes its update NaN; AWM's solver finishes the same way).
- Noise: each sample gets its own generator, seeded in row order from the harness generator, and diffusers'
  `randn_tensor` draws row i's noise from generator i; so results do not depend on how rollouts are chunked.
- `tau`: SA-Solver's stochasticity, `tau` on sigma in `tau_window` (inclusive) and 0 elsewhere, tested at each
  step's start time (diffusers hands `tau_func` the step's timestep) or, with `tau_at: end`, at its target time
  (AWM's solver, sd3_pipeline_with_logprob.py:296-297 with sa_solver.py:524-543).
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional

import torch

from diffrl_bench.algorithm import OptionError
from diffrl_bench.registry import SAMPLERS
from diffrl_bench.sampling import ModelTime, Rollout, VelocityFn, _model_sigma, _model_time_map

FLOW_CONFIG = {"prediction_type": "flow_prediction", "use_flow_sigmas": True}
"""scheduler settings that make a scheduler read the model output as a velocity on sigmas with alpha = 1 - sigma"""

GRID_KEYS = ("shift", "flow_shift", "use_dynamic_shifting", "base_shift", "max_shift", "shift_terminal",
             "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "timestep_spacing",
             "final_sigmas_type", "time_shift_type")
"""scheduler keys that shape its own grid; the sampler steps the run's grid, so setting them would be silently moot"""

FINAL_STEPS = ("scheduler", "data_prediction")
TAU_AT = ("start", "end")


def scheduler_class(name: str):
    """The diffusers scheduler class called `name`."""
    import diffusers

    cls = getattr(diffusers, str(name), None)
    if not (inspect.isclass(cls) and hasattr(cls, "step") and hasattr(cls, "set_timesteps")):
        raise OptionError("scheduler", f"{name!r} is not a diffusers scheduler class (e.g. "
                                       f"FlowMatchEulerDiscreteScheduler, SASolverScheduler)")
    return cls


def flow_scheduler_config(cls, config: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """`config` with the flow-matching settings filled in, checked against the class's constructor."""
    config = dict(config or {})
    params = inspect.signature(cls.__init__).parameters
    for key in config:
        if key not in params:
            raise OptionError(f"scheduler_config.{key}", f"{cls.__name__} has no such setting; its settings: "
                                                         f"{sorted(p for p in params if p != 'self')}")
        if key in GRID_KEYS:
            raise OptionError(f"scheduler_config.{key}", "shapes the scheduler's own grid, which this sampler "
                                                         "replaces by the run's: set rollout.sampler.grid / "
                                                         "num_steps / shift instead")
        if key == "tau_func":
            raise OptionError("scheduler_config.tau_func", "a function cannot come from a config; set the "
                                                           "sampler options tau / tau_window / tau_at")
    for key, value in FLOW_CONFIG.items():
        if key in params:
            if config.setdefault(key, value) != value:
                raise OptionError(f"scheduler_config.{key}", f"must be {value!r}: the models predict a flow "
                                                             f"velocity, got {config[key]!r}")
    return config


def check_options(options: Dict[str, Any]) -> None:
    """Load-time check of the resolved options (config validation calls it); raises `OptionError` naming the option."""
    cls = scheduler_class(options["scheduler"])
    flow_scheduler_config(cls, options.get("scheduler_config"))
    _model_time_map(options.get("model_time"))
    if options.get("final_step") not in FINAL_STEPS:
        raise OptionError("final_step", f"{options.get('final_step')!r} is not one of {FINAL_STEPS}")
    _check_tau(cls, options.get("tau"), options.get("tau_window"), options.get("tau_at"))
    first = options.get("first_sigma")
    if first is not None and not 0 < first <= 1:
        raise OptionError("first_sigma", f"{first} is not in (0, 1]")
    ratio = options.get("last_sigma_ratio")
    if ratio is not None and not 0 < ratio < 1:
        raise OptionError("last_sigma_ratio", f"{ratio} is not in (0, 1)")


def _check_tau(cls, tau, window, tau_at) -> None:
    if tau_at not in TAU_AT:
        raise OptionError("tau_at", f"{tau_at!r} is not one of {TAU_AT}")
    if tau is None:
        if window is not None:
            raise OptionError("tau_window", "given without tau")
        return
    if "tau_func" not in inspect.signature(cls.__init__).parameters:
        raise OptionError("tau", f"{cls.__name__} has no stochasticity function (tau_func); tau applies to "
                                 f"SASolverScheduler")
    if not tau >= 0:
        raise OptionError("tau", f"{tau} is not a non-negative number")
    if window is not None and not (len(window) == 2 and 0 <= window[0] <= window[1] <= 1):
        raise OptionError("tau_window", f"{list(window)} is not [lo, hi] with 0 <= lo <= hi <= 1")


def _edited_grid(sigmas: torch.Tensor, first_sigma: Optional[float], last_sigma_ratio: Optional[float]):
    """The grid as diffusers keeps it (float32), with this sampler's edits."""
    grid = sigmas.detach().to("cpu", torch.float32).clone()
    if last_sigma_ratio is not None:
        if len(grid) < 4:
            raise OptionError("last_sigma_ratio", "needs at least 3 steps")
        grid[-2] = grid[-3] * last_sigma_ratio
    if first_sigma is not None:
        grid[0] = first_sigma
    if not bool(torch.all(grid[1:] < grid[:-1])) or float(grid[-1]) != 0.0:
        raise OptionError("first_sigma", f"the edited grid {grid.tolist()} is not decreasing to 0")
    return grid


def _tau_func(grid: torch.Tensor, timesteps: torch.Tensor, tau: float, window: Optional[List[float]], tau_at: str):
    """SA-Solver's `tau_func(timestep)`: it is called with the timesteps this sampler hands `step`, so the step
    index, and from it the step's start or target sigma, is looked up exactly."""
    index = {float(t): k for k, t in enumerate(timesteps)}
    offset = 0 if tau_at == "start" else 1

    def tau_func(timestep) -> float:
        sigma = float(grid[index[float(timestep)] + offset])
        inside = window is None or window[0] <= sigma <= window[1]
        return float(tau) if inside else 0.0

    return tau_func


def _row_generators(generator: Optional[torch.Generator], rows: int) -> Optional[List[torch.Generator]]:
    """One CPU generator per sample, seeded in row order from `generator` (one draw per row, so consecutive chunks
    draw exactly the seeds one chunk of all rows would)."""
    if generator is None:
        return None
    seeds = [int(torch.randint(0, 2**62, (1,), generator=generator)) for _ in range(rows)]
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@SAMPLERS.register("diffusers")
def diffusers_sample(
    velocity_fn: VelocityFn,
    x_init: torch.Tensor,
    sigmas: torch.Tensor,
    scheduler: str = "FlowMatchEulerDiscreteScheduler",
    scheduler_config: Optional[Dict[str, Any]] = None,
    tau: Optional[float] = None,
    tau_window: Optional[List[float]] = None,
    tau_at: str = "start",
    first_sigma: Optional[float] = None,
    last_sigma_ratio: Optional[float] = None,
    final_step: str = "scheduler",
    model_time: ModelTime = None,
    *,
    generator: Optional[torch.Generator] = None,
) -> Rollout:
    """Integrate from `sigmas[0]` to 0 by stepping the diffusers scheduler `scheduler` (a class name) built with
    `scheduler_config`; one model call per step. See the module docstring for the options.

    Returns a `Rollout` whose `sigmas` is the grid actually integrated (float32 values, as float64), i.e. `sigmas`
    after the `first_sigma` / `last_sigma_ratio` edits."""
    cls = scheduler_class(scheduler)
    config = flow_scheduler_config(cls, scheduler_config)
    if final_step not in FINAL_STEPS:
        raise OptionError("final_step", f"{final_step!r} is not one of {FINAL_STEPS}")
    _check_tau(cls, tau, tau_window, tau_at)
    _model_time_map(model_time)
    grid = _edited_grid(sigmas, first_sigma, last_sigma_ratio)
    num_steps = len(grid) - 1
    timesteps = grid[:-1] * 1000
    if tau is not None:
        config = dict(config, tau_func=_tau_func(grid, timesteps, tau, tau_window, tau_at))
    sched = cls(**config)
    sched.set_timesteps(num_steps)
    if len(sched.timesteps) != num_steps or not hasattr(sched, "sigmas"):
        raise OptionError("scheduler", f"{scheduler} takes {len(sched.timesteps)} model calls for {num_steps} steps; "
                                       f"only one-call-per-step schedulers with a sigma grid can be driven")
    sched.sigmas = grid.clone()
    sched.timesteps = timesteps.clone()
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    step_kwargs = {}
    if "generator" in inspect.signature(sched.step).parameters:
        step_kwargs["generator"] = _row_generators(generator, x_init.shape[0])
    x = x_init
    scheduled = num_steps - 1 if final_step == "data_prediction" else num_steps
    for k in range(scheduled):
        v = velocity_fn(x, _model_sigma(x, float(grid[k]), model_time)).to(x.dtype)
        x = sched.step(v, sched.timesteps[k], x, return_dict=False, **step_kwargs)[0]
    if final_step == "data_prediction":
        sigma = float(grid[num_steps - 1])
        x = x - sigma * velocity_fn(x, _model_sigma(x, sigma, model_time)).to(x.dtype)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"sampler 'diffusers' ({scheduler}, config {flow_scheduler_config(cls, scheduler_config)}) produced non-finite values: "
                         f"a scheduler with log-SNR steps cannot start at sigma = 1 (set rollout.sampler.options."
                         f"first_sigma, e.g. 0.999) or step onto sigma = 0 (set rollout.sampler.options.final_step: "
                         f"data_prediction)")
    return Rollout(x0=x, sigmas=grid.to(torch.float64), nfe=num_steps)


diffusers_sample.check_options = check_options
diffusers_sample.kind = "a diffusers scheduler stepped as a black box (no per-step densities)"
