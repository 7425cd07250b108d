"""OCR reward (Flow-GRPO's text-rendering task): read the image with RapidOCR, compare with the quoted target.

RapidOCR (`rapidocr-onnxruntime`) ships its PP-OCRv4 detection and recognition models inside the wheel, so this
reward runs for real without downloads.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from diffrl_bench.prompts import quoted_target
from diffrl_bench.registry import REWARDS
from diffrl_bench.rewards._common import check_images, option, to_uint8_hwc


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insertions, deletions, substitutions), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


WHITESPACE_MODES = ("all", "ascii_space")
"""`all`: drop every whitespace character (str.split); `ascii_space`: drop only U+0020, as Flow-GRPO's
`.replace(' ', '')` does (flow_grpo@9745241c:flow_grpo/ocr.py:46-47), so tabs/newlines/other spaces still count."""


def normalize_text(text: str, case_sensitive: bool = False, whitespace: str = "all") -> str:
    """Drop whitespace (the fast detector setting can merge or split words) and, by default, lower-case."""
    if whitespace not in WHITESPACE_MODES:
        raise ValueError(f"ocr whitespace={whitespace!r} is not one of {list(WHITESPACE_MODES)}")
    text = "".join(text.split()) if whitespace == "all" else text.replace(" ", "")
    return text if case_sensitive else text.lower()


def ocr_score(recognized: str, target: str, case_sensitive: bool = False,
              substring_match: bool = True, whitespace: str = "all") -> Tuple[float, int]:
    """(score, distance): `1 - min(d, len(target)) / len(target)` on normalised texts, as Flow-GRPO defines it.

    With `substring_match` (Flow-GRPO's released code) a target found anywhere in the recognised text has d = 0,
    so surrounding text the prompt also asks for is not penalised. The clip at len(target) keeps long misreadings
    at 0 rather than negative.
    """
    recognized = normalize_text(recognized, case_sensitive, whitespace)
    target = normalize_text(target, case_sensitive, whitespace)
    if not target:
        raise ValueError("the OCR target is empty after removing whitespace")
    distance = 0 if substring_match and target in recognized else edit_distance(recognized, target)
    return 1.0 - min(distance, len(target)) / len(target), distance


@REWARDS.register("ocr")
class OcrReward:
    """Text-rendering accuracy in [0, 1]: `1 - min(edit distance, len(target)) / len(target)`.

    The target is the prompt metadata's `ocr_target` (set by the `ocr:`/`lines:` prompt loaders), else the first
    span in straight double quotes of the prompt; a prompt with neither is an error. Texts are compared without
    whitespace and case-insensitively, as Flow-GRPO does. Recognised boxes scoring below `text_score` are dropped,
    the rest concatenated in reading order.

    Options: `det_limit_side_len` (320) and `det_limit_type` ("max"): the detector's working size (RapidOCR's
    default, 736 "min", upscales small images and measured about 35x slower); `threads` (1 onnxruntime thread);
    `text_score` (0.5); `case_sensitive` (false); `substring_match` (true, Flow-GRPO's code); `whitespace`
    ("all", or "ascii_space": Flow-GRPO's, see `WHITESPACE_MODES`).
    Logged parts: `ocr.distance` (raw edit distance), `ocr.exact` (1 when the normalised texts match).
    """

    name = "ocr"

    def __init__(self, det_limit_side_len: int = 320, det_limit_type: str = "max", threads: int = 1,
                 text_score: float = 0.5, case_sensitive: bool = False, substring_match: bool = True,
                 whitespace: str = "all"):
        name = self.name
        threads = option(name, "threads", threads, int, lambda v: v >= 1, "is not at least 1")
        self.engine_options = dict(
            det_limit_side_len=option(name, "det_limit_side_len", det_limit_side_len, int, lambda v: v >= 1,
                                      "is not at least 1"),
            det_limit_type=option(name, "det_limit_type", det_limit_type, str, lambda v: v in ("max", "min"),
                                  "is not 'max' or 'min'"),
            intra_op_num_threads=threads, inter_op_num_threads=threads,
            text_score=option(name, "text_score", text_score, float, lambda v: 0 <= v <= 1, "is not in [0, 1]"))
        self.case_sensitive = option(name, "case_sensitive", case_sensitive, bool)
        self.substring_match = option(name, "substring_match", substring_match, bool)
        self.whitespace = option(name, "whitespace", whitespace, str, lambda v: v in WHITESPACE_MODES,
                                 f"is not one of {list(WHITESPACE_MODES)}")
        self._engine = None
        self._lock = threading.Lock()

    def _get_engine(self):
        # Built on first use: the models take a moment to load and the reward object may never be called.
        with self._lock:
            if self._engine is None:
                try:
                    from rapidocr_onnxruntime import RapidOCR
                except ImportError as error:
                    raise ImportError(f"the ocr reward needs rapidocr-onnxruntime (pip install rapidocr-onnxruntime): "
                                      f"{error}") from error
                self._engine = RapidOCR(**self.engine_options)
            return self._engine

    def read(self, image_hwc: np.ndarray) -> str:
        """The text RapidOCR reads in one uint8 RGB image (boxes concatenated, no separator)."""
        # RapidOCR treats arrays as OpenCV BGR, the order its models were trained on.
        result, _ = self._get_engine()(np.ascontiguousarray(image_hwc[..., ::-1]), use_cls=False)
        return "".join(str(item[1]) for item in result or [])

    @staticmethod
    def target_of(prompt: str, metadata: Optional[Dict[str, Any]]) -> str:
        target = (metadata or {}).get("ocr_target") or quoted_target(prompt)
        if not target or not target.strip():
            raise ValueError(f"ocr: prompt has no quoted text to render and no metadata 'ocr_target': {prompt[:100]!r}")
        return target

    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 metadata: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        check_images(self.name, images, prompts)
        metadata = metadata or [{}] * len(prompts)
        targets = [self.target_of(p, m) for p, m in zip(prompts, metadata)]
        scores, distances, exact = [], [], []
        for array, target in zip(to_uint8_hwc(images), targets):
            recognized = self.read(array)
            score, distance = ocr_score(recognized, target, self.case_sensitive, self.substring_match,
                                        self.whitespace)
            scores.append(score)
            distances.append(float(distance))
            exact.append(float(normalize_text(recognized, self.case_sensitive, self.whitespace)
                               == normalize_text(target, self.case_sensitive, self.whitespace)))
        return {self.name: torch.tensor(scores), f"{self.name}.distance": torch.tensor(distances),
                f"{self.name}.exact": torch.tensor(exact)}
