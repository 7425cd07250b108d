"""Likelihood estimators x policy objectives (`elbo_pg`): their formulas, the identities between them, and the plugin
through the real harness (exact ratio 1 on-policy, micro-batch invariance, config-time rejections, the ablation
sweep spec)."""
from pathlib import Path

import pytest
import torch

from diffrl_bench.algorithms.awm import awm_log_likelihood
from diffrl_bench.algorithms.estimators import ESTIMATORS, matching_error
from diffrl_bench.algorithms.objectives import OBJECTIVES, importance_weight, parse_advantage
from diffrl_bench.algorithms.weighting import adaptive_x0_loss
from diffrl_bench.config import ConfigError, load_config
from diffrl_bench.sde import sde_step_logprob
from diffrl_bench.train import Trainer

F64 = torch.float64
FORWARD = [n for n in ESTIMATORS.names() if ESTIMATORS.get(n).kind == "forward"]
ROOT = Path(__file__).resolve().parents[1]


def forward_inputs(seed=0, B=6, chw=(3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *chw, generator=g)
    eps = torch.randn(B, *chw, generator=g)
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    tb = t.reshape(B, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * eps
    v = eps - x0 + 0.3 * torch.randn(B, *chw, generator=g)
    return v, x_t, x0, eps, t


# ------------------------------------------------------------------------------------------------ estimators
def test_forward_estimators_are_the_documented_formulas():
    v, x_t, x0, eps, t = forward_inputs()
    m = mean_sq = ((v.double() - (eps.double() - x0.double())) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(matching_error(v, x0, eps), mean_sq)
    t64 = t.double()
    est = {n: ESTIMATORS.get(n)(v, x_t, x0, eps, t) for n in FORWARD}
    torch.testing.assert_close(est["elbo_adaptive"], -adaptive_x0_loss(x_t - t.reshape(-1, 1, 1, 1) * v, x0))
    # x0_hat - x0 = -t (v - v*), so the adaptive ELBO is -t m / mean|v - v*|.
    abs_err = (v.double() - (eps - x0).double()).abs().flatten(1).mean(1)
    torch.testing.assert_close(est["elbo_adaptive"], -t64 * m / abs_err, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(est["elbo_t2"], -t64 ** 2 * m)
    torch.testing.assert_close(est["elbo_uniform"], -m)
    torch.testing.assert_close(est["elbo_exact"], -(1 - t64) / (t64 + 1e-3) * m)
    for name, weighting in (("fm_ghuber", "ghuber"), ("fm_uniform", "Uniform"), ("fm_t", "t"), ("fm_t2", "t**2")):
        torch.testing.assert_close(est[name], awm_log_likelihood(m, t64, weighting))
    for name, value in est.items():
        assert value.dtype == F64 and value.shape == (6,), name
        assert (value <= 0).all(), name  # log-likelihood surrogates: 0 only for a perfect fit


def test_trajectory_estimator_is_flow_grpos_step_log_prob():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    step = sde_step_logprob(x, v, 0.8, 0.6, 0.9, generator=g)
    e = ESTIMATORS.get("trajectory")(x, v, torch.full((4,), 0.8), torch.full((4,), 0.6), 0.9, step.prev_sample)
    assert torch.equal(e, step.log_prob.double())


# ------------------------------------------------------------------------------------------------ objectives
def objective_loss(name, e_theta, e_old, adv, use_ratio=True, clip_range=1e-3):
    return OBJECTIVES.get(name)(e_theta, e_old, adv, use_ratio=use_ratio, clip_range=clip_range)


def grad_wrt(fn, x):
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x), x)
    return g


@pytest.mark.parametrize("estimator", FORWARD)
def test_old_equal_theta_gives_ratio_exactly_one_and_pepg_equals_epg(estimator):
    v, x_t, x0, eps, t = forward_inputs(2)
    est = ESTIMATORS.get(estimator)
    adv = torch.linspace(-0.05, 0.05, 6, dtype=F64)
    e_old = est(v.clone(), x_t, x0, eps, t)

    def loss(name):
        return lambda vv: objective_loss(name, est(vv, x_t, x0, eps, t), e_old, adv)[0]

    lr, rho = importance_weight(est(v, x_t, x0, eps, t), e_old, True)
    assert torch.equal(lr, torch.zeros_like(lr)) and torch.equal(rho, torch.ones_like(rho))
    assert torch.equal(loss("pepg")(v), loss("epg")(v))
    assert torch.equal(grad_wrt(loss("pepg"), v), grad_wrt(loss("epg"), v))
    # GRPO's clipped surrogate has the same gradient as EPG at ratio 1.
    torch.testing.assert_close(grad_wrt(loss("grpo"), v), grad_wrt(loss("epg"), v), rtol=1e-12, atol=0)


@pytest.mark.parametrize("use_ratio", [True, False])
@pytest.mark.parametrize("estimator", ["elbo_adaptive", "fm_ghuber", "elbo_t2"])
def test_par_and_pepg_have_equal_gradients_off_policy(estimator, use_ratio):
    v, x_t, x0, eps, t = forward_inputs(3)
    est = ESTIMATORS.get(estimator)
    adv = torch.linspace(-0.05, 0.05, 6, dtype=F64)
    v_old = v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(9))
    e_old = est(v_old, x_t, x0, eps, t)
    assert not torch.equal(est(v, x_t, x0, eps, t), e_old)

    def loss(name):
        return lambda vv: objective_loss(name, est(vv, x_t, x0, eps, t), e_old, adv, use_ratio)[0]

    g_par, g_pepg = grad_wrt(loss("par"), v), grad_wrt(loss("pepg"), v)
    assert g_par.abs().max() > 0
    torch.testing.assert_close(g_par, g_pepg, rtol=1e-10, atol=1e-14)
    # And on the estimates themselves: d par / d e = d pepg / d e = -rho (A - lr) / N.
    e = est(v, x_t, x0, eps, t)
    lr, rho = importance_weight(e, e_old, use_ratio)
    for name in ("par", "pepg"):
        g = grad_wrt(lambda ee, n=name: objective_loss(n, ee, e_old, adv, use_ratio)[0], e)
        torch.testing.assert_close(g, -rho * (adv - lr) / 6, rtol=1e-10, atol=1e-16)


def test_without_the_ratio_every_sample_has_unit_weight():
    e_theta = torch.tensor([-1.0, -2.0, -0.5], dtype=F64, requires_grad=True)
    e_old = torch.tensor([-1.5, -1.0, -0.5], dtype=F64)
    adv = torch.tensor([0.1, -0.2, 0.3], dtype=F64)
    loss, metrics = objective_loss("epg", e_theta, e_old, adv, use_ratio=False)
    assert torch.equal(loss, (-adv * e_theta).mean())
    assert metrics["rho_mean"] == 1.0 and metrics["ratio_max"] > 1  # the ratio is still reported
    with pytest.raises(ValueError, match="grpo needs the importance ratio"):
        objective_loss("grpo", e_theta, e_old, adv, use_ratio=False)


def test_advantage_specs():
    assert parse_advantage("centered_0.1") == ("centered", 0.1)
    assert parse_advantage("standard") == ("standard", 1.0)
    for bad in ("centered", "centered_-1", "centred_0.1", "auto"):
        with pytest.raises(ValueError, match="centered_<scale>"):
            parse_advantage(bad)
    assert OBJECTIVES.get("grpo").default_advantage == "standard"
    assert OBJECTIVES.get("pepg").default_advantage == "centered_0.1"


# ------------------------------------------------------------------------------------------------ the harness
def overrides(tiny_run, *extra, out):
    return tiny_run("eval.every=-1", "checkpoint.every=0", *extra, out=out, algo=("algo.num_train_times=2",))


def perturb(trainer, scale=0.01):
    """Move theta away from the snapshots (old, ref), so ratios and KL terms are not trivially 1 and 0."""
    with torch.no_grad():
        for p in trainer.policy.core.parameters():
            p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


def flat_grad(trainer):
    return torch.cat([p.grad.flatten() for p in trainer.policy.trainable_parameters()])


@pytest.mark.parametrize("estimator", ["elbo_adaptive", "fm_ghuber"])
def test_first_step_ratio_is_exactly_one_through_the_harness_and_pepg_equals_epg(tiny_run, tmp_path, estimator):
    """Rollouts by old (= theta before any update): every pair's ratio is exactly 1, whatever the micro-batch
    layout, because theta and old are evaluated on the same x_t; PEPG's gradient is then EPG's bit for bit."""
    grads = {}
    for objective in ("pepg", "epg"):
        cfg = load_config("toy_elbo_pg", overrides(tiny_run, f"algo.estimator={estimator}",
                                                   f"algo.objective={objective}", "train.micro_batch_size=3",
                                                   out=tmp_path / objective))
        trainer = Trainer(cfg, progress=False)
        batch = trainer.collect()
        metrics = trainer.accumulate_gradients(batch, torch.arange(8))
        assert metrics["ratio_min"] == 1.0 and metrics["ratio_max"] == 1.0 and metrics["approx_kl"] == 0.0
        grads[objective] = flat_grad(trainer)
        trainer.reward.close()
    assert grads["pepg"].abs().max() > 0
    assert torch.equal(grads["pepg"], grads["epg"])


def test_trajectory_estimator_ratio_is_exactly_one_with_the_rollout_layout(tiny_run, tmp_path):
    cfg = load_config("toy_elbo_pg", overrides(
        tiny_run, "algo.estimator=trajectory", "algo.objective=grpo", "rollout.sampler.name=flow_grpo_sde",
        "train.shuffle=false", "train.micro_batch_size=4", "rollout.chunk_size=4", out=tmp_path / "r"))
    trainer = Trainer(cfg, progress=False)
    assert trainer.algo.rollout.keep_x0 is False and trainer.algo.rollout.record_before == 2
    batch = trainer.collect()
    assert batch.x0 is None and batch.transitions.num_steps == 2
    row = trainer.optimize(batch)
    assert row["loss/ratio_min"] == 1.0 and row["loss/ratio_max"] == 1.0 and row["loss/clipfrac"] == 0.0
    trainer.reward.close()


@pytest.mark.parametrize("estimator,objective,sampler", [
    ("elbo_adaptive", "pepg", "dpm2"),
    ("fm_ghuber", "par", "flow_grpo_sde"),
    ("elbo_t2", "epg", "euler"),
    ("trajectory", "grpo", "flow_grpo_sde"),
])
def test_gradient_is_invariant_to_the_micro_batch_size(tiny_run, tmp_path, estimator, objective, sampler):
    """Batch 8 x accumulation 1 = batch 1 x accumulation 8, off-policy (theta perturbed away from old and ref)."""
    grads = {}
    for micro in (8, 1):
        cfg = load_config("toy_elbo_pg", overrides(
            tiny_run, f"algo.estimator={estimator}", f"algo.objective={objective}", "algo.clip_range=0.2",
            f"rollout.sampler.name={sampler}", f"train.micro_batch_size={micro}", "algo.kl_beta=0.01",
            out=tmp_path / f"m{micro}"))
        trainer = Trainer(cfg, progress=False)
        perturb(trainer)
        batch = trainer.collect()
        metrics = trainer.accumulate_gradients(batch, torch.arange(8))
        assert metrics["kl_loss"] > 0 and metrics["ratio_max"] > metrics["ratio_min"]
        grads[micro] = flat_grad(trainer)
        trainer.reward.close()
    assert grads[8].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[8], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("estimator,sampler", [("elbo_adaptive", "dpm2"), ("trajectory", "flow_grpo_sde")])
def test_two_steps_through_the_trainer_change_the_parameters(tiny_run, tmp_path, estimator, sampler):
    cfg = load_config("toy_elbo_pg", overrides(tiny_run, "train.steps=2", f"algo.estimator={estimator}",
                                               f"rollout.sampler.name={sampler}", out=tmp_path / "r"))
    trainer = Trainer(cfg, progress=False)
    before = [p.detach().clone() for p in trainer.policy.core.parameters()]
    trainer.run()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.core.parameters()))
    rows = trainer.metrics.rows()
    assert rows[-1]["step"] == 2 and rows[-1]["loss/policy_loss"] == rows[-1]["loss/policy_loss"]
    assert all(r["train/grad_norm"] > 0 for r in rows)
    # old = sampler lags theta: after 2 optimizer steps d = min(0.002, 0.5).
    assert rows[-1]["train/decay_old"] == pytest.approx(0.002)


def test_nonsense_combinations_are_rejected_at_config_time(tiny_run, tmp_path):
    out = tmp_path / "r"
    for ode in ("dpm2", "euler"):
        with pytest.raises(ConfigError, match=f"'algo.estimator': the trajectory estimator needs a stochastic "
                                              f"sampler's transition densities; {ode} is a deterministic ODE solver"):
            load_config("toy_elbo_pg", overrides(tiny_run, "algo.estimator=trajectory",
                                                 f"rollout.sampler.name={ode}", out=out))
    with pytest.raises(ConfigError, match="'algo.use_ratio': objective 'grpo' clips the importance ratio"):
        load_config("toy_elbo_pg", overrides(tiny_run, "algo.objective=grpo", "algo.use_ratio=false", out=out))
    with pytest.raises(ConfigError, match="'algo.num_train_times': 5 times per sample from grid_subset exceeds"):
        load_config("toy_elbo_pg", overrides(tiny_run, "algo.num_train_times=5", out=out))
    with pytest.raises(ConfigError, match="'algo.estimator': 'elbo' is not one of .*elbo_adaptive"):
        load_config("toy_elbo_pg", overrides(tiny_run, "algo.estimator=elbo", out=out))
    with pytest.raises(ConfigError, match="'algo.objective': 'ppo' is not one of .*pepg"):
        load_config("toy_elbo_pg", overrides(tiny_run, "algo.objective=ppo", out=out))
    # Forward estimators only need x0, so an SDE sampler is fine; PAR without the ratio is a valid variant.
    load_config("toy_elbo_pg", overrides(tiny_run, "rollout.sampler.name=flow_grpo_sde", out=out))
    load_config("toy_elbo_pg", overrides(tiny_run, "algo.objective=par", "algo.use_ratio=false", out=out))


def test_ablation_sweep_spec_expands_and_every_run_validates():
    from diffrl_bench.sweep import expand, load_spec, validate_runs

    spec = load_spec(ROOT / "sweeps" / "toy_ablation.yaml")
    runs = expand(spec)
    configs = validate_runs(spec, runs)
    combos = {(c.algo.get("objective"), c.algo.get("estimator"), c.rollout.sampler.name)
              for c in configs.values() if c.algorithm == "elbo_pg"}
    objectives, estimators = ("epg", "pepg", "par", "grpo"), ("elbo_adaptive", "fm_ghuber", "trajectory")
    expected = {(o, e, s) for o in objectives for e in estimators for s in ("dpm2", "flow_grpo_sde")
                if not (e == "trajectory" and s == "dpm2")}
    assert combos == expected
    assert spec.baseline == "pepg-elbo_adaptive-dpm2"


def test_cfg_guided_reference_is_an_option_and_costs_two_evaluations(tiny_run, tmp_path):
    cfg = load_config("toy_elbo_pg", overrides(tiny_run, "algo.ref_cfg_scale=3.0", "algo.kl_beta=0.01",
                                               out=tmp_path / "r"))
    trainer = Trainer(cfg, progress=False)
    batch = trainer.collect()
    items = trainer.algo.training_items(batch, torch.arange(8), 4, trainer.generators["train"])
    assert all(item.snapshot_cfg == {"ref": 3.0} for item in items)
    before = trainer.ledger.nfe["train"]
    metrics = trainer.accumulate_gradients(batch, torch.arange(8))
    # 8 samples x 2 times x (theta 1 + old 1 + guided ref 2); the guided base differs from theta from the start.
    assert trainer.ledger.nfe["train"] - before == 16 * 4 and metrics["kl_loss"] > 0
    trainer.reward.close()
