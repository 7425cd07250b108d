"""LoRA config: the adapters' initialisation and which modules the SD3.5 presets' target names adapt."""
import pytest
import torch
from torch import nn

from diffrl_bench.backends.lora import make_lora_config
from diffrl_bench.backends.options import parse_options

ATTN_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


class _Attention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.to_q = nn.Linear(width, width)
        self.to_out = nn.ModuleList([nn.Linear(width, width)])


class _Block(nn.Module):
    """SD3.5-M's dual-attention block has `attn` (joint) and `attn2` (image-only) with the same projection names."""

    def __init__(self, width: int):
        super().__init__()
        self.attn = _Attention(width)
        self.attn2 = _Attention(width)


def _inject(config, model):
    from peft import inject_adapter_in_model

    return inject_adapter_in_model(config, model)


def _lora_a(linear) -> torch.Tensor:
    return linear.lora_A["default"].weight.detach()


def test_gaussian_init_draws_a_with_std_one_over_rank_and_zero_b():
    torch.manual_seed(0)
    rank, width = 4, 1024
    model = _inject(make_lora_config(rank, 2 * rank, ["attn.to_q"], init="gaussian"), _Block(width))
    a = _lora_a(model.attn.to_q)
    # peft's "gaussian": A ~ N(0, (1/r)^2); 4096 draws put the sample std within a few percent of 1/r.
    assert a.std().item() == pytest.approx(1 / rank, rel=0.05)
    assert torch.count_nonzero(model.attn.to_q.lora_B["default"].weight) == 0


def test_default_init_is_kaiming_uniform_not_gaussian():
    torch.manual_seed(0)
    rank, width = 4, 1024
    model = _inject(make_lora_config(rank, 2 * rank, ["attn.to_q"]), _Block(width))
    a = _lora_a(model.attn.to_q)
    # kaiming_uniform_(a=sqrt(5)) on fan_in = width: |A| <= 1/sqrt(width), far below a N(0, 1/r) draw's spread.
    assert a.abs().max().item() <= 1 / width ** 0.5 + 1e-7


def test_attn_prefixed_targets_skip_the_image_only_attn2():
    model = _inject(make_lora_config(4, 8, ATTN_TARGETS, init="gaussian"), _Block(16))
    assert hasattr(model.attn.to_q, "lora_A") and hasattr(model.attn.to_out[0], "lora_A")
    assert not hasattr(model.attn2.to_q, "lora_A") and not hasattr(model.attn2.to_out[0], "lora_A")


def test_unprefixed_targets_also_adapt_attn2():
    model = _inject(make_lora_config(4, 8, ["to_q"]), _Block(16))
    assert hasattr(model.attn2.to_q, "lora_A")


def test_unknown_lora_init_is_rejected_by_name():
    with pytest.raises(ValueError, match="lora_init='xavier'"):
        parse_options({"lora_init": "xavier"}, {})
    with pytest.raises(ValueError, match="lora_init='xavier'"):
        make_lora_config(4, 8, ["to_q"], init="xavier")
