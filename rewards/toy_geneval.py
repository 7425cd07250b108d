"""Rewards of the built-in toy GenEval domain: the exact programmatic detector, and a held-out naturalness score.

`toy_geneval` is the training reward (a blend of GenEval strict correctness and partial credit); `toy_naturalness`
(palette fidelity) and `toy_no_extra_objects` (no object beyond what the prompt asks for) are meant for evaluation
only, to expose generations that please the detector but do not look like the domain's renders or that add
objects GenEval's checks do not penalise.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from diffrl_bench.registry import REWARDS
from diffrl_bench.rewards._common import option
from diffrl_bench.toy.detector import extra_objects_batch, palette_fidelity, score_batch


def _as_tensor(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32).to(like.device if isinstance(like, torch.Tensor) else "cpu")


@REWARDS.register("toy_geneval")
class ToyGenEvalReward:
    """GenEval-style reward: `strict_weight * strict + (1 - strict_weight) * partial` (see detector.score).

    Partial credit keeps the reward dense early in training, when strict correctness is rare.
    """

    name = "toy_geneval"
    # Without include clauses the detector finds nothing asked for and scores 1.0: such prompts are refused.
    needs_metadata = ("tag", "include")

    def __init__(self, strict_weight: float = 0.5):
        self.strict_weight = option(self.name, "strict_weight", strict_weight, float, lambda v: 0 <= v <= 1,
                                    "is not in [0, 1]")

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: List[Dict[str, Any]]
    ) -> Dict[str, torch.Tensor]:
        strict, partial = score_batch(images, metadata)
        blended = self.strict_weight * strict + (1.0 - self.strict_weight) * partial
        return {
            self.name: _as_tensor(blended, images),
            f"{self.name}.strict": _as_tensor(strict, images),
            f"{self.name}.partial": _as_tensor(partial, images),
        }


@REWARDS.register("toy_naturalness")
class ToyNaturalnessReward:
    """Palette fidelity: the fraction of pixels near a palette colour or black (1.0 on clean renders)."""

    name = "toy_naturalness"

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: List[Dict[str, Any]]
    ) -> Dict[str, torch.Tensor]:
        return {self.name: _as_tensor(palette_fidelity(images), images)}


@REWARDS.register("toy_no_extra_objects")
class ToyNoExtraObjectsReward:
    """1 when the image holds no object beyond what the prompt asks for (`detector.extra_objects`), else 0.

    Its mean over held-out images is the share of clean scenes. RL'd toy policies learn to add objects, which the
    GenEval-style reward does not penalise and palette fidelity does not see; this is the held-out metric of the
    reward-hacking claim (sweeps/claims/crd_reward_hacking.yaml). The domain's own renders carry a distractor in
    some scenes (`toy.domain._DISTRACTOR_PROBABILITY`), so the base model scores below 1: read it as a change.
    """

    name = "toy_no_extra_objects"
    needs_metadata = ("include",)

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: List[Dict[str, Any]]
    ) -> Dict[str, torch.Tensor]:
        clean = (extra_objects_batch(images, metadata) == 0).astype(np.float32)
        return {self.name: _as_tensor(clean, images)}
