"""The reward protocol (see rewards/ for plugins); the harness that runs them follows below."""
from __future__ import annotations

from typing import Any, Dict, List, Protocol, Sequence

import torch


class Reward(Protocol):
    """A reward scores a batch of images.

    `images` are float tensors (B, 3, H, W) in [0, 1]; `prompts` the B prompt strings; `metadata` one dict per image
    (for GenEval-style tasks, the prompt's include/exclude clauses). It returns a dict of float tensors of shape (B,):
    the key equal to the reward's `name` is the score used for training; other keys, written `name.part`, are logged.
    """

    name: str

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        ...


class RewardError(RuntimeError):
    """A reward raised, returned the wrong shape, or returned a non-finite score."""


def build_reward(name: str, options: Dict[str, Any] | None = None) -> Reward:
    from diffrl_bench.registry import REWARDS

    try:
        return REWARDS.get(name)(**(options or {}))
    except TypeError as error:
        raise RewardError(f"reward {name!r} rejected its options {options}: {error}") from None


def call_reward(name: str, reward: Reward, images: torch.Tensor, prompts: Sequence[str],
                metadata: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """Run one reward and check what it returned; any failure names the reward (never a silent 0)."""
    try:
        scores = reward(images, prompts, metadata)
    except Exception as error:  # noqa: BLE001 - re-raised with the reward's name
        raise RewardError(f"reward {name!r} raised {type(error).__name__}: {error}") from error
    if name not in scores:
        raise RewardError(f"reward {name!r} returned keys {sorted(scores)} without its own name")
    checked = {}
    for key, value in scores.items():
        value = torch.as_tensor(value, dtype=torch.float32).flatten().cpu()
        if value.shape[0] != images.shape[0]:
            raise RewardError(f"reward {name!r} returned {value.shape[0]} scores under {key!r} for {images.shape[0]} images")
        bad = ~torch.isfinite(value)
        if bad.any():
            index = int(bad.nonzero()[0])
            raise RewardError(f"reward {name!r} returned a non-finite score under {key!r} "
                              f"(image {index}, prompt {prompts[index]!r})")
        checked[key] = value
    return checked


class WeightedReward:
    """The training reward: a weighted sum of components, each component (and its parts) kept for logging.

    `submit` scores a batch; with `worker="thread"` it runs in a background thread so the caller can sample the
    next chunk meanwhile, and `Future.result()` re-raises any failure with the reward's name.
    """

    TOTAL = "reward"

    def __init__(self, components: Dict[str, float], options: Dict[str, Dict[str, Any]] | None = None,
                 worker: str = "thread"):
        from concurrent.futures import ThreadPoolExecutor

        if not components:
            raise RewardError("no reward components configured (reward.components is empty)")
        options = options or {}
        self.weights = dict(components)
        self.rewards = {name: build_reward(name, options.get(name)) for name in components}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward") if worker == "thread" else None

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        scores: Dict[str, torch.Tensor] = {}
        for name, reward in self.rewards.items():
            scores.update(call_reward(name, reward, images, prompts, metadata))
        scores[self.TOTAL] = sum(weight * scores[name] for name, weight in self.weights.items())
        return scores

    def submit(self, images: torch.Tensor, prompts: Sequence[str], metadata: List[Dict[str, Any]]):
        from concurrent.futures import Future

        if self._pool is not None:
            return self._pool.submit(self, images, prompts, metadata)
        done: Future = Future()
        try:
            done.set_result(self(images, prompts, metadata))
        except Exception as error:  # noqa: BLE001 - delivered through the future like the threaded path
            done.set_exception(error)
        return done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
