"""Policy snapshots as LoRA adapters on one diffusers transformer.

theta is the trainable peft adapter `default`; every other snapshot (`old`, `sampler`, `ema`, ...) is a further,
frozen adapter on the same layers, started as a copy of theta's weights and soft-updated towards them; `ref` is the
base model with adapters disabled. A snapshot therefore costs two small matrices per adapted layer, not a copy
of the network.

Switching goes through the tuner layers' own `set_adapter` / `enable_adapters`, which also rewrite
`requires_grad` (peft makes the active adapter trainable). Autograd drops the gradient of a leaf whose
`requires_grad` is False when backward runs, so every switch ends by putting the flags back to "theta trainable,
everything else frozen", and theta is always the active adapter outside a snapshot call: a backward (or a
gradient-checkpointing recompute) after snapshot calls sees exactly theta.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from diffrl_bench.schedules import soft_update_
from diffrl_bench.zero3 import full_parameters

THETA_ADAPTER = "default"
"""peft's name for the trained adapter; diffusers' LoRA export expects the trained weights under it"""

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
"""METHODS.md shared defaults: the joint-attention projections of both streams"""


LORA_INITS = {"default": True, "gaussian": "gaussian"}
"""`model.options.lora_init` -> peft's `init_lora_weights`. `default`: peft's Kaiming-uniform A; `gaussian`:
A ~ N(0, 1/r), what Flow-GRPO, DiffusionNFT, AWM, Flow-Factory and the ELBO-PG code pass (docs/presets.md).
Both zero B, so theta starts exactly at the base model."""


def make_lora_config(rank: int, alpha: float, targets: Sequence[str], init: str = "default"):
    from peft import LoraConfig

    if init not in LORA_INITS:
        raise ValueError(f"option lora_init={init!r} is not one of {sorted(LORA_INITS)}")
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=LORA_INITS[init])


class LoraSnapshots:
    """The adapters of one transformer and the switching between them."""

    def __init__(self, transformer: nn.Module, config, dtype: torch.dtype = torch.float32):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.transformer = transformer
        self.config = config
        self.dtype = dtype
        transformer.requires_grad_(False)
        transformer.add_adapter(copy.deepcopy(config), adapter_name=THETA_ADAPTER)
        self._layers: List[nn.Module] = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
        if not self._layers:
            raise ValueError(f"no LoRA target module matched {list(config.target_modules)}")
        self.adapters: List[str] = [THETA_ADAPTER]
        self._params: Dict[str, Dict[str, nn.Parameter]] = {}
        self._names: Dict[str, Dict[str, str]] = {}
        self._index(THETA_ADAPTER)
        self._restore_theta()

    # ------------------------------------------------------------------------------------------ bookkeeping
    def _index(self, adapter: str) -> None:
        """Cast the adapter's weights to `dtype` and record them under adapter-independent keys."""
        params, names = {}, {}
        layer_ids = {id(m) for m in self._layers}
        for path, module in self.transformer.named_modules():
            if id(module) not in layer_ids:
                continue
            for layer_name in module.adapter_layer_names:
                container = getattr(module, layer_name, None)
                if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)) or adapter not in container:
                    continue
                entry = container[adapter]
                items = [("", entry)] if isinstance(entry, nn.Parameter) else list(entry.named_parameters())
                for pname, p in items:
                    if p.dtype != self.dtype:
                        p.data = p.data.to(self.dtype)
                    key = ".".join(s for s in (path, layer_name, pname) if s)
                    params[key] = p
                    names[key] = ".".join(s for s in (path, layer_name, adapter, pname) if s)
        if not params:
            raise RuntimeError(f"adapter {adapter!r} has no parameters")
        self._params[adapter] = params
        self._names[adapter] = names

    def params(self, adapter: str = THETA_ADAPTER) -> Dict[str, nn.Parameter]:
        """key -> parameter; the keys (module path + `lora_A.weight`, ...) are the same for every adapter."""
        return self._params[adapter]

    def param_names(self, adapter: str = THETA_ADAPTER) -> Dict[str, str]:
        """key -> the parameter's name in `transformer.named_parameters()`."""
        return self._names[adapter]

    def theta_parameters(self) -> List[nn.Parameter]:
        return list(self._params[THETA_ADAPTER].values())

    # ------------------------------------------------------------------------------------------- adapters
    def add(self, adapter: str) -> None:
        """A frozen adapter initialised as a copy of theta's current weights."""
        if adapter == THETA_ADAPTER:
            raise ValueError(f"{THETA_ADAPTER!r} is theta's adapter")
        if adapter in self.adapters:
            return
        with warnings.catch_warnings():
            # peft warns that a second adapter makes a multi-adapter model: that is the point here.
            warnings.simplefilter("ignore")
            self.transformer.add_adapter(copy.deepcopy(self.config), adapter_name=adapter)
        self.adapters.append(adapter)
        self._index(adapter)
        with torch.no_grad():
            theta = self._params[THETA_ADAPTER]
            for key, p in self._params[adapter].items():
                p.copy_(theta[key])
        self._restore_theta()

    @torch.no_grad()
    def copy_to_theta(self, adapter: str) -> None:
        """theta's adapter <- this adapter's weights."""
        theta, phi = self._params[THETA_ADAPTER], self._params[adapter]
        soft_update_([theta[k] for k in theta], [phi[k] for k in theta], 0.0)

    @torch.no_grad()
    def soft_update(self, adapter: str, decay: float) -> None:
        """phi <- d phi + (1 - d) theta on the adapter weights."""
        theta, phi = self._params[THETA_ADAPTER], self._params[adapter]
        # Under ZeRO-3 both adapters live in the partitioned module: gather each pair, write the snapshot's back.
        for key in theta:
            with full_parameters([theta[key], phi[key]], modified=True):
                soft_update_([phi[key]], [theta[key]], decay)

    # ------------------------------------------------------------------------------------------- switching
    def _fix_requires_grad(self) -> None:
        for adapter, params in self._params.items():
            trainable = adapter == THETA_ADAPTER
            for p in params.values():
                p.requires_grad_(trainable)

    def _activate(self, adapter: Optional[str]) -> None:
        for layer in self._layers:
            if adapter is None:
                layer.enable_adapters(False)
            else:
                if layer.disable_adapters:
                    layer.enable_adapters(True)
                layer.set_adapter(adapter)
        self._fix_requires_grad()

    def _restore_theta(self) -> None:
        self._activate(THETA_ADAPTER)

    @contextlib.contextmanager
    def using(self, adapter: Optional[str]) -> Iterator[None]:
        """Run the block with `adapter` active (None: adapters disabled, the base model); theta afterwards."""
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"no adapter {adapter!r}; have {self.adapters}")
        self._activate(adapter)
        try:
            yield
        finally:
            self._restore_theta()

    def active(self) -> Optional[str]:
        """The active adapter, or None when adapters are disabled (for tests and assertions)."""
        layer = self._layers[0]
        if layer.disable_adapters:
            return None
        names = layer.active_adapters
        return names[0] if len(names) == 1 else ",".join(names)

    # ---------------------------------------------------------------------------------------- state, export
    def state_dict(self, adapter: str) -> Dict[str, torch.Tensor]:
        """Whole copies (gathered under ZeRO-3: then a collective, every process calls it)."""
        state = {}
        for k, p in self._params[adapter].items():
            with full_parameters([p]):
                state[k] = p.detach().cpu().clone().contiguous()
        return state

    @torch.no_grad()
    def load_state_dict(self, adapter: str, state: Dict[str, torch.Tensor]) -> None:
        params = self._params[adapter]
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise KeyError(f"adapter {adapter!r} state does not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for k, p in params.items():
            with full_parameters([p], modified=True):  # every process loads the same checkpoint
                p.copy_(state[k])

    def export_state_dict(self) -> Dict[str, torch.Tensor]:
        """theta's adapter in peft's saved-adapter layout (no adapter name in the keys), as diffusers loads it."""
        return {k: p.detach().cpu().contiguous() for k, p in self._params[THETA_ADAPTER].items()}

    def save_for_pipeline(self, pipeline_class, path) -> None:
        """Write theta's LoRA so that `pipeline_class.load_lora_weights(path)` applies it (rank, alpha included)."""
        weights = self.export_state_dict()
        metadata = self.transformer.peft_config[THETA_ADAPTER].to_dict()
        try:
            pipeline_class.save_lora_weights(path, transformer_lora_layers=weights,
                                             transformer_lora_adapter_metadata=metadata)
        except TypeError:
            # diffusers before adapter metadata: loaders assume alpha = rank, so fold alpha / rank into B.
            scale = float(self.config.lora_alpha) / float(self.config.r)
            folded = {k: (v * scale if ".lora_B." in f".{k}" else v) for k, v in weights.items()}
            pipeline_class.save_lora_weights(path, transformer_lora_layers=folded)
