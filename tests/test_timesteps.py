"""Training-time distributions for the forward-process losses."""
import pytest
import torch

from diffrl_bench.sampling import flow_sigmas
from diffrl_bench.timesteps import TIME_DISTRIBUTIONS, sample_train_times

GRID = flow_sigmas(10)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", TIME_DISTRIBUTIONS)
def test_shape_and_range(kind):
    t = sample_train_times(kind, 7, 4, gen(), grid=GRID)
    assert t.shape == (4, 7)
    assert torch.all(t > 0) and torch.all(t <= 1)


@pytest.mark.parametrize("kind", TIME_DISTRIBUTIONS)
def test_reproducible_from_the_generator(kind):
    a = sample_train_times(kind, 5, 3, gen(1), grid=GRID)
    b = sample_train_times(kind, 5, 3, gen(1), grid=GRID)
    c = sample_train_times(kind, 5, 3, gen(2), grid=GRID)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_grid_subset_draws_distinct_grid_values_per_sample():
    t = sample_train_times("grid_subset", 64, 9, gen(), grid=GRID)
    nonzero = set(GRID[GRID > 0].tolist())
    for column in t.T.tolist():
        assert len(set(column)) == 9
        assert set(column) <= nonzero
    # Independent permutations: the samples do not all share one order, and every grid point is used somewhere.
    assert len({tuple(column) for column in t.T.tolist()}) > 1
    assert set(t.flatten().tolist()) == nonzero
    # All of the grid: a permutation of the 10 non-zero sigmas.
    full = sample_train_times("grid_subset", 3, 10, gen(), grid=GRID)
    assert all(sorted(col) == sorted(nonzero) for col in full.T.tolist())


def test_stratified_grid_one_point_per_stratum_shared_across_batch():
    points = GRID[GRID > 0]
    for seed in range(20):
        t = sample_train_times("stratified_grid", 4, 5, gen(seed), grid=GRID)
        assert torch.all(t == t[:, :1])
        # 10 points in 5 strata of 2 (grid is decreasing, so stratum k is points[2k : 2k + 2]).
        for k in range(5):
            assert float(t[k, 0]) in points[2 * k: 2 * k + 2].tolist()
    # Over many draws both points of a stratum appear.
    firsts = {float(sample_train_times("stratified_grid", 1, 5, gen(s), grid=GRID)[0, 0]) for s in range(40)}
    assert firsts == set(points[:2].tolist())


def test_uniform_and_logit_normal_options():
    t = sample_train_times("uniform", 2000, 1, gen(), t_min=0.2, t_max=0.4)
    assert t.min() >= 0.2 and t.max() <= 0.4
    assert abs(t.mean().item() - 0.3) < 0.01
    ln = sample_train_times("logit_normal", 4000, 1, gen(), mean=1.0, std=0.5)
    logits = torch.logit(ln)
    assert abs(logits.mean().item() - 1.0) < 0.05 and abs(logits.std().item() - 0.5) < 0.05


def test_errors():
    with pytest.raises(ValueError, match="logit_normal"):  # lists the kinds
        sample_train_times("beta", 2, 2, gen())
    for kind in ("grid_subset", "stratified_grid"):
        with pytest.raises(ValueError, match="grid"):
            sample_train_times(kind, 2, 2, gen())
        with pytest.raises(ValueError):
            sample_train_times(kind, 2, 11, gen(), grid=GRID)  # only 10 non-zero grid points
    with pytest.raises(ValueError):
        sample_train_times("uniform", 2, 2, gen(), t_mn=0.1)
    with pytest.raises(ValueError):
        sample_train_times("uniform", 2, 2, gen(), t_min=0.0)
