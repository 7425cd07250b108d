"""Run by tests/test_distributed.py under `accelerate launch` with 2 CPU processes: two RL steps of a tiny run,
then each process writes its parameters, its `old` snapshot and the gathered advantages of every step (not a test
module itself)."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from diffrl_bench.config import load_config
from diffrl_bench.registry import REWARDS
from diffrl_bench.train import Trainer
from diffrl_bench.zero3 import full_parameters


@REWARDS.register("test_brightness")
class BrightnessReward:
    """The conftest reward (mean pixel value), registered again: this process does not load conftest.py."""

    name = "test_brightness"

    def __call__(self, images, prompts, metadata):
        return {self.name: images.mean(dim=(1, 2, 3))}


def whole(params, prefix: str) -> dict:
    """Full copies of the parameters (under ZeRO-3 each process holds only a shard), keyed `prefix<i>`."""
    tensors = {}
    for i, p in enumerate(params):
        with full_parameters([p]):
            tensors[f"{prefix}{i}"] = p.detach().cpu().clone().contiguous()
    return tensors


def old_snapshot_parameters(policy) -> list:
    """The `old` snapshot's tensors in the order of `trainable_parameters()` (a LoRA adapter, or a module copy)."""
    lora = getattr(policy, "lora", None)
    if lora is not None:
        return [lora.params("old")[key] for key in lora.params()]
    return list(policy.snapshots["old"].parameters())


def main() -> None:
    out, config, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    trainer = Trainer(load_config(config, overrides), progress=False)
    tensors = whole(trainer.policy.trainable_parameters(), "init")
    for step in range(2):
        batch = trainer.collect()
        tensors[f"advantages{step}"] = trainer.gather(batch.advantages).contiguous()
        tensors[f"rewards{step}"] = trainer.gather(batch.rewards).contiguous()
        tensors[f"step_rewards{step}"] = batch.step_scores["reward"].contiguous()
        tensors[f"step_brightness{step}"] = batch.step_scores["test_brightness"].contiguous()
        trainer.optimize(batch)
    tensors.update(whole(trainer.policy.trainable_parameters(), "param"))
    if "old" in trainer.policy.snapshot_names():
        tensors.update(whole(old_snapshot_parameters(trainer.policy), "old"))
    tensors["world"] = torch.tensor([trainer.world])
    tensors["nfe"] = torch.tensor([trainer.ledger.nfe["rollout"], trainer.ledger.nfe["train"]])
    save_file(tensors, str(out / f"rank{trainer.rank}.safetensors"))
    trainer.reward.close()
    trainer.accelerator.wait_for_everyone()
    if dist.is_initialized():
        dist.destroy_process_group()  # without it, 2-process runs sometimes abort at exit (ENV_NOTES)


if __name__ == "__main__":
    main()
