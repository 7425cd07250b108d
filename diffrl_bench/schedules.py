"""Decay schedules for soft-updated policy snapshots (old / sampler / ema) and the soft update itself.

After each epoch a snapshot follows the trained weights: `phi <- d * phi + (1 - d) * theta`, with `d = d(step)`
and `step` the number of optimizer steps so far. One piecewise-linear form covers every schedule the originals use:
`d = v0 if step < s0 else min(v0 + slope (step - s0), d_max)`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Iterable, Mapping, Union

import torch


@dataclass(frozen=True)
class DecaySchedule:
    """`d(step) = start_value if step < start_step else min(start_value + slope * (step - start_step), max_value)`."""

    start_step: int = 0
    start_value: float = 0.0
    slope: float = 0.0
    max_value: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.start_step:
            return float(self.start_value)
        # Same operation order as the originals (value + slope * elapsed), so values agree to the last bit or two.
        return float(min(self.start_value + self.slope * (step - self.start_step), self.max_value))

    @classmethod
    def from_spec(cls, spec: str) -> "DecaySchedule":
        """Parse Flow-Factory's CRD string form `"start_step-start_value-slope-max_value"`.

        Example: `"0-0.25-0.005-0.999"` (the CRD old-policy default).
        """
        parts = spec.split("-")
        if len(parts) != 4:
            raise ValueError(f"decay spec {spec!r} must be 'start_step-start_value-slope-max_value'")
        try:
            return cls(int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3]))
        except ValueError as err:
            raise ValueError(f"decay spec {spec!r} must be 'start_step-start_value-slope-max_value'") from err


DECAY_PRESETS: Dict[str, DecaySchedule] = {
    # Fully on-policy: the snapshot is an exact copy of theta after every epoch.
    "on_policy": DecaySchedule(),
    # DiffusionNFT default (return_decay type 1): min(0.001 step, 0.5).
    "nft": DecaySchedule(start_step=0, start_value=0.0, slope=0.001, max_value=0.5),
    # DiffusionNFT OCR (return_decay type 2): exact copy for 75 steps, then rising to 0.999.
    "nft_ocr": DecaySchedule(start_step=75, start_value=0.0, slope=0.0075, max_value=0.999),
    # CRD old policy: min(0.25 + 0.005 step, 0.999).
    "crd_old": DecaySchedule(start_step=0, start_value=0.25, slope=0.005, max_value=0.999),
    # CRD sampler: the same 75-step schedule as nft_ocr.
    "crd_sampler": DecaySchedule(start_step=75, start_value=0.0, slope=0.0075, max_value=0.999),
    # AWM lagged 'ema' adapter for the ema-KL term: min(0.001 step, 0.3).
    "awm_ema": DecaySchedule(start_step=0, start_value=0.0, slope=0.001, max_value=0.3),
}


def decay_schedule(spec: Union[str, DecaySchedule, Mapping[str, float]]) -> DecaySchedule:
    """Resolve a schedule from a preset name, a `DecaySchedule`, a dict of its four fields, or a CRD-style string
    `"start_step-start_value-slope-max_value"`."""
    if isinstance(spec, DecaySchedule):
        return spec
    if isinstance(spec, str):
        if spec in DECAY_PRESETS:
            return DECAY_PRESETS[spec]
        if spec.count("-") == 3:
            return DecaySchedule.from_spec(spec)
        raise ValueError(f"unknown decay preset {spec!r}; presets: {', '.join(sorted(DECAY_PRESETS))}")
    if isinstance(spec, Mapping):
        allowed = {f.name for f in fields(DecaySchedule)}
        unknown = set(spec) - allowed
        if unknown:
            raise ValueError(f"unknown decay schedule keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        return DecaySchedule(**spec)
    raise TypeError(f"cannot build a DecaySchedule from {type(spec).__name__}")


@torch.no_grad()
def soft_update_(
    target_params: Iterable[torch.Tensor], source_params: Iterable[torch.Tensor], decay: float
) -> None:
    """In place: `phi <- d * phi + (1 - d) * theta` for each (phi, theta) pair.

    `lerp_` is exact at both ends: d = 0 copies theta, d = 1 leaves phi untouched.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    targets, sources = list(target_params), list(source_params)
    if len(targets) != len(sources):
        raise ValueError(f"{len(targets)} target tensors but {len(sources)} source tensors")
    for phi, theta in zip(targets, sources):
        phi.lerp_(theta.to(dtype=phi.dtype, device=phi.device), 1.0 - decay)
