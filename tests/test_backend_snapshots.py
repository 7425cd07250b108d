"""The two snapshot strategies of the diffusers backends (backends/snapshots.py: LoRA adapters, parameter copies)
behind one set of policy methods: the same name checks, the same add / copy-back semantics, and an export in the
format of the fine-tuning mode, on the tiny SD3 pipeline."""
import pytest
import torch

from diffrl_bench.backends.snapshots import AdapterSnapshots, ParameterCopies
from diffrl_bench.models import THETA

from backend_helpers import PROMPTS, inputs  # tests/backend_helpers.py
from backend_helpers import make as make_backend


@pytest.fixture(params=["lora", "full"])
def backend(request, tiny_sd3):
    return make_backend("sd3", tiny_sd3, finetune=request.param)


def move_theta(backend, seed):
    """A small random step on every trained weight (LoRA B starts at zero, so theta would equal ref)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in backend.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def velocity(backend, snapshot):
    x, sigma = inputs(backend)
    with torch.no_grad():
        return backend.velocity(x, sigma, backend.encode_prompts(PROMPTS), snapshot=snapshot)


def test_the_fine_tuning_option_chooses_the_strategy(backend):
    expected = AdapterSnapshots if backend.options.finetune == "lora" else ParameterCopies
    assert isinstance(backend.finetuning, expected)
    assert (backend.lora is None) == (backend.options.finetune == "full")


def test_snapshot_names_are_checked_the_same_way_in_both_modes(backend):
    with pytest.raises(ValueError, match="theta"):
        backend.add_snapshot(THETA)
    with pytest.raises(KeyError, match="'old' was not created"):
        backend.update_snapshot("old", 0.5)
    backend.add_snapshot("ref")
    with pytest.raises(ValueError, match="cannot be updated"):
        backend.update_snapshot("ref", 0.5)
    with pytest.raises(KeyError, match="cannot copy snapshot 'ref'"):
        backend.copy_snapshot_to_theta("ref")
    assert backend.snapshot_names() == ["ref"]


def test_a_second_add_keeps_the_snapshot_and_copy_back_restores_it_into_theta(backend):
    move_theta(backend, seed=0)
    backend.add_snapshot("old")
    v_old = velocity(backend, "old")
    torch.testing.assert_close(v_old, velocity(backend, THETA), rtol=0, atol=0)  # a snapshot starts at theta
    move_theta(backend, seed=1)
    backend.add_snapshot("old")  # already there: not re-taken from the moved theta
    torch.testing.assert_close(velocity(backend, "old"), v_old, rtol=0, atol=0)
    assert (velocity(backend, THETA) - v_old).abs().max() > 1e-4
    backend.copy_snapshot_to_theta("old")
    torch.testing.assert_close(velocity(backend, THETA), v_old, rtol=0, atol=0)


def test_export_writes_the_modes_format_and_the_other_writer_refuses(backend, tmp_path):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    move_theta(backend, seed=2)
    out = backend.export(tmp_path / "export")
    if backend.options.finetune == "lora":
        weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
        assert len(weights) == len(backend.trainable_parameters())
        with pytest.raises(RuntimeError, match="use save_lora"):
            backend.save_transformer(tmp_path / "unused")
    else:
        loaded = SD3Transformer2DModel.from_pretrained(str(out))
        theta = dict(backend.transformer.named_parameters())
        for name, p in loaded.named_parameters():
            assert torch.equal(p, theta[name]), name
        with pytest.raises(RuntimeError, match="use save_transformer"):
            backend.save_lora(tmp_path / "unused")
