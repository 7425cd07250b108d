import math

import pytest
import torch

from diffrl_bench.registry import REWARDS
from diffrl_bench.reward_harness import RewardError, WeightedReward


class _Constant:
    def __init__(self, name, value, extra=None):
        self.name, self.value, self.extra = name, value, extra

    def __call__(self, images, prompts, metadata):
        out = {self.name: torch.full((images.shape[0],), self.value)}
        if self.extra:
            out[f"{self.name}.part"] = torch.full((images.shape[0],), self.extra)
        return out


@pytest.fixture
def fake_rewards(monkeypatch):
    made = {}

    def register(name, value, extra=None):
        monkeypatch.setitem(REWARDS._items, name, lambda **kw: _Constant(name, value, extra))
        made[name] = value

    return register


def _batch(n=4):
    return torch.rand(n, 3, 16, 16), [f"p{i}" for i in range(n)], [{} for _ in range(n)]


@pytest.mark.parametrize("worker", ["thread", "inline"])
def test_weighted_sum_and_components_are_logged(fake_rewards, worker):
    fake_rewards("r_a", 0.5, extra=0.25)
    fake_rewards("r_b", 2.0)
    reward = WeightedReward({"r_a": 3.0, "r_b": -1.0}, worker=worker)
    scores = reward.submit(*_batch()).result()
    reward.close()
    assert torch.allclose(scores["reward"], torch.full((4,), 3.0 * 0.5 - 2.0))
    assert torch.equal(scores["r_a.part"], torch.full((4,), 0.25))
    assert set(scores) == {"reward", "r_a", "r_a.part", "r_b"}


@pytest.mark.parametrize("worker", ["thread", "inline"])
def test_nan_reward_fails_loudly_with_its_name(fake_rewards, worker):
    fake_rewards("healthy", 1.0)
    fake_rewards("broken_scorer", math.nan)
    reward = WeightedReward({"healthy": 1.0, "broken_scorer": 1.0}, worker=worker)
    future = reward.submit(*_batch())
    with pytest.raises(RewardError, match="broken_scorer.*non-finite"):
        future.result()
    reward.close()


def test_raising_reward_is_reported_with_its_name(monkeypatch):
    class Exploding:
        name = "exploding"

        def __call__(self, images, prompts, metadata):
            raise RuntimeError("model server unreachable")

    monkeypatch.setitem(REWARDS._items, "exploding", lambda **kw: Exploding())
    reward = WeightedReward({"exploding": 1.0}, worker="thread")
    with pytest.raises(RewardError, match="exploding.*model server unreachable"):
        reward.submit(*_batch()).result()
    reward.close()


def test_wrong_length_scores_are_rejected(monkeypatch):
    class Short:
        name = "short"

        def __call__(self, images, prompts, metadata):
            return {"short": torch.zeros(images.shape[0] - 1)}

    monkeypatch.setitem(REWARDS._items, "short", lambda **kw: Short())
    with pytest.raises(RewardError, match="short.*3 scores.*4 images"):
        WeightedReward({"short": 1.0}, worker="inline")(*_batch())


def test_threaded_scoring_overlaps_with_the_caller(monkeypatch):
    import threading

    seen = {}

    class Slow:
        name = "slow"

        def __call__(self, images, prompts, metadata):
            seen["thread"] = threading.current_thread().name
            return {"slow": torch.ones(images.shape[0])}

    monkeypatch.setitem(REWARDS._items, "slow", lambda **kw: Slow())
    reward = WeightedReward({"slow": 1.0}, worker="thread")
    reward.submit(*_batch()).result()
    reward.close()
    assert seen["thread"].startswith("reward")
