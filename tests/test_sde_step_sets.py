"""General options of the SDE rollout sampler, each on its own: a per-rollout set of non-contiguous SDE steps
(`sde_pool` / `sde_count`, or `sde_steps`), stored behaviour step means (`record_means`), and transitions that keep
each step's before/after state when the steps are not consecutive."""
import numpy as np
import pytest
import torch

from diffrl_bench.algorithm import RolloutBatch
from diffrl_bench.algorithms.transition_items import transition_items
from diffrl_bench.sampling import StateRecorder, Transitions, flow_sigmas
from diffrl_bench.sde import draw_sde_steps, flow_grpo_sde_sample, sde_step_logprob, stochastic_steps
from sde_checks import assert_stochastic_exactly_on, linear_field  # tests/sde_checks.py


_field = linear_field


SIGMAS = flow_sigmas(10, 3.0)


def test_draw_is_unirls_seeded_choice_without_replacement():
    seen = set()
    for rollout_id in range(60):
        steps = draw_sde_steps(rollout_id, (0, 5), 3)
        # UniRL's AllSDEScheduler: numpy default_rng(rollout id).choice(pool, 3, replace=False), sorted.
        expected = sorted(np.random.default_rng(rollout_id).choice(np.arange(5), size=3, replace=False).tolist())
        assert steps == expected and len(set(steps)) == 3 and all(0 <= s < 5 for s in steps)
        seen.add(tuple(steps))
    assert len(seen) == 10  # every 3-subset of 5 steps is reachable
    assert draw_sde_steps(7, (2, 5), 3) == [2, 3, 4]
    with pytest.raises(ValueError, match="sde_count"):
        draw_sde_steps(0, (0, 5), 6)


def test_step_set_is_the_seeded_one_and_ode_elsewhere():
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    recorder = StateRecorder(_field)
    out = flow_grpo_sde_sample(recorder, x, SIGMAS, sde_pool=[0, 5], sde_count=3, rollout_id=11,
                               generator=torch.Generator().manual_seed(4))
    chosen = draw_sde_steps(11, (0, 5), 3)
    assert out.stochastic.nonzero().flatten().tolist() == chosen
    assert_stochastic_exactly_on(out, recorder.trajectory(out.x0), SIGMAS, chosen)


def test_step_set_depends_on_the_rollout_only_not_on_the_generator():
    x = torch.randn(2, 1, 4, 4)
    sets = {tuple(flow_grpo_sde_sample(_field, x, SIGMAS, sde_pool=[0, 5], sde_count=3, rollout_id=5,
                                       generator=torch.Generator().manual_seed(seed)).stochastic.tolist())
            for seed in range(5)}
    assert len(sets) == 1


def test_step_set_options_are_checked():
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="rollout_id"):
        flow_grpo_sde_sample(_field, x, SIGMAS, sde_pool=[0, 5], sde_count=3)
    with pytest.raises(ValueError, match="give only one"):
        flow_grpo_sde_sample(_field, x, SIGMAS, window_size=2, sde_steps=[1, 3])
    with pytest.raises(ValueError, match="sde_pool"):
        stochastic_steps(10, sde_pool=[0, 11], sde_count=2, rollout_id=0)
    with pytest.raises(ValueError, match="sde_steps"):
        stochastic_steps(10, sde_steps=[10])
    assert stochastic_steps(10, sde_steps=[4, 1]).nonzero().flatten().tolist() == [1, 4]


def test_non_contiguous_transitions_keep_each_steps_states_and_log_probs():
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    recorder = StateRecorder(_field)
    out = flow_grpo_sde_sample(recorder, x, SIGMAS, sde_steps=[1, 3, 4], record_before=10,
                               generator=torch.Generator().manual_seed(9))
    trajectory = recorder.trajectory(out.x0)
    tr = out.transitions
    assert torch.equal(tr.steps[:, 0], torch.tensor([1, 3, 4]))
    assert tr.latents.shape == (3, 3, 2, 4, 4) and tr.next_latents.shape == (3, 3, 2, 4, 4)
    for r, i in enumerate([1, 3, 4]):
        assert torch.equal(tr.before(r), trajectory[i]) and torch.equal(tr.after(r), trajectory[i + 1])
        again = sde_step_logprob(tr.before(r), _field(tr.before(r), torch.full((3,), float(SIGMAS[i]))),
                                 float(SIGMAS[i]), float(SIGMAS[i + 1]), float(SIGMAS[1]), prev_sample=tr.after(r))
        assert torch.equal(again.log_prob, tr.log_probs[r])
    # Consecutive steps keep the compact R + 1 layout.
    window = flow_grpo_sde_sample(_field, x, SIGMAS, sde_steps=[2, 3], record_before=10).transitions
    assert window.next_latents is None and window.latents.shape[0] == 3


def test_stored_means_equal_the_samplers_step_means():
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(12))
    recorder = StateRecorder(_field)
    out = flow_grpo_sde_sample(recorder, x, SIGMAS, record_before=9, record_means=True,
                               generator=torch.Generator().manual_seed(13))
    trajectory = recorder.trajectory(out.x0)
    tr = out.transitions
    assert tr.means.shape == (9, 3, 2, 4, 4) and tr.means.dtype == torch.float32
    for i in range(9):
        xi = trajectory[i]
        step = sde_step_logprob(xi, _field(xi, torch.full((3,), float(SIGMAS[i]))), float(SIGMAS[i]),
                                float(SIGMAS[i + 1]), float(SIGMAS[1]), prev_sample=trajectory[i + 1])
        assert torch.equal(tr.means[i], step.mean)
    assert flow_grpo_sde_sample(_field, x, SIGMAS, record_before=9).transitions.means is None


def test_cat_joins_next_latents_and_means_and_refuses_mixed_chunks():
    def part(b, means=True):
        return Transitions(latents=torch.randn(2, b, 1), steps=torch.zeros(2, b, dtype=torch.long),
                           log_probs=torch.zeros(2, b), next_latents=torch.randn(2, b, 1),
                           means=torch.randn(2, b, 1) if means else None)
    a, b = part(2), part(3)
    joined = Transitions.cat([a, b])
    assert torch.equal(joined.next_latents, torch.cat([a.next_latents, b.next_latents], dim=1))
    assert torch.equal(joined.means[:, 2:], b.means)
    with pytest.raises(ValueError, match="means"):
        Transitions.cat([a, part(2, means=False)])


def test_transition_items_carry_the_stored_means_and_next_states():
    x = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(14))
    out = flow_grpo_sde_sample(_field, x, SIGMAS, sde_steps=[0, 2], record_before=10, record_means=True,
                               generator=torch.Generator().manual_seed(15))
    batch = RolloutBatch(x0=None, cond=None, prompts=[""] * 4, metadata=[{}] * 4,
                         group_ids=torch.tensor([0, 0, 1, 1]), rewards=torch.zeros(4, dtype=torch.float64),
                         advantages=torch.zeros(4, dtype=torch.float64), reward_components={}, sigmas=SIGMAS,
                         sampler_options={"noise_level": 0.7, "sde_type": "sde"}, transitions=out.transitions)
    items = transition_items(batch, torch.tensor([3, 1]), 2, ("theta",), batch.advantages, "test")
    assert len(items) == 2
    for r, item in enumerate(items):
        assert torch.equal(item.x, out.transitions.latents[r, [3, 1]])
        assert torch.equal(item.data["x_next"], out.transitions.next_latents[r, [3, 1]])
        assert torch.equal(item.data["old_mean"], out.transitions.means[r, [3, 1]])
        assert item.data["step"].tolist() == [[0, 2][r]] * 2
