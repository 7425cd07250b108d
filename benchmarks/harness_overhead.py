"""Harness overhead: one RL step through the Trainer vs the bare model calls it contains, run directly.

The bare loop makes exactly the same network calls with the same shapes (rollout: steps x chunks forwards of the
sampling snapshot; training: per item one forward+backward of theta and one forward of each other snapshot; one
optimizer step) but none of the harness around them (sampler bookkeeping, reward scoring and its
thread, advantages, loss maths, ledger, metrics). Both run in this one process, interleaved (the order alternates
from round to round, so neither always runs right after the other), and so that the figure holds on a shared
machine it is the median of the per-round ratios (each pair of steps saw nearly the same background load), beside
the ratio of the minimums (the least disturbed step of each) and of the medians; the thread count, the OpenMP wait
policy and the load average are printed with it. Usage:

    python benchmarks/harness_overhead.py [--config toy_nft] [--repeats 7] [--threads 2] [key=value ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diffrl_bench.threads import configure_openmp_env  # noqa: E402

configure_openmp_env()  # as the CLI does, before torch loads
import torch  # noqa: E402


def bare_step(trainer, batch_size: int, item_sizes, snapshots) -> None:
    """The same network calls as one harness RL step, with the same batch shapes, and nothing else."""
    cfg = trainer.cfg
    policy = trainer.policy
    shape = policy.latent_shape
    rollout_net = policy._network(trainer.algo.rollout.snapshot)
    cond = policy.encode_prompts([p.text for p in trainer.train_prompts[:1]] * max(batch_size, max(item_sizes)))
    with torch.no_grad():
        for start in range(0, batch_size, cfg.rollout.chunk_size):
            n = min(cfg.rollout.chunk_size, batch_size - start)
            x = torch.randn(n, *shape)
            for _ in range(cfg.rollout.sampler.num_steps):
                x = x + 0.1 * rollout_net(x, torch.full((n,), 0.5), cond[:n])
    for n in item_sizes:
        x, sigma = torch.randn(n, *shape), torch.rand(n)
        for name in snapshots:
            if name != "theta":
                with torch.no_grad():
                    policy._network(name)(x, sigma, cond[:n])
        policy.module(x, sigma, cond[:n]).square().mean().backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="toy_nft")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from diffrl_bench.config import load_config
    from diffrl_bench.train import Trainer

    torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp(prefix="overhead_")
    cfg = load_config(args.config, [f"output_dir={out}", "checkpoint.resume=false", f"train.threads={args.threads}",
                                    *args.overrides])
    trainer = Trainer(cfg, progress=False)
    batch = trainer.collect()
    items = trainer.algo.training_items(batch, torch.arange(batch.rewards.shape[0]), cfg.train.micro_batch_size,
                                        trainer.generators["train"])
    snapshots = items[0].snapshots
    item_sizes = [len(i.index) for i in items]
    B = batch.rewards.shape[0]
    harness, bare = [], []
    trainer.rl_step()  # warm-up of both paths
    bare_step(trainer, B, item_sizes, snapshots)
    load_before = os.getloadavg()[0]

    def timed(fn, into):
        start = time.perf_counter()
        fn()
        into.append(time.perf_counter() - start)

    for round_ in range(args.repeats):
        pair = [(trainer.rl_step, harness), (lambda: bare_step(trainer, B, item_sizes, snapshots), bare)]
        for fn, into in (pair if round_ % 2 == 0 else pair[::-1]):
            timed(fn, into)
    trainer.reward.close()
    h, b = statistics.median(harness), statistics.median(bare)
    ratios = [x / y for x, y in zip(harness, bare)]
    print(f"config {args.config}: {B} images/step, training items of sizes {item_sizes}, snapshots {snapshots}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"harness RL step  median {h:.3f} s  min {min(harness):.3f} s  (runs: {', '.join(f'{x:.3f}' for x in harness)})")
    print(f"bare model calls median {b:.3f} s  min {min(bare):.3f} s  (runs: {', '.join(f'{x:.3f}' for x in bare)})")
    print(f"overhead ratio harness / bare = {statistics.median(ratios):.3f} (median of {len(ratios)} paired rounds; "
          f"ratio of mins {min(harness) / min(bare):.3f}, of medians {h / b:.3f})")


if __name__ == "__main__":
    main()
