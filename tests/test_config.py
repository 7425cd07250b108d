import pytest

from diffrl_bench.cli import main
from diffrl_bench.config import CONFIG_DIR, ConfigError, algo_config, load_config


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(str(path))
    options = algo_config(cfg)
    assert cfg.algorithm
    assert options is not None


@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "train.stepz"),
    ("train.steps=abc", "train.steps"),
    ("rollout.sampler.num_stepz=3", "rollout.sampler.num_stepz"),
    ("optim.lr=fast", "optim.lr"),
    ("algo.nft_betaa=1", "algo.nft_betaa"),
    ("algo.kl_beta=lots", "algo.kl_beta"),
])
def test_unknown_keys_and_wrong_types_name_the_key_path(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("toy_nft", [override])


@pytest.mark.parametrize("override, key, words", [
    ("algorithm=ppo_magic", "algorithm", "unknown algorithm"),
    ("rollout.sampler.name=heun", "rollout.sampler.name", "unknown sampler"),
    ("reward.components={nope: 1.0}", "reward.components.nope", "unknown reward"),
    ("advantage.std=batch", "advantage.std", "not 'global'"),
    ("rollout.images_per_prompt=1", "rollout.images_per_prompt", "K >= 2"),
    ("algo.loss_form=huber", "algo.loss_form", "'huber' is not one of"),
    ("algo.old_decay=fastest", "algo.old_decay", "presets"),
    ("algo.kl_beta=-1", "algo.kl_beta", "non-negative"),
    ("train.optimizer_steps_per_rollout=3", "train.optimizer_steps_per_rollout", "divide"),
    ("eval.ema_decay=1.0", "eval.ema_decay", "not in [0, 1)"),
    ("eval.ema_every=0", "eval.ema_every", "at least 1"),
    ("eval.ema_unit=epoch", "eval.ema_unit", "not one of"),
    ("eval.ema_phase=1", "eval.ema_phase", "not in [0, eval.ema_every = 1)"),
    ("eval.ema_warmup_offset=-2", "eval.ema_warmup_offset", "below -1"),
    ("eval.ema_updates_per_event=0", "eval.ema_updates_per_event", "at least 1"),
    ("rollout.sampler.grid=karras", "rollout.sampler.grid", "unknown sigma grid"),
    ("rollout.sampler.options={model_time: round}", "rollout.sampler.options.model_time", "unknown model_time"),
    # A second evaluation solver is checked like eval.sampler, and its name must be usable as a metric prefix.
    ("eval.extra_samplers.heun.name=heun", "eval.extra_samplers.heun.name", "unknown sampler"),
    ("eval.extra_samplers.sde={name: euler, options: {noise_level: 0.7}}", "eval.extra_samplers.sde.options.noise_level",
     "has no option"),
    ("eval.extra_samplers={a/b: {name: euler}}", "eval.extra_samplers.a/b", "letters, digits and underscores"),
])
def test_bad_values_are_rejected_with_the_key(override, key, words):
    with pytest.raises(ConfigError) as info:
        load_config("toy_nft", [override])
    assert f"'{key}'" in str(info.value) and words in str(info.value)


def test_yaml_file_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("algorithm: nft\ntrain:\n  steps: 3\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert "bad.yaml" in str(info.value) and "'train.learning_rate'" in str(info.value)


def test_override_without_equals_and_unknown_config_name():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("toy_nft", ["train.steps"])
    with pytest.raises(ConfigError, match="toy_nft"):
        load_config("no_such_config")


def test_overrides_apply_in_order_and_keep_types():
    cfg = load_config("toy_nft", ["optim.lr=3e-4", "train.steps=7", "optim.lr=5e-4", "algo.nft_beta=0.1"])
    assert cfg.optim.lr == 5e-4 and cfg.train.steps == 7
    assert algo_config(cfg).nft_beta == 0.1


def test_cli_stops_before_any_work_on_a_bad_key(tmp_path, caplog):
    out = tmp_path / "never"
    code = main(["train", "toy_nft", f"output_dir={out}", "train.bogus=1"])
    assert code == 2
    assert not out.exists()
    assert "train.bogus" in caplog.text


def test_sampler_options_resolve_over_the_signature_defaults():
    from diffrl_bench.config import resolve_sampler_options
    from diffrl_bench.sde import DEFAULT_NOISE_LEVEL, DEFAULT_SDE_TYPE

    cfg = load_config("toy_flow_grpo", ["rollout.sampler.options={noise_level: 0.8}"])
    resolved = resolve_sampler_options(cfg.rollout.sampler)
    assert resolved["noise_level"] == 0.8  # the config wins
    assert resolved["sde_type"] == DEFAULT_SDE_TYPE and resolved["window_size"] == 0  # the signature fills the rest
    assert "record_before" not in resolved and "groups" not in resolved  # harness arguments are not options
    assert resolve_sampler_options(load_config("toy_nft").eval.sampler) == {"model_time": None}
    assert DEFAULT_NOISE_LEVEL == 0.7  # Flow-GRPO's released default (METHODS.md section 1)
