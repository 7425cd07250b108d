"""DeepSpeed's share of a checkpoint: the engine's model and optimizer shards, written and read by DeepSpeed itself.

Under ZeRO each process holds only its partition of the optimizer state (and, under ZeRO-3, of the weights), so
the harness's own optimizer file cannot hold them. Every process writes its partition with the engine's
`save_checkpoint` into a staging folder, which `checkpoint.save_checkpoint` then moves into the checkpoint as
`deepspeed/` before writing the manifest (SHA-256 of every file). Everything else (weights gathered whole for
evaluation, snapshots, generators, ledger, step counters) is saved by checkpoint.py as without DeepSpeed.

DeepSpeed's files are torch pickles, and unpickling runs code: `load_engine_state` reads them only from the run's
own checkpoint folder, and only after `checkpoint.verify_checkpoint` has matched every one against the manifest
(an unlisted file, a link or a changed byte is refused, naming the file). A LoRA run saves only what trains
(`exclude_frozen_parameters`): the base weights come back from `model.path`, the frozen snapshot adapters from
snapshots.safetensors.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict

import torch

from diffrl_bench.checkpoint import ENGINE_DIR, CheckpointError, verify_checkpoint
from diffrl_bench.zero3 import full_parameters

TAG = "state"
"""the DeepSpeed checkpoint tag (one per checkpoint folder: the step is in the folder's name)"""


def staging_dir(directory: Path, step: int) -> Path:
    """Where every process writes its engine partition for step `step` before the checkpoint is assembled."""
    return Path(directory) / f".tmp_{ENGINE_DIR}_{step:07d}"


def trains_part_only(module: torch.nn.Module) -> bool:
    """Whether some parameters are frozen (LoRA): the engine then saves only the trained ones."""
    return any(not p.requires_grad for p in module.parameters())


def whole_state_dict(module: torch.nn.Module, keep: bool = True) -> Dict[str, torch.Tensor]:
    """`module.state_dict()` with ZeRO-3 partitions gathered, one tensor at a time. A collective: every process
    calls it; only those with `keep` (the one that writes) hold a copy, so a large model is not copied per process."""
    state = {}
    for key, value in module.state_dict(keep_vars=True).items():
        with full_parameters([value]):
            if keep:
                state[key] = value.detach().cpu().clone().contiguous()
    return state


def save_engine_state(engine, directory: Path, step: int, accelerator) -> Path:
    """Every process writes its partition into `staging_dir(directory, step)`; returns that folder. A collective."""
    staging = staging_dir(directory, step)
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)  # left by a save that was killed
    accelerator.wait_for_everyone()
    engine.save_checkpoint(str(staging), tag=TAG, save_latest=False,
                           exclude_frozen_parameters=trains_part_only(engine.module))
    accelerator.wait_for_everyone()
    return staging


def load_engine_state(engine, checkpoint: Path, run_checkpoints: Path, verify: bool = True) -> None:
    """Restore the engine's weights and optimizer partitions from `checkpoint`, a folder of `run_checkpoints`.

    `verify=False`: the caller has verified the whole checkpoint already (`checkpoint.load_checkpoint` does)."""
    checkpoint = Path(checkpoint)
    if checkpoint.resolve().parent != Path(run_checkpoints).resolve():
        raise CheckpointError(f"checkpoint {checkpoint} is not in this run's checkpoint folder {run_checkpoints}: "
                              f"DeepSpeed files are loaded only from the run's own checkpoints")
    folder = checkpoint / ENGINE_DIR
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} has no {ENGINE_DIR}/ folder: it was not written by a "
                              f"DeepSpeed run")
    if verify:
        verify_checkpoint(checkpoint)
    partial = trains_part_only(engine.module)
    # Only what trains was saved for LoRA: the frozen weights are already in place, so a partial load is expected.
    path, _ = engine.load_checkpoint(str(folder), tag=TAG, load_module_strict=not partial,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"checkpoint {checkpoint}: DeepSpeed found no state under {folder / TAG}")
