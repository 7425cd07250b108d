"""DGPO: Direct Group Preference Optimization on the forward process (Luo et al., arXiv 2510.08425, ICLR 2026).

Each prompt group is split by advantage sign into a preferred and a dispreferred sub-group, and the model maximises
the Bradley-Terry likelihood of the group-level preference, with each sample's implicit reward written through its
denoising score-matching (DSM) loss relative to a reference. The gradient of that log-sigmoid is a per-group weight
(detached) times `A * dsm`, which is what the released code optimises. A PPO-style clip against an EMA "old"
model stops the gradient of samples whose DSM already moved past `1 +- clip_range` in the advantage's direction,
and a velocity-space KL keeps theta near the frozen base.

Rollouts use a deterministic ODE sampler (DPM-Solver++), so no trajectory likelihood is needed: training noises the
final samples at a few grid times with noise shared inside each group. Source:
Luo-Yihong/DGPO@01ceb4b83c0bbc55d96246fe1b6d9a3d4749ebd6:scripts/train_sd3_dgpo.py (training block 1098-1165,
compute_group_dgpo_loss_allreduce 162-193); loop facts in docs/design_space.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from diffrl_bench.algorithm import RolloutBatch, RolloutRequest, TrainingItem, require
from diffrl_bench.algorithms.checks import check_decays
from diffrl_bench.algorithms.forward_items import forward_process_items
from diffrl_bench.distributed import shared_train_generator
from diffrl_bench.flow import mean_chw
from diffrl_bench.registry import ALGORITHMS
from diffrl_bench.schedules import decay_schedule
from diffrl_bench.timesteps import quantize_times, sample_train_times


def dgpo_group_weights(
    dsm: torch.Tensor,
    ref_dsm: torch.Tensor,
    advantages: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    beta_dpo: float,
    group_size: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample group logit and sigmoid weight (both detached) of DGPO's group preference.

        logit_g = sum over the members i of g present here of A_i beta_dpo (dsm_i - ref_dsm_i) / group_size
        weight  = sigmoid(logit_g(i))

    `group_size` is the configured images per prompt, not the number of members present: a group split across
    micro-batches would get a different (wrong) logit, which is why the original all-reduces the group sums over
    processes and keeps whole groups per micro-batch. Groups are the sorted distinct `group_ids`.

    Args:
        dsm, ref_dsm: (B,) DSM losses of theta (the value only is used) and of the DGPO reference.
        advantages: (B,) already clipped; group_ids: (B,) prompt-group labels.

    Returns:
        (logit (B,), weight (B,)): each sample's group value.
    """
    _, index = torch.unique(group_ids, return_inverse=True)
    term = advantages.detach() * beta_dpo * (dsm.detach() - ref_dsm.detach()) / group_size
    num_groups, index = int(index.max()) + 1, index.to(term.device)
    sums = torch.zeros(num_groups, dtype=term.dtype, device=term.device).index_add_(0, index, term)
    logit = sums[index]
    return logit, torch.sigmoid(logit)


def dgpo_loss(
    v_theta: torch.Tensor,
    target: torch.Tensor,
    advantages: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    v_ref: torch.Tensor,
    v_old: Optional[torch.Tensor] = None,
    beta_dpo: float = 100.0,
    group_size: int = 16,
    clip_range: float = 1e-2,
    clip_dsm: bool = True,
    clip_kl: bool = False,
    beta: float = 0.02,
    use_ema_ref: bool = False,
    adv_clip_max: float = 5.0,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """DGPO's loss for one training time of a micro-batch of whole groups. `m(.)` is the per-sample mean over CHW.

        A      = clip(advantages, -adv_clip_max, adv_clip_max)
        dsm    = m((target - v_theta)^2),          target = noise - x0
        with clipping (clip_dsm or clip_kl; needs v_old, the EMA "old" model's velocity):
            ratio       = exp(m((target - v_old)^2) - dsm)
            should_clip = ratio > 1 + clip_range  if A > 0,  else  ratio < 1 - clip_range     (A = 0: second test)
        ref    = v_old if use_ema_ref else v_ref;   ref_dsm = m((target - ref)^2)
        w      = sigmoid(group logit), detached (`dgpo_group_weights`)
        policy = mean_B(w A dsm'),   dsm' = sg(dsm) on rows with should_clip when clip_dsm, else dsm
        kl     = mean_B kl',  kl' = m((v_theta - v_ref)^2), sg on should_clip rows when clip_kl   (only when beta > 0)
        loss   = policy + beta kl

    The KL always uses the frozen (possibly CFG-guided) reference `v_ref`, even with `use_ema_ref`. `v_theta` is the
    conditional velocity without CFG (the original's `predict_v(cfg=False)`).

    Args:
        v_theta: (B, ...) theta's velocity at x_t (carries gradient); target: (B, ...) `noise - x0`.
        advantages: (B,) raw (clipped here); group_ids: (B,) prompt groups (whole groups, see `dgpo_group_weights`).
        v_ref: (B, ...) the frozen reference, CFG-combined beforehand when the config's `kl_cfg > 1`.
        v_old: (B, ...) the EMA old model's velocity; required when clipping or `use_ema_ref`.
        beta_dpo: DPO temperature (100 GenEval/OCR, 10 PickScore); group_size: configured images per prompt.
        clip_range, clip_dsm, clip_kl: the PPO-style clip; beta: KL weight (config `train.beta`).

    Returns:
        The scalar loss and detached metrics: per-sample `dsm_loss`, `group_logit`, `group_weight` and, with
        clipping, `old_dsm_loss`, `ratio`, `should_clip` (0/1) and `clip_ratio_total` (float32); scalars
        `policy_loss`, `kl_loss` (only when beta > 0), `loss`, `dsm_loss_mean`.
    """
    use_old = clip_dsm or clip_kl
    if (use_old or use_ema_ref) and v_old is None:
        raise ValueError("dgpo_loss needs v_old (the EMA old model's velocity) when clip_dsm, clip_kl or use_ema_ref "
                         "is set")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    adv = torch.clamp(advantages.detach(), -adv_clip_max, adv_clip_max)
    target = target.detach()
    dsm = mean_chw((target - v_theta) ** 2)
    metrics: Dict[str, torch.Tensor] = {}
    should_clip = None
    if use_old:
        old_dsm = mean_chw((target - v_old.detach()) ** 2)
        ratio = torch.exp(old_dsm - dsm)
        with torch.no_grad():
            should_clip = torch.where(adv > 0, ratio > 1.0 + clip_range, ratio < 1.0 - clip_range)
        if clip_dsm:
            dsm = torch.where(should_clip, dsm.detach(), dsm)
        metrics.update(old_dsm_loss=old_dsm, ratio=ratio, should_clip=should_clip.to(dsm.dtype),
                       clip_ratio_total=should_clip.float().mean())
    dgpo_ref = v_old if use_ema_ref else v_ref
    ref_dsm = mean_chw((target - dgpo_ref.detach()) ** 2)
    logit, weight = dgpo_group_weights(dsm, ref_dsm, adv, group_ids, beta_dpo=beta_dpo, group_size=group_size)
    policy_loss = (weight * adv * dsm).mean()
    metrics.update(dsm_loss=dsm, group_logit=logit, group_weight=weight, policy_loss=policy_loss)
    if beta > 0:
        kl = mean_chw((v_theta - v_ref.detach()) ** 2)
        if clip_kl:
            kl = torch.where(should_clip, kl.detach(), kl)
        kl_loss = kl.mean()
        loss = policy_loss + beta * kl_loss
        metrics["kl_loss"] = kl_loss
    else:
        loss = policy_loss
    metrics["loss"] = loss
    metrics["dsm_loss_mean"] = dsm.mean()
    return loss, {name: value.detach() for name, value in metrics.items()}


# ---------------------------------------------------------------------------------------------------------------
# The plugin: what DGPO asks of the harness.
# ---------------------------------------------------------------------------------------------------------------

DGPO = "Luo-Yihong/DGPO@01ceb4b83c0bbc55d96246fe1b6d9a3d4749ebd6"


@dataclass
class DGPOConfig:
    """Options of DGPO (the `algo` section). Defaults: the authors' GenEval SD3.5-M config `geneval_sd3_4gpu`
    (DG = Luo-Yihong/DGPO@01ceb4b, config/dgpo.py; line numbers in the presets). The group size is not an option:
    it is `rollout.images_per_prompt`, the original's `num_image_per_prompt` divisor."""

    beta_dpo: float = 100.0
    """DPO temperature of the group preference (DG:config/dgpo.py:88; 10 for PickScore)"""
    kl_beta: float = 0.02
    """weight of the velocity KL to the frozen base, the original's `train.beta` (63; 1e-3 PickScore); 0 drops it"""
    kl_cfg: float = 1.0
    """guidance of the frozen reference in the KL and as DGPO reference (DG:config/base.py:29); 1 = no CFG"""
    clip_range: float = 1e-2
    """PPO-style clip of the DSM ratio against the old model (59; 5e-2 PickScore)"""
    clip_dsm: bool = True
    """stop the DSM gradient of samples past the clip (60)"""
    clip_kl: bool = False
    """stop the KL gradient of samples past the clip (40)"""
    use_ema_ref: bool = False
    """DGPO reference = the old EMA model instead of the frozen base (DG:config/base.py:30)"""
    adv_clip_max: float = 5.0
    """advantages are clipped to +-this in the loss (DG:config/base.py:89)"""
    num_train_times: int = 4
    """training times per step, drawn without replacement from the first `train_time_pool` grid points (28)"""
    train_time_pool: int = 5
    """the original's `trunc_steps + 1`: times come from the first this-many non-zero rollout grid points (64: 5 for
    GenEval; 7 for OCR and PickScore, which inherit trunc_steps 6 from line 29)"""
    shared_noise: bool = True
    """one forward noise per prompt group and training time (`use_shared_noise`, 30)"""
    integer_times: bool = True
    """train at `floor(1000 sigma) / 1000` (float32) as the original does with the scheduler's int64 timesteps"""
    old_decay: Any = field(default_factory=lambda: {"start_step": 1, "start_value": 0.0, "slope": 0.001,
                                                    "max_value": 0.3})
    """decay of the `old` EMA after n optimizer steps: the original's `min(0.3, 0.001 * global_step)` with
    global_step counted before the update (DG:scripts/train_sd3_dgpo.py:629, 1175-1177)"""
    rollout_from_old_after: int = 500
    """sample with the old EMA model once more than this many optimizer steps were taken (`switch_ema_ref`, 61;
    200 for OCR/PickScore via line 31; DG:scripts/train_sd3_dgpo.py:799-800); negative: always theta"""

    def validate(self) -> None:
        require(self.beta_dpo > 0, "beta_dpo", f"must be positive, got {self.beta_dpo}")
        require(self.kl_beta >= 0, "kl_beta", f"must be non-negative, got {self.kl_beta}")
        require(self.kl_cfg >= 1, "kl_cfg", f"must be at least 1 (1 = no guidance), got {self.kl_cfg}")
        require(self.clip_range > 0, "clip_range", f"must be positive, got {self.clip_range}")
        require(self.adv_clip_max > 0, "adv_clip_max", f"must be positive, got {self.adv_clip_max}")
        require(self.num_train_times >= 1, "num_train_times", f"must be at least 1, got {self.num_train_times}")
        require(self.train_time_pool >= self.num_train_times, "train_time_pool",
                f"{self.train_time_pool} grid points cannot give {self.num_train_times} distinct times "
                f"(num_train_times)")
        check_decays(self, "old_decay")

    @property
    def needs_old(self) -> bool:
        return self.clip_dsm or self.clip_kl or self.use_ema_ref or self.rollout_from_old_after >= 0

    @property
    def needs_ref(self) -> bool:
        return self.kl_beta > 0 or not self.use_ema_ref


@ALGORITHMS.register("dgpo")
class DGPOAlgorithm:
    """DGPO (Luo et al., 2025; Luo-Yihong/DGPO): group preference optimisation on ODE rollouts."""

    Config = DGPOConfig

    @staticmethod
    def check_run(config: DGPOConfig, run: Any) -> None:
        steps = run.rollout.sampler.num_steps
        require(config.train_time_pool <= steps, "train_time_pool",
                f"{config.train_time_pool} exceeds the {steps} non-zero points of the rollout grid "
                f"(rollout.sampler.num_steps)")

    def __init__(self, config: DGPOConfig, run: Any = None):
        self.config = config
        self.rollout = RolloutRequest(snapshot="theta", keep_x0=True,
                                      switch_snapshot="old" if config.rollout_from_old_after >= 0 else None,
                                      switch_after=config.rollout_from_old_after)
        self.snapshots = {}
        if config.needs_old:
            self.snapshots["old"] = decay_schedule(config.old_decay)
        if config.needs_ref:
            self.snapshots["ref"] = None  # the frozen base
        self._needs = ("theta", *self.snapshots)
        self._snapshot_cfg = {"ref": config.kl_cfg} if config.needs_ref and config.kl_cfg != 1 else {}
        self._group_size = int(run.rollout.images_per_prompt) if run is not None else None
        # Times and group noise must agree across processes (the original draws them on rank 0 and broadcasts).
        self._shared = shared_train_generator(int(run.train.seed) if run is not None else 0)
        self._times_for: Optional[Tuple[RolloutBatch, torch.Tensor]] = None

    def _step_times(self, batch: RolloutBatch) -> torch.Tensor:
        """The (T,) training times, drawn once per rollout batch and shared by its optimizer steps and processes."""
        if self._times_for is None or self._times_for[0] is not batch:
            c = self.config
            times = sample_train_times("grid_prefix", 1, c.num_train_times, self._shared, grid=batch.sigmas,
                                       pool=c.train_time_pool)[:, 0]
            self._times_for = (batch, quantize_times(times, "floor1000" if c.integer_times else "none"))
        return self._times_for[1]

    def training_items(self, batch: RolloutBatch, indices, micro_batch_size: int, generator) -> List[TrainingItem]:
        """Whole prompt groups at each of the step's training times: an item holds whole groups of one time, up to
        `micro_batch_size` pairs (at least one group), since a group's preference logit sums over all its members.

        Raises ValueError when a group is not whole within `indices` (split by optimizer steps or processes): set
        `train.optimizer_steps_per_rollout: 1` (DGPO takes one per epoch) and a process count that divides
        `rollout.prompts_per_step`."""
        c = self.config
        local = batch.group_ids[indices]
        order = torch.argsort(local, stable=True)
        rows, local = indices[order], local[order]
        _, step_ids = batch.whole_step()
        labels, counts = torch.unique(local, return_counts=True)
        step_labels, step_counts = torch.unique(step_ids, return_counts=True)
        whole = step_counts[torch.searchsorted(step_labels, labels)]
        if not torch.equal(counts, whole):
            split = labels[counts != whole].tolist()
            raise ValueError(f"dgpo needs whole prompt groups in each optimizer step and process; groups {split} are "
                             f"split (set train.optimizer_steps_per_rollout: 1 and a process count that divides "
                             f"rollout.prompts_per_step)")
        blocks = [torch.nonzero(local == g).flatten() for g in labels]
        T, B = c.num_train_times, len(rows)
        times = self._step_times(batch).unsqueeze(1).expand(T, B)
        group_size = self._group_size or int(step_counts.max())
        per_sample = {"advantages": batch.advantages[rows], "group_ids": local,
                      "group_size": torch.full((B,), group_size, dtype=torch.long)}
        shared = dict(noise_groups=torch.searchsorted(step_labels, local), num_noise_groups=len(step_labels))
        return forward_process_items(batch.x0[rows], rows, times, self._shared if c.shared_noise else generator,
                                     micro_batch_size, self._needs, per_sample=per_sample,
                                     snapshot_cfg=self._snapshot_cfg, blocks=blocks,
                                     **(shared if c.shared_noise else {}))

    def loss(self, item: TrainingItem, velocities: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        c = self.config
        v_theta = velocities["theta"]
        d = item.data
        # Without a ref snapshot (use_ema_ref and no KL) the reference velocity is never read.
        v_ref = velocities.get("ref", v_theta.detach())
        loss, metrics = dgpo_loss(v_theta, d["eps"] - d["x0"], d["advantages"], d["group_ids"], v_ref=v_ref,
                                  v_old=velocities.get("old"), beta_dpo=c.beta_dpo,
                                  group_size=int(d["group_size"][0]), clip_range=c.clip_range, clip_dsm=c.clip_dsm,
                                  clip_kl=c.clip_kl, beta=c.kl_beta, use_ema_ref=c.use_ema_ref,
                                  adv_clip_max=c.adv_clip_max)
        return loss, metrics
