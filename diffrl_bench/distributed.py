"""Processes of a run: the accelerate setup, the collectives the Trainer needs, and the per-process random streams.

One process or many (`accelerate launch`), the Trainer sees the same few operations: `gather` (every process's
equal-sized slice, in rank order = the step's image order), `gather_scores`, `broadcast_flag` (the main process
decides for all), `failures` (a problem found on any process, known to all, so they stop together), and the random
streams, seeded so that a run's rollouts do not depend on the number of processes
(see `make_generators`) and saved per rank in checkpoints (`generators_by_rank`, `own_generators`).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

SEED_STRIDE = 1000
"""`train.seed * SEED_STRIDE + stream`: the streams of different seeds never share a generator seed"""
STREAM_OFFSETS = {"prompts": 1, "noise": 2, "train": 3, "sampler": 4}
"""each random stream's offset within a seed's block (the order fixes every committed run's numbers)"""
RANK_SEED_STRIDE = 7919
"""per-process streams are offset by `rank * RANK_SEED_STRIDE` (a prime, so no rank lands on another stream's seed)"""
PER_RANK_GENERATORS = ("train", "sampler")
"""the streams each process draws on its own; `prompts` and `noise` are shared by every process"""


SHARED_TRAIN_OFFSET = 5
"""offset of `shared_train_generator`'s seed (after every `STREAM_OFFSETS` entry)"""


def shared_train_generator(seed: int) -> torch.Generator:
    """A training stream that is the same on every process, for draws a whole step must agree on (DGPO's training
    times and group noise, which the original draws on rank 0 and broadcasts). A plugin owns it and draws from it
    once per optimizer step on every process; it is not part of the checkpoint, so a resumed run redraws."""
    return torch.Generator().manual_seed(seed * SEED_STRIDE + SHARED_TRAIN_OFFSET)


def make_generators(seed: int, rank: int) -> Dict[str, torch.Generator]:
    """The run's random streams, separate so that e.g. changing the micro-batch size does not change which prompts are
    drawn. `prompts` and `noise` (initial noise) are shared by every process, which each take their slice of the
    step's images, so a run's rollouts do not depend on the number of processes; the sampler's own noise and the
    training draws are per process (offset by rank), so processes never repeat each other's noise."""
    generators = {}
    for name, offset in STREAM_OFFSETS.items():
        rank_offset = RANK_SEED_STRIDE * rank if name in PER_RANK_GENERATORS else 0
        generators[name] = torch.Generator().manual_seed(seed * SEED_STRIDE + offset + rank_offset)
    return generators


def deepspeed_requested() -> bool:
    """Whether the launcher asked for DeepSpeed (`accelerate launch` with a DeepSpeed config sets this)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")


SHM_KERNEL = "deepspeed_shm_comm"
"""DeepSpeed's CPU shared-memory all-reduce op, which it JIT-compiles when it starts a process group"""


def skip_cpu_shm_kernel_build() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory all-reduce kernel (`deepspeed_shm_comm`).

    DeepSpeed 0.19 builds that C++ op with the machine's compiler the first time a process group starts on a machine
    (81 s on a 2-core Intel Xeon, once per fresh machine: every CI run, every new cloud box). Only its tensor-parallel
    inference path (`inference_all_reduce`) ever calls it; ZeRO training reduces through torch.distributed. DeepSpeed
    consults `deepspeed.ops.__compatible_ops__` before building and keeps that dict for the process, so marking the
    op incompatible there skips the build, and `inference_all_reduce` falls back to torch.distributed as it does
    where the op is missing."""
    import deepspeed.ops

    table = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(table, dict):  # another DeepSpeed release may keep it elsewhere: then it builds as before
        table[SHM_KERNEL] = False


def make_accelerator(train_cfg):
    """The accelerate `Accelerator` for `train.device` / `train.mixed_precision`, and whether DeepSpeed drives it."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    want_cpu = train_cfg.device == "cpu" or (train_cfg.device == "auto" and not torch.cuda.is_available())
    precision = train_cfg.mixed_precision
    if precision == "auto":
        precision = "no" if want_cpu else "bf16"
    deepspeed = deepspeed_requested()
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # CPU processes talk over gloo; without it accelerate + DeepSpeed miscount the world (ENV_NOTES).
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    if deepspeed and not torch.cuda.is_available():
        skip_cpu_shm_kernel_build()
    # `cpu=True` would silently drop DeepSpeed, so it is only set for plain CPU / DDP runs.
    accelerator = Accelerator(cpu=want_cpu and not deepspeed, mixed_precision=precision, kwargs_handlers=handlers)
    return accelerator, deepspeed


class Processes:
    """The collectives of a run over its accelerator's processes (all no-ops on one process)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's equal-sized slice, in rank order (= the step's image order)."""
        if self.world == 1:
            return values
        return self.accelerator.gather(values.to(self.accelerator.device)).cpu()

    def gather_scores(self, scores: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """`gather` for a dict of (local,) scores, as float64, in one collective instead of one per entry."""
        if self.world == 1:
            return {key: value.double() for key, value in scores.items()}
        columns = self.gather(torch.stack([value.double() for value in scores.values()], dim=1))
        return dict(zip(scores, columns.unbind(dim=1)))

    def broadcast_flag(self, flag: bool) -> bool:
        """The main process's `flag` on every process (each may have measured its own)."""
        if self.world == 1:
            return flag
        from accelerate.utils import broadcast

        return bool(broadcast(torch.tensor([float(flag)], device=self.accelerator.device), from_process=0))

    def failures(self, problem: Optional[str]) -> List[str]:
        """Every process's `problem` (None when it has none), the same list on every process: `process r: ...`
        lines when several processes run, or the one problem. A collective: a failure found on one process
        (a NaN in its share, a reward that failed there) must stop every process at the same point, or the others
        would wait for it in their next collective for ever. One one-element all-reduce when nothing failed;
        the messages are gathered only when something did."""
        if self.world == 1:
            return [problem] if problem is not None else []
        import torch.distributed as dist

        flag = torch.tensor([float(problem is not None)], device=self.accelerator.device)
        dist.all_reduce(flag)
        if float(flag) == 0:
            return []
        messages: List[Optional[str]] = [None] * self.world
        dist.all_gather_object(messages, problem)
        if len(set(messages)) == 1:  # the same on every process (a global gradient norm): said once
            return [messages[0]]
        return [f"process {rank}: {message}" for rank, message in enumerate(messages) if message is not None]

    def local_slice(self, total: int) -> slice:
        """This process's contiguous share of `total` items (the step's images)."""
        return slice(self.rank * total // self.world, (self.rank + 1) * total // self.world)

    def generators_by_rank(self, generators: Dict[str, torch.Generator]) -> Dict[str, torch.Generator]:
        """The checkpoint's generators: the shared ones once, the per-process ones of every rank (`train@rank1`).
        A collective: every process takes part."""
        saved = {name: g for name, g in generators.items() if name not in PER_RANK_GENERATORS}
        for name in PER_RANK_GENERATORS:
            # Gathered as int64: DeepSpeed's CPU all-gather crashes (SIGSEGV) on the uint8 state tensor.
            states = self.gather(generators[name].get_state()[None].long())
            for rank in range(self.world):
                g = torch.Generator()
                g.set_state(states[rank].to(torch.uint8).contiguous())
                saved[name if rank == 0 else f"{name}@rank{rank}"] = g
        return saved

    def own_generators(self, generators: Dict[str, torch.Generator]) -> Dict[str, torch.Generator]:
        """This process's generators under their checkpoint names."""
        return {(name if self.rank == 0 or name not in PER_RANK_GENERATORS else f"{name}@rank{self.rank}"): g
                for name, g in generators.items()}


def end_processes() -> None:
    """Tear down the process group at a normal end (or a stop every process agreed on): torch asks for it before
    exit, and without it two-process gloo runs were seen aborting at exit (ENV_NOTES). Not after a failure on one
    process alone: the others may still wait in a collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
