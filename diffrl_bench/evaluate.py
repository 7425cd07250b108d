"""Held-out evaluation: fixed-noise samples on the eval prompts, scored by the training reward and held-out rewards.

The noise is drawn from `eval.seed` only, so every evaluation of every run sees the same starting points and
curves are paired across steps, seeds and algorithms. Besides per-image means, each score is averaged per task
family (the metadata's `tag`) and over families (`<score>.task_mean`, GenEval's overall-score convention).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from diffrl_bench.config import accepts_argument, resolve_sampler_options
from diffrl_bench.models import THETA, calls_per_velocity
from diffrl_bench.prompts import Prompt
from diffrl_bench.registry import REWARDS, SAMPLERS
from diffrl_bench.reward_harness import DEFAULT_TIMEOUT_S, build_reward, call_reward_within
from diffrl_bench.rollout import sample_chunks
from diffrl_bench.sampling import sigma_grid


@torch.no_grad()
def generate(policy, prompts: Sequence[str], noise: torch.Tensor, sampler_cfg, *, snapshot: str = THETA,
             batch_size: int = 256, progress: bool = False, seed: int = 0) -> Tuple[torch.Tensor, int]:
    """Images in [0, 1] for `prompts` from the given initial noise; returns (images, NFEs per sample x samples)."""
    sigmas = sigma_grid(sampler_cfg.grid, sampler_cfg.num_steps, sampler_cfg.shift)
    # A stochastic eval sampler draws its noise from a fixed stream too, so evaluations stay paired.
    kwargs = dict(resolve_sampler_options(sampler_cfg), generator=torch.Generator().manual_seed(seed))
    sampler = SAMPLERS.get(sampler_cfg.name)
    # A sampler that draws something once per rollout (Flow-DPPO's SDE step set) draws it from the eval seed: the
    # evaluation is one rollout, the same one at every evaluation, so the training sampler can be evaluated too.
    if accepts_argument(sampler, "rollout_id"):
        kwargs["rollout_id"] = seed
    # Each chunk's prompts are encoded as it is sampled, so a large eval set is never encoded at once.
    chunks = sample_chunks(policy, lambda rows: policy.encode_prompts(list(prompts[rows])), noise,
                           sampler, sigmas, kwargs, snapshot=snapshot,
                           cfg_scale=sampler_cfg.cfg_scale, chunk_size=batch_size)
    images, nfe = [], 0
    total = -(-len(prompts) // batch_size)
    for _, rollout, chunk_images in tqdm(chunks, total=total, desc="eval", leave=False, disable=not progress):
        nfe += rollout.sample_nfe() * calls_per_velocity(sampler_cfg.cfg_scale)
        images.append(chunk_images)
    return torch.cat(images), nfe


def build_eval_rewards(cfg) -> Dict[str, object]:
    """The rewards scored at evaluation (`eval.rewards`), each with its options from `reward.options`, less the
    options its class lists in `train_only_options` (e.g. geneval's `jpeg_quality`: every arm's evaluation scores
    the same lossless images, whatever client its training mimics)."""
    options = OmegaConf.to_container(cfg.reward.options)
    rewards = {}
    for name in cfg.eval.rewards:
        drop = set(getattr(REWARDS.get(name), "train_only_options", ()))
        kept = {key: value for key, value in (options.get(name) or {}).items() if key not in drop}
        rewards[name] = build_reward(name, kept)
    return rewards


def eval_noise(num: int, latent_shape, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((num, *latent_shape), generator=generator)


EVAL_EMA = "eval_ema"
"""the snapshot evaluated when `eval.ema_decay > 0`: an exponential moving average of theta's weights"""


def eval_snapshot(eval_cfg) -> str:
    """Which snapshot the evaluation samples with: `eval_ema` when the run keeps one, else theta."""
    return EVAL_EMA if eval_cfg.ema_decay > 0 else THETA


EVAL_PREFIX = "eval"
"""metrics of the evaluation with `eval.sampler`: `eval/<reward>...` (the headline and every report read these)"""


def eval_samplers(eval_cfg) -> List[Tuple[str, object]]:
    """(metric prefix, sampler config) of each evaluation a run makes: `eval.sampler` under `eval/`, then each of
    `eval.extra_samplers` under `eval_<name>/`, in the config's order."""
    extra = getattr(eval_cfg, "extra_samplers", None) or {}
    return [(EVAL_PREFIX, eval_cfg.sampler)] + [(f"{EVAL_PREFIX}_{name}", cfg) for name, cfg in extra.items()]


def evaluate(policy, prompts: List[Prompt], eval_cfg, rewards: Dict[str, object], *, snapshot: str = THETA,
             progress: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S, sampler=None,
             prefix: str = EVAL_PREFIX) -> Tuple[Dict[str, float], torch.Tensor, int]:
    """Returns (metrics under `<prefix>/`, images ordered prompt-major, NFEs used), sampled with `snapshot` and
    `sampler` (default `eval.sampler`). Every sampler starts from the same noise, so two samplers' scores are
    paired image by image.

    Each reward's scoring call is bounded by `timeout_s` (reward.timeout_s) like training's: a hung reward
    server stops the evaluation naming the reward."""
    k = eval_cfg.images_per_prompt
    texts = [p.text for p in prompts for _ in range(k)]
    metadata = [p.metadata for p in prompts for _ in range(k)]
    noise = eval_noise(len(texts), policy.latent_shape, eval_cfg.seed)
    images, nfe = generate(policy, texts, noise, sampler if sampler is not None else eval_cfg.sampler,
                           snapshot=snapshot, batch_size=eval_cfg.batch_size, progress=progress,
                           seed=eval_cfg.seed + 1)
    scores: Dict[str, torch.Tensor] = {}
    for name, reward in rewards.items():
        scores.update(call_reward_within(timeout_s, name, reward, images, texts, metadata))
    return summarize(scores, metadata, prefix), images, nfe


def summarize(scores: Dict[str, torch.Tensor], metadata: List[dict], prefix: str = EVAL_PREFIX) -> Dict[str, float]:
    metrics: Dict[str, float] = {}
    tags = [m.get("tag") for m in metadata]
    by_tag: Dict[str, List[int]] = defaultdict(list)
    for i, tag in enumerate(tags):
        if tag is not None:
            by_tag[tag].append(i)
    for key, values in scores.items():
        values = values.double()
        metrics[f"{prefix}/{key}"] = values.mean().item()
        if by_tag:
            per_tag = {tag: values[idx].mean().item() for tag, idx in by_tag.items()}
            for tag, value in per_tag.items():
                metrics[f"{prefix}/{key}@{tag}"] = value
            metrics[f"{prefix}/{key}.task_mean"] = sum(per_tag.values()) / len(per_tag)
    metrics[f"{prefix}/images"] = len(metadata)
    return metrics
