"""Shared checks of the Flow-GRPO SDE sampler's trajectories (tests/test_flow_grpo.py, tests/test_sde_step_sets.py)."""
import torch


def linear_field(x, sigma):
    """A velocity field with a closed-form Euler step, for checking which steps were stochastic."""
    return -0.4 * x + 0.3 * sigma.view(-1, 1, 1, 1)


def assert_stochastic_exactly_on(out, trajectory, sigmas, steps) -> None:
    """Steps in `steps` left the Euler ODE step and have finite log-probs; every other step is the Euler step of
    `linear_field` to the bit, with NaN log-probs (no density)."""
    for i in range(len(sigmas) - 1):
        xi, nxt = trajectory[i], trajectory[i + 1]
        sigma = torch.full((xi.shape[0],), float(sigmas[i]))
        euler = xi + linear_field(xi, sigma) * (float(sigmas[i + 1]) - float(sigmas[i]))
        if i in steps:
            assert not torch.allclose(nxt, euler) and torch.isfinite(out.log_probs[i]).all()
        else:
            assert torch.equal(nxt, euler) and torch.isnan(out.log_probs[i]).all()
