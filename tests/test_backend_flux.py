"""The FLUX.1 diffusers backend on tiny random pipelines built in code (no hub): 2x2 latent packing inside the
velocity call, the guidance embedding, LoRA snapshots, LoRA export that the plain FluxPipeline loads, full
fine-tuning, random init, and a Trainer step."""
import pytest
import torch

from diffrl_bench.registry import MODELS
from diffrl_bench.sampling import euler_sample, flow_sigmas

from backend_helpers import PROMPTS, inputs, randomize_theta  # tests/backend_helpers.py
from backend_helpers import make as make_backend


def make(path, **options):
    return make_backend("flux", path, **options)


def test_packing_round_trips_and_matches_the_pipeline():
    from diffusers import FluxPipeline

    from diffrl_bench.backends.flux import latent_image_ids, pack_latents, unpack_latents

    x = torch.randn(2, 16, 6, 8)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), x)
    assert torch.equal(latent_image_ids(6, 8, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


def test_velocity_is_the_packed_transformer_call_with_guidance(tiny_flux):
    from diffrl_bench.backends.flux import latent_image_ids, pack_latents, unpack_latents

    backend = make(tiny_flux, guidance_scale=2.0)
    assert backend.latent_shape == (4, 8, 8) and backend.core.guidance == 2.0
    cond = backend.encode_prompts(PROMPTS)
    embeds, pooled, _ = backend.pipe.encode_prompt(PROMPTS, None, max_sequence_length=16)
    assert torch.equal(cond["prompt_embeds"], embeds) and torch.equal(cond["pooled_prompt_embeds"], pooled)
    assert cond["prompt_embeds"].shape == (3, 16, 32) and cond["pooled_prompt_embeds"].shape == (3, 16)
    randomize_theta(backend)
    x, sigma = inputs(backend)
    with torch.no_grad():
        v = backend.velocity(x, sigma, cond)
        direct = backend.transformer(hidden_states=pack_latents(x), encoder_hidden_states=embeds,
                                     pooled_projections=pooled, timestep=sigma, guidance=torch.full((3,), 2.0),
                                     img_ids=latent_image_ids(8, 8, "cpu", torch.float32),
                                     txt_ids=torch.zeros(16, 3)).sample
        torch.testing.assert_close(v, unpack_latents(direct, 8, 8))
        v_u = backend.velocity(x, sigma, backend.null_condition(3))
        torch.testing.assert_close(backend.velocity(x, sigma, cond, cfg_scale=3.0), v_u + 3.0 * (v - v_u),
                                   rtol=1e-4, atol=1e-5)


def test_lora_snapshots_and_gradients(tiny_flux):
    backend = make(tiny_flux)
    randomize_theta(backend, seed=0)
    backend.add_snapshot("sampler")
    backend.add_snapshot("ref")
    randomize_theta(backend, seed=1)
    x, sigma = inputs(backend)
    cond = backend.encode_prompts(PROMPTS)
    v_theta = backend.velocity(x, sigma, cond)
    v_sampler = backend.velocity(x, sigma, cond, snapshot="sampler")
    v_ref = backend.velocity(x, sigma, cond, snapshot="ref")
    assert (v_theta - v_sampler).abs().max() > 1e-3 and (v_sampler - v_ref).abs().max() > 1e-3
    v_theta.square().mean().backward()
    theta_ids = {id(p) for p in backend.trainable_parameters()}
    for name, p in backend.transformer.named_parameters():
        assert (p.grad is not None) == (id(p) in theta_ids), name
        assert p.requires_grad == (id(p) in theta_ids), name
    backend.update_snapshot("sampler", 0.0)
    with torch.no_grad():
        torch.testing.assert_close(backend.velocity(x, sigma, cond, snapshot="sampler"), v_theta.detach())


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_saved_lora_gives_the_plain_flux_pipeline_the_backends_theta_images(tmp_path, guidance_embeds):
    from diffusers import FluxPipeline

    from diffrl_bench.backends.flux import pack_latents
    from diffrl_bench.backends.tiny import build_tiny_flux_pipeline

    path = str(build_tiny_flux_pipeline(tmp_path / "pipe", guidance_embeds=guidance_embeds))
    backend = make(path)
    randomize_theta(backend, seed=3)
    lora_dir = backend.save_lora(tmp_path / "lora")
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_dir))
    prompts = PROMPTS[:2]
    noise = torch.randn((2, *backend.latent_shape), generator=torch.Generator().manual_seed(7))
    sigmas = flow_sigmas(3, shift=1.0)
    for cfg_scale in (1.0, 2.5):
        images = pipe(prompt=prompts, negative_prompt="" if cfg_scale > 1 else None, true_cfg_scale=cfg_scale,
                      latents=pack_latents(noise.clone()), sigmas=sigmas[:-1].tolist(), num_inference_steps=3,
                      max_sequence_length=16, height=16, width=16, output_type="pt").images
        cond = backend.encode_prompts(prompts)
        with torch.no_grad():
            x0 = euler_sample(lambda x, s: backend.velocity(x, s, cond, cfg_scale=cfg_scale), noise.clone(), sigmas).x0
        torch.testing.assert_close(backend.decode(x0), images, rtol=1e-4, atol=1e-5)


def test_full_finetuning_and_random_init(tiny_flux):
    backend = make(tiny_flux, finetune="full")
    assert len(backend.trainable_parameters()) == len(list(backend.transformer.parameters()))
    backend.add_snapshot("old")
    assert backend.snapshots["old"].guidance == backend.core.guidance == 3.5
    x, sigma = inputs(backend)
    cond = backend.encode_prompts(PROMPTS)
    backend.velocity(x, sigma, cond).square().mean().backward()
    assert all(p.grad is None for p in backend.snapshots["old"].parameters())

    rand = MODELS.get("flux")(path="random:tiny", device="cpu")
    cond = rand.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (3, 8, 32) and cond["pooled_prompt_embeds"].shape == (3, 16)
    with torch.no_grad():
        assert rand.decode(rand.velocity(x, sigma, cond)).shape == (3, 3, 16, 16)


@pytest.mark.slow
def test_text_encoder_dtype_casts_only_the_text_encoders(tiny_flux):
    backend = make(tiny_flux, dtype="float32", text_encoder_dtype="float16")
    assert {p.dtype for p in backend.pipe.text_encoder.parameters()} == {torch.float16}
    assert {p.dtype for p in backend.pipe.text_encoder_2.parameters()} == {torch.float16}
    assert {p.dtype for p in backend.transformer.parameters()} == {torch.float32}
    assert {p.dtype for p in backend.vae.parameters()} == {torch.float32}
    assert backend.encode_prompts(PROMPTS)["prompt_embeds"].dtype == torch.float32


def test_trainer_step_on_the_flux_backend(tiny_flux, tmp_path):
    from diffrl_bench.config import load_config
    from diffrl_bench.train import Trainer

    overrides = ["model.backend=flux", f"model.path={tiny_flux}", f"output_dir={tmp_path / 'run'}", "train.threads=1",
                 "rollout.prompts_per_step=2", "rollout.images_per_prompt=2", "rollout.chunk_size=4",
                 "rollout.sampler.num_steps=2", "eval.every=-1", "train.micro_batch_size=4",
                 "algo.num_train_times=1", "reward.components.test_brightness=1.0", "optim.lr=1e-2",
                 "checkpoint.every=0"]
    trainer = Trainer(load_config("toy_nft", overrides), progress=False)
    theta0 = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    row = trainer.rl_step()
    trainer.reward.close()
    assert row["train/grad_norm"] > 0 and row["cost/images"] == 4
    assert any((p - q).abs().max() > 0 for p, q in zip(trainer.policy.trainable_parameters(), theta0))
    assert trainer.policy.lora.active() == "default"
