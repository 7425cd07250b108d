"""Samplers: the SD3 sigma grid, and Euler / DPM-Solver++(2M) against flows with closed-form solutions."""
import json
import math
import os
from pathlib import Path

import pytest
import torch

from diffrl_bench.registry import SAMPLERS
from diffrl_bench.sampling import Rollout, StateRecorder, dpm2_sample, euler_sample, flow_sigmas

PARITY_DIR = Path(os.environ.get("DIFFRL_PARITY_DIR", Path(__file__).parent / "data" / "parity" / "public"))
SAMPLERS_UNDER_TEST = [euler_sample, dpm2_sample]


# ---------------------------------------------------------------------------------------------------------------
# Sigma grid


@pytest.mark.parametrize("num_steps", [1, 2, 10, 14, 25, 40])
@pytest.mark.parametrize("shift", [1.0, 3.0, 2.7, 5.0])
def test_flow_sigmas_match_diffusers(num_steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    ours = flow_sigmas(num_steps, shift)
    assert ours.dtype == torch.float64 and ours.shape == (num_steps + 1,)
    assert torch.equal(ours, scheduler.sigmas.to(torch.float64))


def test_flow_sigmas_match_parity_grids():
    cases = [json.loads(p.read_text()) for p in sorted(PARITY_DIR.glob("dpm2_sampler_*.json"))]
    if not cases:
        pytest.skip(f"no dpm2_sampler cases in {PARITY_DIR}")
    for case in cases:
        expected = torch.tensor(case["inputs"]["sigmas"], dtype=torch.float64)
        assert torch.equal(flow_sigmas(case["params"]["num_steps"], 3.0), expected), case["case_id"]


def test_flow_sigmas_shape_of_the_grid():
    grid = flow_sigmas(10)
    assert grid[0] == 1.0 and grid[-1] == 0.0
    assert torch.all(grid[1:] < grid[:-1])
    with pytest.raises(ValueError):
        flow_sigmas(0)


# ---------------------------------------------------------------------------------------------------------------
# Analytic flows


def gaussian_velocity(mu: float, s: float):
    """Exact rectified-flow velocity for data x0 ~ N(mu, s^2) per element.

    The ODE carries z = x_1 ~ N(0, 1) along x_t = (1 - t) mu + sigma_t z, sigma_t = sqrt((1 - t)^2 s^2 + t^2), so
    v = dx_t/dt = -mu + (t - (1 - t) s^2) / sigma_t^2 (x - (1 - t) mu), and the endpoint is mu + s z.
    """

    def velocity(x, t):
        t = t.reshape(-1, *([1] * (x.ndim - 1)))
        var = (1 - t) ** 2 * s**2 + t**2
        return -mu + (t - (1 - t) * s**2) / var * (x - (1 - t) * mu)

    return velocity


def endpoint_error(sampler, num_steps, mu=-1.0, s=1.5):
    z = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    out = sampler(gaussian_velocity(mu, s), z, grid)
    return (out.x0 - (mu + s * z)).abs().max().item()


def test_gaussian_flow_euler_is_first_order():
    e40, e80, e160 = (endpoint_error(euler_sample, n) for n in (40, 80, 160))
    # First order: halving the step halves the error.
    assert 1.7 < e40 / e80 < 2.3
    assert 1.7 < e80 / e160 < 2.3
    assert e160 < 0.05


def test_gaussian_flow_dpm2_converges_faster_than_euler():
    d40, d80, d160 = (endpoint_error(dpm2_sample, n) for n in (40, 80, 160))
    # Second order (in the interior; first-order end steps): clearly better than halving.
    assert d40 / d80 > 2.8
    assert d80 / d160 > 2.8
    assert d160 < 0.002
    assert endpoint_error(dpm2_sample, 10) < endpoint_error(euler_sample, 10)


@pytest.mark.parametrize("sampler", SAMPLERS_UNDER_TEST)
@pytest.mark.parametrize("grid", [flow_sigmas(10), flow_sigmas(7, 1.0), torch.tensor([1.0, 0.5, 0.0])])
def test_dirac_data_is_reached_exactly(sampler, grid):
    # All data at c: x_t = (1 - t) c + t eps, so v = (x - c) / t; x0-prediction x - t v = c for every x and t.
    c = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def velocity(x, t):
        return (x - c) / t.reshape(-1, 1, 1, 1)

    out = sampler(velocity, z, grid)
    torch.testing.assert_close(out.x0, c, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Bookkeeping


@pytest.mark.parametrize("sampler", SAMPLERS_UNDER_TEST)
def test_nfe_time_argument_and_trajectory(sampler):
    grid = flow_sigmas(6)
    seen = []

    def velocity(x, t):
        assert t.shape == (x.shape[0],) and torch.all(t == t[0])
        seen.append(float(t[0]))
        return -0.5 * x

    z = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    recorder = StateRecorder(velocity)
    out = sampler(recorder, z, grid)
    assert isinstance(out, Rollout)
    assert out.nfe == 6 == len(seen)
    assert seen == pytest.approx(grid[:-1].tolist())
    trajectory = recorder.trajectory(out.x0)
    assert trajectory.shape == (7, 3, 2, 4, 4)
    assert torch.equal(trajectory[0], z)
    assert torch.equal(out.sigmas, grid)


def test_euler_step_formula():
    grid = torch.tensor([1.0, 0.6, 0.0], dtype=torch.float64)
    z = torch.ones(1, 2)
    recorder = StateRecorder(lambda x, t: torch.full_like(x, 2.0) * t[:, None])
    out = euler_sample(recorder, z, grid)
    # x1 = 1 + 2*1.0*(0.6 - 1) = 0.2; x2 = 0.2 + 2*0.6*(0 - 0.6) = -0.52.
    torch.testing.assert_close(recorder.trajectory(out.x0)[:, 0, 0], torch.tensor([1.0, 0.2, -0.52]))


@pytest.mark.parametrize("sampler", [dpm2_sample, euler_sample])
def test_named_floor1000_model_time_feeds_the_truncated_timestep_and_updates_with_true_sigmas(sampler):
    grid = flow_sigmas(10)
    seen = []

    def velocity(x, t):
        seen.append(float(t[0]))
        return -0.3 * x + 0.5 * t.reshape(-1, 1)

    z = torch.randn(2, 5, dtype=torch.float64)
    out = sampler(velocity, z, grid, model_time="floor1000")
    # The SD3 pipeline hands the transformer long(sigma * 1000) (DiffusionNFT pipeline_with_logprob.py:213).
    truncated = [math.floor(s * 1000) / 1000 for s in grid[:-1].tolist()]
    assert seen == pytest.approx(truncated, abs=1e-15)
    # the same as the callable form, which changes only what the model sees; `sigma` is the identity (the default)
    seen.clear()
    ref = sampler(velocity, z, grid, model_time=lambda s: torch.floor(s * 1000) / 1000)
    assert seen == pytest.approx(truncated, abs=1e-15)
    torch.testing.assert_close(out.x0, ref.x0, rtol=0, atol=0)
    seen.clear()
    plain = sampler(velocity, z, grid, model_time="sigma")
    assert seen == pytest.approx(grid[:-1].tolist(), abs=1e-15)
    torch.testing.assert_close(plain.x0, sampler(velocity, z, grid).x0, rtol=0, atol=0)
    with pytest.raises(ValueError, match="model_time='floor'"):
        sampler(velocity, z, grid, model_time="floor")


def test_dpm2_first_and_last_steps_are_first_order():
    # Two-step grid: both steps are first order, so the result is Euler to 0.5 then the x0-prediction there.
    grid = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    velocity = gaussian_velocity(0.3, 0.7)
    z = torch.randn(3, 4, dtype=torch.float64)
    x_half = z + velocity(z, torch.ones(3)) * (0.5 - 1.0)
    expected = x_half - 0.5 * velocity(x_half, torch.full((3,), 0.5))
    torch.testing.assert_close(dpm2_sample(velocity, z, grid).x0, expected)


def test_samplers_are_registered():
    # Read the table directly: `SAMPLERS.get` would first import every plugin package of the project.
    assert SAMPLERS._items["euler"] is euler_sample
    assert SAMPLERS._items["dpm2"] is dpm2_sample


@pytest.mark.parametrize("sampler", SAMPLERS_UNDER_TEST)
def test_low_precision_latents_get_float32_times(sampler):
    seen = []

    def velocity(x, t):
        seen.append(t)
        return -x

    out = sampler(velocity, torch.randn(2, 3, dtype=torch.bfloat16), flow_sigmas(4))
    assert out.x0.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in seen)
    assert [float(t[0]) for t in seen] == flow_sigmas(4)[:-1].tolist()


@pytest.mark.parametrize("num_steps,shift", [(10, 3.0), (14, 3.0), (6, 5.0)])
def test_dpm2_on_the_dpm_flow_grid_is_diffusers_dpm_solver(num_steps, shift):
    """DGPO's sampler: DPMSolverMultistepScheduler(use_flow_sigmas, flow_shift) stepping with the integer timesteps.
    Its grid starts below 1, so the second-order update already runs at step 1; the same solver started from 1
    instead (our flow grids) gives something else."""
    diffusers = pytest.importorskip("diffusers")
    from diffrl_bench.sampling import dpm_flow_sigmas
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    c = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)

    def velocity(z, s):
        return 0.3 * z + s.reshape(-1, 1, 1, 1) * c - 0.5 * torch.tanh(z)

    sched = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift,
                                                  prediction_type="flow_prediction")
    sched.set_timesteps(num_steps)
    assert torch.equal(dpm_flow_sigmas(num_steps, shift).to(torch.float32), sched.sigmas.cpu())
    y = x.clone()
    for step in sched.timesteps:
        y = sched.step(velocity(y, torch.full((2,), float(step) / 1000, dtype=torch.float64)), step, y).prev_sample
    grid = dpm_flow_sigmas(num_steps, shift)
    ours = dpm2_sample(velocity, x.clone(), grid, model_time="floor1000").x0
    # diffusers keeps its sigmas and log-SNRs in float32: agreement to ~1e-6, far below the step-1 order's effect
    assert torch.allclose(ours, y, rtol=0, atol=1e-5)
    if num_steps > 2:
        plain = dpm2_sample(velocity, x.clone(), torch.cat([torch.ones(1, dtype=torch.float64), grid[1:]]),
                            model_time="floor1000").x0
        assert not torch.allclose(plain, y, rtol=0, atol=1e-3)


def test_model_time_by_name_is_the_callable_and_unknown_names_are_refused():
    from diffrl_bench.sampling import MODEL_TIMES, sigma_grid
    grid = sigma_grid("dpm_flow", 5, 3.0)
    seen = {}

    def velocity(name):
        def fn(z, s):
            seen.setdefault(name, []).append(s.clone())
            return -z
        return fn

    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    dpm2_sample(velocity("name"), x, grid, model_time="floor1000")
    dpm2_sample(velocity("fn"), x, grid, model_time=MODEL_TIMES["floor1000"])
    assert all(torch.equal(a, b) for a, b in zip(seen["name"], seen["fn"]))
    assert [int(round(float(s[0]) * 1000)) for s in seen["name"]] == [
        int(v) for v in torch.floor(grid[:-1] * 1000 + 2e-4)]
    with pytest.raises(ValueError, match="model_time"):
        dpm2_sample(velocity("bad"), x, grid, model_time="round")
    with pytest.raises(ValueError, match="grid"):
        sigma_grid("karras", 5, 3.0)
