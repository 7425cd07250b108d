"""train.compile: the decision (off / auto by run length and compiler / on or refused by name) and in-place
compilation of the toy networks. No test runs a compiled forward: compiling takes minutes on 2 cores."""
import pytest
import torch

from diffrl_bench import compile as compile_mod
from diffrl_bench.compile import CompileUnavailable, cxx_compiler, decide
from diffrl_bench.config import ConfigError, load_config
from diffrl_bench.train import Trainer

GXX = "/usr/bin/g++"


def test_off_never_compiles():
    assert decide("off", 10_000, 320, GXX, None)[0] is False


def test_auto_compiles_only_runs_of_at_least_the_break_even_length():
    assert decide("auto", 320, 320, GXX, None)[0] is True
    chosen, why = decide("auto", 319, 320, GXX, None)
    assert chosen is False and "319" in why and "train.compile_min_steps = 320" in why


def test_auto_stays_eager_without_a_compiler_or_support_and_on_is_refused_by_name():
    chosen, why = decide("auto", 1000, 320, None, None)
    assert chosen is False and "C++ compiler" in why
    assert decide("auto", 1000, 320, GXX, "DeepSpeed runs are not compiled here")[0] is False
    with pytest.raises(CompileUnavailable, match="train.compile: on, but no C\\+\\+ compiler"):
        decide("on", 1, 320, None, None)
    with pytest.raises(CompileUnavailable, match="not compiled here"):
        decide("on", 1, 320, GXX, "the X backend is not compiled here")
    assert decide("on", 1, 320, GXX, None)[0] is True  # short runs too: on means on


def test_the_compiler_is_found_through_cxx_or_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    assert cxx_compiler() is None
    fake = tmp_path / "my-c++"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", "my-c++")
    assert cxx_compiler() == str(fake)


def test_a_bad_setting_names_the_key(tiny_run):
    with pytest.raises(ConfigError, match="train.compile"):
        load_config("toy_nft", tiny_run("train.compile=fast"))


def compiled(module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


@pytest.mark.parametrize("setting, steps, expected", [("on", 2, True), ("auto", 2, False), ("auto", 400, True),
                                                      ("off", 400, False)])
def test_the_trainer_compiles_theta_and_every_snapshot_in_place(tiny_run, tmp_path, monkeypatch, setting, steps,
                                                                expected):
    monkeypatch.setattr(compile_mod, "cxx_compiler", lambda: GXX)
    cfg = load_config("toy_nft", tiny_run(f"train.compile={setting}", f"train.steps={steps}", "eval.every=-1",
                                          out=tmp_path / setting))
    trainer = Trainer(cfg, progress=False)
    try:
        policy = trainer.policy
        assert trainer.compiled is expected
        assert set(policy.snapshots) >= {"old", "ref"}
        assert all(compiled(m) is expected for m in (policy.core, *policy.snapshots.values()))
        # In place: the parameter names a checkpoint holds are the eager ones.
        assert not any("_orig_mod" in key for key in policy.core.state_dict())
    finally:
        trainer.reward.close()


def test_backends_that_switch_lora_adapters_and_deepspeed_are_not_compiled():
    from diffrl_bench.backends.diffusers_policy import DiffusersFlowPolicy
    from diffrl_bench.backends.sd3 import SD3Backend
    from diffrl_bench.models import SnapshotPolicy

    assert SnapshotPolicy.supports_compile and not DiffusersFlowPolicy.supports_compile
    assert "SD3Backend backend is not compiled" in compile_mod.blocker(SD3Backend, deepspeed=False)
    assert "DeepSpeed" in compile_mod.blocker(SnapshotPolicy, deepspeed=True)
    assert compile_mod.blocker(SnapshotPolicy, deepspeed=False) is None


def test_on_is_refused_before_any_model_is_built(tiny_run, tmp_path, monkeypatch):
    """No C++ compiler: the Trainer stops at its first checks, naming the key, before the model or the run folder."""
    monkeypatch.setattr(compile_mod, "cxx_compiler", lambda: None)
    built = []
    monkeypatch.setattr("diffrl_bench.train.build_policy", lambda *a, **k: built.append(1))
    cfg = load_config("toy_nft", tiny_run("train.compile=on", out=tmp_path / "refused"))
    with pytest.raises(CompileUnavailable, match="train.compile: on, but no C\\+\\+ compiler"):
        Trainer(cfg, progress=False)
    assert not built and not (tmp_path / "refused" / "metrics.jsonl").exists()
