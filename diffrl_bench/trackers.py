"""Experiment trackers (`log.trackers`): mirrors of metrics.jsonl in TensorBoard, W&B, MLflow and the other
trackers accelerate's tracking API offers.

metrics.jsonl stays the source of truth: the Trainer hands every row it appends there to `Trackers.log` as well,
so a tracker shows exactly the rows of the file (non-finite floats are dropped, as metrics.jsonl stores them as
null). Each tracker is an `accelerate.tracking` class, built and started here directly rather than through
`Accelerator(log_with=...)`, so the Trainer can start them after it has its run folder and before any work, and
name the tracker that failed. Only the main process tracks: on the other processes every method is a no-op (a
failure on the main process ends the launch; torchrun/accelerate launch stop the other ranks).

Lifecycle, as the Trainer calls it:

    trackers = Trackers.from_config(cfg.log.trackers, cfg.log.tracker_options, out_dir, main_process)
    trackers.start(run_name, config_dict, run_info_dict, group=sweep_name, tags={"arm": ..., "seed": ...})
    trackers.log(row, step)                    # every row appended to metrics.jsonl
    trackers.log_images("eval/grid_end", grid_png_or_array, step)
    trackers.finish()

Resumed runs: the Trainer redoes the steps after its newest checkpoint and truncates metrics.jsonl, but a tracker
cannot be truncated. `<run>/trackers.json` records the position of the last row the trackers got (step, and its
index among that step's rows: an RL row and an eval row share a step) and the W&B / MLflow run ids; a resumed
attempt continues the same W&B and MLflow runs and skips rows up to that position. Resume is exact (the redone
steps reproduce the same values), so each tracker ends with the rows of metrics.jsonl, each once.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

# tracker name -> (module that must import, what to install). The names are accelerate's `log_with` names.
KNOWN: Dict[str, tuple] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow (or mlflow-skinny)"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "aim": ("aim", "aim"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
    "trackio": ("trackio", "trackio"),
}
# Trackers whose accelerate class has `log_images`; the others get the scalar rows only.
TAKES_IMAGES = ("tensorboard", "wandb", "aim", "clearml", "swanlab")
# In the run folder: what the trackers already hold, so a resumed attempt neither repeats rows nor starts new runs.
STATE_FILE = "trackers.json"


class TrackerError(RuntimeError):
    """A tracker named in `log.trackers` is unknown, not installed, or failed to start; the message names it."""


def check_trackers(names: Sequence[str], options: Optional[Mapping[str, Any]] = None) -> List[str]:
    """Validate `log.trackers` / `log.tracker_options` without starting anything (config load time, every rank).

    Returns the names, lower-cased. Raises TrackerError naming the first unknown or uninstalled tracker, or an
    options key that names no listed tracker (a typo there would otherwise be ignored silently).
    """
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TrackerError(f"log.trackers must be a list of tracker names like [tensorboard, wandb], got {names!r}")
    out: List[str] = []
    for i, name in enumerate(names):
        if not isinstance(name, str) or name.strip().lower() not in KNOWN:
            raise TrackerError(f"log.trackers[{i}] = {name!r}: unknown tracker; known: {sorted(KNOWN)}")
        key = name.strip().lower()
        if key in out:
            raise TrackerError(f"log.trackers[{i}] = {name!r}: listed twice")
        module, package = KNOWN[key]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(f"log.trackers: {key!r} needs the package {package}, which is not installed "
                               f"(pip install 'diffrl-bench[trackers]' or pip install {package.split()[0]})")
        out.append(key)
    options = dict(options or {})
    for key, value in options.items():
        if key not in out:
            raise TrackerError(f"log.tracker_options has an entry for {key!r}, which is not in log.trackers {out}")
        if not isinstance(value, Mapping):
            raise TrackerError(f"log.tracker_options.{key} must be a mapping of keyword options, got {value!r}")
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested config -> {"a.b.c": scalar}; lists and other values become JSON text (hparams take scalars only)."""
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is None:
            # TensorBoard's hparams refuse None; "None" is also what YAML readers of config.yaml would show.
            flat[name] = "None"
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def scalar_row(row: Mapping[str, Any]) -> Dict[str, Any]:
    """The row as metrics.jsonl stores it, minus what a tracker cannot plot: nulls and non-finite floats."""
    out: Dict[str, Any] = {}
    for key, value in row.items():
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            continue
        out[key] = int(value) if isinstance(value, bool) else value
    return out


def to_uint8_hwc(image: Any):
    """Image file path, PIL image, (H, W, 3|4|1) or (H, W) array, uint8 or float in [0, 1] -> uint8 (H, W, 3)."""
    import numpy as np

    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as picture:
            return np.asarray(picture.convert("RGB"), dtype=np.uint8)
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image must be PIL or an (H, W[, C]) array with C in 1, 3, 4; got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array[:, :, :3]


def _wandb_id() -> str:
    # W&B's own id format (8 lowercase letters and digits); chosen here so it can be stored before the run starts.
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class Trackers:
    """The run's trackers (possibly none). Only the main process does anything."""

    def __init__(self, names: Sequence[str], options: Optional[Mapping[str, Any]], out_dir: Path | str,
                 main_process: bool = True):
        self.names = check_trackers(names, options)
        self.options = {k: dict(v) for k, v in (options or {}).items()}
        self.out_dir = Path(out_dir)
        self.main_process = main_process
        self._live: Dict[str, Any] = {}
        self._state: Dict[str, Any] = {}
        # (step, index of the row among that step's rows) of the last row the trackers got, and of the last seen
        self._logged: Tuple[int, int] = (-1, -1)
        self._seen: Tuple[int, int] = (-1, -1)
        self._skipped = False

    @classmethod
    def from_config(cls, names, options, out_dir, main_process: bool = True) -> "Trackers":
        return cls(list(names or []), options, out_dir, main_process)

    @property
    def active(self) -> List[str]:
        return list(self._live)

    # -------------------------------------------------------------------------------------------- start
    def _build(self, name: str, run_name: str, group: Optional[str], tags: Dict[str, str]):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        opts = dict(self.options.get(name, {}))
        if name not in LOGGER_TYPE_TO_CLASS:
            import accelerate

            raise TrackerError(f"log.trackers: {name!r} needs a newer accelerate than {accelerate.__version__}")
        cls = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":
            # accelerate writes to logging_dir/run_name; the run folder already names the run.
            return cls(opts.pop("subdir", "tensorboard"), self.out_dir, **opts)
        if name == "wandb":
            # accelerate passes its first argument to wandb.init as the project. A resumed attempt continues the
            # same W&B run (its id is kept in trackers.json).
            opts.setdefault("id", self._state.get("ids", {}).get("wandb") or _wandb_id())
            opts.setdefault("resume", "allow")
            project = opts.pop("project", group or "diffrl-bench")
            opts.setdefault("name", run_name)
            opts.setdefault("dir", str(self.out_dir))
            if group:
                opts.setdefault("group", group)
            if tags:
                opts.setdefault("tags", [f"{k}={v}" for k, v in tags.items()])
            return cls(project, **opts)
        if name == "mlflow":
            tracking_uri = opts.pop("tracking_uri", None)
            if tracking_uri:
                import mlflow

                mlflow.set_tracking_uri(tracking_uri)
            if self._state.get("ids", {}).get("mlflow"):
                opts.setdefault("run_id", self._state["ids"]["mlflow"])
            return cls(experiment_name=opts.pop("experiment_name", group or "diffrl-bench"), run_name=run_name,
                       tags={**({"group": group} if group else {}), **tags}, **opts)
        if name == "aim":
            return cls(run_name, opts.pop("logging_dir", str(self.out_dir)), **opts)
        if name == "comet_ml":
            return cls(opts.pop("project_name", group or "diffrl-bench"), **opts)
        # clearml, dvclive, swanlab, trackio: run name first, the rest as the tracker's own keyword options.
        return cls(run_name, **opts)

    def start(self, run_name: str, config: Mapping[str, Any], run_info: Optional[Mapping[str, Any]] = None,
              group: Optional[str] = None, tags: Optional[Mapping[str, Any]] = None) -> None:
        """Start every tracker and record the resolved config and run_info.json; call before any work.

        `group` is the sweep name (W&B group, MLflow experiment); `tags` e.g. {"arm": ..., "seed": ...}.
        On failure the trackers already started are finished and TrackerError names the one that failed.
        """
        if not self.main_process or not self.names:
            return
        from accelerate import PartialState

        # accelerate's tracker classes log through accelerate's logger, which needs the process state; the Trainer's
        # Accelerator has made it already (call start after building it), a bare script gets a one-process state.
        PartialState()
        self._state = self._read_state()
        logged = self._state.get("logged")
        self._logged = (int(logged[0]), int(logged[1])) if logged else (-1, -1)
        self._seen = (-1, -1)
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        hparams = flatten(config)
        if run_info:
            hparams.update(flatten(run_info, "run_info."))
        hparams.update({f"tag.{k}": v for k, v in tags.items()})
        for name in self.names:
            try:
                tracker = self._build(name, run_name, group, tags)
                if hasattr(tracker, "start"):  # accelerate < 1.4 starts trackers in __init__
                    tracker.start()
                self._live[name] = tracker
                tracker.store_init_configuration(hparams)
            except Exception as error:  # noqa: BLE001 - any failure here must stop the run, naming the tracker
                try:
                    self.finish()
                except TrackerError:
                    pass  # the start failure is the error worth reporting
                raise TrackerError(f"log.trackers: {name!r} failed to start ({type(error).__name__}: {error}); "
                                   f"check log.tracker_options.{name}") from error
        self._state["ids"] = {**self._state.get("ids", {}), **self._run_ids()}
        self._write_state()

    # -------------------------------------------------------------------------------------------- resume state
    def _read_state(self) -> Dict[str, Any]:
        path = self.out_dir / STATE_FILE
        if not path.exists():
            return {}
        try:
            state = json.loads(path.read_text())
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
            return state
        except (OSError, ValueError) as error:
            raise TrackerError(f"{path} is unreadable ({error}); delete it to start new tracker runs") from None

    def _write_state(self) -> None:
        from diffrl_bench.fileio import atomic_write

        self._state["logged"] = list(self._logged)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out_dir / STATE_FILE, json.dumps(self._state, indent=2))

    def _run_ids(self) -> Dict[str, str]:
        ids = {}
        if "wandb" in self._live and getattr(self._live["wandb"], "run", None) is not None:
            ids["wandb"] = str(self._live["wandb"].run.id)
        if "mlflow" in self._live and getattr(self._live["mlflow"], "active_run", None) is not None:
            ids["mlflow"] = str(self._live["mlflow"].active_run.info.run_id)
        return ids

    # -------------------------------------------------------------------------------------------- logging
    def log(self, row: Mapping[str, Any], step: int) -> None:
        """One metrics.jsonl row (the same dict the Trainer appended there). A row the trackers got in an earlier
        attempt of the run (a resumed run redoing steps) is skipped."""
        if not self._live:
            return
        step = int(step)
        self._seen = (step, self._seen[1] + 1 if self._seen[0] == step else 0)
        self._skipped = self._seen <= self._logged
        if self._skipped:
            return
        values = scalar_row(row)
        for tracker in self._live.values():
            tracker.log(values, step=step)
        self._logged = self._seen
        self._write_state()

    def log_images(self, name: str, image: Any, step: int) -> None:
        """One image (e.g. an eval grid) to the trackers that take images; the others skip it. Log it after its
        step's row: an image whose row was skipped (an earlier attempt logged both) is skipped too."""
        if not self._live or (self._skipped and int(step) == self._seen[0]):
            return
        array = to_uint8_hwc(image)
        for key, tracker in self._live.items():
            if key not in TAKES_IMAGES:
                continue
            if key == "tensorboard":
                tracker.log_images({name: array[None]}, step=int(step), dataformats="NHWC")
            else:
                tracker.log_images({name: [array]}, step=int(step))

    def finish(self) -> None:
        """Close every started tracker (idempotent); errors while closing are collected and raised once."""
        errors = []
        while self._live:
            key, tracker = self._live.popitem()
            try:
                tracker.finish()
            except Exception as error:  # noqa: BLE001 - close the others first
                errors.append(f"{key}: {type(error).__name__}: {error}")
        if errors:
            raise TrackerError("log.trackers failed to finish: " + "; ".join(errors))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()
        return False
