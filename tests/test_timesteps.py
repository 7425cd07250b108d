"""Training-time distributions for the forward-process losses."""
import pytest
import torch

from diffrl_bench.sampling import flow_sigmas
from diffrl_bench.sampling import dpm_flow_sigmas
from diffrl_bench.timesteps import TIME_DISTRIBUTIONS, quantize_times, sample_train_times, stratum_bounds

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


# stratified_index: the originals' strata. AWM (scxue/advantage_weighted_matching@be513723, config/dgx_awm.py:37,
# 60, 88, 367): 14 Euler steps, shift 3, T = 6, span [1, int(14 x 0.9)] (`discrete_wo_init`, GenEval/OCR) or
# [0, int(14 x 0.9)] (`discrete`, PickScore). CRD (X-GenGroup/Flow-Factory@a0b2bc5a, default.yaml:60-63, 77):
# 10 Euler steps, T = 20, span over the indices whose 1000 t lies in [1000 (1 - 0.99), 1000].
AWM_GRID, CRD_GRID = flow_sigmas(14, 3.0), flow_sigmas(10, 3.0)
AWM_HI = int(14 * 0.9)
CRD_FIXED = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6, 6, 7, 7]  # the list the issue quotes


def exact_bounds(lo, hi, T):
    """floor(lo + k (hi - lo) / T) in integer arithmetic: the truncated linspace without rounding."""
    return [lo + (k * (hi - lo)) // T for k in range(T + 1)]


@pytest.mark.parametrize("lo, hi, T, strata", [
    (1, AWM_HI, 6, [[1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]),
    (0, AWM_HI, 6, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]),
])
def test_awm_strata_are_the_truncated_linspace(lo, hi, T, strata):
    assert AWM_HI == 12
    lower, upper = stratum_bounds(lo, hi, T)
    bounds = exact_bounds(lo, hi, T)
    assert lower.tolist() == bounds[:-1] and upper.tolist() == bounds[1:]
    assert [list(range(a, b)) for a, b in zip(lower.tolist(), upper.tolist())] == strata


def test_crd_span_and_strata_give_the_fixed_indices():
    # The port keeps the grid indices whose scheduler time 1000 t is within [10, 1000] (+-1e-3): 0..8 of 10.
    valid = [i for i, t in enumerate((CRD_GRID[:-1] * 1000).tolist()) if 10 - 1e-3 <= t <= 1000 + 1e-3]
    assert valid == list(range(9))
    lower, upper = stratum_bounds(0, 8, 20)
    assert lower.tolist() == exact_bounds(0, 8, 20)[:-1] == CRD_FIXED
    assert torch.all(upper - lower <= 1)  # width <= 1: lower + floor(u (upper - lower)) is always `lower`
    for seed in range(5):
        t = sample_train_times("stratified_index", 3, 20, gen(seed), grid=CRD_GRID, index_range=[0, 8])
        assert torch.equal(t, CRD_GRID[CRD_FIXED].unsqueeze(1).expand(20, 3))
    assert 0.46 < float(CRD_GRID[7]) < 0.47 and float(CRD_GRID[8]) < 0.28  # t in [0.46, 1]; index 8 never drawn


@pytest.mark.parametrize("lo, never_one", [(1, True), (0, False)])
def test_awm_stratified_index_one_index_per_stratum_shared_by_the_samples(lo, never_one):
    lower, upper = stratum_bounds(lo, AWM_HI, 6)
    seen = set()
    for seed in range(200):
        t = sample_train_times("stratified_index", 3, 6, gen(seed), grid=AWM_GRID, index_range=[lo, AWM_HI])
        assert torch.all(t == t[:, :1])  # shared by the samples of the draw
        for k in range(6):  # exactly one index in each stratum
            matches = [i for i in range(len(AWM_GRID) - 1) if float(AWM_GRID[i]) == float(t[k, 0])]
            assert len(matches) == 1 and lower[k] <= matches[0] < upper[k]
            seen.add(matches[0])
        if never_one:
            assert torch.all(t < 1)
    assert seen == set(range(lo, AWM_HI))  # every index of the span is reachable (t = 1 for PickScore), 12 is not
    if never_one:  # GenEval / OCR: t in [0.357, 0.973]
        assert 0.357 < float(AWM_GRID[11]) < 0.358 and 0.973 < float(AWM_GRID[1]) < 0.974


def test_stratified_index_defaults_to_the_whole_nonzero_grid_and_rejects_bad_spans():
    # 10 strata over 10 points: every point exactly once, in grid order.
    assert torch.equal(sample_train_times("stratified_index", 2, 10, gen(), grid=GRID)[:, 0], GRID[:-1])
    for span in ([0, 11], [3, 3], [-1, 4], [0], [0.0, 4]):
        with pytest.raises(ValueError, match="index_range"):
            sample_train_times("stratified_index", 2, 2, gen(), grid=GRID, index_range=span)
    with pytest.raises(ValueError, match="grid"):
        sample_train_times("stratified_index", 2, 2, gen())


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


def test_grid_prefix_draws_distinct_points_of_the_noisiest_pool_shared_by_the_batch():
    seen = set()
    for seed in range(40):
        t = sample_train_times("grid_prefix", 6, 4, gen(seed), grid=GRID, pool=5)
        assert t.shape == (4, 6)
        assert all(torch.equal(t[:, 0], t[:, j]) for j in range(6))  # one set for every sample
        column = t[:, 0].tolist()
        assert len(set(column)) == 4 and set(column) <= set(GRID[:5].tolist())
        seen.update(column)
    assert seen == set(GRID[:5].tolist())  # every point of the pool turns up, none beyond it
    with pytest.raises(ValueError, match="pool"):
        sample_train_times("grid_prefix", 2, 4, gen(), grid=GRID, pool=3)
    with pytest.raises(ValueError, match="pool"):
        sample_train_times("grid_prefix", 2, 4, gen(), grid=GRID, pool=11)


@pytest.mark.parametrize("num_steps,shift", [(10, 3.0), (14, 3.0), (25, 5.0)])
def test_floor1000_gives_the_dpm_schedulers_integer_timesteps(num_steps, shift):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift,
                                                  prediction_type="flow_prediction")
    sched.set_timesteps(num_steps)
    grid = dpm_flow_sigmas(num_steps, shift)[:-1].to(torch.float32)
    t = quantize_times(grid, "floor1000")
    # DGPO's t = timesteps / 1000, an int64 / int division torch does in float32
    assert t.dtype == torch.float32 and torch.equal(t, sched.timesteps.cpu() / 1000)
    assert bool((t <= grid).all()) and bool((grid - t < 1e-3).all())


def test_quantize_times_none_is_identity_and_unknown_kind_is_refused():
    t = torch.rand(3, 4, dtype=torch.float64)
    assert quantize_times(t, "none") is t
    assert torch.equal(quantize_times(torch.tensor([0.5, 0.2505]), "floor1000"), torch.tensor([0.5, 0.25]))
    with pytest.raises(ValueError, match="quantizer"):
        quantize_times(t, "round")
