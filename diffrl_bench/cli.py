"""`diffrl-bench`: train, list, parity, eval, export, sweep, report and pretrain-toy."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from diffrl_bench.console import setup_logging

log = logging.getLogger("diffrl_bench")


def cmd_train(args) -> int:
    from diffrl_bench.config import load_config
    from diffrl_bench.train import train

    import time

    from accelerate import PartialState

    from diffrl_bench.runlog import run_summary

    from diffrl_bench.distributed import end_processes
    from diffrl_bench.reward_harness import RewardError
    from diffrl_bench.run_guards import RunStopped, stop_on_sigterm

    cfg = load_config(args.config, args.overrides)
    started = time.time()
    stop_on_sigterm()
    try:
        out = train(cfg, progress=not args.no_progress)
    except (RewardError, RunStopped):
        end_processes()  # these stops are agreed by every process (`Processes.failures`): none is left waiting
        raise
    main_process = PartialState().is_main_process
    end_processes()
    if main_process:
        print(run_summary(Path(out), list(cfg.eval.rewards), time.time() - started))
    return 0


def cmd_list(args) -> int:
    from diffrl_bench.config import CONFIG_DIR
    from diffrl_bench.registry import ALGORITHMS, MODELS, REWARDS, SAMPLERS, broken_plugins

    for title, registry in (("algorithms", ALGORITHMS), ("rewards", REWARDS), ("samplers", SAMPLERS),
                            ("model backends", MODELS)):
        print(f"{title}:")
        for name in registry.names():
            doc = (getattr(registry.get(name), "__doc__", None) or "").strip().splitlines()
            print(f"  {name:<18} {doc[0] if doc else ''}")
    broken = broken_plugins()
    if broken:
        print("plugins that failed to load (their names are refused until fixed):")
        for plugin in broken:
            print(f"  {plugin.describe()}")
    print("configs:")
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        print(f"  {path.stem}")
    return 0


def cmd_parity(args) -> int:
    from diffrl_bench.parity import parity_main

    return parity_main(args.directory, kinds=args.kind or None)


def cmd_pretrain(args) -> int:
    from diffrl_bench.threads import apply_threads
    from diffrl_bench.toy.pretrain import PretrainConfig, pretrain

    apply_threads(args.threads)
    pretrain(PretrainConfig(samples=args.samples, batch_size=args.batch_size, lr=args.lr, seed=args.seed), args.out)
    return 0


def _run_checkpoint(run_dir: Path, which: Optional[str]) -> Path:
    """The checkpoint of a run directory to evaluate: the newest, or `which` (a step number or a path)."""
    from diffrl_bench.checkpoint import checkpoint_dir, latest_checkpoint

    if which is None:
        found = latest_checkpoint(run_dir / "checkpoints")
        if found is None:
            raise SystemExit(f"run directory {run_dir} has no checkpoint to evaluate (was checkpoint.every 0?); "
                             f"its trained weights were not saved")
        return found
    path = checkpoint_dir(run_dir / "checkpoints", int(which)) if which.isdigit() else Path(which)
    if not (path / "state.json").exists():
        raise SystemExit(f"--checkpoint {which!r}: {path} is not a finished checkpoint")
    return path


def _load_trained(policy, cfg, checkpoint: Path) -> None:
    """theta's weights from the checkpoint, and the evaluation EMA when the run kept one (what it evaluated)."""
    from diffrl_bench.checkpoint import load_model_weights, load_snapshot_weights
    from diffrl_bench.evaluate import EVAL_EMA, eval_snapshot

    load_model_weights(checkpoint, policy.core)
    if eval_snapshot(cfg.eval) == EVAL_EMA:
        snapshots = load_snapshot_weights(checkpoint)
        if not any(key.startswith(f"{EVAL_EMA}/") for key in snapshots):
            raise SystemExit(f"{checkpoint} holds no {EVAL_EMA} snapshot although the run's eval.ema_decay is "
                             f"{cfg.eval.ema_decay}; evaluate theta with eval.ema_decay=0")
        policy.add_snapshot(EVAL_EMA)
        policy.load_snapshot_state_dict(snapshots)


def cmd_eval(args) -> int:
    import json

    from diffrl_bench.config import load_config
    from diffrl_bench.evaluate import build_eval_rewards, eval_samplers, eval_snapshot, evaluate
    from diffrl_bench.models import THETA, build_policy
    from diffrl_bench.prompts import validate_prompt_sources
    from diffrl_bench.run_guards import check_model_path
    from diffrl_bench.threads import apply_threads

    run_dir = Path(args.config)
    is_run = run_dir.is_dir() and (run_dir / "config.yaml").exists()
    if args.checkpoint is not None and not is_run:
        raise SystemExit(f"--checkpoint needs a run directory (one holding config.yaml), not {args.config!r}")
    cfg = load_config(str(run_dir / "config.yaml") if is_run else args.config, args.overrides)
    prompts = validate_prompt_sources(cfg, train=False)["data.eval_prompts"]  # before any model is built
    check_model_path(cfg.model)
    apply_threads(cfg.train.threads)
    policy = build_policy(cfg.model)
    snapshot = THETA  # a model path is evaluated as it is
    if is_run:
        checkpoint = _run_checkpoint(run_dir, args.checkpoint)
        _load_trained(policy, cfg, checkpoint)
        snapshot = eval_snapshot(cfg.eval)
        log.info("evaluating %s of %s", snapshot, checkpoint)
    rewards = build_eval_rewards(cfg)
    metrics = {}
    for prefix, sampler in eval_samplers(cfg.eval):  # eval.sampler, then eval.extra_samplers, as a run evaluates
        metrics.update(evaluate(policy, prompts, cfg.eval, rewards, snapshot=snapshot, progress=True,
                                timeout_s=cfg.reward.timeout_s, sampler=sampler, prefix=prefix)[0])
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def cmd_export(args) -> int:
    import json

    from diffrl_bench.config import load_config
    from diffrl_bench.evaluate import eval_snapshot
    from diffrl_bench.models import THETA, build_policy

    run_dir, out = Path(args.run), Path(args.out)
    if not (run_dir / "config.yaml").exists():
        raise SystemExit(f"{run_dir} is not a run directory (it has no config.yaml)")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file, not a directory; choose a new directory (nothing was written)")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} exists and is not empty; choose a new directory (nothing was written)")
    checkpoint = _run_checkpoint(run_dir, args.checkpoint)
    cfg = load_config(str(run_dir / "config.yaml"))
    policy = build_policy(cfg.model)
    if not hasattr(policy, "export"):
        raise SystemExit(f"model backend {cfg.model.backend!r} has no export")
    _load_trained(policy, cfg, checkpoint)
    weights = eval_snapshot(cfg.eval)  # the weights the run evaluated
    if weights != THETA:
        policy.copy_snapshot_to_theta(weights)
    policy.export(out)
    step = json.loads((checkpoint / "state.json").read_text())["step"]
    provenance = {"run": str(run_dir.resolve()), "checkpoint": str(checkpoint.resolve()), "step": step,
                  "weights": weights, "backend": cfg.model.backend, "base": cfg.model.path}
    (out / "exported_from.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"exported step {step} of {run_dir} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffrl-bench", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run from a config (a YAML path or a shipped config name)")
    p.add_argument("config", help="YAML file, or the name of a shipped config (see `list`)")
    p.add_argument("overrides", nargs="*", help="omegaconf dot-list overrides, e.g. train.steps=50 optim.lr=3e-4")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("list", help="registered algorithms, rewards, samplers, model backends and shipped configs")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("parity", help="check the implementations against reference vectors of the original code")
    p.add_argument("directory", help="a directory of parity case files (*.json)")
    p.add_argument("--kind", action="append", help="only cases of this kind (repeatable)")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("eval", help="evaluate a model on the held-out prompts: a config's model.path, or a run "
                                    "directory's trained weights (its newest checkpoint)")
    p.add_argument("config", help="a run directory (holding config.yaml and checkpoints/), a YAML file, or the name "
                                  "of a shipped config")
    p.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. eval.images_per_prompt=64")
    p.add_argument("--checkpoint", default=None, help="with a run directory: a step number or a checkpoint path "
                                                      "instead of the newest")
    p.add_argument("--json", default="", help="also write the metrics to this file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a run's trained weights in the model's own format (toy: a model "
                                      "directory for model.path; SD3/FLUX: diffusers LoRA weights or transformer)")
    p.add_argument("run", help="run directory (holding config.yaml and checkpoints/)")
    p.add_argument("--out", required=True, help="a new (or empty) directory")
    p.add_argument("--checkpoint", default=None, help="a step number or a checkpoint path instead of the newest")
    p.set_defaults(func=cmd_export)

    from diffrl_bench import report, sweep

    p = sub.add_parser("sweep", help="run a sweep spec: arms x seeds x grid under one budget and fairness settings "
                                     "(idempotent: finished runs are skipped, interrupted ones resumed)")
    sweep.add_arguments(p)
    p.set_defaults(func=sweep.run)

    p = sub.add_parser("report", help="head-to-head report of a results folder: curves with bands, cost to a "
                                      "threshold, speedups with bootstrap intervals, summary.csv")
    report.add_arguments(p)
    p.set_defaults(func=report.run)

    p = sub.add_parser("pretrain-toy", help="pretrain the toy benchmark's base model with flow matching")
    p.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_pretrain)
    return parser


COMPUTE_COMMANDS = ("train", "eval", "sweep", "pretrain-toy")
"""the subcommands that run networks, hence whose OpenMP wait policy matters"""


def main(argv: Optional[List[str]] = None) -> int:
    from diffrl_bench.threads import configure_openmp_env

    parser = build_parser()
    # Overrides may come after options (`train cfg --no-progress a=1`), which plain argparse refuses.
    args, extra = parser.parse_known_args(argv)
    if args.command in COMPUTE_COMMANDS:
        # Before anything imports torch (parsing does not): OpenMP reads it once, when it loads. Only where
        # networks run, as it samples the machine's CPU use for 0.2 s.
        configure_openmp_env()
    if extra:
        if not hasattr(args, "overrides") or any("=" not in item or item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    setup_logging(args.verbose)
    from diffrl_bench.checkpoint import CheckpointError
    from diffrl_bench.config import ConfigError
    from diffrl_bench.registry import PluginError
    from diffrl_bench.reward_harness import RewardError
    from diffrl_bench.run_guards import RunStopped

    # Bad input (config, checkpoint, plugin): one line naming it, exit 2. A run stopped on a value it cannot
    # continue from (a reward's failure, a non-finite loss): one line, exit 1. Either way, what was written is kept.
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, PluginError) as error:
        log.error("%s", error)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted: the run stops; its checkpoints and logged rows are kept (the same command resumes "
                  "from the newest checkpoint)")
        return 130
    except (RewardError, RunStopped) as error:
        log.error("the run stopped: %s", error)
        return 1
    except OSError as error:
        import errno

        if error.filename is None and error.errno not in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            raise
        # A full disk or an unwritable file: name it; rows and checkpoints written before stay.
        where = f"{error.filename}: " if error.filename else ""
        log.error("%s%s (what was written before is kept)", where, error.strerror or error)
        return 1


def console_main() -> int:
    """The `diffrl-bench` command: `main` in a process that has tcmalloc preloaded when one is installed
    (`diffrl_bench/allocator.py`; it re-executes the command once to get it)."""
    from diffrl_bench.allocator import preload_tcmalloc
    from diffrl_bench.config import ConfigError

    try:
        preload_tcmalloc()
    except ConfigError as error:
        print(f"diffrl-bench: {error}", file=sys.stderr)
        return 2
    return exit_code(main())


def exit_code(code: int) -> int:
    """`code`, or, when a reward call given up on is still running on its thread, no return at all: the process
    exits with `code` at once, skipping interpreter finalisation, which would abort it (see `abandoned_calls`)."""
    from diffrl_bench.reward_harness import abandoned_calls

    running = abandoned_calls()
    if running:
        log.warning("reward threads %s still running: exiting without waiting for them", running)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(console_main())
