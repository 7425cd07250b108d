"""Structured run configuration (omegaconf dataclasses), loading, overrides and validation.

A run is described by one `RunConfig`. YAML files and `key=value` dot-list overrides are merged onto the schema;
an unknown key or a value of the wrong type stops the run before any work, with the key path in the message.
The `algo` section is validated against the chosen algorithm's own config dataclass.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration problem, reported with the offending key path."""


@dataclass
class ModelConfig:
    backend: str = "toy_unet"
    """registered model backend (`diffrl-bench list` shows them)"""
    path: str = "builtin:toy_base"
    """weights: a local directory or hub id; `builtin:toy_base` is the pretrained toy base shipped with the package;
    `random:<preset>` builds a real architecture with random weights (sd3: sd35m, tiny; flux: flux1-dev, ...)"""
    options: Dict[str, Any] = field(default_factory=dict)
    """backend options, e.g. for sd3/flux: finetune (lora|full), lora_rank, lora_alpha, resolution, dtype,
    gradient_checkpointing (docs/backends.md); the toy backend takes none"""


@dataclass
class DataConfig:
    train_prompts: str = "toy:train"
    """training prompts: `toy:train|heldout|all`, `geneval:PATH` (or a `.jsonl` path: GenEval metadata),
    `ocr:PATH` (one prompt a line with a quoted target), `lines:PATH` (or a `.txt` path: one prompt a line)"""
    eval_prompts: str = "toy:heldout"
    """held-out evaluation prompts, same forms"""


@dataclass
class SamplerConfig:
    name: str = "dpm2"
    """registered sampler: `euler` (ODE), `dpm2` (DPM-Solver++(2M)), `flow_grpo_sde`, or `diffusers` (any diffusers
    scheduler by class name, `options.scheduler`; diffrl_bench/diffusers_sampler.py)"""
    num_steps: int = 10
    """solver steps"""
    shift: float = 1.0
    """timestep shift of the flow sigma grid (SD3 uses 3.0; the 16 px toy model uses 1.0)"""
    grid: str = "flow"
    """sigma grid (`sampling.GRIDS`): `flow` (the flow-matching Euler scheduler's, starts at 1) or `dpm_flow`
    (diffusers' DPM-Solver scheduler with flow sigmas, starts at shift(0.999): DGPO's rollouts)"""
    cfg_scale: float = 1.0
    """classifier-free guidance scale; 1.0 disables CFG (one model call per step)"""
    options: Dict[str, Any] = field(default_factory=dict)
    """the sampler's own keyword options, e.g. for `flow_grpo_sde`: noise_level, sde_type, window_size, window_range, shared_prefix"""


@dataclass
class RolloutConfig:
    prompts_per_step: int = 4
    """distinct prompts per RL step"""
    images_per_prompt: int = 8
    """group size K: images per prompt"""
    chunk_size: int = 16
    """images sampled per model call; rewards of one chunk run while the next is sampled"""
    same_noise_per_group: bool = False
    """give every image of a group the same initial noise"""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """the solver used for training rollouts"""


@dataclass
class RewardConfig:
    components: Dict[str, float] = field(default_factory=dict)
    """reward name -> weight; the training reward is the weighted sum, each component is logged"""
    options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    """reward name -> constructor options"""
    worker: str = "thread"
    """`thread`: score off the main thread, overlapping the next rollout chunk; `inline`: score in place"""
    server_devices: int = 0
    """GPUs held by an external reward server (e.g. the GenEval server); the ledger charges them for the budget phases"""
    timeout_s: float = 600.0
    """seconds one scoring call may take before the run stops naming the reward; <= 0: no limit"""


@dataclass
class AdvantageConfig:
    std: str = "global"
    """normaliser of group-relative advantages: `global` (std of all rewards of the step) or `group`"""
    clip: float = 5.0
    """not read by the harness: each algorithm clips with its own option (e.g. `algo.adv_clip_max`); kept so older
    run configs load, and any value other than 5.0 is refused rather than silently ignored"""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """AdamW learning rate"""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    eps: float = 1e-8
    """AdamW epsilon"""
    grad_clip: float = 1.0
    """max gradient norm; 0 disables clipping"""


@dataclass
class TrainConfig:
    """How an RL run trains: its length and budgets, how each rollout batch is cut into optimizer steps and
    micro-batches, the seed of its random streams, and the device and precision it runs on."""

    steps: int = 300
    """RL steps (one rollout batch and its optimizer updates each)"""
    budget_gpu_hours: float = 0.0
    """also stop once the budget phases (rollout, reward, train) have spent this many device-hours; 0: no limit"""
    budget_nfe: int = 0
    """also stop once the budget phases have spent this many network function evaluations; 0: no limit"""
    budget_flops: float = 0.0
    """also stop once the budget phases have spent this many model FLOPs (diffrl_bench/flops.py); 0: no limit.
    Unlike device-hours it does not depend on how busy a shared machine is. A float: budgets run to 1e18 and beyond"""
    optimizer_steps_per_rollout: int = 1
    """optimizer steps per rollout batch; the batch is split evenly"""
    shuffle: bool = True
    """shuffle the rollout batch before splitting it into optimizer steps and micro-batches; false keeps the
    rollout's order (with micro_batch_size == rollout.chunk_size, the rollout's exact batch layout)"""
    micro_batch_size: int = 8
    """training inputs per forward/backward (for forward-process losses: (sample, time) pairs); gradients accumulate up to one optimizer step"""
    seed: int = 0
    """seeds the model-independent randomness (prompts, noise, timesteps)"""
    mixed_precision: str = "auto"
    """`auto` (fp32 on CPU, bf16 on GPU), `no`, `bf16` or `fp16`"""
    allow_tf32: bool = False
    """on CUDA, let fp32 matmuls and convolutions use TF32 (set at the start of the run; false leaves torch's
    defaults); for `mixed_precision: no` runs whose original did so (the ELBO-PG authors' fp32 + TF32)"""
    threads: int = 0
    """torch intra-op threads on CPU; 0: auto (the cores this process may use, capped by OMP_NUM_THREADS and
    torch's default); never more than the available cores nor a sweep executor's share (diffrl_bench/threads.py)"""
    device: str = "auto"
    """`auto`, `cpu` or `cuda`"""
    compile: str = "off"
    """torch.compile the policy's networks: `off`, `on`, or `auto` (on for runs of at least `compile_min_steps`
    steps when a C++ compiler is present); off in every shipped preset (diffrl_bench/compile.py)"""
    compile_min_steps: int = 320
    """`compile: auto` compiles runs of at least this many RL steps: the break-even measured on a 2-core AMD EPYC
    (compilation 6-8.6 min, compiled step 0.83x); `benchmarks/speed.py --compile` measures it on another machine"""


@dataclass
class EvalConfig:
    every: int = 50
    """evaluate every this many RL steps, and at the start and the end; 0: start and end only; -1: never"""
    images_per_prompt: int = 32
    """images per held-out prompt (fixed noise, so curves are paired across steps and runs)"""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """the solver used for evaluation"""
    extra_samplers: Dict[str, SamplerConfig] = field(default_factory=dict)
    """more solvers to evaluate with, by name, e.g. `{euler: {name: euler}}`: each samples the same prompts from the
    same noise after the main evaluation and logs under `eval_<name>/` (outside the budget, like every eval). An
    arm trained through one solver family can then be read with it as well as with the common one (Flow-DPPO:
    docs/reports.md, "Claims"); a report or claim names such a column in full (`eval_euler/toy_geneval...`).
    Keys not given take the defaults above (dpm2, 10 steps, shift 1.0), not `eval.sampler`'s: write `num_steps`
    and `shift` out (or `${eval.sampler.num_steps}`) where the main evaluation uses others"""
    rewards: List[str] = field(default_factory=lambda: ["toy_geneval", "toy_naturalness", "toy_no_extra_objects"])
    """rewards scored at eval: the training reward and held-out ones (a gap exposes reward hacking)"""
    batch_size: int = 256
    """images per sampling call at eval"""
    grid_prompts: int = 8
    """held-out prompts shown in the image grids (4 images each)"""
    seed: int = 1234
    """seeds the evaluation noise, identical for every run"""
    ema_decay: float = 0.0
    """when > 0, evaluate (and export) an exponential moving average of theta's weights instead of theta, as the
    originals do (Flow-GRPO: 0.9): the `eval_ema` snapshot, moved towards theta with decay
    `min(ema_decay, (1 + n) / (10 + n))` after every `ema_every`-th optimizer step n (by default; the `ema_*`
    keys below set the originals' other clocks)"""
    ema_every: int = 1
    """units (`ema_unit`) between updates of the evaluation EMA (Flow-GRPO: 8 optimizer steps; CRD: 10 RL steps)"""
    ema_unit: str = "optimizer_step"
    """what `ema_every` counts: `optimizer_step` or `rl_step` (Flow-Factory's CRD steps its EMA once per RL step,
    the warm-up counting RL steps too); diffrl_bench/eval_ema.py states the whole rule"""
    ema_phase: int = 0
    """update after the c-th unit when (c + ema_phase) % ema_every == 0; Flow-GRPO's `(n + 1) % 8` is phase 1"""
    ema_warmup_offset: int = 0
    """the warm-up counter is n = c + ema_warmup_offset; -1 counts from 0 as Flow-Factory's 0-based RL step"""
    ema_updates_per_event: int = 1
    """moves towards theta per update (Flow-GRPO: 2, one per micro-batch at the same optimizer step)"""


@dataclass
class CheckpointConfig:
    every: int = 50
    """save a checkpoint every this many RL steps (and at the end); 0 disables"""
    keep_last: int = 2
    """checkpoints kept on disk"""
    resume: bool = True
    """continue from the newest checkpoint in the output directory if there is one"""


@dataclass
class LogConfig:
    trackers: List[str] = field(default_factory=list)
    """experiment trackers that mirror metrics.jsonl (which stays the source of truth): any of tensorboard, wandb,
    mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio (accelerate's tracker names); each needs its package
    (pip install 'diffrl-bench[trackers]' for tensorboard, wandb, mlflow)"""
    tracker_options: Dict[str, Any] = field(default_factory=dict)
    """per tracker, its keyword options, e.g. {wandb: {project: my-project, entity: my-team, mode: offline},
    mlflow: {tracking_uri: "http://localhost:5000"}, tensorboard: {subdir: tensorboard}}"""
    group: str = ""
    """groups runs in the trackers (W&B group and default project, MLflow experiment); sweeps set the sweep name"""
    tags: Dict[str, str] = field(default_factory=dict)
    """tags for the trackers; sweeps set {arm: <arm>, seed: <seed>}"""


@dataclass
class RunConfig:
    name: str = "run"
    """run name (used in the default output directory)"""
    output_dir: str = ""
    """results folder; empty means results/runs/<name>"""
    algorithm: str = "nft"
    """registered algorithm (objective plugin)"""
    algo: Dict[str, Any] = field(default_factory=dict)
    """options of the chosen algorithm, validated against its config dataclass"""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _explain(error: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(error, "full_key", None) or "?"
    reason = str(error).splitlines()[0]
    return ConfigError(f"{source}: bad config key '{key}': {reason}")


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped config (`toy_nft` -> diffrl_bench/configs/toy_nft.yaml)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a shipped config ({known})")


def load_config(name_or_path: Optional[str] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema <- YAML file <- dot-list overrides, then validation of the algorithm section."""
    # Merged into in place: `OmegaConf.merge` deep-copies the whole tree on every call, which made a sweep's
    # check of its runs (about 30 overrides each) take seconds per run.
    merged = OmegaConf.structured(RunConfig)
    if name_or_path:
        path = resolve_config_path(name_or_path)
        try:
            merged.merge_with(OmegaConf.load(path))
        except OmegaConfBaseException as error:
            raise _explain(error, str(path)) from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        try:
            merged.merge_with(OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as error:
            raise _explain(error, f"override {override!r}") from None
    validate(merged)
    return merged


_SAMPLER_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def validate(cfg: DictConfig) -> None:
    """Checks beyond types: choices, ranges, and the algorithm's own options."""
    from diffrl_bench.registry import ALGORITHMS, MODELS, REWARDS, SAMPLERS
    from diffrl_bench.sampling import GRIDS, MODEL_TIMES

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"bad config key '{key}': {message}")

    from diffrl_bench.registry import PluginError

    def available(registry, name: str, key: str) -> bool:
        """`name in registry` is also true for a broken plugin's name: ask for it, so its failure is named here."""
        if name not in registry:
            return False
        try:
            registry.get(name)
        except PluginError as error:
            raise ConfigError(f"bad config key '{key}': {error}") from None
        return True

    if not cfg.output_dir:
        from diffrl_bench.run_guards import check_run_name

        check_run_name(cfg.name)
    need(available(ALGORITHMS, cfg.algorithm, "algorithm"), "algorithm", f"unknown algorithm {cfg.algorithm!r}; known: {ALGORITHMS.names()}")
    need(available(MODELS, cfg.model.backend, "model.backend"), "model.backend", f"unknown model backend {cfg.model.backend!r}; known: {MODELS.names()}")
    for name in cfg.eval.extra_samplers:
        # The name becomes a metric namespace (`eval_<name>/...`) and a grid file name.
        need(bool(_SAMPLER_NAME.match(str(name))), f"eval.extra_samplers.{name}",
             "name it with letters, digits and underscores only (it becomes the metric prefix eval_<name>/)")
    sampler_keys = ("rollout.sampler", "eval.sampler", *(f"eval.extra_samplers.{n}" for n in cfg.eval.extra_samplers))
    for key in sampler_keys:
        sampler = OmegaConf.select(cfg, key)
        need(available(SAMPLERS, sampler.name, f"{key}.name"), f"{key}.name", f"unknown sampler {sampler.name!r}; known: {SAMPLERS.names()}")
        need(sampler.num_steps >= 1, f"{key}.num_steps", "must be at least 1")
        need(sampler.shift > 0, f"{key}.shift", "must be positive")
        need(sampler.grid in GRIDS, f"{key}.grid", f"unknown sigma grid {sampler.grid!r}; known: {sorted(GRIDS)}")
        model_time = sampler.options.get("model_time") if "model_time" in sampler.options else None
        need(not isinstance(model_time, str) or model_time in MODEL_TIMES, f"{key}.options.model_time",
             f"unknown model_time {model_time!r}; known: {sorted(MODEL_TIMES)}")
        if sampler.name in SAMPLERS:
            accepted = sampler_options(SAMPLERS.get(sampler.name))
            for option in sampler.options:
                need(option in accepted, f"{key}.options.{option}",
                     f"sampler {sampler.name!r} has no option {option!r}; its options: {sorted(accepted)}")
            # A sampler may check its option values at load time (the diffusers sampler: the scheduler and its config).
            check = getattr(SAMPLERS.get(sampler.name), "check_options", None)
            if check is not None:
                try:
                    check(resolve_sampler_options(sampler))
                except ValueError as error:
                    raise ConfigError(f"bad config key '{key}.options.{getattr(error, 'key', '?')}': "
                                      f"{getattr(error, 'reason', error)}") from None
    for name, weight in cfg.reward.components.items():
        need(available(REWARDS, name, f"reward.components.{name}"), f"reward.components.{name}",
             f"unknown reward; known: {REWARDS.names()}")
        need(isinstance(weight, (int, float)), f"reward.components.{name}", f"weight {weight!r} is not a number")
        need(math.isfinite(weight), f"reward.components.{name}", f"weight {weight} is not a finite number")
    for name in cfg.reward.options:
        need(name in cfg.reward.components, f"reward.options.{name}", "options given for a reward that is not a component")
    for name in cfg.eval.rewards:
        need(available(REWARDS, name, "eval.rewards"), "eval.rewards", f"unknown reward {name!r}; known: {REWARDS.names()}")
    from diffrl_bench.reward_harness import check_reward_options

    for name, options in OmegaConf.to_container(cfg.reward.options).items():
        check_reward_options(name, options)
    need(0 <= cfg.eval.ema_decay < 1, "eval.ema_decay", f"{cfg.eval.ema_decay} is not in [0, 1) (0: evaluate theta)")
    need(cfg.eval.ema_every >= 1, "eval.ema_every", "must be at least 1")
    from diffrl_bench.eval_ema import EMA_UNITS

    need(cfg.eval.ema_unit in EMA_UNITS, "eval.ema_unit", f"{cfg.eval.ema_unit!r} is not one of {list(EMA_UNITS)}")
    need(0 <= cfg.eval.ema_phase < cfg.eval.ema_every, "eval.ema_phase",
         f"{cfg.eval.ema_phase} is not in [0, eval.ema_every = {cfg.eval.ema_every})")
    need(cfg.eval.ema_warmup_offset >= -1, "eval.ema_warmup_offset",
         f"{cfg.eval.ema_warmup_offset} is below -1 (the warm-up counter must start at 0 or later)")
    need(cfg.eval.ema_updates_per_event >= 1, "eval.ema_updates_per_event", "must be at least 1")
    need(cfg.reward.server_devices >= 0, "reward.server_devices", "must be non-negative")
    need(cfg.reward.worker in ("thread", "inline"), "reward.worker", f"{cfg.reward.worker!r} is not 'thread' or 'inline'")
    need(cfg.advantage.std in ("global", "group"), "advantage.std", f"{cfg.advantage.std!r} is not 'global' or 'group'")
    need(cfg.rollout.images_per_prompt >= 2, "rollout.images_per_prompt", "group-relative advantages need K >= 2")
    need(cfg.rollout.prompts_per_step >= 1, "rollout.prompts_per_step", "must be at least 1")
    need(cfg.rollout.chunk_size >= 1, "rollout.chunk_size", "must be at least 1")
    need(cfg.train.steps >= 0, "train.steps", "must be non-negative")
    need(cfg.train.budget_gpu_hours >= 0, "train.budget_gpu_hours", "must be non-negative (0: no limit)")
    need(cfg.train.budget_nfe >= 0, "train.budget_nfe", "must be non-negative (0: no limit)")
    need(cfg.train.budget_flops >= 0, "train.budget_flops", "must be non-negative (0: no limit)")
    need(cfg.train.micro_batch_size >= 1, "train.micro_batch_size", "must be at least 1")
    need(cfg.train.threads >= 0, "train.threads", "must be 0 (auto) or a positive thread count")
    # YAML reads a bare on / off as a boolean, which the str field then holds as "True" / "False".
    cfg.train.compile = {"True": "on", "False": "off"}.get(str(cfg.train.compile), cfg.train.compile)
    need(cfg.train.compile in ("off", "auto", "on"), "train.compile", f"{cfg.train.compile!r} is not off, auto or on")
    need(cfg.train.compile_min_steps >= 0, "train.compile_min_steps", "must be non-negative")
    need(cfg.train.optimizer_steps_per_rollout >= 1, "train.optimizer_steps_per_rollout", "must be at least 1")
    need(cfg.eval.images_per_prompt >= 1, "eval.images_per_prompt", "must be at least 1")
    need(cfg.eval.batch_size >= 1, "eval.batch_size", "must be at least 1")
    need(cfg.advantage.clip == 5.0, "advantage.clip",
         f"{cfg.advantage.clip} would be ignored: the harness does not clip advantages; set the algorithm's own "
         f"clip option instead (e.g. algo.adv_clip_max; `diffrl-bench list` and README list them)")
    for key in sampler_keys:
        sampler = OmegaConf.select(cfg, key)
        window = sampler.options.get("window_size", 0) if "window_size" in sampler.options else 0
        need(not isinstance(window, int) or window <= sampler.num_steps, f"{key}.options.window_size",
             f"a window of {window} SDE steps is longer than the {sampler.num_steps} steps of {key}.num_steps")
        span = sampler.options.get("window_range") if "window_range" in sampler.options else None
        if span is not None:
            ok = len(span) == 2 and 0 <= span[0] < span[1] <= sampler.num_steps
            need(ok, f"{key}.options.window_range",
                 f"{list(span)} is not [lo, hi) with 0 <= lo < hi <= {key}.num_steps = {sampler.num_steps}")
    batch = cfg.rollout.prompts_per_step * cfg.rollout.images_per_prompt
    need(batch % cfg.train.optimizer_steps_per_rollout == 0, "train.optimizer_steps_per_rollout",
         f"must divide the rollout batch ({batch} images)")
    need(cfg.train.mixed_precision in ("auto", "no", "bf16", "fp16"), "train.mixed_precision",
         f"{cfg.train.mixed_precision!r} is not one of auto, no, bf16, fp16")
    need(cfg.train.device in ("auto", "cpu", "cuda"), "train.device", f"{cfg.train.device!r} is not auto, cpu or cuda")
    need(len(cfg.optim.betas) == 2, "optim.betas", "needs two values")
    need(all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas", f"{list(cfg.optim.betas)}: each must be in [0, 1)")
    need(cfg.optim.eps > 0, "optim.eps", f"{cfg.optim.eps} must be positive")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", f"{cfg.optim.weight_decay} must be non-negative")
    need(cfg.optim.lr > 0, "optim.lr", "must be positive")
    from diffrl_bench.trackers import TrackerError, check_trackers

    try:
        check_trackers(list(cfg.log.trackers), OmegaConf.to_container(cfg.log.tracker_options))
    except TrackerError as error:
        raise ConfigError(f"bad config key 'log': {error}") from None
    options = algo_config(cfg)
    check_run = getattr(ALGORITHMS.get(cfg.algorithm), "check_run", None)
    if check_run is not None:
        try:
            check_run(options, cfg)
        except ValueError as error:
            raise _algo_error(error) from None


def _algo_error(error: ValueError) -> ConfigError:
    """A plugin's error as a ConfigError: an `OptionError` names its `algo.<field>`; any other ValueError is either
    already phrased with its key (`bad config key '...'`) or, from `validate()`, blamed on the `algo` section."""
    key = getattr(error, "key", None)
    if key is not None:
        return ConfigError(f"bad config key 'algo.{key}': {error.reason}")
    message = str(error)
    return ConfigError(message if message.startswith("bad config key") else f"bad config key 'algo': {message}")


# Arguments a sampler takes from the harness, not from `options`. The harness passes `record_before` (when the
# algorithm asks for transitions), `record_means` (when it asks for step means), `groups` and `rollout_id` (the RL
# step's index) to every sampler whose signature names them.
HARNESS_SAMPLER_ARGS = ("velocity_fn", "x_init", "sigmas", "generator", "record_before", "groups", "record_means",
                        "rollout_id")


def sampler_options(sampler) -> set:
    """The keyword options a registered sampler accepts from `rollout.sampler.options`."""
    return set(_option_parameters(sampler))


def accepts_argument(sampler, name: str) -> bool:
    """Whether `sampler`'s signature names the harness argument `name` (`record_before`, `groups`)."""
    import inspect

    return name in inspect.signature(sampler).parameters


def _option_parameters(sampler) -> dict:
    import inspect

    params = inspect.signature(sampler).parameters
    return {name: p for name, p in params.items()
            if name not in HARNESS_SAMPLER_ARGS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def resolve_sampler_options(sampler_cfg) -> Dict[str, Any]:
    """Every option of the configured sampler: `options` from the config over the defaults of the sampler's own
    signature, which is the one place a sampler's defaults are written. The harness resolves them once per run and
    hands them to the algorithm on the batch (`RolloutBatch.sampler_options`); `check_run` may use them at load time."""
    from diffrl_bench.registry import SAMPLERS

    params = _option_parameters(SAMPLERS.get(sampler_cfg.name))
    resolved = {name: p.default for name, p in params.items() if p.default is not p.empty}
    options = sampler_cfg.get("options") or {}
    resolved.update(OmegaConf.to_container(options) if isinstance(options, DictConfig) else dict(options))
    return resolved


def algo_config(cfg: DictConfig) -> Any:
    """The `algo` section as the chosen algorithm's config dataclass (unknown keys and bad types raise)."""
    from diffrl_bench.registry import ALGORITHMS

    algorithm = ALGORITHMS.get(cfg.algorithm)
    schema = getattr(algorithm, "Config", None)
    if schema is None or not is_dataclass(schema):
        raise ConfigError(f"algorithm {cfg.algorithm!r} has no Config dataclass")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg.algo)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        raise ConfigError(f"bad config key 'algo.{key}': {str(error).splitlines()[0]} "
                          f"(options of {cfg.algorithm!r}: {[f.name for f in fields(schema)]})") from None
    options = OmegaConf.to_object(merged)
    check = getattr(options, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as error:
            raise _algo_error(error) from None
    return options


def resolved_config(cfg: DictConfig) -> Dict[str, Any]:
    """The config as a plain dict, with the algorithm section filled with its defaults (what config.yaml holds)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["algo"] = OmegaConf.to_container(OmegaConf.structured(algo_config(cfg)))
    return resolved


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config (with the algorithm section filled with its defaults)."""
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.create(resolved_config(cfg))))
