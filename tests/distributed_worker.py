"""Run by tests/test_distributed.py under `accelerate launch` with 2 CPU processes: two RL steps of a tiny run,
then each process writes its parameters and the gathered advantages of every step (not a test module itself)."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from diffrl_bench.config import load_config
from diffrl_bench.registry import REWARDS
from diffrl_bench.train import Trainer


@REWARDS.register("test_brightness")
class BrightnessReward:
    """The conftest reward (mean pixel value), registered again: this process does not load conftest.py."""

    name = "test_brightness"

    def __call__(self, images, prompts, metadata):
        return {self.name: images.mean(dim=(1, 2, 3))}


def main() -> None:
    out, config, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    trainer = Trainer(load_config(config, overrides), progress=False)
    tensors = {f"init{i}": p.detach().cpu().clone().contiguous() for i, p in enumerate(trainer.policy.core.parameters())}
    for step in range(2):
        batch = trainer.collect()
        tensors[f"advantages{step}"] = trainer.gather(batch.advantages).contiguous()
        tensors[f"rewards{step}"] = trainer.gather(batch.rewards).contiguous()
        tensors[f"step_rewards{step}"] = batch.step_scores["reward"].contiguous()
        tensors[f"step_brightness{step}"] = batch.step_scores["test_brightness"].contiguous()
        trainer.optimize(batch)
    for i, p in enumerate(trainer.policy.core.parameters()):
        tensors[f"param{i}"] = p.detach().cpu().contiguous()
    tensors["world"] = torch.tensor([trainer.world])
    tensors["nfe"] = torch.tensor([trainer.ledger.nfe["rollout"], trainer.ledger.nfe["train"]])
    save_file(tensors, str(out / f"rank{trainer.rank}.safetensors"))
    trainer.reward.close()
    trainer.accelerator.wait_for_everyone()
    if dist.is_initialized():
        dist.destroy_process_group()  # without it, 2-process runs sometimes abort at exit (ENV_NOTES)


if __name__ == "__main__":
    main()
