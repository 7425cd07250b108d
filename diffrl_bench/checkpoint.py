"""Checkpoints that resume a run exactly: model, optimizer, snapshots, RNG states, data position and ledger.

Tensors are stored with safetensors and everything else as JSON; nothing is unpickled on load. A checkpoint
directory is written under a temporary name and renamed when complete, so an interrupted save never leaves a
half-written checkpoint behind.

A checkpoint damaged afterwards (a truncated file, a broken state.json, a deleted file: disk trouble, a copy cut
short) is caught by its manifest: `manifest.json`, written last, lists every file with its size and SHA-256.
Loading verifies the files it reads against it and raises `CheckpointError` naming the damaged file;
`newest_intact_checkpoint` skips damaged checkpoints (logging which and why) and returns the newest intact one.
Checkpoints written before manifests existed still load: they are checked structurally instead (every required
file present, state.json parses, each safetensors file as long as its header says).

Under DeepSpeed the engine's own files (model and optimizer shards, torch pickles) sit in the `deepspeed/` folder
(diffrl_bench/ds_checkpoint.py) and are listed in the manifest like the rest, by relative path. Unpickling runs
code, so those are held to more than damage checks: a checkpoint with a `deepspeed/` folder but no manifest, a
file there that the manifest does not list, or a link, is refused as well, with the file named.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import struct
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("diffrl_bench")

PREFIX = "step_"
MANIFEST = "manifest.json"
STALE_PREFIX = "stale_"
ENGINE_DIR = "deepspeed"
"""the folder of a checkpoint that holds DeepSpeed's own (pickled) files"""
REQUIRED = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
"""the files every checkpoint has (snapshots.safetensors only when the run keeps snapshots)"""


class CheckpointError(ValueError):
    """A checkpoint is damaged or incomplete; the message names the checkpoint and the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(path: Path) -> None:
    """Record every file of the checkpoint directory `path` (name, size, SHA-256); called after all are written."""
    files = {f.relative_to(path).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(path.rglob("*")) if f.is_file() and f.relative_to(path).as_posix() != MANIFEST}
    (path / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1))


def _read_manifest(path: Path) -> Optional[dict]:
    file = path / MANIFEST
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and {"bytes", "sha256"} <= set(v)
                                                  for v in files.values()):
            raise ValueError("'files' is not a table of {bytes, sha256}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint {path} is damaged: {MANIFEST} is unreadable ({error})") from None
    return files


def _check_safetensors(file: Path) -> Optional[str]:
    """Why a safetensors file is structurally broken (too short for its header's tensors), or None."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"{size} bytes, but its header alone claims {length + 8}"
        try:
            header = json.loads(handle.read(length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            return f"its header is unreadable ({error})"
    if 8 + length + end != size:
        return f"{size} bytes, but its header describes {8 + length + end} (truncated or overwritten)"
    return None


def _check_state_json(file: Path) -> Optional[str]:
    try:
        state = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        return f"not valid JSON ({error})"
    missing = [key for key in ("step", "trainer", "optimizer", "numpy_rng", "python_rng") if key not in state]
    return f"lacks {missing}" if missing else None


def _check_engine_files(path: Path, listed: Optional[dict]) -> None:
    """Every file under `deepspeed/` is a plain file (no link) that the manifest lists: nothing else is unpickled."""
    folder = path / ENGINE_DIR
    if not folder.exists() and not folder.is_symlink():
        return
    if listed is None:
        raise CheckpointError(f"checkpoint {path} has DeepSpeed files ({ENGINE_DIR}/) but no {MANIFEST}: refusing "
                              f"to unpickle files whose SHA-256 the run did not record")
    for file in [folder, *sorted(folder.rglob("*"))]:
        name = file.relative_to(path).as_posix()
        if file.is_symlink() or not (file.is_file() or file.is_dir()):
            raise CheckpointError(f"checkpoint {path}: {name} is a link or a special file; only files the run "
                                  f"wrote itself are loaded")
        if file.is_file() and name not in listed:
            raise CheckpointError(f"checkpoint {path}: {name} is not in its {MANIFEST}; refusing to load a file "
                                  f"the run did not write (remove it to resume)")


def verify_checkpoint(path: Path, files: Optional[Iterable[str]] = None) -> None:
    """Raise `CheckpointError` naming the first damaged file among `files` (default: the whole checkpoint).

    With a manifest: each file must exist with its recorded size and SHA-256, and the required files must be
    listed. Without one (checkpoints written before manifests): the structural checks of the module docstring.
    DeepSpeed files are checked whenever there are any (`_check_engine_files`), whatever `files` says."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    listed = _read_manifest(path)
    _check_engine_files(path, listed)
    if listed is None:
        names = list(files) if files is not None else [*REQUIRED, *(["snapshots.safetensors"]
                                                                    if (path / "snapshots.safetensors").exists() else [])]
    else:
        names = list(files) if files is not None else sorted(set(listed) | set(REQUIRED))
    for name in names:
        file = path / name
        optional = name == "snapshots.safetensors"
        if listed is not None:
            if name not in listed:
                if optional and not file.exists():
                    continue
                raise CheckpointError(f"checkpoint {path} is damaged: {name} is not in its {MANIFEST}")
            entry = listed[name]
            if file.is_symlink():
                raise CheckpointError(f"checkpoint {path}: {name} is a link; only files the run wrote are loaded")
            if not file.is_file():
                raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing")
            size = file.stat().st_size
            if size != entry["bytes"]:
                raise CheckpointError(f"checkpoint {path} is damaged: {name} has {size} bytes, {MANIFEST} records "
                                      f"{entry['bytes']}")
            if _sha256(file) != entry["sha256"]:
                raise CheckpointError(f"checkpoint {path} is damaged: {name} does not match its SHA-256 in "
                                      f"{MANIFEST} (same size, different content)")
            continue
        if not file.is_file():
            if optional:
                continue
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing")
        why = _check_state_json(file) if name.endswith(".json") else _check_safetensors(file)
        if why is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {name}: {why}")


def step_checkpoints(directory: Path) -> list:
    """A run's step checkpoints, oldest first (temporary and set-aside directories excluded)."""
    directory = Path(directory)
    return sorted(p for p in directory.glob(f"{PREFIX}*") if p.is_dir()) if directory.is_dir() else []


def newest_intact_checkpoint(directory: Path) -> Optional[Path]:
    """The newest checkpoint that verifies, skipping (and logging) damaged newer ones; None when there is none."""
    for path in reversed(step_checkpoints(directory)):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            log.warning("skipping a damaged checkpoint: %s; falling back to an older one", error)
            continue
        return path
    return None


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


def save_checkpoint(directory: Path, step: int, *, model, optimizer: Optional[torch.optim.Optimizer],
                    snapshots: Dict[str, torch.Tensor], generators: Dict[str, torch.Generator],
                    trainer_state: dict, keep_last: int = 2, engine_state: Optional[Path] = None) -> Path:
    """`model`: the module or its (whole) state dict. Under DeepSpeed, `optimizer` is None and `engine_state` the
    folder the engine wrote (model and optimizer shards, ds_checkpoint.py), moved in as `deepspeed/`; the optimizer
    file is then empty."""
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(directory, step)
    tmp = directory / f".tmp_{PREFIX}{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = model if isinstance(model, dict) else model.state_dict()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    if snapshots:
        save_file(snapshots, str(tmp / "snapshots.safetensors"))
    if engine_state is not None:
        shutil.move(str(engine_state), str(tmp / ENGINE_DIR))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict() if optimizer is not None
                                               else {"param_groups": [], "state": {}})
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
    write_manifest(tmp)  # last: a manifest vouches only for files already complete
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    # Checkpoints of later steps are left from an attempt this run fell back from (one was damaged): kept for
    # inspection under another name, so that pruning below counts only this run's own checkpoints.
    for later in step_checkpoints(directory):
        if later.name > final.name:
            aside = later.with_name(STALE_PREFIX + later.name)
            if aside.exists():
                shutil.rmtree(aside)
            later.rename(aside)
            log.warning("moved %s (a later step than the checkpoint just saved) aside to %s", later, aside.name)
    for old in step_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def load_model_weights(path: Path, model: torch.nn.Module, verify: bool = True) -> None:
    """Only the trained weights of a checkpoint (theta: the whole network, or its LoRA adapter), for evaluation.
    The file is verified first (`verify=False`: the caller verified the whole checkpoint already)."""
    path = Path(path)
    weights = path / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{path} is not a checkpoint: it has no model.safetensors")
    if verify:
        verify_checkpoint(path, ["model.safetensors"])
    model.load_state_dict(load_file(str(weights)))


def load_snapshot_weights(path: Path, verify: bool = True) -> Dict[str, torch.Tensor]:
    """A checkpoint's snapshot tensors (`name/param` keys), empty when it has none."""
    weights = Path(path) / "snapshots.safetensors"
    if not weights.exists():
        return {}
    if verify:
        verify_checkpoint(path, ["snapshots.safetensors"])
    return load_file(str(weights))


def latest_checkpoint(directory: Path) -> Optional[Path]:
    """The newest checkpoint, damaged or not (loading it names a damaged file); see `newest_intact_checkpoint`."""
    found = sorted(p for p in directory.glob(f"{PREFIX}*") if (p / "state.json").exists())
    return found[-1] if found else None


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generators: Dict[str, torch.Generator], engine: bool = False) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Restore model, optimizer and RNG states in place; return (trainer state, snapshot tensors).

    `engine=True` (a DeepSpeed run): model and optimizer are left to `ds_checkpoint.load_engine_state`, and the
    checkpoint must have been written by a DeepSpeed run (and the other way round), or `ValueError` names it.

    Raises `CheckpointError` naming the file, before anything is restored, when a file is damaged
    (`verify_checkpoint`), and `ValueError` naming the checkpoint when it lacks the state of one of the run's
    random generators (written by an older version or a differently launched run): resuming without it would
    silently change the run's random streams."""
    path = Path(path)
    verify_checkpoint(path)
    state = json.loads((path / "state.json").read_text())
    rng = load_file(str(path / "rng.safetensors"))
    missing = sorted(name for name in generators if f"generator.{name}" not in rng)
    if missing:
        raise ValueError(f"checkpoint {path} holds no state for the random generator(s) {missing} this run uses "
                         f"(it has {sorted(k.removeprefix('generator.') for k in rng if k.startswith('generator.'))});"
                         f" it was written by an older diffrl-bench or a differently launched run. Resume it with "
                         f"that setup, or start afresh in another output_dir")
    if (path / ENGINE_DIR).is_dir() != engine:
        written, now = ("under", "without") if not engine else ("without", "under")
        raise ValueError(f"checkpoint {path} was written {written} DeepSpeed and this run is launched {now} it: its "
                         f"optimizer state cannot carry over. Resume it launched as it was, or start afresh in "
                         f"another output_dir")
    if not engine:
        load_model_weights(path, model, verify=False)
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")),
                                                       state["optimizer"]))
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
    return state["trainer"], load_snapshot_weights(path, verify=False)
