"""A GPU check a person can run in minutes: every algorithm on a random-weight SD3.5-Medium, 2 RL steps each.

Per algorithm, in a fresh Trainer: the algorithm's SD3.5-M recipe (`configs/<algo>_sd35m_pickscore.yaml`: its
sampler, CFG, snapshots, loss options, LoRA r 32) on `random:sd35m` at 512 px (`configs/sd35m_random.yaml`: random
weights, random prompt embeddings, a cheap reward; nothing is downloaded), with a small group (default 2 prompts
x 4 images) and no evaluation or checkpoints. It records every network call the harness makes (the policy's
`velocity` and `decode`), times the rollout (`Trainer.collect`) and training (`Trainer.optimize`) of each step, and
reports from the last step (the first one warms kernels and caches up):

* peak memory: CUDA `max_memory_allocated` over the build and the steps (on CPU the process's peak RSS, which only
  grows, so later algorithms include earlier ones);
* rollout images/s (sampling, decode and reward) and training samples/s (one sample = one (image, time) pair
  through theta's forward and backward, with the forwards of the snapshots its loss needs);
* harness overhead: the step's time over the time of the same recorded calls replayed directly (same shapes,
  snapshots, guidance, grad and autocast modes, decode, one backward per theta call and the optimizer steps), with
  nothing of the harness around them (samplers' bookkeeping, rewards, advantages, losses, ledger);
* model FLOPs of those calls (`diffrl_bench/flops.py`: forward counted once per shape, CFG 2x, backward 2x forward)
  over the step's time, as a fraction of the device's dense bf16 peak (table by device name) and of the bf16 matmul
  rate measured on the device.

A failing algorithm (e.g. out of memory) is recorded with its error and the next one runs. Usage:

    python benchmarks/gpu_check.py --out results/gpu_check.json --time-limit 420 # one H100/H200
    python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check_tiny.json         # the same path on CPU, tiny SD3
    python benchmarks/gpu_check.py --algorithms nft,flow_grpo --steps 2 [key=value ...]
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from diffrl_bench.flops import BACKWARD_FACTOR, FlopMeter, matmul_flops_per_s, peak_flops  # noqa: E402
from diffrl_bench.models import THETA, calls_per_velocity, index_condition  # noqa: E402

RECIPE = "{algorithm}_sd35m_pickscore"
BASE = "sd35m_random"
# What an algorithm's SD3.5-M recipe contributes; model size, reward, data, eval and checkpoints come from BASE.
RECIPE_KEYS = ("algorithm", "algo", "advantage", "optim")
RECIPE_ROLLOUT_KEYS = ("sampler", "same_noise_per_group")
RECIPE_TRAIN_KEYS = ("optimizer_steps_per_rollout", "shuffle", "mixed_precision")


# ------------------------------------------------------------------------------------------------ device
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_info(device: torch.device, measure_matmul: bool = True) -> Dict[str, Any]:
    info: Dict[str, Any] = {"type": device.type, "cpu": cpu_model(), "torch": torch.__version__}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        info["peak_bf16_dense_flops"] = peak_flops(info["name"])
    else:
        info["name"] = f"{info['cpu']} ({torch.get_num_threads()} threads)"
        info["peak_bf16_dense_flops"] = None
    if measure_matmul:
        info["matmul_flops_per_s"] = matmul_flops_per_s(device, repeats=50 if device.type == "cuda" else 5)
        info["matmul_dtype"] = "bfloat16" if device.type == "cuda" else "float32"
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ------------------------------------------------------------------------------------------------ config
def algorithm_config(algorithm: str, args, out_dir: Path):
    """The run config of one algorithm: BASE with the algorithm's recipe settings, sized for a quick check."""
    from diffrl_bench.config import CONFIG_DIR, load_config, resolve_config_path

    base = OmegaConf.to_container(OmegaConf.load(resolve_config_path(BASE)))
    recipe_path = CONFIG_DIR / f"{RECIPE.format(algorithm=algorithm)}.yaml"
    merged = dict(base, algorithm=algorithm, algo={}, name=f"gpu_check_{algorithm}")
    if recipe_path.exists():
        recipe = OmegaConf.to_container(OmegaConf.load(recipe_path))
        merged.update({k: recipe[k] for k in RECIPE_KEYS if k in recipe})
        merged["rollout"] = dict(base["rollout"], **{k: v for k, v in recipe["rollout"].items()
                                                    if k in RECIPE_ROLLOUT_KEYS})
        merged["train"] = dict(base["train"], **{k: v for k, v in recipe["train"].items() if k in RECIPE_TRAIN_KEYS})
        merged["model"] = dict(base["model"], options=recipe.get("model", {}).get("options", {}))
    P, K = args.prompts, args.group
    batch = P * K
    merged["rollout"].update(prompts_per_step=P, images_per_prompt=K, chunk_size=args.chunk or batch)
    steps_per_rollout = merged["train"].get("optimizer_steps_per_rollout", 1)
    merged["train"].update(steps=args.steps, micro_batch_size=args.micro_batch,
                           optimizer_steps_per_rollout=steps_per_rollout if batch % steps_per_rollout == 0 else 1)
    merged.update(output_dir=str(out_dir / algorithm))
    merged.setdefault("eval", {})["every"] = -1
    merged.setdefault("checkpoint", {}).update(every=0, resume=False)
    if args.tiny:
        options = {k: v for k, v in merged["model"].get("options", {}).items() if k != "resolution"}
        merged["model"] = dict(merged["model"], path="random:tiny", options=options)
        merged["train"].update(device="cpu", mixed_precision="no", threads=args.threads)
    path = out_dir / f"{algorithm}.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(merged)))
    return load_config(str(path), args.overrides)


# ------------------------------------------------------------------------------------------ call recording
@dataclass
class Call:
    phase: str
    kind: str  # velocity | decode
    shape: tuple
    snapshot: str = THETA
    cfg_scale: float = 1.0
    grad: bool = False
    autocast: bool = False
    autocast_dtype: str = ""
    signature: int = 0  # index into Recorder.conditions


class Recorder:
    """Wraps a policy's `velocity` and `decode` (instance attributes shadow the methods) to log every call."""

    def __init__(self, policy, device: torch.device):
        self.policy, self.device_type = policy, device.type
        self.calls: List[Call] = []
        self.conditions: List[Any] = []  # one sample of each distinct condition layout, for the FLOP counts
        self._keys: List[Any] = []
        self.phase = "rollout"
        self.enabled = True
        velocity, decode = policy.velocity, policy.decode

        def recorded_velocity(x, sigma, cond, *, snapshot=THETA, cfg_scale=1.0):
            if self.enabled:
                autocast = torch.is_autocast_enabled(self.device_type)
                self.calls.append(Call(self.phase, "velocity", tuple(x.shape), snapshot, float(cfg_scale),
                                       torch.is_grad_enabled() and snapshot == THETA, autocast,
                                       str(torch.get_autocast_dtype(self.device_type)) if autocast else "",
                                       self._signature(cond)))
            return velocity(x, sigma, cond, snapshot=snapshot, cfg_scale=cfg_scale)

        def recorded_decode(latents):
            if self.enabled:
                self.calls.append(Call(self.phase, "decode", tuple(latents.shape), snapshot=""))
            return decode(latents)

        policy.velocity, policy.decode = recorded_velocity, recorded_decode

    def _signature(self, cond) -> int:
        from diffrl_bench.flops import condition_signature

        key = condition_signature(cond)
        if key not in self._keys:
            self._keys.append(key)
            self.conditions.append(index_condition(cond, slice(0, 1)))
        return self._keys.index(key)

    def take(self) -> List[Call]:
        calls, self.calls = self.calls, []
        return calls


def call_flops(meter: FlopMeter, recorder: Recorder, call: Call) -> int:
    if call.kind == "decode":
        return meter.decode_flops(call.shape)
    cond = recorder.conditions[call.signature]
    forward = meter.forward_flops(call.shape, cond, call.cfg_scale)
    return forward * (1 + BACKWARD_FACTOR) if call.grad else forward


def call_table(meter: FlopMeter, recorder: Recorder, calls: List[Call]) -> List[Dict[str, Any]]:
    """Distinct calls with their count and FLOPs per call: what the phase totals are the sum of."""
    rows: Dict[tuple, Dict[str, Any]] = {}
    for call in calls:
        key = (call.phase, call.kind, call.shape, call.snapshot, call.cfg_scale, call.grad)
        if key not in rows:
            rows[key] = dict(phase=call.phase, kind=call.kind, shape=list(call.shape), snapshot=call.snapshot,
                             cfg_scale=call.cfg_scale, backward=call.grad, calls=0,
                             flops_per_call=call_flops(meter, recorder, call))
        rows[key]["calls"] += 1
    return list(rows.values())


def replay_condition(policy, calls: List[Call]):
    """A condition with as many rows as the largest recorded call, made before the replay is timed."""
    return policy.encode_prompts(["gpu check"] * max(c.shape[0] for c in calls))


def step_after(calls: List[Call], optimizer_steps: int) -> List[int]:
    """Indices of the calls after which the replay steps the optimizer: the theta calls with a backward split into
    `optimizer_steps` consecutive shares, as the Trainer steps between its shares of one RL step's samples."""
    backward = [k for k, call in enumerate(calls) if call.kind == "velocity" and call.grad]
    steps = min(optimizer_steps, len(backward))
    return [backward[-(-len(backward) * (j + 1) // steps) - 1] for j in range(steps)]


def replay(policy, calls: List[Call], cond, accelerator, optimizer, optimizer_steps: int, device: torch.device) -> None:
    """The recorded calls made directly, with random inputs of the same shapes, and the optimizer steps.

    Backward and steps go as the Trainer's do: through the accelerator, and each step after its share of the
    backward passes. Under fp16 mixed precision (Flow-GRPO's recipe) the optimizer steps through a gradient scaler,
    which refuses a step with no scaled gradient behind it (seen on an H200 when all steps came after all passes)."""
    stops = set(step_after(calls, optimizer_steps))
    for k, call in enumerate(calls):
        x = torch.randn(call.shape, device=device)
        if call.kind == "decode":
            with torch.no_grad():
                policy.decode(x)
            continue
        n = call.shape[0]
        dtype = getattr(torch, call.autocast_dtype.replace("torch.", "")) if call.autocast else None
        autocast = torch.autocast(device.type, dtype=dtype, enabled=call.autocast)
        with autocast, torch.set_grad_enabled(call.grad):
            v = policy.velocity(x, torch.rand(n, device=device), index_condition(cond, slice(0, n)),
                                snapshot=call.snapshot, cfg_scale=call.cfg_scale)
        if call.grad:
            accelerator.backward(v.float().square().mean())
        if k in stops:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------- one algorithm
def fresh_accelerate_state() -> None:
    """Forget accelerate's process-wide state before the next algorithm's Trainer.

    Each recipe builds its Accelerator with its own mixed precision (fp16, bf16 or none); accelerate keeps one
    state per process and refuses a second precision, so without this every algorithm after the first whose
    precision differs fails to build (seen on an H200)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _rate(amount: float, seconds: float) -> Optional[float]:
    return amount / seconds if seconds > 0 else None


def check_algorithm(algorithm: str, args, out_dir: Path, device: torch.device, info: Dict[str, Any]) -> Dict[str, Any]:
    from diffrl_bench.train import Trainer

    cfg = algorithm_config(algorithm, args, out_dir)
    r = cfg.rollout
    row: Dict[str, Any] = {
        "algorithm": algorithm, "status": "ok",
        "config": {"prompts_per_step": r.prompts_per_step, "images_per_prompt": r.images_per_prompt,
                   "images_per_step": r.prompts_per_step * r.images_per_prompt, "chunk_size": r.chunk_size,
                   "sampler": r.sampler.name, "num_steps": r.sampler.num_steps, "cfg_scale": r.sampler.cfg_scale,
                   "micro_batch_size": cfg.train.micro_batch_size,
                   "optimizer_steps_per_rollout": cfg.train.optimizer_steps_per_rollout,
                   "model": cfg.model.path, "model_options": OmegaConf.to_container(cfg.model.options),
                   "mixed_precision": cfg.train.mixed_precision},
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fresh_accelerate_state()
    trainer = Trainer(cfg, progress=False)
    try:
        sync(device)
        row["build_s"] = time.perf_counter() - start
        row["memory_after_build_gb"] = peak_memory_gb(device)
        policy = trainer.policy
        recorder = Recorder(policy, device)
        steps, calls = [], []
        for _ in range(cfg.train.steps):
            nfe_before = dict(trainer.ledger.nfe)
            recorder.phase = "rollout"
            sync(device)
            t0 = time.perf_counter()
            batch = trainer.collect()
            sync(device)
            t1 = time.perf_counter()
            recorder.phase = "train"
            trainer.optimize(batch)
            sync(device)
            t2 = time.perf_counter()
            calls = recorder.take()
            steps.append({"rollout_s": t1 - t0, "train_s": t2 - t1,
                          "nfe_ledger": {p: trainer.ledger.nfe[p] - nfe_before[p] for p in ("rollout", "train")}})
            del batch
        row["peak_memory_gb"] = peak_memory_gb(device)
        row["steps"] = steps
        last = steps[-1]
        recorder.enabled = False
        meter = FlopMeter(policy)
        table = call_table(meter, recorder, calls)
        flops = {"rollout": 0, "decode": 0, "train": 0}
        nfe = {"rollout": 0, "train": 0}
        samples = 0
        for entry in table:
            bucket = "decode" if entry["kind"] == "decode" else entry["phase"]
            flops[bucket] += entry["flops_per_call"] * entry["calls"]
            if entry["kind"] == "velocity":
                nfe[entry["phase"]] += entry["shape"][0] * calls_per_velocity(entry["cfg_scale"]) * entry["calls"]
                if entry["backward"]:
                    samples += entry["shape"][0] * entry["calls"]
        flops["total"] = flops["rollout"] + flops["decode"] + flops["train"]
        row["calls"] = table
        row["nfe"] = nfe
        row["flops"] = flops
        row["flop_measurements"] = meter.measurements
        row["train_samples"] = samples
        images = row["config"]["images_per_step"]
        row["rollout_images_per_s"] = _rate(images, last["rollout_s"])
        row["train_samples_per_s"] = _rate(samples, last["train_s"])
        step_s = last["rollout_s"] + last["train_s"]
        achieved = {"rollout": _rate(flops["rollout"] + flops["decode"], last["rollout_s"]),
                    "train": _rate(flops["train"], last["train_s"]), "step": _rate(flops["total"], step_s)}
        row["achieved_flops_per_s"] = achieved
        peak, matmul = info.get("peak_bf16_dense_flops"), info.get("matmul_flops_per_s")
        row["mfu"] = {"vs_peak": {k: v / peak for k, v in achieved.items()} if peak else None,
                      "vs_matmul": {k: v / matmul for k, v in achieved.items()} if matmul else None}

        # Harness overhead: the same calls made directly, timed like the step.
        cond = replay_condition(policy, calls)
        sync(device)
        t0 = time.perf_counter()
        replay(policy, calls, cond, trainer.accelerator, trainer.optimizer, cfg.train.optimizer_steps_per_rollout,
               device)
        sync(device)
        bare = time.perf_counter() - t0
        row["overhead"] = {"harness_s": step_s, "bare_s": bare, "ratio": step_s / bare if bare > 0 else None}
    finally:
        trainer.reward.close()
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny random SD3 on CPU (CI; under a minute)")
    parser.add_argument("--algorithms", default="", help="comma-separated; default: every registered algorithm")
    parser.add_argument("--steps", type=int, default=2, help="RL steps per algorithm (the last one is reported)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--group", type=int, default=4, help="images per prompt")
    parser.add_argument("--chunk", type=int, default=0, help="rollout chunk size (0: the whole step)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads with --tiny (1: small ops under contention run far slower on 2)")
    parser.add_argument("--time-limit", type=float, default=0.0,
                        help="seconds; algorithms not started by then are recorded as skipped (0: no limit)")
    parser.add_argument("--no-matmul", action="store_true", help="skip the matmul rate measurement")
    parser.add_argument("--out", default="", help="write the JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, applied to every algorithm")
    return parser.parse_args(argv)


def summary_line(row: Dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['algorithm']:>10}  {row['status'].upper()}: {row['error']}"
    vs_peak = row["mfu"]["vs_peak"]
    vs_matmul = row["mfu"]["vs_matmul"]
    mfu = (f"MFU {vs_peak['step']:.1%} of peak" if vs_peak else "MFU vs peak n/a") + \
          (f", {vs_matmul['step']:.1%} of matmul" if vs_matmul else "")
    return (f"{row['algorithm']:>10}  peak {row['peak_memory_gb']:.2f} GB  rollout {row['rollout_images_per_s']:.2f} "
            f"img/s  train {row['train_samples_per_s']:.2f} samples/s  overhead x{row['overhead']['ratio']:.3f}  "
            f"{row['flops']['total'] / 1e12:.4g} TFLOP/step  {mfu}")


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    from diffrl_bench.registry import ALGORITHMS

    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    algorithms = [a for a in args.algorithms.split(",") if a] or ALGORITHMS.names()
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise SystemExit(f"--algorithms: unknown {unknown}; registered: {ALGORITHMS.names()}")
    if args.tiny:
        torch.set_num_threads(args.threads)
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny for the CPU check")
        device = torch.device("cuda")
    info = device_info(device, measure_matmul=not args.no_matmul)
    report: Dict[str, Any] = {"device": info, "mode": "tiny" if args.tiny else "sd35m",
                              "steps": args.steps, "argv": sys.argv[1:] if argv is None else list(argv),
                              "algorithms": {}}
    print(f"device: {info['name']}" + (f", matmul {info['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s"
                                       if "matmul_flops_per_s" in info else ""), flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for algorithm in algorithms:
            elapsed = time.perf_counter() - started
            if args.time_limit and elapsed >= args.time_limit:
                row = {"algorithm": algorithm, "status": "skipped",
                       "error": f"--time-limit {args.time_limit:g} s reached after {elapsed:.0f} s"}
                report["algorithms"][algorithm] = row
                print(summary_line(row), flush=True)
                continue
            try:
                row = check_algorithm(algorithm, args, Path(tmp), device, info)
            except Exception as error:  # one algorithm's failure (OOM, a bug) must not stop the others
                row = {"algorithm": algorithm, "status": "failed", "error": f"{type(error).__name__}: {error}",
                       "traceback": traceback.format_exc(limit=-6)}
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            report["algorithms"][algorithm] = row
            print(summary_line(row), flush=True)
    fresh_accelerate_state()  # leave the process as found (a caller may build its own Accelerator next)
    report["wall_s"] = time.perf_counter() - started
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
