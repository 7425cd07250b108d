"""FLUX.1 as a policy backend (`model.backend: flux`).

The components of a `FluxPipeline` (local directory or hub id in `model.path`): CLIP gives the pooled embedding,
T5 the sequence, `FluxTransformer2DModel` the velocity, the VAE decodes. FLUX works on 2x2-packed latent tokens;
the harness keeps latents as (B, C, H, W) and the packing happens inside the velocity call, so samplers and
losses see the same layout as with SD3. The transformer takes the time as sigma in [0, 1] (the pipeline divides
its 0-1000 timesteps by 1000) and, for guidance-distilled FLUX.1-dev, a guidance value (`guidance_scale` option).
`model.path: random:flux1-dev` (or `random:flux1-schnell`) builds the 12B transformer with random weights.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from diffrl_bench.backends.diffusers_policy import DiffusersFlowPolicy, VelocityModule
from diffrl_bench.backends.presets import FLUX_PRESETS
from diffrl_bench.registry import MODELS


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), FluxPipeline's token layout."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for a latent of `height` x `width`."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """Rotary position ids of the packed tokens: (row, column) on axes 1 and 2, as FluxPipeline builds them."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxVelocity(VelocityModule):
    """The FLUX transformer as `v = module(x, sigma, cond)`: packs (B, C, H, W) latents into 2x2 tokens and
    back around the call, with sigma itself as the timestep and, for guidance-distilled models, `guidance`."""

    guidance: Optional[float] = None
    """the guidance embedding's input (the `guidance_scale` option) when the model has one; None: not fed"""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.compute_dtype
        b, _, h, w = x.shape
        embeds = cond["prompt_embeds"].to(dtype)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((b,), float(self.guidance), device=x.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=pack_latents(x.to(dtype)), encoder_hidden_states=embeds,
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            timestep=sigma.to(device=x.device, dtype=dtype).expand(b), guidance=guidance,
            img_ids=latent_image_ids(h, w, x.device, dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dtype), return_dict=False)[0]
        return unpack_latents(out, h, w).to(x.dtype)


@MODELS.register("flux")
class FluxBackend(DiffusersFlowPolicy):
    """FLUX.1 (FluxPipeline dir or hub id, or random:flux1-dev|flux1-schnell|tiny); LoRA (default) or full FT."""

    backend_name = "flux"
    presets = FLUX_PRESETS
    velocity_module_class = FluxVelocity
    pipeline_class_name = "FluxPipeline"
    transformer_class_name = "FluxTransformer2DModel"
    default_max_sequence_length = 512  # FluxPipeline's default
    t5_tokenizer = "tokenizer_2"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.transformer.config.guidance_embeds:
            # Full fine-tuning snapshots are deep copies of this module made later, so they inherit it.
            self.core.guidance = self.options.guidance_scale

    def _encode_text(self, prompts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                    num_images_per_prompt=1,
                                                    max_sequence_length=self.max_sequence_length)
        return embeds, pooled

    def _native_resolution(self, transformer) -> int:
        # FluxPipeline's default is 128 latents x 8 = 1024 px; the VAE's config carries the same number and also
        # scales down to tiny test pipelines.
        return int(self.vae.config.sample_size)

    def _patch_multiple(self, transformer) -> int:
        return 2  # the 2x2 packing
