"""Figures a person would rather look at than read: reward vs cost curves and image grids."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

FIGURE_DPI = 110
# Scores lie in [0, 1]; the small margin above keeps a curve at 1 off the frame.
SCORE_YLIM = (0, 1.02)
# Steps in the rolling mean that smooths the per-step training reward.
REWARD_SMOOTHING_STEPS = 20


def plot_reward_vs_cost(frame, path: Path, headline: str, heldout: Sequence[str] = (), title: str = "") -> Path:
    """Eval headline (and held-out metrics) against device-hours, with the training reward in a second panel."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    evals = frame.dropna(subset=[headline]) if headline in frame else frame.iloc[0:0]
    hours = "cost/gpu_hours"
    if len(evals):
        left.plot(evals[hours], evals[headline], "o-", label=headline.replace("eval/", "") + " (held-out prompts)")
        for key in heldout:
            if key in evals:
                left.plot(evals[hours], evals[key], "s--", label=key.replace("eval/", "") + " (held-out metric)")
    left.set_xlabel("device-hours (world size x wall; GPU-hours on GPUs)")
    left.set_ylabel("score")
    left.set_ylim(*SCORE_YLIM)
    left.grid(alpha=0.3)
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8, loc="lower right")
    left.set_title("evaluation vs cost")
    if "reward/mean" in frame:
        train = frame.dropna(subset=["reward/mean"])
        right.plot(train[hours], train["reward/mean"], alpha=0.3, label="per step")
        right.plot(train[hours], train["reward/mean"].rolling(REWARD_SMOOTHING_STEPS, min_periods=1).mean(),
                   label=f"rolling mean ({REWARD_SMOOTHING_STEPS})")
    right.set_xlabel("device-hours")
    right.set_ylabel("training reward")
    right.grid(alpha=0.3)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    right.set_title("training reward vs cost")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path


def save_image_grid(images: torch.Tensor, prompts: List[str], path: Path, per_prompt: int = 4, title: str = "") -> Path:
    """One row per prompt (labelled), `per_prompt` images per row; images are (N, 3, H, W) in [0, 1]."""
    rows = len(prompts)
    fig, axes = plt.subplots(rows, per_prompt + 1, figsize=(1.3 * (per_prompt + 2.6), 1.2 * rows + 0.4),
                             gridspec_kw={"width_ratios": [2.6] + [1] * per_prompt}, squeeze=False)
    for r, prompt in enumerate(prompts):
        axes[r, 0].text(1.0, 0.5, "\n".join(textwrap.wrap(prompt, 28)), ha="right", va="center", fontsize=7)
        axes[r, 0].axis("off")
        for c in range(per_prompt):
            image = images[r * per_prompt + c].permute(1, 2, 0).clamp(0, 1).numpy()
            axes[r, c + 1].imshow(image, interpolation="nearest")
            axes[r, c + 1].axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path
