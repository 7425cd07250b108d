import os
import signal

# A suite started in the background by a script (`cmd &`, `nohup`) inherits SIGINT ignored, and so would every
# process a test starts, so the tests that send Ctrl-C to one would time out instead of testing it. Take SIGINT back
# (xdist's workers run this too); processes started from here are then born with the default Ctrl-C.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Small CPU ops under thread contention run far slower with 2 intra-op threads (ENV_NOTES); tests use one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402

from diffrl_bench.registry import REWARDS  # noqa: E402


@REWARDS.register("test_brightness")
class BrightnessReward:
    """Mean pixel value: a reward that varies even on a random model's images (the toy detector scores those 0)."""

    name = "test_brightness"

    def __call__(self, images, prompts, metadata):
        return {self.name: images.mean(dim=(1, 2, 3))}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-initialised toy flow model, small enough for fast end-to-end tests."""
    from diffrl_bench.toy import domain
    from diffrl_bench.toy.model import ToyFlowModel, ToyModelConfig, save_toy_model

    torch.manual_seed(0)
    model = ToyFlowModel(ToyModelConfig(vocab=domain.vocabulary(), embed_dim=16, block_out_channels=(8, 16)))
    path = tmp_path_factory.mktemp("tiny_toy_model")
    save_toy_model(model, path)
    return str(path)


@pytest.fixture
def tiny_run(tiny_model_dir, tmp_path):
    """Overrides for a seconds-long run of the toy benchmark on the tiny model."""

    def make(*extra, out=None, algo=("algo.num_train_times=2",)):
        return [f"model.path={tiny_model_dir}", f"output_dir={out or tmp_path / 'run'}", "train.threads=1",
                "rollout.prompts_per_step=2", "rollout.images_per_prompt=4", "rollout.chunk_size=4",
                "rollout.sampler.num_steps=3", "eval.sampler.num_steps=3", "eval.images_per_prompt=2",
                "train.micro_batch_size=4", *algo,
                "reward.components.test_brightness=1.0", *extra]

    return make


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """A random-initialised tiny SD3 pipeline directory (three text encoders, VAE, transformer), built in code."""
    from diffrl_bench.backends.tiny import build_tiny_sd3_pipeline

    return str(build_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3")))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """A random-initialised tiny FLUX.1 pipeline directory, built in code."""
    from diffrl_bench.backends.tiny import build_tiny_flux_pipeline

    return str(build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux")))
