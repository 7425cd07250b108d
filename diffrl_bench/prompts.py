"""Prompt sources for runs: the toy benchmark's fixed splits (real prompt-file formats come with real models)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List


@dataclass(frozen=True)
class Prompt:
    text: str
    metadata: Dict[str, Any]


def load_prompts(source: str, key: str = "data.train_prompts") -> List[Prompt]:
    """`toy:train`, `toy:heldout` or `toy:all` -> prompts with their GenEval-style metadata."""
    from diffrl_bench.toy import domain

    if source.startswith("toy:"):
        train, heldout = domain.prompt_splits()
        splits = {"train": train, "heldout": heldout, "all": domain.all_prompts()}
        split = source.split(":", 1)[1]
        if split not in splits:
            raise ValueError(f"{key}: unknown toy split {split!r}; use one of {sorted(splits)}")
        return [Prompt(spec.text, dict(spec.metadata)) for spec in splits[split]]
    raise ValueError(f"{key}: unknown prompt source {source!r}; the toy benchmark's sources are toy:train, toy:heldout, toy:all")
