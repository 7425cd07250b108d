"""When the evaluation EMA (`eval.ema_decay > 0`) moves towards theta, and with which decays.

The originals keep an EMA of the trained weights for evaluation, each with its own clock: Flow-GRPO calls
`ema.step(global_step)` after every micro-batch, so each optimizer step's count is seen once per micro-batch and the
EMA moves twice (towards the same theta) when `(n + 1) % 8 == 0` (zhtmike/flow_grpo@9745241c:scripts/train_sd3.py:
959-960, flow_grpo/ema.py:45); Flow-Factory's CRD steps it once per RL step with the 0-based RL step index
(X-GenGroup/Flow-Factory@a0b2bc5a:src/flow_factory/trainers/crd.py:374). One rule covers them and our default:

after the c-th completed unit (c = 1, 2, ...; the unit is an optimizer step or an RL step, `eval.ema_unit`), if
`(c + ema_phase) % ema_every == 0`, the EMA moves `ema_updates_per_event` times towards theta, each time with decay
`min(ema_decay, (1 + n) / (10 + n))`, where n = c + ema_warmup_offset is the warm-up counter.
"""
from __future__ import annotations

from typing import List

OPTIMIZER_STEP = "optimizer_step"
RL_STEP = "rl_step"
EMA_UNITS = (OPTIMIZER_STEP, RL_STEP)
"""what `eval.ema_every` counts"""


def warmed_up_decay(max_decay: float, n: int) -> float:
    """`min(max_decay, (1 + n) / (10 + n))`: the power warm-up shared by Flow-GRPO (flow_grpo/ema.py:45) and
    Flow-Factory (ema/ema_utils.py:38-52, warmup_steps 10), so early averages are not dominated by the base."""
    return min(max_decay, (1 + n) / (10 + n))


def eval_ema_decays(eval_cfg, unit: str, count: int) -> List[float]:
    """The decays to apply, in order, after the `count`-th completed `unit` (empty: no update then)."""
    if unit not in EMA_UNITS:
        raise ValueError(f"unknown EMA unit {unit!r}; known: {list(EMA_UNITS)}")
    if eval_cfg.ema_decay <= 0 or unit != eval_cfg.ema_unit:
        return []
    if (count + eval_cfg.ema_phase) % eval_cfg.ema_every:
        return []
    decay = warmed_up_decay(eval_cfg.ema_decay, count + eval_cfg.ema_warmup_offset)
    return [decay] * eval_cfg.ema_updates_per_event
