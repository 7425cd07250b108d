"""Flow-GRPO: the SDE step with log-likelihood and the PPO-clip loss, by identities and known answers.

Parity with the released code: every `sde_step_logprob` and `grpo_loss` case runs in tests/test_parity.py.
"""
import math

import pytest
import torch

from diffrl_bench.algorithms.flow_grpo import grpo_loss
from diffrl_bench.sde import flow_grpo_sde_sample, sde_step_logprob
from diffrl_bench.registry import SAMPLERS
from diffrl_bench.sampling import StateRecorder, euler_sample, flow_sigmas
from sde_checks import assert_stochastic_exactly_on, linear_field  # tests/sde_checks.py

SHAPE = (4, 3, 4, 4)
# An SD3-like grid (shift 3, 10 steps): first value 1, last 0.
GRID = torch.tensor([1.0, 0.9601293206214905, 0.9133489727973938, 0.857692301273346, 0.7903682589530945,
                     0.7072784900665283, 0.602150559425354, 0.4648760259151459, 0.2780487835407257,
                     0.008928571827709675, 0.0])


def make_step_inputs(seed=0, index=(0, 3, 7, 9), shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    v = torch.randn(shape, generator=g)
    idx = torch.tensor(index)
    return x, v, GRID[idx], GRID[idx + 1]


def per_sample(t, like):
    return t.reshape(-1, *([1] * (like.ndim - 1)))


# ---------------------------------------------------------------------------------------------------------------
# The SDE / CPS step


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_noise_level_zero_is_the_euler_step(sde_type):
    x, v, s, s_next = make_step_inputs(1)
    euler = x + v * per_sample(s_next - s, x)
    step = sde_step_logprob(x, v, s, s_next, GRID[1], noise_level=0.0, sde_type=sde_type,
                            generator=torch.Generator().manual_seed(0))
    if sde_type == "sde":  # exact: every correction term is multiplied by std = 0
        assert torch.equal(step.mean, euler)
        assert torch.equal(step.prev_sample, euler)
    else:  # x0^ (1 - s') + x1^ s' rearranges to the Euler step up to rounding
        torch.testing.assert_close(step.mean, euler, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(step.prev_sample, euler, atol=1e-6, rtol=1e-6)
    assert torch.all(step.std == 0)


def test_inputs_are_computed_in_float32():
    x, v, s, s_next = make_step_inputs(2)
    ours = sde_step_logprob(x.double(), v.double(), s.double(), s_next.double(), GRID[1].double(),
                            prev_sample=x.double())
    ref = sde_step_logprob(x, v, s, s_next, GRID[1], prev_sample=x)
    for name in ("mean", "std", "sqrt_neg_dt", "log_prob", "prev_sample"):
        assert getattr(ours, name).dtype == torch.float32
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name


def test_sde_mean_is_euler_plus_score_correction():
    # mu = x + [v + std^2 / (2 sigma) (x + (1 - sigma) v)] dt: the drift of the marginal-preserving reverse SDE,
    # written in its score form (x + (1 - sigma) v = x1^ = -sigma * score * sigma), here in float64.
    x, v, s, s_next = make_step_inputs(3)
    a = 0.7
    step = sde_step_logprob(x, v, s, s_next, GRID[1], noise_level=a)
    xd, vd, sd, snd = x.double(), v.double(), s.double(), s_next.double()
    s_tilde = torch.where(sd == 1, GRID[1].double(), sd)
    std = a * torch.sqrt(sd / (1 - s_tilde))
    sb, stdb, dt = per_sample(sd, xd), per_sample(std, xd), per_sample(snd - sd, xd)
    expected = xd + (vd + stdb**2 / (2 * sb) * (xd + (1 - sb) * vd)) * dt
    torch.testing.assert_close(step.mean.double(), expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(step.std.double(), std, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(step.sqrt_neg_dt.double(), torch.sqrt(sd - snd), atol=1e-7, rtol=1e-6)


def test_first_step_uses_the_second_grid_value():
    x, v, s, s_next = make_step_inputs(4, index=(0, 0, 1, 1))
    step = sde_step_logprob(x, v, s, s_next, GRID[1], noise_level=0.5)
    assert torch.isfinite(step.std).all()
    # sigma = 1 and sigma = GRID[1] share the denominator 1 - GRID[1]: std ratio sqrt(1 / GRID[1]).
    torch.testing.assert_close(step.std[0], 0.5 / torch.sqrt(1 - GRID[1]))
    torch.testing.assert_close(step.std[0] / step.std[2], 1 / torch.sqrt(GRID[1]))


def test_sde_log_prob_is_the_gaussian_density():
    x, v, s, s_next = make_step_inputs(5)
    step = sde_step_logprob(x, v, s, s_next, GRID[1], noise_level=0.7, generator=torch.Generator().manual_seed(1))
    scale = per_sample((step.std * step.sqrt_neg_dt).double(), x)
    density = torch.distributions.Normal(step.mean.double(), scale).log_prob(step.prev_sample.double())
    torch.testing.assert_close(step.log_prob.double(), density.mean(dim=(1, 2, 3)), atol=2e-5, rtol=1e-6)
    # and for a stored sample that the step did not draw
    other = x + 0.1
    step = sde_step_logprob(x, v, s, s_next, GRID[1], prev_sample=other)
    density = torch.distributions.Normal(step.mean.double(), scale).log_prob(other.double())
    torch.testing.assert_close(step.log_prob.double(), density.mean(dim=(1, 2, 3)), atol=2e-5, rtol=1e-6)


def test_cps_log_prob_drops_the_constants():
    x, v, s, s_next = make_step_inputs(6)
    other = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    step = sde_step_logprob(x, v, s, s_next, GRID[1], sde_type="cps", noise_level=0.5, prev_sample=other)
    torch.testing.assert_close(step.log_prob, -((other - step.mean) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(step.std, s_next * math.sin(0.25 * math.pi))


def test_cps_last_step_has_zero_std_and_lands_on_x0_prediction():
    x, v, s, s_next = make_step_inputs(8, index=(9, 9, 9, 9))
    assert torch.all(s_next == 0)
    step = sde_step_logprob(x, v, s, s_next, GRID[1], sde_type="cps", noise_level=0.7,
                            generator=torch.Generator().manual_seed(0))
    assert torch.all(step.std == 0)
    assert torch.equal(step.prev_sample, step.mean)
    torch.testing.assert_close(step.mean, x - per_sample(s, x) * v)
    assert torch.all(step.log_prob == 0)


def test_sampling_is_reproducible_and_log_prob_gradient_flows_through_v_only():
    x, v, s, s_next = make_step_inputs(9)
    a = sde_step_logprob(x, v, s, s_next, GRID[1], generator=torch.Generator().manual_seed(3))
    b = sde_step_logprob(x, v, s, s_next, GRID[1], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.prev_sample, b.prev_sample)
    v_train = v.clone().requires_grad_(True)
    prev = a.prev_sample.clone().requires_grad_(True)
    step = sde_step_logprob(x, v_train, s, s_next, GRID[1], prev_sample=prev)
    step.log_prob.sum().backward()
    assert prev.grad is None  # x' is detached, as in the original
    assert v_train.grad is not None and v_train.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# The loss


@pytest.mark.parametrize("sde_type, clip_range", [("sde", 1e-4), ("cps", 1e-5)])
def test_on_policy_ratio_is_exactly_one(sde_type, clip_range):
    x, v, s, s_next = make_step_inputs(10)
    rollout = sde_step_logprob(x, v, s, s_next, GRID[1], sde_type=sde_type, generator=torch.Generator().manual_seed(5))
    v_train = v.clone().requires_grad_(True)
    train = sde_step_logprob(x, v_train, s, s_next, GRID[1], sde_type=sde_type, prev_sample=rollout.prev_sample)
    assert torch.equal(train.log_prob, rollout.log_prob.detach())

    log_prob = train.log_prob.detach().clone().requires_grad_(True)
    adv = torch.tensor([7.0, -0.5, 1.25, -9.0])
    clamped = torch.tensor([5.0, -0.5, 1.25, -5.0])
    loss, m = grpo_loss(log_prob, rollout.log_prob, adv, clip_range=clip_range)
    assert torch.all(m["ratio"] == 1)
    torch.testing.assert_close(loss, -clamped.mean())
    assert m["clipfrac"] == 0 and m["approx_kl"] == 0
    (grad,) = torch.autograd.grad(loss, log_prob)
    torch.testing.assert_close(grad, -clamped / 4)


def test_clipping_stops_the_gradient_only_in_the_clipped_direction():
    old = torch.zeros(4, dtype=torch.float64)
    log_prob = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    loss, m = grpo_loss(log_prob, old, adv, clip_range=0.2)
    (grad,) = torch.autograd.grad(loss, log_prob)
    e = math.e
    # A > 0, ratio e > 1.2: clipped, no gradient. A > 0, ratio 1/e < 0.8: unclipped, d(-A ratio)/d lp = -ratio.
    # A < 0, ratio e: unclipped, +ratio. A < 0, ratio 1/e: clipped, no gradient.
    expected = torch.tensor([0.0, -1 / e, e, 0.0], dtype=torch.float64) / 4
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(loss, torch.tensor((-1.2 - 1 / e + e + 0.8) / 4, dtype=torch.float64))
    assert m["clipfrac"].item() == 1.0 and m["clipfrac"].dtype == torch.float32
    assert m["clipfrac_gt_one"].item() == 0.5 and m["clipfrac_lt_one"].item() == 0.5
    torch.testing.assert_close(m["approx_kl"], torch.tensor(0.5, dtype=torch.float64))
    assert m["ratio_max"].item() == pytest.approx(e) and m["ratio_min"].item() == pytest.approx(1 / e)


def test_kl_term_is_the_mean_distance_over_two_std_squared():
    g = torch.Generator().manual_seed(11)
    ref = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    offset = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64)
    std = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    mean = ref + per_sample(offset, ref)
    lp = torch.zeros(4, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    loss, m = grpo_loss(lp, lp, adv, clip_range=1e-4, beta=0.04, mean=mean, ref_mean=ref, std=std)
    kl = (offset**2 / (2 * std**2)).mean()
    torch.testing.assert_close(m["kl_loss"], kl)
    torch.testing.assert_close(loss, -adv.mean() + 0.04 * kl)

    loss0, m0 = grpo_loss(lp, lp, adv, clip_range=1e-4, beta=0.0, mean=mean, ref_mean=ref, std=std)
    assert "kl_loss" not in m0
    torch.testing.assert_close(loss0, m0["policy_loss"])
    with pytest.raises(ValueError, match="KL"):
        grpo_loss(lp, lp, adv, clip_range=1e-4, beta=0.04)


# ---------------------------------------------------------------------------------------------------------------
# Marginals on a toy problem with a known velocity


def gaussian_velocity(x, t, s):
    """Exact rectified-flow velocity for data N(0, s^2) per element and noise N(0, 1).

    x_t = (1 - t) x0 + t x1 has variance var_t = (1 - t)^2 s^2 + t^2, and the marginal velocity is the regression
    E[x1 - x0 | x_t] = x_t Cov(x1 - x0, x_t) / var_t = x_t (t - (1 - t) s^2) / var_t = x_t var_t' / (2 var_t),
    i.e. the ODE map x_t = x1 sqrt(var_t) keeps every marginal N(0, var_t).
    """
    t = t.to(x.dtype)
    return x * (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2)


def run_chain(x, grid, s, noise_level, generator=None, stop_at=None):
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        if stop_at is not None and i == stop_at:
            break
        step = sde_step_logprob(x, gaussian_velocity(x, t, s), t, t_next, grid[1], noise_level=noise_level,
                                generator=generator)
        x = step.prev_sample
    return x


def test_sde_keeps_the_marginals_of_the_flow_on_a_gaussian():
    s, n = 1.5, 100_000
    g = torch.Generator().manual_seed(123)
    x1 = torch.randn((n, 1, 1, 1), generator=g)
    grid = torch.linspace(1, 0, 41)

    def check(samples, var, k=4.0, bias=0.0):
        samples = samples.double().flatten()
        se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2 / (n - 1))
        assert abs(samples.mean().item()) < k * se_mean
        assert abs(samples.var().item() - var) < k * se_var + bias * var, (samples.var().item(), var)

    # Halfway (t = 0.5) and at the end the SDE marginals are those of the flow: N(0, var_t). The Euler-Maruyama
    # discretisation is not exact: the first steps (large std near sigma = 1, where the std uses the next grid
    # value) overshoot the variance by a few percent (about 2% left at t = 0.5, from the exact variance recursion of
    # this linear-Gaussian chain), which the later steps contract to about 0.1% at t = 0. The allowances below sit
    # well under what a wrong drift does here (a dropped (1 - sigma), a halved or sign-flipped correction: 15-2000%).
    check(run_chain(x1, grid, s, 0.7, generator=g, stop_at=20), 0.25 * s**2 + 0.25, bias=0.03)
    check(run_chain(x1, grid, s, 0.7, generator=g), s**2, bias=0.01)

    # The Euler ODE (noise level 0) maps x1 deterministically; at 40 steps its first-order error in the variance is
    # several percent, so compare its Richardson extrapolation 2 x_80 - x_40 (second order) with the data law.
    ode40 = run_chain(x1, grid, s, 0.0)
    ode80 = run_chain(x1, torch.linspace(1, 0, 81), s, 0.0)
    check(2 * ode80.double() - ode40.double(), s**2)
    check(ode40, s**2, bias=0.1)


# --------------------------------------------------------------------------------------------------------------
# The registered rollout sampler
# --------------------------------------------------------------------------------------------------------------


_field = linear_field


def test_rollout_sampler_is_registered_and_noise_level_zero_is_the_euler_ode():
    assert SAMPLERS.get("flow_grpo_sde") is flow_grpo_sde_sample
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    sigmas = flow_sigmas(10, 3.0)
    sde = flow_grpo_sde_sample(_field, x, sigmas, noise_level=0.0)
    ode = euler_sample(_field, x, sigmas)
    torch.testing.assert_close(sde.x0, ode.x0, rtol=1e-5, atol=1e-6)
    assert sde.nfe == 10 and sde.stochastic.all()


def test_stored_log_probs_are_the_behaviour_log_probs_of_each_transition():
    """Re-scoring every stored transition with the same velocity gives the stored value: ratio exactly 1."""
    x = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    sigmas = flow_sigmas(10, 3.0)
    recorder = StateRecorder(_field)
    out = flow_grpo_sde_sample(recorder, x, sigmas, generator=torch.Generator().manual_seed(2))
    trajectory = recorder.trajectory(out.x0)
    assert trajectory.shape == (11, 4, 2, 4, 4)
    for i in range(9):  # the last step (to sigma = 0) is deterministic in the sde form's limit; skip its density
        xi = trajectory[i]
        v = _field(xi, torch.full((4,), float(sigmas[i])))
        again = sde_step_logprob(xi, v, float(sigmas[i]), float(sigmas[i + 1]), float(sigmas[1]),
                                 prev_sample=trajectory[i + 1])
        assert torch.equal(torch.exp(again.log_prob - out.log_probs[i]), torch.ones(4)), i


def test_sde_window_makes_only_w_consecutive_steps_stochastic():
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    sigmas = flow_sigmas(10, 3.0)
    recorder = StateRecorder(_field)
    out = flow_grpo_sde_sample(recorder, x, sigmas, window_size=3, generator=torch.Generator().manual_seed(4))
    trajectory = recorder.trajectory(out.x0)
    idx = out.stochastic.nonzero().flatten().tolist()
    assert len(idx) == 3 and idx == list(range(idx[0], idx[0] + 3))
    assert_stochastic_exactly_on(out, trajectory, sigmas, idx)
    with pytest.raises(ValueError, match="window_size"):
        flow_grpo_sde_sample(_field, x, sigmas, window_size=11)


def test_rollout_sampler_is_reproducible_from_its_generator():
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    sigmas = flow_sigmas(10, 3.0)
    a = flow_grpo_sde_sample(_field, x, sigmas, window_size=2, generator=torch.Generator().manual_seed(6))
    b = flow_grpo_sde_sample(_field, x, sigmas, window_size=2, generator=torch.Generator().manual_seed(6))
    c = flow_grpo_sde_sample(_field, x, sigmas, window_size=2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.x0, b.x0) and torch.equal(a.stochastic, b.stochastic)
    assert not torch.equal(a.x0, c.x0)


def test_recorded_transitions_are_exactly_the_trained_steps_and_nothing_else():
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    sigmas = flow_sigmas(10, 3.0)
    recorder = StateRecorder(_field)
    full = flow_grpo_sde_sample(recorder, x, sigmas, generator=torch.Generator().manual_seed(9))
    out = flow_grpo_sde_sample(_field, x, sigmas, record_before=9, generator=torch.Generator().manual_seed(9))
    tr = out.transitions
    # 9 trained transitions need 10 latents: x_0 .. x_9 of the (same-noise) trajectory; the last state is not kept.
    assert tr.latents.shape == (10, 3, 2, 4, 4) and torch.equal(tr.latents, recorder.trajectory(full.x0)[:10])
    assert torch.equal(tr.steps, torch.arange(9)[:, None].expand(9, 3))
    assert torch.equal(tr.log_probs, full.log_probs[:9])
    assert torch.equal(out.x0, full.x0)


def test_window_transitions_and_window_range():
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(10))
    sigmas = flow_sigmas(10, 3.0)
    starts = set()
    for seed in range(40):
        out = flow_grpo_sde_sample(_field, x, sigmas, window_size=3, window_range=(0, 5), record_before=10,
                                   generator=torch.Generator().manual_seed(seed))
        first = int(out.stochastic.nonzero()[0])
        starts.add(first)
        assert torch.equal(out.transitions.steps[:, 0], torch.arange(first, first + 3))
        assert out.transitions.latents.shape[0] == 4
    # The window [start, start + 3) must lie in [0, 5): starts 0, 1, 2 only, and all of them get drawn.
    assert starts == {0, 1, 2}
    with pytest.raises(ValueError, match="window_range"):
        flow_grpo_sde_sample(_field, x, sigmas, window_size=3, window_range=(0, 2))


def test_shared_prefix_computes_the_ode_prefix_once_per_group_with_the_same_result():
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(11)).repeat_interleave(3, dim=0)
    sigmas = flow_sigmas(10, 3.0)
    calls = []

    def field(x_t, sigma, rows=None):
        calls.append(x_t.shape[0])
        return _field(x_t, sigma)

    kwargs = dict(window_size=2, window_start=4, record_before=10)
    shared = flow_grpo_sde_sample(field, x, sigmas, shared_prefix=True, groups=groups,
                                  generator=torch.Generator().manual_seed(1), **kwargs)
    prefix_calls = calls[:4]
    plain = flow_grpo_sde_sample(_field, x, sigmas, generator=torch.Generator().manual_seed(1), **kwargs)
    assert prefix_calls == [2, 2, 2, 2]  # 4 ODE steps on one sample per group
    assert shared.total_nfe == 4 * 2 + 6 * 6 and plain.sample_nfe() == 10 * 6
    torch.testing.assert_close(shared.x0, plain.x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shared.transitions.log_probs, plain.transitions.log_probs)
    different = torch.randn(6, 1, 4, 4)
    with pytest.raises(ValueError, match="same_noise_per_group"):
        flow_grpo_sde_sample(field, different, sigmas, shared_prefix=True, groups=groups, **kwargs)


# ------------------------------------------------------------------------------ zero-variance prompt groups
def _plugin_gradient(keep_zero_advantage):
    """d loss / d per-sample velocity scale, with the Trainer's weighting (item loss x its share of samples)."""
    from diffrl_bench.algorithm import RolloutBatch
    from diffrl_bench.algorithms.flow_grpo import FlowGRPO, FlowGRPOConfig
    from diffrl_bench.sampling import Transitions

    B, R = 6, 2
    g = torch.Generator().manual_seed(0)
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.1, 0.9, 0.4], dtype=torch.float64)  # group 0: all equal
    group_ids = torch.arange(B) // 3
    from diffrl_bench.advantages import group_advantages
    advantages = group_advantages(rewards, group_ids, std="group")
    assert torch.all(advantages[:3] == 0) and torch.all(advantages[3:] != 0)
    transitions = Transitions(latents=torch.randn(R + 1, B, *SHAPE[1:], generator=g),
                              steps=torch.arange(R)[:, None].expand(R, B), log_probs=torch.zeros(R, B))
    batch = RolloutBatch(x0=None, cond=None, prompts=["p"] * B, metadata=[{}] * B, group_ids=group_ids,
                         rewards=rewards, advantages=advantages, reward_components={}, sigmas=flow_sigmas(4),
                         sampler_options={"noise_level": 0.7, "sde_type": "sde"}, transitions=transitions)
    algo = FlowGRPO(FlowGRPOConfig(kl_beta=0.04, keep_zero_advantage=keep_zero_advantage))
    scale = torch.ones(B, dtype=torch.float32, requires_grad=True)
    items = algo.training_items(batch, torch.arange(B), 4, g)
    total = sum(len(item.index) for item in items if not item.placeholder)
    for item in items:
        s = scale[item.index].reshape(-1, 1, 1, 1)
        velocities = {"theta": s * item.x, "ref": 0.5 * item.x}
        # old log-probs = the ones theta gives now, so the ratio is 1 and only A and the KL drive the gradient
        item.data["old_log_prob"] = sde_step_logprob(item.x, (s * item.x).detach(), item.sigma,
                                                     item.data["sigma_next"], item.data["sigma_first_next"][0],
                                                     prev_sample=item.data["x_next"], **item.options).log_prob.detach()
        loss, _ = algo.loss(item, velocities)
        (loss * len(item.index) / total).backward()
    return {int(i) for item in items for i in item.index}, scale.grad


def test_zero_variance_groups_are_not_trained_by_default():
    trained, grad = _plugin_gradient(keep_zero_advantage=False)
    assert trained == {3, 4, 5}
    assert torch.all(grad[:3] == 0) and torch.all(grad[3:] != 0)


def test_keep_zero_advantage_trains_them_through_the_kl_term():
    trained, grad = _plugin_gradient(keep_zero_advantage=True)
    assert trained == set(range(6))
    assert torch.all(grad != 0)  # advantage 0, but theta != ref: the KL term moves them
