"""Learned preference rewards: PickScore, CLIPScore, LAION aesthetic (transformers CLIP), HPSv2.1 (OpenCLIP) and
ImageReward (BLIP), with the scalings the RL papers use.

Every model loads from a local directory/file or a hub id given as an option; images are preprocessed on tensors
(`ClipPreprocess`), so a batch scores exactly as its images one at a time. `batch_size` bounds the forward passes,
`device` ("auto" = CUDA when present) and `dtype` place the model; scores come back as float32 on the CPU.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffrl_bench.registry import REWARDS
from diffrl_bench.reward_harness import RewardConfigError
from diffrl_bench.rewards._common import (ClipPreprocess, batched, check_images, load_state_dict, option,
                                          resolve_device, resolve_dtype)


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEncoder:
    """A transformers CLIPModel with its tokenizer and its image preprocessing.

    `path`: model directory or hub id; `processor_path`: where the tokenizer and `preprocessor_config.json` live
    when not beside the model (PickScore ships only the model; its processor is the LAION ViT-H-14 one). Without a
    preprocessor config the model's `image_size` and the OpenAI mean/std are used.
    """

    def __init__(self, name: str, path: str, processor_path: str | None, device: torch.device, dtype: torch.dtype):
        from transformers import AutoTokenizer, CLIPModel, ImageProcessingMixin

        processor_path = processor_path or path
        try:
            self.model = CLIPModel.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise OSError(f"{name}: cannot load a CLIP model from option path={path!r}: {error}") from None
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(processor_path)
        except (OSError, ValueError) as error:
            raise OSError(f"{name}: cannot load the CLIP tokenizer from {processor_path!r} (option processor_path, "
                          f"default: path): {error}") from None
        try:
            image_config, _ = ImageProcessingMixin.get_image_processor_dict(processor_path)
        except (OSError, ValueError):
            image_config = {}
        self.preprocess = ClipPreprocess.from_config(image_config, self.model.config.vision_config.image_size)
        self.max_length = min(int(self.tokenizer.model_max_length),
                              int(self.model.config.text_config.max_position_embeddings))
        self.device, self.dtype = device, dtype

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        return _features(self.model.get_image_features(pixel_values=pixels)).float()

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        # Padding to a fixed length makes a prompt's tokens independent of its batch-mates.
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        return _features(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                      attention_mask=tokens["attention_mask"])).float()

    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return F.cosine_similarity(self.image_embeds(images), self.text_embeds(prompts), dim=-1)


class _BatchedReward:
    name = ""

    def __init__(self, batch_size: int, device: str, dtype: str):
        self.batch_size = option(self.name, "batch_size", batch_size, int, lambda v: v >= 1, "is not at least 1")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(self.name, dtype)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 metadata: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        check_images(self.name, images, prompts)
        prompts = list(prompts)
        parts = [self.score(images[s:e], prompts[s:e]).float().cpu() for s, e in batched(len(prompts), self.batch_size)]
        return {self.name: torch.cat(parts)}


@REWARDS.register("pickscore")
class PickScoreReward(_BatchedReward):
    """PickScore / 26: `logit_scale * cos(text, image) / 26`, Flow-GRPO's scaling.

    Options: `path` (yuvalkirstain/PickScore_v1), `processor_path` (default: `path` when it holds a tokenizer,
    else laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the processor PickScore was trained with), `divisor` (26),
    `batch_size` (32), `device` (auto), `dtype` (float32).
    """

    name = "pickscore"

    def __init__(self, path: str = "yuvalkirstain/PickScore_v1", processor_path: str | None = None,
                 divisor: float = 26.0, batch_size: int = 32, device: str = "auto", dtype: str = "float32"):
        super().__init__(batch_size, device, dtype)
        self.divisor = option(self.name, "divisor", divisor, float, lambda v: v > 0, "is not positive")
        if processor_path is None:
            has_tokenizer = os.path.isfile(os.path.join(path, "tokenizer_config.json"))
            processor_path = path if has_tokenizer else "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
        self.encoder = ClipEncoder(self.name, path, processor_path, self.device, self.dtype)

    def score(self, images, prompts):
        scale = self.encoder.model.logit_scale.exp().float()
        return scale * self.encoder.cosine(images, prompts) / self.divisor


@REWARDS.register("clipscore")
class ClipScoreReward(_BatchedReward):
    """CLIPScore: `100 * cos(text, image) / divisor`.

    METHODS.md lists "CLIPScore / 30 (Flow-GRPO) or / 100 (NFT)". Read as: CLIPScore is 100 x cosine (Flow-GRPO
    takes CLIP's `logits_per_image`, whose logit scale is exactly 100 for OpenAI ViT-L/14) and the reward divides
    it by 30 (`divisor=30`, default) or by 100 (`divisor=100`, DiffusionNFT: the plain cosine). The fixed 100 keeps
    the scale independent of a checkpoint's learned logit scale. Options: `path` (openai/clip-vit-large-patch14),
    `processor_path` (default: path), `divisor`, `batch_size`, `device`, `dtype`.
    """

    name = "clipscore"

    def __init__(self, path: str = "openai/clip-vit-large-patch14", processor_path: str | None = None,
                 divisor: float = 30.0, batch_size: int = 32, device: str = "auto", dtype: str = "float32"):
        super().__init__(batch_size, device, dtype)
        self.divisor = option(self.name, "divisor", divisor, float, lambda v: v > 0, "is not positive")
        self.encoder = ClipEncoder(self.name, path, processor_path, self.device, self.dtype)

    def score(self, images, prompts):
        return 100.0 * self.encoder.cosine(images, prompts) / self.divisor


class AestheticMLP(nn.Module):
    """The LAION "improved aesthetic predictor" head (sac+logos+ava1-l14-linearMSE): five linear layers with
    dropout between the first four and no non-linearity, on the L2-normalised CLIP ViT-L/14 image embedding.
    Layer indices match the released state_dict (layers.0, .2, .4, .6, .7)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


@REWARDS.register("aesthetic")
class AestheticReward(_BatchedReward):
    """LAION aesthetic score (roughly 1-10, unscaled as in DDPO and Flow-GRPO): `MLP(e / |e|)`, e the CLIP image
    embedding. Prompts are ignored.

    Options: `weights` (required: the MLP's .pth or .safetensors, loaded as tensors only), `clip_path`
    (openai/clip-vit-large-patch14), `processor_path` (default: clip_path), `batch_size`, `device`, `dtype`.
    """

    name = "aesthetic"

    def __init__(self, weights: str | None = None, clip_path: str = "openai/clip-vit-large-patch14",
                 processor_path: str | None = None, batch_size: int = 32, device: str = "auto",
                 dtype: str = "float32"):
        super().__init__(batch_size, device, dtype)
        if not weights:
            raise RewardConfigError("bad config key 'reward.options.aesthetic.weights': required (no default): the "
                                    "path of the LAION improved-aesthetic-predictor head (sac+logos+ava1-l14-"
                                    "linearMSE.pth or a .safetensors copy)")
        self.encoder = ClipEncoder(self.name, clip_path, processor_path, self.device, self.dtype)
        state = load_state_dict(weights, self.name, "weights")
        embed_dim = int(self.encoder.model.config.projection_dim)
        self.mlp = AestheticMLP(embed_dim)
        try:
            self.mlp.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"aesthetic: weights {weights!r} do not fit the aesthetic MLP on {embed_dim}-d CLIP "
                             f"embeddings of {clip_path!r}: {error}") from None
        self.mlp.to(self.device).eval().requires_grad_(False)

    def score(self, images, prompts):
        return self.mlp(F.normalize(self.encoder.image_embeds(images), dim=-1))


def _resolve_file(name: str, path: str, filename: str) -> str:
    """A local file, or `filename` fetched from the hub repository `path`."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, filename)):
        return os.path.join(path, filename)
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(path, filename)
    except Exception as error:  # noqa: BLE001 - offline, unknown repo, bad id: all end here
        raise FileNotFoundError(f"{name}: option path={path!r} is neither a local file nor a hub repository with "
                                f"{filename!r}: {error}") from None


def load_hpsv2(path: str, filename: str, arch: str, device: torch.device) -> Tuple[Any, Any]:
    """OpenCLIP `arch` with the HPSv2 checkpoint -> (model with encode_image/encode_text, tokenizer)."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(f"the hpsv2 reward needs OpenCLIP (pip install open_clip_torch): {error}") from error
    model = open_clip.create_model(arch, pretrained=None, device=device)
    file = _resolve_file("hpsv2", path, filename)
    state = load_state_dict(file, "hpsv2", "path")
    # Checkpoints saved from DistributedDataParallel prefix every key.
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"hpsv2: {file!r} does not fit OpenCLIP {arch!r} (option arch): {error}") from None
    return model.to(device).eval().requires_grad_(False), open_clip.get_tokenizer(arch)


@REWARDS.register("hpsv2")
class HPSv2Reward(_BatchedReward):
    """HPSv2.1: cosine between the fine-tuned OpenCLIP ViT-H-14's image and text embeddings (about 0.25-0.35; the
    HPSv2 paper reports 100 x this). Unscaled, as Flow-GRPO's scorer returns it.

    Options: `path` (a local .pt or a hub repo, xswu/HPSv2), `filename` (HPS_v2.1_compressed.pt), `arch`
    (ViT-H-14), `batch_size`, `device`, `dtype`. Needs `open_clip_torch`.
    """

    name = "hpsv2"

    def __init__(self, path: str = "xswu/HPSv2", filename: str = "HPS_v2.1_compressed.pt", arch: str = "ViT-H-14",
                 batch_size: int = 32, device: str = "auto", dtype: str = "float32"):
        super().__init__(batch_size, device, dtype)
        self.model, self.tokenizer = load_hpsv2(path, filename, arch, self.device)
        self.model.to(dtype=self.dtype)
        self.preprocess = ClipPreprocess(224, (224, 224))

    def score(self, images, prompts):
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        image = self.model.encode_image(pixels).float()
        text = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float()
        return F.cosine_similarity(image, text, dim=-1)


def load_imagereward(path: str, med_config: str | None, device: torch.device):
    """The ImageReward package's model (BLIP ViT-L + MLP head): `.blip.tokenizer` and `.score_gard`."""
    try:
        import ImageReward as RM
    except ImportError as error:
        raise ImportError(f"the imagereward reward needs the ImageReward package (pip install image-reward): "
                          f"{error}") from error
    return RM.load(path, device=str(device), med_config=med_config)


@REWARDS.register("imagereward")
class ImageRewardReward(_BatchedReward):
    """ImageReward: the BLIP reward model's output, standardised by the package (its mean 0.167, std 1.033), as
    Flow-GRPO uses it.

    Options: `path` (ImageReward-v1.0, or a local checkpoint file), `med_config` (the BLIP config json; the package
    fetches it when omitted), `batch_size`, `device`, `dtype`. Needs `image-reward`.
    """

    name = "imagereward"
    max_length = 35  # the package's prompt length

    def __init__(self, path: str = "ImageReward-v1.0", med_config: str | None = None, batch_size: int = 32,
                 device: str = "auto", dtype: str = "float32"):
        super().__init__(batch_size, device, dtype)
        self.model = load_imagereward(path, med_config, self.device)
        self.model.to(dtype=self.dtype).eval().requires_grad_(False)
        self.preprocess = ClipPreprocess(224, (224, 224))

    def score(self, images, prompts):
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        tokens = self.model.blip.tokenizer(list(prompts), padding="max_length", truncation=True,
                                           max_length=self.max_length, return_tensors="pt").to(self.device)
        return self.model.score_gard(tokens.input_ids, tokens.attention_mask, pixels).reshape(-1)
