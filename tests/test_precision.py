"""`train.allow_tf32`: applied on CUDA only, and only when asked; torch's defaults stay otherwise."""
import pytest
import torch

from diffrl_bench.precision import apply_tf32


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_is_set_on_cuda_when_allowed(tf32_flags):
    assert apply_tf32(True, torch.device("cuda", 0))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("allow, device", [(False, "cuda"), (True, "cpu"), (False, "cpu")])
def test_tf32_is_left_alone_off_cuda_or_when_not_allowed(tf32_flags, allow, device):
    assert not apply_tf32(allow, torch.device(device))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_allow_tf32_is_a_train_option_off_by_default():
    from diffrl_bench.config import load_config

    assert load_config("toy_nft").train.allow_tf32 is False
    assert load_config("toy_nft", ["train.allow_tf32=true"]).train.allow_tf32 is True
