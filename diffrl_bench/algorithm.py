"""The objective-plugin protocol.

An algorithm does not drive the loop. It declares what it needs (which snapshot samples the rollouts, which
snapshots exist and how they decay, what the rollout keeps) and turns a scored rollout batch into
`TrainingItem`s: model inputs plus the tensors its loss needs. The harness evaluates the requested snapshots'
velocities at each item and hands them to the pure `loss` function. See algorithms/nft.py for a complete plugin.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from diffrl_bench.sampling import Transitions
from diffrl_bench.schedules import DecaySchedule


class OptionError(ValueError):
    """A bad value of one algorithm option, raised by a plugin's `Config.validate()` or `check_run`.

    `key` is the option's field name in the `algo` section; the harness reports it as
    `bad config key 'algo.<key>': <reason>` (diffrl_bench/config.py)."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def require(ok: bool, key: str, reason: str) -> None:
    """Raise `OptionError(key, reason)` unless `ok`: one line per check in a `validate()`."""
    if not ok:
        raise OptionError(key, reason)


@dataclass
class RolloutRequest:
    """How the harness must produce rollouts for this algorithm."""

    snapshot: str = "theta"
    """the policy that samples: `theta`, or a snapshot such as `old` or `sampler`"""
    keep_x0: bool = True
    """keep the final samples for training (forward-process methods); trajectory methods need only transitions"""
    keep_trajectory: bool = False
    """keep every latent the sampler evaluated the model at, (N+1, B, ...) with the final sample last
    (RolloutBatch.trajectory; ELBO-PG's `xt_source: latents`); needs a sampler that calls the model once per step"""
    record_before: Optional[int] = None
    """trajectory-likelihood methods: keep the stochastic transitions (latent, next latent, step, behaviour
    log-prob) of the sampler steps with index < record_before, and only those; needs a sampler that records them"""
    switch_snapshot: Optional[str] = None
    """sample with this snapshot instead of `snapshot` once more than `switch_after` optimizer steps were taken
    (DGPO samples with its EMA `old` model after step 500: `global_step > switch_ema_ref`)"""
    switch_after: int = -1
    """optimizer steps after which `switch_snapshot` samples; negative: never switch"""
    record_means: bool = False
    """with `record_before`: also keep each recorded step's behaviour mean (`Transitions.means`), for losses that
    compare the current step mean with the sampling policy's (GRPO-Guard's ratio norm, Flow-DPPO's KL region)"""

    def snapshot_at(self, optimizer_steps: int) -> str:
        """The snapshot that samples the rollout after `optimizer_steps` optimizer steps."""
        if self.switch_snapshot is not None and 0 <= self.switch_after < optimizer_steps:
            return self.switch_snapshot
        return self.snapshot


@dataclass
class RolloutBatch:
    """One RL step's scored samples, as the harness hands them to the algorithm."""

    x0: Optional[torch.Tensor]
    """final samples in latent space, (B, C, H, W); None when the rollout request said `keep_x0=False`"""
    cond: Any
    """the backend's prompt conditioning, indexable by sample"""
    prompts: List[str]
    metadata: List[Dict[str, Any]]
    group_ids: torch.Tensor
    """(B,) long: samples with the same id share a prompt"""
    rewards: torch.Tensor
    """(B,) float64 training reward (weighted sum of the components)"""
    advantages: torch.Tensor
    """(B,) float64 group-relative advantages from the `advantage` config (not clipped)"""
    reward_components: Dict[str, torch.Tensor]
    """(B,) scores of each reward component and its logged parts (`name`, `name.part`), before weighting"""
    sigmas: torch.Tensor
    """the rollout sampler's sigma grid"""
    sampler_options: Dict[str, Any] = field(default_factory=dict)
    """every option of the rollout sampler as it ran: `rollout.sampler.options` over the defaults of the sampler's
    signature (`config.resolve_sampler_options`), e.g. `noise_level` and `sde_type` for flow_grpo_sde; the one
    source for an algorithm that must reuse the sampler's settings"""
    transitions: Optional[Transitions] = None
    """the recorded stochastic transitions when the rollout request set `record_before`"""
    trajectory: Optional[torch.Tensor] = None
    """(N+1, B, ...) the latent at each `sigmas[k]` when the rollout request set `keep_trajectory`"""
    cfg_scale: float = 1.0
    """the guidance the rollout sampled with (trajectory likelihoods must be recomputed with the same)"""
    step_scores: Dict[str, torch.Tensor] = field(default_factory=dict)
    """the whole step's float64 scores from every process, in the step's image order (length P*K): the training
    reward under `"reward"` and each entry of `reward_components`; on one process, the local ones"""
    step_group_ids: Optional[torch.Tensor] = None
    """(P*K,) the prompt group of every image of the step, on every process"""
    step_offset: int = 0
    """where this process's images start in the step: they are the step's `[step_offset, step_offset + B)`"""

    def whole_step(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rewards, group ids) of the whole step, across processes: a group statistic computed on these and cut
        with `local_slice` is what one process holding every image would compute, even where a prompt's images
        are split between processes. A batch built without them (one process, or by hand) is its own step."""
        if self.step_group_ids is None:
            return self.rewards, self.group_ids
        return self.step_scores["reward"], self.step_group_ids

    def local_slice(self) -> slice:
        """This process's images within `whole_step()`."""
        return slice(self.step_offset, self.step_offset + len(self.group_ids))


@dataclass
class TrainingItem:
    """One forward/backward unit: the harness computes `velocities[s] = v_s(x, sigma | cond[index])`."""

    index: torch.Tensor
    """which samples of the batch this item covers"""
    x: torch.Tensor
    """model input x_t"""
    sigma: torch.Tensor
    """(len(index),) times on the 0-1 scale"""
    snapshots: Tuple[str, ...]
    """snapshots to evaluate; `theta` is evaluated with gradients, the others without"""
    data: Dict[str, torch.Tensor] = field(default_factory=dict)
    """whatever tensors the loss needs (x0, eps, advantages, ...)"""
    cfg_scale: float = 1.0
    """guidance used for every snapshot of this item"""
    snapshot_cfg: Dict[str, float] = field(default_factory=dict)
    """guidance for particular snapshots, overriding `cfg_scale` for them (e.g. CRD's KL anchor to the CFG-guided
    base: `{"ref": 4.5}`)"""
    options: Dict[str, Any] = field(default_factory=dict)
    """non-tensor settings the loss needs with this item (e.g. the SDE step's noise_level and sde_type, which
    `transition_items` copies from `RolloutBatch.sampler_options`)"""
    placeholder: bool = False
    """an item whose loss is exactly 0, run only so that a process with nothing to train still takes part in the
    step's collectives; it adds no samples to the step's mean"""

    def to_values_device(self, device: torch.device) -> "TrainingItem":
        """The item with its floating tensors (x, sigma and the float entries of `data`) on `device`.

        Samplers and the policy leave some tensors on the accelerator (x0, transitions), while rewards,
        advantages and the CPU generator's draws stay on the CPU. The loss gets every value on the policy's
        device; integer labels and indices stay where the plugin put them, so grouping them (unique, bincount,
        `int(max)`) needs no device synchronisation, and group helpers move their index to the values.
        """
        def move(value):
            return value.to(device) if torch.is_tensor(value) and value.is_floating_point() else value

        return replace(self, x=move(self.x), sigma=move(self.sigma),
                       data={key: move(value) for key, value in self.data.items()})


class Algorithm(Protocol):
    """What an objective plugin provides (registered with `@ALGORITHMS.register(name)`)."""

    Config: type
    """a dataclass of the algorithm's options (the `algo` section of a run config)"""

    rollout: RolloutRequest
    snapshots: Dict[str, Optional[DecaySchedule]]
    """snapshot name -> decay schedule applied after each RL step (None: frozen, e.g. `ref`)"""

    def training_items(self, batch: RolloutBatch, indices: torch.Tensor, micro_batch_size: int,
                       generator: torch.Generator) -> Sequence[TrainingItem]: ...
    """At least one item; all items of a call evaluate the same snapshots with the same guidance (under ZeRO-3 or
    LoRA every snapshot call is a collective, and processes running unequal item counts are padded with repeats)."""

    def loss(self, item: TrainingItem, velocities: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]: ...
    """Pure: tensors in, the scalar loss and detached metrics out. Metrics whose names end in `_max` / `_min` are
    reduced over micro-batches with max / min, others averaged."""

    # Optional, a staticmethod: `check_run(config, run)` gets the validated `Config` instance and the whole run
    # config (DictConfig) and raises when the options do not fit the rest of the run (e.g. a trajectory likelihood
    # with an ODE sampler): `OptionError(field, reason)` for an `algo` field, or ValueError("bad config key
    # '<path>': reason") for another section. Called at config time, before any work.
