"""GenEval's clause rules as pure code: which detections count, where objects stand, and the per-image scores.

Rules (following GenEval's `evaluation/evaluate_images.py`; thresholds are `Rules` fields):

* Detections of a class are kept when their confidence is above `threshold` (0.3; `counting_threshold` 0.9 for
  prompts tagged `counting`), most confident first, at most `max_objects` (16) per class, optionally with greedy
  NMS (`nms_threshold`, 1.0 = off as in GenEval).
* include clause `{class, count, color?, position?}`: the `count` most confident detections of the class must
  exist; with `color`, at least `count` of those must be classified as that colour; with `position = [relation,
  j]`, every one of them must stand in `relation` to every object matched by include clause j (which must itself
  have matched). Relations follow GenEval: centre offset shrunk by `position_threshold` (0.1) times the summed box
  sizes, normalised by the raw offset length; left of / right of / above / below when its x / y component is below
  -0.5 or above 0.5 (image y grows downward, so `above` is a negative y offset).
* exclude clause `{class, count}`: fails when `count` or more detections of the class are kept.

Scores per image: `strict` = GenEval's correctness (every clause holds), and a partial credit:

* `partial_mode="clauses"` (default): the fraction of clauses that hold, counting per include clause one count
  clause, one colour clause when it has a colour and one position clause when it has a position, and one clause
  per exclude clause. strict = 1 iff partial = 1.
* `partial_mode="flow_grpo"`: the graded score of Flow-GRPO's released GenEval reward server, kept for
  comparisons with its numbers: per include clause `1 - |count - n| / count` over all n kept detections (negative
  when n > 2 count); when n != count a single 0 for its colour/position terms; otherwise `1 - |count - k| / count`
  for k detections of the right colour and, for a position clause, 0 on failure; as released, a checked position
  clause also adds a 1 even after a failure. Exclude clauses are ignored. The mean of the terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

PARTIAL_MODES = ("clauses", "flow_grpo")


@dataclass
class Rules:
    """GenEval's evaluation constants (the defaults of its evaluate_images.py)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    nms_threshold: float = 1.0
    position_threshold: float = 0.1


@dataclass
class Detection:
    """One detected object: class name, confidence, box (x1, y1, x2, y2) in pixels, colour when already known.

    `mask` (optional, a boolean HxW array) is for the backend's colour classifier only.
    """

    label: str
    score: float
    box: Tuple[float, float, float, float]
    color: Optional[str] = None
    mask: Any = field(default=None, repr=False)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive pixel convention (a box from x1 to x2 covers x2 - x1 + 1 pixels)."""

    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def keep_detections(detections: Sequence[Detection], tag: Optional[str], rules: Rules) -> Dict[str, List[Detection]]:
    """Class name -> kept detections, most confident first (threshold, per-class cap, optional NMS)."""
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    by_class: Dict[str, List[Detection]] = {}
    for det in detections:
        if det.score > threshold:
            by_class.setdefault(det.label, []).append(det)
    kept: Dict[str, List[Detection]] = {}
    for label, dets in by_class.items():
        queue = sorted(dets, key=lambda d: -d.score)[: rules.max_objects]
        chosen: List[Detection] = []
        while queue:
            best = queue.pop(0)
            chosen.append(best)
            if rules.nms_threshold < 1:
                queue = [d for d in queue if box_iou(best.box, d.box) < rules.nms_threshold]
        kept[label] = chosen
    return kept


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> set:
    """The relations of A to B among `metadata.RELATIONS` (GenEval's rule; an empty set when the boxes nearly
    coincide)."""
    ca = ((box_a[0] + box_a[2]) / 2.0, (box_a[1] + box_a[3]) / 2.0)
    cb = ((box_b[0] + box_b[2]) / 2.0, (box_b[1] + box_b[3]) / 2.0)
    size = (abs(box_a[2] - box_a[0]) + abs(box_b[2] - box_b[0]), abs(box_a[3] - box_a[1]) + abs(box_b[3] - box_b[1]))
    offset = (ca[0] - cb[0], ca[1] - cb[1])
    # Shrinking the offset by a share of the object sizes keeps touching or overlapping objects from counting as
    # "left of" on a one-pixel difference.
    revised = [math.copysign(max(abs(o) - threshold * s, 0.0), o) for o, s in zip(offset, size)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


ColorFn = Callable[[str, List[Detection]], List[str]]


class _ColorLookup:
    """Colours of detections: their own `color`, else the classifier's answer, asked once per detection."""

    def __init__(self, classify: Optional[ColorFn]):
        self.classify = classify
        self.known: Dict[int, str] = {}

    def __call__(self, objects: List[Detection], label: str) -> List[str]:
        missing = [d for d in objects if d.color is None and id(d) not in self.known]
        if missing:
            if self.classify is None:
                raise ValueError(f"detections of {label!r} carry no colour and no colour classifier was given")
            colors = list(self.classify(label, missing))
            if len(colors) != len(missing):
                raise RuntimeError(f"the colour classifier named {len(colors)} colours for {len(missing)} {label!r}")
            for det, color in zip(missing, colors):
                self.known[id(det)] = color
        return [d.color if d.color is not None else self.known[id(d)] for d in objects]


@dataclass
class ImageScore:
    strict: float
    partial: float
    clauses: List[Tuple[str, bool]]
    detected: Dict[str, int]


def evaluate(objects: Dict[str, List[Detection]], metadata: Dict[str, Any], rules: Optional[Rules] = None,
             classify: Optional[ColorFn] = None, partial_mode: str = "clauses") -> ImageScore:
    """Score one image's kept detections (`keep_detections`) against a GenEval record (see the module docstring).

    `classify(label, detections) -> colours` names the colour of detections whose `color` is None; it is called
    only for objects a colour clause looks at.
    """
    if partial_mode not in PARTIAL_MODES:
        raise ValueError(f"partial_mode must be one of {list(PARTIAL_MODES)}, got {partial_mode!r}")
    rules = rules or Rules()
    colors = _ColorLookup(classify)
    clauses: List[Tuple[str, bool]] = []
    groups: List[Optional[List[Detection]]] = []
    for item in metadata.get("include", []):
        label, count = item["class"], int(item["count"])
        found = objects.get(label, [])[:count]
        matched = len(found) >= count
        clauses.append((f"{label} >= {count}", matched))
        if "color" in item:
            ok = matched and colors(found, label).count(item["color"]) >= count
            clauses.append((f"{item['color']} {label} >= {count}", ok))
            matched = matched and ok
        if "position" in item:
            relation, target = item["position"]
            reference = groups[target] if target < len(groups) else None
            ok = matched and reference is not None and all(
                relation in relative_position(obj.box, ref.box, rules.position_threshold)
                for obj in found for ref in reference)
            clauses.append((f"{label} {relation} include[{target}]", ok))
            matched = matched and ok
        groups.append(found if matched else None)
    for item in metadata.get("exclude", []):
        label, count = item["class"], int(item["count"])
        clauses.append((f"{label} < {count}", len(objects.get(label, [])) < count))
    strict = float(all(ok for _, ok in clauses))
    if partial_mode == "clauses":
        partial = sum(ok for _, ok in clauses) / len(clauses) if clauses else strict
    else:
        partial = _flow_grpo_partial(objects, metadata, rules, colors)
    return ImageScore(strict, float(partial), clauses, {k: len(v) for k, v in objects.items()})


def _flow_grpo_partial(objects: Dict[str, List[Detection]], metadata: Dict[str, Any], rules: Rules,
                       colors: _ColorLookup) -> float:
    terms: List[float] = []
    groups: List[Optional[List[Detection]]] = []
    for item in metadata.get("include", []):
        label, count = item["class"], int(item["count"])
        found = objects.get(label, [])
        terms.append(1 - abs(count - len(found)) / count)
        matched = len(found) == count
        if not matched:
            if "color" in item or "position" in item:
                terms.append(0.0)
        else:
            if "color" in item:
                right = colors(found, label).count(item["color"])
                terms.append(1 - abs(count - right) / count)
                matched = right == count
            if "position" in item and matched:
                relation, target = item["position"]
                reference = groups[target] if target < len(groups) else None
                if reference is None:
                    matched = False
                    terms.append(0.0)
                else:
                    holds = all(relation in relative_position(obj.box, ref.box, rules.position_threshold)
                                for obj in found for ref in reference)
                    if not holds:
                        matched = False
                        terms.append(0.0)
                    terms.append(1.0)  # as released: appended whether or not the relation held
        groups.append(found if matched else None)
    return sum(terms) / len(terms) if terms else 0.0
