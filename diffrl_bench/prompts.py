"""Prompt sources for runs: the toy benchmark's fixed splits and the real prompt-file formats.

Sources (`data.train_prompts`, `data.eval_prompts`):

* `toy:train`, `toy:heldout`, `toy:all`: the built-in CPU benchmark (GenEval-style metadata).
* `geneval:PATH` or any `PATH.jsonl`: GenEval metadata, one JSON object a line with `prompt`, `tag` and `include`
  (optionally `exclude`) clauses `{class, count, color?, position?}`; the metadata is the whole record.
* `ocr:PATH`: one prompt a line, each quoting the text to render in straight double quotes (Flow-GRPO's OCR set);
  metadata `{"ocr_target": text}` (the first quoted span). A line without one is an error.
* `lines:PATH` or any `PATH.txt`: one prompt a line (DrawBench, Pick-a-Pic, OCR files); metadata `{}`, plus
  `{"ocr_target": text}` when the line has a quoted span, so an OCR file loads either way.

Blank lines are skipped and surrounding whitespace is stripped. A missing file, an empty file or a malformed line
raises an error naming the config key, the file and the line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple


@dataclass(frozen=True)
class Prompt:
    text: str
    metadata: Dict[str, Any]


class PromptFileError(ValueError):
    """A prompt file is missing, empty or has a malformed line; the message names key, file and line."""


_FORMATS = ("geneval", "ocr", "lines")


def load_prompts(source: str, key: str = "data.train_prompts") -> List[Prompt]:
    """Prompts with their metadata from a source string (see the module docstring for the forms)."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"{key}: empty prompt source; use toy:train, geneval:PATH, ocr:PATH or lines:PATH")
    if source.startswith("toy:"):
        return _toy(source, key)
    fmt, path = _split_source(source, key)
    loader = {"geneval": _load_geneval, "ocr": _load_ocr, "lines": _load_lines}[fmt]
    prompts = loader(path, key)
    if not prompts:
        raise PromptFileError(f"{key}: {path} holds no prompts")
    return prompts


def _toy(source: str, key: str) -> List[Prompt]:
    from diffrl_bench.toy import domain

    train, heldout = domain.prompt_splits()
    splits = {"train": train, "heldout": heldout, "all": domain.all_prompts()}
    split = source.split(":", 1)[1]
    if split not in splits:
        raise ValueError(f"{key}: unknown toy split {split!r}; use one of {sorted(splits)}")
    return [Prompt(spec.text, dict(spec.metadata)) for spec in splits[split]]


def _split_source(source: str, key: str) -> Tuple[str, str]:
    head, sep, rest = source.partition(":")
    if sep and head in _FORMATS:
        fmt, path = head, rest
    elif source.endswith(".jsonl"):
        fmt, path = "geneval", source
    elif source.endswith(".txt"):
        fmt, path = "lines", source
    else:
        raise ValueError(f"{key}: unknown prompt source {source!r}; use toy:train|heldout|all, geneval:PATH "
                         f"(or PATH.jsonl), ocr:PATH, lines:PATH (or PATH.txt)")
    path = os.path.expanduser(path)
    if not path:
        raise ValueError(f"{key}: {source!r} names no file after '{fmt}:'")
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
        prompts.append(Prompt(record["prompt"].strip(), record))
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
        prompts.append(Prompt(text, {"ocr_target": target}))
    return prompts


def _load_lines(path: str, key: str) -> List[Prompt]:
    prompts = []
    for _, text in _lines(path, key):
        target = quoted_target(text)
        prompts.append(Prompt(text, {"ocr_target": target} if target and target.strip() else {}))
    return prompts
