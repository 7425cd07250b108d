"""The Trainer charges model FLOPs to the cost ledger where it counts NFEs (train.py + flops.py + ledger.py)."""
import pandas as pd
import pytest

from diffrl_bench.config import load_config
from diffrl_bench.flops import count_flops
from diffrl_bench.models import THETA
from diffrl_bench.train import Trainer, train

pytestmark = pytest.mark.slow


def record_velocity_calls(trainer):
    """Wrap the policy's velocity so every call is counted on its real batch by torch's FLOP counter.

    This is the independent count: the ledger multiplies a per-sample count (made once, on a batch of one) by NFEs
    and passes; here each real call, CFG doubling included, is counted as it runs. Forwards only: the counter is
    closed before the backward runs."""
    calls = []
    original = trainer.policy.velocity

    def velocity(x, sigma, cond, *, snapshot=THETA, cfg_scale=1.0):
        out = {}
        flops = count_flops(lambda: out.setdefault("v", original(x, sigma, cond, snapshot=snapshot,
                                                                 cfg_scale=cfg_scale)))
        calls.append((snapshot, flops))
        return out["v"]

    trainer.policy.velocity = velocity
    return calls


def one_step_ledger_delta(trainer):
    """Step once to fill the meter's per-shape cache, then return (per-phase FLOPs of step 2, its velocity calls)."""
    trainer.rl_step()
    before = dict(trainer.ledger.flops)
    calls = record_velocity_calls(trainer)
    batch = trainer.collect()
    rollout_calls = list(calls)
    calls.clear()
    with trainer.ledger.phase("train"):
        trainer.optimize(batch)
    delta = {p: trainer.ledger.flops[p] - before[p] for p in before}
    return delta, rollout_calls, list(calls)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_a_steps_flops_per_phase_equal_the_counted_calls(tiny_run, tmp_path, cfg_scale):
    cfg = load_config("toy_nft", tiny_run("eval.every=-1", f"rollout.sampler.cfg_scale={cfg_scale}"))
    trainer = Trainer(cfg, progress=False)
    try:
        delta, rollout_calls, train_calls = one_step_ledger_delta(trainer)
    finally:
        trainer.reward.close()
        trainer.release_run_dir()
    assert delta["rollout"] == sum(f for _, f in rollout_calls) > 0  # the toy decode is arithmetic: 0 FLOPs
    # Backward = 2x the forward of every call that carries gradients (theta's), by the convention of flops.py.
    forward = sum(f for _, f in train_calls)
    theta = sum(f for s, f in train_calls if s == THETA)
    assert THETA in {s for s, _ in train_calls} and 0 < theta < forward  # snapshots run forwards only
    assert delta["train"] == forward + 2 * theta
    assert delta["reward"] == 0 and delta["eval"] == 0
    if cfg_scale != 1.0:  # the sampler's calls run a doubled batch: twice the unguided count per call
        shape = (1, *trainer.policy.latent_shape)
        per_sample = trainer.flop_meter.per_sample_forward(shape, trainer.policy.encode_prompts(["red circle"]))
        assert rollout_calls and all(f == 2 * 4 * per_sample for _, f in rollout_calls)  # chunk_size=4


def test_columns_sum_the_budget_phases_and_eval_is_charged_apart(tiny_run, tmp_path):
    out = tmp_path / "run"
    train(load_config("toy_nft", tiny_run("train.steps=2", "eval.every=-1", out=out)), progress=False)
    frame = pd.read_csv(out / "metrics.csv")
    budget = frame["cost/flops_rollout"] + frame["cost/flops_reward"] + frame["cost/flops_train"]
    assert (frame["cost/flops"] == budget).all() and frame["cost/flops"].iloc[-1] > 0
    assert frame["cost/flops_eval"].iloc[-1] == 0  # eval.every=-1: no evaluation ran


def test_budget_flops_stops_the_run_and_a_resume_continues_the_count(tiny_run, tmp_path):
    """The toy step is the same work every step (same shapes, no sample filtering), so spending is linear."""
    common = ("eval.every=-1", "checkpoint.every=1")
    first = tmp_path / "first"
    train(load_config("toy_nft", tiny_run("train.steps=1", *common, out=first)), progress=False)
    per_step = float(pd.read_csv(first / "metrics.csv")["cost/flops"].iloc[-1])
    # 2.5 steps' worth: after step 2 the run has 2 < 2.5 spent, after step 3 it has 3 >= 2.5 and stops.
    out = tmp_path / "budget"
    budget = (f"train.budget_flops={2.5 * per_step}", "train.steps=10")
    train(load_config("toy_nft", tiny_run(*budget, *common, "train.steps=2", out=out)), progress=False)
    train(load_config("toy_nft", tiny_run(*budget, *common, out=out)), progress=False)  # resumed at step 2
    frame = pd.read_csv(out / "metrics.csv")
    assert list(frame["step"]) == [1, 2, 3]
    assert frame["cost/flops"].tolist() == [per_step, 2 * per_step, 3 * per_step]
