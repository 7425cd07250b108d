"""What the SD3 and FLUX backends share: loading, the prompt-embedding cache, classifier-free guidance, VAE
decode, checkpoint state, and the snapshot operations (done by the fine-tuning mode's strategy, snapshots.py).

A backend subclass says how to load its pipeline, how to encode text, and how one transformer call turns
`(x, sigma, cond)` into the project's velocity (`VelocityModule.forward`). Conventions (METHODS.md): sigma in [0, 1],
`x_t = (1 - sigma) x0 + sigma eps`, the network predicts `v = eps - x0`; latents are (B, C, H, W).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from diffrl_bench.models import THETA, SnapshotPolicy
from diffrl_bench.backends.lora import LoraSnapshots, make_lora_config
from diffrl_bench.backends.options import DTYPES, BackendOptions, parse_options
from diffrl_bench.backends.presets import Preset, RandomTextEmbedder, get_preset, seeded_build
from diffrl_bench.backends.snapshots import REF, AdapterSnapshots, ParameterCopies

log = logging.getLogger("diffrl_bench")

RANDOM_PREFIX = "random:"


def _dtype_keyword() -> str:
    """diffusers renamed `torch_dtype` to `dtype` (the old name warns); older releases know only the old one."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


class VelocityModule(nn.Module):
    """theta's network as the harness calls it, `v = module(x, sigma, cond)`: the module the Trainer prepares
    (accelerate / DDP) and checkpoints.

    Under LoRA its `state_dict` holds only theta's adapter: the base weights are frozen and come from
    `model.path` (or the seeded random init), so a checkpoint is megabytes, not gigabytes. Loading checks that
    exactly those tensors are present.
    """

    def __init__(self, transformer: nn.Module, compute_dtype: torch.dtype):
        super().__init__()
        self.transformer = transformer
        self.compute_dtype = compute_dtype
        self.persistent: Optional[set] = None  # parameter names kept in state_dict; None: all

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        if args:
            raise TypeError("pass state_dict arguments by keyword")
        full = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        if self.persistent is not None:
            full = OrderedDict((k, v) for k, v in full.items() if k[len(prefix):] in self.persistent)
        if destination is None:
            return full
        destination.update(full)
        return destination

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.persistent is None:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        missing = sorted(self.persistent - set(state_dict))
        unexpected = sorted(set(state_dict) - self.persistent)
        if strict and (missing or unexpected):
            raise RuntimeError(f"LoRA state mismatch: missing {missing[:3]} ({len(missing)}), "
                               f"unexpected {unexpected[:3]} ({len(unexpected)})")
        return super().load_state_dict(state_dict, strict=False, assign=assign)


class DiffusersFlowPolicy(SnapshotPolicy):
    """Base of the diffusers backends; subclasses fill in the class attributes and the `_`-methods below."""

    # LoRA snapshots switch adapters on one transformer (recompiles under torch.compile's guards), and compiling a
    # 2.5-12B transformer was not measured here: `train.compile` leaves these backends eager.
    supports_compile = False

    backend_name = "?"
    presets: Dict[str, Preset] = {}
    velocity_module_class = VelocityModule
    default_max_sequence_length = 256
    """T5 tokens when the `max_sequence_length` option is 0: the pipeline's own `encode_prompt` default"""
    t5_tokenizer = ""
    """the pipeline attribute holding the T5 tokenizer, whose `model_max_length` caps the default length"""

    def __init__(self, path: str = "", device: str | torch.device = "cpu", options: Optional[Mapping] = None,
                 **kwargs):
        opts = parse_options(options, kwargs)
        self.options: BackendOptions = opts
        device = torch.device(device)
        frozen = DTYPES["bfloat16" if device.type == "cuda" else "float32"] if opts.dtype == "auto" else DTYPES[opts.dtype]
        trainable = DTYPES[opts.trainable_dtype]
        transformer_dtype = frozen if opts.finetune == "lora" else trainable
        self.frozen_dtype = frozen
        self.pipe = None
        self.vae = None
        self.random_text: Optional[RandomTextEmbedder] = None

        path = str(path or "")
        preset_name = opts.random_init or (path[len(RANDOM_PREFIX):] if path.startswith(RANDOM_PREFIX) else "")
        if preset_name:
            preset = get_preset(self.presets, preset_name, self.backend_name)
            transformer = self._build_random(preset, opts.init_seed, device, transformer_dtype)
            self.vae = seeded_build(lambda: self._vae_class()(**preset.vae), opts.init_seed + 1, device, frozen)
            seq = opts.max_sequence_length or preset.t5_tokens
            self.max_sequence_length = seq
            self.random_text = RandomTextEmbedder(preset.clip_tokens + seq, preset.text_dim, preset.pooled_dim,
                                                  seed=opts.init_seed)
            native = preset.resolution
            self.source = f"{RANDOM_PREFIX}{preset_name}"
        else:
            if not path:
                raise ValueError(f"the {self.backend_name} backend needs model.path: a pipeline directory or hub id "
                                 f"(or random:<preset>, presets: {sorted(self.presets)})")
            text_dtype = DTYPES[opts.text_encoder_dtype] if opts.text_encoder_dtype else None
            transformer, self.pipe = self._load(path, device, frozen, transformer_dtype, text_dtype)
            self.vae = self.pipe.vae
            self.max_sequence_length = opts.max_sequence_length or self._default_sequence_length()
            native = self._native_resolution(transformer)
            self.source = path
        if self.vae is not None:
            self.vae.requires_grad_(False).eval()

        transformer.to(device).eval()
        if opts.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        core = self.velocity_module_class(transformer, transformer_dtype)
        super().__init__(core)
        self.finetuning: AdapterSnapshots | ParameterCopies
        if opts.finetune == "lora":
            config = make_lora_config(opts.lora_rank, opts.lora_alpha, opts.lora_targets, opts.lora_init)
            self.finetuning = AdapterSnapshots(self, config, trainable)
        else:
            self.finetuning = ParameterCopies(self)

        self.resolution = opts.resolution or native
        factor = self.vae_scale_factor * self._patch_multiple(transformer)
        if self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} must be a multiple of {factor} for this model")
        side = self.resolution // self.vae_scale_factor
        self.latent_shape: Tuple[int, ...] = (self._latent_channels(transformer), side, side)
        self._prompt_cache: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        log.info("%s backend: %s, %s fine-tuning, %d px, %d trainable of %d transformer parameters",
                 self.backend_name, self.source, opts.finetune, self.resolution,
                 sum(p.numel() for p in self.trainable_parameters()),
                 sum(p.numel() for p in transformer.parameters()))

    # ------------------------------------------------------------------------------- subclass responsibilities
    pipeline_class_name = ""
    transformer_class_name = ""

    def _pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def _transformer_class(self):
        import diffusers

        return getattr(diffusers, self.transformer_class_name)

    @staticmethod
    def _vae_class():
        from diffusers import AutoencoderKL

        return AutoencoderKL

    def _encode_text(self, prompts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _native_resolution(self, transformer) -> int:  # pragma: no cover
        raise NotImplementedError

    def _patch_multiple(self, transformer) -> int:
        return 1

    def _latent_channels(self, transformer) -> int:
        return int(self.vae.config.latent_channels) if self.vae is not None else int(transformer.config.in_channels)

    def _default_sequence_length(self) -> int:
        """The pipeline's default T5 length, capped by its T5 tokenizer's limit (a tokenizer may allow fewer)."""
        tokenizer = getattr(self.pipe, self.t5_tokenizer, None)
        limit = getattr(tokenizer, "model_max_length", None) or self.default_max_sequence_length
        return min(self.default_max_sequence_length, int(limit))

    # --------------------------------------------------------------------------------------------- loading
    TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def _load(self, path: str, device: torch.device, frozen: torch.dtype, transformer_dtype: torch.dtype,
              text_dtype: Optional[torch.dtype] = None):
        """The transformer in its training dtype, and the pipeline (text encoders, tokenizers, VAE) around it, in
        `frozen`; with `text_dtype`, the text encoders are then cast whole to it, as the originals' `.to(dtype=)`
        (which also casts the modules transformers keeps in fp32 on a half-precision load, e.g. T5's `wo`)."""
        key = _dtype_keyword()
        transformer = self._transformer_class().from_pretrained(path, subfolder="transformer",
                                                                **{key: transformer_dtype})
        pipe = self._pipeline_class().from_pretrained(path, transformer=transformer, **{key: frozen})
        for name in (*self.TEXT_ENCODERS, "vae"):
            module = getattr(pipe, name, None)
            if module is not None:
                cast = {"dtype": text_dtype} if text_dtype is not None and name in self.TEXT_ENCODERS else {}
                module.to(device, **cast).requires_grad_(False).eval()
        pipe.set_progress_bar_config(disable=True)
        return transformer, pipe

    def _build_random(self, preset: Preset, seed: int, device: torch.device, dtype: torch.dtype):
        cls = self._transformer_class()
        return seeded_build(lambda: cls(**preset.transformer), seed, device, dtype)

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 8
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def transformer(self) -> nn.Module:
        return self.core.transformer

    # ------------------------------------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """{"prompt_embeds": (B, L, D), "pooled_prompt_embeds": (B, P)}: a dict of per-sample rows, so the harness
        can index and concatenate it. Each distinct prompt is encoded once (and cached with `cache_prompts`)."""
        prompts = list(prompts)
        cache = self._prompt_cache if self.options.cache_prompts else {}
        todo = [p for p in dict.fromkeys(prompts) if p not in cache]
        bs = self.options.encode_batch_size
        for start in range(0, len(todo), bs):
            chunk = todo[start:start + bs]
            if self.random_text is not None:
                embeds, pooled = self.random_text(chunk)
            else:
                embeds, pooled = self._encode_text(chunk)
            embeds = embeds.to(self.device, self.frozen_dtype)
            pooled = pooled.to(self.device, self.frozen_dtype)
            for i, p in enumerate(chunk):
                cache[p] = (embeds[i].clone(), pooled[i].clone())
        return {"prompt_embeds": torch.stack([cache[p][0] for p in prompts]),
                "pooled_prompt_embeds": torch.stack([cache[p][1] for p in prompts])}

    def null_condition(self, batch_size: int) -> Dict[str, torch.Tensor]:
        """The empty prompt's embeddings (the unconditional branch of classifier-free guidance)."""
        null = self.encode_prompts([""])
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in null.items()}

    # ------------------------------------------------------------------------------------------- snapshots
    # Arguments are checked here, once for both fine-tuning modes; `self.finetuning` does the work.
    @property
    def lora(self) -> Optional[LoraSnapshots]:
        """The adapters under `finetune: lora` (tests and tools inspect them); None under full fine-tuning."""
        return self.finetuning.lora

    def trainable_parameters(self):
        return self.finetuning.trainable_parameters()

    def add_snapshot(self, name: str) -> None:
        if name == THETA:
            raise ValueError("'theta' is the trained policy, not a snapshot")
        if name not in self.snapshots:
            self.finetuning.add(name)

    def update_snapshot(self, name: str, decay: float) -> None:
        if name not in self.snapshots:
            raise KeyError(f"snapshot {name!r} was not created; have: {[THETA] + list(self.snapshots)}")
        if name == REF:
            raise ValueError("'ref' is the frozen base model (adapters disabled under LoRA); it cannot be updated")
        self.finetuning.update(name, decay)

    def copy_snapshot_to_theta(self, name: str) -> None:
        if name == REF or name not in self.snapshots:
            raise KeyError(f"cannot copy snapshot {name!r} into theta; have: {list(self.snapshots)}")
        self.finetuning.copy_to_theta(name)

    def snapshot_state_dict(self) -> Dict[str, torch.Tensor]:
        return self.finetuning.state_dict()

    def load_snapshot_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.finetuning.load_state_dict(state)

    # ---------------------------------------------------------------------------------------------- images
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, H, W) -> images (B, 3, H', W') in [0, 1], float32, on the device."""
        if self.vae is None:
            raise RuntimeError(f"{self.source} has no VAE")
        cfg = self.vae.config
        shift = cfg.shift_factor or 0.0
        images = []
        for chunk in latents.split(self.options.decode_batch_size):
            z = chunk.to(self.device, self.vae.dtype) / cfg.scaling_factor + shift
            pixels = self.vae.decode(z, return_dict=False)[0]
            images.append(((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0))
        return torch.cat(images)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> latents (the VAE posterior mode), the inverse of `decode` up to VAE error."""
        cfg = self.vae.config
        shift = cfg.shift_factor or 0.0
        latents = []
        for chunk in images.split(self.options.decode_batch_size):
            pixels = chunk.to(self.device, self.vae.dtype) * 2.0 - 1.0
            z = self.vae.encode(pixels).latent_dist.mode()
            latents.append(((z.float() - shift) * cfg.scaling_factor))
        return torch.cat(latents)

    # ---------------------------------------------------------------------------------------------- export
    def export(self, path: str | Path) -> Path:
        """theta in the form the plain pipeline takes: LoRA weights (`load_lora_weights`), or under full
        fine-tuning the transformer (`save_pretrained`, the pipeline's `transformer` subfolder)."""
        return self.finetuning.export(Path(path))

    def save_lora(self, path: str | Path) -> Path:
        """theta's adapter as diffusers LoRA weights: `<Pipeline>.load_lora_weights(path)` applies it."""
        if not isinstance(self.finetuning, AdapterSnapshots):
            raise RuntimeError("save_lora needs finetune=lora; under full fine-tuning use save_transformer")
        return self.export(path)

    def save_transformer(self, path: str | Path) -> Path:
        """theta's full transformer (`save_pretrained`), loadable as the pipeline's `transformer` subfolder."""
        if not isinstance(self.finetuning, ParameterCopies):
            raise RuntimeError("save_transformer needs finetune=full; under LoRA use save_lora")
        return self.export(path)
