"""The toy GenEval domain: prompts and splits, scene sampling, the exact detector, and its reward plugins."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from diffrl_bench import registry
from diffrl_bench.registry import REWARDS
from diffrl_bench.toy import detector, domain
from diffrl_bench.toy.domain import (
    COLOR_NAMES,
    FAMILIES,
    IMAGE_SIZE,
    MAX_OBJECTS,
    OBJECT_SIZES,
    PromptSpec,
    SceneObject,
    all_prompts,
    fill_ratio,
    prompt_splits,
    render,
    sample_batch,
    sample_scene,
    vocabulary,
)

EXPECTED_FAMILY_COUNTS = {
    "single_object": 3,
    "two_object": 6,
    "counting": 6,
    "colors": 12,
    "position": 24,
    "color_attr": 72,
}


def _prompt(text: str) -> PromptSpec:
    matches = [spec for spec in all_prompts() if spec.text == text]
    assert len(matches) == 1, text
    return matches[0]


def _to_torch(images: np.ndarray) -> torch.Tensor:
    """numpy (B, H, W, 3) renders as the (B, 3, H, W) tensors rewards receive."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def random_scenes():
    """2,000 random satisfying scenes drawn from every prompt (each prompt about 16 times)."""
    rng = np.random.default_rng(1234)
    prompts = all_prompts()
    specs = [prompts[i % len(prompts)] for i in range(2000)]
    scenes = [sample_scene(spec, rng) for spec in specs]
    images = np.stack([render(scene) for scene in scenes])
    return specs, scenes, images


# ------------------------------------------------------------------------------------------------------------------
# Prompts and splits
# ------------------------------------------------------------------------------------------------------------------


def test_prompt_set_has_genevals_families_wording_and_metadata():
    prompts = all_prompts()
    assert len(prompts) == 123
    assert len({spec.text for spec in prompts}) == 123
    assert Counter(spec.family for spec in prompts) == EXPECTED_FAMILY_COUNTS
    assert tuple(dict.fromkeys(spec.family for spec in prompts)) == FAMILIES  # families appear in GenEval order
    assert all(spec.metadata["tag"] == spec.family and spec.metadata["prompt"] == spec.text for spec in prompts)

    assert _prompt("a photo of a circle").metadata["include"] == [{"class": "circle", "count": 1}]
    two = _prompt("a photo of a triangle and a square").metadata
    assert two["include"] == [{"class": "triangle", "count": 1}, {"class": "square", "count": 1}]
    counting = _prompt("a photo of three squares").metadata
    assert counting["include"] == [{"class": "square", "count": 3}]
    assert counting["exclude"] == [{"class": "square", "count": 4}]
    assert _prompt("a photo of a yellow triangle").metadata["include"] == [
        {"class": "triangle", "count": 1, "color": "yellow"}
    ]
    assert _prompt("a photo of a circle left of a square").metadata["include"] == [
        {"class": "square", "count": 1},
        {"class": "circle", "count": 1, "position": ["left of", 0]},
    ]
    assert _prompt("a photo of a red circle and a blue square").metadata["include"] == [
        {"class": "circle", "count": 1, "color": "red"},
        {"class": "square", "count": 1, "color": "blue"},
    ]
    words = vocabulary()
    assert words == sorted(set(words))
    assert {"circles", "three", "below", "yellow", "and"} <= set(words)


def test_prompt_splits_are_deterministic_disjoint_and_cover_every_family():
    train, heldout = prompt_splits()
    # Disturbing the global RNGs must not change the split.
    np.random.seed(99)
    torch.manual_seed(99)
    train_again, heldout_again = prompt_splits()
    assert [s.text for s in train] == [s.text for s in train_again]
    assert [s.text for s in heldout] == [s.text for s in heldout_again]

    train_texts, heldout_texts = {s.text for s in train}, {s.text for s in heldout}
    assert not train_texts & heldout_texts
    assert train_texts | heldout_texts == {s.text for s in all_prompts()}
    heldout_counts = Counter(s.family for s in heldout)
    for family, total in EXPECTED_FAMILY_COUNTS.items():
        assert heldout_counts[family] >= 1
        assert total - heldout_counts[family] >= 1, f"{family} has no training prompt"
        assert abs(heldout_counts[family] - 0.3 * total) <= 1.0, family
    assert len(heldout) >= 30  # enough prompts for a held-out evaluation at ~32 images each


# ------------------------------------------------------------------------------------------------------------------
# Shapes and scenes
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", OBJECT_SIZES)
def test_shape_fill_ratios_fall_in_the_detector_bands(size):
    assert fill_ratio("square", size) > detector.SQUARE_MIN_FILL
    assert detector.CIRCLE_MIN_FILL <= fill_ratio("circle", size) <= detector.SQUARE_MIN_FILL
    assert 0.74 <= fill_ratio("circle", size) <= 0.85
    assert fill_ratio("triangle", size) < detector.CIRCLE_MIN_FILL
    assert 0.5 <= fill_ratio("triangle", size) <= 0.53


def test_sampled_scenes_respect_the_layout_rules(random_scenes):
    specs, scenes, images = random_scenes
    assert images.shape == (2000, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    for spec, scene in zip(specs, scenes):
        assert 1 <= len(scene) <= MAX_OBJECTS
        for obj in scene:
            assert obj.size in OBJECT_SIZES
            assert 0 <= obj.x and obj.x + obj.size <= IMAGE_SIZE and 0 <= obj.y and obj.y + obj.size <= IMAGE_SIZE
        for a in scene:
            for b in scene:
                if a is not b:  # at least one empty pixel between bounding boxes
                    assert a.x + a.size < b.x or b.x + b.size < a.x or a.y + a.size < b.y or b.y + b.size < a.y
        if spec.family == "counting":
            item = spec.metadata["include"][0]
            assert sum(obj.shape == item["class"] for obj in scene) == item["count"]
    # Colours the prompt leaves open are drawn from the whole palette.
    assert {obj.color for scene in scenes for obj in scene} == set(COLOR_NAMES)


def test_scene_sampling_is_reproducible_from_the_generator():
    specs = all_prompts()[::7]
    first = sample_batch(specs, np.random.default_rng(5))
    second = sample_batch(specs, np.random.default_rng(5))
    other = sample_batch(specs, np.random.default_rng(6))
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


# ------------------------------------------------------------------------------------------------------------------
# Detector accuracy
# ------------------------------------------------------------------------------------------------------------------


def test_detector_is_exact_on_ground_truth_renders(random_scenes):
    specs, scenes, images = random_scenes
    strict, partial = detector.score_batch(_to_torch(images), [spec.metadata for spec in specs])
    assert strict.shape == partial.shape == (2000,)
    assert strict.mean() >= 0.99 and partial.mean() >= 0.99
    assert np.all(strict == 1.0) and np.all(partial == 1.0)  # measured exact on clean renders

    # Every object is found with the right shape, colour and box, and nothing else is found.
    for scene, detections in zip(scenes, detector.detect_batch(images)):
        truth = sorted((o.shape, o.color, (o.x, o.y, o.x + o.size - 1, o.y + o.size - 1)) for o in scene)
        found = sorted((d.shape, d.color, d.bbox) for d in detections)
        assert found == truth


def test_detector_accuracy_survives_pixel_noise(random_scenes):
    specs, _, images = random_scenes
    noisy = np.clip(images + np.random.default_rng(7).normal(0.0, 0.1, images.shape), 0.0, 1.0).astype(np.float32)
    strict, partial = detector.score_batch(noisy, [spec.metadata for spec in specs])
    assert strict.mean() >= 0.97
    assert partial.mean() >= 0.98


def test_detect_accepts_single_torch_and_numpy_images():
    scene = [SceneObject("triangle", "green", 2, 3, 7)]
    image = render(scene)
    from_numpy = detector.detect(image)
    from_torch = detector.detect(torch.from_numpy(image).permute(2, 0, 1))
    assert from_numpy == from_torch
    assert [(d.shape, d.color, d.cx, d.cy, d.area) for d in from_numpy] == [("triangle", "green", 5.0, 6.0, 25)]


# ------------------------------------------------------------------------------------------------------------------
# Known answers
# ------------------------------------------------------------------------------------------------------------------


def _score(objects, text):
    return detector.score(detector.detect(render(objects)), _prompt(text).metadata)


def test_blank_image_fails_every_prompt():
    blank = np.zeros((len(all_prompts()), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    strict, partial = detector.score_batch(blank, [spec.metadata for spec in all_prompts()])
    assert np.all(strict == 0.0)
    assert np.all(partial == 0.0)


def test_counting_one_too_many_loses_strict_and_a_share_of_partial():
    circles = [SceneObject("circle", "red", x, y, 5) for x, y in [(0, 0), (8, 0), (0, 8)]]
    assert _score(circles[:2], "a photo of two circles") == (1.0, 1.0)
    assert _score(circles, "a photo of two circles") == (0.0, pytest.approx(1 - 1 / 2))
    squares = [SceneObject("square", "blue", x, y, 5) for x, y in [(0, 0), (6, 0), (0, 6), (6, 6)]]
    assert _score(squares[:3], "a photo of three squares") == (1.0, 1.0)
    assert _score(squares, "a photo of three squares") == (0.0, pytest.approx(1 - 1 / 3))
    assert _score(squares[:1], "a photo of three squares") == (0.0, pytest.approx(1 / 3))


def test_position_with_the_relation_reversed_gets_two_thirds():
    left = SceneObject("circle", "green", 0, 4, 5)
    right = SceneObject("square", "yellow", 9, 4, 7)
    assert _score([left, right], "a photo of a circle left of a square") == (1.0, 1.0)
    assert _score([left, right], "a photo of a circle right of a square") == (0.0, pytest.approx(2 / 3))
    # Same row: neither above nor below.
    assert _score([left, right], "a photo of a circle above a square") == (0.0, pytest.approx(2 / 3))
    # The detector's margin: centres exactly 1 px apart do not count as "left of".
    assert not detector.relation_holds("left of", (4.0, 0.0), (5.0, 0.0))
    assert detector.relation_holds("left of", (3.5, 0.0), (5.0, 0.0))
    assert detector.relation_holds("above", (0.0, 2.0), (0.0, 9.0))  # rows grow downward


def test_wrong_colour_gets_half_credit():
    blue_circle = [SceneObject("circle", "blue", 4, 4, 7)]
    assert _score(blue_circle, "a photo of a blue circle") == (1.0, 1.0)
    assert _score(blue_circle, "a photo of a red circle") == (0.0, pytest.approx(0.5))
    swapped = [SceneObject("circle", "blue", 0, 0, 7), SceneObject("square", "red", 8, 8, 7)]
    assert _score(swapped, "a photo of a red circle and a blue square") == (0.0, pytest.approx(0.5))
    assert _score(swapped, "a photo of a blue circle and a red square") == (1.0, 1.0)


def test_odd_blobs_and_tiny_specks_are_not_objects():
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    image[2:4, 1:13] = (0.95, 0.15, 0.15)  # a 12 x 2 bar: too long and too thin for any shape
    image[10, 10] = (0.2, 0.35, 1.0)  # a 1 px speck
    assert detector.detect(image) == []
    for text in ("a photo of a square", "a photo of a red square", "a photo of a triangle"):
        assert detector.score(detector.detect(image), _prompt(text).metadata)[0] == 0.0


def test_an_object_touching_clutter_is_not_seen_but_the_same_object_isolated_is():
    square = [SceneObject("square", "red", 4, 4, 5)]
    image = render(square)
    assert [(d.shape, d.color) for d in detector.detect(image)] == [("square", "red")]
    cluttered = image.copy()
    cluttered[3, 3:10] = (0.6, 0.5, 0.1)  # an off-palette smear along the square's top edge
    assert detector.detect(cluttered) == []


def test_colour_clutter_does_not_satisfy_prompts():
    """RL once learned to paint the canvas with palette-coloured noise; none of it may count as objects."""
    rng = np.random.default_rng(0)
    palette = np.array([domain.COLORS[c] for c in domain.COLOR_NAMES] + [(0.0, 0.0, 0.0)], dtype=np.float32)
    blocks = palette[rng.integers(len(palette), size=(300, 8, 8))]  # 2x2-pixel blocks of random palette colours
    clutter = blocks.repeat(2, axis=1).repeat(2, axis=2)
    clutter = np.clip(clutter + rng.normal(0, 0.1, clutter.shape), 0, 1).astype(np.float32)
    prompts = domain.all_prompts()
    metadata = [prompts[i % len(prompts)].metadata for i in range(len(clutter))]
    strict, _ = detector.score_batch(clutter, metadata)
    assert strict.mean() < 0.02


# ------------------------------------------------------------------------------------------------------------------
# Naturalness and reward plugins
# ------------------------------------------------------------------------------------------------------------------


def test_palette_fidelity_is_one_on_renders_and_drops_with_noise(random_scenes):
    _, _, images = random_scenes
    images = images[:200]
    assert np.all(detector.palette_fidelity(images) == 1.0)
    noisy = np.clip(images + np.random.default_rng(3).normal(0.0, 0.15, images.shape), 0, 1).astype(np.float32)
    fidelity = detector.palette_fidelity(_to_torch(noisy))
    assert fidelity.shape == (200,)
    assert np.all(fidelity < 0.95)


def _reward(name, **options):
    import diffrl_bench.rewards.toy_geneval  # noqa: F401  (registers the toy rewards)

    try:
        registry.load_plugins()
    except ModuleNotFoundError as error:
        # Another built-in plugin package (samplers, the toy model) may not exist yet in a partial checkout; that is
        # not what this test checks, and the toy rewards are registered by the import above.
        if not (error.name or "").startswith("diffrl_bench."):
            raise
    return REWARDS.get(name)(**options)


def test_toy_rewards_through_the_registry():
    specs = [_prompt("a photo of a blue circle"), _prompt("a photo of a red circle"), _prompt("a photo of a square")]
    blue_circle = render([SceneObject("circle", "blue", 4, 4, 7)])
    images = _to_torch(np.stack([blue_circle, blue_circle, np.zeros_like(blue_circle)]))
    prompts = [spec.text for spec in specs]
    metadata = [spec.metadata for spec in specs]

    reward = _reward("toy_geneval", strict_weight=0.25)
    assert reward.name == "toy_geneval"
    out = reward(images, prompts, metadata)
    assert set(out) == {"toy_geneval", "toy_geneval.strict", "toy_geneval.partial"}
    assert all(v.shape == (3,) and v.dtype == torch.float32 for v in out.values())
    assert out["toy_geneval.strict"].tolist() == [1.0, 0.0, 0.0]
    assert out["toy_geneval.partial"].tolist() == [1.0, 0.5, 0.0]
    assert torch.allclose(out["toy_geneval"], torch.tensor([1.0, 0.375, 0.0]))
    assert torch.allclose(_reward("toy_geneval")(images, prompts, metadata)["toy_geneval"], torch.tensor([1.0, 0.25, 0.0]))

    natural = _reward("toy_naturalness")
    assert natural.name == "toy_naturalness"
    fidelity = natural(images, prompts, metadata)
    assert set(fidelity) == {"toy_naturalness"}
    assert fidelity["toy_naturalness"].tolist() == [1.0, 1.0, 1.0]
    noisy = (images + 0.3 * torch.rand(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert torch.all(natural(noisy, prompts, metadata)["toy_naturalness"] < 0.9)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_toy_geneval_rejects_an_invalid_strict_weight(bad):
    with pytest.raises(ValueError, match="strict_weight"):
        _reward("toy_geneval", strict_weight=bad)


def test_extra_objects_counts_objects_beyond_the_prompt():
    def extra(objects, text):
        return detector.extra_objects(detector.detect(render(objects)), _prompt(text).metadata)

    red_circle = SceneObject("circle", "red", 0, 0, 5)
    blue_circle = SceneObject("circle", "blue", 9, 0, 5)
    square = SceneObject("square", "green", 0, 9, 5)
    assert extra([red_circle], "a photo of a red circle") == 0
    assert extra([red_circle, square], "a photo of a red circle") == 1            # a shape not asked for
    assert extra([red_circle, blue_circle], "a photo of a red circle") == 1       # one circle too many
    assert extra([blue_circle], "a photo of a red circle") == 0                   # wrong colour, not extra
    assert extra([red_circle, blue_circle, square], "a photo of a circle and a square") == 1
    assert extra([], "a photo of two circles") == 0                               # missing is not extra


def test_no_extra_objects_reward_known_answers_and_clean_renders(random_scenes):
    reward = _reward("toy_no_extra_objects")
    assert reward.name == "toy_no_extra_objects"
    spec = _prompt("a photo of a circle left of a square")
    asked = [SceneObject("circle", "green", 0, 0, 5), SceneObject("square", "yellow", 9, 0, 7)]
    one_more = asked + [SceneObject("triangle", "red", 4, 9, 7)]
    images = _to_torch(np.stack([render(asked), render(one_more)]))
    out = reward(images, [spec.text] * 2, [spec.metadata] * 2)
    assert set(out) == {"toy_no_extra_objects"} and out["toy_no_extra_objects"].dtype == torch.float32
    assert out["toy_no_extra_objects"].tolist() == [1.0, 0.0]
    # On the domain's own renders the only extra objects are its planned distractors.
    specs, scenes, images = random_scenes
    found = detector.extra_objects_batch(images, [s.metadata for s in specs])
    planned = [sum(o.shape not in {i["class"] for i in s.metadata["include"]} for o in scene)
               for s, scene in zip(specs, scenes)]
    assert found.tolist() == planned
