"""Run by tests/test_distributed.py as one of 2 processes started by hand (RANK, WORLD_SIZE, MASTER_ADDR/PORT):
a whole run in which process 1 alone meets a non-finite value (argv[2]: `reward`, `loss` or `metric`). Each process
writes the error it stopped with to rank<r>.error and exits 1 (not a test module itself)."""
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import distributed_worker  # noqa: F401  (registers the test_brightness reward in this process)
from diffrl_bench.config import load_config
from diffrl_bench.registry import REWARDS
from diffrl_bench.reward_harness import RewardError
from diffrl_bench.run_guards import RunStopped
from diffrl_bench.train import Trainer

RANK = int(os.environ["RANK"])


@REWARDS.register("test_nan_on_rank1")
class NanOnRankOne:
    """Mean pixel value, but NaN for one image on process 1."""

    name = "test_nan_on_rank1"

    def __call__(self, images, prompts, metadata):
        scores = images.mean(dim=(1, 2, 3))
        if RANK == 1:
            scores[0] = math.nan
        return {self.name: scores}


def inject(trainer: Trainer, where: str) -> None:
    """On process 1 only: a NaN loss, or a NaN metric next to a finite loss."""
    loss = trainer.algo.loss

    def failing(item, velocities):
        value, metrics = loss(item, velocities)
        if where == "loss":
            value = value * math.nan
        else:
            metrics = {**metrics, "test_ratio": torch.tensor(math.nan)}
        return value, metrics

    if RANK == 1 and where in ("loss", "metric"):
        trainer.algo.loss = failing


def main() -> int:
    out, where, config, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    torch.set_num_threads(1)
    trainer = Trainer(load_config(config, overrides), progress=False)
    inject(trainer, where)
    try:
        trainer.run()
    except (RewardError, RunStopped) as error:
        (out / f"rank{RANK}.error").write_text(f"{type(error).__name__}: {error}")
        dist.barrier()  # both processes got here: neither was left waiting in a collective
        dist.destroy_process_group()
        return 1
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
