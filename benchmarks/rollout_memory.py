"""Rollout memory per image: what each method keeps between sampling and training, at equal steps and resolution.

DiffusionNFT (and every forward-process method) keeps only the final sample; Flow-GRPO keeps, for each trained
transition, the latent, the next latent and the behaviour log-prob (R transitions share R + 1 latents); a naive
implementation keeps the whole trajectory (rebuilt here with `StateRecorder`). The numbers are the bytes of the tensors the real samplers return for
the harness to store (`Rollout.x0` for NFT, `Rollout.transitions` for Flow-GRPO), measured, not computed from a
formula. The stored size does not depend on the network, so a cheap linear velocity field stands in for the model.
Usage:

    python benchmarks/rollout_memory.py [--steps 10] [--batch 8] [--dtype float32]
"""
from __future__ import annotations

import argparse

import torch

from diffrl_bench.registry import SAMPLERS
from diffrl_bench.sampling import StateRecorder, flow_sigmas

# Latent shapes: the toy benchmark (16 px RGB), and SD3.5-Medium at 512 px and 1024 px (16 channels, 8x VAE).
SHAPES = {"toy 16px (3x16x16)": (3, 16, 16), "SD3.5-M 512px (16x64x64)": (16, 64, 64),
          "SD3.5-M 1024px (16x128x128)": (16, 128, 128)}


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def stored_bytes_per_image(shape, steps: int, batch: int, dtype: torch.dtype) -> dict:
    sigmas = flow_sigmas(steps, 3.0)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(dtype)

    def field(x_t, sigma, rows=None):
        return -0.5 * x_t

    trained = int(steps * 0.99)
    nft = SAMPLERS.get("dpm2")(field, x, sigmas)
    grpo = SAMPLERS.get("flow_grpo_sde")(field, x, sigmas, record_before=trained,
                                          generator=torch.Generator().manual_seed(1))
    fast = SAMPLERS.get("flow_grpo_sde")(field, x, sigmas, window_size=2, record_before=steps,
                                          generator=torch.Generator().manual_seed(1))
    recorder = StateRecorder(field)
    naive = SAMPLERS.get("flow_grpo_sde")(recorder, x, sigmas, generator=torch.Generator().manual_seed(1))
    tr, tf = grpo.transitions, fast.transitions
    return {
        "DiffusionNFT (x0 only)": _bytes(nft.x0) / batch,
        f"Flow-GRPO ({trained} trained transitions)": _bytes(tr.latents, tr.steps, tr.log_probs) / batch,
        "Flow-GRPO-Fast (window 2)": _bytes(tf.latents, tf.steps, tf.log_probs) / batch,
        "full trajectory + all log-probs": _bytes(recorder.trajectory(naive.x0), naive.log_probs) / batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="sampler steps (the originals train with 10)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    print(f"Rollout memory per image, {args.steps} sampler steps, latents in {args.dtype}\n")
    header = f"{'latent':<30}{'method':<40}{'KiB/image':>12}{'x NFT':>8}"
    print(header)
    print("-" * len(header))
    for label, shape in SHAPES.items():
        sizes = stored_bytes_per_image(shape, args.steps, args.batch, dtype)
        base = sizes["DiffusionNFT (x0 only)"]
        for method, size in sizes.items():
            print(f"{label:<30}{method:<40}{size / 1024:>12.1f}{size / base:>8.2f}")
        print()


if __name__ == "__main__":
    main()
