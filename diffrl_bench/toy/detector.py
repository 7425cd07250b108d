"""An exact programmatic GenEval-style checker for the toy domain (`diffrl_bench.toy.domain`).

Detection finds objects as the domain defines them: a shape of one palette colour, 4 to 8 px on a side, standing on
black background with a gap around it. A pixel is background when its brightest channel is below BACKGROUND_MAX,
and of palette colour k when it lies within COLOR_TOLERANCE (RGB distance) of prototype k; anything else is
off-palette. Each colour's pixels are split into 4-connected components. A component is an object only if it is
at least MIN_COMPONENT_AREA px, its bounding box is 4 to 8 px on a side with aspect at most MAX_ASPECT, and the box
grown by one pixel holds nothing but the component and background (up to MAX_DIRTY_PIXELS stray pixels, for
robustness to pixel noise). Like a real detector's confidence threshold, this refuses to see objects in clutter:
without it, RL learned to fill the canvas with colour noise in which a permissive detector found every object
asked for. The shape comes from the bounding-box fill ratio (square > 0.92, circle 0.65-0.92, triangle < 0.65).

Scoring follows GenEval's metadata semantics (see `score`). `palette_fidelity` is a separate naturalness statistic
that is deliberately not part of the reward, so that reward hacking (noise, blur, clutter) shows up in evaluation;
`extra_objects` counts objects beyond what the prompt asks for, the hacking GenEval's checks do not penalise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
from scipy import ndimage

from diffrl_bench.toy.domain import COLOR_NAMES, COLORS, relation_holds

BACKGROUND_MAX = 0.3
COLOR_TOLERANCE = 0.4
MIN_COMPONENT_AREA = 4
SQUARE_MIN_FILL = 0.92
CIRCLE_MIN_FILL = 0.65
MAX_ASPECT = 1.6
MIN_SIDE, MAX_SIDE = 4, 8
MAX_DIRTY_PIXELS = 2
PALETTE_TOLERANCE = 0.2

_PROTOTYPES = np.array([COLORS[name] for name in COLOR_NAMES], dtype=np.float32)  # (K, 3)
# 4-connectivity within one image plane of one colour; no connection across the batch or colour axes, so a single
# label call handles the whole batch.
_STRUCTURE = np.zeros((3, 3, 3, 3), dtype=bool)
_STRUCTURE[1, 1] = ndimage.generate_binary_structure(2, 1)

ImageBatch = Union[np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class Detection:
    """A detected object. `bbox` is (x_min, y_min, x_max, y_max), inclusive; (cx, cy) is the bounding-box centre."""

    shape: str
    color: str
    cx: float
    cy: float
    bbox: Tuple[int, int, int, int]
    area: int


def to_numpy_images(images: ImageBatch) -> np.ndarray:
    """A float32 (B, H, W, 3) array from torch (B, 3, H, W) or numpy (B, H, W, 3) images.

    Torch tensors are taken as channels-first (the reward convention), numpy arrays as channels-last (the
    convention of `domain.render`). A single image (no batch axis) gets a batch axis of one.
    """
    if isinstance(images, torch.Tensor):
        array = images.detach().to("cpu", torch.float32).numpy()
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[1] != 3:
            raise ValueError(f"expected a torch tensor (B, 3, H, W), got shape {tuple(images.shape)}")
        array = array.transpose(0, 2, 3, 1)
    else:
        array = np.asarray(images, dtype=np.float32)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"expected a numpy array (B, H, W, 3), got shape {array.shape}")
    return np.ascontiguousarray(array)


def _classify_shape(width: int, height: int, area: int) -> str | None:
    """The shape class, or None when the box is not the size or aspect of any domain object."""
    if not MIN_SIDE <= min(width, height) <= max(width, height) <= MAX_SIDE:
        return None
    if max(width, height) > MAX_ASPECT * min(width, height):
        return None
    fill = area / float(width * height)
    if fill > SQUARE_MIN_FILL:
        return "square"
    if fill >= CIRCLE_MIN_FILL:
        return "circle"
    return "triangle"


def detect_batch(images: ImageBatch) -> List[List[Detection]]:
    """Detections for every image of a batch, each list ordered by (colour, scan order of the component)."""
    array = to_numpy_images(images)
    batch, height, width = array.shape[:3]
    background = array.max(axis=-1) < BACKGROUND_MAX  # (B, H, W)
    distances = np.sqrt(((array[..., None, :] - _PROTOTYPES) ** 2).sum(axis=-1))  # (B, H, W, K)
    nearest = distances.argmin(axis=-1)
    on_palette = distances.min(axis=-1) <= COLOR_TOLERANCE
    masks = on_palette[:, None] & (nearest[:, None] == np.arange(len(COLOR_NAMES))[None, :, None, None])  # (B,K,H,W)
    labels, count = ndimage.label(masks, structure=_STRUCTURE)
    detections: List[List[Detection]] = [[] for _ in range(batch)]
    if count == 0:
        return detections
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    for label, slices in enumerate(ndimage.find_objects(labels), start=1):
        area = int(areas[label])
        if slices is None or area < MIN_COMPONENT_AREA:
            continue
        image_slice, color_slice, row_slice, col_slice = slices
        x_min, x_max = col_slice.start, col_slice.stop - 1
        y_min, y_max = row_slice.start, row_slice.stop - 1
        shape = _classify_shape(x_max - x_min + 1, y_max - y_min + 1, area)
        if shape is None:
            continue
        b, k = image_slice.start, color_slice.start
        rows = slice(max(0, y_min - 1), min(height, y_max + 2))
        cols = slice(max(0, x_min - 1), min(width, x_max + 2))
        clean = (labels[b, k, rows, cols] == label) | background[b, rows, cols]
        if int((~clean).sum()) > MAX_DIRTY_PIXELS:
            continue
        detections[b].append(
            Detection(
                shape=shape,
                color=COLOR_NAMES[k],
                cx=(x_min + x_max) / 2.0,
                cy=(y_min + y_max) / 2.0,
                bbox=(int(x_min), int(y_min), int(x_max), int(y_max)),
                area=area,
            )
        )
    return detections


def detect(image: ImageBatch) -> List[Detection]:
    """Detections in one image: numpy (H, W, 3) or torch (3, H, W)."""
    array = to_numpy_images(image)
    if array.shape[0] != 1:
        raise ValueError("detect takes one image; use detect_batch for a batch")
    return detect_batch(array)[0]


# --------------------------------------------------------------------------------------------------------------
# GenEval-style scoring
# --------------------------------------------------------------------------------------------------------------


def _matches(detection: Detection, item: Dict[str, Any], use_color: bool = True) -> bool:
    if detection.shape != item["class"]:
        return False
    return not (use_color and item.get("color")) or detection.color == item["color"]


def _relation_satisfied(subjects: Sequence[Detection], references: Sequence[Detection], relation: str) -> bool:
    return any(
        subject is not reference and relation_holds(relation, (subject.cx, subject.cy), (reference.cx, reference.cy))
        for subject in subjects
        for reference in references
    )


def _count_credit(n: int, target: int, exclude_count: int | None) -> float:
    """1 minus the relative shortfall below `target` and the relative excess at or past `exclude_count`."""
    shortfall = max(0, target - n)
    excess = max(0, n - (exclude_count - 1)) if exclude_count is not None else 0
    return max(0.0, 1.0 - (shortfall + excess) / float(target))


def score(detections: Sequence[Detection], metadata: Dict[str, Any]) -> Tuple[float, float]:
    """(strict, partial) score of one image's detections against a GenEval metadata dict.

    Strict (GenEval's per-image correctness, in {0, 1}): every include item `{class, count, color?, position?}` has
    at least `count` detections of its class (of its colour when given), and when `position = [relation, index]` is
    given at least one of them stands in `relation` to a detection matching include item `index`; and no exclude
    item `{class, count, color?}` has `count` or more matching detections.

    Partial (in [0, 1]): the mean credit over clauses. Each include item contributes
      - a count clause: `max(0, 1 - (shortfall + excess) / count)` with n detections of the class (any colour),
        shortfall = max(0, count - n), and excess = max(0, n - (E - 1)) when an exclude item for the same class
        forbids E or more (else 0). For count 1 without an exclude this is plain presence (1 iff n >= 1); for
        GenEval counting (exclude E = N + 1) it is `max(0, 1 - |n - N| / N)`, the exclude folded in;
      - a colour clause when it has a colour: min(1, n_coloured / count);
      - a relation clause when it has a position: 1 iff the relation holds as in the strict check.
    Any other exclude item (a class no include item names, or one with a colour) adds its own clause: 1 iff it is
    not violated.
    Every clause is 1 whenever strict is 1, so strict = 1 implies partial = 1.
    """
    include = metadata.get("include", [])
    exclude = metadata.get("exclude", []) or []
    included_classes = {item["class"] for item in include}

    def _folded(exclude_item: Dict[str, Any]) -> bool:
        # A colourless exclude on an included class is folded into that class's count clause.
        return not exclude_item.get("color") and exclude_item["class"] in included_classes

    strict = True
    credits: List[float] = []

    def matching(item: Dict[str, Any], use_color: bool = True) -> List[Detection]:
        return [d for d in detections if _matches(d, item, use_color)]

    for item in include:
        count = int(item.get("count", 1))
        of_class = matching(item, use_color=False)
        coloured = matching(item)
        if len(coloured) < count:
            strict = False
        exclude_counts = [int(e["count"]) for e in exclude if _folded(e) and e["class"] == item["class"]]
        credits.append(_count_credit(len(of_class), count, min(exclude_counts) if exclude_counts else None))
        if item.get("color"):
            credits.append(min(1.0, len(coloured) / float(count)))
        if item.get("position"):
            relation, reference_index = item["position"]
            holds = _relation_satisfied(coloured, matching(include[int(reference_index)]), relation)
            strict = strict and holds
            credits.append(1.0 if holds else 0.0)

    for item in exclude:
        violated = len(matching(item)) >= int(item["count"])
        strict = strict and not violated
        if not _folded(item):
            credits.append(0.0 if violated else 1.0)

    partial = float(np.mean(credits)) if credits else float(strict)
    return float(strict), partial


def score_batch(images: ImageBatch, metadata_list: Sequence[Dict[str, Any]]) -> Tuple[np.ndarray, np.ndarray]:
    """Strict and partial scores (each float32 (B,)) of a batch of images against one metadata dict per image."""
    all_detections = detect_batch(images)
    if len(all_detections) != len(metadata_list):
        raise ValueError(f"got {len(all_detections)} images but {len(metadata_list)} metadata dicts")
    scores = np.array([score(d, m) for d, m in zip(all_detections, metadata_list)], dtype=np.float32).reshape(-1, 2)
    return scores[:, 0].copy(), scores[:, 1].copy()


def palette_fidelity(images: ImageBatch) -> np.ndarray:
    """Fraction of pixels within RGB distance PALETTE_TOLERANCE of a palette colour or of black, per image (B,).

    Clean renders score exactly 1.0; noisy, blurred or cluttered generations score lower. It is a held-out
    naturalness statistic, not a training reward.
    """
    array = to_numpy_images(images)
    palette = np.concatenate([np.zeros((1, 3), dtype=np.float32), _PROTOTYPES])  # black first
    distances = np.sqrt(((array[..., None, :] - palette) ** 2).sum(axis=-1))  # (B, H, W, K+1)
    on_palette = distances.min(axis=-1) <= PALETTE_TOLERANCE
    return on_palette.reshape(array.shape[0], -1).mean(axis=1).astype(np.float32)


def extra_objects(detections: Sequence[Detection], metadata: Dict[str, Any]) -> int:
    """How many detected objects go beyond what the prompt asks for: per shape, detections past the include items'
    total count of that shape (any colour), plus every detection of a shape no include item names.

    GenEval's strict check only forbids what an exclude item names, so an extra object elsewhere on the canvas
    costs a policy nothing; counting them per shape (not per colour) charges an extra object, not a wrong colour.
    """
    asked: Dict[str, int] = {}
    for item in metadata.get("include", []):
        asked[item["class"]] = asked.get(item["class"], 0) + int(item.get("count", 1))
    found: Dict[str, int] = {}
    for detection in detections:
        found[detection.shape] = found.get(detection.shape, 0) + 1
    return sum(max(0, n - asked.get(shape, 0)) for shape, n in found.items())


def extra_objects_batch(images: ImageBatch, metadata_list: Sequence[Dict[str, Any]]) -> np.ndarray:
    """`extra_objects` of each image of a batch (int64 (B,)) against one metadata dict per image."""
    all_detections = detect_batch(images)
    if len(all_detections) != len(metadata_list):
        raise ValueError(f"got {len(all_detections)} images but {len(metadata_list)} metadata dicts")
    return np.array([extra_objects(d, m) for d, m in zip(all_detections, metadata_list)], dtype=np.int64)
