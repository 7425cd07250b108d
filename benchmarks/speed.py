"""CPU speed of the toy benchmark's RL step, each figure a ratio against the previous code path, in one run.

The previous code path is the preset as it ran before the thread policy (issue 18): `train.threads: 2`, OpenMP's
default wait policy (threads spin at barriers), glibc malloc. Every variant is a long-lived worker process of its
own (thread count, environment and LD_PRELOAD are fixed when a process starts) holding a built Trainer after one
warm-up step; the controller asks the workers for one step at a time, round after round, so that the variants
are measured interleaved under the same background load, and it reports per variant the median and min of its
step times and the median of the per-round ratios against the previous path (a ratio < 1 is faster).

Figures:
1. quiet: 1 thread vs 2 threads, OMP_WAIT_POLICY=PASSIVE (the default on a machine busy at start) vs spinning; two 1-thread runs at once vs one 2-thread run (throughput ratio: steps per
   second of the pair over the 2-thread run's; > 1 means a sweep should run them side by side);
2. with a busy neighbour (a second process spinning on one core, as another job on the machine would): 2 threads,
   1 thread and `train.threads: 0` (auto), each with OpenMP's default wait policy and with OMP_WAIT_POLICY=PASSIVE;
3. tcmalloc through LD_PRELOAD (when a libtcmalloc is installed: Debian's libtcmalloc-minimal4) against glibc;
5. evaluation sampling time, eval.batch_size 64 (the toy presets' value) against 256 (the previous default);
6. FLOPs per step (torch's FLOP counter over one real step: matmuls, convolutions, attention, forward and
   backward as run) and the machine's float32 matmul rate at the same thread count, hence the utilisation;
7. with `--compile`: `train.compile=on` against eager at 2 threads: per-step ratio, the compile warm-up of the
   first step and the first evaluation, hence the break-even run length (`train.compile_min_steps`).

The machine's load is printed (`os.getloadavg`) with the figures: a figure taken while other processes compete is
a ratio under that load, not the machine's speed. Usage:

    python benchmarks/speed.py [--long] [--repeats N] [--config toy_nft] [--skip busy,tcmalloc,...] [--compile] [key=value ...]

The default step is a quarter of the preset's (8 images: `rollout.prompts_per_step=1`) and 3 rounds, a few
minutes on a quiet 2-core machine; `--long` uses the preset's own step and 5 rounds.
"""
from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffrl_bench.threads import MAX_THREADS_ENV, SPIN_ENV, WAIT_POLICY_ENV, available_cores  # noqa: E402

MARK = "@@speed "
SHORT = ["rollout.prompts_per_step=1"]
EVAL_BATCHES = (256, 64)
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")
TCMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


# ------------------------------------------------------------------------------------------------ the worker
def worker(config: str, threads: int, overrides: Sequence[str], images_per_prompt: int) -> None:
    """Build the Trainer, take one warm-up step, then answer `step`, `flops`, `matmul` lines from stdin."""
    import torch

    from diffrl_bench.config import load_config
    from diffrl_bench.flops import count_flops, matmul_flops_per_s
    from diffrl_bench.train import Trainer

    out = tempfile.mkdtemp(prefix="speed_")
    cfg = load_config(config, [f"output_dir={out}", "checkpoint.resume=false", "checkpoint.every=0",
                               f"train.threads={threads}", *overrides])
    trainer = Trainer(cfg, progress=False)
    start = time.perf_counter()
    trainer.rl_step()  # warm-up; under train.compile it includes compiling the rollout and training shapes
    reply({"ready": True, "threads": torch.get_num_threads(), "warmup_s": time.perf_counter() - start})
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            start = time.perf_counter()
            trainer.rl_step()
            reply({"s": time.perf_counter() - start})
        elif command == "flops":
            reply({"flops": count_flops(trainer.rl_step)})
        elif command == "matmul":
            reply({"flop_per_s": matmul_flops_per_s("cpu")})
        elif command.startswith("eval "):
            reply({"s": time_eval(trainer, int(command.split()[1]), images_per_prompt)})
        elif command == "quit":
            break
    trainer.reward.close()


def time_eval(trainer, batch_size: int, images_per_prompt: int) -> float:
    """Seconds to sample the held-out evaluation images (the run's eval sampler and noise) in batches of
    `batch_size`; scoring is left out (it does not depend on the batch size)."""
    from diffrl_bench.evaluate import eval_noise, generate

    cfg = trainer.cfg.eval
    texts = [p.text for p in trainer.eval_prompts for _ in range(images_per_prompt)]
    noise = eval_noise(len(texts), trainer.policy.latent_shape, cfg.seed)
    start = time.perf_counter()
    generate(trainer.policy, texts, noise, cfg.sampler, batch_size=batch_size, seed=cfg.seed + 1)
    return time.perf_counter() - start


def reply(payload: Dict) -> None:
    print(MARK + json.dumps(payload), flush=True)


# ------------------------------------------------------------------------------------------------ the controller
class Worker:
    """One variant: a worker process with its thread count and environment."""

    def __init__(self, name: str, threads: int, env: Dict[str, str], args, log_dir: Path,
                 extra: Sequence[str] = ()):
        self.name, self.times = name, []
        command = [sys.executable, __file__, "--worker", "--threads", str(threads), "--config", args.config,
                   "--eval-images", str(args.eval_images), *args.overrides, *extra]
        self.log = open(log_dir / f"{name.replace(' ', '_')}.log", "w")
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env=env, text=True, cwd=REPO)
        self.threads: Optional[int] = None
        self.warmup_s: Optional[float] = None

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def receive(self) -> Dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"worker {self.name} ended; see {self.log.name}")

    def ask(self, command: str) -> Dict:
        self.send(command)
        return self.receive()

    def step(self) -> float:
        seconds = self.ask("step")["s"]
        self.times.append(seconds)
        return seconds

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()


def base_env(**changes: Optional[str]) -> Dict[str, str]:
    """This environment without any thread settings (the previous code path's), plus `changes`."""
    env = {k: v for k, v in os.environ.items()
           if k not in (WAIT_POLICY_ENV, SPIN_ENV, MAX_THREADS_ENV, "OMP_NUM_THREADS", "LD_PRELOAD")}
    env.update({k: v for k, v in changes.items() if v is not None})
    return env


def find_tcmalloc() -> Optional[str]:
    for directory in TCMALLOC_DIRS:
        for name in TCMALLOC_NAMES:
            if Path(directory, name).exists():
                return str(Path(directory, name))
    found = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    return found


def start(workers: List[Worker]) -> None:
    for w in workers:  # one at a time: builds and warm-ups would otherwise compete for the cores
        ready = w.receive()
        w.threads, w.warmup_s = ready["threads"], ready["warmup_s"]


def rounds(workers: Sequence[Worker], repeats: int, pair: Optional[Sequence[Worker]] = None) -> List[float]:
    """`repeats` rounds of one step per worker in turn (and, with `pair`, one step of both at once); returns
    the pair's wall times."""
    pair_walls = []
    for _ in range(repeats):
        for w in workers:
            w.step()
        if pair:
            began = time.perf_counter()
            for w in pair:
                w.send("step")
            for w in pair:
                w.receive()  # the pair's figure is its wall time; the workers' own lists keep solo steps
            pair_walls.append(time.perf_counter() - began)
    return pair_walls


def describe(w: Worker, reference: Optional[Worker] = None) -> str:
    text = f"  {w.name:<34} {w.threads} thr  median {statistics.median(w.times):7.3f} s  min {min(w.times):7.3f} s"
    if reference is not None and reference is not w:
        paired = [a / b for a, b in zip(w.times, reference.times)]
        text += f"  ratio {statistics.median(paired):.3f} (paired median; of mins {min(w.times) / min(reference.times):.3f})"
    elif reference is w:
        text += "  = previous code path (1.000)"
    return text


def busy_neighbour() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {available_cores()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="toy_nft")
    parser.add_argument("--long", action="store_true", help="the preset's own step size and 5 rounds")
    parser.add_argument("--repeats", type=int, default=0, help="rounds (default 3, --long 5)")
    parser.add_argument("--compile", action="store_true",
                        help="also 7. torch.compile (train.compile=on) against eager at 2 threads: minutes of compiling")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: quiet, busy, tcmalloc, eval, flops")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--eval-images", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides for every variant")
    args = parser.parse_args()
    if args.worker:
        return worker(args.config, args.threads, args.overrides, args.eval_images)
    args.overrides = ([] if args.long else SHORT) + list(args.overrides)
    args.eval_images = 16 if args.long else 4
    repeats = args.repeats or (5 if args.long else 3)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    log_dir = Path(tempfile.mkdtemp(prefix="speed_logs_"))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    print(f"{args.config} {' '.join(args.overrides)}: {repeats} interleaved rounds; {cpu}; {load_line()}")
    print(f"worker logs: {log_dir}")

    started: List[Worker] = []
    quiet_min: Dict[str, float] = {}

    def make(name: str, threads: int, extra: Sequence[str] = (), **env: Optional[str]) -> Worker:
        w = Worker(name, threads, base_env(**env), args, log_dir, extra)
        started.append(w)
        return w

    try:
        prev = make("2 threads (previous path)", 2)
        passive2 = make("2 threads PASSIVE (default when busy)", 2, OMP_WAIT_POLICY="PASSIVE")
        workers = [prev, passive2]
        one = make("1 thread", 1)
        workers.append(one)
        if "quiet" not in skip:
            other = make("1 thread (second run)", 1)
            workers.append(other)
        if "busy" not in skip:
            passive1 = make("1 thread PASSIVE", 1, OMP_WAIT_POLICY="PASSIVE")
            auto = make("train.threads 0 (auto) PASSIVE", 0, OMP_WAIT_POLICY="PASSIVE")
            workers += [passive1, auto]
        tcmalloc = find_tcmalloc() if "tcmalloc" not in skip else None
        if tcmalloc:
            tc = make("2 threads tcmalloc", 2, LD_PRELOAD=tcmalloc)
            workers.append(tc)
        start(workers)

        if "quiet" not in skip:
            print(f"\n1. quiet (no neighbour started by this benchmark; {load_line()})")
            for w in workers:
                w.times = []
            walls = rounds([prev, passive2, one], repeats, pair=[one, other])
            for w in (prev, passive2, one):
                print(describe(w, prev))
            quiet_min.update({w.name: min(w.times) for w in (prev, passive2, one)})
            paired = [2 * p / wall for p, wall in zip(prev.times, walls)]
            print(f"  two 1-thread runs at once: wall median {statistics.median(walls):.3f} s for 2 steps; throughput "
                  f"ratio vs one 2-thread run {statistics.median(paired):.3f} (paired median; > 1: side by side wins)")
            vs_new = [2 * p / wall for p, wall in zip(passive2.times, walls)]
            print(f"  the same against one 2-thread PASSIVE run: {statistics.median(vs_new):.3f}")

        if "busy" not in skip:
            neighbour = busy_neighbour()
            try:
                time.sleep(1.0)
                print(f"\n2. with a busy neighbour (one process spinning on a core; {load_line()})")
                for w in workers:
                    w.times = []
                busy = [prev, one, passive2, passive1] + ([auto] if auto.threads != passive2.threads else [])
                rounds(busy, repeats)
                for w in busy:
                    print(describe(w, prev))
                if auto not in busy:
                    print(f"  auto chose {auto.threads} threads here: the same as `2 threads PASSIVE`")
            finally:
                neighbour.kill()
                neighbour.wait()

        print("\n3. tcmalloc")
        if tcmalloc:
            for w in workers:
                w.times = []
            rounds([prev, tc], repeats)
            print(f"  LD_PRELOAD={tcmalloc}")
            print(describe(prev, prev))
            print(describe(tc, prev))
        elif "tcmalloc" in skip:
            print("  skipped")
        else:
            print("  no libtcmalloc on this machine (Debian: apt-get install libtcmalloc-minimal4; then "
                  "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4); the issue measured 0.85x per step")

        if "eval" not in skip:
            eval_workers = [w for w in (prev, passive2, one) if w is not None]
            print(f"\n5. evaluation sampling, {len(EVAL_BATCHES)} batch sizes, the held-out prompts x "
                  f"{args.eval_images} images ({load_line()})")
            for w in eval_workers:
                times: Dict[int, List[float]] = {b: [] for b in EVAL_BATCHES}
                for _ in range(repeats):
                    for b in EVAL_BATCHES:
                        times[b].append(w.ask(f"eval {b}")["s"])
                for b in EVAL_BATCHES:
                    paired = [x / y for x, y in zip(times[b], times[EVAL_BATCHES[0]])]
                    print(f"  {w.name:<34} eval.batch_size {b:<4} median {statistics.median(times[b]):7.3f} s  min "
                          f"{min(times[b]):7.3f} s  ratio {statistics.median(paired):.3f} vs {EVAL_BATCHES[0]}")

        if args.compile:
            compiled = make("2 threads train.compile=on", 2, ["train.compile=on"])
            start([compiled])
            print(f"\n7. torch.compile, 2 threads ({load_line()})")
            for w in workers:
                w.times = []
            rounds([prev, compiled], repeats)
            print(describe(prev, prev))
            print(describe(compiled, prev))
            first = {w.name: w.ask(f"eval {EVAL_BATCHES[0]}")["s"] for w in (prev, compiled)}
            again = {w.name: w.ask(f"eval {EVAL_BATCHES[0]}")["s"] for w in (prev, compiled)}
            extra = (compiled.warmup_s - prev.warmup_s) + (first[compiled.name] - first[prev.name])
            saved = statistics.median(prev.times) - statistics.median(compiled.times)
            print(f"  first step (warm-up): eager {prev.warmup_s:.1f} s, compiled {compiled.warmup_s:.1f} s; first "
                  f"evaluation: eager {first[prev.name]:.1f} s, compiled {first[compiled.name]:.1f} s; second: eager "
                  f"{again[prev.name]:.1f} s, compiled {again[compiled.name]:.1f} s")
            if saved > 0:
                print(f"  compilation costs {extra:.0f} s and saves {saved:.3f} s a step: break-even after "
                      f"{extra / saved:.0f} RL steps (train.compile_min_steps; evaluations after the first not counted)")
            else:
                print(f"  compilation costs {extra:.0f} s and saves nothing per step here: never worth it")

        if "flops" not in skip:
            print(f"\n6. FLOPs and utilisation ({load_line()})")
            flops = prev.ask("flops")["flops"]
            for w in (prev, passive2, one):
                rate = w.ask("matmul")["flop_per_s"]
                step = quiet_min.get(w.name) or w.step()
                achieved = flops / step
                print(f"  {w.name:<34} {flops / 1e9:.1f} GFLOP/step in {step:.3f} s (min) = {achieved / 1e9:.1f} "
                      f"GFLOP/s; float32 matmul {rate / 1e9:.1f} GFLOP/s at {w.threads} thr: utilisation "
                      f"{achieved / rate:.0%}")
    finally:
        for w in started:
            w.close()


if __name__ == "__main__":
    main()
