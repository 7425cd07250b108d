"""The training loop: rollout -> reward -> advantages -> algorithm loss -> optimizer -> snapshots -> ledger.

It is algorithm- and reward-agnostic: everything method-specific comes from the algorithm plugin (what to sample
with, which snapshots to keep, what to train on, the pure loss). The loop owns every model call, gradient
accumulation (on accelerate), evaluation, checkpoints and the cost ledger.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from diffrl_bench.advantages import group_advantages, zero_variance_mask
from diffrl_bench.algorithm import RolloutBatch
from diffrl_bench.checkpoint import load_checkpoint, newest_intact_checkpoint, save_checkpoint
from diffrl_bench.compile import decide_for_run, maybe_compile
from diffrl_bench.config import accepts_argument, algo_config, resolve_sampler_options, save_config
from diffrl_bench.distributed import Processes, make_accelerator, make_generators
from diffrl_bench.ds_checkpoint import load_engine_state, save_engine_state, whole_state_dict
from diffrl_bench.eval_ema import OPTIMIZER_STEP, RL_STEP, eval_ema_decays
from diffrl_bench.evaluate import (EVAL_EMA, EVAL_PREFIX, build_eval_rewards, eval_samplers, eval_snapshot,
                                  evaluate)
from diffrl_bench.flops import BACKWARD_FACTOR, FlopMeter
from diffrl_bench.headline import frame_has, headline_column, metric_column
from diffrl_bench.ledger import CostLedger
from diffrl_bench.recomputation import RecomputationCheck
from diffrl_bench.models import THETA, build_policy, calls_per_velocity, index_condition
from diffrl_bench.plots import plot_reward_vs_cost, save_image_grid
from diffrl_bench.precision import apply_tf32
from diffrl_bench.prompts import load_prompts
from diffrl_bench.prompts import validate_prompt_sources
from diffrl_bench.registry import ALGORITHMS, SAMPLERS
from diffrl_bench.reward_harness import CLOSE_GRACE_S, RewardError, WeightedReward
from diffrl_bench.rollout import sample_chunks
from diffrl_bench.run_guards import (check_device, check_model_path, check_resume_config, is_main_launch_process,
                                     lock_run_dir, non_finite, non_finite_metrics, stop_before_update,
                                     stop_on_metrics)
from diffrl_bench.runlog import MetricsLog, run_info
from diffrl_bench.sampling import Transitions, sigma_grid
from diffrl_bench.threads import apply_threads
from diffrl_bench.trackers import Trackers

log = logging.getLogger("diffrl_bench")

GRID_IMAGES_PER_PROMPT = 4


def output_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir or f"results/runs/{cfg.name}")


def _device_kind(accelerator) -> str:
    if accelerator.device.type == "cuda":
        return torch.cuda.get_device_name(accelerator.device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _reduce_metric(key: str, acc: Optional[torch.Tensor], value: torch.Tensor, weight: float) -> torch.Tensor:
    """Fold one micro-batch's metric into the step's: extremes (`*_max`, `*_min`) by max / min, others by weighted
    mean. In float64 on the metric's device: reading each metric out per item (`float()`) would synchronise a GPU
    about ten times an item and stall its queue; the step's values are read once, at its end."""
    value = value.detach().double()
    if key.endswith("_max"):
        v = value.max()
        return v if acc is None else torch.maximum(acc, v)
    if key.endswith("_min"):
        v = value.min()
        return v if acc is None else torch.minimum(acc, v)
    v = value.mean() * weight
    return v if acc is None else acc + v


class Trainer:
    """One run: builds the policy, the algorithm plugin, rewards, prompts and random streams from a run config, and
    drives RL steps (`rl_step`: `collect` -> `optimize`), evaluations, checkpoints and the cost ledger until the step
    limit or a budget is reached (`run`). Every model call goes through it; the plugin only declares what it needs.
    Multi-process collectives and random streams are in diffrl_bench/distributed.py (`self.processes`)."""

    def __init__(self, cfg: DictConfig, progress: bool = True):
        # Before anything is built or read from the output directory: the checks of diffrl_bench/run_guards.py,
        # the prompt files, and the run directory's lock (held until `run` ends; released if building fails).
        self.out = output_dir_of(cfg)
        check_device(cfg.train.device, torch.cuda.is_available())
        check_model_path(cfg.model)
        self.compile_choice = decide_for_run(cfg)  # `train.compile: on` refused here, before any model work
        self.loaded_prompts = validate_prompt_sources(cfg)
        self.run_lock = lock_run_dir(self.out) if is_main_launch_process() else None
        try:
            check_resume_config(self.out, cfg)
            self._build(cfg, progress)
        except BaseException:
            self.release_run_dir()
            raise

    def release_run_dir(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()

    def _build(self, cfg: DictConfig, progress: bool) -> None:
        self.cfg = cfg
        self.progress = progress
        apply_threads(cfg.train.threads)
        self.accelerator, self.deepspeed = make_accelerator(cfg.train)
        device = self.accelerator.device
        apply_tf32(cfg.train.allow_tf32, device)
        self.processes = Processes(self.accelerator)
        self.world, self.rank = self.processes.world, self.processes.rank
        images = cfg.rollout.prompts_per_step * cfg.rollout.images_per_prompt
        if images % self.world:
            raise ValueError(f"rollout.prompts_per_step x rollout.images_per_prompt = {images} images per step do not "
                             f"split evenly over {self.world} processes")
        if self.deepspeed:
            self._configure_deepspeed()

        with self._models_load_whole():
            self.policy = build_policy(cfg.model, device)
        self.algo = ALGORITHMS.get(cfg.algorithm)(algo_config(cfg), cfg)
        if EVAL_EMA in self.algo.snapshots:
            raise ValueError(f"algorithm {cfg.algorithm!r} declares a snapshot named {EVAL_EMA!r}, which the "
                             f"harness keeps for eval.ema_decay")
        for name in self.algo.snapshots:
            self.policy.add_snapshot(name)
        if cfg.eval.ema_decay > 0:
            self.policy.add_snapshot(EVAL_EMA)
        for sampling in (self.algo.rollout.snapshot, self.algo.rollout.switch_snapshot):
            if sampling not in (None, THETA) and sampling not in self.algo.snapshots:
                raise ValueError(f"algorithm {cfg.algorithm!r} samples with snapshot {sampling!r} "
                                 f"but declares only {list(self.algo.snapshots)}")
        # After the snapshots exist (they are copies of the eager core) and before accelerate wraps it.
        self.compiled = maybe_compile(self.policy, *self.compile_choice)
        o = cfg.optim
        optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=o.lr, betas=tuple(o.betas),
                                      weight_decay=o.weight_decay, eps=o.eps)
        self.policy.module, self.optimizer = self.accelerator.prepare(self.policy.core, optimizer)
        # fp16's dynamic loss scaling overflows by design (the scaler skips that step and lowers the scale): there
        # a non-finite gradient norm is not a failure, and a NaN loss is still caught before it.
        self.loss_scaling = self.accelerator.scaler is not None or bool(
            self.deepspeed and self.policy.module.fp16_enabled())

        self.reward = WeightedReward(dict(cfg.reward.components), OmegaConf.to_container(cfg.reward.options),
                                     worker=cfg.reward.worker, timeout_s=cfg.reward.timeout_s)
        self.eval_rewards = build_eval_rewards(cfg)
        self.train_prompts = self.loaded_prompts["data.train_prompts"]
        self.eval_prompts = self.loaded_prompts["data.eval_prompts"]

        self.generators: Dict[str, torch.Generator] = make_generators(cfg.train.seed, self.rank)
        self.ledger = CostLedger(world_size=self.accelerator.num_processes, device_kind=_device_kind(self.accelerator),
                                 reward_server_devices=cfg.reward.server_devices)
        # Model FLOPs per call, counted once per input shape (diffrl_bench/flops.py), charged where NFEs are.
        self.flop_meter = FlopMeter(self.policy)
        self.sigmas = sigma_grid(cfg.rollout.sampler.grid, cfg.rollout.sampler.num_steps, cfg.rollout.sampler.shift)
        self.sampler = SAMPLERS.get(cfg.rollout.sampler.name)
        # Resolved once: the sampler's signature defaults under the config's options; the algorithm reads them on the batch.
        self.sampler_options = resolve_sampler_options(cfg.rollout.sampler)
        self.step = 0
        self.optimizer_steps = 0
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.out, writable=self.accelerator.is_main_process)
        self.trackers = Trackers(cfg.log.trackers, OmegaConf.to_container(cfg.log.tracker_options), self.out,
                                 self.accelerator.is_main_process)
        self.checkpoints = self.out / "checkpoints"
        self.recomputation: Optional[RecomputationCheck] = None
        if cfg.checkpoint.resume:
            self._maybe_resume()

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every process's equal-sized slice, in rank order (`Processes.gather`)."""
        return self.processes.gather(values)

    def step_group_ids(self) -> torch.Tensor:
        """(P*K,) the prompt group of every image of a step, in the step's image order."""
        r = self.cfg.rollout
        return torch.arange(r.prompts_per_step).repeat_interleave(r.images_per_prompt)

    @contextlib.contextmanager
    def _models_load_whole(self):
        """Under DeepSpeed, build the policy with transformers' DeepSpeed hook unset.

        accelerate registers its DeepSpeed config with transformers whatever `zero3_init_flag` says, and under
        ZeRO-3 transformers' `from_pretrained` then builds every model inside `deepspeed.zero.Init`, sharding
        the frozen text encoders and VAE that DeepSpeed never manages afterwards (a CLIP encoder is left with 0
        position embeddings). Models load whole; `accelerator.prepare` shards the trained one."""
        if not self.deepspeed:
            yield
            return
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            self.accelerator.state.deepspeed_plugin.set_deepspeed_weakref()

    def _configure_deepspeed(self) -> None:
        """Fill the DeepSpeed config values accelerate would infer from a dataloader this loop does not have.

        Gradient accumulation stays with the harness (items per optimizer step vary by algorithm): DeepSpeed sees one
        accumulation step and is told where each optimizer step's boundary is."""
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = self.cfg.train.micro_batch_size
        ds["gradient_accumulation_steps"] = 1
        ds["train_batch_size"] = self.cfg.train.micro_batch_size * self.world
        ds["gradient_clipping"] = float(self.cfg.optim.grad_clip)

    # ----------------------------------------------------------------------------------------------- rollout
    def collect(self) -> RolloutBatch:
        """Sample P prompts x K images with the algorithm's sampling snapshot, scoring chunks as they finish."""
        r = self.cfg.rollout
        P, K = r.prompts_per_step, r.images_per_prompt
        g = self.generators
        # A step draws distinct prompts; validate_prompt_sources refused prompts_per_step > the prompt set.
        chosen = torch.randperm(len(self.train_prompts), generator=g["prompts"])[:P]
        prompts = [self.train_prompts[int(i)] for i in chosen for _ in range(K)]
        group_ids_all = self.step_group_ids()
        shape = self.policy.latent_shape
        if r.same_noise_per_group:
            noise = torch.randn((P, *shape), generator=g["noise"]).repeat_interleave(K, dim=0)
        else:
            noise = torch.randn((P * K, *shape), generator=g["noise"])
        # This process's contiguous slice of the step's images: a prompt's K images may span processes, so
        # rewards are gathered before the group statistics are computed.
        mine = self.processes.local_slice(P * K)
        lo, hi = mine.start, mine.stop
        texts = [p.text for p in prompts[lo:hi]]
        metadata = [p.metadata for p in prompts[lo:hi]]
        group_ids = group_ids_all[lo:hi]
        noise = noise[lo:hi]
        request = self.algo.rollout
        cfg_scale = r.sampler.cfg_scale
        sampler_kwargs = dict(self.sampler_options, generator=g["sampler"])
        if request.record_before is not None:
            sampler_kwargs["record_before"] = request.record_before
            if request.record_means:
                sampler_kwargs["record_means"] = True
        # Samplers that draw something once per rollout (Flow-DPPO's SDE step set) name `rollout_id`.
        if accepts_argument(self.sampler, "rollout_id"):
            sampler_kwargs["rollout_id"] = self.step
        # Samplers that work per prompt group (e.g. a shared ODE prefix) name `groups` in their signature.
        offer_groups = accepts_argument(self.sampler, "groups")
        x0s, transitions, trajectories, futures = [], [], [], []
        with torch.no_grad():
            cond = self.policy.encode_prompts(texts)
            chunks = sample_chunks(self.policy, lambda rows: index_condition(cond, rows), noise, self.sampler,
                                   self.sigmas, sampler_kwargs, snapshot=request.snapshot_at(self.optimizer_steps),
                                   cfg_scale=cfg_scale,
                                   chunk_size=r.chunk_size, groups=group_ids if offer_groups else None,
                                   phase=lambda: self.ledger.phase("rollout"),
                                   keep_trajectory=request.keep_trajectory)
            for chunk, rollout, images in chunks:
                # Every process samples an equal share: the ledger counts them all.
                nfe = rollout.sample_nfe() * calls_per_velocity(cfg_scale)
                self.ledger.add_nfe("rollout", nfe * self.world)
                self.ledger.add_flops("rollout", self.world * (
                    nfe * self.flop_meter.per_sample_forward(rollout.x0.shape, cond, rollout.x0.dtype)
                    + self.flop_meter.decode_flops(rollout.x0.shape)))
                if request.keep_x0:
                    x0s.append(rollout.x0)
                if request.keep_trajectory:
                    trajectories.append(rollout.trajectory)
                if request.record_before is not None:
                    if rollout.transitions is None:
                        raise RuntimeError(f"sampler {r.sampler.name!r} returned no transitions although the "
                                           f"algorithm {self.cfg.algorithm!r} asked for them")
                    transitions.append(rollout.transitions)
                futures.append(self.reward.submit(images, texts[chunk], metadata[chunk]))
            with self.ledger.phase("reward"):
                failure = None
                try:
                    results = [f.result() for f in futures]
                except RewardError as error:
                    failure = error
                # Every process together: one that failed alone would leave the others in `gather_scores`.
                failed = self.processes.failures(None if failure is None else str(failure))
                if failed:
                    raise RewardError("; ".join(failed)) from failure
        self.ledger.add_images(P * K)
        scores = {key: torch.cat([res[key] for res in results]) for key in results[0]}
        step_scores = self.processes.gather_scores(scores)
        rewards = scores.pop(WeightedReward.TOTAL).double()
        advantages = group_advantages(step_scores[WeightedReward.TOTAL], group_ids_all,
                                      std=self.cfg.advantage.std)[lo:hi]
        return RolloutBatch(x0=torch.cat(x0s) if x0s else None, cond=cond, prompts=texts, metadata=metadata,
                            group_ids=group_ids, rewards=rewards, advantages=advantages, reward_components=scores,
                            step_scores=step_scores, step_group_ids=group_ids_all, step_offset=lo,
                            sigmas=self.sigmas, sampler_options=dict(self.sampler_options),
                            transitions=Transitions.cat(transitions) if transitions else None, cfg_scale=cfg_scale,
                            trajectory=torch.cat(trajectories, dim=1) if trajectories else None)

    # ------------------------------------------------------------------------------------------------- train
    def accumulate_gradients(self, batch: RolloutBatch, indices: torch.Tensor) -> Dict[str, float]:
        """Backward the algorithm's loss over `indices` (one optimizer step's share), micro-batch by micro-batch.

        Each item's loss is a mean over its samples, so it is weighted by its share of the step's samples, counted
        over every process: the accumulated gradient is then the same for any micro-batch size and any number of
        processes, also when processes train unequal shares (rft's kept samples, CRD's group blocks). Those then
        run as many items as the busiest process, the extra ones repeats with weight 0: under DeepSpeed every
        forward and backward is a collective.
        """
        items = [item.to_values_device(self.accelerator.device)
                 for item in self.algo.training_items(batch, indices, self.cfg.train.micro_batch_size,
                                                      self.generators["train"])]
        shape = {(tuple(item.snapshots), item.cfg_scale, tuple(sorted(item.snapshot_cfg.items()))) for item in items}
        if len(shape) != 1:
            raise RuntimeError(f"algorithm {self.cfg.algorithm!r} returned {len(items)} training items that do not all "
                               f"evaluate the same snapshots with the same guidance ({sorted(map(str, shape))}); "
                               f"the harness counts and pads them as alike (diffrl_bench/algorithm.py)")
        real = len(items)
        total = sum(len(item.index) for item in items if not item.placeholder)
        passed = sum(len(item.index) for item in items)  # samples through the model, placeholders included
        step_total, most = total, real
        if self.world > 1:
            counts = self.gather(torch.tensor([[total, real, passed, len(items[-1].index)]]))
            step_total, most = int(counts[:, 0].sum()), int(counts[:, 1].max())
            items += [items[-1]] * (most - real)
            # The ledger is the main process's: it is charged every process's passes, repeats included.
            passed = int((counts[:, 2] + (most - counts[:, 1]) * counts[:, 3]).sum())
        sums: Dict[str, torch.Tensor] = {}
        losses: List[torch.Tensor] = []  # read once, before the update (one synchronisation a step on a GPU)
        for k, item in enumerate(items):
            cond = index_condition(batch.cond, item.index)
            with self.accelerator.autocast():
                velocities = {s: self.policy.velocity(item.x, item.sigma, cond, snapshot=s,
                                                      cfg_scale=item.snapshot_cfg.get(s, item.cfg_scale))
                              for s in item.snapshots}
            loss, metrics = self.algo.loss(item, velocities)
            losses.append(loss.detach().double().reshape(()))
            counted = k < real and not item.placeholder
            # DDP and DeepSpeed average the processes' gradients: the world factor makes that the step's mean.
            weight = len(item.index) * self.world / step_total if counted else 0.0
            # Under DDP only the last backward of the step all-reduces; DeepSpeed steps at that boundary.
            last = k == len(items) - 1
            if last:
                # Before that boundary, once per optimizer step and on every process together (a NaN in one
                # process's share would otherwise reach the others through the reduced gradients, or leave them
                # waiting): nothing has been applied yet.
                stop_before_update(self.step + 1, self.processes.failures(self._first_non_finite_loss(losses)))
            if self.deepspeed:
                self.accelerator.gradient_state._set_sync_gradients(last)
                self.accelerator.backward(loss * weight)
            else:
                with contextlib.nullcontext() if last else self.accelerator.no_sync(self.policy.module):
                    self.accelerator.backward(loss * weight)
            if k < real:  # metrics: this process's mean over its own share
                share = len(item.index) / total if counted else float(total == 0)
                for key, value in metrics.items():
                    sums[key] = _reduce_metric(key, sums.get(key), value, share)
        # Every item evaluates the same snapshots with the same guidance (the protocol), so one count serves all.
        item = items[0]
        calls = sum(calls_per_velocity(item.snapshot_cfg.get(s, item.cfg_scale)) for s in item.snapshots)
        self.ledger.add_nfe("train", passed * calls)
        # Only theta's calls carry gradients (snapshots run under no_grad): they alone are backpropagated.
        backward = calls_per_velocity(item.snapshot_cfg.get(THETA, item.cfg_scale)) if THETA in item.snapshots else 0
        per_call = self.flop_meter.per_sample_forward(item.x.shape, batch.cond, item.x.dtype)
        self.ledger.add_flops("train", passed * (calls + BACKWARD_FACTOR * backward) * per_call)
        return {key: float(value) for key, value in sums.items()}

    def _first_non_finite_loss(self, losses: List[torch.Tensor]) -> Optional[str]:
        """This process's first non-finite item loss of the optimizer step, named, or None."""
        for value in torch.stack(losses).tolist():
            problem = non_finite(value, f"the loss of algorithm {self.cfg.algorithm!r}")
            if problem:
                return problem
        return None

    def optimize(self, batch: RolloutBatch) -> Dict[str, float]:
        """The algorithm's loss over the batch, split into `optimizer_steps_per_rollout` optimizer steps."""
        n_steps = self.cfg.train.optimizer_steps_per_rollout
        sums: Dict[str, torch.Tensor] = {}
        grad_norms = []
        size = batch.rewards.shape[0]
        order = torch.randperm(size, generator=self.generators["train"]) if self.cfg.train.shuffle else torch.arange(size)
        for indices in order.chunk(n_steps):
            for key, value in self.accumulate_gradients(batch, indices).items():
                sums[key] = _reduce_metric(key, sums.get(key), torch.tensor(value), 1.0 / n_steps)
            # The total gradient norm, checked whether or not it clips: grad_clip 0 takes it with max_norm inf,
            # which scales by exactly 1. DeepSpeed clips inside its own step (gradient_clipping) and reports the
            # global norm (inf when it skipped the step on non-finite gradients).
            clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
            norm = self.accelerator.clip_grad_norm_(self.policy.trainable_parameters(), clip)
            problem = None
            if norm is not None and (math.isfinite(float(norm)) or not self.loss_scaling):
                grad_norms.append(float(norm))
                problem = non_finite(grad_norms[-1], "the gradient norm")
            stop_before_update(self.step + 1, self.processes.failures(problem))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer_steps += 1
            self._step_eval_ema(OPTIMIZER_STEP, self.optimizer_steps)
        decays = {}
        for name, schedule in self.algo.snapshots.items():
            if schedule is not None:
                decays[name] = schedule(self.optimizer_steps)
                self.policy.update_snapshot(name, decays[name])
        row = {f"loss/{k}": float(v) for k, v in sums.items()}
        if grad_norms:
            row["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
        row.update({f"train/decay_{name}": d for name, d in decays.items()})
        row["train/optimizer_steps"] = self.optimizer_steps
        return row

    def _step_eval_ema(self, unit: str, count: int) -> None:
        """Move the evaluation EMA after the `count`-th completed `unit`, on the clock `eval.ema_*` sets."""
        for decay in eval_ema_decays(self.cfg.eval, unit, count):
            self.policy.update_snapshot(EVAL_EMA, decay)

    def rl_step(self) -> Dict[str, float]:
        start = time.perf_counter()
        batch = self.collect()
        with self.ledger.phase("train"):
            row = self.optimize(batch)
        self.step += 1
        self._step_eval_ema(RL_STEP, self.step)
        row["step"] = self.step
        # Every process's scores were gathered once, in collect: logging needs no further collective.
        rewards = batch.step_scores[WeightedReward.TOTAL]
        row["reward/mean"] = rewards.mean().item()
        row["reward/std"] = rewards.std(unbiased=False).item()
        for key in batch.reward_components:
            row[f"reward/{key}"] = batch.step_scores[key].mean().item()
        row["train/zero_variance_frac"] = zero_variance_mask(rewards, batch.step_group_ids).double().mean().item()
        row["train/step_s"] = time.perf_counter() - start
        row.update(self.ledger.columns())
        # Before the row is written or a checkpoint saved; loss/* metrics are each process's own share.
        stop_on_metrics(self.step, self.processes.failures(non_finite_metrics(row)))
        return row

    # ----------------------------------------------------------------------------------------- eval, save, run
    def run_eval(self, tag: str) -> Dict[str, float]:
        metrics: Dict[str, float] = {}
        grids = []
        evaluations = eval_samplers(self.cfg.eval)
        for prefix, sampler in evaluations:
            with self.ledger.phase("eval"):
                scores, images, nfe = evaluate(self.policy, self.eval_prompts, self.cfg.eval, self.eval_rewards,
                                               snapshot=eval_snapshot(self.cfg.eval), progress=self.progress,
                                               timeout_s=self.cfg.reward.timeout_s, sampler=sampler, prefix=prefix)
            self.ledger.add_nfe("eval", nfe)
            self.ledger.add_flops("eval", self._eval_flops(nfe, images.shape[0]))
            metrics.update(scores)
            # grid_<tag>.png for eval.sampler (what the README and report show), grid_<tag>_<name>.png for the others.
            name = f"grid_{tag}{prefix[len(EVAL_PREFIX):]}"
            self._save_grid(images, name, sampler.name if len(evaluations) > 1 else None)
            grids.append((prefix, name))
        row = {"step": self.step, **metrics, **self.ledger.columns()}
        self.metrics.append(row)
        if self.recomputation is not None:
            self.recomputation.check(row)
        self.trackers.log(row, self.step)
        for prefix, name in grids:
            self.trackers.log_images(f"{prefix}/{name}", self.out / f"{name}.png", self.step)
        headline = self.headline_key(lambda column: column in metrics)
        log.info("eval at step %d: %s = %.4f", self.step, headline, metrics.get(headline, float("nan")))
        return row

    def _save_grid(self, images: torch.Tensor, name: str, sampler: Optional[str]) -> None:
        n = min(self.cfg.eval.grid_prompts, len(self.eval_prompts))
        k = self.cfg.eval.images_per_prompt
        shown = min(GRID_IMAGES_PER_PROMPT, k)
        picks = torch.cat([images[i * k:i * k + shown] for i in range(n)])
        if self.accelerator.is_main_process:
            title = name.removeprefix("grid_") + (f", {sampler}" if sampler else "")
            save_image_grid(picks, [p.text for p in self.eval_prompts[:n]], self.out / f"{name}.png",
                            per_prompt=shown, title=f"{self.cfg.name}: {title} (step {self.step})")

    def _eval_flops(self, nfe: int, images: int) -> int:
        """FLOPs of an evaluation's `nfe` velocity calls and `images` decodes; prompts encode to one shape."""
        shape = (1, *self.policy.latent_shape)
        if getattr(self, "_eval_cond", None) is None:
            self._eval_cond = self.policy.encode_prompts([self.eval_prompts[0].text])
        cond = self._eval_cond
        return nfe * self.flop_meter.per_sample_forward(shape, cond) + images * self.flop_meter.decode_flops(shape)

    def headline_key(self, has: Callable[[str], bool]) -> str:
        """The headline column among those `has` accepts (diffrl_bench/headline.py: the report's rule too)."""
        return headline_column(list(self.cfg.eval.rewards), has)

    def save(self) -> None:
        generators = self.processes.generators_by_rank(self.generators)  # a collective: every process takes part
        # Under DeepSpeed each process writes its engine partition, and ZeRO-3 weights are gathered: collectives too.
        engine_state = model = None
        if self.deepspeed:
            engine_state = save_engine_state(self.policy.module, self.checkpoints, self.step, self.accelerator)
            model = whole_state_dict(self.policy.core, keep=self.accelerator.is_main_process)
        snapshots = self.policy.snapshot_state_dict()  # gathers LoRA snapshot adapters under ZeRO-3: all processes
        if self.accelerator.is_main_process:
            trainer_state = {"step": self.step, "optimizer_steps": self.optimizer_steps,
                             "ledger": self.ledger.state_dict(), "world_size": self.world}
            save_checkpoint(self.checkpoints, self.step, model=model if model is not None else self.policy.core,
                            optimizer=None if self.deepspeed else self.optimizer, engine_state=engine_state,
                            snapshots=snapshots, generators=generators,
                            trainer_state=trainer_state, keep_last=self.cfg.checkpoint.keep_last)
        self.accelerator.wait_for_everyone()

    def _maybe_resume(self) -> None:
        path = newest_intact_checkpoint(self.checkpoints)
        if path is None:
            # Rows of an attempt that died before its first checkpoint would be redone: keep them, but aside.
            moved = self.metrics.set_aside()
            if moved is not None:
                log.info("no checkpoint to resume from; earlier metrics moved aside (%s)", moved)
            self._start_recomputation_check()
            return
        state, snapshots = load_checkpoint(path, model=self.policy.core, optimizer=self.optimizer,
                                           generators=self.processes.own_generators(self.generators),
                                           engine=self.deepspeed)
        if self.deepspeed:  # the engine's weights and optimizer partitions; load_checkpoint verified the files
            load_engine_state(self.policy.module, path, self.checkpoints, verify=False)
        self.policy.load_snapshot_state_dict(snapshots)
        self.step, self.optimizer_steps = state["step"], state["optimizer_steps"]
        self.ledger.load_state_dict(state["ledger"])
        dropped = self.metrics.truncate_after(self.step)
        log.info("resumed from %s (step %d; %d later metric rows will be redone)", path, self.step, dropped)
        self._start_recomputation_check()

    def _eval_held(self) -> bool:
        # The main process compares the rows; every process must agree, since evaluating is a collective.
        held = self.recomputation is not None and self.recomputation.holds_eval(self.step)
        return self.processes.broadcast_flag(held)

    def _start_recomputation_check(self) -> None:
        # A run that once restarted from step 0 over a set-aside table keeps being compared with it across resumes;
        # the rows kept from earlier attempts are compared again, so a difference found then is named again now.
        if not self.accelerator.is_main_process:
            return
        self.recomputation = RecomputationCheck.for_run(self.out)
        for row in self.metrics.rows() if self.recomputation is not None else []:
            self.recomputation.check(row)

    def finished(self) -> bool:
        """The step limit, or a GPU-hour / NFE / FLOP budget (when set), is reached."""
        t = self.cfg.train
        if self.step >= t.steps:
            return True
        spent = (t.budget_gpu_hours > 0 and self.ledger.gpu_hours >= t.budget_gpu_hours) or (
            t.budget_nfe > 0 and self.ledger.budget_nfe >= t.budget_nfe) or (
            t.budget_flops > 0 and self.ledger.budget_flops >= t.budget_flops)
        # Each process times itself; the main process decides for all, or they would stop at different steps.
        return self.processes.broadcast_flag(spent)

    def run(self) -> Path:
        cfg = self.cfg
        if self.accelerator.is_main_process:
            save_config(cfg, self.out / "config.yaml")
            (self.out / "run_info.json").write_text(json.dumps(run_info(self.ledger.device_kind, self.ledger.world_size),
                                                               indent=2))
            # Before any work: a tracker that cannot start stops the run here, naming it.
            self.trackers.start(cfg.name, OmegaConf.to_container(cfg, resolve=True),
                                json.loads((self.out / "run_info.json").read_text()), group=cfg.log.group or None,
                                tags=OmegaConf.to_container(cfg.log.tags))
        log.info("run %s: %s on %s, %d steps -> %s", cfg.name, cfg.algorithm, self.ledger.device_kind, cfg.train.steps, self.out)
        if self.step == 0 and cfg.eval.every >= 0:
            self.run_eval("start")
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc=cfg.name, unit="step", disable=not self.progress)
        interrupted = False
        try:
            # Asked once per step: under several processes `finished` is a collective.
            last = self.finished()
            while not last:
                row = self.rl_step()
                self.metrics.append(row)
                if self.recomputation is not None:
                    self.recomputation.check(row)
                self.trackers.log(row, row["step"])
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward/mean']:.3f}", gpu_h=f"{row['cost/gpu_hours']:.4f}")
                last = self.finished()
                if not last and cfg.eval.every > 0 and self.step % cfg.eval.every == 0 and not self._eval_held():
                    self.run_eval(f"step{self.step:05d}")
                if not last and cfg.checkpoint.every > 0 and self.step % cfg.checkpoint.every == 0:
                    self.save()
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            bar.close()
            # Ctrl-C means now; after any other stop the chunk still being scored may finish first.
            self.reward.close(grace_s=0 if interrupted else CLOSE_GRACE_S)
        # A run killed after its last checkpoint but after its end eval must not log that eval twice.
        if cfg.eval.every >= 0 and not self.metrics.has_eval_at(self.step):
            self.run_eval("end")
        if cfg.checkpoint.every > 0:
            self.save()
        if self.accelerator.is_main_process:
            frame = self.metrics.write_csv()
            has = frame_has(frame)
            heldout = [metric_column(r, has) for r in cfg.eval.rewards[1:]]
            plot_reward_vs_cost(frame, self.out / "reward_vs_cost.png", self.headline_key(has),
                                heldout=[column for column in heldout if column is not None],
                                title=f"{cfg.name} ({cfg.algorithm})")
        self.accelerator.wait_for_everyone()
        log.info("done: results in %s", self.out)
        self.release_run_dir()
        return self.out


def train(cfg: DictConfig, progress: bool = True) -> Path:
    trainer = Trainer(cfg, progress=progress)
    try:
        out = trainer.run()
    except BaseException:
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            trainer.trackers.finish()
        raise
    finally:
        trainer.release_run_dir()
    trainer.trackers.finish()
    return out
