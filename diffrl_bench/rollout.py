"""The one sampling loop: a policy snapshot samples images chunk by chunk, for training rollouts (Trainer.collect)
and for evaluation (evaluate.generate) alike.

Each chunk's conditioning comes from `condition(chunk)` (training encodes the step's prompts once and indexes them;
evaluation encodes each chunk as it goes, so a large eval set is never encoded at once). The velocity handed to the
sampler evaluates `snapshot` with `cfg_scale` and accepts `rows=` (a sampler working on one representative per
prompt group asks for a subset of the chunk's rows).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Dict, Iterator, Optional, Tuple

import torch

from diffrl_bench.models import index_condition
from diffrl_bench.sampling import Rollout, StateRecorder


def sample_chunks(policy, condition: Callable[[slice], Any], noise: torch.Tensor, sampler: Callable,
                  sigmas: torch.Tensor, sampler_kwargs: Dict[str, Any], *, snapshot: str, cfg_scale: float,
                  chunk_size: int, groups: Optional[torch.Tensor] = None,
                  phase: Callable[[], ContextManager] = contextlib.nullcontext, keep_trajectory: bool = False,
                  ) -> Iterator[Tuple[slice, Rollout, torch.Tensor]]:
    """Yield `(chunk, rollout, images)` for consecutive chunks of `noise`'s rows; images decoded to [0, 1] on the CPU.

    Args:
        condition: the conditioning of a chunk of rows.
        sampler_kwargs: the sampler's options and harness arguments (generator, record_before, ...).
        groups: (B,) prompt-group ids, passed to the sampler per chunk as `groups` when given.
        phase: a context entered around each chunk's sampling and decoding (the cost ledger's rollout phase), so
            the caller's work between chunks (submitting rewards) stays outside it.
        keep_trajectory: set `rollout.trajectory` (N+1, B, ...), the latent at each grid point, final sample last;
            the sampler must evaluate the model once per step on the whole chunk (euler, dpm2, an SDE without a
            shared prefix), which is checked.
    """
    total = noise.shape[0]
    for start in range(0, total, chunk_size):
        chunk = slice(start, min(start + chunk_size, total))
        with phase():
            chunk_cond = condition(chunk)

            def velocity(x, sigma, rows=None, c=chunk_cond):
                c = c if rows is None else index_condition(c, rows)
                return policy.velocity(x, sigma, c, snapshot=snapshot, cfg_scale=cfg_scale)

            kwargs = sampler_kwargs if groups is None else dict(sampler_kwargs, groups=groups[chunk])
            field = StateRecorder(velocity) if keep_trajectory else velocity
            rollout = sampler(field, noise[chunk].to(policy.device), sigmas, **kwargs)
            if keep_trajectory:
                rollout.trajectory = _trajectory(field, rollout, sigmas)
            images = policy.decode(rollout.x0).cpu()
        yield chunk, rollout, images


def _trajectory(recorder: StateRecorder, rollout: Rollout, sigmas: torch.Tensor) -> torch.Tensor:
    """The recorded states plus the final sample, checked to be one whole-chunk state per grid step."""
    num_steps = len(sigmas) - 1
    rows = rollout.x0.shape[0]
    if not torch.equal(rollout.sigmas.to(sigmas), sigmas):
        raise ValueError("keep_trajectory stores latents at the rollout grid's times, but the sampler integrated over "
                         "another grid (the diffusers sampler's first_sigma / last_sigma_ratio edit it)")
    if len(recorder.states) != num_steps or any(state.shape[0] != rows for state in recorder.states):
        raise ValueError(f"keep_trajectory needs a sampler that evaluates the model once per step on every row; "
                         f"got {len(recorder.states)} evaluations for {num_steps} steps")
    return recorder.trajectory(rollout.x0)
