"""Checkpoints that resume a run exactly: model, optimizer, snapshots, RNG states, data position and ledger.

Tensors are stored with safetensors and everything else as JSON; nothing is unpickled on load. A checkpoint
directory is written under a temporary name and renamed when complete, so an interrupted save never leaves a
half-written checkpoint behind.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step_"


def _flatten_optimizer(state: dict) -> Tuple[Dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        meta["state"][str(pid)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
                meta["state"][str(pid)][key] = "tensor"
            else:
                meta["state"][str(pid)][key] = value
    return tensors, meta


def _unflatten_optimizer(tensors: Dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, entries in meta["state"].items():
        state[int(pid)] = {key: (tensors[f"{pid}.{key}"] if value == "tensor" else value)
                           for key, value in entries.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def checkpoint_dir(directory: Path, step: int) -> Path:
    """Where the checkpoint of RL step `step` lives under a run's checkpoint directory."""
    return Path(directory) / f"{PREFIX}{step:07d}"


def save_checkpoint(directory: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    snapshots: Dict[str, torch.Tensor], generators: Dict[str, torch.Generator],
                    trainer_state: dict, keep_last: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(directory, step)
    tmp = directory / f".tmp_{PREFIX}{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    if snapshots:
        save_file(snapshots, str(tmp / "snapshots.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng = {f"generator.{name}": g.get_state() for name, g in generators.items()}
    rng["torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda.{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    np_state = np.random.get_state()
    py_state = random.getstate()
    (tmp / "state.json").write_text(json.dumps({
        "step": step, "trainer": trainer_state, "optimizer": opt_meta,
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
    }))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(directory.glob(f"{PREFIX}*"))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Only the trained weights of a checkpoint (theta: the whole network, or its LoRA adapter), for evaluation."""
    weights = path / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{path} is not a checkpoint: it has no model.safetensors")
    model.load_state_dict(load_file(str(weights)))


def load_snapshot_weights(path: Path) -> Dict[str, torch.Tensor]:
    """A checkpoint's snapshot tensors (`name/param` keys), empty when it has none."""
    weights = path / "snapshots.safetensors"
    return load_file(str(weights)) if weights.exists() else {}


def latest_checkpoint(directory: Path) -> Optional[Path]:
    found = sorted(p for p in directory.glob(f"{PREFIX}*") if (p / "state.json").exists())
    return found[-1] if found else None


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generators: Dict[str, torch.Generator]) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Restore model, optimizer and RNG states in place; return (trainer state, snapshot tensors).

    Raises `ValueError` naming the checkpoint, before anything is restored, when it lacks the state of one of the
    run's random generators (written by an older version or a differently launched run): resuming without it would
    silently change the run's random streams."""
    state = json.loads((path / "state.json").read_text())
    rng = load_file(str(path / "rng.safetensors"))
    missing = sorted(name for name in generators if f"generator.{name}" not in rng)
    if missing:
        raise ValueError(f"checkpoint {path} holds no state for the random generator(s) {missing} this run uses "
                         f"(it has {sorted(k.removeprefix('generator.') for k in rng if k.startswith('generator.'))});"
                         f" it was written by an older diffrl-bench or a differently launched run. Resume it with "
                         f"that setup, or start afresh in another output_dir")
    load_model_weights(path, model)
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
    for name, g in generators.items():
        g.set_state(rng[f"generator.{name}"])
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda.")]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state["trainer"], load_snapshot_weights(path)
