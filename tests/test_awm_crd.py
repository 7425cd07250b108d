"""AWM and CRD losses: identities they must satisfy (parity with the originals runs in tests/test_parity.py)."""
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from diffrl_bench.algorithms.awm import awm_log_likelihood, awm_loss
from diffrl_bench.algorithms.crd import crd_loss
from diffrl_bench.algorithms.parity_runners import _crd_case_outputs
from diffrl_bench.parity import WITHIN_GROUP_PREFIX
from diffrl_bench.parity import check_case, load_cases

PUBLIC_DIR = Path(__file__).parent / "data" / "parity" / "public"
PARITY_DIR = Path(os.environ.get("DIFFRL_PARITY_DIR", PUBLIC_DIR))
F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------------
# AWM


def awm_batch(seed=0, T=3, B=4, chw=(2, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *chw, generator=g, dtype=F64)
    eps = torch.randn(T, B, *chw, generator=g, dtype=F64)
    t = torch.rand(T, B, generator=g, dtype=F64) * 0.9 + 0.05
    v_theta = eps - x0 + 0.5 * torch.randn(T, B, *chw, generator=g, dtype=F64)
    v_ref = v_theta + 0.1 * torch.randn(T, B, *chw, generator=g, dtype=F64)
    v_ema = v_theta + 0.05 * torch.randn(T, B, *chw, generator=g, dtype=F64)
    return dict(v_theta=v_theta, v_ref=v_ref, v_ema=v_ema, x0=x0, eps=eps, t=t)


def awm_call(b, advantages, v_theta=None, **kw):
    v = b["v_theta"] if v_theta is None else v_theta
    return awm_loss(v, b["v_ref"], b["v_ema"], b["x0"], b["eps"], b["t"], advantages, **kw)


def grad_of(fn, v):
    v = v.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(v), v)
    return g


@pytest.mark.parametrize("weighting", ["ghuber", "Uniform", "t", "t**2", "huber"])
def test_awm_zero_advantages_leave_only_the_anchor_gradients(weighting):
    b = awm_batch(1)
    beta, ema_beta = 0.3, 0.7
    zeros = torch.zeros(4, dtype=F64)
    loss, m = awm_call(b, zeros, weighting=weighting, beta=beta, ema_beta=ema_beta)
    assert m["policy_loss"] == 0.0
    grad = grad_of(lambda v: awm_call(b, zeros, v_theta=v, weighting=weighting, beta=beta, ema_beta=ema_beta)[0],
                   b["v_theta"])
    n = b["v_theta"].numel()  # every anchor is a plain mean over all T * B * CHW elements
    expected = 2 * beta * (b["v_theta"] - b["v_ref"]) / n + 2 * ema_beta * (b["v_theta"] - b["v_ema"]) / n
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


def test_awm_ratio_is_exactly_one_and_policy_gradient_is_that_of_minus_a_l():
    b = awm_batch(2)
    adv = torch.tensor([7.0, -2.0, 0.5, -9.0], dtype=F64)
    _, m = awm_call(b, adv)
    assert torch.equal(m["ratio"], torch.ones(3, 4, dtype=F64))
    assert m["clipfrac"] == 0.0
    a_hat = adv.clamp(-5, 5) / 5
    torch.testing.assert_close(m["advantages"], a_hat)
    # The PPO wrapper is transparent on-policy: d loss = d mean(-A_hat l), whatever clip_range.
    for clip_range in (1.0, 1e-4):
        ours = grad_of(lambda v: awm_call(b, adv, v_theta=v, beta=0.0, clip_range=clip_range)[0], b["v_theta"])

        def surrogate(v):
            target = b["eps"] - b["x0"].unsqueeze(0)
            msq = ((v - target) ** 2).mean(dim=(2, 3, 4))
            l = awm_log_likelihood(msq, b["t"], "ghuber", 0.25)
            return (-a_hat * l).mean()

        torch.testing.assert_close(ours, grad_of(surrogate, b["v_theta"]))


def test_awm_policy_value_is_minus_mean_advantage_on_policy():
    b = awm_batch(3)
    adv = torch.tensor([1.0, -3.0, 6.0, 0.0], dtype=F64)
    _, m = awm_call(b, adv)
    torch.testing.assert_close(m["policy_loss"], -(adv.clamp(-5, 5) / 5).mean())


def tiny_awm_inputs(t_value=0.6):
    """One pair (T = B = 1), two latent elements, with v_theta - (eps - x0) = (0.3, -0.4): m = 0.125."""
    x0 = torch.tensor([[0.5, 1.0]], dtype=F64)
    eps = torch.tensor([[[1.5, -1.0]]], dtype=F64)  # v* = (1.0, -2.0)
    v_theta = torch.tensor([[[1.3, -2.4]]], dtype=F64)
    t = torch.tensor([[t_value]], dtype=F64)
    return v_theta, x0, eps, t


@pytest.mark.parametrize("weighting, power, expected", [
    ("Uniform", 0.25, -0.125),
    ("t", 0.25, -0.6 * 0.125),
    ("t**2", 0.25, -0.36 * 0.125),
    ("huber", 0.25, -(math.sqrt(0.125 + 1e-10) - 1e-5) * 0.6),
    ("ghuber", 0.25, -(0.6 / 0.25) * ((0.125 + 1e-10) ** 0.25 - 1e-10 ** 0.25)),
    ("ghuber", 0.5, -(0.6 / 0.5) * ((0.125 + 1e-10) ** 0.5 - 1e-10 ** 0.5)),
])
def test_awm_weightings_by_hand(weighting, power, expected):
    v_theta, x0, eps, t = tiny_awm_inputs()
    adv = torch.tensor([2.5], dtype=F64)  # A_hat = 0.5
    loss, m = awm_loss(v_theta, None, None, x0, eps, t, adv, weighting=weighting, ghuber_power=power, beta=0.0)
    assert m["log_prob"].shape == (1, 1)
    assert m["log_prob"].item() == pytest.approx(expected, rel=1e-12)
    # d loss / d v = -A_hat dl/dm dm/dv, with dm/dv = (v - v*) (two elements: 2 (v - v*) / 2).
    d = torch.tensor([0.3, -0.4], dtype=F64)
    m_val, tv = 0.125, 0.6
    dl_dm = {"Uniform": -1.0, "t": -tv, "t**2": -tv ** 2, "huber": -tv * 0.5 / math.sqrt(m_val + 1e-10),
             "ghuber": -tv * (m_val + 1e-10) ** (power - 1)}[weighting]
    grad = grad_of(lambda v: awm_loss(v, None, None, x0, eps, t, adv, weighting=weighting, ghuber_power=power,
                                      beta=0.0)[0], v_theta)
    torch.testing.assert_close(grad.reshape(-1), -0.5 * dl_dm * d, rtol=1e-10, atol=0.0)


def test_awm_ghuber_with_power_one_is_the_t_weighting():
    b = awm_batch(4)
    adv = torch.randn(4, dtype=F64)
    _, m_g = awm_call(b, adv, weighting="ghuber", ghuber_power=1.0)
    _, m_t = awm_call(b, adv, weighting="t")
    torch.testing.assert_close(m_g["log_prob"], m_t["log_prob"], rtol=1e-8, atol=1e-12)


def test_awm_ema_term_only_inside_beta_branch():
    b = awm_batch(5)
    adv = torch.randn(4, dtype=F64)
    loss, m = awm_call(b, adv, beta=0.01, ema_beta=0.5)
    torch.testing.assert_close(loss, m["policy_loss"] + 0.01 * m["kl_loss"] + 0.5 * m["ema_kl_loss"])
    loss0, m0 = awm_call(b, adv, beta=0.0, ema_beta=0.5)
    assert loss0 == m0["policy_loss"]  # the original drops the ema term along with the KL
    loss_no_ema, m1 = awm_call(b, adv, beta=0.01, ema_beta=0.0)
    torch.testing.assert_close(loss_no_ema, m1["policy_loss"] + 0.01 * m1["kl_loss"])


def test_awm_time_major_layout():
    # Swapping two samples in every input swaps the per-pair outputs, and nothing mixes times with samples.
    b = awm_batch(6)
    adv = torch.randn(4, dtype=F64)
    perm = torch.tensor([1, 0, 2, 3])
    swapped = {k: (v[perm] if k == "x0" else v[:, perm]) for k, v in b.items()}
    _, m = awm_call(b, adv)
    _, ms = awm_call(swapped, adv[perm])
    torch.testing.assert_close(ms["log_prob"], m["log_prob"][:, perm])
    torch.testing.assert_close(ms["loss"], m["loss"])


def test_awm_off_policy_clip_cuts_the_gradient():
    b = awm_batch(7)
    adv = torch.full((4,), 3.0, dtype=F64)
    _, m = awm_call(b, adv, beta=0.0)
    old = m["log_prob"] - 1.0  # ratio = e > 1 + clip_range: positive advantages get no gradient
    grad = grad_of(lambda v: awm_call(b, adv, v_theta=v, beta=0.0, clip_range=0.2, old_log_prob=old)[0],
                   b["v_theta"])
    assert torch.count_nonzero(grad) == 0


# ---------------------------------------------------------------------------------------------------------------
# CRD


def crd_batch(seed=0, B=6, chw=(2, 3, 3), groups=(0, 0, 0, 1, 1, 1)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *chw, generator=g, dtype=F64)
    eps = torch.randn(B, *chw, generator=g, dtype=F64)
    v_old = eps - x0 + 0.4 * torch.randn(B, *chw, generator=g, dtype=F64)
    v_theta = v_old + 0.2 * torch.randn(B, *chw, generator=g, dtype=F64)
    v_ref = v_old + 0.1 * torch.randn(B, *chw, generator=g, dtype=F64)
    t = torch.rand(B, generator=g, dtype=F64)
    adv = 2.0 * torch.rand(B, generator=g, dtype=F64) - 1.0  # well inside the clip range
    return dict(v_theta=v_theta, v_old=v_old, v_ref=v_ref, x0=x0, eps=eps, t=t, advantages=adv,
                group_ids=torch.tensor(groups))


def crd_call(b, v_theta=None, advantages=None, group_ids=None, **kw):
    v = b["v_theta"] if v_theta is None else v_theta
    adv = b["advantages"] if advantages is None else advantages
    gid = b["group_ids"] if group_ids is None else group_ids
    return crd_loss(v, b["v_old"], b["v_ref"], b["x0"], b["eps"], b["t"], adv, gid, **kw)


@pytest.mark.parametrize("loss_type", ["mse", "bce"])
def test_crd_within_group_is_invariant_to_a_per_prompt_shift(loss_type):
    b = crd_batch(1)
    shifted = b["advantages"].clone()
    shifted[b["group_ids"] == 1] += 1.5  # stays inside [-5, 5], so the [0, 1] map is affine there
    kw = dict(loss_type=loss_type, kl_beta=0.0)
    loss, m = crd_call(b, centering="group", **kw)
    loss_s, m_s = crd_call(b, advantages=shifted, centering="group", **kw)
    torch.testing.assert_close(loss_s, loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        grad_of(lambda v: crd_call(b, v_theta=v, advantages=shifted, centering="group", **kw)[0], b["v_theta"]),
        grad_of(lambda v: crd_call(b, v_theta=v, centering="group", **kw)[0], b["v_theta"]),
        rtol=1e-10, atol=1e-14)
    # Batch centring mixes the two prompts, so the per-prompt constant (log Z) leaks into the loss.
    loss_b, _ = crd_call(b, centering="batch", **kw)
    loss_bs, _ = crd_call(b, advantages=shifted, centering="batch", **kw)
    assert abs(loss_bs.item() - loss_b.item()) > 1e-6


def test_crd_theta_equal_old_has_zero_implicit_reward():
    b = crd_batch(2)
    for adaptive in (True, False):
        _, m = crd_call(b, v_theta=b["v_old"].clone(), adaptive=adaptive)
        assert torch.equal(m["r_theta"], torch.zeros(6, dtype=F64))


def test_crd_single_group_centerings_coincide():
    b = crd_batch(3, groups=(4, 4, 4, 4, 4, 4))
    for loss_type in ("mse", "bce"):
        lg, mg = crd_call(b, centering="group", loss_type=loss_type)
        lb, mb = crd_call(b, centering="batch", loss_type=loss_type)
        torch.testing.assert_close(lg, lb, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(
            grad_of(lambda v: crd_call(b, v_theta=v, centering="group", loss_type=loss_type)[0], b["v_theta"]),
            grad_of(lambda v: crd_call(b, v_theta=v, centering="batch", loss_type=loss_type)[0], b["v_theta"]),
            rtol=1e-12, atol=1e-15)


def test_crd_within_group_equals_the_average_of_per_group_batch_losses():
    # Interleaved, equal-size groups: per-prompt centring is the port run on each prompt alone, averaged.
    b = crd_batch(4, groups=(0, 1, 0, 1, 0, 1))
    for loss_type in ("mse", "bce"):
        loss, _ = crd_call(b, centering="group", loss_type=loss_type)
        parts = []
        for gid in (0, 1):
            sel = b["group_ids"] == gid
            sub = {k: v[sel] for k, v in b.items()}
            parts.append(crd_call(sub, centering="batch", loss_type=loss_type)[0])
        torch.testing.assert_close(loss, torch.stack(parts).mean(), rtol=1e-12, atol=1e-15)


def test_crd_mse_loss_by_hand():
    b = crd_batch(5, groups=(0, 0, 1, 1, 1, 1))
    _, m = crd_call(b, centering="group", kl_beta=0.1, c_min=1e-3)
    r, rt = m["r_theta"], 0.5 + b["advantages"] / 10
    gid = b["group_ids"]
    dr = torch.stack([r[i] - r[gid == gid[i]].mean() for i in range(6)])
    dR = torch.stack([rt[i] - rt[gid == gid[i]].mean() for i in range(6)])
    torch.testing.assert_close(m["policy_loss"], 5.0 * ((dr - dR) ** 2).mean())
    kl_div = ((b["v_theta"] - b["v_ref"]) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(m["kl_loss"], 0.1 * ((1e-3 + rt * (1 - 1e-3)) * kl_div).mean())
    torch.testing.assert_close(m["loss"], m["policy_loss"] + m["kl_loss"])


CRD_CASES = [c for c in load_cases(PARITY_DIR) if c["kind"] == "crd_loss"]
GROUPED_CASES = [c for c in CRD_CASES if c.get("outputs_within_group")]


@pytest.mark.parametrize("case", GROUPED_CASES, ids=[c["case_id"] for c in GROUPED_CASES])
def test_crd_outputs_within_group_match_group_centering(case):
    ours = _crd_case_outputs(case, "group")
    tol = case["tolerance"]
    for name, expected in case["outputs_within_group"].items():
        if expected is None:
            continue
        spec = (tol.get("per_output") or {}).get(name, tol)
        exp = np.asarray(expected, dtype=np.float64)
        got = ours[name].detach().numpy()
        assert got.shape == exp.shape, name
        assert np.all(np.abs(got - exp) <= spec["atol"] + spec["rtol"] * np.abs(exp)), name


@pytest.mark.parametrize("case", GROUPED_CASES[:1], ids=[c["case_id"] for c in GROUPED_CASES[:1]])
def test_crd_runner_checks_outputs_within_group(case):
    import copy

    tampered = copy.deepcopy(case)
    tampered["outputs_within_group"]["loss"] += 1e-3
    result = check_case(tampered)
    assert not result.passed and WITHIN_GROUP_PREFIX + "loss" in result.message
    assert check_case(copy.deepcopy(case)).passed
