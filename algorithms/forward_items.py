"""Training items of the forward-process methods (NFT, ELBO/FM estimators, RFT): noised copies of final samples.

Each selected sample is noised at T training times with fresh noise per (sample, time): `x_t = (1 - t) x0 + t eps`.
The (time, sample) pairs are flattened time-major and cut into micro-batches of `micro_batch_size` pairs, so one
forward can cover several training times. The caller draws the times (its own distribution) before this draws the
noise, for the whole optimizer step at once: the gradient then does not depend on the micro-batch size.

Instead of fresh noise, x_t can be the rollout's own latent at that time (the ELBO-PG original's `XT_FROM_LATENTS`);
the noise is then the one that puts that latent on the straight path from x0 (`noise_from_latent`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from diffrl_bench.algorithm import TrainingItem
from diffrl_bench.flow import forward_noise

LATENT_T_FLOOR = 1e-6
"""The original divides by `max(t, 1e-6)` when it back-solves the noise of a stored latent."""


def noise_from_latent(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`(x_t - (1 - t) x0) / max(t, 1e-6)`: the noise for which `x_t = (1 - t) x0 + t noise` (t per sample, (B,)).

    With an ODE rollout x_t is the sampler's latent at t, which lies off the straight path to the final x0 in
    general; the back-solved noise makes the flow-matching target `noise - x0 = (x_t - x0) / t` point from x0 to it
    [jaemoo-choi/rethinking-diffusion-rl@c2570002:src/utils/base.py:533-539]."""
    tb = t.to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    return (x_t - (1 - tb) * x0) / tb.clamp(min=LATENT_T_FLOOR)


def forward_process_items(x0: torch.Tensor, index: torch.Tensor, times: torch.Tensor, generator: torch.Generator,
                          micro_batch_size: int, snapshots: Sequence[str],
                          per_sample: Optional[Dict[str, torch.Tensor]] = None,
                          snapshot_cfg: Optional[Dict[str, float]] = None,
                          latents: Optional[torch.Tensor] = None,
                          noise_groups: Optional[torch.Tensor] = None, num_noise_groups: Optional[int] = None,
                          blocks: Optional[Sequence[torch.Tensor]] = None) -> List[TrainingItem]:
    """Items over (time, sample) pairs; `data` holds x0, eps, t and each `per_sample` tensor's rows.

    Args:
        x0: (B, ...) the selected final samples; index: (B,) their positions in the rollout batch.
        times: (T, B) training times on the 0-1 scale, as `sample_train_times` returns them.
        generator: draws the (T, B, ...) noise, after the caller drew the times.
        per_sample: tensors of shape (B,) (advantages, rewards, ...) carried to each pair.
        latents: (T, B, ...) the rollout's latents at `times`; when given, x_t is that latent and `eps` the noise
            `noise_from_latent` back-solves (the generator still draws noise, so the random stream is the same).
        noise_groups: (B,) labels in `[0, G)`: samples with the same label share one noise per time (DGPO's
            `use_shared_noise`). (T, G, ...) noises are drawn, G = `num_noise_groups` (default: the largest label + 1);
            give the whole step's label count (e.g. from `RolloutBatch.whole_step()`) and a generator that is the
            same on every process, and processes holding parts of a group draw the same noise for it.
        blocks: partition of `range(B)` into blocks that items must not split (e.g. whole prompt groups); items then
            take whole blocks of one time up to `micro_batch_size` pairs (at least one block). Default: the pairs are
            cut every `micro_batch_size`.
    """
    times = times.to(x0)  # drawn on the generator's device (CPU), trained where x0 lives
    T, B = times.shape
    if noise_groups is None:
        eps = torch.randn((T, *x0.shape), generator=generator).to(x0)
    else:
        labels = noise_groups.long()
        if labels.shape != (B,) or (labels.numel() and int(labels.min()) < 0):
            raise ValueError(f"noise_groups must be (B,)=({B},) non-negative labels, got shape {tuple(labels.shape)}")
        G = int(labels.max()) + 1 if num_noise_groups is None else num_noise_groups
        if G < int(labels.max()) + 1:
            raise ValueError(f"num_noise_groups={G} is below the largest noise group label {int(labels.max())}")
        group_noise = torch.randn((T, G, *x0.shape[1:]), generator=generator).to(x0)
        eps = group_noise[:, labels]
    if latents is not None:
        if latents.shape != eps.shape:
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not match (times, samples, ...) = "
                             f"{tuple(eps.shape)}")
        latents = latents.to(x0)
        eps = torch.stack([noise_from_latent(latents[k], x0, times[k]) for k in range(T)])
    pair_sample = torch.arange(B).repeat(T)  # time-major: pairs 0..B-1 are time 0, and so on
    flat_t, flat_eps = times.reshape(-1), eps.reshape(T * B, *x0.shape[1:])
    items = []
    for pairs in _pair_chunks(T, B, micro_batch_size, blocks):
        rows = pair_sample[pairs]
        t, noise, clean = flat_t[pairs], flat_eps[pairs], x0[rows]
        data = {"x0": clean, "eps": noise, "t": t}
        data.update({key: value[rows] for key, value in (per_sample or {}).items()})
        x_t = forward_noise(clean, noise, t) if latents is None else latents.reshape(T * B, *x0.shape[1:])[pairs]
        items.append(TrainingItem(index=index[rows], x=x_t, sigma=t,
                                  snapshots=tuple(snapshots), snapshot_cfg=dict(snapshot_cfg or {}), data=data))
    return items


def _pair_chunks(T: int, B: int, micro_batch_size: int, blocks: Optional[Sequence[torch.Tensor]]):
    """Index sets into the time-major pairs: plain cuts, or whole blocks of one time packed up to the size."""
    if blocks is None:
        for start in range(0, T * B, micro_batch_size):
            yield torch.arange(start, min(start + micro_batch_size, T * B))
        return
    covered = torch.sort(torch.cat([torch.as_tensor(b).long() for b in blocks])).values
    if not torch.equal(covered, torch.arange(B)):
        raise ValueError(f"blocks must partition the {B} samples exactly once")
    for k in range(T):
        current: List[torch.Tensor] = []
        size = 0
        for block in blocks:
            block = torch.as_tensor(block).long()
            if current and size + len(block) > micro_batch_size:
                yield torch.cat(current)
                current, size = [], 0
            current.append(k * B + block)
            size += len(block)
        if current:
            yield torch.cat(current)
