"""The policy backend base class `SnapshotPolicy` (snapshots as parameter copies, the full fine-tuning case), and
how the harness builds a backend and indexes its conditioning.

A backend owns every model call of a run. Algorithms never call the network: they ask the harness for
velocities of named snapshots (`theta`, `old`, `sampler`, `ema`, `ref`, ...) at given inputs.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict

import torch
from torch import nn

from diffrl_bench.schedules import soft_update_
from diffrl_bench.zero3 import full_parameters

THETA = "theta"


def build_policy(model_cfg, device=None):
    """The configured backend; `model.options` are passed only when given (the toy backend takes none)."""
    from omegaconf import OmegaConf

    from diffrl_bench.registry import MODELS

    kwargs = {"path": model_cfg.path}
    if device is not None:
        kwargs["device"] = device
    options = OmegaConf.to_container(model_cfg.options) if "options" in model_cfg else {}
    if options:
        kwargs["options"] = options
    return MODELS.get(model_cfg.backend)(**kwargs)


def calls_per_velocity(cfg_scale: float) -> int:
    """Network evaluations per sample for one velocity: classifier-free guidance runs the network twice."""
    return 1 if cfg_scale == 1.0 else 2


def index_condition(cond: Any, index) -> Any:
    """Select rows of a condition (a tensor, or a dict/tuple of tensors)."""
    if isinstance(cond, torch.Tensor):
        return cond[index]
    if isinstance(cond, dict):
        return {k: index_condition(v, index) for k, v in cond.items()}
    if isinstance(cond, (tuple, list)):
        return type(cond)(index_condition(v, index) for v in cond)
    raise TypeError(f"cannot index a condition of type {type(cond).__name__}")


def concat_conditions(a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: concat_conditions(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        return type(a)(concat_conditions(x, y) for x, y in zip(a, b))
    raise TypeError(f"cannot concatenate conditions of type {type(a).__name__}")


class SnapshotPolicy:
    """Base class for backends whose snapshots are frozen copies of the trained module's parameters.

    `module` is the trained network (theta), possibly wrapped by accelerate/DDP for its forward pass;
    `core` is the unwrapped network. Snapshots are deep copies with `requires_grad=False`, soft-updated towards
    theta by `update_snapshot` (`phi <- d phi + (1 - d) theta`). `ref` is simply a snapshot never updated.
    """

    supports_compile = True
    """theta and the snapshots are whole modules that `compile_networks` can compile in place"""

    def __init__(self, module: nn.Module):
        self.core = module
        self.module = module
        self.snapshots: Dict[str, nn.Module] = {}

    @property
    def device(self) -> torch.device:
        return next(self.core.parameters()).device

    def trainable_parameters(self):
        return [p for p in self.core.parameters() if p.requires_grad]

    def add_snapshot(self, name: str) -> None:
        if name == THETA:
            raise ValueError("'theta' is the trained policy, not a snapshot")
        if name not in self.snapshots:
            frozen = copy.deepcopy(self.core).eval()
            frozen.requires_grad_(False)
            self.snapshots[name] = frozen

    def snapshot_names(self):
        return list(self.snapshots)

    def compile_networks(self) -> None:
        """torch.compile theta and every snapshot in place (`train.compile`); parameter names are unchanged."""
        for network in (self.core, *self.snapshots.values()):
            network.compile()

    @torch.no_grad()
    def update_snapshot(self, name: str, decay: float) -> None:
        # Snapshots are copied before accelerate.prepare, so they stay whole; under ZeRO-3 theta does not, and is
        # gathered one tensor at a time (a full model's worth at once would double its memory on every process).
        for phi, theta in zip(self.snapshots[name].parameters(), self.core.parameters(), strict=True):
            with full_parameters([theta]):
                soft_update_([phi], [theta], decay)

    @torch.no_grad()
    def copy_snapshot_to_theta(self, name: str) -> None:
        """theta <- the snapshot's weights (e.g. to export the evaluation EMA); single-process use."""
        soft_update_(self.core.parameters(), self.snapshots[name].parameters(), 0.0)

    def _network(self, snapshot: str) -> nn.Module:
        if snapshot == THETA:
            return self.module
        if snapshot not in self.snapshots:
            raise KeyError(f"snapshot {snapshot!r} was not created; have: {[THETA] + list(self.snapshots)}")
        return self.snapshots[snapshot]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any, *, snapshot: str = THETA,
                 cfg_scale: float = 1.0) -> torch.Tensor:
        """v(x, sigma | cond) of one snapshot; with `cfg_scale != 1`, `v_u + w (v_c - v_u)` from one batched call."""
        network = self._network(snapshot)
        # Snapshots never need gradients; theta follows the caller's grad mode (rollouts run under no_grad).
        grad_context = contextlib.nullcontext() if snapshot == THETA else torch.no_grad()
        with grad_context:
            if cfg_scale == 1.0:
                return network(x, sigma, cond)
            both = network(torch.cat([x, x]), torch.cat([sigma, sigma]),
                           concat_conditions(cond, self.null_condition(x.shape[0])))
            v_cond, v_uncond = both.chunk(2)
            return v_uncond + cfg_scale * (v_cond - v_uncond)

    def snapshot_state_dict(self) -> Dict[str, torch.Tensor]:
        """All snapshots' tensors, keys `name/param`: what a checkpoint needs to resume exactly."""
        return {f"{name}/{k}": v.detach().cpu().contiguous()
                for name, net in self.snapshots.items() for k, v in net.state_dict().items()}

    def load_snapshot_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for name, net in self.snapshots.items():
            prefix = f"{name}/"
            net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # pragma: no cover - backends override
        raise NotImplementedError

    def null_condition(self, batch_size: int) -> Any:  # pragma: no cover - backends override
        raise NotImplementedError
