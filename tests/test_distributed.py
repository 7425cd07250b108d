"""Two CPU processes over gloo (DDP, DeepSpeed ZeRO-2 and ZeRO-3, the latter also with every parameter sharded):
identical parameters and snapshots on both ranks after training, and advantages identical to a single-process run
over the same rollouts (a prompt's images span both ranks)."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from diffrl_bench.config import load_config
from diffrl_bench.toy.model import load_toy_model
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


def _launch(tmp_path, launcher_args, overrides, config="toy_nft", timeout=600):
    # Its own JIT cache, so a test sees what the run compiled (nothing: see the shared-memory kernel test).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(WORKER), str(tmp_path), config, *overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]


def _single_process(tiny_run, tmp_path):
    trainer = Trainer(load_config("toy_nft", _overrides(tiny_run, tmp_path / "single")), progress=False)
    batch = trainer.collect()
    trainer.reward.close()
    return batch


def _old_lag(rank) -> float:
    """max |old - theta| over max |theta - theta_0|."""
    params = [k for k in rank if k.startswith("param")]
    moved = max((rank[k] - rank[k.replace("param", "init")]).abs().max() for k in params)
    return float(max((rank[k.replace("param", "old")] - rank[k]).abs().max() for k in params) / moved)


def _launcher_args(launcher: str, tmp_path: Path) -> list:
    if launcher != "zero3_partitioned":
        return ["--config_file", str(ACCELERATE_CONFIGS / f"{launcher}.yaml")]
    # The shipped zero3.yaml, but partitioning every parameter: the tiny model's tensors are all below DeepSpeed's
    # default persistence threshold, so plain ZeRO-3 keeps them whole and never shards anything.
    ds_config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                 "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    accelerate_config = OmegaConf.load(ACCELERATE_CONFIGS / "zero3.yaml")
    accelerate_config.deepspeed_config = {"deepspeed_config_file": str(tmp_path / "ds.json"), "zero3_init_flag": False}
    accelerate_config.pop("mixed_precision")  # the DeepSpeed file decides it (none: fp32)
    OmegaConf.save(accelerate_config, tmp_path / "zero3_partitioned.yaml")
    return ["--config_file", str(tmp_path / "zero3_partitioned.yaml")]


@pytest.mark.parametrize("launcher", ["ddp", "zero2", "zero3", "zero3_partitioned"])
def test_two_processes_agree_with_each_other_and_with_one_process(tiny_run, tiny_model_dir, tmp_path, launcher):
    """Launched with the shipped accelerate config files (their GPU settings overridden for 2 CPU processes), and
    with ZeRO-3 forced to shard every parameter."""
    ranks = _launch(tmp_path, _launcher_args(launcher, tmp_path), _overrides(tiny_run, tmp_path / "run"))
    assert int(ranks[0]["world"]) == 2
    # The ledger counts both processes: 2 steps x 12 images x 3 sampler steps; 2 steps x 12 images x 2 training
    # times x 3 snapshots (theta, old, ref) - the same as one process doing all the work.
    assert ranks[0]["nfe"].tolist() == [2 * 12 * 3, 2 * 12 * 2 * 3]
    params = sorted(k for k in ranks[0] if k.startswith("param"))
    # Identical parameters on both ranks after two optimizer steps, and training moved them.
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in params)
    assert any(not torch.equal(ranks[0][k], ranks[0][k.replace("param", "init")]) for k in params)
    # Whole tensors (gathered where ZeRO-3 shards them), and the start is exactly the base model's weights.
    base = list(load_toy_model(tiny_model_dir).parameters())
    assert len(params) == len(base)
    assert all(torch.equal(ranks[0][f"init{i}"], p.detach()) for i, p in enumerate(base))
    # The `old` snapshot (decay 0.001, then 0.002) is soft-updated from theta's whole values: identical on both
    # ranks and within 0.2% of theta's displacement from the start. Had the update missed theta (sharded, stale
    # or zero), it would sit at the start or at zero, as far from theta as theta moved.
    olds = sorted(k for k in ranks[0] if k.startswith("old"))
    assert len(olds) == len(params)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in olds)
    assert _old_lag(ranks[0]) < 0.01
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
    # DeepSpeed trained without compiling its CPU shared-memory all-reduce kernel (81 s on a fresh machine).
    assert not (tmp_path / "torch_extensions" / "deepspeed_shm_comm").exists()


def test_lora_snapshots_train_and_update_under_sharded_zero3(tiny_sd3, tmp_path):
    """The SD3 backend's default LoRA: theta and the `old` snapshot are adapters inside the module ZeRO-3 shards."""
    overrides = ["model.backend=sd3", f"model.path={tiny_sd3}", f"output_dir={tmp_path / 'run'}", "train.threads=1",
                 "rollout.prompts_per_step=3", "rollout.images_per_prompt=4", "rollout.chunk_size=3",
                 "rollout.sampler.num_steps=2", "rollout.sampler.shift=3.0", "eval.every=-1", "checkpoint.every=0",
                 "train.micro_batch_size=3", "algo.num_train_times=2", "reward.components.test_brightness=1.0",
                 "optim.lr=1e-2"]
    ranks = _launch(tmp_path, _launcher_args("zero3_partitioned", tmp_path), overrides)
    params = sorted(k for k in ranks[0] if k.startswith("param"))
    assert params and all(ranks[0][k].numel() > 0 for k in params)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0] if k.startswith(("param", "old")))
    assert _old_lag(ranks[0]) < 0.01


def test_rft_keeps_processes_in_step_when_their_shares_differ(tiny_run, tmp_path):
    """3 prompts x 4 images on 2 processes: one holds 1.5 prompt groups of the other's, so their kept samples, and
    with them their training items, differ in number. Under sharded ZeRO-3 every forward and backward is a
    collective; the busier process's extra items are matched by zero-weight repeats instead of deadlocking."""
    overrides = _overrides(tiny_run, tmp_path / "run") + ["algo.min_reward=null"]
    ranks = _launch(tmp_path, _launcher_args("zero3_partitioned", tmp_path), overrides, config="toy_rft", timeout=300)
    params = sorted(k for k in ranks[0] if k.startswith("param"))
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in params)
    assert any(not torch.equal(ranks[0][k], ranks[0][k.replace("param", "init")]) for k in params)


# ----------------------------------------------------------------------------- diffrl_bench/distributed.py, no launch

from types import SimpleNamespace  # noqa: E402

from diffrl_bench.distributed import (PER_RANK_GENERATORS, SHM_KERNEL, Processes, make_generators,  # noqa: E402
                                      skip_cpu_shm_kernel_build)


def test_deepspeed_on_cpu_skips_building_its_shared_memory_kernel(monkeypatch, tmp_path):
    """DeepSpeed would compile the kernel when its CPU backend starts a process group (`build_shm_op`); after the
    skip it returns no op and compiles nothing, and the other ops keep their compatibility."""
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    table = deepspeed.ops.__compatible_ops__
    if not table.get(SHM_KERNEL):
        pytest.skip("DeepSpeed finds no compiler for the kernel here: nothing to skip")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setitem(table, SHM_KERNEL, True)  # restored after the test
    others = {k: v for k, v in table.items() if k != SHM_KERNEL}
    skip_cpu_shm_kernel_build()
    assert build_shm_op() is None
    assert not list(tmp_path.iterdir())
    assert {k: v for k, v in table.items() if k != SHM_KERNEL} == others


def test_shared_streams_are_equal_on_every_rank_and_per_rank_streams_differ():
    ranks = [make_generators(seed=3, rank=r) for r in range(3)]
    draws = [{name: torch.rand(4, generator=g) for name, g in gens.items()} for gens in ranks]
    for name in ("prompts", "noise"):  # every process draws the step's prompts and initial noise alike
        assert all(torch.equal(d[name], draws[0][name]) for d in draws)
    for name in PER_RANK_GENERATORS:  # no process repeats another's sampler or training noise
        assert len({tuple(d[name].tolist()) for d in draws}) == 3
    other_seed = make_generators(seed=4, rank=0)
    assert not torch.equal(torch.rand(4, generator=other_seed["noise"]), draws[0]["noise"])


@pytest.mark.parametrize("world, total", [(1, 12), (2, 12), (3, 12), (4, 10)])
def test_local_slices_tile_the_step_in_rank_order(world, total):
    slices = [Processes(SimpleNamespace(num_processes=world, process_index=r)).local_slice(total)
              for r in range(world)]
    covered = [i for s in slices for i in range(total)[s]]
    assert covered == list(range(total))


# ---------------------------------------------------------------------- the README's command on two processes
@pytest.mark.slow
def test_the_readme_accelerate_command_trains_on_two_processes_and_exits_cleanly(tiny_run, tmp_path):
    """`accelerate launch --config_file .../ddp.yaml -m diffrl_bench.cli train CONFIG [overrides]` (README), with
    two CPU processes: both exit 0 (the process group is torn down before exit), the summary line is printed once."""
    overrides = [o if not o.startswith("reward.components.") else "reward.components.jpeg_compressibility=1.0"
                 for o in tiny_run("eval.every=-1", "checkpoint.every=0", "train.steps=2", out=tmp_path / "run")]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / "ddp.yaml"),
               "--num_processes", "2", "--main_process_port", str(_free_port()),
               "-m", "diffrl_bench.cli", "train", "toy_nft", "--no-progress", *overrides]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "terminate called" not in done.stderr
    assert done.stdout.count("no held-out evaluation (eval.every < 0)") == 1, done.stdout
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["world_size"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]


# ---------------------------------------------------------------------- a failure on one process stops them all
FAILING_WORKER = Path(__file__).with_name("failing_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("where, message", [
    ("reward", r"RewardError: process 1: reward 'test_nan_on_rank1' returned a non-finite score nan"),
    ("loss", r"RunStopped: step 1: process 1: the loss of algorithm 'nft' is nan; the run stops before the optimizer"),
    ("metric", r"RunStopped: step 1: process 1: metric 'loss/test_ratio' is nan; the run stops before this row"),
])
def test_a_non_finite_value_on_one_process_stops_every_process_naming_it(tiny_run, tmp_path, where, message):
    """Process 1 alone meets the NaN; without the collective check it would raise there while process 0 waits
    in the next collective for ever. Started by hand (no launcher that would kill the survivor), so each
    process's own exit code is seen; the timeout only detects a hang."""
    reward = "reward.components.test_nan_on_rank1=1.0" if where == "reward" else "reward.components.test_brightness=1.0"
    overrides = tiny_run("eval.every=-1", "checkpoint.every=1", "rollout.prompts_per_step=2", out=tmp_path / "run")
    overrides = [o for o in overrides if not o.startswith("reward.components.")] + [reward]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    command = [sys.executable, str(FAILING_WORKER), str(tmp_path), where, "toy_nft", *overrides]
    procs = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, p in enumerate(procs):
        assert p.returncode == 1, f"process {rank} exited {p.returncode}:\n{outputs[rank][-3000:]}"
        assert re.match(message, (tmp_path / f"rank{rank}.error").read_text()), outputs[rank][-3000:]
    # Stopped before anything of step 1 was saved: no checkpoint, no training row.
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())
    rows = (tmp_path / "run" / "metrics.jsonl")
    assert not rows.exists() or "reward/mean" not in rows.read_text()
