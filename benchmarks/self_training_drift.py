"""Why best-of-K self-training (`rft`) does not learn on the toy benchmark: flow matching on five data sources.

Every arm starts from the shipped toy base and runs the same plain flow-matching fine-tuning (AdamW with the
harness's defaults, the same steps, images per step and logit-normal training times); only the training images
differ:

- `renders`: fresh ground-truth renders of the training prompts (the base's pretraining distribution). An oracle no
  RL method has; it shows that flow matching on *correct* images does improve this base.
- `own samples`: the current policy's own DPM-Solver++(2M) samples, all of them (self-distillation).
- `own correct`: only the current policy's own samples that the toy reward scores fully correct (strict = 1), found
  among `--pool` samples per step: what `rft` trains on, with more of it per step than `rft` gets.
- `own correct, attention only`: the same, updating only the attention parameters.
- `base correct (frozen sampler)`: fully correct samples drawn from a frozen copy of the base instead of the
  policy being trained, so the training data never feeds back: a fixed dataset of the base's own best work.

After every `--eval-every` steps it prints the held-out strict score and the naturalness (palette fidelity) on the
fixed eval noise, so the arms can be read side by side. On the shipped base (2 CPU cores, lr 1e-4, 32 images per
step) the renders arm improves while both own-sample arms collapse within 10 steps, the correct-only one included;
freezing everything but attention stops the collapse but does not learn either. From a base pretrained on 150k
samples instead of 100k (0.505 held-out; `--model DIR`) both own-sample arms also end at 0.000 after 15 steps, so
the collapse is not a symptom of the shipped base's short pretraining.

The `base correct` arm separates the feedback loop from the data. Its training set never changes, and naturalness
stays at 0.97, but it does not learn either: 0.236 -> 0.229 / 0.183 / 0.204 at steps 5 / 15 / 30. With guided
rollouts (`--rollout-cfg 3`, under which the base itself scores 0.34 held-out), the frozen base supplies 19-32
correct images per step, as many as the renders arm trains on, and the model still ends at 0.221 after 30 steps;
the `own correct` arm with the same guidance collapses (0.07). So the base's own correct samples, unlike renders,
teach it nothing it does not already do, and fitting them again and again drifts it off its palette. The methods
with negative or baseline-centred weights (nft, awm, crd, elbo_pg) learn from the contrast between good and bad
samples, where that drift cancels. Usage:

    python benchmarks/self_training_drift.py [--model builtin:toy_base] [--steps 15] [--lr 1e-4] [--images 32]
        [--rollout-cfg 1.0] [--arms renders own own_correct own_correct_attention base_correct]
"""
from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
from omegaconf import OmegaConf

from diffrl_bench.flow import forward_noise
from diffrl_bench.evaluate import build_eval_rewards, evaluate, generate
from diffrl_bench.prompts import Prompt, load_prompts
from diffrl_bench.timesteps import sample_train_times
from diffrl_bench.toy import domain
from diffrl_bench.toy.detector import score_batch
from diffrl_bench.toy.model import ToyBackend

IMAGES_PER_PROMPT = 8  # images per prompt, as in the toy presets (K = 8)
TRAIN_TIMES = 9  # training times per image, as in the toy presets
# The toy presets' sampler, for the own-sample rollouts and for the evaluation alike.
SAMPLER = {"name": "dpm2", "num_steps": 10, "shift": 1.0, "cfg_scale": 1.0}
ARMS = {"renders": "renders (oracle)", "own": "own samples", "own_correct": "own correct",
        "own_correct_attention": "own correct, attention only", "base_correct": "base correct (frozen sampler)"}


def eval_config(images_per_prompt: int):
    return OmegaConf.create({
        "reward": {"options": {"toy_geneval": {"strict_weight": 0.5}}},
        "eval": {"rewards": ["toy_geneval", "toy_naturalness"], "images_per_prompt": images_per_prompt,
                 "seed": 1234, "batch_size": 256, "sampler": SAMPLER}})


def draw_prompts(train: List[Prompt], count: int, rng: np.random.Generator) -> List[Prompt]:
    """`count` images' prompts: count / 8 training prompts, each repeated 8 times (a prompt group)."""
    groups = rng.choice(len(train), max(1, count // IMAGES_PER_PROMPT))
    return [train[i] for i in groups for _ in range(IMAGES_PER_PROMPT)]


def renders(policy, train, args, rng, generator) -> Tuple[torch.Tensor, List[str]]:
    prompts = draw_prompts(train, args.images, rng)
    specs = {p.text: p for p in domain.all_prompts()}
    images = torch.as_tensor(domain.sample_batch([specs[p.text] for p in prompts], rng)).permute(0, 3, 1, 2)
    return policy.encode_images(images.float()), [p.text for p in prompts]


def own_samples(policy, train, args, rng, generator, correct_only: bool = False,
                sampler_policy=None) -> Tuple[torch.Tensor, List[str]]:
    """Samples of `sampler_policy` (default: the policy being trained) with the rollout guidance `--rollout-cfg`."""
    prompts = draw_prompts(train, args.pool if correct_only else args.images, rng)
    noise = torch.randn((len(prompts), *policy.latent_shape), generator=generator)
    rollout_sampler = OmegaConf.create(dict(SAMPLER, cfg_scale=args.rollout_cfg))
    images, _ = generate(sampler_policy or policy, [p.text for p in prompts], noise, rollout_sampler)
    if correct_only:
        strict, _ = score_batch(images, [p.metadata for p in prompts])
        keep = np.flatnonzero(strict >= 1.0)[:args.images]
        images, prompts = images[keep], [prompts[i] for i in keep]
    return policy.encode_images(images), [p.text for p in prompts]


def fine_tune(arm: str, data: Callable, parameter_filter: Callable[[str], bool], args, train, held,
              evaluate_base: bool) -> List[Dict]:
    torch.manual_seed(0)
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    policy = ToyBackend(args.model)
    params = [p for name, p in policy.core.named_parameters() if parameter_filter(name)]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    cfg = eval_config(args.eval_images)
    rewards = build_eval_rewards(cfg)
    rows = []

    def record(step: int, kept: int) -> None:
        metrics, _, _ = evaluate(policy, held, cfg.eval, rewards)
        rows.append({"arm": arm, "step": step, "kept": kept,
                     "strict": metrics["eval/toy_geneval.strict.task_mean"],
                     "naturalness": metrics["eval/toy_naturalness"]})
        print(f"  {arm:30s} step {step:3d}  held-out strict {rows[-1]['strict']:.3f}  "
              f"naturalness {rows[-1]['naturalness']:.3f}  (training images this step: {kept})", flush=True)

    if evaluate_base:  # every arm starts from the same base and the eval noise is fixed: score it once
        record(0, 0)
    for step in range(1, args.steps + 1):
        x0, texts = data(policy, train, args, rng, generator)
        if len(texts) > 0:
            times = sample_train_times("logit_normal", len(texts), TRAIN_TIMES, generator).reshape(-1).to(x0.dtype)
            x0 = x0.repeat(TRAIN_TIMES, 1, 1, 1)
            eps = torch.randn(x0.shape, generator=generator)
            cond = policy.encode_prompts(texts * TRAIN_TIMES)
            velocity = policy.velocity(forward_noise(x0, eps, times), times, cond)
            loss = (velocity - (eps - x0)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        if step % args.eval_every == 0:
            record(step, len(texts))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:toy_base",
                        help="toy base to start from: the shipped one, or a `diffrl-bench pretrain-toy --out` folder")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--images", type=int, default=32, help="training images per step (a multiple of 8)")
    parser.add_argument("--pool", type=int, default=128, help="own samples drawn per step for the correct-only arms")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-images", type=int, default=16, help="eval images per held-out prompt")
    parser.add_argument("--rollout-cfg", type=float, default=1.0,
                        help="classifier-free guidance of the own-sample rollouts (the evaluation stays unguided)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="arms to run, in order")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train, held = load_prompts("toy:train"), load_prompts("toy:heldout")
    everything = lambda name: True  # noqa: E731
    frozen_base = ToyBackend(args.model)
    recipes = {
        "renders": (renders, everything),
        "own": (own_samples, everything),
        "own_correct": (lambda *a: own_samples(*a, correct_only=True), everything),
        "own_correct_attention": (lambda *a: own_samples(*a, correct_only=True), lambda n: ".attn" in n),
        "base_correct": (lambda *a: own_samples(*a, correct_only=True, sampler_policy=frozen_base), everything),
    }
    arms = {ARMS[key]: recipes[key] for key in args.arms}
    results = []
    for arm, (data, parameter_filter) in arms.items():
        print(f"{arm}:", flush=True)
        results += fine_tune(arm, data, parameter_filter, args, train, held, evaluate_base=not results)
    base = results[0]["strict"]
    print(f"\nheld-out strict after {args.steps} steps (base {base:.3f}), ratio to the base:")
    for arm in arms:
        last = [r for r in results if r["arm"] == arm][-1]
        print(f"  {arm:30s} {last['strict']:.3f}  ({last['strict'] / base:.2f}x)  naturalness {last['naturalness']:.3f}")


if __name__ == "__main__":
    main()
