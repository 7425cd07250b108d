"""Soft-update decay schedules and the soft update."""

import pytest
import torch

from diffrl_bench.schedules import DECAY_PRESETS, DecaySchedule, decay_schedule, soft_update_


# Parity with the original code: every case runs in tests/test_parity.py.

STEPS = [0, 1, 10, 74, 75, 76, 100, 133, 200, 500, 1000, 5000]


@pytest.mark.parametrize(
    "name, formula",
    [
        ("on_policy", lambda s: 0.0),
        ("nft", lambda s: min(0.001 * s, 0.5)),
        ("nft_ocr", lambda s: 0.0 if s < 75 else min(0.0075 * (s - 75), 0.999)),
        ("crd_old", lambda s: min(0.25 + 0.005 * s, 0.999)),
        ("crd_sampler", lambda s: 0.0 if s < 75 else min(0.0075 * (s - 75), 0.999)),
        ("awm_ema", lambda s: min(0.001 * s, 0.3)),
    ],
)
def test_presets_follow_methods_md(name, formula):
    schedule = decay_schedule(name)
    for step in STEPS:
        assert schedule(step) == pytest.approx(formula(step), abs=1e-12), (name, step)


def test_general_form_and_types():
    sched = DecaySchedule(start_step=10, start_value=0.2, slope=0.1, max_value=0.9)
    assert sched(0) == 0.2 and sched(9) == 0.2
    assert sched(10) == pytest.approx(0.2)
    assert sched(13) == pytest.approx(0.5)
    assert sched(1000) == 0.9
    assert isinstance(sched(3), float)


def test_decay_schedule_spec_forms():
    sched = DecaySchedule(5, 0.1, 0.01, 0.6)
    assert decay_schedule(sched) is sched
    assert decay_schedule({"start_step": 5, "start_value": 0.1, "slope": 0.01, "max_value": 0.6}) == sched
    assert decay_schedule("75-0.0-0.0075-0.999") == DECAY_PRESETS["nft_ocr"]
    with pytest.raises(ValueError, match="nft_ocr"):  # the message lists the presets
        decay_schedule("nft_fast")
    with pytest.raises(ValueError, match="slop"):
        decay_schedule({"slop": 0.1})


def test_soft_update_identities():
    g = torch.Generator().manual_seed(0)
    theta = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    phi = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    phi_before = [p.clone() for p in phi]

    soft_update_(phi, theta, 1.0)
    assert all(torch.equal(p, q) for p, q in zip(phi, phi_before))

    mixed = [p.clone() for p in phi_before]
    soft_update_(mixed, theta, 0.3)
    for m, p, t in zip(mixed, phi_before, theta):
        torch.testing.assert_close(m, 0.3 * p + 0.7 * t)

    soft_update_(phi, theta, 0.0)
    assert all(torch.equal(p, t) for p, t in zip(phi, theta))


def test_soft_update_parameters_without_grad_tracking():
    theta = [torch.nn.Parameter(torch.ones(3))]
    phi = [torch.nn.Parameter(torch.zeros(3))]
    soft_update_(phi, theta, 0.25)  # in place on leaf parameters: must not raise
    torch.testing.assert_close(phi[0].detach(), torch.full((3,), 0.75))
    with pytest.raises(ValueError):
        soft_update_(phi, theta, 1.5)
    with pytest.raises(ValueError):
        soft_update_(phi, theta + theta, 0.5)
