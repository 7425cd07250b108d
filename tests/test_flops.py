"""FLOP counting: known answers (2 m n k for a matmul, the convolution and attention formulas worked by hand),
linearity in the batch, one count per shape, CFG doubling, backward = 2x forward, the per-phase totals."""
import pytest
import torch
from torch import nn

from diffrl_bench.flops import BACKWARD_FACTOR, FlopMeter, count_flops, matmul_flops_per_s, peak_flops
from diffrl_bench.models import SnapshotPolicy


class LinearStack(nn.Module):
    """x (B, 12) -> 32 -> 5 through two Linears; sigma and cond are ignored."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 32), nn.Linear(32, 5)

    def forward(self, x, sigma=None, cond=None):
        return self.b(torch.relu(self.a(x)))


class LinearPolicy(SnapshotPolicy):
    """A policy with the harness's velocity (and its CFG branch) around LinearStack."""

    def null_condition(self, batch_size):
        return torch.zeros(batch_size, 3)


def test_linear_stack_counts_two_m_n_k_per_layer():
    meter = FlopMeter(LinearStack())
    # each Linear is an (B x in) @ (in x out) matmul: 2 * B * in * out multiply-adds counted as 2 FLOPs each
    assert meter.forward_flops((7, 12)) == 2 * 7 * 12 * 32 + 2 * 7 * 32 * 5


def test_conv_stack_counts_the_convolution_formula():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    meter = FlopMeter(lambda x, sigma, cond: conv(x))
    # a conv is a matmul per output pixel: 2 * out_pixels * C_out * (C_in * kh * kw)
    per_sample = 2 * (10 * 10) * 8 * (3 * 3 * 3) + 2 * (10 * 10) * 4 * (8 * 1 * 1)
    assert meter.forward_flops((2, 3, 10, 10)) == 2 * per_sample


def test_attention_is_counted_on_cpu():
    q = torch.randn(2, 3, 5, 4)
    # scores q k^T (2 * s * s * d) and their product with v (2 * s * s * d), per batch and head
    assert count_flops(lambda: nn.functional.scaled_dot_product_attention(q, q, q)) == 2 * 3 * (4 * 5 * 5 * 4)


def test_counter_runs_once_per_shape_and_scales_with_the_batch():
    meter = FlopMeter(LinearStack())
    one = meter.forward_flops((1, 12))
    assert meter.measurements == 1
    assert meter.forward_flops((9, 12)) == 9 * one
    assert meter.forward_flops((3, 12)) == 3 * one
    assert meter.measurements == 1  # cache hits: the batch size is not part of the key
    # the per-sample count is a batch-one count; an independent count of a real batch of 9 agrees (linearity)
    net = LinearStack()
    assert count_flops(lambda: net(torch.zeros(9, 12))) == 9 * one


def test_a_new_per_sample_shape_is_counted_again():
    conv = nn.Conv2d(1, 2, 3, padding=1)
    meter = FlopMeter(lambda x, sigma, cond: conv(x))
    small, big = meter.forward_flops((1, 1, 4, 4)), meter.forward_flops((1, 1, 8, 8))
    assert meter.measurements == 2 and big == 4 * small


def test_condition_shapes_are_part_of_the_key():
    calls = []

    def net(x, sigma, cond):
        calls.append(cond["c"].shape)
        return x @ torch.ones(x.shape[1], cond["c"].shape[1])

    meter = FlopMeter(net)
    a = meter.forward_flops((2, 4), {"c": torch.zeros(2, 3)})
    b = meter.forward_flops((5, 4), {"c": torch.zeros(5, 6)})
    assert meter.measurements == 2 and calls == [(1, 3), (1, 6)]
    assert a == 2 * (2 * 4 * 3) and b == 5 * (2 * 4 * 6)


def test_cfg_doubles_the_forward_and_matches_the_counted_guided_call():
    policy = LinearPolicy(LinearStack())
    meter = FlopMeter(policy)
    plain = meter.forward_flops((4, 12), torch.zeros(4, 3))
    guided = meter.forward_flops((4, 12), torch.zeros(4, 3), cfg_scale=4.5)
    assert guided == 2 * plain and meter.measurements == 1
    # independently: count the policy's own CFG velocity (one network call on the doubled batch)
    x, cond = torch.zeros(4, 12), torch.zeros(4, 3)
    with torch.no_grad():
        counted = count_flops(lambda: policy.velocity(x, torch.full((4,), 0.5), cond, cfg_scale=4.5))
    assert guided == counted


def test_backward_is_twice_the_forward_and_the_autograd_count_agrees_for_full_training():
    meter = FlopMeter(LinearStack())
    fwd = meter.forward_flops((6, 12))
    assert BACKWARD_FACTOR == 2 and meter.backward_flops((6, 12)) == 2 * fwd
    # for a network whose every weight trains, the counted autograd backward is exactly 2x (input and weight grads);
    # the first layer's input needs no gradient, so only its weight gradient is counted there
    net = LinearStack()
    out = net(torch.zeros(6, 12)).sum()
    counted = count_flops(lambda: out.backward())
    assert counted == 2 * fwd - 2 * 6 * 12 * 32


def test_per_phase_totals_accumulate():
    meter = FlopMeter(LinearStack())
    meter.add("rollout", meter.forward_flops((2, 12)))
    meter.add("rollout", meter.forward_flops((2, 12)))
    meter.add("train", meter.forward_flops((2, 12)) + meter.backward_flops((2, 12)))
    f = meter.forward_flops((1, 12))
    assert meter.totals() == {"rollout": 4 * f, "train": 6 * f}


def test_decode_flops_count_the_decoder_per_latent():
    class Decoder:
        device = torch.device("cpu")

        def __init__(self):
            self.conv = nn.Conv2d(4, 3, 1)

        def decode(self, z):
            return self.conv(z)

    meter = FlopMeter(Decoder())
    assert meter.decode_flops((5, 4, 8, 8)) == 5 * 2 * 64 * 3 * 4


def test_peak_table_and_matmul_rate():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some Future GPU") is None
    assert matmul_flops_per_s("cpu", size=64, repeats=2) > 0


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_tiny_sd3_counts_are_linear_in_the_batch(cfg_scale):
    from diffrl_bench.registry import MODELS

    policy = MODELS.get("sd3")(path="random:tiny", device="cpu")
    meter = FlopMeter(policy)
    cond = policy.encode_prompts(["a red cube", "two dogs", "a cat"])
    shape = (3, *policy.latent_shape)
    counted = meter.forward_flops(shape, cond, cfg_scale)
    assert counted > 0
    with torch.no_grad():
        direct = count_flops(lambda: policy.velocity(torch.zeros(shape), torch.full((3,), 0.5), cond,
                                                     cfg_scale=cfg_scale))
    assert counted == direct
