"""The one sampling loop (diffrl_bench/rollout.py): chunks, conditioning, groups and the per-chunk phase."""
import contextlib

import torch

from diffrl_bench.rollout import sample_chunks
from diffrl_bench.sampling import Rollout, flow_sigmas


class FakePolicy:
    """Velocity = the conditioning (one number per row); decode = identity."""

    device = torch.device("cpu")

    def velocity(self, x, sigma, cond, *, snapshot, cfg_scale):
        assert snapshot == "old" and cfg_scale == 2.0
        return cond.reshape(-1, *([1] * (x.ndim - 1))).expand_as(x)

    def decode(self, latents):
        return latents


def test_chunks_cover_every_row_with_its_own_conditioning_groups_and_phase():
    cond = torch.arange(7, dtype=torch.float32)
    noise = torch.zeros(7, 1, 2)
    seen_groups, phases = [], []

    def sampler(velocity_fn, x, sigmas, *, groups=None, generator=None):
        seen_groups.append(groups.tolist())
        v = velocity_fn(x, torch.ones(x.shape[0]))
        return Rollout(x0=x + v, sigmas=sigmas, nfe=1)

    @contextlib.contextmanager
    def phase():
        phases.append("in")
        yield
        phases.append("out")

    chunks = list(sample_chunks(FakePolicy(), lambda rows: cond[rows], noise, sampler, flow_sigmas(1), {},
                                snapshot="old", cfg_scale=2.0, chunk_size=3, groups=torch.arange(7) // 2,
                                phase=phase))
    assert [c for c, _, _ in chunks] == [slice(0, 3), slice(3, 6), slice(6, 7)]
    images = torch.cat([img for _, _, img in chunks])
    assert torch.equal(images[:, 0, 0], cond)  # row i sampled with row i's conditioning
    assert seen_groups == [[0, 0, 1], [1, 2, 2], [3]]
    assert phases == ["in", "out"] * 3


def test_rows_argument_selects_a_subset_of_the_chunks_conditioning():
    cond = torch.tensor([10.0, 20.0, 30.0])

    def sampler(velocity_fn, x, sigmas, generator=None):
        v = velocity_fn(x[[2]], torch.ones(1), rows=torch.tensor([2]))  # one representative row
        return Rollout(x0=v.expand_as(x), sigmas=sigmas, nfe=1)

    (_, rollout, _), = sample_chunks(FakePolicy(), lambda rows: cond[rows], torch.zeros(3, 1), sampler,
                                     flow_sigmas(1), {}, snapshot="old", cfg_scale=2.0, chunk_size=3)
    assert torch.all(rollout.x0 == 30.0)
