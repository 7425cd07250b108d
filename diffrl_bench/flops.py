"""Model FLOPs per network call, counted with torch's FLOP counter, and the machine's FLOP rate.

What is counted: the matmuls, convolutions and attention of one network call, as
`torch.utils.flop_counter.FlopCounterMode` counts them (2 FLOPs per multiply-add; elementwise ops, norms and
softmax are not counted: the usual "model FLOPs" of MFU figures). On CPU torch's SDPA dispatches to a kernel the
counter does not know, so it is given the same formula as the GPU kernels here; otherwise attention would count 0.

Conventions:
* A forward is counted once per (input shape without the batch dimension, condition shapes, network) on a batch of
  one and multiplied by the batch size: every op of these networks acts per sample, so FLOPs are linear in the
  batch (tested). Classifier-free guidance runs the network on a doubled batch, so `cfg_scale != 1` counts 2x
  (`models.calls_per_velocity`).
* A backward counts 2x its forward (gradients for the activations and for the weights: the convention of MFU
  figures, e.g. PaLM's appendix B). Under LoRA the frozen base weights get no gradient, so the real backward does
  nearer 1x; the figure is then an upper bound of the work done, and the same convention for every algorithm.
* The counting call runs the real network once (under no_grad) the first time a shape is seen; later calls are
  cache hits. Measure before timing, or accept one extra forward per new shape inside the timed region.

The Trainer holds one `FlopMeter` (`flop_meter`) and charges the cost ledger's `cost/flops_<phase>` where it counts
NFEs (FLOPs = NFEs x the per-sample forward, plus decodes, plus the backward of theta's calls); its first count of a
shape runs outside the rollout phase's timing but inside the first training step's. `FlopMeter` can also keep
per-phase totals itself (`add`, `totals`) for code outside the Trainer. `matmul_flops_per_s` measures what the
device achieves on a large bf16 (GPU) / float32 (CPU) matmul, and `peak_flops` looks a GPU's dense bf16 peak up.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Hashable, Optional, Sequence, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from diffrl_bench.models import THETA, calls_per_velocity, index_condition

BACKWARD_FACTOR = 2
"""backward FLOPs = BACKWARD_FACTOR x forward FLOPs (activation and weight gradients)"""

# Dense bf16 tensor-core peaks from the vendors' datasheets (without sparsity), matched against
# torch.cuda.get_device_name in order: the first entry whose every word occurs in the name wins, so the specific
# variants come before the generic ones.
PEAK_BF16_DENSE: Sequence[Tuple[Tuple[str, ...], float]] = (
    (("GH200",), 989e12),
    (("H200",), 989e12),
    (("H100", "PCIE"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM (reported as e.g. "NVIDIA H100 80GB HBM3")
    (("H800", "PCIE"), 756e12),
    (("H800",), 989e12),
    (("A100",), 312e12),
    (("A800",), 312e12),
    (("L40S",), 362e12),
)


def peak_flops(device_name: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of a GPU by its name, or None when the table does not know it."""
    upper = device_name.upper()
    for words, peak in PEAK_BF16_DENSE:
        if all(word in upper for word in words):
            return peak
    return None


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmuls / convolutions / attention that `fn()` runs (forward only when run under no_grad)."""
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())


def condition_signature(cond: Any) -> Hashable:
    """Per-sample shapes and dtypes of a condition (a tensor, a dict / tuple of them, or None)."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return (tuple(cond.shape[1:]), str(cond.dtype))
    if isinstance(cond, dict):
        return tuple((k, condition_signature(v)) for k, v in sorted(cond.items()))
    if isinstance(cond, (tuple, list)):
        return tuple(condition_signature(v) for v in cond)
    raise TypeError(f"cannot take the shape of a condition of type {type(cond).__name__}")


class FlopMeter:
    """FLOPs of a policy's network calls, counted once per shape, and FLOPs accumulated per phase.

    `network` is a policy with `velocity(x, sigma, cond, snapshot=, cfg_scale=)` (and `decode` for `decode_flops`)
    or any callable `network(x, sigma, cond)`. Counts are of theta's network: the harness's snapshots share its
    architecture (under LoRA `ref` skips the adapters: about 2% of the FLOPs of SD3.5-M at r 32).
    """

    def __init__(self, network: Any):
        self.network = network
        self._cache: Dict[Hashable, int] = {}
        self.measurements = 0
        """how many times the FLOP counter has run (once per distinct shape)"""
        self._totals: Dict[str, int] = {}

    # ------------------------------------------------------------------------------------------ per call
    def _device(self) -> torch.device:
        device = getattr(self.network, "device", None)
        if device is None and isinstance(self.network, torch.nn.Module):
            device = next(self.network.parameters()).device
        return torch.device(device) if device is not None else torch.device("cpu")

    def _measure(self, key: Hashable, run: Callable[[], Any]) -> int:
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = count_flops(run)
            self.measurements += 1
        return self._cache[key]

    def per_sample_forward(self, x_shape: Sequence[int], cond: Any = None, dtype: torch.dtype = torch.float32) -> int:
        """FLOPs of one network call on one sample of shape `x_shape[1:]` with `cond`'s per-sample shapes."""
        key = ("forward", tuple(x_shape[1:]), condition_signature(cond))

        def run():
            device = self._device()
            x = torch.zeros((1, *x_shape[1:]), device=device, dtype=dtype)
            sigma = torch.full((1,), 0.5, device=device)
            one = None if cond is None else index_condition(cond, slice(0, 1))
            velocity = getattr(self.network, "velocity", None)
            if velocity is not None:
                return velocity(x, sigma, one, snapshot=THETA, cfg_scale=1.0)
            return self.network(x, sigma, one)

        return self._measure(key, run)

    def forward_flops(self, x_shape: Sequence[int], cond: Any = None, cfg_scale: float = 1.0) -> int:
        """FLOPs of one velocity call on a batch of shape `x_shape` (CFG: two network evaluations per sample)."""
        return int(x_shape[0]) * calls_per_velocity(cfg_scale) * self.per_sample_forward(x_shape, cond)

    def backward_flops(self, x_shape: Sequence[int], cond: Any = None, cfg_scale: float = 1.0) -> int:
        """FLOPs of the backward through that call, by the 2x-forward convention (module docstring)."""
        return BACKWARD_FACTOR * self.forward_flops(x_shape, cond, cfg_scale)

    def decode_flops(self, latent_shape: Sequence[int]) -> int:
        """FLOPs of `network.decode` on a batch of latents of shape `latent_shape` (the VAE decoder)."""
        key = ("decode", tuple(latent_shape[1:]))

        def run():
            return self.network.decode(torch.zeros((1, *latent_shape[1:]), device=self._device()))

        return int(latent_shape[0]) * self._measure(key, run)

    # ---------------------------------------------------------------------------------------- per phase
    def add(self, phase: str, flops: int) -> None:
        self._totals[phase] = self._totals.get(phase, 0) + int(flops)

    def totals(self) -> Dict[str, int]:
        return dict(self._totals)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_s(device: str | torch.device = "cpu", size: Optional[int] = None,
                       dtype: Optional[torch.dtype] = None, repeats: int = 10) -> float:
    """FLOP/s the device achieves on square matmuls: an achievable ceiling to set model FLOP rates against.

    Defaults: bf16 8192^3 on a GPU (a few seconds on an H100 class device), float32 1024^3 on CPU.
    """
    device = torch.device(device)
    gpu = device.type == "cuda"
    size = size or (8192 if gpu else 1024)
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):  # warm-up: kernel selection, clocks
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    seconds = time.perf_counter() - start
    return 2.0 * size ** 3 * repeats / seconds
