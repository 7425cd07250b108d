"""DiffusionNFT loss: parity with the released code and identities the loss must satisfy."""

import pytest
import torch

from diffrl_bench.algorithms.nft import nft_loss
from diffrl_bench.algorithms.weighting import adaptive_x0_loss
from diffrl_bench.flow import forward_noise, mean_chw


# Parity with the original code: every case runs in tests/test_parity.py.

def make_batch(seed=0, shape=(4, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x0, eps = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.9 + 0.05
    v_old = eps - x0 + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    v_theta = v_old + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    v_ref = v_old + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    return dict(x0=x0, eps=eps, t=t, x_t=forward_noise(x0, eps, t), v_theta=v_theta, v_old=v_old, v_ref=v_ref)


def call(b, advantages, v_theta=None, **kw):
    v_theta = b["v_theta"] if v_theta is None else v_theta
    return nft_loss(v_theta, b["v_old"], b["v_ref"], b["x0"], b["x_t"], b["t"], advantages, **kw)


def mean_chw_loss_at(b, v):
    """Per-sample adaptive x0 loss of the x0-prediction made with velocity v."""
    return adaptive_x0_loss(b["x_t"] - b["t"].reshape(-1, 1, 1, 1) * v, b["x0"])


def grad_of(loss_fn, v):
    v = v.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(v), v)
    return g


def test_forward_noise_endpoints():
    b = make_batch()
    ones, zeros = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    assert torch.equal(forward_noise(b["x0"], b["eps"], zeros), b["x0"])
    assert torch.equal(forward_noise(b["x0"], b["eps"], ones), b["eps"])


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_theta_equal_old_policy_loss_ignores_advantages(beta):
    b = make_batch(1)
    expected = 5.0 * mean_chw_loss_at(b, b["v_old"]).mean() / beta
    for adv in (torch.tensor([3.0, -1.0, 0.2, 9.0]), torch.tensor([-7.0, -0.5, 0.0, 1.5])):
        _, m = call(b, adv, v_theta=b["v_old"].clone(), nft_beta=beta)
        torch.testing.assert_close(m["positive_loss"], m["negative_loss"])
        torch.testing.assert_close(m["policy_loss"], expected)


def test_all_positive_is_plain_adaptive_regression_of_theta():
    # r = 1 everywhere and beta = 1: v+ = v_theta, the negative branch has zero weight, so the loss and its gradient
    # are those of 5 * mean L(v_theta) whatever v_old is.
    b = make_batch(2)
    adv = torch.full((4,), 8.0, dtype=torch.float64)
    ours = grad_of(lambda v: call(b, adv, v_theta=v, kl_beta=0.0)[0], b["v_theta"])
    plain = grad_of(lambda v: 5.0 * mean_chw_loss_at(b, v).mean(), b["v_theta"])
    torch.testing.assert_close(ours, plain)
    b_other_old = dict(b, v_old=b["v_old"] + 1.0)
    torch.testing.assert_close(grad_of(lambda v: call(b_other_old, adv, v_theta=v, kl_beta=0.0)[0], b["v_theta"]),
                               plain)


def test_all_negative_pushes_theta_to_the_reflection():
    # r = 0, beta = 1: only v- = 2 v_old - v_theta is scored.
    b = make_batch(3)
    adv = torch.full((4,), -8.0, dtype=torch.float64)
    ours = grad_of(lambda v: call(b, adv, v_theta=v, kl_beta=0.0)[0], b["v_theta"])
    reflected = grad_of(lambda v: 5.0 * mean_chw_loss_at(b, 2 * b["v_old"] - v).mean(), b["v_theta"])
    torch.testing.assert_close(ours, reflected)


def test_gradient_only_reaches_v_theta():
    b = make_batch(4)
    v_theta, v_old, v_ref = (b[k].clone().requires_grad_(True) for k in ("v_theta", "v_old", "v_ref"))
    loss, metrics = nft_loss(v_theta, v_old, v_ref, b["x0"], b["x_t"], b["t"], torch.randn(4, dtype=torch.float64))
    loss.backward()
    assert v_theta.grad is not None and v_old.grad is None and v_ref.grad is None
    assert all(not m.requires_grad for m in metrics.values())
    assert metrics["r"].shape == metrics["positive_loss"].shape == (4,)
    assert metrics["loss"].shape == ()


def test_total_is_policy_plus_weighted_kl():
    b = make_batch(5)
    adv = torch.randn(4, dtype=torch.float64)
    loss, m = call(b, adv, kl_beta=0.3)
    torch.testing.assert_close(m["kl_loss"], mean_chw((b["v_theta"] - b["v_ref"]) ** 2).mean())
    torch.testing.assert_close(loss, m["policy_loss"] + 0.3 * m["kl_loss"])
    _, m_same_ref = call(dict(b, v_ref=b["v_theta"]), adv)
    assert m_same_ref["kl_loss"] == 0.0


def test_adaptive_weight_is_a_stop_gradient_float64_weight():
    g = torch.Generator().manual_seed(6)
    pred, x0 = torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, 5, generator=g)
    loss = adaptive_x0_loss(pred, x0)
    assert loss.dtype == torch.float64 and loss.shape == (3,)
    diff = (pred - x0).double()
    w = diff.abs().mean(dim=(1, 2))
    torch.testing.assert_close(loss, (diff ** 2).mean(dim=(1, 2)) / w)
    # d/dpred of mean(diff^2) / sg(w) = 2 diff / (n w): the weight is not differentiated.
    grad = grad_of(lambda p: adaptive_x0_loss(p, x0).sum(), pred)
    torch.testing.assert_close(grad.double(), 2 * diff / (10 * w[:, None, None]), rtol=1e-5, atol=1e-7)
    # The clamp: an exact prediction gives loss 0, not NaN.
    assert torch.equal(adaptive_x0_loss(x0, x0), torch.zeros(3, dtype=torch.float64))


def test_mean_chw_keeps_one_dimensional_inputs():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(mean_chw(x), x)
    per_sample = torch.ones(2, 3, 4) * torch.tensor([1.0, 2.0])[:, None, None]
    assert torch.equal(mean_chw(per_sample), torch.tensor([1.0, 2.0]))


def test_velocity_form_known_answer():
    # One element per sample. v* = eps - x0 = 1. beta = 0.5.
    # Sample 0: A = 0 -> r = 0.5; v_theta = 1, v_old = 0 -> v+ = 0.5, v- = -0.5;
    #   r (v+ - 1)^2 + (1 - r)(v- - 1)^2 = 0.5 * 0.25 + 0.5 * 2.25 = 1.25.
    # Sample 1: A = 2.5 -> r = 0.75; v_theta = 3, v_old = 1 -> v+ = 2, v- = 0; 0.75 * 1 + 0.25 * 1 = 1.0.
    # Policy = mean = 1.125. KL with v_ref = 0: mean(1, 9) = 5; total = 1.125 + 0.1 * 5 = 1.625.
    v_theta = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    v_old = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    zeros = torch.zeros(2, 1, dtype=torch.float64)
    loss, m = nft_loss(v_theta, v_old, zeros, zeros, zeros, torch.full((2,), 0.5, dtype=torch.float64),
                       torch.tensor([0.0, 2.5], dtype=torch.float64), nft_beta=0.5, kl_beta=0.1,
                       form="velocity", eps=torch.ones(2, 1, dtype=torch.float64))
    torch.testing.assert_close(m["r"], torch.tensor([0.5, 0.75], dtype=torch.float64))
    torch.testing.assert_close(m["positive_loss"], torch.tensor([0.25, 1.0], dtype=torch.float64))
    torch.testing.assert_close(m["negative_loss"], torch.tensor([2.25, 1.0], dtype=torch.float64))
    torch.testing.assert_close(m["policy_loss"], torch.tensor(1.125, dtype=torch.float64))
    torch.testing.assert_close(loss, torch.tensor(1.625, dtype=torch.float64))


def test_errors():
    b = make_batch()
    adv = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="eps"):
        call(b, adv, form="velocity")
    with pytest.raises(ValueError, match="x0_space"):
        call(b, adv, form="x0_space")
