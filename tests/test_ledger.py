import pytest

from diffrl_bench.ledger import BUDGET_PHASES, CostLedger


def test_device_seconds_are_world_size_times_wall_and_eval_stays_out_of_budget():
    ledger = CostLedger(world_size=8, device_kind="H100")
    ledger.add_time("rollout", 30.0)
    ledger.add_time("reward", 6.0)
    ledger.add_time("train", 54.0)
    ledger.add_time("eval", 1000.0)
    row = ledger.columns()
    assert row["cost/rollout_device_s"] == 240.0
    assert row["cost/device_s"] == 8 * 90.0
    # 8 GPUs x 90 s = 720 GPU-seconds = 0.2 GPU-hours; the 1000 s of eval must not count.
    assert row["cost/gpu_hours"] == pytest.approx(0.2)
    assert row["cost/eval_device_s"] == 8000.0


def test_nfe_and_images_accumulate_per_phase():
    ledger = CostLedger()
    ledger.add_nfe("rollout", 16 * 10)
    ledger.add_nfe("rollout", 16 * 10)
    ledger.add_nfe("train", 32 * 9 * 3)
    ledger.add_nfe("eval", 5000)
    ledger.add_images(32)
    row = ledger.columns()
    assert row["cost/nfe_rollout"] == 320
    assert row["cost/nfe"] == 320 + 864
    assert row["cost/nfe_eval"] == 5000
    assert row["cost/images"] == 32


def test_phase_context_times_the_block_and_rejects_unknown_phase():
    import time

    ledger = CostLedger()
    with ledger.phase("train"):
        time.sleep(0.02)
    assert ledger.wall_s["train"] >= 0.02
    with pytest.raises(KeyError, match="warmup"):
        with ledger.phase("warmup"):
            pass


def test_state_round_trip_and_world_size_change_keeps_device_seconds():
    ledger = CostLedger(world_size=4)
    ledger.add_time("train", 100.0)
    ledger.add_nfe("train", 7)
    restored = CostLedger(world_size=4)
    restored.load_state_dict(ledger.state_dict())
    assert restored.columns() == ledger.columns()
    # Resumed on 2 devices: the 400 device-seconds already spent stay 400.
    moved = CostLedger(world_size=2)
    moved.load_state_dict(ledger.state_dict())
    assert moved.budget_device_seconds == pytest.approx(400.0)
    assert set(BUDGET_PHASES) == {"rollout", "reward", "train"}


def test_reward_server_devices_are_charged_for_the_budget_phases_only():
    ledger = CostLedger(world_size=8, reward_server_devices=1)
    ledger.add_time("rollout", 100.0)
    ledger.add_time("reward", 10.0)
    ledger.add_time("train", 50.0)
    ledger.add_time("eval", 40.0)
    # 8 training GPUs + 1 reward-server GPU for 160 s of budget phases; eval only the 8 training GPUs.
    assert ledger.budget_device_seconds == 9 * 160.0
    assert ledger.gpu_hours == 9 * 160.0 / 3600
    assert ledger.device_seconds("eval") == 8 * 40.0
    assert ledger.columns()["cost/reward_server_devices"] == 1


def test_flops_accumulate_per_phase_round_trip_and_eval_stays_out_of_budget():
    ledger = CostLedger(world_size=2)
    ledger.add_flops("rollout", 10**15)
    ledger.add_flops("train", 3 * 10**15)
    ledger.add_flops("eval", 7 * 10**15)
    row = ledger.columns()
    assert row["cost/flops"] == 4e15 and row["cost/flops_eval"] == 7e15 and row["cost/flops_reward"] == 0
    restored = CostLedger(world_size=1)  # FLOPs are work done, not device time: a world-size change keeps them
    restored.load_state_dict(ledger.state_dict())
    assert restored.flops == ledger.flops and restored.budget_flops == 4 * 10**15
    # A checkpoint written before the ledger counted FLOPs resumes with a count of 0.
    old = ledger.state_dict()
    del old["flops"]
    restored.load_state_dict(old)
    assert restored.budget_flops == 0 and restored.nfe == ledger.nfe
