"""A synthetic GenEval-style compositional text-to-image domain that needs no downloaded weights.

Images are 16x16 RGB renders of at most three coloured shapes on a black background. Prompts follow GenEval's six
task families with GenEval's wording and metadata format (one dict per prompt, as in GenEval's
`test_metadata.jsonl`), so the same include/exclude scoring applies. `sample_scene` draws a scene that satisfies a
prompt under the programmatic detector in `diffrl_bench.toy.detector`; it is the pretraining data of the toy flow
model, and the detector is the RL reward.

Shapes are drawn so that their bounding-box fill ratios separate cleanly, which is what the detector classifies on:
square 1.0, circle 0.76-0.84 (pixel disc), triangle about 0.52 (apex-up staircase).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

IMAGE_SIZE = 16

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: Dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}

# Saturated prototypes far apart in RGB (pairwise distance > 0.7), so that nearest-prototype labelling stays exact
# under moderate pixel noise; all have max channel >= 0.9, far above the detector's foreground threshold.
COLORS: Dict[str, Tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (0.95, 0.9, 0.15),
}
COLOR_NAMES: Tuple[str, ...] = tuple(COLORS)

OBJECT_SIZES: Tuple[int, ...] = (5, 7)
MAX_OBJECTS = 3
# Bounding boxes are kept at least this many pixels apart so that same-coloured objects never merge into one
# connected component.
MIN_GAP = 1

FAMILIES: Tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: Tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: Dict[int, str] = {2: "two", 3: "three"}
# Centre offset (pixels) a relation must exceed; the detector uses the same margin.
RELATION_MARGIN = 1.0

HELDOUT_FRACTION = 0.3
_SPLIT_SEED = 20240607
_DISTRACTOR_PROBABILITY = 0.3
_MAX_SCENE_TRIES = 500


# --------------------------------------------------------------------------------------------------------------
# Objects and rendering
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene: `x`, `y` are the top-left column and row of its `size` x `size` bounding box."""

    shape: str
    color: str
    x: int
    y: int
    size: int

    @property
    def center(self) -> Tuple[float, float]:
        """Bounding-box centre (cx, cy), the point the detector measures relations from."""
        half = (self.size - 1) / 2.0
        return self.x + half, self.y + half


@lru_cache(maxsize=None)
def _shape_mask_cached(shape: str, size: int) -> np.ndarray:
    rows, cols = np.mgrid[0:size, 0:size]
    if shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        centre = (size - 1) / 2.0
        mask = (cols - centre) ** 2 + (rows - centre) ** 2 <= (size / 2.0) ** 2
    elif shape == "triangle":
        # Apex up: row r has width 2*floor(r/2)+1, centred. Every row keeps the centre column, so the triangle is
        # 4-connected, and its bottom row spans the full box, so the bounding box is exactly size x size.
        half_width = rows // 2
        mask = np.abs(cols - (size - 1) // 2) <= half_width
    else:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    mask.setflags(write=False)
    return mask


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of `shape` filling its bounding box (read-only, cached)."""
    if size < 3 or size % 2 == 0:
        raise ValueError(f"shape size must be odd and >= 3, got {size}")
    return _shape_mask_cached(shape, size)


def fill_ratio(shape: str, size: int) -> float:
    """Fraction of the bounding box a shape covers: the statistic the detector classifies shapes by."""
    return float(shape_mask(shape, size).mean())


def render(objects: Sequence[SceneObject], size: int = IMAGE_SIZE) -> np.ndarray:
    """Render objects onto a black `size` x `size` canvas; returns (H, W, 3) float32 in [0, 1]."""
    image = np.zeros((size, size, 3), dtype=np.float32)
    for obj in objects:
        if obj.color not in COLORS:
            raise ValueError(f"unknown colour {obj.color!r}; known colours: {', '.join(COLOR_NAMES)}")
        if obj.x < 0 or obj.y < 0 or obj.x + obj.size > size or obj.y + obj.size > size:
            raise ValueError(f"{obj} does not fit inside a {size}x{size} image")
        mask = shape_mask(obj.shape, obj.size)
        patch = image[obj.y : obj.y + obj.size, obj.x : obj.x + obj.size]
        patch[mask] = COLORS[obj.color]
    return image


# --------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSpec:
    """A prompt: its text, its GenEval task family and its GenEval metadata dict (include/exclude clauses)."""

    text: str
    family: str
    metadata: Dict[str, Any]

    def __hash__(self) -> int:  # the metadata dict is unhashable; the text identifies a prompt uniquely
        return hash(self.text)


def _article(word: str) -> str:
    # None of the current words starts with a vowel, but keep English right if the vocabulary grows.
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(shape: str, color: str | None = None) -> str:
    words = f"{color} {shape}" if color else shape
    return f"{_article(words)} {words}"


def _spec(family: str, text: str, include: List[Dict[str, Any]], exclude: List[Dict[str, Any]] | None = None) -> PromptSpec:
    metadata: Dict[str, Any] = {"tag": family, "include": include}
    if exclude:
        metadata["exclude"] = exclude
    metadata["prompt"] = text
    return PromptSpec(text=text, family=family, metadata=metadata)


def _build_prompts() -> Tuple[PromptSpec, ...]:
    prompts: List[PromptSpec] = []
    shape_pairs = list(itertools.permutations(SHAPES, 2))
    color_pairs = list(itertools.permutations(COLOR_NAMES, 2))

    for shape in SHAPES:
        prompts.append(_spec("single_object", f"a photo of {_noun_phrase(shape)}", [{"class": shape, "count": 1}]))

    for first, second in shape_pairs:
        text = f"a photo of {_noun_phrase(first)} and {_noun_phrase(second)}"
        prompts.append(_spec("two_object", text, [{"class": first, "count": 1}, {"class": second, "count": 1}]))

    for shape in SHAPES:
        for count, word in COUNT_WORDS.items():
            text = f"a photo of {word} {PLURALS[shape]}"
            # GenEval's counting clause: at least N and not N+1, i.e. exactly N.
            prompts.append(
                _spec("counting", text, [{"class": shape, "count": count}], [{"class": shape, "count": count + 1}])
            )

    for color in COLOR_NAMES:
        for shape in SHAPES:
            text = f"a photo of {_noun_phrase(shape, color)}"
            prompts.append(_spec("colors", text, [{"class": shape, "count": 1, "color": color}]))

    for subject, reference in shape_pairs:
        for relation in RELATIONS:
            text = f"a photo of {_noun_phrase(subject)} {relation} {_noun_phrase(reference)}"
            # GenEval lists the reference first; the subject (item 1) is positioned relative to include item 0.
            include = [
                {"class": reference, "count": 1},
                {"class": subject, "count": 1, "position": [relation, 0]},
            ]
            prompts.append(_spec("position", text, include))

    for first, second in shape_pairs:
        for color_a, color_b in color_pairs:
            text = f"a photo of {_noun_phrase(first, color_a)} and {_noun_phrase(second, color_b)}"
            include = [
                {"class": first, "count": 1, "color": color_a},
                {"class": second, "count": 1, "color": color_b},
            ]
            prompts.append(_spec("color_attr", text, include))
    return tuple(prompts)


_PROMPTS = _build_prompts()


def all_prompts() -> List[PromptSpec]:
    """All 123 prompts in a fixed order: families in GenEval order, then a fixed enumeration within each."""
    return list(_PROMPTS)


def prompt_splits() -> Tuple[List[PromptSpec], List[PromptSpec]]:
    """Deterministic (train, heldout) split: about 30% of each family (at least one) is held out.

    Uses its own fixed-seed generator, so the split never depends on any global RNG state. Both lists keep the
    order of `all_prompts()`.
    """
    rng = np.random.default_rng(_SPLIT_SEED)
    heldout_texts = set()
    for family in FAMILIES:
        members = [spec.text for spec in _PROMPTS if spec.family == family]
        n_heldout = max(1, int(round(HELDOUT_FRACTION * len(members))))
        for index in rng.permutation(len(members))[:n_heldout]:
            heldout_texts.add(members[index])
    train = [spec for spec in _PROMPTS if spec.text not in heldout_texts]
    heldout = [spec for spec in _PROMPTS if spec.text in heldout_texts]
    return train, heldout


def vocabulary() -> List[str]:
    """Sorted list of every word used in any prompt."""
    return sorted({word for spec in _PROMPTS for word in spec.text.split()})


# --------------------------------------------------------------------------------------------------------------
# Scene sampling
# --------------------------------------------------------------------------------------------------------------


def relation_holds(relation: str, subject_center: Tuple[float, float], reference_center: Tuple[float, float]) -> bool:
    """GenEval-like centre relation with a margin; image rows grow downward, so "above" means a smaller row."""
    (sx, sy), (rx, ry) = subject_center, reference_center
    if relation == "left of":
        return sx < rx - RELATION_MARGIN
    if relation == "right of":
        return sx > rx + RELATION_MARGIN
    if relation == "above":
        return sy < ry - RELATION_MARGIN
    if relation == "below":
        return sy > ry + RELATION_MARGIN
    raise ValueError(f"unknown relation {relation!r}; known relations: {', '.join(RELATIONS)}")


def _free_positions(size: int, placed: Sequence[SceneObject], canvas: int) -> List[Tuple[int, int]]:
    """Every top-left corner where a `size` box fits the canvas and keeps MIN_GAP from every placed box."""
    coords = np.arange(canvas - size + 1)
    xs, ys = np.meshgrid(coords, coords, indexing="xy")
    ok = np.ones(xs.shape, dtype=bool)
    for obj in placed:
        # Boxes are separated iff one lies entirely left/right/above/below the other with MIN_GAP pixels between.
        apart_x = (xs + size + MIN_GAP <= obj.x) | (obj.x + obj.size + MIN_GAP <= xs)
        apart_y = (ys + size + MIN_GAP <= obj.y) | (obj.y + obj.size + MIN_GAP <= ys)
        ok &= apart_x | apart_y
    return list(zip(xs[ok].tolist(), ys[ok].tolist()))


def _scene_plan(spec: PromptSpec, rng: np.random.Generator) -> List[Tuple[str, str]]:
    """The (shape, colour) of each object the scene needs, distractors included, before placement."""
    include = spec.metadata["include"]

    def colour_of(item: Dict[str, Any]) -> str:
        return item.get("color") or COLOR_NAMES[rng.integers(len(COLOR_NAMES))]

    plan: List[Tuple[str, str]] = []
    for item in include:
        for _ in range(int(item["count"])):
            plan.append((item["class"], colour_of(item)))
    # Distractors (a shape the prompt does not mention) teach the model that extra objects are allowed; counting
    # scenes must hold exactly N of their shape and colour_attr scenes stay minimal, so they get none.
    if spec.family in ("single_object", "two_object", "colors", "position") and len(plan) < MAX_OBJECTS:
        if rng.random() < _DISTRACTOR_PROBABILITY:
            mentioned = {item["class"] for item in include}
            others = [shape for shape in SHAPES if shape not in mentioned]
            plan.append((others[rng.integers(len(others))], COLOR_NAMES[rng.integers(len(COLOR_NAMES))]))
    return plan


def sample_scene(spec: PromptSpec, rng: np.random.Generator, canvas: int = IMAGE_SIZE) -> List[SceneObject]:
    """A random scene that satisfies `spec` under the detector.

    Objects get random sizes and positions (and colours where the prompt leaves them open). Each object is placed
    uniformly among the corners still free; if none is free (or, for position prompts, none satisfies the relation)
    the whole scene is redrawn. Valid scenes always exist in 16 px (three 7 px boxes fit in an L), so this ends
    quickly in practice; it raises RuntimeError after a bounded number of redraws rather than looping forever.
    """
    include = spec.metadata["include"]
    position_item = next((item for item in include if item.get("position")), None)
    for _ in range(_MAX_SCENE_TRIES):
        plan = _scene_plan(spec, rng)
        placed: List[SceneObject] = []
        for index, (shape, color) in enumerate(plan):
            size = int(OBJECT_SIZES[rng.integers(len(OBJECT_SIZES))])
            candidates = _free_positions(size, placed, canvas)
            if position_item is not None and index == 1:
                # Plan order follows the include list, so object 0 is the reference and object 1 the subject.
                relation, _reference_index = position_item["position"]
                half = (size - 1) / 2.0
                candidates = [
                    (x, y) for x, y in candidates if relation_holds(relation, (x + half, y + half), placed[0].center)
                ]
            if not candidates:
                break
            x, y = candidates[rng.integers(len(candidates))]
            placed.append(SceneObject(shape=shape, color=color, x=int(x), y=int(y), size=size))
        else:
            # Shuffle so the drawing order (and so the object list) carries no hint of which object is which.
            return [placed[i] for i in rng.permutation(len(placed))]
    raise RuntimeError(f"could not place a scene for {spec.text!r} after {_MAX_SCENE_TRIES} tries")


def sample_batch(specs: Sequence[PromptSpec], rng: np.random.Generator, canvas: int = IMAGE_SIZE) -> np.ndarray:
    """Render one random satisfying scene per spec: (B, H, W, 3) float32 in [0, 1]."""
    images = np.zeros((len(specs), canvas, canvas, 3), dtype=np.float32)
    for index, spec in enumerate(specs):
        images[index] = render(sample_scene(spec, rng, canvas), size=canvas)
    return images
