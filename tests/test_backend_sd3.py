"""The SD3 / SD3.5 diffusers backend on a tiny random pipeline built in code (no hub): loading, prompt encoding,
velocity with and without CFG, rollouts, LoRA snapshots (switching, gradients, soft updates, checkpoint state),
LoRA export that the plain StableDiffusion3Pipeline loads, full fine-tuning, random init, and a Trainer run."""
import pytest
import torch

from diffrl_bench.models import THETA
from diffrl_bench.registry import MODELS
from diffrl_bench.sampling import euler_sample, flow_sigmas

from backend_helpers import PROMPTS, inputs, randomize_theta  # tests/backend_helpers.py
from backend_helpers import make as make_backend


def make(path, **options):
    return make_backend("sd3", path, **options)


def test_loads_and_encodes_prompts_like_the_pipeline(tiny_sd3):
    backend = make(tiny_sd3)
    assert backend.latent_shape == (4, 8, 8) and backend.resolution == 16
    cond = backend.encode_prompts(PROMPTS)
    # 77 CLIP tokens then T5's 16 (the tiny tokenizer's limit caps the default 256), width = joint_attention_dim.
    assert cond["prompt_embeds"].shape == (3, 77 + 16, 32) and cond["pooled_prompt_embeds"].shape == (3, 32)
    embeds, _, pooled, _ = backend.pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=16)
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    null = backend.null_condition(2)
    assert torch.equal(null["prompt_embeds"][1], cond["prompt_embeds"][2])
    assert set(backend._prompt_cache) == set(PROMPTS)


def test_velocity_is_the_transformer_output_and_cfg_combines_two_branches(tiny_sd3):
    backend = make(tiny_sd3)
    randomize_theta(backend)
    x, sigma = inputs(backend)
    cond = backend.encode_prompts(PROMPTS)
    with torch.no_grad():
        v = backend.velocity(x, sigma, cond)
        direct = backend.transformer(hidden_states=x, encoder_hidden_states=cond["prompt_embeds"],
                                     pooled_projections=cond["pooled_prompt_embeds"], timestep=sigma * 1000).sample
        torch.testing.assert_close(v, direct)
        null = backend.null_condition(3)
        v_u = backend.velocity(x, sigma, null)
        v_cfg = backend.velocity(x, sigma, cond, cfg_scale=4.5)
    torch.testing.assert_close(v_cfg, v_u + 4.5 * (v - v_u), rtol=1e-4, atol=1e-5)


def test_lora_snapshots_switch_adapters_and_gradients_reach_only_theta(tiny_sd3):
    backend = make(tiny_sd3)
    assert backend.options.lora_rank == 32 and backend.lora.config.lora_alpha == 64
    randomize_theta(backend, seed=0)
    for name in ("old", "ema", "ref"):
        backend.add_snapshot(name)
    assert backend.snapshot_names() == ["old", "ema", "ref"]
    randomize_theta(backend, seed=1)  # theta moves away from its copies
    x, sigma = inputs(backend)
    cond = backend.encode_prompts(PROMPTS)
    from diffusers import SD3Transformer2DModel

    base = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")  # fresh, adapter-free
    with torch.no_grad():
        v_base = base(hidden_states=x, encoder_hidden_states=cond["prompt_embeds"],
                      pooled_projections=cond["pooled_prompt_embeds"], timestep=sigma * 1000).sample

    v_theta = backend.velocity(x, sigma, cond)  # with gradients, before the snapshot calls
    v = {s: backend.velocity(x, sigma, cond, snapshot=s) for s in ("old", "ema", "ref")}
    assert backend.lora.active() == "default"
    torch.testing.assert_close(v["ref"], v_base, rtol=0, atol=0)
    torch.testing.assert_close(v["old"], v["ema"], rtol=0, atol=0)
    assert (v["old"] - v_theta).abs().max() > 1e-3 and (v["old"] - v_base).abs().max() > 1e-3
    assert not any(t.requires_grad for t in v.values()) and v_theta.requires_grad

    # Flags after switching: theta's adapter trainable, the snapshots' adapters and the base frozen.
    theta_ids = {id(p) for p in backend.trainable_parameters()}
    for p in backend.transformer.parameters():
        assert p.requires_grad == (id(p) in theta_ids)
    v_theta.square().mean().backward()  # backward after the snapshot calls still reaches theta
    for name, p in backend.transformer.named_parameters():
        if id(p) in theta_ids:
            assert p.grad is not None
        else:
            assert p.grad is None, name
    grad_after_switching = torch.cat([p.grad.flatten() for p in backend.trainable_parameters()])
    assert grad_after_switching.abs().max() > 0
    backend.transformer.zero_grad(set_to_none=True)
    backend.velocity(x, sigma, cond).square().mean().backward()
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in backend.trainable_parameters()]),
                               grad_after_switching)

    # Soft update on adapter weights; ref cannot move.
    old, theta = backend.lora.params("old"), backend.lora.params()
    before = {k: p.detach().clone() for k, p in old.items()}
    backend.update_snapshot("old", 0.3)
    for k, p in old.items():
        torch.testing.assert_close(p, 0.3 * before[k] + 0.7 * theta[k].detach())
    backend.update_snapshot("ema", 0.0)
    with torch.no_grad():
        torch.testing.assert_close(backend.velocity(x, sigma, cond, snapshot="ema"), backend.velocity(x, sigma, cond))
    with pytest.raises(ValueError, match="ref"):
        backend.update_snapshot("ref", 0.5)
    with pytest.raises(KeyError, match="sampler"):
        backend.velocity(x, sigma, cond, snapshot="sampler")


def test_saved_lora_gives_the_plain_pipeline_the_backends_theta_images(tiny_sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    backend = make(tiny_sd3)
    randomize_theta(backend, seed=3)
    backend.add_snapshot("ref")
    lora_dir = backend.save_lora(tmp_path / "lora")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_dir))
    prompts = PROMPTS[:2]
    noise = torch.randn((2, *backend.latent_shape), generator=torch.Generator().manual_seed(7))
    sigmas = flow_sigmas(3, shift=3.0)  # the pipeline scheduler's grid (shift 3)
    for cfg_scale in (1.0, 2.5):
        images = pipe(prompt=prompts, latents=noise.clone(), num_inference_steps=3, guidance_scale=cfg_scale,
                      max_sequence_length=16, height=16, width=16, output_type="pt").images
        cond = backend.encode_prompts(prompts)
        with torch.no_grad():
            x0 = euler_sample(lambda x, s: backend.velocity(x, s, cond, cfg_scale=cfg_scale), noise.clone(), sigmas).x0
            ours = backend.decode(x0)
        torch.testing.assert_close(ours, images, rtol=1e-4, atol=1e-5)
    # Sanity: the adapter matters, i.e. the base (ref) gives different images.
    with torch.no_grad():
        x0_ref = euler_sample(lambda x, s: backend.velocity(x, s, cond, snapshot="ref"), noise.clone(), sigmas).x0
    assert (backend.decode(x0_ref) - images).abs().max() > 1e-3


def test_checkpoint_state_holds_only_adapters_and_restores_every_snapshot(tiny_sd3):
    a = make(tiny_sd3)
    randomize_theta(a, seed=4)
    for name in ("old", "ref"):
        a.add_snapshot(name)
    randomize_theta(a, seed=5)
    model_state, snapshots = a.core.state_dict(), a.snapshot_state_dict()
    assert model_state and all(".lora_A.default." in k or ".lora_B.default." in k for k in model_state)
    assert len(model_state) == len(a.trainable_parameters())
    assert snapshots and all(k.startswith("old/") for k in snapshots)

    b = make(tiny_sd3)
    for name in ("old", "ref"):
        b.add_snapshot(name)
    b.core.load_state_dict(model_state)
    b.load_snapshot_state_dict(snapshots)
    x, sigma = inputs(a)
    cond = a.encode_prompts(PROMPTS)
    with torch.no_grad():
        for s in (THETA, "old", "ref"):
            torch.testing.assert_close(b.velocity(x, sigma, cond, snapshot=s), a.velocity(x, sigma, cond, snapshot=s),
                                       rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="missing"):
        b.core.load_state_dict({})


def test_full_finetuning_trains_every_weight_with_frozen_copies(tiny_sd3):
    backend = make(tiny_sd3, finetune="full")
    n_params = sum(p.numel() for p in backend.transformer.parameters())
    assert sum(p.numel() for p in backend.trainable_parameters()) == n_params
    backend.add_snapshot("old")
    backend.add_snapshot("ref")
    x, sigma = inputs(backend)
    cond = backend.encode_prompts(PROMPTS)
    with torch.no_grad():
        for p in backend.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    v_theta = backend.velocity(x, sigma, cond)
    v_old = backend.velocity(x, sigma, cond, snapshot="old")
    assert not v_old.requires_grad and (v_theta - v_old).abs().max() > 1e-4
    v_theta.square().mean().backward()
    assert all(p.grad is None for p in backend.snapshots["old"].parameters())
    backend.update_snapshot("old", 0.0)
    with torch.no_grad():
        torch.testing.assert_close(backend.velocity(x, sigma, cond, snapshot="old"), v_theta.detach())
    assert "ref/transformer.pos_embed.proj.weight" in backend.snapshot_state_dict()
    with pytest.raises(RuntimeError, match="lora"):
        backend.save_lora("unused")


def test_gradient_checkpointing_gives_the_same_gradients_after_snapshot_calls(tiny_sd3):
    """The recompute in backward runs with whatever adapter is active then: it must be theta's."""
    grads = {}
    for checkpointing in (False, True):
        backend = make(tiny_sd3, gradient_checkpointing=checkpointing)
        randomize_theta(backend, seed=0)
        backend.add_snapshot("old")
        backend.add_snapshot("ref")
        randomize_theta(backend, seed=1)
        x, sigma = inputs(backend)
        cond = backend.encode_prompts(PROMPTS)
        v_theta = backend.velocity(x, sigma, cond)
        v_old = backend.velocity(x, sigma, cond, snapshot="old")
        v_ref = backend.velocity(x, sigma, cond, snapshot="ref")
        ((v_theta - v_old) ** 2 + (v_theta - v_ref) ** 2).mean().backward()
        grads[checkpointing] = torch.cat([p.grad.flatten() for p in backend.trainable_parameters()])
    assert backend.transformer.gradient_checkpointing
    torch.testing.assert_close(grads[True], grads[False])


def test_full_finetuning_keeps_ref_in_the_frozen_dtype(tiny_sd3):
    backend = make(tiny_sd3, finetune="full", dtype="bfloat16")
    backend.add_snapshot("old")
    backend.add_snapshot("ref")
    assert next(backend.transformer.parameters()).dtype == torch.float32
    assert next(backend.snapshots["old"].parameters()).dtype == torch.float32
    assert next(backend.snapshots["ref"].parameters()).dtype == torch.bfloat16
    x, sigma = inputs(backend)
    cond = backend.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].dtype == torch.bfloat16
    with torch.no_grad():
        v_theta, v_ref = backend.velocity(x, sigma, cond), backend.velocity(x, sigma, cond, snapshot="ref")
    assert v_ref.dtype == torch.float32
    torch.testing.assert_close(v_ref, v_theta, rtol=0.1, atol=0.1)  # the same weights, rounded to bf16


def test_text_encoder_dtype_casts_only_the_text_encoders(tiny_sd3):
    # The originals' split (flow_grpo scripts/train_sd3.py:409-415): fp16 text encoders, fp32 transformer and VAE.
    backend = make(tiny_sd3, dtype="float32", text_encoder_dtype="float16")
    pipe = backend.pipe
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.float16}, name
    assert {p.dtype for p in backend.transformer.parameters()} == {torch.float32}
    assert {p.dtype for p in backend.vae.parameters()} == {torch.float32}
    cond = backend.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].dtype == torch.float32  # handed to the transformer in `dtype`
    reference = make(tiny_sd3, dtype="float32").encode_prompts(PROMPTS)
    # the fp16 encoders ran: the same numbers to half precision, but rounded (not the fp32 encoders' bits)
    for key in cond:
        torch.testing.assert_close(cond[key], reference[key], rtol=2e-2, atol=2e-2)
        assert not torch.equal(cond[key], reference[key])
    # default: the text encoders follow `dtype`
    assert next(make(tiny_sd3, dtype="bfloat16").pipe.text_encoder.parameters()).dtype == torch.bfloat16


def test_random_init_needs_no_files_and_is_deterministic():
    a = MODELS.get("sd3")(path="random:tiny", device="cpu")
    b = MODELS.get("sd3")(path="random:tiny", device="cpu")
    assert a.latent_shape == (4, 8, 8)
    cond = a.encode_prompts(["a red circle", "", "a red circle"])
    assert cond["prompt_embeds"].shape == (3, 8 + 8, 32) and cond["pooled_prompt_embeds"].shape == (3, 32)
    assert torch.equal(cond["prompt_embeds"][0], cond["prompt_embeds"][2])
    assert not torch.equal(cond["prompt_embeds"][0], cond["prompt_embeds"][1])
    x, sigma = inputs(a)
    with torch.no_grad():
        torch.testing.assert_close(a.velocity(x, sigma, cond), b.velocity(x, sigma, b.encode_prompts(
            ["a red circle", "", "a red circle"])), rtol=0, atol=0)
    images = a.decode(x)
    assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1


def test_options_are_validated(tiny_sd3):
    with pytest.raises(ValueError, match="lora_rnak"):
        make(tiny_sd3, lora_rnak=4)
    with pytest.raises(ValueError, match="finetune"):
        make(tiny_sd3, finetune="partial")
    with pytest.raises(ValueError, match="option text_encoder_dtype='half' is not one of"):
        make(tiny_sd3, text_encoder_dtype="half")
    with pytest.raises(ValueError, match="multiple of 4"):
        make(tiny_sd3, resolution=18)
    assert make(tiny_sd3, resolution=32, lora_rank=4).latent_shape == (4, 16, 16)


@pytest.mark.slow
def test_trainer_runs_nft_on_the_sd3_backend_and_resumes(tiny_sd3, tmp_path):
    from diffrl_bench.config import load_config
    from diffrl_bench.train import Trainer

    out = tmp_path / "run"
    overrides = ["model.backend=sd3", f"model.path={tiny_sd3}", f"output_dir={out}", "train.threads=1",
                 "rollout.prompts_per_step=2", "rollout.images_per_prompt=4", "rollout.chunk_size=4",
                 "rollout.sampler.num_steps=3", "rollout.sampler.shift=3.0", "eval.sampler.num_steps=2",
                 "eval.images_per_prompt=1", "eval.every=-1", "train.micro_batch_size=4", "algo.num_train_times=2",
                 "reward.components.test_brightness=1.0", "train.steps=2", "optim.lr=1e-2",
                 "algo.old_decay=crd_old", "checkpoint.every=1"]
    trainer = Trainer(load_config("toy_nft", overrides), progress=False)
    policy = trainer.policy
    assert policy.snapshot_names() == ["old", "ref"]
    x, sigma = inputs(policy, n=2)
    cond = policy.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        v_ref_before = policy.velocity(x, sigma, cond, snapshot="ref")
    theta0 = {k: p.detach().clone() for k, p in policy.lora.params().items()}

    trainer.rl_step()
    old_before = {k: p.detach().clone() for k, p in policy.lora.params("old").items()}
    row = trainer.rl_step()
    assert row["train/grad_norm"] > 0
    theta = policy.lora.params()
    assert max((theta[k] - theta0[k]).abs().max().item() for k in theta) > 1e-4
    decay = trainer.algo.snapshots["old"](2)
    assert row["train/decay_old"] == pytest.approx(decay)
    for k, p in policy.lora.params("old").items():
        torch.testing.assert_close(p, decay * old_before[k] + (1 - decay) * theta[k].detach())
    with torch.no_grad():
        torch.testing.assert_close(policy.velocity(x, sigma, cond, snapshot="ref"), v_ref_before, rtol=0, atol=0)
    # The ledger's FLOPs: the transformer's calls plus the VAE decoder's (a real network here, unlike the toy's).
    meter, shape = trainer.flop_meter, (1, *policy.latent_shape)
    decode = meter.decode_flops(shape)
    assert decode > 0 and meter.measurements == 2  # one forward shape, one decode shape: cached after that
    assert trainer.ledger.flops["rollout"] == (trainer.ledger.nfe["rollout"] * meter.per_sample_forward(shape, cond)
                                               + 2 * 8 * decode)  # 2 steps x 8 images
    trainer.save()
    trainer.reward.close()
    trainer.release_run_dir()  # the run directory's lock, which run() releases when a run ends

    resumed = Trainer(load_config("toy_nft", overrides), progress=False)
    assert resumed.step == 2 and resumed.ledger.flops == trainer.ledger.flops
    for adapter in ("default", "old"):
        for k, p in resumed.policy.lora.params(adapter).items():
            assert torch.equal(p, policy.lora.params(adapter)[k]), (adapter, k)
    assert resumed.policy.lora.active() == "default"
    resumed.reward.close()
    resumed.release_run_dir()
