"""AWM: advantage-weighted matching (METHODS.md section 3).

AWM trains on the forward process like DiffusionNFT, but keeps the shape of a policy gradient: every clean rollout
sample x0 is noised at T training times, the flow-matching error of the trained velocity at each (time, sample) pair
is turned into a log-likelihood surrogate `l`, and the loss is `-A_hat l` with the advantage in [-1, 1]. The released
code wraps this in a PPO ratio `exp(l - sg(l))`, which is exactly 1 on-policy (its gradient is that of `l`). Two
velocity-space anchors keep the policy close: a KL to the frozen base and a KL to a lagged (ema) copy of the policy.

Tensors are time-major, `(T, B, ...)`: index `[k, i]` is training time k of sample i, which is the order in which the
original flattens the pairs (row `k * B + i`). The pure function is `awm_loss` (its parity runner is in
algorithms/parity_runners.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from diffrl_bench.algorithm import RolloutBatch, RolloutRequest, TrainingItem, require
from diffrl_bench.algorithms.checks import check_decays, check_time_distribution, check_training_times
from diffrl_bench.flow import mean_chw
from diffrl_bench.registry import ALGORITHMS
from diffrl_bench.schedules import decay_schedule
from diffrl_bench.timesteps import sample_train_times

AWM_WEIGHTINGS = ("ghuber", "Uniform", "t", "t**2", "huber")
AWM_LOSS_TYPES = ("exp_first", "sum_first")
AWM_KL_WEIGHTS = ("Uniform", "ELBO")

_TINY = 1e-10  # the offset inside the original's root / power surrogates


def awm_log_likelihood(matching_error: torch.Tensor, t: torch.Tensor, weighting: str = "ghuber",
                       ghuber_power: float = 0.25) -> torch.Tensor:
    """The log-likelihood surrogate `l` of a flow-matching error, elementwise over any shape.

    With `m = mean_CHW (v - (eps - x0))^2` at time `t`:
        "Uniform":  l = -m
        "t":        l = -t m
        "t**2":     l = -t^2 m
        "huber":    l = -t (sqrt(m + 1e-10) - 1e-5)                       (1e-5 = sqrt(1e-10): l = 0 at m = 0)
        "ghuber":   l = -(t / p) ((m + 1e-10)^p - (1e-10)^p)              (generalised Huber, p = ghuber_power)
    Every form is 0 at m = 0 and decreases with m. "ghuber" with p = 1 is "t" (up to the 1e-10 offset), and with
    p = 1/2 it is twice "huber": small p flattens the penalty of large errors (the high-noise times), which is
    what makes it the released default.
    """
    m, t = matching_error, t.to(matching_error.dtype)
    if weighting == "Uniform":
        return -m
    if weighting == "t":
        return -m * t
    if weighting == "t**2":
        return -m * t ** 2
    if weighting == "huber":
        return -(torch.sqrt(m + _TINY) - _TINY ** 0.5) * t
    if weighting == "ghuber":
        p = float(ghuber_power)
        if p <= 0:
            raise ValueError(f"ghuber_power must be > 0, got {ghuber_power}")
        floor = torch.pow(torch.tensor(_TINY, dtype=m.dtype, device=m.device), p)
        return -(torch.pow(m + _TINY, p) - floor) * t / p
    raise ValueError(f"unknown AWM weighting {weighting!r}; expected one of {AWM_WEIGHTINGS}")


def _flat_pairs(x: torch.Tensor) -> torch.Tensor:
    """(T, B, ...) -> (T * B, ...), time-major (row k * B + i)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _pair_mean_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean_CHW (a - b)^2 per (time, sample) pair, (T, B, ...) -> (T, B)."""
    return mean_chw(_flat_pairs(a - b).square()).reshape(a.shape[0], a.shape[1])


def awm_sde_std(t: torch.Tensor, noise_level: float = 0.7) -> torch.Tensor:
    """`noise_level sqrt(t / (1 - min(t, 0.99)))`: the Flow-GRPO SDE std the original's "ELBO" KL weight divides by."""
    return torch.sqrt(t / (1 - torch.clamp(t, 0, 0.99))) * noise_level


def awm_loss(
    v_theta: torch.Tensor,
    v_ref: Optional[torch.Tensor],
    v_ema: Optional[torch.Tensor],
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    advantages: torch.Tensor,
    *,
    weighting: str = "ghuber",
    ghuber_power: float = 0.25,
    beta: float = 1e-3,
    ema_beta: float = 1.0,
    adv_clip_max: float = 5.0,
    advantage_max: Optional[float] = 1.0,
    clip_range: float = 1.0,
    loss_type: str = "exp_first",
    kl_weight: str = "Uniform",
    kl_ema_weight: str = "Uniform",
    old_log_prob: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """AWM loss for one micro-batch of B samples at T training times each.

    For each pair (k, i), with the target velocity `v* = eps[k, i] - x0[i]`:
        m[k, i] = mean_CHW (v_theta[k, i] - v*)^2                     (float64, as the original computes it)
        l[k, i] = awm_log_likelihood(m, t[k, i], weighting)           (the "log_prob")
    Advantage `A_hat = clip(A, -c, c) / c * advantage_max` (c = adv_clip_max), in [-1, 1] by default
    (advantage_max None: `clip(A, -c, c)` unscaled, as the original).
    Policy term, PPO-style as released: `ratio = exp(l - l_old)` with `l_old = sg(l)` on-policy (so ratio == 1 and
    the gradient is that of `-A_hat l`), `policy = mean max(-A_hat ratio, -A_hat clip(ratio, 1 - eps, 1 + eps))`
    over the T * B pairs ("exp_first"); "sum_first" first averages l over the T times, one ratio per sample.
    Anchors, each `mean_{k,i} mean_CHW (v_theta - v_other)^2` ("Uniform"; "ELBO" divides each pair by
    `2 std(t)^2` of the Flow-GRPO SDE): `kl_loss` to the frozen base (`v_ref`) and `ema_kl_loss` to the lagged copy
    (`v_ema`). Total, as the original executes it:
        loss = policy + beta kl_loss + ema_beta ema_kl_loss     if beta > 0 (the ema term only if ema_beta > 0)
        loss = policy                                           if beta == 0 (the ema term is dropped as well)

    Args:
        v_theta: (T, B, ...) velocities of the trained policy; the only input that should carry gradient.
        v_ref: (T, B, ...) frozen-base velocities at the same x_t (may be None when beta == 0).
        v_ema: (T, B, ...) lagged-copy velocities (may be None when beta == 0 or ema_beta == 0).
        x0: (B, ...) clean rollout samples; eps: (T, B, ...) the noise of each pair; t: (T, B) or (T,) times in [0, 1].
        advantages: (B,) raw group advantages (clipped here).
        old_log_prob: optional (T, B) behaviour log-likelihood surrogates (off-policy); None = on-policy `sg(l)`.

    Returns:
        The scalar loss and detached metrics: `log_prob` (T, B), `ratio` ((T, B) for exp_first, (B,) for sum_first),
        `advantages` (B, the scaled A_hat), scalars `policy_loss`, `kl_loss` and `ema_kl_loss` (when the velocities
        were given; logged even where not added), `clipfrac`, `loss`.
    """
    if weighting not in AWM_WEIGHTINGS:
        raise ValueError(f"unknown AWM weighting {weighting!r}; expected one of {AWM_WEIGHTINGS}")
    if loss_type not in AWM_LOSS_TYPES:
        raise ValueError(f"unknown AWM loss_type {loss_type!r}; expected one of {AWM_LOSS_TYPES}")
    for name, value in (("kl_weight", kl_weight), ("kl_ema_weight", kl_ema_weight)):
        if value not in AWM_KL_WEIGHTS:
            raise ValueError(f"unknown AWM {name} {value!r}; expected one of {AWM_KL_WEIGHTS}")
    if v_theta.ndim < 3:
        raise ValueError(f"v_theta must be (T, B, ...), got shape {tuple(v_theta.shape)}")
    T, B = v_theta.shape[:2]
    if beta > 0 and v_ref is None:
        raise ValueError("beta > 0 needs the reference velocities v_ref")
    if beta > 0 and ema_beta > 0 and v_ema is None:
        raise ValueError("beta > 0 and ema_beta > 0 need the lagged-copy velocities v_ema")

    t = t.to(torch.float64)
    if t.ndim == 1:
        t = t.reshape(T, 1).expand(T, B)
    v = v_theta.double()
    target = eps.double() - x0.double().unsqueeze(0)
    log_prob = awm_log_likelihood(_pair_mean_sq(v, target), t, weighting, ghuber_power)  # (T, B)

    adv = advantages.to(torch.float64).clamp(-adv_clip_max, adv_clip_max)
    if advantage_max is not None:  # the original skips the rescaling when advantage_max is None
        adv = adv / adv_clip_max * advantage_max
    old = log_prob.detach() if old_log_prob is None else old_log_prob.to(log_prob).detach()
    if loss_type == "exp_first":
        ratio = torch.exp(log_prob - old)
        adv_pairs = adv.unsqueeze(0).expand(T, B)
    else:
        ratio = torch.exp(log_prob.mean(dim=0) - old.mean(dim=0))
        adv_pairs = adv
    unclipped = -adv_pairs * ratio
    clipped = -adv_pairs * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()

    def anchor(other: torch.Tensor, weight: str) -> torch.Tensor:
        per_pair = _pair_mean_sq(v, other.detach().double())
        if weight == "ELBO":
            per_pair = per_pair / (2 * awm_sde_std(t) ** 2)
        return per_pair.mean()

    kl_loss = anchor(v_ref, kl_weight) if v_ref is not None else None
    ema_kl_loss = anchor(v_ema, kl_ema_weight) if v_ema is not None else None
    loss = policy_loss
    if beta > 0:
        loss = loss + beta * kl_loss
        if ema_beta > 0:
            loss = loss + ema_beta * ema_kl_loss

    metrics = {
        "log_prob": log_prob,
        "ratio": ratio,
        "advantages": adv,
        "policy_loss": policy_loss,
        "clipfrac": ((ratio - 1.0).abs() > clip_range).double().mean(),
        "loss": loss,
    }
    if kl_loss is not None:
        metrics["kl_loss"] = kl_loss
    if ema_kl_loss is not None:
        metrics["ema_kl_loss"] = ema_kl_loss
    return loss, {name: value.detach() for name, value in metrics.items()}


# ---------------------------------------------------------------------------------------------------------------
# The plugin: what AWM asks of the harness.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class AWMConfig:
    """Options of AWM (the `algo` section of a run config). Defaults are the released GenEval recipe."""

    weighting: str = "ghuber"
    """log-likelihood surrogate of the flow-matching error: ghuber (generalised Huber, the released default),
    Uniform, t, t**2 or huber (see `awm_log_likelihood`)"""
    ghuber_power: float = 0.25
    """p of the ghuber surrogate `-(t / p) ((m + 1e-10)^p - 1e-10^p)`"""
    beta: float = 1e-3
    """per-task weight of the velocity-space KL to the frozen base: 1e-3 GenEval, 3e-3 OCR, 1e-4 PickScore in the
    released recipes; 0 drops both anchors (as the original does) and the ref and ema snapshots"""
    ema_beta: float = 1.0
    """weight of `mean (v_theta - v_ema)^2` to the lagged copy (only added when beta > 0, as released)"""
    ema_decay: Any = "awm_ema"
    """decay schedule of the lagged `ema` snapshot: awm_ema = min(0.001 step, 0.3), or any preset / spec / dict"""
    adv_clip_max: float = 5.0
    """advantages are clipped to +-this, then divided by it (A_hat = clip(A, -5, 5) / 5 in [-1, 1])"""
    time_distribution: str = "stratified_index"
    """training times: stratified_index (the original: one grid index per stratum of `time_index_range`, shared by
    the samples of a draw), stratified_grid (strata over the whole non-zero grid), grid_subset, uniform,
    logit_normal"""
    num_train_times: int = 6
    """training times per sample (T = 6 in the original)"""
    time_index_range: Optional[List[int]] = None
    """[lo, hi] rollout-grid indices that stratified_index stratifies (index 0 is t = 1; hi is never drawn);
    None = every non-zero point. The original: [1, 12] for GenEval and OCR (`discrete_wo_init`, never t = 1),
    [0, 12] for PickScore (`discrete`), 12 = int(14 x timestep_fraction 0.9)"""
    time_draw: str = "micro_batch"
    """micro_batch: times and noise drawn afresh for every training item, as the original draws them for every
    micro-batch (so the gradient depends on train.micro_batch_size); optimizer_step: one draw for the whole
    optimizer step, split into items (the gradient does not depend on the micro-batch size)"""

    def validate(self) -> None:
        require(self.weighting in AWM_WEIGHTINGS, "weighting", f"{self.weighting!r} is not one of {AWM_WEIGHTINGS}")
        require(self.ghuber_power > 0, "ghuber_power", f"must be positive, got {self.ghuber_power}")
        require(self.beta >= 0, "beta", f"must be non-negative, got {self.beta}")
        require(self.ema_beta >= 0, "ema_beta", f"must be non-negative, got {self.ema_beta}")
        require(self.adv_clip_max > 0, "adv_clip_max", f"must be positive, got {self.adv_clip_max}")
        check_time_distribution(self)
        check_decays(self, "ema_decay")


@ALGORITHMS.register("awm")
class AWM:
    """AWM (Xue et al., 2025; scxue/advantage_weighted_matching): advantage-weighted flow matching on the forward
    process, anchored to the base and to a lagged copy."""

    Config = AWMConfig

    @staticmethod
    def check_run(config: AWMConfig, run: Any) -> None:
        check_training_times(config, run)

    def __init__(self, config: AWMConfig, run: Any = None):
        self.config = config
        # On-policy: the current policy samples, and only the clean samples are kept.
        self.rollout = RolloutRequest(snapshot="theta", keep_x0=True)
        self.snapshots: dict = {}
        needs = ["theta"]
        if config.beta > 0:
            self.snapshots["ref"] = None
            needs.append("ref")
            if config.ema_beta > 0:
                self.snapshots["ema"] = decay_schedule(config.ema_decay)
                needs.append("ema")
        self._needs = tuple(needs)

    def training_items(self, batch: RolloutBatch, indices, micro_batch_size: int, generator) -> List[TrainingItem]:
        """Each item holds all T times of `max(1, micro_batch_size // T)` samples, rows time-major (k * b + i), which
        is the (T, b) layout `awm_loss` takes.

        `time_draw` micro_batch draws the times, then the noise, for every item, as the original does for every
        micro-batch of `train.batch_size` samples (scxue/advantage_weighted_matching@be513723:
        advantage_weighted_matching/scripts/train_sd3_awm.py:1119-1220): two items of one step get independent times.
        optimizer_step draws them once for the step, so every item of a step shares them and the gradient does not
        depend on the micro-batch size.
        """
        c = self.config
        B, T = len(indices), c.num_train_times
        x0 = batch.x0[indices]
        per_item = max(1, micro_batch_size // T)
        blocks = [torch.arange(start, min(start + per_item, B)) for start in range(0, B, per_item)]
        if c.time_draw == "optimizer_step":
            times, eps = self._draw(batch, B, x0, generator)
            drawn = [(times[:, cols], eps[:, cols]) for cols in blocks]
        else:
            drawn = [self._draw(batch, len(cols), x0[cols], generator) for cols in blocks]
        advantages = batch.advantages[indices]
        items = []
        for cols, (t, noise) in zip(blocks, drawn):
            b, clean = len(cols), x0[cols]
            tb = t.reshape(T, b, *([1] * (x0.ndim - 1)))
            x_t = (1 - tb) * clean.unsqueeze(0) + tb * noise
            items.append(TrainingItem(
                index=indices[cols].repeat(T), x=x_t.reshape(T * b, *x0.shape[1:]), sigma=t.reshape(-1),
                snapshots=self._needs, data={"x0": clean, "eps": noise, "t": t, "advantages": advantages[cols]}))
        return items

    def _draw(self, batch: RolloutBatch, b: int, x0: torch.Tensor, generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """(T, b) training times, then (T, b, ...) noise, for the b clean samples `x0`."""
        c = self.config
        options = {"index_range": c.time_index_range} if c.time_index_range is not None else {}
        times = sample_train_times(c.time_distribution, b, c.num_train_times, generator, grid=batch.sigmas,
                                   **options).to(x0)
        return times, torch.randn((c.num_train_times, *x0.shape), generator=generator).to(x0)

    def loss(self, item: TrainingItem, velocities: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        c, d = self.config, item.data
        T, b = d["t"].shape

        def pairs(name: str) -> Optional[torch.Tensor]:
            v = velocities.get(name)
            return None if v is None else v.reshape(T, b, *v.shape[1:])

        return awm_loss(pairs("theta"), pairs("ref"), pairs("ema"), d["x0"], d["eps"], d["t"], d["advantages"],
                        weighting=c.weighting, ghuber_power=c.ghuber_power, beta=c.beta, ema_beta=c.ema_beta,
                        adv_clip_max=c.adv_clip_max, advantage_max=1.0)
