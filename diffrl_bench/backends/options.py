"""The options of the diffusers backends (`model.options`): one dataclass, its checks, and the merge of a config's
dict with constructor keyword arguments."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional

import torch

from diffrl_bench.backends.lora import DEFAULT_TARGETS, LORA_INITS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""the names the dtype options accept"""


@dataclass
class BackendOptions:
    """Options of the diffusers backends (`model.options` in a run config, or keyword arguments).

    Each field's docstring says what it sets, in which unit, and why its default is what it is. Defaults follow
    the originals' shared setup (METHODS.md, "Shared defaults": SD3.5-M, LoRA, 512 px) or the pipelines' own
    defaults, so that an empty `model.options` reproduces them.
    """

    finetune: str = "lora"
    """What trains. `lora`: theta is a peft LoRA adapter, snapshots are extra adapters, `ref` is the adapter-free
    base; `full`: every transformer weight trains, snapshots are frozen copies of the transformer (snapshots.py).
    Default `lora`: what every original trains, and a snapshot then costs megabytes instead of a model copy."""
    lora_rank: int = 32
    """LoRA rank r (the inner dimension of each adapter's A and B). Default: METHODS.md's shared 32."""
    lora_alpha: float = 64.0
    """LoRA alpha; the adapter's update is scaled by alpha / r. Default: METHODS.md's shared 64 (scale 2)."""
    lora_targets: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Names (suffixes) of the transformer's linear modules that get LoRA. Default: METHODS.md's shared list, the
    joint-attention projections of both streams (`lora.DEFAULT_TARGETS`)."""
    lora_init: str = "default"
    """Initialisation of the adapters' A (B is always zero, so theta starts at the base): `default` (peft's
    Kaiming-uniform) or `gaussian` (N(0, 1/r), the originals' `init_lora_weights="gaussian"`). Default `default`:
    what earlier runs used; the SD3.5 presets set `gaussian` (docs/presets.md)."""
    dtype: str = "auto"
    """Dtype of the weights that do not train (base transformer under LoRA, text encoders, VAE, full-FT `ref`):
    `auto`, `float32`, `bfloat16`, `float16`. Default `auto`: bfloat16 on CUDA (the originals' precision, half the
    memory), float32 on CPU (where bfloat16 matmuls are slow)."""
    text_encoder_dtype: str = ""
    """Dtype of the text encoders alone: `float32`, `bfloat16`, `float16`, or "" (default) for `dtype`'s. Flow-GRPO,
    DiffusionNFT and AWM cast only the text encoders to their mixed-precision dtype (fp16) and keep the frozen
    transformer and the VAE in fp32 (e.g. flow_grpo scripts/train_sd3.py:409-415). Prompt embeddings are still
    handed to the transformer in `dtype`. Ignored by random-init presets, which have no text encoders."""
    trainable_dtype: str = "float32"
    """Dtype of the trained weights (LoRA adapters, or the whole transformer under full fine-tuning) and of their
    moving snapshots. Default float32: optimizer updates and soft updates (`d` near 1) would round away in 16 bits;
    bf16 compute comes from autocast (`train.mixed_precision`), not from these weights."""
    resolution: int = 0
    """Image height = width, in pixels; a multiple of the VAE factor times the patch size. Default 0: the model's
    native size (SD3: `sample_size` x VAE factor, FLUX: the VAE's `sample_size`; random presets: theirs)."""
    max_sequence_length: int = 0
    """T5 tokens per prompt. Default 0: the pipeline's own default (SD3 256, FLUX 512), capped by the T5
    tokenizer's limit, so prompts are encoded exactly as the plain pipeline encodes them."""
    gradient_checkpointing: bool = False
    """Recompute the transformer blocks' activations in backward (diffusers' checkpointing): less memory, about
    one more forward's time. Default off, as in diffusers: turn it on when activations do not fit."""
    guidance_scale: float = 3.5
    """FLUX guidance-distilled models (FLUX.1-dev) only: the value fed to the guidance embedding (unitless,
    not CFG). Default 3.5: FluxPipeline's default."""
    decode_batch_size: int = 8
    """Images per VAE decode / encode call. Bounds the VAE's activation memory, which at 512-1024 px dominates
    decoding; results do not depend on it. Default 8: a moderate chunk; lower it if decoding runs out of memory."""
    encode_batch_size: int = 32
    """Prompts per text-encoder call; results do not depend on it. Default 32: a rollout's distinct prompts
    (METHODS.md: 48 per epoch) in two calls, with modest text-encoder activation memory."""
    cache_prompts: bool = True
    """Keep each prompt's embeddings on the device after its first encoding. Default on: prompt sets are small
    (an SD3 prompt's embeddings are under 3 MB in bf16), and every epoch samples the same prompts again, which
    would otherwise run the text encoders (T5-XXL among them) again."""
    random_init: str = ""
    """Name of a preset architecture (presets.py) to build with random weights and no text encoders (same as
    `model.path: random:<preset>`), for throughput and memory runs. Default "": load `model.path`."""
    init_seed: int = 0
    """Seed of the random-init weights and random prompt embeddings; a resume rebuilds the same base from it.
    Default 0: any fixed value works, it only has to be the same across resumes and processes."""

    def validate(self) -> None:
        if self.finetune not in ("lora", "full"):
            raise ValueError(f"option finetune={self.finetune!r} is not 'lora' or 'full'")
        for key in ("dtype", "trainable_dtype"):
            value = getattr(self, key)
            if value not in DTYPES and not (key == "dtype" and value == "auto"):
                raise ValueError(f"option {key}={value!r} is not one of {['auto', *DTYPES] if key == 'dtype' else list(DTYPES)}")
        if self.text_encoder_dtype and self.text_encoder_dtype not in DTYPES:
            raise ValueError(f"option text_encoder_dtype={self.text_encoder_dtype!r} is not one of "
                             f"{['', *DTYPES]} ('': the `dtype` option's)")
        if self.lora_init not in LORA_INITS:
            raise ValueError(f"option lora_init={self.lora_init!r} is not one of {sorted(LORA_INITS)}")
        if self.lora_rank < 1:
            raise ValueError("option lora_rank must be at least 1")
        for key in ("resolution", "max_sequence_length"):
            if getattr(self, key) < 0:
                raise ValueError(f"option {key} must be non-negative (0: the model's default)")
        for key in ("decode_batch_size", "encode_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"option {key} must be at least 1")


def parse_options(options: Optional[Mapping[str, Any]], kwargs: Mapping[str, Any]) -> BackendOptions:
    merged = {**dict(options or {}), **dict(kwargs)}
    known = {f.name for f in dataclasses.fields(BackendOptions)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ValueError(f"unknown diffusers backend option(s) {unknown}; known: {sorted(known)}")
    if "lora_targets" in merged:
        merged["lora_targets"] = list(merged["lora_targets"])
    opts = BackendOptions(**merged)
    opts.validate()
    return opts
