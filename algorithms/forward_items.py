"""Training items of the forward-process methods (NFT, ELBO/FM estimators, RFT): noised copies of final samples.

Each selected sample is noised at T training times with fresh noise per (sample, time): `x_t = (1 - t) x0 + t eps`.
The (time, sample) pairs are flattened time-major and cut into micro-batches of `micro_batch_size` pairs, so one
forward can cover several training times. The caller draws the times (its own distribution) before this draws the
noise, for the whole optimizer step at once: the gradient then does not depend on the micro-batch size.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from diffrl_bench.algorithm import TrainingItem
from diffrl_bench.flow import forward_noise


def forward_process_items(x0: torch.Tensor, index: torch.Tensor, times: torch.Tensor, generator: torch.Generator,
                          micro_batch_size: int, snapshots: Sequence[str],
                          per_sample: Optional[Dict[str, torch.Tensor]] = None,
                          snapshot_cfg: Optional[Dict[str, float]] = None) -> List[TrainingItem]:
    """Items over (time, sample) pairs; `data` holds x0, eps, t and each `per_sample` tensor's rows.

    Args:
        x0: (B, ...) the selected final samples; index: (B,) their positions in the rollout batch.
        times: (T, B) training times on the 0-1 scale, as `sample_train_times` returns them.
        generator: draws the (T, B, ...) noise, after the caller drew the times.
        per_sample: tensors of shape (B,) (advantages, rewards, ...) carried to each pair.
    """
    times = times.to(x0.dtype)
    T, B = times.shape
    eps = torch.randn((T, *x0.shape), generator=generator).to(x0)
    pair_sample = torch.arange(B).repeat(T)  # time-major: pairs 0..B-1 are time 0, and so on
    flat_t, flat_eps = times.reshape(-1), eps.reshape(T * B, *x0.shape[1:])
    items = []
    for start in range(0, T * B, micro_batch_size):
        pairs = slice(start, start + micro_batch_size)
        rows = pair_sample[pairs]
        t, noise, clean = flat_t[pairs], flat_eps[pairs], x0[rows]
        data = {"x0": clean, "eps": noise, "t": t}
        data.update({key: value[rows] for key, value in (per_sample or {}).items()})
        items.append(TrainingItem(index=index[rows], x=forward_noise(clean, noise, t), sigma=t,
                                  snapshots=tuple(snapshots), snapshot_cfg=dict(snapshot_cfg or {}), data=data))
    return items
