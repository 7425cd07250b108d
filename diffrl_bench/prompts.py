"""Prompt sources for runs: the toy benchmark's fixed splits and the real prompt-file formats.

Sources (`data.train_prompts`, `data.eval_prompts`):

* `toy:train`, `toy:heldout`, `toy:all`: the built-in CPU benchmark (GenEval-style metadata).
* `geneval:PATH` or any `PATH.jsonl`: GenEval metadata, one JSON object a line with `prompt`, `tag` and `include`
  (optionally `exclude`) clauses `{class, count, color?, position?}`; the metadata is the whole record.
* `ocr:PATH`: one prompt a line, each quoting the text to render in straight double quotes (Flow-GRPO's OCR set);
  metadata `{"ocr_target": text}` (the first quoted span). A line without one is an error.
* `SOURCE~fit:F:S` / `SOURCE~val:F:S`: the two sides of a deterministic split of SOURCE's prompts, a share F
  for validation by a seeded hash S of each prompt (`validation_split`); the sweep's tuning stage trains on `fit`
  and scores on `val` of the *training* prompts. A split of `toy:heldout` is refused: the held-out prompts judge
  the final runs and must not choose their settings.
* `lines:PATH` or any `PATH.txt`: one prompt a line (DrawBench, Pick-a-Pic, OCR files); metadata `{}`, plus
  `{"ocr_target": text}` when the line has a quoted span, so an OCR file loads either way.

Blank (or whitespace-only) lines are skipped, not errors: files from the papers' repositories end with one, and a
blank line carries no prompt that could be lost. Surrounding whitespace is stripped. Every problem raises one
`PromptFileError` naming the config key, the file and, for a line's problem, the line: a missing file, a directory,
an unknown extension, a file with no prompts, text that is not UTF-8, a malformed JSON line, missing or mistyped
GenEval fields, an OCR line without a quoted target.

`validate_prompt_sources(cfg)` runs these checks, and the ones that need the run's settings (prompts the model's
tokenizer refuses, e.g. GenEval prompts on the toy model; more prompts per step than the file holds; rewards that
need metadata the prompts lack), before any model is built. It reads files and the model's config only.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from diffrl_bench.config import ConfigError


@dataclass(frozen=True)
class Prompt:
    text: str
    metadata: Dict[str, Any]
    where: str = field(default="", compare=False)
    """where the prompt came from, for error messages: `PATH:LINE`, or `toy:SPLIT #N`"""


class PromptFileError(ConfigError):
    """A prompt source cannot be used; the message names the config key, the file and (for a line) the line.

    A `ConfigError`, so the command line reports it in one line (exit code 2) like any other bad setting."""


_FORMATS = ("geneval", "ocr", "lines")


def load_prompts(source: str, key: str = "data.train_prompts") -> List[Prompt]:
    """Prompts with their metadata from a source string (see the module docstring for the forms)."""
    if not isinstance(source, str) or not source.strip():
        raise PromptFileError(f"{key}: empty prompt source; use toy:train, geneval:PATH, ocr:PATH or lines:PATH")
    split = parse_split_source(source)
    if split is not None:
        base, part, fraction, seed = split
        if base == "toy:heldout":
            raise PromptFileError(f"{key}: {source!r} splits the held-out prompts; a validation split is taken "
                                  "from the training prompts only")
        if not 0 < fraction < 1:
            raise PromptFileError(f"{key}: {source!r}: the validation fraction must be in (0, 1)")
        prompts = load_prompts(base, key)
        fit, val = validation_split([p.text for p in prompts], fraction, seed)
        return [prompts[i] for i in (fit if part == "fit" else val)]
    if source.startswith("toy:"):
        return _toy(source, key)
    fmt, path = _split_source(source, key)
    loader = {"geneval": _load_geneval, "ocr": _load_ocr, "lines": _load_lines}[fmt]
    prompts = loader(path, key)
    if not prompts:
        raise PromptFileError(f"{key}: {path} holds no prompts")
    return prompts


_SPLIT = re.compile(r"^(?P<source>.+)~(?P<part>fit|val):(?P<fraction>[0-9.eE+-]+):(?P<seed>-?\d+)$")


def validation_split(prompts: Sequence[str], fraction: float, seed: int = 0) -> Tuple[List[int], List[int]]:
    """Indices (fit, val) of a deterministic split of the training prompts: round(fraction x n) of them (at least
    one, and at least one left to fit) by a seeded hash of each prompt, so the split does not depend on the order
    of the prompt file, only on its content. A prompt repeated in the file stays on one side."""
    n = len(prompts)
    if n < 2:
        raise PromptFileError(f"a validation split needs at least 2 training prompts, got {n}")
    n_val = min(max(1, int(round(fraction * n))), n - 1)

    def rank(text: str) -> str:
        return hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()

    order = sorted(range(n), key=lambda i: (rank(prompts[i]), i))
    chosen = set(prompts[i] for i in order[:n_val])
    val = [i for i in range(n) if prompts[i] in chosen]
    fit = [i for i in range(n) if prompts[i] not in chosen]
    if not fit:
        raise PromptFileError("the validation split took every distinct training prompt; lower "
                              "tune.validation.fraction")
    return fit, val


def split_source(source: str, part: str, fraction: float, seed: int) -> str:
    """The prompt-source string for one side of the split (`toy:train~val:0.25:0`), for data.*_prompts."""
    if part not in ("fit", "val"):
        raise PromptFileError(f"split part must be fit or val, got {part!r}")
    return f"{source}~{part}:{fraction:g}:{seed}"


def parse_split_source(text: str) -> Optional[Tuple[str, str, float, int]]:
    """(source, part, fraction, seed) of a split source, or None for a plain source."""
    match = _SPLIT.match(text)
    if not match:
        return None
    return match["source"], match["part"], float(match["fraction"]), int(match["seed"])


def _toy(source: str, key: str) -> List[Prompt]:
    from diffrl_bench.toy import domain

    train, heldout = domain.prompt_splits()
    splits = {"train": train, "heldout": heldout, "all": domain.all_prompts()}
    split = source.split(":", 1)[1]
    if split not in splits:
        raise PromptFileError(f"{key}: unknown toy split {split!r}; use one of {sorted(splits)}")
    return [Prompt(spec.text, dict(spec.metadata), f"{source} #{n}") for n, spec in enumerate(splits[split], 1)]


def _split_source(source: str, key: str) -> Tuple[str, str]:
    head, sep, rest = source.partition(":")
    if sep and head in _FORMATS:
        fmt, path = head, rest
    elif source.endswith(".jsonl"):
        fmt, path = "geneval", source
    elif source.endswith(".txt"):
        fmt, path = "lines", source
    else:
        raise PromptFileError(f"{key}: unknown prompt source {source!r}; use toy:train|heldout|all, geneval:PATH "
                         f"(or PATH.jsonl), ocr:PATH, lines:PATH (or PATH.txt)")
    path = os.path.expanduser(path)
    if not path:
        raise PromptFileError(f"{key}: {source!r} names no file after '{fmt}:'")
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "not found"
        raise PromptFileError(f"{key}: prompt file {path!r} {what} (source {source!r}, cwd {os.getcwd()})")
    return fmt, path


def _lines(path: str, key: str) -> Iterator[Tuple[int, str]]:
    """(line number, stripped text) of each non-blank line; bad UTF-8 is reported with its line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            except UnicodeDecodeError as error:
                raise PromptFileError(f"{key}: {path}:{number}: not UTF-8 text ({error.reason} at byte "
                                      f"{error.start})") from None
            if text:
                yield number, text


def _load_geneval(path: str, key: str) -> List[Prompt]:
    from diffrl_bench.geneval import MetadataError, validate_metadata

    prompts = []
    for number, text in _lines(path, key):
        try:
            record = json.loads(text)
        except ValueError as error:
            raise PromptFileError(f"{key}: {path}:{number}: not valid JSON ({error}); GenEval metadata files hold "
                                  f"one JSON object a line") from None
        try:
            validate_metadata(record)
        except MetadataError as error:
            raise PromptFileError(f"{key}: {path}:{number}: {error}") from None
        prompts.append(Prompt(record["prompt"].strip(), record, f"{path}:{number}"))
    return prompts


def quoted_target(text: str) -> Optional[str]:
    """The first span between straight double quotes, as Flow-GRPO's OCR reward reads it; None without one."""
    parts = text.split('"')
    return parts[1] if len(parts) >= 3 else None


def _load_ocr(path: str, key: str) -> List[Prompt]:
    prompts = []
    for number, text in _lines(path, key):
        target = quoted_target(text)
        if target is None:
            raise PromptFileError(f"{key}: {path}:{number}: no text in double quotes to render "
                                  f"(OCR prompts quote their target, e.g. a sign reading \"OPEN\"): {text[:80]!r}")
        if not target.strip():
            raise PromptFileError(f"{key}: {path}:{number}: the quoted text to render is empty: {text[:80]!r}")
        prompts.append(Prompt(text, {"ocr_target": target}, f"{path}:{number}"))
    return prompts


def _load_lines(path: str, key: str) -> List[Prompt]:
    prompts = []
    for number, text in _lines(path, key):
        target = quoted_target(text)
        prompts.append(Prompt(text, {"ocr_target": target} if target and target.strip() else {}, f"{path}:{number}"))
    return prompts


# ------------------------------------------------------------------------------------------- checks of a run's use
def check_model_vocabulary(prompts: Sequence[Prompt], model_cfg, key: str) -> None:
    """Prompts the model's tokenizer would refuse (a backend with a `prompt_checker`, e.g. the toy model's fixed
    vocabulary), found without building the model: the first one is named with its file and line."""
    from diffrl_bench.registry import MODELS

    checker_of = getattr(MODELS.get(model_cfg.backend), "prompt_checker", None)
    if checker_of is None:
        return
    problem = checker_of(model_cfg.path)
    for prompt in prompts:
        why = problem(prompt.text)
        if why is not None:
            raise PromptFileError(f"{key}: {prompt.where}: model.backend {model_cfg.backend!r} "
                                  f"(model.path {model_cfg.path!r}) cannot take prompt {prompt.text[:80]!r}: {why}")


def check_prompts_per_step(prompts_per_step: int, prompts: Sequence[Prompt], source: str,
                           key: str = "data.train_prompts") -> None:
    """A step draws distinct prompts: more than the set holds would silently repeat prompts within a step."""
    if prompts_per_step > len(prompts):
        raise PromptFileError(f"rollout.prompts_per_step = {prompts_per_step} is larger than the {len(prompts)} "
                              f"prompts of {key} = {source!r}; a step draws distinct prompts, so lower "
                              f"rollout.prompts_per_step or use a larger prompt set")


def validate_prompt_sources(cfg, train: bool = True) -> Dict[str, List[Prompt]]:
    """Every prompt check of a run, before any model is built: the files (see the module docstring), the model's
    tokenizer, `rollout.prompts_per_step` (with `train`) and the metadata the run's rewards need.

    Returns the loaded prompts by config key (`data.train_prompts` with `train`, and `data.eval_prompts`), so the
    caller need not read the files again. `train=False` (eval) checks the evaluation prompts only."""
    from diffrl_bench.reward_harness import check_reward_metadata

    keys = ("data.train_prompts", "data.eval_prompts") if train else ("data.eval_prompts",)
    loaded = {}
    for key in keys:
        source = cfg.data[key.split(".", 1)[1]]
        prompts = load_prompts(source, key)
        check_model_vocabulary(prompts, cfg.model, key)
        loaded[key] = prompts
    if train:
        check_prompts_per_step(cfg.rollout.prompts_per_step, loaded["data.train_prompts"], cfg.data.train_prompts)
        check_reward_metadata(list(cfg.reward.components), loaded["data.train_prompts"], "data.train_prompts",
                              "reward.components")
    check_reward_metadata(list(cfg.eval.rewards), loaded["data.eval_prompts"], "data.eval_prompts", "eval.rewards")
    return loaded
