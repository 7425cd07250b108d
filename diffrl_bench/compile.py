"""Opt-in `torch.compile` of the policy's networks, for runs long enough to pay for it.

Measured on a 2-core AMD EPYC (issue 18): a compiled toy step takes 0.83x the time of an eager one, but the
compilation (the training, rollout and evaluation shapes each compile once) costs 6-8.6 minutes, so it is a net loss
below about 320 RL steps, the toy presets' length is 150-300, and compiled kernels change the last digits. It is
therefore off in every shipped preset and reference result; `train.compile: auto` turns it on for runs of at least
`train.compile_min_steps` steps, `on` always. `benchmarks/speed.py --compile` measures both figures on the machine
at hand (the compile warm-up and the per-step ratio), hence its break-even step count: on a 2-core Intel Xeon
(AVX-512) it measured 1.005x per step for 29 s of warm-up, a gain of nothing, so the break-even is machine-dependent
and `compile_min_steps` should be set from that benchmark, not taken as given.

Inductor builds C++ (on CPU) or Triton launchers (on GPU) with the system's C++ compiler: without one, `auto` stays
eager and `on` is refused by name. Compilation is in place (`nn.Module.compile`), so state dicts, checkpoints and
snapshot updates see the same parameter names as an eager run.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Optional, Tuple

from diffrl_bench.config import ConfigError

SETTINGS = ("off", "auto", "on")
OFF = "train.compile is off"
log = logging.getLogger(__name__)


class CompileUnavailable(ConfigError):
    """`train.compile: on` asked for what this run cannot do (no C++ compiler, an unsupported backend)."""


def cxx_compiler() -> Optional[str]:
    """The C++ compiler inductor would use ($CXX, else g++, c++, clang++ on PATH), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def decide(setting: str, steps: int, min_steps: int, compiler: Optional[str], unsupported: Optional[str]) -> Tuple[bool, str]:
    """(compile?, why) for `train.compile = setting` on a run of `steps` RL steps.

    `unsupported` is None when the run can compile its networks, else the reason it cannot (e.g. a backend without
    in-place compilation, DeepSpeed). `on` raises `CompileUnavailable` where `auto` would quietly stay eager."""
    if setting not in SETTINGS:
        raise ValueError(f"train.compile: {setting!r} is not one of {SETTINGS}")
    if setting == "off":
        return False, OFF
    reason = unsupported or (None if compiler else "no C++ compiler on PATH ($CXX, g++, c++, clang++), which "
                                                   "torch.compile's inductor needs")
    if setting == "on":
        if reason:
            raise CompileUnavailable(f"train.compile: on, but {reason}; set train.compile=off (or auto)")
        return True, "train.compile is on"
    if reason:
        return False, f"train.compile auto stays eager: {reason}"
    if steps < min_steps:
        return False, (f"train.compile auto stays eager: {steps} RL steps are fewer than train.compile_min_steps = "
                       f"{min_steps}, below which compiling costs more time than it saves")
    return True, f"train.compile auto compiles: {steps} RL steps >= train.compile_min_steps = {min_steps}"


def blocker(backend_class, deepspeed: bool) -> Optional[str]:
    """Why this run cannot compile its networks, or None."""
    if deepspeed:
        return "DeepSpeed runs are not compiled here (its engine wraps the module)"
    if not getattr(backend_class, "supports_compile", False):
        return (f"the {backend_class.__name__} backend is not compiled here (only the toy backend's networks, where "
                f"compilation was measured)")
    return None


def decide_for_run(cfg) -> Tuple[bool, str]:
    """`decide` for a whole run config, before any model is built (so `on` is refused at once)."""
    from diffrl_bench.distributed import deepspeed_requested
    from diffrl_bench.registry import MODELS

    t = cfg.train
    return decide(t.compile, t.steps, t.compile_min_steps, cxx_compiler(),
                  blocker(MODELS.get(cfg.model.backend), deepspeed_requested()))


def maybe_compile(policy, chosen: bool, why: str) -> bool:
    """Compile the policy's networks in place when `decide` chose to; returns whether it did."""
    (log.debug if why == OFF else log.info)(why)
    if chosen:
        policy.compile_networks()
    return chosen
