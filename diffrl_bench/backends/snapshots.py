"""The two ways a diffusers backend stores theta and its snapshots, one class per `finetune` option.

`DiffusersFlowPolicy` picks one at construction and routes every snapshot operation through it, so the policy's
public methods (`add_snapshot`, `update_snapshot`, `copy_snapshot_to_theta`, the snapshot state, `export`) check
their arguments once and never branch on the fine-tuning mode. Both strategies keep the snapshots in the policy's
own `snapshots` dict (name -> callable network), which `SnapshotPolicy.velocity` reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

import torch
from torch import nn

from diffrl_bench.backends.lora import LoraSnapshots
from diffrl_bench.models import SnapshotPolicy

if TYPE_CHECKING:  # the policy module imports this one
    from diffrl_bench.backends.diffusers_policy import DiffusersFlowPolicy, VelocityModule

REF = "ref"
"""the frozen base model: never updated, never exported, and free under LoRA (adapters switched off)"""


class AdapterView:
    """A LoRA snapshot as a callable network: the shared module with the snapshot's adapter switched on."""

    def __init__(self, module: VelocityModule, lora: LoraSnapshots, adapter: Optional[str]):
        self.module, self.lora, self.adapter = module, lora, adapter

    def __call__(self, x, sigma, cond):
        with self.lora.using(self.adapter):
            return self.module(x, sigma, cond)


class AdapterSnapshots:
    """`finetune: lora`: theta is a peft adapter on the transformer, every other snapshot a further frozen adapter
    on the same layers (lora.py), and `ref` the transformer with adapters switched off.

    The policy's `core` keeps only theta's adapter in its `state_dict` (`persistent`), so a checkpoint holds the
    adapters, not the base weights, which come back from `model.path` on resume.
    """

    def __init__(self, policy: DiffusersFlowPolicy, lora_config, dtype: torch.dtype):
        self.policy = policy
        self.lora = LoraSnapshots(policy.transformer, lora_config, dtype=dtype)
        policy.core.persistent = {f"transformer.{n}" for n in self.lora.param_names().values()}

    def trainable_parameters(self) -> List[nn.Parameter]:
        return self.lora.theta_parameters()

    def add(self, name: str) -> None:
        adapter = None if name == REF else name
        if adapter is not None:
            self.lora.add(adapter)
        self.policy.snapshots[name] = AdapterView(self.policy.core, self.lora, adapter)

    def update(self, name: str, decay: float) -> None:
        self.lora.soft_update(name, decay)

    def copy_to_theta(self, name: str) -> None:
        self.lora.copy_to_theta(name)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {f"{name}/{k}": v for name in self._adapters() for k, v in self.lora.state_dict(name).items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for name in self._adapters():
            prefix = f"{name}/"
            self.lora.load_state_dict(name, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def _adapters(self) -> List[str]:
        return [name for name in self.policy.snapshots if name != REF]

    def export(self, path: Path) -> Path:
        """theta's adapter as diffusers LoRA weights: `<Pipeline>.load_lora_weights(path)` applies it."""
        path.mkdir(parents=True, exist_ok=True)
        self.lora.save_for_pipeline(self.policy._pipeline_class(), str(path))
        return path


class ParameterCopies:
    """`finetune: full`: every transformer weight trains and a snapshot is a frozen copy of the transformer.

    The copies, their soft updates and their state are `models.SnapshotPolicy`'s own (the toy model's), called on
    the policy; this class adds only `ref`'s dtype and the transformer export.
    """

    lora = None

    def __init__(self, policy: DiffusersFlowPolicy):
        self.policy = policy
        policy.transformer.requires_grad_(True)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return SnapshotPolicy.trainable_parameters(self.policy)

    def add(self, name: str) -> None:
        SnapshotPolicy.add_snapshot(self.policy, name)
        if name != REF:
            return
        ref, frozen_dtype = self.policy.snapshots[REF], self.policy.frozen_dtype
        if ref.compute_dtype != frozen_dtype:
            # ref never moves, so it can live in the frozen dtype: under bf16 autocast the matmuls see bf16
            # weights either way, and an SD3.5-M copy shrinks from 9 to 4.5 GB.
            ref.to(dtype=frozen_dtype)
            ref.compute_dtype = frozen_dtype

    def update(self, name: str, decay: float) -> None:
        SnapshotPolicy.update_snapshot(self.policy, name, decay)

    def copy_to_theta(self, name: str) -> None:
        SnapshotPolicy.copy_snapshot_to_theta(self.policy, name)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return SnapshotPolicy.snapshot_state_dict(self.policy)

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        SnapshotPolicy.load_snapshot_state_dict(self.policy, state)

    def export(self, path: Path) -> Path:
        """theta's full transformer (`save_pretrained`), loadable as the pipeline's `transformer` subfolder."""
        self.policy.transformer.save_pretrained(str(path))
        return path
