"""The evaluation EMA's clock (diffrl_bench/eval_ema.py) against the originals' loops, re-enacted here from their
published structure (not from our code): which completed step triggers an update, how often, with which decay."""
import pytest
from omegaconf import OmegaConf

from diffrl_bench.config import load_config
from diffrl_bench.eval_ema import OPTIMIZER_STEP, RL_STEP, eval_ema_decays


def _ours(cfg, unit, last):
    """(completed units, decay) for every EMA move after units 1..last."""
    return [(c, d) for c in range(1, last + 1) for d in eval_ema_decays(cfg.eval, unit, c)]


def _flow_grpo_loop(optimizer_steps, micro_batches_per_step=2, interval=8, max_decay=0.9):
    """zhtmike/flow_grpo@9745241c:scripts/train_sd3.py:851-960: after every micro-batch, `global_step` is bumped if that
    micro-batch completed an optimizer step, then `ema.step(global_step)`; ema.py:40-50 moves the EMA iff
    (step + 1) % interval == 0, with decay min(max_decay, (1 + step) / (10 + step))."""
    moves, global_step = [], 0
    for micro_batch in range(optimizer_steps * micro_batches_per_step):
        if (micro_batch + 1) % micro_batches_per_step == 0:
            global_step += 1
        if (global_step + 1) % interval == 0:
            # accelerate skips optimizer.step until a step's last micro-batch, so theta is the one after
            # `global_step` completed steps, whichever micro-batch this is
            moves.append((global_step, min(max_decay, (1 + global_step) / (10 + global_step))))
    return moves


def _flow_factory_loop(rl_steps, interval=10, max_decay=0.995):
    """X-GenGroup/Flow-Factory@a0b2bc5a:src/flow_factory/trainers/crd.py:370-378: after epoch e's optimisation,
    `ema_step(step=e)` (e 0-based); ema/ema.py:103-114 moves iff (e + 1) % interval == 0 with the power warm-up
    min(max_decay, (1 + e) / (10 + e)) (ema/ema_utils.py:38-52)."""
    return [(e + 1, min(max_decay, (1 + e) / (10 + e))) for e in range(rl_steps) if (e + 1) % interval == 0]


@pytest.mark.parametrize("preset", ["flow_grpo_sd35m_geneval", "flow_grpo_sd35m_ocr", "flow_grpo_sd35m_pickscore",
                                    "flow_grpo_nocfg_sd35m_geneval", "flow_grpo_nocfg_sd35m_pickscore"])
def test_flow_grpo_presets_move_the_ema_twice_at_steps_7_15_23(preset):
    cfg = load_config(preset)
    ours = _ours(cfg, OPTIMIZER_STEP, 100)
    assert ours == _flow_grpo_loop(100)
    # by hand: 8/17 twice after step 7, 16/25 twice after step 15, ..., capped at 0.9 from step 87 on
    assert ours[:4] == [(7, 8 / 17), (7, 8 / 17), (15, 16 / 25), (15, 16 / 25)]
    assert ours[-2:] == [(95, 0.9), (95, 0.9)] and (79, 80 / 89) in ours
    assert _ours(cfg, RL_STEP, 50) == []


@pytest.mark.parametrize("preset", ["crd_sd35m_geneval", "crd_sd35m_ocr", "crd_sd35m_pickscore"])
def test_crd_presets_move_the_ema_every_10th_rl_step_warming_up_over_the_0_based_rl_step(preset):
    cfg = load_config(preset)
    ours = _ours(cfg, RL_STEP, 400)
    assert ours == _flow_factory_loop(400)
    # the cap 0.995 binds only from e = 1791 on: over 400 RL steps the warm-up sets every decay
    assert ours[:2] == [(10, 10 / 19), (20, 20 / 29)] and ours[-1] == (400, 400 / 409)
    assert _ours(cfg, OPTIMIZER_STEP, 800) == []


def test_the_default_clock_is_unchanged_every_nth_optimizer_step_counted_from_1():
    cfg = OmegaConf.create({"eval": {"ema_decay": 0.9, "ema_every": 8, "ema_unit": OPTIMIZER_STEP, "ema_phase": 0,
                                     "ema_warmup_offset": 0, "ema_updates_per_event": 1}})
    assert _ours(cfg, OPTIMIZER_STEP, 20) == [(8, 9 / 18), (16, 17 / 26)]
    assert _ours(cfg, RL_STEP, 20) == []
    off = OmegaConf.merge(cfg, {"eval": {"ema_decay": 0.0}})
    assert _ours(off, OPTIMIZER_STEP, 20) == []


def test_an_unknown_unit_is_refused():
    cfg = load_config("toy_nft", ["eval.ema_decay=0.9"])
    with pytest.raises(ValueError, match="unknown EMA unit 'epoch'"):
        eval_ema_decays(cfg.eval, "epoch", 1)
