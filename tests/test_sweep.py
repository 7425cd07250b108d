"""The sweep runner: spec expansion and checks, fairness rule, dry run, idempotence, locks, executors, kill/resume."""
import dataclasses
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from filelock import FileLock

from diffrl_bench import sweep
from diffrl_bench.checkpoint import PREFIX, latest_checkpoint
from diffrl_bench.config import load_config
from diffrl_bench.sweep import SweepError, expand, load_spec, main, validate_runs


def make_spec(tmp_path, tiny_model_dir, reward="test_brightness", steps=2, name="spec.yaml", **changes):
    """A spec of two arms on the tiny model; `changes` replace top-level entries (None removes one)."""
    spec = {
        "name": "t",
        "results_dir": str(tmp_path / "results"),
        "seeds": [0],
        "budget": {"steps": steps},
        "fairness": {"model.path": tiny_model_dir, "reward.components": {reward: 1.0},
                     "rollout.prompts_per_step": 2, "rollout.images_per_prompt": 4,
                     "eval.every": -1, "eval.images_per_prompt": 2, "eval.sampler.num_steps": 3},
        "common": {"train.threads": 1, "rollout.chunk_size": 4, "rollout.sampler.num_steps": 3,
                   "train.micro_batch_size": 4, "algo.num_train_times": 2, "checkpoint.every": 1},
        "arms": {"a": {"config": "toy_nft"}, "b": {"config": "toy_nft", "overrides": {"optim.lr": 1.0e-3}}},
        "baseline": "a",
    }
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def snapshot(directory: Path) -> dict:
    """Every file under a folder with its modification time and content hash."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}


def rows(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------- the spec
def test_expansion_crosses_arms_seeds_and_grid_and_maps_the_budget(tmp_path, tiny_model_dir):
    path = make_spec(tmp_path, tiny_model_dir, seeds=[0, 1], grid={"train.optimizer_steps_per_rollout": [1, 2]})
    spec = load_spec(path)
    runs = expand(spec)
    # Seed-major: every arm on seed 0 first.
    assert [r.id for r in runs] == [f"{arm}-optimizer_steps_per_rollout{k}/seed{s}"
                                    for s in (0, 1) for arm in ("a", "b") for k in (1, 2)]
    run = runs[-1]
    assert run.out == tmp_path / "results" / "runs" / "b-optimizer_steps_per_rollout2" / "seed1"
    assert run.shown == ["optim.lr=0.001", "train.optimizer_steps_per_rollout=2"]
    assert run.grid == {"train.optimizer_steps_per_rollout": 2} and run.arm == "b"
    configs = validate_runs(spec, runs)
    cfg = configs[run.id]
    assert (cfg.name, cfg.output_dir, cfg.train.seed, cfg.checkpoint.resume) == (
        "b-optimizer_steps_per_rollout2_seed1", str(run.out), 1, True)
    assert cfg.optim.lr == 1e-3 and cfg.train.optimizer_steps_per_rollout == 2
    assert (cfg.train.steps, cfg.train.budget_gpu_hours, cfg.train.budget_nfe) == (2, 0.0, 0)
    assert cfg.model.path == tiny_model_dir and cfg.eval.sampler.num_steps == 3 and cfg.train.threads == 1
    assert configs[runs[0].id].optim.lr == 3e-5  # arm a keeps its preset's learning rate

    for budget, expected in (({"gpu_hours": 0.25}, (1_000_000, 0.25, 0)),
                             ({"nfe": 5000, "max_steps": 40}, (40, 0.0, 5000))):
        spec = load_spec(make_spec(tmp_path, tiny_model_dir, budget=budget))
        cfg = validate_runs(spec, expand(spec))["a/seed0"]
        assert (cfg.train.steps, cfg.train.budget_gpu_hours, cfg.train.budget_nfe) == expected


def test_a_flops_budget_maps_to_budget_flops_and_a_bad_one_names_the_key(tmp_path, tiny_model_dir):
    spec = load_spec(make_spec(tmp_path, tiny_model_dir, budget={"flops": 2.5e12, "max_steps": 30}))
    cfg = validate_runs(spec, expand(spec))["a/seed0"]
    assert (cfg.train.steps, cfg.train.budget_flops, cfg.train.budget_gpu_hours, cfg.train.budget_nfe) == (
        30, 2.5e12, 0.0, 0)
    # Written as a spec author would (OmegaConf's YAML reads 1e12 as a number, unlike plain YAML 1.1).
    path = make_spec(tmp_path, tiny_model_dir)
    path.write_text(path.read_text().replace("steps: 2", "flops: 1e12"))
    assert load_spec(path).budget == {"flops": 1e12}
    with pytest.raises(SweepError, match=r"budget\.flops: must be a positive number, got 'lots'"):
        load_spec(make_spec(tmp_path, tiny_model_dir, budget={"flops": "lots"}))
    for bad in ({"flops": -1.0}, {"flops": 1e12, "nfe": 10}):
        with pytest.raises(SweepError, match="budget"):
            load_spec(make_spec(tmp_path, tiny_model_dir, budget=bad))


def test_override_values_survive_the_dotlist_round_trip():
    from omegaconf import OmegaConf

    for value in ("builtin:toy_base", "1e-4", "true", "", "a: b", "x y", "/tmp/a=b", 1e-4, 3, True, None,
                  [0.9, 0.99], {"toy_geneval": 1.0, "x": {"y": "1e-3"}}):
        text = sweep.format_value(value)
        assert OmegaConf.to_container(OmegaConf.from_dotlist([f"k={text}"]))["k"] == value, (value, text)


def test_fairness_keys_are_rejected_unless_ablated(tmp_path, tiny_model_dir):
    arms = {"a": {"config": "toy_nft"}, "b": {"config": "toy_nft", "overrides": {"rollout.images_per_prompt": 8}}}
    with pytest.raises(SweepError) as error:
        load_spec(make_spec(tmp_path, tiny_model_dir, arms=arms))
    message = str(error.value)
    assert "spec.yaml" in message and "arm 'b'" in message and "rollout.images_per_prompt" in message
    assert "fairness" in message and "ablate" in message
    # The same key reached through a nested mapping, a whole-section key, or the grid is caught too.
    for bad in ({"a": {"config": "toy_nft", "overrides": {"rollout": {"images_per_prompt": 8}}}},
                {"a": {"config": "toy_nft", "overrides": {"eval.sampler.num_steps": 5}}}):
        with pytest.raises(SweepError, match="breaks fairness"):
            load_spec(make_spec(tmp_path, tiny_model_dir, arms=bad))
    with pytest.raises(SweepError, match="the grid sets 'reward.components"):
        load_spec(make_spec(tmp_path, tiny_model_dir, grid={"reward.components": [{"test_brightness": 2.0}]}))
    # Keys the sweep sets per run, and the budget outside `budget:`, are refused wherever they appear.
    with pytest.raises(SweepError, match="train.seed"):
        load_spec(make_spec(tmp_path, tiny_model_dir,
                            arms={"a": {"config": "toy_nft", "overrides": {"train.seed": 3}}}))
    with pytest.raises(SweepError, match="budget"):
        load_spec(make_spec(tmp_path, tiny_model_dir, fairness={"train.steps": 5}))

    # Listed under `ablate`, the key becomes the studied axis: the arms differ in it and nowhere else.
    spec = load_spec(make_spec(tmp_path, tiny_model_dir, arms=arms, ablate=["rollout.images_per_prompt"]))
    configs = validate_runs(spec, expand(spec))
    assert configs["a/seed0"].rollout.images_per_prompt == 4 and configs["b/seed0"].rollout.images_per_prompt == 8


def test_a_preset_that_differs_in_a_fairness_key_is_caught_after_resolution(tmp_path, tiny_model_dir):
    # A config file that changes a fairness key the spec does not state: the arms would be evaluated differently.
    (tmp_path / "other.yaml").write_text("algorithm: nft\neval:\n  seed: 99\n")
    arms = {"a": {"config": "toy_nft"}, "b": {"config": "other.yaml"}}
    spec = load_spec(make_spec(tmp_path, tiny_model_dir, arms=arms))
    assert spec.arms[1].config == str((tmp_path / "other.yaml").resolve())  # found next to the spec
    with pytest.raises(SweepError, match=r"arms 'a' and 'b' differ in fairness key 'eval.seed' \(1234 vs 99\)"):
        validate_runs(spec, expand(spec))


def test_per_arm_keys_keep_each_arms_own_value_and_cannot_also_be_fixed(tmp_path, tiny_model_dir):
    # Two arms evaluated at their own CFG: the difference is declared, so the agreement check lets it through...
    arms = {"a": {"config": "toy_nft"}, "b": {"config": "toy_nft", "overrides": {"eval.sampler.cfg_scale": 4.5}}}
    spec = load_spec(make_spec(tmp_path, tiny_model_dir, arms=arms, per_arm=["eval.sampler.cfg_scale"]))
    configs = validate_runs(spec, expand(spec))
    assert sorted(c.eval.sampler.cfg_scale for c in configs.values()) == [1.0, 4.5]
    # ...while any other eval key still has to agree,
    arms["b"]["overrides"]["eval.seed"] = 99
    with pytest.raises(SweepError, match=r"arm 'b' sets 'eval.seed', which breaks fairness"):
        load_spec(make_spec(tmp_path, tiny_model_dir, arms=arms, per_arm=["eval.sampler.cfg_scale"]))
    # and a key cannot be both each arm's own and fixed for all.
    fairness = {"model.path": tiny_model_dir, "eval.sampler.cfg_scale": 1.0}
    with pytest.raises(SweepError, match=r"per_arm.*'eval.sampler' is also fixed under fairness"):
        load_spec(make_spec(tmp_path, tiny_model_dir, fairness=fairness, per_arm=["eval.sampler"]))


SD35_METHODS = {"nft", "flow_grpo", "awm", "crd", "elbo_pg", "rft", "grpo_guard", "dgpo", "flow_dppo"}


@pytest.mark.parametrize("task", ["geneval", "ocr", "pickscore"])
def test_sd35_head2head_sweeps_have_every_method_each_at_its_authors_eval_cfg(task):
    spec = load_spec(Path(__file__).resolve().parents[1] / "sweeps" / f"sd35m_{task}_head2head.yaml")
    runs = [r for r in expand(spec) if r.seed == spec.seeds[0]]
    assert SD35_METHODS <= {r.arm for r in runs}
    configs = validate_runs(spec, runs)
    cfg = {r.arm: configs[r.id].eval.sampler.cfg_scale for r in runs}
    # Flow-GRPO evaluates with its training CFG (train_sd3.py:254); every other original, and Flow-GRPO's no-CFG
    # recipe, evaluate without CFG (docs/presets.md).
    # GRPO-Guard (Flow-GRPO's code base) and DGPO also evaluate at their training CFG 4.5.
    for arm in ("flow_grpo", "grpo_guard", "dgpo"):
        assert cfg.pop(arm) == 4.5, arm
    assert set(cfg.values()) == {1.0}
    sampler = {(c.eval.sampler.name, c.eval.sampler.num_steps) for c in configs.values()}
    assert sampler == {("euler", 40)}
    # each arm keeps its original's EMA clock and precision split (per_arm:), not the first arm's
    arm = {r.arm: configs[r.id] for r in runs}
    assert (arm["flow_grpo"].eval.ema_phase, arm["flow_grpo"].eval.ema_updates_per_event) == (1, 2)
    assert (arm["crd"].eval.ema_unit, arm["crd"].eval.ema_every) == ("rl_step", 10)
    for name in ("flow_grpo", "nft", "awm"):
        assert arm[name].model.options.text_encoder_dtype == "float16" and arm[name].train.allow_tf32, name
    assert "text_encoder_dtype" not in arm["elbo_pg"].model.options and arm["elbo_pg"].train.allow_tf32


def test_unknown_keys_and_bad_values_are_named(tmp_path, tiny_model_dir):
    cases = [({"seedz": [1]}, "seedz"), ({"arms": {"a": {"config": "toy_nft", "overides": {}}}}, "overides"),
             ({"budget": {"steps": 2, "nfe": 10}}, "exactly one"), ({"executor": {"kind": "k8s"}}, "executor.kind"),
             ({"executor": {"kind": "local", "paralel": 2}}, "paralel"), ({"baseline": "zzz"}, "baseline"),
             ({"arms": {"a": {"config": "no_such_preset"}}}, "no_such_preset"),
             ({"grid": {"optim.lr": 0.1}}, "grid.optim.lr")]
    for change, needle in cases:
        with pytest.raises(SweepError) as error:
            load_spec(make_spec(tmp_path, tiny_model_dir, **change))
        assert needle in str(error.value) and "spec.yaml" in str(error.value), (change, str(error.value))

    # A config typo fails before any run starts, naming the arm and the key.
    path = make_spec(tmp_path, tiny_model_dir, arms={"a": {"config": "toy_nft"},
                                                     "b": {"config": "toy_nft", "overrides": {"optim.lrr": 1.0}}})
    spec = load_spec(path)
    with pytest.raises(SweepError, match=r"arm 'b'.*optim.lrr"):
        validate_runs(spec, expand(spec))
    assert main([str(path)]) == 2
    assert not (tmp_path / "results").exists()


# --------------------------------------------------------------------------------------- status, dry run
def test_dry_run_lists_every_run_with_its_status_and_runs_nothing(tmp_path, tiny_model_dir, capsys):
    path = make_spec(tmp_path, tiny_model_dir, seeds=[0, 1], grid={"optim.eps": [1e-8, 1e-6]})
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines() if line.startswith(("a-", "b-"))]
    assert sorted((r[0], r[1], r[2]) for r in table) == sorted(
        (f"{arm}-eps{eps}", str(seed), "new") for arm in "ab" for seed in (0, 1) for eps in ("1e-08", "1e-06"))
    assert "optim.lr=0.001 optim.eps=1e-06" in out and "runs/b-eps1e-06/seed1" in out
    assert "new 8 (8 runs)" in out
    assert not (tmp_path / "results").exists()

    # Statuses come from the run folders.
    runs = {r.id: r for r in expand(load_spec(path))}
    for run_id, marker in (("a-eps1e-08/seed0", "DONE"), ("a-eps1e-06/seed0", "metrics.jsonl"),
                           ("b-eps1e-08/seed0", "FAILED")):
        runs[run_id].out.mkdir(parents=True)
        (runs[run_id].out / marker).write_text("Traceback ...\nRuntimeError: boom\n")
    assert main([str(path), "--status"]) == 0
    out = capsys.readouterr().out
    assert "done 1, running 0, partial 1, failed 1, new 5 (8 runs)" in out
    assert "failed b-eps1e-08/seed0: RuntimeError: boom" in out


# ----------------------------------------------------------------------------------------------- running
def test_rerunning_a_sweep_skips_finished_runs(tmp_path, tiny_model_dir, capsys):
    path = make_spec(tmp_path, tiny_model_dir)
    assert main([str(path), "--no-progress"]) == 0
    results = tmp_path / "results"
    for arm in ("a", "b"):
        run_dir = results / "runs" / arm / "seed0"
        assert (run_dir / "DONE").exists() and not (run_dir / "FAILED").exists()
        assert [r["step"] for r in rows(run_dir)] == [1, 2]
        record = json.loads((run_dir / "arm.json").read_text())
        assert (record["arm"], record["seed"], record["sweep"], record["config"]) == (arm, 0, "t", "toy_nft")
        # arm.json's config and overrides reproduce the run with `diffrl-bench train`.
        assert load_config(record["config"], record["overrides"]).output_dir == str(run_dir)
    table = json.loads((results / "sweep.json").read_text())["sweeps"]["t"]
    assert [r["arm"] for r in table["runs"]] == ["a", "b"] and table["spec"]["baseline"] == "a"
    before = snapshot(results / "runs")
    capsys.readouterr()

    assert main([str(path), "--no-progress"]) == 0
    assert "done 2 (2 runs)" in capsys.readouterr().out
    assert snapshot(results / "runs") == before  # nothing re-run, not one file touched


def test_only_runs_the_named_arm_but_sweep_json_still_records_every_arm(tmp_path, tiny_model_dir):
    # The report reads the arms from sweep.json: finishing one arm with --only must not drop the others from it.
    path = make_spec(tmp_path, tiny_model_dir)
    results = tmp_path / "results"
    assert main([str(path), "--only", "b", "--no-progress"]) == 0
    assert (results / "runs" / "b" / "seed0" / "DONE").exists()
    assert not (results / "runs" / "a").exists()
    table = json.loads((results / "sweep.json").read_text())["sweeps"]["t"]
    assert sorted(r["arm"] for r in table["runs"]) == ["a", "b"]


def test_a_held_lock_makes_the_sweep_skip_that_run(tmp_path, tiny_model_dir, capsys):
    path = make_spec(tmp_path, tiny_model_dir)
    held_dir = tmp_path / "results" / "runs" / "a" / "seed0"
    held_dir.mkdir(parents=True)
    lock = FileLock(str(held_dir / ".lock"))
    lock.acquire()
    try:
        assert main([str(path), "--status"]) == 0
        assert "running 1" in capsys.readouterr().out
        assert main([str(path), "--no-progress"]) == 0
        assert "running 1" in capsys.readouterr().out
        assert [p.name for p in held_dir.iterdir() if p.name != ".lock"] == []  # untouched
        assert (tmp_path / "results" / "runs" / "b" / "seed0" / "DONE").exists()
        # A worker that reaches a run another process holds gives up instead of running it twice.
        run = next(r for r in expand(load_spec(path)) if r.arm == "a")
        assert sweep.run_job(sweep.RunJob(run, lock_wait_s=0))["status"] == "running"
    finally:
        lock.release()


def test_a_failed_run_is_recorded_and_retried(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import diffrl_bench.train

    path = make_spec(tmp_path, tiny_model_dir, arms={"a": {"config": "toy_nft"}})
    run_dir = tmp_path / "results" / "runs" / "a" / "seed0"

    def broken(cfg, progress=True):
        raise RuntimeError("reward server unreachable")

    monkeypatch.setattr(diffrl_bench.train, "train", broken)
    assert main([str(path), "--no-progress"]) == 1
    assert "reward server unreachable" in (run_dir / "FAILED").read_text()
    assert "Traceback" in (run_dir / "FAILED").read_text() and not (run_dir / "DONE").exists()
    monkeypatch.undo()
    capsys.readouterr()
    assert main([str(path), "--status"]) == 0 and "failed 1" in capsys.readouterr().out
    assert main([str(path), "--no-progress"]) == 0
    assert (run_dir / "DONE").exists() and not (run_dir / "FAILED").exists()
    assert (run_dir / "FAILED.previous").exists()


@pytest.mark.parametrize("left, stale", [
    ("metrics.jsonl", '{"step": 1, "reward/mean": 0.5}\n'),  # a run killed before its first checkpoint
    ("metrics.csv", "step,reward/mean\n1,0.9\n7,0.95\n"),  # a finished run copied back without rows or checkpoints
], ids=["rows", "table_only"])
def test_a_run_that_starts_over_keeps_the_earlier_attempt_aside_with_a_clean_table(tmp_path, tiny_model_dir, left,
                                                                                   stale):
    path = make_spec(tmp_path, tiny_model_dir, arms={"a": {"config": "toy_nft"}})
    run_dir = tmp_path / "results" / "runs" / "a" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / left).write_text(stale)
    assert main([str(path), "--no-progress"]) == 0
    assert [r["step"] for r in rows(run_dir)] == [1, 2]
    assert list(pd.read_csv(run_dir / "metrics.csv")["step"]) == [1, 2]
    assert (run_dir / f"{left}.attempt1").read_text() == stale  # kept, out of the way


def test_submitit_local_executor_runs_a_run_to_done(tmp_path, tiny_model_dir):
    # The job runs in a fresh process, which knows only the package's rewards.
    path = make_spec(tmp_path, tiny_model_dir, reward="toy_geneval", arms={"a": {"config": "toy_nft"}},
                     executor={"kind": "local", "parallel": 1})
    assert main([str(path), "--no-progress"]) == 0
    run_dir = tmp_path / "results" / "runs" / "a" / "seed0"
    assert (run_dir / "DONE").exists() and [r["step"] for r in rows(run_dir)] == [1, 2]
    logs = list((tmp_path / "results" / "submitit").glob("*_log.out"))
    assert logs and os.getpid() != int(logs[0].name.split("_")[0])  # it ran in another process


def numeric_rows(run_dir: Path) -> list:
    """A run's logged values without the clock-dependent ones (seconds, device-hours, throughput)."""
    return [{k: v for k, v in r.items() if not (k.endswith("_s") or k.startswith("time/") or "gpu_hours" in k
                                                  or "per_s" in k)} for r in rows(run_dir)]


def test_local_runs_side_by_side_share_the_cores_and_match_sequential_runs(tmp_path, tiny_model_dir, caplog):
    """Two runs at once get an equal whole share of the cores each (here a spec asking 2 threads gets at most
    cores // 2), and each is the run the sequential executor makes with that thread count, to the last digit."""
    from diffrl_bench.sweep.executors import thread_share
    from diffrl_bench.threads import available_cores

    share = thread_share(2)
    assert share == max(1, available_cores() // 2)
    for where in ("side", "alone"):
        (tmp_path / where).mkdir()
    common = {"train.threads": 2, "rollout.chunk_size": 4, "rollout.sampler.num_steps": 3,
              "train.micro_batch_size": 4, "algo.num_train_times": 2, "checkpoint.every": 1}
    side = make_spec(tmp_path / "side", tiny_model_dir, reward="toy_geneval", common=common,
                     executor={"kind": "local", "parallel": 2})
    with caplog.at_level("INFO", logger="diffrl_bench.sweep"):
        assert main([str(side), "--no-progress"]) == 0
    expected_parallel = min(2, available_cores())
    assert f"{expected_parallel} run(s) at a time, at most {share} CPU thread(s) per process" in caplog.text
    alone = make_spec(tmp_path / "alone", tiny_model_dir, reward="toy_geneval",
                      common={**common, "train.threads": share})
    assert main([str(alone), "--no-progress"]) == 0
    for arm in ("a", "b"):
        got, ref = (tmp_path / where / "results" / "runs" / arm / "seed0" for where in ("side", "alone"))
        assert (got / "DONE").exists()
        assert json.loads((got / "run_info.json").read_text())["device_kind"] == f"cpu ({share} threads)"
        assert numeric_rows(got) == numeric_rows(ref) and len(rows(got)) == 2
    logs = list((tmp_path / "side" / "results" / "submitit").glob("*_log.out"))
    assert len({p.name.split("_")[0] for p in logs}) == 2  # two job processes


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])   # Ctrl-C, and `kill PID` on a background sweep
def test_ctrl_c_stops_every_local_job_and_the_sweep_resumes_them(tmp_path, tiny_model_dir, stop):
    steps = 10
    path = make_spec(tmp_path, tiny_model_dir, reward="toy_geneval", steps=steps,
                     executor={"kind": "local", "parallel": 2})
    outs = [tmp_path / "results" / "runs" / arm / "seed0" for arm in ("a", "b")]

    def checkpointed(out):
        newest = latest_checkpoint(out / "checkpoints") if out.exists() else None
        return newest is not None and int(newest.name[len(PREFIX):]) >= 2

    with open(tmp_path / "sweep.log", "w") as log_file:
        # `kill PID` stops a sweep started in the background by a script, which inherits SIGINT ignored
        # (`nohup ... &`): its jobs must still be stoppable.
        ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if stop == "SIGTERM" else None
        proc = subprocess.Popen([sys.executable, "-m", "diffrl_bench.sweep", str(path), "--no-progress"],
                                stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path, preexec_fn=ignore_sigint)
        deadline = time.time() + 180
        try:
            while not all(checkpointed(out) for out in outs):
                assert proc.poll() is None, (tmp_path / "sweep.log").read_text()
                assert time.time() < deadline, "sweep too slow"
                time.sleep(0.05)
            jobs = {int(p.name.split("_")[0]) for p in (tmp_path / "results" / "submitit").glob("*_log.out")}
            proc.send_signal(getattr(signal, stop))  # to the sweep process alone
            assert proc.wait(timeout=60) == 130, (tmp_path / "sweep.log").read_text()
        finally:
            proc.kill()
            proc.wait()
    # The runs are stopped, not their submitit controllers, which would print a KeyboardInterrupt traceback here.
    assert "Traceback" not in (tmp_path / "sweep.log").read_text(), (tmp_path / "sweep.log").read_text()
    assert len(jobs) == 2 and not [pid for pid in jobs if Path(f"/proc/{pid}").exists()], "a job outlived the sweep"
    assert not any((out / "DONE").exists() for out in outs), "a run finished first; the test proves nothing"

    assert main([str(path), "--no-progress"]) == 0
    for out in outs:
        assert [r["step"] for r in rows(out)] == list(range(1, steps + 1))  # every step once, resumed
        assert json.loads((out / "DONE").read_text())["last_step"] == steps


def test_parallel_cpu_runs_never_outnumber_the_cores(monkeypatch, tmp_path, tiny_model_dir):
    from diffrl_bench.sweep import executors

    monkeypatch.setattr(executors, "available_cores", lambda: 4)
    spec = load_spec(make_spec(tmp_path, tiny_model_dir, executor={"kind": "local", "parallel": 6}))
    assert executors.cpu_parallelism(spec, 6, has_devices=False) == 4
    assert executors.cpu_parallelism(spec, 6, has_devices=True) == 6  # GPU runs: their CPU share is small
    assert [executors.thread_share(p) for p in (1, 2, 3, 4)] == [4, 2, 1, 1]
    assert executors.thread_share(2, processes=2) == 1  # accelerate's processes each count


def test_slurm_executor_passes_its_parameters_to_submitit(tmp_path, tiny_model_dir, monkeypatch):
    import submitit

    seen = []
    original = submitit.AutoExecutor.update_parameters
    monkeypatch.setattr(submitit.AutoExecutor, "update_parameters",
                        lambda self, **kw: (seen.append((self.cluster, kw)), original(self, **kw))[1])
    # `cluster: debug` runs the Slurm path (job array, waiting on the jobs) in this process.
    executor = {"kind": "slurm", "cluster": "debug", "parallel": 3,
                "parameters": {"slurm_partition": "gpu", "timeout_min": 60, "gpus_per_node": 1}}
    path = make_spec(tmp_path, tiny_model_dir, arms={"a": {"config": "toy_nft"}}, executor=executor)
    assert main([str(path), "--no-progress"]) == 0
    assert seen == [("debug", {"slurm_partition": "gpu", "timeout_min": 60, "gpus_per_node": 1,
                               "slurm_array_parallelism": 3})]
    assert (tmp_path / "results" / "runs" / "a" / "seed0" / "DONE").exists()
    executor["parameters"] = {"slurm_partitionn": "gpu"}
    path = make_spec(tmp_path, tiny_model_dir, arms={"a": {"config": "toy_nft"}}, executor=executor,
                     results_dir=str(tmp_path / "other"))
    assert main([str(path), "--no-progress"]) == 2
    assert not (tmp_path / "other" / "runs").exists()


def test_accelerate_command_line_is_what_the_train_command_parses():
    from diffrl_bench.cli import build_parser

    overrides = ["model.path=/data/my model", "optim.lr=0.0001", 'reward.components={"toy_geneval": 1.0}']
    command = sweep.accelerate_command("toy_nft", overrides, num_processes=4,
                                       launcher_args=["--mixed_precision", "bf16"], main_process_port=29511,
                                       python="/venv/bin/python")
    assert command == ["/venv/bin/python", "-m", "accelerate.commands.launch", "--num_processes", "4", "--multi_gpu",
                       "--main_process_port", "29511", "--mixed_precision", "bf16",
                       "-m", "diffrl_bench.cli", "train", "--no-progress", "toy_nft", *overrides]
    args = build_parser().parse_args(command[command.index("diffrl_bench.cli") + 1:])
    assert (args.command, args.config, args.overrides, args.no_progress) == ("train", "toy_nft", overrides, True)
    single = sweep.accelerate_command("x.yaml", [], num_processes=1)
    assert "--multi_gpu" not in single and "--main_process_port" not in single
    assert sweep.device_groups(["0", "1", "2", "3", "4"], 2) == ["0,1", "2,3"]


# ---------------------------------------------------------------------------------------------- kill test
def test_killed_sweep_resumes_without_losing_or_repeating_anything(tmp_path, tiny_model_dir):
    steps = 10
    path = make_spec(tmp_path, tiny_model_dir, reward="toy_geneval", steps=steps)
    first, second = (tmp_path / "results" / "runs" / arm / "seed0" for arm in ("a", "b"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "sweep.log", "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "diffrl_bench.sweep", str(path), "--no-progress"],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        deadline = time.time() + 90
        try:
            while True:
                checkpoint = latest_checkpoint(second / "checkpoints") if second.exists() else None
                if (first / "DONE").exists() and checkpoint is not None and int(checkpoint.name[5:]) >= 2:
                    break
                assert proc.poll() is None, (tmp_path / "sweep.log").read_text()
                assert time.time() < deadline, "sweep too slow"
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert not (second / "DONE").exists(), "the second run finished before the kill; the test proves nothing"
    finished = snapshot(first)
    resume_step = int(latest_checkpoint(second / "checkpoints").name[5:])
    kept = [r for r in rows(second) if r["step"] <= resume_step]
    assert [r["step"] for r in kept] == list(range(1, resume_step + 1))

    assert main([str(path), "--no-progress"]) == 0
    assert snapshot(first) == finished  # the finished run was not touched
    resumed = rows(second)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))  # every step once, in order
    assert resumed[:resume_step] == kept  # rows up to the checkpoint were kept, not redone
    assert json.loads((second / "DONE").read_text())["last_step"] == steps

    # The resumed curve is the uninterrupted run's curve.
    straight = tmp_path / "straight"
    record = json.loads((second / "arm.json").read_text())
    from diffrl_bench.train import train

    train(load_config(record["config"], [*record["overrides"], f"output_dir={straight}"]), progress=False)
    a, b = pd.DataFrame(rows(straight)), pd.DataFrame(resumed)
    for column in ("reward/mean", "loss/loss", "train/grad_norm", "cost/nfe", "cost/images"):
        assert a[column].tolist() == b[column].tolist(), column
    assert b["cost/device_s"].is_monotonic_increasing


def _child_pids(pid: int) -> list:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the job's process through /proc")
def test_a_preempted_submitit_job_requeues_itself_and_resumes_from_its_checkpoint(tmp_path, tiny_model_dir):
    """Slurm's way of ending a job early, replayed on submitit's local executor: SIGTERM (submitit ignores it), then
    USR2, on which the job checkpoints its callable, requeues and exits; the restarted job resumes the run."""
    import submitit

    from diffrl_bench.sweep import RequeueableRun, RunJob

    steps, every = 8, 3
    path = make_spec(tmp_path, tiny_model_dir, reward="toy_geneval", steps=steps, arms={"a": {"config": "toy_nft"}},
                     common={"train.threads": 1, "rollout.chunk_size": 4, "rollout.sampler.num_steps": 3,
                             "train.micro_batch_size": 4, "algo.num_train_times": 2, "checkpoint.every": every})
    (run,) = expand(load_spec(path))
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="local")
    executor.update_parameters(timeout_min=30)
    job = executor.submit(RequeueableRun(), RunJob(run=run))
    out = run.out
    deadline = time.time() + 120
    try:
        # Signal between two checkpoints, so that the resumed attempt has steps to redo.
        while not ((out / "metrics.jsonl").exists() and any(r["step"] > every for r in rows(out))):
            assert not job.done(), job.stderr()
            assert time.time() < deadline, "job too slow"
            time.sleep(0.02)
        (task,) = _child_pids(int(job.job_id))
        os.kill(int(job.job_id), signal.SIGTERM)  # the controller forwards it to the task, which ignores it
        time.sleep(0.5)
        assert not job.done() and _child_pids(int(job.job_id)) == [task]
        os.kill(task, signal.SIGUSR2)
        result = job.result()
    finally:
        if not job.done():
            job.cancel(check=False)
    assert result["status"] == "done", result
    log_text = job.stdout() + (job.stderr() or "")
    assert "Bypassing signal SIGTERM" in log_text and "Requeued job" in log_text
    assert f"interrupted; requeued to resume from {PREFIX}" in log_text
    assert "resumed from" in log_text
    assert [r["step"] for r in rows(out)] == list(range(1, steps + 1))  # every step exactly once
    assert not list(out.glob("metrics.jsonl.attempt*"))
    assert json.loads((out / "DONE").read_text())["last_step"] == steps


def test_runs_are_grouped_for_trackers_by_sweep_arm_and_seed(tmp_path, tiny_model_dir):
    from diffrl_bench.sweep.state import identity_conflict

    path = make_spec(tmp_path, tiny_model_dir, seeds=[0, 1])
    runs = expand(load_spec(path))
    for run in runs:
        cfg = load_config(run.config, run.overrides)
        assert cfg.log.group == "t" and dict(cfg.log.tags) == {"arm": run.arm, "seed": str(run.seed)}
    # A run folder written before these keys existed still holds the same run.
    run = runs[0]
    run.out.mkdir(parents=True)
    old = run.record()
    old["overrides"] = [o for o in old["overrides"] if not o.startswith(("log.group=", "log.tags="))]
    (run.out / "arm.json").write_text(json.dumps(old))
    assert identity_conflict(run) is None
    with pytest.raises(SweepError, match="log.group"):
        load_spec(make_spec(tmp_path, tiny_model_dir, common={"log.group": "mine"}, name="bad.yaml"))


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_sweep_spec_loads_and_every_run_config_validates(path, tmp_path):
    """A spec is checked before any run starts (every run's config loaded, fairness compared); a shipped spec that
    fails it would fail its user only after the command is typed. One seed: the seeds differ in train.seed only."""
    spec = load_spec(path)
    spec = dataclasses.replace(spec, seeds=spec.seeds[:1], results_dir=tmp_path / spec.name)
    configs = validate_runs(spec, expand(spec))
    assert len(configs) == len(spec.arms) * len(list(itertools.product(*spec.grid.values())))


def test_a_restarted_run_sets_its_old_table_aside_with_its_rows(tmp_path):
    """`report` reads metrics.csv, so a run that starts over must not leave the old attempt's table in place: a
    finished run's table copied back without rows or checkpoints would otherwise pass for the new run's."""
    from diffrl_bench.runlog import MetricsLog

    only_table = tmp_path / "copied_back"
    only_table.mkdir()
    (only_table / "metrics.csv").write_text("step,reward/mean\n1,0.9\n")
    moved = MetricsLog(only_table).set_aside()
    assert moved == only_table / "metrics.csv.attempt1"
    assert not (only_table / "metrics.csv").exists() and moved.read_text() == "step,reward/mean\n1,0.9\n"

    both = tmp_path / "killed_twice"
    both.mkdir()
    (both / "metrics.jsonl.attempt1").write_text('{"step": 1}\n')  # an earlier restart's rows
    (both / "metrics.jsonl").write_text('{"step": 2}\n')
    (both / "metrics.csv").write_text("step\n2\n")
    assert MetricsLog(both).set_aside() == both / "metrics.jsonl.attempt2"
    # The rows and the table of one attempt keep one number, and nothing earlier is overwritten.
    assert (both / "metrics.csv.attempt2").read_text() == "step\n2\n"
    assert (both / "metrics.jsonl.attempt1").read_text() == '{"step": 1}\n'
    assert not (both / "metrics.jsonl").exists() and not (both / "metrics.csv").exists()
    assert MetricsLog(tmp_path / "empty_dir_that_does_not_exist").set_aside() is None
