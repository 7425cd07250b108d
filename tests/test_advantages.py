"""Group advantages: parity with Flow-GRPO's stat tracker and the invariances the formula implies."""
import os
from pathlib import Path

import pytest
import torch

from diffrl_bench.advantages import (
    clip_advantages,
    group_advantages,
    group_mean_centered,
    optimality_probability,
    zero_variance_mask,
)
from diffrl_bench.parity import load_cases

PARITY_DIR = Path(os.environ.get("DIFFRL_PARITY_DIR", Path(__file__).parent / "data" / "parity" / "public"))
CASES = [c for c in load_cases(PARITY_DIR) if c["kind"] == "advantages"] if PARITY_DIR.is_dir() else []


# Parity with the original code: every case runs in tests/test_parity.py.

@pytest.mark.parametrize("case", CASES, ids=[c["case_id"] for c in CASES])
def test_parity_direct(case):
    # The same cases through the public function, without the parity runner in between.
    rewards = torch.tensor(case["inputs"]["rewards"], dtype=torch.float64)
    ids = torch.tensor(case["inputs"]["group_ids"])
    std = "global" if case["params"]["global_std"] else "group"
    expected = torch.tensor(case["outputs"]["advantages"], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(rewards, ids, std=std), expected, atol=1e-10, rtol=1e-8)


def random_batch(seed=0, groups=(3, 5, 4, 6)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(groups)])
    perm = torch.randperm(len(ids), generator=g)
    return torch.rand(len(ids), generator=g, dtype=torch.float64), ids[perm]


@pytest.mark.parametrize("std", ["global", "group"])
def test_zero_variance_group_gives_exactly_zero(std):
    rewards, ids = random_batch()
    # Group 3 has 6 samples: the float mean of six 0.7s is not exactly 0.7, yet the advantage must be exactly 0.
    rewards[ids == 3] = 0.7
    adv = group_advantages(rewards, ids, std=std)
    assert torch.all(adv[ids == 3] == 0.0)
    assert torch.all(adv[ids != 3] != 0.0)
    assert torch.equal(zero_variance_mask(rewards, ids), ids == 3)
    assert torch.all(group_mean_centered(rewards, ids)[ids == 3] == 0.0)


def test_invariant_to_a_constant_per_group_with_group_std():
    rewards, ids = random_batch(1)
    shift = torch.tensor([0.3, -2.0, 7.0, 0.0], dtype=torch.float64)[ids]
    torch.testing.assert_close(group_advantages(rewards + shift, ids, std="group"),
                               group_advantages(rewards, ids, std="group"))
    torch.testing.assert_close(group_mean_centered(rewards + shift, ids), group_mean_centered(rewards, ids))


def test_global_std_is_scale_invariant():
    rewards, ids = random_batch(2)
    # eps is absolute, so compare at eps = 0 for exact invariance, and check the eps effect is tiny otherwise.
    torch.testing.assert_close(group_advantages(rewards * 37.0, ids, eps=0.0), group_advantages(rewards, ids, eps=0.0))
    torch.testing.assert_close(group_advantages(rewards * 37.0, ids), group_advantages(rewards, ids), rtol=1e-3, atol=0)


def test_interleaved_groups_equal_sorted_version_permuted():
    rewards, ids = random_batch(3)
    order = torch.argsort(ids, stable=True)
    for std in ("global", "group"):
        interleaved = group_advantages(rewards, ids, std=std)
        sorted_adv = group_advantages(rewards[order], ids[order], std=std)
        torch.testing.assert_close(interleaved[order], sorted_adv, atol=1e-14, rtol=0)


def test_group_labels_need_not_be_contiguous():
    rewards, ids = random_batch(4)
    relabelled = ids * 10 + 1000
    torch.testing.assert_close(group_advantages(rewards, relabelled, std="group"),
                               group_advantages(rewards, ids, std="group"))


def test_definition_on_a_small_example():
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0, 18.0])
    ids = torch.tensor([0, 0, 1, 1, 1])
    # group means 2 and 14; population std over all five rewards.
    centered = torch.tensor([-1.0, 1.0, -4.0, 0.0, 4.0], dtype=torch.float64)
    std_all = rewards.double().std(unbiased=False)
    torch.testing.assert_close(group_advantages(rewards, ids), centered / (std_all + 1e-4))
    group_std = torch.tensor([1.0, 1.0, (32 / 3) ** 0.5, (32 / 3) ** 0.5, (32 / 3) ** 0.5], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(rewards, ids, std="group"), centered / (group_std + 1e-4))
    torch.testing.assert_close(group_mean_centered(rewards, ids, scale=0.1), 0.1 * centered)
    assert group_advantages(rewards, ids).dtype == torch.float64


def test_unknown_std_mode_names_the_value():
    with pytest.raises(ValueError, match="per_prompt"):
        group_advantages(torch.rand(4), torch.zeros(4, dtype=torch.long), std="per_prompt")


def test_clip_and_optimality_probability():
    adv = torch.tensor([-12.0, -5.0, -2.5, 0.0, 1.0, 5.0, 9.0], dtype=torch.float64)
    torch.testing.assert_close(clip_advantages(adv, 5.0), torch.tensor([-5.0, -5.0, -2.5, 0.0, 1.0, 5.0, 5.0],
                                                                        dtype=torch.float64))
    r = optimality_probability(adv)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(optimality_probability(adv, clip_max=2.0)[2], torch.tensor(0.0, dtype=torch.float64))
