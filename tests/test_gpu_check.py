"""benchmarks/gpu_check.py --tiny: the GPU check's whole path on CPU with the tiny random SD3, two algorithms.

The JSON is checked for structure and for invariants that hold whatever the machine's speed: every algorithm
present (a failing one recorded, the others run), the network evaluations against the ledger's count and the
sampler's known count, the FLOP totals against an independent count of the same calls with flops.py on a separately
built model, and positive rates and overhead."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from diffrl_bench.flops import FlopMeter
from diffrl_bench.models import calls_per_velocity
from diffrl_bench.registry import MODELS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    gpu_check = load_script()
    real_config = gpu_check.algorithm_config

    def config_or_fail(algorithm, args, out_dir):
        if algorithm == "rft":
            raise RuntimeError("simulated failure of one algorithm")
        cfg = real_config(algorithm, args, out_dir)
        if algorithm == "flow_grpo":
            # Another precision than nft's in the same process, as the recipes have on a GPU (fp16, bf16, none):
            # accelerate's process-wide state refuses it unless the check resets it between algorithms.
            cfg.train.mixed_precision = "bf16"
        return cfg

    gpu_check.algorithm_config = config_or_fail
    out = tmp_path_factory.mktemp("gpu_check") / "check.json"
    threads = torch.get_num_threads()
    try:
        returned = gpu_check.main(["--tiny", "--algorithms", "nft,flow_grpo,rft", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
        gpu_check.fresh_accelerate_state()  # the last algorithm's bf16 must not reach later tests' Accelerators
    written = json.loads(out.read_text())
    assert set(written["algorithms"]) == set(returned["algorithms"])
    return written


@pytest.mark.slow
def test_every_algorithm_is_present_and_a_failure_is_recorded(report):
    assert list(report["algorithms"]) == ["nft", "flow_grpo", "rft"]
    assert report["algorithms"]["nft"]["status"] == "ok" and report["algorithms"]["flow_grpo"]["status"] == "ok"
    failed = report["algorithms"]["rft"]
    assert failed["status"] == "failed" and "simulated failure" in failed["error"]
    assert report["mode"] == "tiny" and report["steps"] == 2


@pytest.mark.slow
def test_device_is_named(report):
    device = report["device"]
    assert device["type"] == "cpu" and device["cpu"] and device["cpu"] in device["name"]
    assert device["peak_bf16_dense_flops"] is None and device["matmul_flops_per_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["nft", "flow_grpo"])
def test_rates_memory_and_overhead_are_positive(report, algorithm):
    row = report["algorithms"][algorithm]
    assert len(row["steps"]) == 2
    assert row["rollout_images_per_s"] > 0 and row["train_samples_per_s"] > 0
    assert row["peak_memory_gb"] > 0
    overhead = row["overhead"]
    assert overhead["bare_s"] > 0 and overhead["ratio"] > 0
    assert overhead["harness_s"] == pytest.approx(row["steps"][-1]["rollout_s"] + row["steps"][-1]["train_s"])
    assert row["mfu"]["vs_peak"] is None and row["mfu"]["vs_matmul"]["step"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["nft", "flow_grpo"])
def test_network_evaluations_match_the_ledger_and_the_sampler(report, algorithm):
    row = report["algorithms"][algorithm]
    c = row["config"]
    assert row["nfe"] == row["steps"][-1]["nfe_ledger"]
    # both recipes' samplers (DPM-Solver++(2M), the Flow-GRPO SDE) evaluate once per step, twice under CFG
    assert row["nfe"]["rollout"] == c["images_per_step"] * c["num_steps"] * calls_per_velocity(c["cfg_scale"])
    # both recipes train 9 (image, time) pairs per image: nft's 9 grid times, flow_grpo's int(10 x 0.99) steps
    assert row["train_samples"] == 9 * c["images_per_step"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["nft", "flow_grpo"])
def test_flop_totals_are_flops_py_counts_times_calls(report, algorithm):
    row = report["algorithms"][algorithm]
    policy = MODELS.get("sd3")(path="random:tiny", device="cpu", options=row["config"]["model_options"])
    meter = FlopMeter(policy)
    cond = policy.encode_prompts(["a prompt"])
    expected = {"rollout": 0, "decode": 0, "train": 0}
    for call in row["calls"]:
        if call["kind"] == "decode":
            expected["decode"] += meter.decode_flops(call["shape"]) * call["calls"]
            continue
        forward = meter.forward_flops(call["shape"], cond, call["cfg_scale"])
        expected[call["phase"]] += forward * (3 if call["backward"] else 1) * call["calls"]
    assert all(v > 0 for v in expected.values())
    assert {k: row["flops"][k] for k in expected} == expected
    assert row["flops"]["total"] == sum(expected.values())
    # the rollout's calls: one per sampler step on the whole step's batch (one chunk), CFG doubled inside the count
    rollout = [c for c in row["calls"] if c["phase"] == "rollout" and c["kind"] == "velocity"]
    assert sum(c["calls"] for c in rollout) == row["config"]["num_steps"]


def test_algorithms_past_the_time_limit_are_recorded_as_skipped(tmp_path):
    report = load_script().main(["--tiny", "--no-matmul", "--algorithms", "nft,awm", "--time-limit", "1e-9"])
    assert [row["status"] for row in report["algorithms"].values()] == ["skipped", "skipped"]
    assert list(report["algorithms"]) == ["nft", "awm"]


def test_the_replay_steps_the_optimizer_after_each_share_of_backward_passes():
    """As the Trainer does, and as a gradient scaler (fp16) requires: every step has scaled gradients behind it."""
    gpu_check = load_script()
    Call = gpu_check.Call

    def call(grad, kind="velocity"):
        return Call(phase="train", kind=kind, shape=(2, 3), grad=grad)

    calls = [call(False, "decode"), call(True), call(False), call(True), call(True), call(False), call(True), call(True)]
    # 5 backward passes (calls 1, 3, 4, 6, 7) in 2 shares of ceil(5/2) = 3 and 2; one step: after the last.
    assert gpu_check.step_after(calls, 2) == [4, 7]
    assert gpu_check.step_after(calls, 1) == [7]
    assert gpu_check.step_after(calls, 9) == [1, 3, 4, 6, 7]  # never a step without a pass behind it
    assert gpu_check.step_after([call(False)], 2) == []

    weight = torch.nn.Parameter(torch.ones(3))
    seen = []

    class Policy:
        def velocity(self, x, sigma, cond, *, snapshot, cfg_scale):
            return x * weight

        def decode(self, x):
            return x

    class Optimizer:
        def step(self):
            seen.append(weight.grad is not None and bool(weight.grad.abs().sum() > 0))

        def zero_grad(self, set_to_none=True):
            weight.grad = None

    class Accelerator:
        def backward(self, loss):
            loss.backward()

    gpu_check.replay(Policy(), calls, torch.zeros(2, 1), Accelerator(), Optimizer(), 2, torch.device("cpu"))
    assert seen == [True, True]
