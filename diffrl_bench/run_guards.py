"""Checks that stop a run before it goes silently wrong: the output directory (plain name, writable, locked
against a second `train`), the device, the model path, a resume under a changed config, and non-finite values
during training. Each failure is one error naming the key, file or quantity (docs/errors.md)."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from diffrl_bench.config import ConfigError

RUN_LOCK_FILE = "train.lock"
"""held by the `train` process of a run directory (the sweep's own `.lock` is a different file, so a sweep's
worker running `train` does not wait on itself)"""

# Keys that may change when a run is resumed: they do not alter what the run computes up to its last step.
# Everything else (algorithm, algo.*, optim.*, rollout.*, reward components/options, seed, model, data, ...) is
# compared with the run's config.yaml and a change is refused, naming the keys.
RESUME_MAY_CHANGE = (
    "name", "output_dir",
    "train.steps", "train.budget_gpu_hours", "train.budget_nfe", "train.budget_flops", "train.threads",
    "eval.every", "eval.images_per_prompt", "eval.sampler", "eval.extra_samplers", "eval.rewards", "eval.batch_size",
    "eval.grid_prompts", "eval.seed",
    "checkpoint.every", "checkpoint.keep_last", "checkpoint.resume",
    "reward.worker", "reward.timeout_s",
    "tracker", "log",
)


class RunStopped(RuntimeError):
    """A run stopped on a value it cannot continue from (a non-finite loss, gradient norm or training metric, on any
    process); nothing of that step was saved."""


# ------------------------------------------------------------------------------------------- output directory
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.+=,@-]+$")


def check_run_name(name: str) -> None:
    """`name` is a folder under results/runs: a plain name, so `../x` or `a/b` cannot write elsewhere."""
    if not _PLAIN_NAME.match(str(name)) or name in (".", ".."):
        raise ConfigError(f"bad config key 'name': {name!r} is not a plain folder name (letters, digits, and "
                          f"_ . + = , @ -; no '/' or '..'); to write elsewhere set output_dir")


def prepare_output_dir(out: Path) -> None:
    """Create the run directory, or name it when it cannot be created or written (nothing else was touched)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"output directory {out}: cannot create it ({error.strerror or error})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"output directory {out} is not writable")


def lock_run_dir(out: Path):
    """Hold the run directory's lock (a second `train` on the same directory is refused at once). Returns the lock;
    the caller releases it when the run ends."""
    from filelock import FileLock, Timeout

    prepare_output_dir(out)
    lock = FileLock(str(out / RUN_LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"output directory {out} is in use by another train command (it holds "
                          f"{out / RUN_LOCK_FILE}); wait for it to finish or choose another name/output_dir") from None
    return lock


def is_main_launch_process() -> bool:
    """Rank 0 of a `accelerate launch` / torchrun job (or a plain process), known before the accelerator exists."""
    return int(os.environ.get("RANK", "0")) == 0


# ------------------------------------------------------------------------------------------------- device, model
def check_device(device: str, cuda_available: bool) -> None:
    if device == "cuda" and not cuda_available:
        raise ConfigError("bad config key 'train.device': 'cuda' but torch sees no CUDA device on this machine; "
                          "use train.device=cpu or auto")


def looks_like_local_path(path: str) -> bool:
    """A model path meant as a local directory, not a hub id (`org/name`): it starts with / . or ~, has more than
    one '/', or its parent directory exists here."""
    if ":" in path.split("/", 1)[0]:  # builtin:..., random:..., a URL scheme
        return False
    if path.startswith(("/", ".", "~")) or path.count("/") > 1:
        return True
    parent = os.path.dirname(path)
    return bool(parent) and os.path.isdir(parent)


def check_model_path(model_cfg) -> None:
    """A misspelled local model path is named, instead of falling through to a hub download and a network error."""
    path = str(model_cfg.path)
    if looks_like_local_path(path) and not Path(path).expanduser().exists():
        raise ConfigError(f"bad config key 'model.path': {path!r} does not exist (a local path: it starts with "
                          f"/ . or ~, has more than one '/', or its parent folder exists; hub ids are 'org/name')")


# ----------------------------------------------------------------------------------------------- resume checks
def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict):
        flat: Dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        if not tree and prefix:
            flat[prefix[:-1]] = {}
        return flat
    return {prefix[:-1]: tree}


def _allowed(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def changed_keys(saved: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """Keys whose value differs between two resolved configs and that alter results. A key present on one side
    only (the schema gained or lost it between versions) is not compared."""
    a, b = _flatten(saved), _flatten(new)
    return sorted(k for k in a.keys() & b.keys() if a[k] != b[k] and not _allowed(k))


def check_resume_config(out: Path, cfg) -> None:
    """Refuse to resume `out` (which has a checkpoint) under a config that changes the run's results."""
    from diffrl_bench.checkpoint import step_checkpoints
    from diffrl_bench.config import resolved_config

    saved_path = out / "config.yaml"
    if not cfg.checkpoint.resume or not saved_path.exists() or not step_checkpoints(out / "checkpoints"):
        return
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_path))
    except Exception as error:  # noqa: BLE001 - any parse failure is reported with the file
        raise ConfigError(f"{saved_path}: cannot read the run's saved config to compare it before resuming: "
                          f"{str(error).splitlines()[0]}") from None
    new = resolved_config(cfg)
    changed = changed_keys(saved, new)
    if changed:
        a, b = _flatten(saved), _flatten(new)
        detail = ", ".join(f"{k}: {a[k]!r} -> {b[k]!r}" for k in changed)
        raise ConfigError(f"output directory {out} holds a run with a different config; resuming would mix two "
                          f"runs. Changed: {detail}. Only {', '.join(RESUME_MAY_CHANGE)} may change on resume; "
                          f"use another name/output_dir, or checkpoint.resume=false in a new directory")


# --------------------------------------------------------------------------------------------- non-finite values
NOT_SAVED = "no checkpoint holds these weights (the newest checkpoint is the last good state)"


def stop_on_sigterm() -> None:
    """SIGTERM (a scheduler's cancel, `kill`) stops `train` or `sweep` like Ctrl-C: at once, through its cleanup (the
    reward worker, the run directory's lock; a local sweep's jobs, which would otherwise run on unseen), leaving the
    newest checkpoint as it is (checkpoints are written to a temporary folder and renamed, so none is ever
    half-written under its final name)."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def non_finite(value: float, quantity: str) -> Optional[str]:
    """`quantity is nan` when `value` is not finite, else None (the problem a process reports to the others)."""
    return None if math.isfinite(value) else f"{quantity} is {value}"


def stop_before_update(step: int, problems: Sequence[str]) -> None:
    """Stop the run at non-finite values found before the optimizer applies them (every process has the same
    `problems`: Processes.failures), so the weights never take them and nothing is saved."""
    if problems:
        raise RunStopped(f"step {step}: {'; '.join(problems)}; the run stops before the optimizer step, so "
                         f"{NOT_SAVED}")


NAN_BY_DESIGN: Dict[str, str] = {}
"""training-row metrics that may be non-finite by design, each with the reason; every other numeric metric of a
training row must be finite (`non_finite_metrics`). Empty: no training-row metric of the nine toy presets is
non-finite in 2-step runs on the toy base, nor on a random model whose rewards are all 0 (every group of zero
variance); a group of one image, whose std is undefined, is refused by config validation (K >= 2)."""


def non_finite_metrics(row: Dict[str, Any]) -> Optional[str]:
    """The non-finite numeric metrics of a training row, named (`metric 'loss/kl' is nan, ...`), or None."""
    bad = [f"metric {key!r} is {value}" for key, value in row.items()
           if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value)
           and key not in NAN_BY_DESIGN]
    return ", ".join(bad) or None


def stop_on_metrics(step: int, problems: Sequence[str]) -> None:
    """Stop the run at non-finite metrics of step `step`'s training row, before the row is written or a checkpoint
    of the step is saved (every process has the same `problems`: Processes.failures)."""
    if problems:
        raise RunStopped(f"step {step}: {'; '.join(problems)}; the run stops before this row is written and before "
                         f"a checkpoint of this step, so {NOT_SAVED}")
