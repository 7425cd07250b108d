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
