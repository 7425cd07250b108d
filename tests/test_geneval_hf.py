"""The transformers GenEval backend: its tensor pieces on known answers, the real transformers classes on tiny
random configs (loaded from disk, nothing downloaded), and images -> detections -> clause rules -> reward with
stubbed model outputs whose answer is known."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from diffrl_bench.geneval import COLORS, Rules, hf, score_images  # noqa: F401

DOG, CAT = hf.GENEVAL_CLASSES.index("dog"), hf.GENEVAL_CLASSES.index("cat")


# ---------------------------------------------------------------------------------------------- pure pieces


def test_rescale_fits_1333_by_800_keeping_the_ratio():
    assert hf.rescaled_size(512, 512) == (800, 800)
    assert hf.rescaled_size(480, 640) == (800, 1067)  # 640 * 800/480 = 1066.67
    assert hf.rescaled_size(200, 1000) == (267, 1333)  # the long side binds: 200 * 1.333 = 266.6


def test_detector_inputs_normalise_then_pad_with_zeros_to_32():
    mean = np.array(hf.DETECTOR_MEAN).round().astype(np.uint8)
    image = np.broadcast_to(mean, (40, 50, 3)).copy()
    pixels, sizes, originals = hf.detector_inputs([image], long_edge=50, short_edge=40)
    assert sizes == [(40, 50)] and originals == [(40, 50)] and tuple(pixels.shape) == (1, 3, 64, 64)
    inside = pixels[0, :, :40, :50]
    assert inside.abs().max() < 0.5 / 57  # within rounding of the mean: ~0 after normalising
    assert pixels[0, :, 40:].abs().max() == 0 and pixels[0, :, :, 50:].abs().max() == 0
    with pytest.raises(ValueError, match="uint8"):
        hf.detector_inputs([image.astype(np.float32)])


def test_boxes_span_the_mask_with_exclusive_right_and_bottom_edges():
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True  # rows 2..4, cols 3..8
    assert hf.masks_to_boxes(masks).tolist() == [[3, 2, 9, 5], [0, 0, 0, 0]]


def _logits(queries, num_classes=80):
    """[(class index or None for no-object, logit)] -> (Q, C + 1) logits, zeros elsewhere."""
    out = torch.zeros(len(queries), num_classes + 1)
    for q, (cls, value) in enumerate(queries):
        out[q, num_classes if cls is None else cls] = value
    return out


def test_instances_score_is_class_probability_times_mask_confidence():
    class_logits = _logits([(DOG, 10.0), (DOG, 10.0), (None, 10.0)])
    masks = torch.full((3, 16, 16), -10.0)
    masks[0, 2:6, 2:6] = 10.0
    masks[1, 8:12, 9:13] = 10.0
    labels, scores, binary, boxes = hf.instances(class_logits, masks, (64, 64), (64, 64), (64, 64))
    assert len(labels) == 100  # mmdet's max_per_image over the 3 x 80 (query, class) pairs
    p_dog = math.exp(10) / (math.exp(10) + 80)  # 79 other classes and no-object at logit 0
    assert labels[:2].tolist() == [DOG, DOG]
    # Mask confidence from the definition of 4x bilinear upsampling (align_corners=False): a pixel x samples the
    # cell grid at s = (x + 0.5) / 4 - 0.5, and the +10/-10 block is -10 + 20 * (interpolated indicator).
    def indicator(first, last):
        s = np.clip((np.arange(64) + 0.5) / 4 - 0.5, 0, 15)
        i0 = np.floor(s).astype(int)
        inside = ((np.arange(16) >= first) & (np.arange(16) <= last)).astype(float)
        return (1 - (s - i0)) * inside[i0] + (s - i0) * inside[np.minimum(i0 + 1, 15)]

    logits = -10 + 20 * np.outer(indicator(2, 5), indicator(2, 5))
    mask_conf = (1 / (1 + np.exp(-logits)))[logits > 0].mean()
    assert scores[:2].tolist() == pytest.approx([p_dog * mask_conf] * 2, rel=1e-5)
    assert scores[2:].max() < 0.02
    # 4x upsampling of cells 2..5 covers pixels 8..23 (the +-10 crossover sits on the cell boundary).
    assert sorted(boxes[:2].tolist()) == [[8, 8, 24, 24], [36, 32, 52, 48]]
    assert binary.shape == (100, 64, 64)


def test_instances_drop_what_lies_in_the_padding():
    class_logits = _logits([(DOG, 10.0), (CAT, 10.0)])
    masks = torch.full((2, 16, 16), -10.0)
    masks[0, 13:16, :] = 10.0  # only in the padding rows (the image is 48 rows, padded to 64)
    masks[1, 0:4, 0:4] = 10.0
    labels, scores, binary, boxes = hf.instances(class_logits, masks, (64, 64), (48, 64), (24, 32))
    by_label = {int(l): (float(s), b.tolist(), m) for l, s, b, m in zip(labels[:2], scores[:2], boxes[:2], binary[:2])}
    assert by_label[DOG][0] == 0.0 and not by_label[DOG][2].any() and by_label[DOG][1] == [0, 0, 0, 0]
    assert by_label[CAT][0] > 0.9 and binary.shape[1:] == (24, 32)
    assert by_label[CAT][1] == [0, 0, 8, 8]  # 16 px at input scale, halved to the 24 x 32 original


def test_masked_crop_greys_out_everything_but_the_object():
    from PIL import Image

    image = np.zeros((10, 10, 3), np.uint8)
    image[...] = (0, 255, 0)
    mask = np.zeros((10, 10), bool)
    mask[2:4, 2:6] = True
    crop = np.asarray(hf.masked_crop(Image.fromarray(image), mask, (2, 2, 6, 6)))
    assert crop.shape == (4, 4, 3)
    assert (crop[:2] == (0, 255, 0)).all() and (crop[2:] == (0x99, 0x99, 0x99)).all()
    with pytest.raises(ValueError, match="does not match"):
        hf.masked_crop(Image.fromarray(image), mask[:5], (0, 0, 5, 5))


def test_clip_pixels_resize_short_side_centre_crop_and_normalise():
    from PIL import Image

    mean = tuple(int(round(m * 255)) for m in hf.CLIP_MEAN)
    wide = Image.new("RGB", (60, 20), mean)
    wide.paste((255, 255, 255), (0, 0, 10, 20))  # the left sixth falls outside the centre crop
    pixels = hf.clip_pixels([wide], size=8)
    assert tuple(pixels.shape) == (1, 3, 8, 8)
    assert pixels.abs().max() < 0.02


# ---------------------------------------------------------------------------- real classes, tiny random configs


def _tiny_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):  # byte-level characters, no merges: offline
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def _tiny_models(num_labels=80):
    from transformers import (CLIPConfig, CLIPModel, Mask2FormerConfig, Mask2FormerForUniversalSegmentation,
                              SwinConfig)

    torch.manual_seed(0)
    swin = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=64,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    detector = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(
        backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
        encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32, num_queries=6,
        num_labels=num_labels))
    tokenizer = _tiny_tokenizer()
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8))
    return detector, clip, tokenizer


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_hf")
    detector, clip, tokenizer = _tiny_models()
    detector.save_pretrained(root / "detector")
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return root


def test_real_classes_from_local_folders_detect_and_classify(tiny_dirs):
    backend = hf.HFMask2FormerBackend(detector=str(tiny_dirs / "detector"), clip=str(tiny_dirs / "clip"),
                                      device="cpu", local_files_only="true", long_edge=64, short_edge=48)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)]
    detections = backend.detect(images)
    assert [len(d) for d in detections] == [100, 100]  # max_per_image of the 6 x 80 (query, class) pairs
    for image, dets in zip(images, detections):
        scores = [d.score for d in dets]
        assert 0 <= min(scores) and max(scores) <= 1
        assert {d.label for d in dets} <= set(hf.GENEVAL_CLASSES)
        for det in dets:
            assert det.mask.shape == image.shape[:2] and det.mask.dtype == bool
            assert list(det.box) == hf.masks_to_boxes(torch.from_numpy(det.mask)[None])[0].tolist()
    nonempty = [d for d in detections[0] if d.mask.any()][:3]
    assert nonempty, "a random detector should produce some non-empty mask"
    colors = backend.classify_colors(images[0], nonempty, nonempty[0].label)
    assert len(colors) == len(nonempty) and set(colors) <= set(COLORS)
    metadata = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
                {"tag": "colors", "include": [{"class": nonempty[0].label, "count": 1, "color": "red"}]}]
    for score in score_images(backend, images, metadata, Rules(threshold=0.0)):
        assert score.strict in (0.0, 1.0) and 0.0 <= score.partial <= 1.0


def test_detector_with_other_than_80_classes_is_refused(tmp_path):
    detector, clip, tokenizer = _tiny_models(num_labels=3)
    with pytest.raises(ValueError, match="has 3 classes but the class names list 80"):
        hf.HFMask2FormerBackend.from_models(detector, clip, tokenizer)


def test_missing_weights_name_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"cannot load the detector from .*nowhere.*option detector"):
        hf.HFMask2FormerBackend(detector=str(tmp_path / "nowhere"), clip=str(tmp_path / "nowhere"),
                                device="cpu", local_files_only=True)


# ---------------------------------------------------------------- the whole path on stubs with known answers

PROTOTYPES = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


class StubDetector(torch.nn.Module):
    """Answers each forward with the next images' (queries, masks): [(class index, logit, HxW bool mask)]."""

    config = SimpleNamespace(num_labels=80)

    def __init__(self, per_image):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.per_image = list(per_image)

    def forward(self, pixel_values):
        classes, masks = [], []
        for _ in range(pixel_values.shape[0]):
            queries = self.per_image.pop(0)
            classes.append(_logits([(c, v) for c, v, _ in queries]))
            masks.append(torch.stack([torch.where(torch.as_tensor(m), 10.0, -10.0) for _, _, m in queries]))
        return SimpleNamespace(class_queries_logits=torch.stack(classes), masks_queries_logits=torch.stack(masks))


class StubTokenizer:
    """input_ids = the index of the colour word in the text (the templates name exactly one colour)."""

    def __call__(self, texts, padding=True, return_tensors="pt"):
        ids = [next(i for i, c in enumerate(COLORS) if f" {c} " in f" {t.replace('-colored', ' ')} ") for t in texts]
        return {"input_ids": torch.tensor(ids)[:, None]}


class StubCLIP(torch.nn.Module):
    """Text: one-hot of the colour. Image: one-hot of the colour most of the crop's non-grey pixels are nearest to."""

    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=32))

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def get_text_features(self, input_ids, **_):
        return torch.nn.functional.one_hot(input_ids[:, 0], len(COLORS)).float()

    def get_image_features(self, pixel_values):
        rgb = (pixel_values * torch.tensor(hf.CLIP_STD).view(1, 3, 1, 1)
               + torch.tensor(hf.CLIP_MEAN).view(1, 3, 1, 1)) * 255
        names = list(PROTOTYPES)
        protos = torch.tensor([PROTOTYPES[n] for n in names], dtype=torch.float32)
        out = torch.zeros(len(rgb), len(COLORS))
        for i, image in enumerate(rgb):
            pixels = image.flatten(1).T
            grey = (pixels - 0x99).abs().max(dim=1).values < 12
            nearest = torch.cdist(pixels[~grey], protos).argmin(dim=1)
            out[i, COLORS.index(names[int(torch.bincount(nearest, minlength=len(names)).argmax())])] = 1.0
        return out


def _square(y0, x0, size, shape=(64, 64)):
    mask = np.zeros(shape, bool)
    mask[y0:y0 + size, x0:x0 + size] = True
    return mask


def _reward(per_image, **options):
    backend = hf.HFMask2FormerBackend.from_models(StubDetector(per_image), StubCLIP(), StubTokenizer(),
                                                  long_edge=64, short_edge=64)
    return hf.GenEvalInProcess(backend=backend, **options)


TWO_DOGS = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]}


def test_counting_two_dogs_passes_with_two_and_fails_with_three_or_a_weak_one():
    two = [(DOG, 10.0, _square(4, 4, 12)), (DOG, 10.0, _square(30, 30, 12)), (None, 10.0, _square(0, 0, 64))]
    three = two[:2] + [(DOG, 10.0, _square(4, 40, 12))]
    weak = [two[0], (DOG, 5.0, _square(30, 30, 12)), two[2]]  # p = e^5 / (e^5 + 80) = 0.65: under counting's 0.9
    reward = _reward([two, three, weak])
    images = torch.zeros(3, 3, 64, 64)
    out = reward(images, ["a photo of two dogs"] * 3, [TWO_DOGS] * 3)
    assert out["geneval.strict"].tolist() == [1.0, 0.0, 0.0]
    # clauses: "dog >= 2" and "dog < 3"; three dogs break only the second, one confident dog only the first
    assert out["geneval.partial"].tolist() == [1.0, 0.5, 0.5]
    assert out["geneval"].tolist() == out["geneval.partial"].tolist()  # strict_weight 0
    # the weak dog still counts where the threshold is GenEval's 0.3
    loose = _reward([weak])(images[:1], ["two dogs"], [{**TWO_DOGS, "tag": "two_object"}])
    assert loose["geneval.strict"].tolist() == [1.0]


def _l_shape(y0, x0, size=24, arm=6):
    """An L (top bar and left bar) covering less than half its box."""
    mask = np.zeros((64, 64), bool)
    mask[y0:y0 + arm, x0:x0 + size] = True
    mask[y0:y0 + size, x0:x0 + arm] = True
    return mask


def test_colour_is_read_from_the_masked_object_not_its_box():
    left, right = _l_shape(8, 4), _l_shape(8, 36)
    image = np.zeros((64, 64, 3), np.uint8)
    image[8:32, 4:28] = PROTOTYPES["green"]  # the boxes' background is green ...
    image[8:32, 36:60] = PROTOTYPES["green"]
    image[left] = PROTOTYPES["red"]  # ... and the L-shaped objects red and blue (fewer pixels than the green)
    image[right] = PROTOTYPES["blue"]
    queries = [(DOG, 10.0, left), (CAT, 10.0, right)]
    metadata = [
        {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}]},
        {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "green"}]},
        {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"},
                                          {"class": "cat", "count": 1, "color": "blue"}]},
        {"tag": "position", "include": [{"class": "dog", "count": 1},
                                        {"class": "cat", "count": 1, "position": ["right of", 0]}]},
        {"tag": "position", "include": [{"class": "dog", "count": 1},
                                        {"class": "cat", "count": 1, "position": ["left of", 0]}]},
    ]
    reward = _reward([queries] * len(metadata), strict_weight=1.0)
    images = torch.from_numpy(image).permute(2, 0, 1).float().div(255).expand(len(metadata), 3, 64, 64)
    out = reward(images, ["p"] * len(metadata), metadata)
    assert out["geneval.strict"].tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert out["geneval"].tolist() == out["geneval.strict"].tolist()


def test_stub_colour_model_would_see_green_without_the_mask():
    """Guards the test above: the object alone is red, its box mostly green."""
    mask = _l_shape(8, 4)
    assert mask[8:32, 4:28].mean() < 0.5


def test_in_process_reward_checks_its_inputs():
    reward = _reward([])
    with pytest.raises(ValueError, match="metadata of image 0"):
        reward(torch.zeros(1, 3, 8, 8), ["p"], [{"include": []}])
    with pytest.raises(ValueError, match="strict_weight"):
        hf.GenEvalInProcess(strict_weight=2.0, backend=reward.backend)
    with pytest.raises(ValueError, match="backend options"):
        hf.GenEvalInProcess(backend=reward.backend, detector="x")


def test_server_builds_the_backend_from_string_options_and_scores_over_http(tiny_dirs):
    """The GenEval server's --backend module:factory path with --option strings, queried by the reward client."""
    import threading

    from diffrl_bench.geneval import build_backend, make_server
    from diffrl_bench.rewards.geneval import GenEvalReward

    backend = build_backend("hf-mask2former", {
        "detector": str(tiny_dirs / "detector"), "clip": str(tiny_dirs / "clip"), "device": "cpu",
        "local_files_only": "1", "long_edge": "64", "short_edge": "48", "max_per_image": "20"})
    server = make_server(backend, port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        reward = GenEvalReward(url=f"http://{host}:{port}", timeout=60)
        out = reward(torch.rand(2, 3, 48, 64), ["a dog", "a red cat"],
                     [{"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
                      {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}]}])
        assert out["geneval"].shape == (2,) and ((out["geneval"] >= 0) & (out["geneval"] <= 1)).all()
    finally:
        server.shutdown()
        server.server_close()


def test_geneval_reward_runs_the_transformers_backend_in_process(tiny_dirs):
    """`reward.options.geneval.backend: hf-mask2former`: no server, same logged names, options reach the backend."""
    from diffrl_bench.reward_harness import build_reward

    reward = build_reward("geneval", {"backend": "hf-mask2former", "detector": str(tiny_dirs / "detector"),
                                      "clip": str(tiny_dirs / "clip"), "device": "cpu", "local_files_only": True,
                                      "long_edge": 64, "short_edge": 48, "max_per_image": 20, "strict_weight": 1.0,
                                      "threshold": 0.0})
    assert isinstance(reward._in_process.backend, hf.HFMask2FormerBackend)
    assert reward._in_process.backend.max_per_image == 20 and reward._in_process.rules.threshold == 0.0
    out = reward(torch.rand(2, 3, 48, 64), ["a dog", "a red cat"],
                 [{"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
                  {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}]}])
    assert set(out) == {"geneval", "geneval.strict", "geneval.partial"}
    assert out["geneval"].tolist() == out["geneval.strict"].tolist()  # strict_weight 1


def test_geneval_reward_in_process_on_stubs_matches_the_rules():
    """The reward class delegates to the in-process scorer: the two-dogs known answers through `GenEvalReward`."""
    from diffrl_bench.rewards.geneval import GenEvalReward

    two = [(DOG, 10.0, _square(4, 4, 12)), (DOG, 10.0, _square(30, 30, 12)), (None, 10.0, _square(0, 0, 64))]
    reward = GenEvalReward.__new__(GenEvalReward)
    reward._in_process = _reward([two, two[:2] + [(DOG, 10.0, _square(4, 40, 12))]])
    out = reward(torch.zeros(2, 3, 64, 64), ["two dogs"] * 2, [TWO_DOGS] * 2)
    assert out["geneval.strict"].tolist() == [1.0, 0.0] and out["geneval.partial"].tolist() == [1.0, 0.5]


def test_server_backend_refuses_detector_options_and_the_package_stays_light():
    import subprocess
    import sys

    from diffrl_bench.reward_harness import RewardConfigError, build_reward

    with pytest.raises(RewardConfigError, match=r"reward\.options\.geneval\.detector.*backend: hf-mask2former"):
        build_reward("geneval", {"detector": "x"})
    with pytest.raises(RewardConfigError, match=r"reward\.options\.geneval\.backend"):
        build_reward("geneval", {"backend": "mmdet"})
    # registering hf-mask2former must not make the server's package import torch or transformers
    code = ("import sys, diffrl_bench.geneval as g; assert 'hf-mask2former' in g.BACKENDS; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_colour_weights_are_the_renormalised_mean_of_each_colours_normalised_template_embeddings():
    # The one colour classifier both GenEval backends (mmdet + open_clip, HF + transformers' CLIP) build: a stub
    # encoder with known embeddings gives the expected matrix, and the label reaches the templates.
    from diffrl_bench.geneval.detectors import COLOR_TEMPLATES, COLORS, color_text_weights

    seen = []

    def encode(texts):
        seen.extend(texts)
        # template j of colour c: the vector (c + 1, j + 1, 0) scaled by j + 1, so normalising matters
        c = COLORS.index(next(col for col in COLORS if f" {col} " in texts[0] or f" {col}-" in texts[0]))
        return torch.tensor([[(c + 1.0) * (j + 1), (j + 1.0) ** 2, 0.0] for j in range(len(texts))])

    weights = color_text_weights(torch, encode, "dog")
    assert weights.shape == (3, len(COLORS))
    for c in range(len(COLORS)):
        rows = torch.tensor([[c + 1.0, j + 1.0, 0.0] for j in range(len(COLOR_TEMPLATES))])
        mean = (rows / rows.norm(dim=1, keepdim=True)).mean(0)
        torch.testing.assert_close(weights[:, c], mean / mean.norm())
    assert "a photo of a red dog" in seen and "a photo of a blue-colored dog" in seen
