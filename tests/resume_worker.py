"""Run by tests/test_ds_checkpoint.py under `accelerate launch`: a whole run (`Trainer.run`), checkpoints and
resume included (not a test module itself)."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import distributed_worker  # noqa: F401  (registers the test_brightness reward in this process)
from diffrl_bench.config import load_config
from diffrl_bench.train import Trainer


def main() -> None:
    config, overrides = sys.argv[2], sys.argv[3:]  # argv[1]: the output folder, as for distributed_worker.py
    torch.set_num_threads(1)
    Trainer(load_config(config, overrides), progress=False).run()
    if dist.is_initialized():
        dist.destroy_process_group()  # without it, 2-process runs sometimes abort at exit (ENV_NOTES)


if __name__ == "__main__":
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    main()
