"""The toy benchmark's text-conditional flow model and its policy backend.

A small diffusers `UNet2DConditionModel` in pixel space (16x16 RGB) with cross-attention to learned word
embeddings: about 1.4M parameters, sized so it pretrains in minutes on two CPU cores and draws clean shapes
(see docs/ARCHITECTURE.md and ENV_NOTES' second prototype, which this follows).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from diffrl_bench.models import SnapshotPolicy
from diffrl_bench.registry import MODELS

PAD, NULL = 0, 1  # token ids reserved before the vocabulary


@dataclass
class ToyModelConfig:
    """Architecture of the toy flow model (saved beside its weights)."""

    vocab: List[str] = field(default_factory=list)
    """the words the tokenizer knows; any other word is an error"""
    max_tokens: int = 12
    """prompt length in tokens (prompts are padded to this)"""
    embed_dim: int = 64
    """width of the word embeddings that the UNet cross-attends to"""
    block_out_channels: Tuple[int, ...] = (32, 48, 64)
    """UNet channel widths, one per resolution"""
    image_size: int = 16
    """height and width of the images, in pixels"""


class ToyFlowModel(nn.Module):
    """Predicts the rectified-flow velocity `v(x_t, t, prompt)` for 16x16 images in [-1, 1]."""

    def __init__(self, config: ToyModelConfig):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.config = config
        self.word_to_id = {w: i + 2 for i, w in enumerate(config.vocab)}
        self.token_embedding = nn.Embedding(len(config.vocab) + 2, config.embed_dim)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_tokens, config.embed_dim))
        channels = tuple(config.block_out_channels)
        self.unet = UNet2DConditionModel(
            sample_size=config.image_size,
            in_channels=3,
            out_channels=3,
            block_out_channels=channels,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",),
            layers_per_block=1,
            cross_attention_dim=config.embed_dim,
            attention_head_dim=8,
            norm_num_groups=8,
        )

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompt strings -> (B, max_tokens) token ids; the empty prompt is the unconditional (null) prompt."""
        ids = torch.full((len(prompts), self.config.max_tokens), PAD, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = prompt.split()
            if not words:
                ids[row, 0] = NULL
                continue
            if len(words) > self.config.max_tokens:
                raise ValueError(f"prompt {prompt!r} has {len(words)} words; the toy model takes {self.config.max_tokens}")
            for col, word in enumerate(words):
                if word not in self.word_to_id:
                    raise ValueError(f"word {word!r} of prompt {prompt!r} is not in the toy model's vocabulary")
                ids[row, col] = self.word_to_id[word]
        return ids

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        context = self.token_embedding(tokens.to(x.device)) + self.position_embedding
        timestep = sigma.to(x.dtype) * 1000.0  # the diffusers convention: timestep = 1000 * sigma
        return self.unet(x, timestep, encoder_hidden_states=context).sample


def save_toy_model(model: ToyFlowModel, directory: str | Path, extra: dict | None = None) -> None:
    """Write `config.json` and `model.safetensors` (and optional training facts in `config.json`)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    payload = {"model": asdict(model.config), "training": extra or {}}
    (directory / "config.json").write_text(json.dumps(payload, indent=2))


BUILTIN_BASE = Path(__file__).parent / "base"


def resolve_model_path(path: str) -> Path:
    """`builtin:toy_base` names the pretrained base shipped inside the package; anything else is a directory."""
    if path in ("builtin:toy_base", "", None):
        return BUILTIN_BASE
    return Path(path)


def prompt_problem(vocab: Sequence[str], max_tokens: int) -> Callable[[str], Optional[str]]:
    """What `ToyFlowModel.tokenize` would refuse in a prompt, as a message (None: it tokenizes)."""
    known = set(vocab)

    def problem(text: str) -> Optional[str]:
        words = text.split()
        if len(words) > max_tokens:
            return f"{len(words)} words; the toy model takes at most {max_tokens}"
        unknown = [word for word in words if word not in known]
        if unknown:
            return (f"word {unknown[0]!r} is not in the toy model's vocabulary ({len(known)} words: "
                    f"{' '.join(sorted(known))})")
        return None

    return problem


def load_toy_model(path: str | Path) -> ToyFlowModel:
    """Load a toy model saved by `save_toy_model` (safetensors only: no pickled code is ever loaded)."""
    from safetensors.torch import load_file

    directory = resolve_model_path(str(path))
    config_file, weights_file = directory / "config.json", directory / "model.safetensors"
    for required in (config_file, weights_file):
        if not required.exists():
            raise FileNotFoundError(f"toy model file {required} is missing (model.path={path!r})")
    raw = json.loads(config_file.read_text())["model"]
    raw["block_out_channels"] = tuple(raw["block_out_channels"])
    model = ToyFlowModel(ToyModelConfig(**raw))
    model.load_state_dict(load_file(str(weights_file)))
    return model


@MODELS.register("toy_unet")
class ToyBackend(SnapshotPolicy):
    """The toy model as a policy backend: full fine-tuning, snapshots are parameter copies."""

    def __init__(self, path: str = "builtin:toy_base", device: str | torch.device = "cpu"):
        model = load_toy_model(path)
        super().__init__(model.to(device))
        self.latent_shape = (3, model.config.image_size, model.config.image_size)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.core.tokenize(prompts).to(self.device)

    @staticmethod
    def prompt_checker(path: str = "builtin:toy_base") -> Callable[[str], Optional[str]]:
        """Checks prompts against the model at `path` from its config.json alone (no weights are loaded), so
        prompt files are checked before any model is built (diffrl_bench.prompts.validate_prompt_sources)."""
        config_file = resolve_model_path(str(path)) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"toy model file {config_file} is missing (model.path={path!r})")
        raw = json.loads(config_file.read_text())["model"]
        return prompt_problem(raw["vocab"], raw.get("max_tokens", ToyModelConfig.max_tokens))

    def null_condition(self, batch_size: int) -> torch.Tensor:
        return self.core.tokenize([""] * batch_size).to(self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2.0 - 1.0

    def export(self, path: str | Path) -> Path:
        """theta as a toy model directory, loadable with `model.path=<path>`."""
        save_toy_model(self.core, path)
        return Path(path)
