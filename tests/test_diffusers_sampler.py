"""The black-box diffusers-scheduler sampler (diffrl_bench/diffusers_sampler.py) against the schedulers' own stepping.

Known answers: a hand-written `set_timesteps` / `step` loop of the same scheduler with the same model calls and the
same per-sample generators; for FlowMatchEulerDiscreteScheduler also our own Euler sampler (an independent code path).
"""
import pytest
import torch

from diffrl_bench.config import ConfigError, load_config
from diffrl_bench.registry import MODELS, SAMPLERS
from diffrl_bench.rollout import sample_chunks
from diffrl_bench.sampling import dpm_flow_sigmas, euler_sample, flow_sigmas

diffusers = pytest.importorskip("diffusers")
sample = SAMPLERS.get("diffusers")
SASOLVER = dict(scheduler="SASolverScheduler", final_step="data_prediction")


@pytest.fixture(scope="module")
def toy():
    policy = MODELS.get("toy_unet")(path="builtin:toy_base")
    cond = policy.encode_prompts(["a photo of a red circle", "a photo of two blue squares", "a photo of a blue circle",
                                  "a photo of a green triangle", "a photo of two red squares"])
    noise = torch.randn((5, *policy.latent_shape), generator=torch.Generator().manual_seed(3))
    return policy, cond, noise


def toy_velocity(policy, cond):
    def velocity(x, sigma):
        with torch.no_grad():
            return policy.velocity(x, sigma.to(torch.float32), cond[: x.shape[0]])
    return velocity


def row_generators(seed, rows):
    """The sampler's documented noise contract: one generator per sample, seeded in row order from the harness's."""
    g = torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g))) for _ in range(rows)]


def test_flow_match_euler_is_the_schedulers_own_stepping_and_our_euler(toy):
    policy, cond, noise = toy
    velocity = toy_velocity(policy, cond)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    x = noise.clone()
    for t in sched.timesteps:  # the scheduler's own grid and timesteps; the model sees sigma = t / 1000
        x = sched.step(velocity(x, torch.full((5,), float(t) / 1000)), t, x).prev_sample
    ours = sample(velocity, noise.clone(), flow_sigmas(10, 3.0), generator=torch.Generator().manual_seed(0))
    assert ours.nfe == 10 and torch.equal(ours.sigmas, flow_sigmas(10, 3.0))
    torch.testing.assert_close(ours.x0, x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.x0, euler_sample(velocity, noise.clone(), flow_sigmas(10, 3.0)).x0,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tau", [0.0, 0.7])
def test_sasolver_flow_configuration_is_the_schedulers_own_stepping(toy, tau):
    """SASolverScheduler(use_flow_sigmas) builds the dpm_flow grid but repeats its last point instead of ending at 0;
    the hand loop takes its steps but the last, then the data prediction of the last model call."""
    policy, cond, noise = toy
    velocity = toy_velocity(policy, cond)
    n = 8
    lo, hi = 0.45, 0.95  # no grid point within 1e-3 of either end, so integer and float timesteps agree
    sched = diffusers.SASolverScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction",
                                        tau_func=lambda t: tau if lo * 1000 <= t <= hi * 1000 else 0.0)
    sched.set_timesteps(n)
    grid = dpm_flow_sigmas(n, 3.0)
    assert torch.equal(sched.sigmas[:-1], grid[:-1].to(torch.float32)) and sched.sigmas[-1] > 0.1
    gens = row_generators(11, 5)
    x = noise.clone()
    for k in range(n - 1):
        v = velocity(x, torch.full((5,), float(sched.sigmas[k])))
        x = sched.step(v, sched.timesteps[k], x, generator=gens).prev_sample
    s_last = float(sched.sigmas[n - 1])
    x = x - s_last * velocity(x, torch.full((5,), s_last))
    ours = sample(velocity, noise.clone(), grid, **SASOLVER, tau=tau, tau_window=[lo, hi],
                  generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(ours.x0, x, rtol=1e-6, atol=1e-6)


def test_sasolver_noise_is_seeded_and_tau_zero_is_deterministic(toy):
    policy, cond, noise = toy
    velocity = toy_velocity(policy, cond)
    grid = flow_sigmas(8, 3.0)

    def run(seed, tau):
        return sample(velocity, noise.clone(), grid, **SASOLVER, first_sigma=0.999, tau=tau,
                      generator=torch.Generator().manual_seed(seed)).x0

    assert torch.equal(run(1, 0.4), run(1, 0.4))
    assert not torch.allclose(run(1, 0.4), run(2, 0.4), atol=1e-3)
    assert torch.equal(run(1, 0.0), run(2, 0.0))  # tau 0: the ODE, no noise enters
    assert not torch.allclose(run(1, 0.0), run(1, 0.4), atol=1e-3)
    assert torch.isfinite(run(1, 0.4)).all()


def test_tau_at_end_tests_the_window_at_the_steps_target_time(toy):
    """A window holding only grid point k+1 with tau_at=end makes the same step (k -> k+1) stochastic as a window
    holding only point k with tau_at=start; a window holding point k with tau_at=end makes step k-1 stochastic."""
    policy, cond, noise = toy
    velocity = toy_velocity(policy, cond)
    grid = flow_sigmas(8, 3.0)
    k = 4

    def around(i):
        return [float(grid[i]) - 1e-4, float(grid[i]) + 1e-4]

    def run(window, tau_at):
        return sample(velocity, noise.clone(), grid, **SASOLVER, first_sigma=0.999, tau=0.5, tau_window=window,
                      tau_at=tau_at, generator=torch.Generator().manual_seed(5)).x0

    end = run(around(k + 1), "end")
    assert torch.equal(end, run(around(k), "start"))
    assert not torch.allclose(end, run(around(k), "end"), atol=1e-4)


def test_awm_grid_edits():
    """AWM's SA-Solver grid: the Euler shift-3 grid with t[0] = 0.999 and t[-2] = t[-3] / 2 (float32)."""
    seen = []

    def velocity(x, sigma):
        seen.append(float(sigma[0]))
        return -x

    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out = sample(velocity, x, flow_sigmas(14, 3.0), **SASOLVER, first_sigma=0.999, last_sigma_ratio=0.5,
                 generator=torch.Generator().manual_seed(0))
    euler = flow_sigmas(14, 3.0).to(torch.float32)
    expected = euler.clone()
    expected[0], expected[-2] = 0.999, euler[-3] / 2
    assert torch.equal(out.sigmas, expected.to(torch.float64))
    assert seen == expected[:-1].tolist() and out.nfe == 14


@pytest.mark.parametrize("options", [dict(scheduler="FlowMatchEulerDiscreteScheduler"),
                                     dict(SASOLVER, first_sigma=0.999, tau=0.6, tau_window=[0.2, 0.9])])
def test_chunking_does_not_change_the_rollout(toy, options):
    toy_policy, cond, noise = toy

    class RowByRow:
        """The toy policy evaluated one row at a time, so its kernels round alike for every chunk size."""
        device = toy_policy.device
        decode = toy_policy.decode

        def velocity(self, x, sigma, c, **kwargs):
            return torch.cat([toy_policy.velocity(x[i:i + 1], sigma[i:i + 1], c[i:i + 1], **kwargs)
                              for i in range(x.shape[0])])

    policy = RowByRow()
    grid = flow_sigmas(6, 3.0)

    def rollout(chunk_size):
        kwargs = dict(options, generator=torch.Generator().manual_seed(7))
        chunks = sample_chunks(policy, lambda rows: cond[rows], noise, sample, grid, kwargs, snapshot="theta",
                               cfg_scale=1.0, chunk_size=chunk_size)
        with torch.no_grad():
            return torch.cat([r.x0 for _, r, _ in chunks])

    assert torch.equal(rollout(5), rollout(2))


def test_trajectory_refuses_an_edited_grid(toy):
    policy, cond, noise = toy
    kwargs = dict(SASOLVER, first_sigma=0.999, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="another grid"):
        list(sample_chunks(policy, lambda rows: cond[rows], noise, sample, flow_sigmas(4, 3.0), kwargs,
                           snapshot="theta", cfg_scale=1.0, chunk_size=5, keep_trajectory=True))


def test_a_scheduler_that_cannot_reach_zero_names_the_options():
    x = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match="final_step: data_prediction"):
        sample(lambda z, s: -z, x, flow_sigmas(4, 3.0), scheduler="SASolverScheduler")


DIFFUSERS_ROLLOUT = ["rollout.sampler.name=diffusers", "rollout.sampler.shift=3.0"]


@pytest.mark.parametrize("override,key", [
    ("rollout.sampler.options.scheduler=NoSuchScheduler", "rollout.sampler.options.scheduler"),
    ("rollout.sampler.options.scheduler_config.prediction_type=epsilon",
     "rollout.sampler.options.scheduler_config.prediction_type"),
    ("rollout.sampler.options.scheduler_config.shift=3.0", "rollout.sampler.options.scheduler_config.shift"),
    ("rollout.sampler.options.scheduler_config.no_such_key=1", "rollout.sampler.options.scheduler_config.no_such_key"),
    ("rollout.sampler.options.tau=0.4", "rollout.sampler.options.tau"),  # FlowMatchEuler has no tau_func
    ("rollout.sampler.options.final_step=euler", "rollout.sampler.options.final_step"),
])
def test_bad_options_are_refused_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"bad config key '{key}'"):
        load_config("toy_awm", DIFFUSERS_ROLLOUT + [override])


def with_diffusers_rollouts(name, tmp_path):
    """The shipped config `name` with its rollout sampler replaced by the SA-Solver diffusers sampler."""
    from omegaconf import OmegaConf
    from diffrl_bench.config import CONFIG_DIR

    raw = OmegaConf.load(f"{CONFIG_DIR}/{name}.yaml")
    raw.rollout.sampler.name = "diffusers"
    raw.rollout.sampler.options = {"scheduler": "SASolverScheduler", "tau": 0.4, "first_sigma": 0.999,
                                   "final_step": "data_prediction"}
    path = tmp_path / f"{name}.yaml"
    OmegaConf.save(raw, path)
    return str(path)


def test_forward_process_methods_take_it_and_transition_methods_refuse_it(tmp_path):
    for name in ("toy_awm", "toy_nft", "toy_crd", "toy_rft", "toy_dgpo", "toy_elbo_pg"):
        load_config(with_diffusers_rollouts(name, tmp_path))
    load_config("toy_nft", ["eval.sampler.name=diffusers"])
    for name in ("toy_flow_grpo", "toy_grpo_guard", "toy_flow_dppo"):
        with pytest.raises(ConfigError, match="'rollout.sampler.name'.*black box"):
            load_config(with_diffusers_rollouts(name, tmp_path))
    with pytest.raises(ConfigError, match="'algo.estimator'.*black box"):
        load_config(with_diffusers_rollouts("toy_elbo_pg", tmp_path), ["algo.estimator=trajectory"])


def test_awm_trains_on_sasolver_rollouts(tmp_path):
    """A toy AWM step on SA-Solver rollouts: it runs, counts one model call per step, and changes the weights."""
    from diffrl_bench.train import Trainer

    overrides = [f"output_dir={tmp_path / 'run'}", "train.threads=1", "rollout.prompts_per_step=2",
                 "rollout.images_per_prompt=2", "rollout.chunk_size=4", "rollout.sampler.num_steps=4",
                 "train.micro_batch_size=4", "eval.every=-1", "train.steps=1", "algo.num_train_times=2",
                 "reward.components.test_brightness=1.0"]  # a continuous reward: non-zero advantages
    trainer = Trainer(load_config(with_diffusers_rollouts("toy_awm", tmp_path), overrides), progress=False)
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    trainer.rl_step()
    assert trainer.ledger.nfe["rollout"] == 4 * 4
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.policy.trainable_parameters()))
    trainer.reward.close()
    trainer.release_run_dir()


def test_tiny_sd3_smoke(tiny_sd3):
    """The SD3 backend's velocity through the sampler equals stepping FlowMatchEuler by hand; SA-Solver runs."""
    from backend_helpers import PROMPTS, make

    policy = make("sd3", tiny_sd3)
    cond = policy.encode_prompts(PROMPTS[:2])
    noise = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(0))

    def velocity(x, sigma):
        with torch.no_grad():
            return policy.velocity(x, sigma, cond)

    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(3)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(velocity(x, torch.full((2,), float(t) / 1000)), t, x).prev_sample
    ours = sample(velocity, noise.clone(), flow_sigmas(3, 3.0)).x0
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    sa = sample(velocity, noise.clone(), flow_sigmas(3, 3.0), **SASOLVER, first_sigma=0.999, tau=0.4,
                generator=torch.Generator().manual_seed(0)).x0
    assert torch.isfinite(sa).all() and not torch.allclose(sa, ours, atol=1e-4)
