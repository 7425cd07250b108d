"""Stable Diffusion 3 / 3.5 as a policy backend (`model.backend: sd3`).

The components of a `StableDiffusion3Pipeline` (local directory or hub id in `model.path`): prompts are encoded
with the pipeline's own three text encoders (CLIP-L, CLIP-G, T5), the `SD3Transformer2DModel` gives the velocity,
the VAE decodes. `model.path: random:sd35m` builds an SD3.5-Medium-sized transformer with random weights and no
text encoders, for throughput and memory benchmarks (see presets.py). Options: `BackendOptions`.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from diffrl_bench.backends.diffusers_policy import DiffusersFlowPolicy, VelocityModule
from diffrl_bench.backends.presets import SD3_PRESETS
from diffrl_bench.registry import MODELS


class SD3Velocity(VelocityModule):
    """The SD3 transformer as `v = module(x, sigma, cond)`: timestep 1000 sigma, the condition's CLIP+T5
    sequence and pooled CLIP embeddings, output used as `eps - x0` unchanged."""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.compute_dtype
        # The pipeline feeds the scheduler's float32 timesteps, sigma * 1000; the network predicts eps - x0 as is.
        timestep = sigma.to(device=x.device, dtype=torch.float32).expand(x.shape[0]) * 1000.0
        out = self.transformer(hidden_states=x.to(dtype), encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                               pooled_projections=cond["pooled_prompt_embeds"].to(dtype), timestep=timestep,
                               return_dict=False)[0]
        return out.to(x.dtype)


@MODELS.register("sd3")
class SD3Backend(DiffusersFlowPolicy):
    """SD3 / SD3.5 (StableDiffusion3Pipeline dir or hub id, or random:sd35m|tiny); LoRA (default) or full FT."""

    backend_name = "sd3"
    presets = SD3_PRESETS
    velocity_module_class = SD3Velocity
    pipeline_class_name = "StableDiffusion3Pipeline"
    transformer_class_name = "SD3Transformer2DModel"
    default_max_sequence_length = 256  # StableDiffusion3Pipeline's default
    t5_tokenizer = "tokenizer_3"

    def _encode_text(self, prompts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return embeds, pooled

    def _native_resolution(self, transformer) -> int:
        # The pipeline's default size: sample_size latents times the VAE's downsampling.
        return int(transformer.config.sample_size) * self.vae_scale_factor

    def _patch_multiple(self, transformer) -> int:
        return int(transformer.config.patch_size)
