"""Every algorithm's training items and loss with the batch laid out as on a GPU, on a CPU-only machine.

On a GPU the sampler leaves x0, the transitions and the condition on the accelerator while rewards, advantages,
group labels, the time grid and the CPU generator's draws stay on the CPU. Here the accelerator is stood in for by
PyTorch's `meta` device, which refuses to mix with CPU tensors exactly as CUDA does ("Tensor on device meta is not
on the expected device cpu!"), so a tensor left on the wrong device fails here as it failed on an H200 (nft, rft,
awm: times drawn on the CPU met x0 on cuda). The items go through `TrainingItem.to_values_device` as in the
Trainer, and the loss must come out on the accelerator.
"""
import dataclasses

import pytest
import torch

from diffrl_bench.config import load_config
from diffrl_bench.registry import ALGORITHMS
from diffrl_bench.train import Trainer

ACCELERATOR = torch.device("meta")


def on_accelerator(value):
    """What the policy and its sampler produce on a GPU: floating tensors there, integer bookkeeping on the CPU."""
    return value.to(ACCELERATOR) if torch.is_tensor(value) and value.is_floating_point() else value


def as_on_a_gpu(batch):
    changes = {"x0": on_accelerator(batch.x0), "trajectory": on_accelerator(batch.trajectory),
               "cond": ({key: on_accelerator(value) for key, value in batch.cond.items()}
                        if isinstance(batch.cond, dict) else on_accelerator(batch.cond))}
    if batch.transitions is not None:
        fields = dataclasses.fields(batch.transitions)
        changes["transitions"] = dataclasses.replace(
            batch.transitions, **{f.name: on_accelerator(getattr(batch.transitions, f.name)) for f in fields})
    return dataclasses.replace(batch, **changes)


@pytest.mark.parametrize("algorithm", ALGORITHMS.names())
def test_training_items_and_loss_keep_to_the_accelerator(algorithm, tiny_model_dir, tmp_path):
    cfg = load_config(f"toy_{algorithm}", [
        f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "train.threads=1", "eval.every=-1",
        "rollout.prompts_per_step=2", "rollout.images_per_prompt=4", "rollout.chunk_size=8",
        "train.micro_batch_size=4", "reward.components.test_brightness=1.0"])
    trainer = Trainer(cfg, progress=False)
    try:
        batch = as_on_a_gpu(trainer.collect())
        assert batch.x0 is None or batch.x0.device == ACCELERATOR
        items = trainer.algo.training_items(batch, torch.arange(len(batch.group_ids)), 4, trainer.generators["train"])
        assert items
        for item in items:
            item = item.to_values_device(ACCELERATOR)
            assert item.x.device == ACCELERATOR and item.sigma.device == ACCELERATOR
            velocities = {s: torch.randn(item.x.shape, device=ACCELERATOR) for s in item.snapshots}
            loss, metrics = trainer.algo.loss(item, velocities)
            assert loss.device == ACCELERATOR and loss.dim() == 0
    finally:
        trainer.reward.close()


def test_moving_an_item_moves_its_values_and_keeps_its_labels():
    from diffrl_bench.algorithm import TrainingItem

    item = TrainingItem(index=torch.arange(2), x=torch.zeros(2, 3), sigma=torch.ones(2), snapshots=("theta",),
                        data={"advantages": torch.ones(2), "group_ids": torch.tensor([0, 1]), "k": 3})
    moved = item.to_values_device(ACCELERATOR)
    assert moved.x.device == moved.sigma.device == moved.data["advantages"].device == ACCELERATOR
    assert moved.index.device.type == "cpu" and moved.data["group_ids"].device.type == "cpu"
    assert moved.data["k"] == 3 and item.x.device.type == "cpu"  # the original is left as it was


def test_step_metrics_are_folded_on_the_device_without_reading_them_out():
    """Reading a metric (`float()`) per item would synchronise a GPU about ten times an item; on `meta` such a read
    raises, so folding there proves none happens. Known answers on the CPU: weighted mean, max, min."""
    from diffrl_bench.train import _reduce_metric

    acc = None
    for value, share in ((torch.tensor([1.0, 3.0]), 0.25), (torch.tensor([5.0]), 0.75)):
        acc = _reduce_metric("ratio", acc, value, share)
    assert acc.dtype == torch.float64 and float(acc) == 2.0 * 0.25 + 5.0 * 0.75
    assert float(_reduce_metric("ratio_max", _reduce_metric("ratio_max", None, torch.tensor([1.0, 4.0]), 0.5),
                                torch.tensor([2.0]), 0.5)) == 4.0
    assert float(_reduce_metric("ratio_min", _reduce_metric("ratio_min", None, torch.tensor([1.0, 4.0]), 0.5),
                                torch.tensor([-2.0]), 0.5)) == -2.0
    for key in ("ratio", "ratio_max", "ratio_min"):
        folded = _reduce_metric(key, _reduce_metric(key, None, torch.ones(3, device=ACCELERATOR), 0.5),
                                torch.ones(3, device=ACCELERATOR), 0.5)
        assert folded.device == ACCELERATOR
