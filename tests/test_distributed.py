"""Two CPU processes over gloo (DDP, and DeepSpeed ZeRO-2): identical parameters on both ranks after training, and
advantages identical to a single-process run over the same rollouts (a prompt's images span both ranks)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffrl_bench.config import load_config
from diffrl_bench.train import Trainer

WORKER = Path(__file__).with_name("distributed_worker.py")
ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "diffrl_bench" / "configs" / "accelerate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(tiny_run, out):
    # 3 prompts x 4 images = 12 images: rank 0 gets images 0-5, rank 1 images 6-11, so prompt 1 spans both ranks.
    return tiny_run("eval.every=-1", "checkpoint.every=0", "rollout.prompts_per_step=3", "rollout.chunk_size=3",
                    "train.micro_batch_size=3", "optim.lr=1e-2", out=out)


def _launch(tmp_path, launcher_args, overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(WORKER), str(tmp_path), "toy_nft", *overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]


def _single_process(tiny_run, tmp_path):
    trainer = Trainer(load_config("toy_nft", _overrides(tiny_run, tmp_path / "single")), progress=False)
    batch = trainer.collect()
    trainer.reward.close()
    return batch


@pytest.mark.parametrize("launcher", ["ddp", "zero2", "zero3"])
def test_two_processes_agree_with_each_other_and_with_one_process(tiny_run, tmp_path, launcher):
    """Launched with the shipped accelerate config files (their GPU settings overridden for 2 CPU processes)."""
    args = ["--config_file", str(ACCELERATE_CONFIGS / f"{launcher}.yaml")]
    ranks = _launch(tmp_path, args, _overrides(tiny_run, tmp_path / "run"))
    assert int(ranks[0]["world"]) == 2
    # The ledger counts both processes: 2 steps x 12 images x 3 sampler steps; 2 steps x 12 images x 2 training
    # times x 3 snapshots (theta, old, ref) - the same as one process doing all the work.
    assert ranks[0]["nfe"].tolist() == [2 * 12 * 3, 2 * 12 * 2 * 3]
    params = sorted(k for k in ranks[0] if k.startswith("param"))
    # Identical parameters on both ranks after two optimizer steps, and training moved them.
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in params)
    assert any(not torch.equal(ranks[0][k], ranks[0][k.replace("param", "init")]) for k in params)
    single = _single_process(tiny_run, tmp_path)
    # Same rollouts as one process (shared prompt and noise streams, each rank its slice), so the gathered rewards
    # and the group statistics computed from them are identical, although prompt 1's images live on both ranks.
    assert torch.equal(ranks[0]["rewards0"], single.rewards)
    assert torch.equal(ranks[0]["advantages0"], single.advantages)
    assert torch.equal(ranks[1]["advantages0"], single.advantages)
    assert not torch.equal(ranks[0]["advantages0"], ranks[0]["advantages1"])
    # The whole step's scores, gathered once in collect for advantages and logging, reach every rank complete
    # and in the step's image order: the same as one process's own.
    for rank in ranks:
        assert torch.equal(rank["step_rewards0"], single.rewards)
        assert torch.equal(rank["step_brightness0"], single.reward_components["test_brightness"].double())
