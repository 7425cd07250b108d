"""Real reward plugins: JPEG and OCR run for real; CLIP-family rewards on tiny random CLIP models through their
real loaders; HPSv2 / ImageReward scoring with stand-in models (their packages are not installed here); GenEval's
clause rules on synthetic detections and its HTTP server with a fake detector."""
import base64
import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from diffrl_bench import geneval as gs
from diffrl_bench.registry import REWARDS
from diffrl_bench.reward_harness import build_reward, call_reward
from diffrl_bench.rewards import preference
from diffrl_bench.rewards._common import ClipPreprocess
from diffrl_bench.rewards.ocr import OcrReward, edit_distance, ocr_score

ALL = ["jpeg_compressibility", "jpeg_incompressibility", "ocr", "pickscore", "clipscore", "hpsv2", "imagereward",
       "aesthetic", "geneval"]


def test_registered():
    assert set(ALL) <= set(REWARDS.names())


# ---------------------------------------------------------------------------------------------------- JPEG


def test_jpeg_flat_compresses_better_than_noise():
    torch.manual_seed(0)
    images = torch.cat([torch.full((1, 3, 64, 64), 0.4), torch.rand(1, 3, 64, 64)])
    prompts, meta = ["flat", "noise"], [{}, {}]
    comp = call_reward("jpeg_compressibility", build_reward("jpeg_compressibility"), images, prompts, meta)
    incomp = call_reward("jpeg_incompressibility", build_reward("jpeg_incompressibility"), images, prompts, meta)
    kb = comp["jpeg_compressibility.kb"]
    # Reference size: the same uint8 image through PIL at quality 95, in kB of 1000 bytes.
    buffer = io.BytesIO()
    Image.fromarray((images[1] * 255).round().byte().permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=95)
    assert kb[1].item() == pytest.approx(buffer.tell() / 1000)
    assert kb[0] < kb[1] / 5
    assert torch.equal(comp["jpeg_compressibility"], -kb) and torch.equal(incomp["jpeg_incompressibility"], kb)
    assert comp["jpeg_compressibility"][0] > comp["jpeg_compressibility"][1]
    flow_grpo = build_reward("jpeg_compressibility", {"divisor": 500})(images, prompts, meta)
    assert torch.allclose(flow_grpo["jpeg_compressibility"], -kb / 500)


# ---------------------------------------------------------------------------------------------------- OCR


@pytest.mark.parametrize("a, b, d", [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("abc", "abc", 0),
                                     ("flaw", "lawn", 2), ("helloworld", "hellowrld", 1), ("ab", "ba", 2)])
def test_edit_distance(a, b, d):
    assert edit_distance(a, b) == d == edit_distance(b, a)


def test_ocr_score_known_answers():
    assert ocr_score("HELLO WORLD", "hello world") == (1.0, 0)
    assert ocr_score("HELO WORLD", "Hello World") == (pytest.approx(0.9), 1)  # 10 letters, one missing
    assert ocr_score("", "abcd") == (0.0, 4)
    assert ocr_score("xyzxyzxyzxyz", "abcd")[0] == 0.0  # clipped at len(target): never negative
    assert ocr_score("Big Sale: Open Now!", "open now") == (1.0, 0)  # Flow-GRPO: a contained target is exact
    assert ocr_score("Big Sale: Open Now!", "open now", substring_match=False)[0] == 0.0
    assert ocr_score("OPEN", "open", case_sensitive=True) == (0.0, 4)
    with pytest.raises(ValueError, match="empty"):
        ocr_score("abc", "   ")


def test_ocr_ascii_space_mode_removes_only_u0020_as_flow_grpo():
    # Flow-GRPO's `.replace(' ', '')`: a tab or newline the reader emits stays and costs an edit.
    assert ocr_score("OPEN NOW", "open now", whitespace="ascii_space") == (1.0, 0)
    assert ocr_score("OPEN\tNOW", "open now", substring_match=False, whitespace="ascii_space") == (
        pytest.approx(1 - 1 / 7), 1)
    assert ocr_score("OPEN\tNOW", "open now", substring_match=False) == (1.0, 0)  # `all` drops the tab too
    with pytest.raises(ValueError, match="whitespace='none'"):
        ocr_score("a", "a", whitespace="none")
    with pytest.raises(ValueError, match="whitespace"):
        OcrReward(whitespace="none")


def test_ocr_target_source():
    assert OcrReward.target_of('a sign "OPEN" on a door', {}) == "OPEN"
    assert OcrReward.target_of('a sign "OPEN"', {"ocr_target": "CLOSED"}) == "CLOSED"
    with pytest.raises(ValueError, match="no quoted text"):
        OcrReward.target_of("a sign on a door", {})


def _render(text, size=(320, 128)):
    picture = Image.new("RGB", size, "white")
    ImageDraw.Draw(picture).text((12, 40), text, fill="black", font=ImageFont.load_default(size=36))
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 255


def test_ocr_reads_rendered_text_for_real():
    reward = build_reward("ocr")
    assert reward._engine is None  # built on first use
    images = torch.stack([_render("HELLO WORLD"), torch.ones(3, 128, 320), _render("HELLO WRLD")])
    prompts = ['a poster reading "Hello World"', 'a poster reading "Hello World"', 'a sign "hello world"']
    scores = call_reward("ocr", reward, images, prompts, [{}, {}, {}])
    engine = reward._engine
    assert scores["ocr"][0] == 1.0 and scores["ocr.exact"][0] == 1.0
    assert scores["ocr"][1] == 0.0 and scores["ocr.distance"][1] == 10  # blank: nothing read
    assert scores["ocr"][2] == pytest.approx(0.9)  # one of ten letters missing
    reward(images[:1], prompts[:1], [{}])
    assert reward._engine is engine


# ---------------------------------------------------------------------------------------------------- CLIP family


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIP (30 px images, 16-token prompts) with a BPE tokenizer and a preprocessor config."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = {t: i for i, t in enumerate(letters + [c + "</w>" for c in letters] + ["th", "the</w>"])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[("t", "h"), ("th", "e</w>")])
    special = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                   pad_token_id=vocab["<|endoftext|>"])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, **special),
        vision_config=dict(image_size=30, patch_size=6, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(path)
    return str(path)


PROMPTS = ["the cat", "a red car on the road", "three apples", "the quick brown fox jumps"]


def _images(n=4, h=40, w=52, seed=1):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_clip_preprocess_shape_range_and_reference():
    from transformers import CLIPImageProcessor

    pre = ClipPreprocess(30, (30, 30))
    out = pre(_images(2, 40, 52))
    assert out.shape == (2, 3, 30, 30)
    flat = pre(torch.full((1, 3, 45, 30), 0.5))
    expected = (0.5 - pre.mean) / pre.std
    assert torch.allclose(flat, expected.expand_as(flat), atol=1e-5)
    lo, hi = (0 - pre.mean) / pre.std, (1 - pre.mean) / pre.std
    assert (out >= lo - 1e-5).all() and (out <= hi + 1e-5).all()
    # Against transformers' PIL pipeline on a smooth uint8 image: within about one grey level.
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=torch.Generator().manual_seed(2)),
                                             size=(60, 84), mode="bilinear")
    smooth = (smooth * 255).round() / 255
    picture = Image.fromarray((smooth[0] * 255).round().byte().permute(1, 2, 0).numpy())
    processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    reference = processor(images=picture, return_tensors="pt")["pixel_values"]
    assert (pre(smooth) - reference).abs().max() < 0.03


def _model_cosine(reward, images, prompts):
    """cos(text, image) from the CLIP model's own forward (prompts padded per batch, not to max length)."""
    encoder = reward.encoder
    limit = encoder.model.config.text_config.max_position_embeddings
    tokens = encoder.tokenizer(prompts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
    with torch.no_grad():
        out = encoder.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                            pixel_values=encoder.preprocess(images))
    return out.logits_per_image.diagonal() / encoder.model.logit_scale.exp()


def test_pickscore_equals_scaled_cosine(tiny_clip_dir):
    reward = build_reward("pickscore", {"path": tiny_clip_dir, "device": "cpu"})
    images = _images()
    scores = call_reward("pickscore", reward, images, PROMPTS, [{}] * 4)["pickscore"]
    scale = reward.encoder.model.logit_scale.exp().item()
    assert torch.allclose(scores, scale * _model_cosine(reward, images, PROMPTS) / 26, atol=1e-5)


def test_clipscore_scalings(tiny_clip_dir):
    images = _images()
    flow = build_reward("clipscore", {"path": tiny_clip_dir, "device": "cpu"})
    nft = build_reward("clipscore", {"path": tiny_clip_dir, "device": "cpu", "divisor": 100})
    cosine = _model_cosine(flow, images, PROMPTS)
    assert torch.allclose(flow(images, PROMPTS, [{}] * 4)["clipscore"], 100 * cosine / 30, atol=1e-5)
    assert torch.allclose(nft(images, PROMPTS, [{}] * 4)["clipscore"], cosine, atol=1e-6)


@pytest.mark.parametrize("name", ["pickscore", "clipscore"])
def test_clip_rewards_order_and_batching_invariant(tiny_clip_dir, name):
    images = _images()
    whole = build_reward(name, {"path": tiny_clip_dir, "device": "cpu", "batch_size": 4})(images, PROMPTS, [{}] * 4)
    single = build_reward(name, {"path": tiny_clip_dir, "device": "cpu", "batch_size": 1})(images, PROMPTS, [{}] * 4)
    assert torch.allclose(whole[name], single[name], atol=1e-6)
    perm = [2, 0, 3, 1]
    permuted = build_reward(name, {"path": tiny_clip_dir, "device": "cpu"})(images[perm], [PROMPTS[i] for i in perm],
                                                                            [{}] * 4)
    assert torch.allclose(permuted[name], whole[name][perm], atol=1e-6)
    assert whole[name].std() > 0  # the images and prompts are told apart


def test_clip_loader_errors(tiny_clip_dir, tmp_path):
    with pytest.raises(OSError, match=r"clipscore: cannot load a CLIP model from option path='/no/such/clip'"):
        build_reward("clipscore", {"path": "/no/such/clip", "device": "cpu"})
    with pytest.raises(OSError, match=r"tokenizer from '/no/such/tok' \(option processor_path"):
        build_reward("clipscore", {"path": tiny_clip_dir, "processor_path": "/no/such/tok", "device": "cpu"})


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_aesthetic_mlp_on_normalised_embeddings(tiny_clip_dir, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    head = preference.AestheticMLP(16)
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    torch.save(head.state_dict(), tmp_path / "head.pth")
    images = _images()
    rewards = [build_reward("aesthetic", {"weights": str(tmp_path / f), "clip_path": tiny_clip_dir, "device": "cpu",
                                          "batch_size": b}) for f, b in (("head.safetensors", 4), ("head.pth", 1))]
    scores = [r(images, PROMPTS, [{}] * 4)["aesthetic"] for r in rewards]
    encoder = rewards[0].encoder
    with torch.no_grad():
        embeds = preference._features(encoder.model.get_image_features(pixel_values=encoder.preprocess(images)))
        expected = head.eval()(embeds / embeds.norm(dim=-1, keepdim=True))
    assert torch.allclose(scores[0], expected, atol=1e-5) and torch.allclose(scores[1], expected, atol=1e-5)

    with pytest.raises(ValueError, match=r"'reward.options.aesthetic.weights': required"):
        build_reward("aesthetic", {"clip_path": tiny_clip_dir, "device": "cpu"})
    save_file(preference.AestheticMLP(768).state_dict(), str(tmp_path / "l14.safetensors"))
    with pytest.raises(ValueError, match="do not fit the aesthetic MLP on 16-d CLIP embeddings"):
        build_reward("aesthetic", {"weights": str(tmp_path / "l14.safetensors"), "clip_path": tiny_clip_dir,
                                   "device": "cpu"})
    torch.save({"layers.0.weight": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="not a plain tensor checkpoint"):
        build_reward("aesthetic", {"weights": str(tmp_path / "evil.pth"), "clip_path": tiny_clip_dir, "device": "cpu"})


class _StandInOpenClip:
    """open_clip's model interface (encode_image, encode_text) over fixed random projections."""

    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.image_proj = torch.randn(3 * 8 * 8, 12, generator=g)
        self.token_emb = torch.randn(100, 12, generator=g)
        self.seen_pixels = []

    def encode_image(self, pixels):
        self.seen_pixels.append(pixels)
        return torch.nn.functional.adaptive_avg_pool2d(pixels, 8).flatten(1) @ self.image_proj

    def encode_text(self, tokens):
        return self.token_emb[tokens].sum(1)

    def to(self, *args, **kwargs):
        return self


def _stand_in_tokenize(prompts):
    return torch.tensor([[len(w) % 100 for w in (p.split() + ["<pad>"] * 8)[:8]] for p in prompts])


def test_hpsv2_scoring_with_stand_in_encoder(monkeypatch):
    model = _StandInOpenClip()
    calls = []
    monkeypatch.setattr(preference, "load_hpsv2", lambda *a: calls.append(a) or (model, _stand_in_tokenize))
    reward = build_reward("hpsv2", {"path": "/weights/HPS_v2.1.pt", "device": "cpu", "batch_size": 3})
    assert calls[0][:3] == ("/weights/HPS_v2.1.pt", "HPS_v2.1_compressed.pt", "ViT-H-14")
    images = _images(4, 256, 320)
    scores = reward(images, PROMPTS, [{}] * 4)["hpsv2"]
    assert all(p.shape[-2:] == (224, 224) for p in model.seen_pixels)
    pixels = ClipPreprocess(224, (224, 224))(images)
    expected = torch.nn.functional.cosine_similarity(model.encode_image(pixels),
                                                     model.encode_text(_stand_in_tokenize(PROMPTS)), dim=-1)
    assert torch.allclose(scores, expected, atol=1e-5)
    assert (scores.abs() <= 1).all()


def test_hpsv2_and_imagereward_name_their_missing_packages():
    for module, name, package in (("open_clip", "hpsv2", "open_clip_torch"), ("ImageReward", "imagereward",
                                                                              "image-reward")):
        try:
            __import__(module)
            continue
        except ImportError:
            pass
        with pytest.raises(Exception, match=package) as info:
            build_reward(name, {"path": "/x", "device": "cpu"})
        assert name in str(info.value)


def test_imagereward_scoring_with_stand_in_model(monkeypatch, tiny_clip_dir):
    from transformers import AutoTokenizer

    class Blip:
        tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)

    class StandIn:
        blip = Blip()
        seen = []

        def score_gard(self, ids, mask, pixels):
            self.seen.append((ids.shape, pixels.shape))
            return ((ids * mask).sum(1, keepdim=True).float() / 100 + pixels.mean(dim=(1, 2, 3))[:, None])

        def to(self, *a, **k):
            return self

        def eval(self):
            return self

        def requires_grad_(self, flag):
            return self

    model = StandIn()
    monkeypatch.setattr(preference, "load_imagereward", lambda *a: model)
    images = _images(4, 64, 64)
    scores = build_reward("imagereward", {"device": "cpu", "batch_size": 2})(images, PROMPTS, [{}] * 4)["imagereward"]
    assert model.seen[0] == (torch.Size([2, 35]), torch.Size([2, 3, 224, 224]))  # package's prompt length, 224 px
    tokens = Blip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    expected = model.score_gard(tokens.input_ids, tokens.attention_mask, ClipPreprocess()(images)).reshape(-1)
    assert torch.allclose(scores, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- GenEval rules


def det(label, box, score=0.95, color=None):
    return gs.Detection(label, score, tuple(float(v) for v in box), color)


def test_relative_position_rule():
    a, b = (0, 40, 20, 60), (100, 40, 120, 60)
    assert gs.relative_position(a, b) == {"left of"} and gs.relative_position(b, a) == {"right of"}
    assert gs.relative_position((40, 0, 60, 20), (40, 100, 60, 120)) == {"above"}  # y grows downward
    assert gs.relative_position((0, 0, 20, 20), (100, 100, 120, 120)) == {"left of", "above"}  # diagonal
    # Centres 8 px apart with boxes 50 px wide: 0.1 x (50 + 50) = 10 px of slack swallows the offset.
    assert gs.relative_position((0, 0, 50, 50), (8, 0, 58, 50)) == set()
    assert gs.relative_position((0, 0, 10, 10), (0, 0, 10, 10)) == set()


def test_keep_detections_thresholds_order_and_nms():
    dets = [det("dog", (0, 0, 10, 10), 0.5), det("dog", (50, 0, 60, 10), 0.95), det("dog", (80, 0, 90, 10), 0.2),
            det("cat", (0, 50, 10, 60), 0.92)]
    kept = gs.keep_detections(dets, "two_object", gs.Rules())
    assert [d.score for d in kept["dog"]] == [0.95, 0.5] and len(kept["cat"]) == 1
    kept = gs.keep_detections(dets, "counting", gs.Rules())  # counting demands 0.9
    assert [d.score for d in kept["dog"]] == [0.95]
    capped = gs.keep_detections([det("dog", (i * 20, 0, i * 20 + 10, 10)) for i in range(20)], None, gs.Rules())
    assert len(capped["dog"]) == 16
    overlapping = [det("dog", (0, 0, 10, 10), 0.9), det("dog", (1, 0, 11, 10), 0.8), det("dog", (50, 0, 60, 10), 0.7)]
    assert len(gs.keep_detections(overlapping, None, gs.Rules())["dog"]) == 3  # GenEval default: no NMS
    assert [d.score for d in gs.keep_detections(overlapping, None, gs.Rules(nms_threshold=0.5))["dog"]] == [0.9, 0.7]


COUNTING = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]}
COLORS = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
POSITION = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["right of", 0]}]}
COLOR_ATTR = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                               {"class": "bus", "count": 1, "color": "blue"}]}
DOG = (100, 0, 120, 20)
CAT = (0, 0, 20, 20)


def _score(dets, meta, mode="clauses", classify=None):
    kept = gs.keep_detections(dets, meta["tag"], gs.Rules())
    result = gs.evaluate(kept, meta, gs.Rules(), classify, mode)
    return result.strict, result.partial


@pytest.mark.parametrize("dets, meta, strict, partial", [
    ([det("dog", CAT), det("dog", DOG)], COUNTING, 1, 1),
    ([det("dog", CAT), det("dog", DOG), det("dog", (200, 0, 220, 20))], COUNTING, 0, 0.5),  # exclude violated
    ([det("dog", CAT)], COUNTING, 0, 0.5),  # too few
    ([det("dog", CAT), det("dog", DOG, score=0.5)], COUNTING, 0, 0.5),  # second below the counting threshold
    ([det("car", CAT, color="red")], COLORS, 1, 1),
    ([det("car", CAT, color="blue")], COLORS, 0, 0.5),
    ([], COLORS, 0, 0),
    ([det("cat", CAT), det("dog", DOG)], POSITION, 1, 1),
    ([det("cat", DOG), det("dog", CAT)], POSITION, 0, 2 / 3),  # dog left of cat
    ([det("dog", DOG)], POSITION, 0, 1 / 3),  # no cat: no reference, position fails too
    ([det("car", CAT, color="red"), det("bus", DOG, color="blue")], COLOR_ATTR, 1, 1),
    ([det("car", CAT, color="blue"), det("bus", DOG, color="blue")], COLOR_ATTR, 0, 0.75),
])
def test_geneval_clauses_known_answers(dets, meta, strict, partial):
    assert _score(dets, meta) == (strict, pytest.approx(partial))


def test_geneval_colours_are_classified_lazily_on_the_top_objects():
    calls = []

    def classify(label, objs):
        calls.append((label, [o.score for o in objs]))
        return ["red" if o.score > 0.9 else "green" for o in objs]

    dets = [det("car", CAT, 0.95), det("car", DOG, 0.6)]
    assert _score(dets, COLORS, classify=classify) == (1.0, 1.0)
    assert calls == [("car", [0.95])]  # only the `count` most confident car is looked at
    assert _score([], COLORS, classify=classify) == (0.0, 0.0) and len(calls) == 1
    with pytest.raises(ValueError, match="no colour classifier"):
        _score(dets, COLORS)


@pytest.mark.parametrize("dets, meta, partial", [
    ([det("dog", CAT), det("dog", DOG), det("dog", (200, 0, 220, 20))], COUNTING, 0.5),  # 1 - |2-3|/2; no exclude
    ([det("dog", (i * 30, 0, i * 30 + 20, 20)) for i in range(5)], COUNTING, -0.5),  # 1 - |2-5|/2, as released
    ([det("car", CAT, color="blue")], COLORS, 0.5),  # [1, 1 - |1-0|/1]
    ([det("car", CAT, color="red"), det("car", DOG, color="red")], COLORS, 0.0),  # [1 - 1/1, 0]: count != 1
    ([det("cat", CAT), det("dog", DOG)], POSITION, 1.0),
    ([det("cat", DOG), det("dog", CAT)], POSITION, 0.75),  # [1, 1, 0, 1]: the released extra 1 after a failure
])
def test_geneval_flow_grpo_partial_mode(dets, meta, partial):
    strict, got = _score(dets, meta, mode="flow_grpo")
    assert got == pytest.approx(partial)
    assert strict == _score(dets, meta)[0]  # strict is GenEval's correctness in both modes


# ---------------------------------------------------------------------------------------------------- GenEval server

FAKE_COLORS = {(255, 0, 0): ("car", "red"), (0, 0, 255): ("car", "blue"), (0, 255, 0): ("dog", "green"),
               (255, 255, 0): ("cat", "yellow")}


class FakeDetector(gs.Backend):
    """Each solid rectangle of a known colour is one object; a white image makes the detector raise."""

    name = "fake"

    def detect(self, images):
        from scipy import ndimage

        out = []
        for image in images:
            if (image == 255).all():
                raise RuntimeError("fake detector failure")
            dets = []
            for rgb, (label, _) in FAKE_COLORS.items():
                regions, _ = ndimage.label((image == rgb).all(axis=-1))
                for ys, xs in ndimage.find_objects(regions):
                    dets.append(gs.Detection(label, 0.95, (xs.start, ys.start, xs.stop - 1, ys.stop - 1)))
            out.append(dets)
        return out

    def classify_colors(self, image, detections, label):
        return [FAKE_COLORS[tuple(int(v) for v in image[int(d.box[1]), int(d.box[0])])][1] for d in detections]


def _scene(*rects, size=64):
    array = np.zeros((size, size, 3), np.uint8)
    for rgb, (x, y) in rects:
        array[y:y + 10, x:x + 10] = rgb
    return array


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


RED, BLUE, GREEN, YELLOW = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)


@pytest.fixture(scope="module")
def server():
    srv = gs.make_server(FakeDetector(), port=0, max_body_bytes=200_000, max_images=8, max_pixels=256 * 256, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _request(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _good_body():
    images = [_png(_scene((YELLOW, (5, 20)), (GREEN, (40, 20)))), _png(_scene((GREEN, (5, 20)), (YELLOW, (40, 20)))),
              _png(_scene((BLUE, (5, 5))))]
    metadata = [POSITION, POSITION, COLORS]
    return json.dumps({"images": images, "metadata": metadata}).encode()


def test_server_scores_and_survives_bad_requests(server):
    assert _request(server, "GET", "/health")[1]["backend"] == "fake"
    status, answer = _request(server, "POST", "/score", _good_body())
    assert status == 200, answer
    assert answer["strict"] == [1.0, 0.0, 0.0] and answer["partial"] == pytest.approx([1.0, 2 / 3, 0.5])
    assert answer["details"][0]["detected"] == {"dog": 1, "cat": 1}

    def body(**payload):
        return json.dumps(payload).encode()

    one_image = [_png(_scene((RED, (5, 5))))]
    bmp = io.BytesIO()
    Image.fromarray(_scene((RED, (5, 5)))).save(bmp, format="BMP")
    bad = [
        (b"\x00\xffnot json at all", 400, "not valid JSON"),
        (b"[1, 2, 3]", 400, "must be a JSON object"),
        (body(images=one_image), 400, "missing field 'metadata'"),
        (body(images="abc", metadata=[COLORS]), 400, "'images' must be a list"),
        (body(images=[42], metadata=[COLORS]), 400, r"images\[0\] must be a base64 string"),
        (body(images=["@@not base64@@"], metadata=[COLORS]), 400, r"images\[0\] is not valid base64"),
        (body(images=[base64.b64encode(b"GIF89a garbage").decode()], metadata=[COLORS]), 400, "not a readable PNG"),
        (body(images=[base64.b64encode(bmp.getvalue()).decode()], metadata=[COLORS]), 400, "expected one of"),
        (body(images=one_image, metadata=[{"include": "dog"}]), 400, r"metadata\[0\]: 'include' must be"),
        (body(images=one_image, metadata=[COLORS, COLORS]), 400, "1 images but 2 metadata"),
        (body(images=one_image, metadata=[COLORS], partial_mode="best"), 400, "partial_mode"),
        (body(images=one_image * 9, metadata=[COLORS] * 9), 413, "over --max-images 8"),
        (body(images=[_png(np.zeros((300, 300, 3), np.uint8))], metadata=[COLORS]), 413, "over --max-pixels"),
        (body(images=[_png(np.full((8, 8, 3), 255, np.uint8))], metadata=[COLORS]), 500, "fake detector failure"),
        (b"x" * 300_000, 413, "over the server's limit of 200000"),
    ]
    for payload, status, message in bad:
        got_status, got = _request(server, "POST", "/score", payload)
        assert got_status == status and re.search(message, got["error"]), (message, got)
    assert _request(server, "POST", "/nowhere", b"{}")[0] == 404
    assert _request(server, "GET", "/nowhere")[0] == 404
    # No Content-Length: answered, not waited on.
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).split(b"\r\n")[0].split()[1] == b"411"
    # The server is still up and answers a good request as before.
    assert _request(server, "POST", "/score", _good_body()) == (200, answer)


def test_geneval_reward_client(server):
    host, port = server.server_address[:2]
    images = torch.from_numpy(np.stack([_scene((YELLOW, (5, 20)), (GREEN, (40, 20))),
                                        _scene((GREEN, (5, 20)), (YELLOW, (40, 20))),
                                        _scene((RED, (5, 5)))])).permute(0, 3, 1, 2).float() / 255
    meta = [POSITION, POSITION, COLORS]
    reward = build_reward("geneval", {"url": f"http://{host}:{port}", "batch_size": 2, "strict_weight": 0.5})
    scores = call_reward("geneval", reward, images, ["p"] * 3, meta)
    assert scores["geneval.strict"].tolist() == [1.0, 0.0, 1.0]
    assert torch.allclose(scores["geneval.partial"], torch.tensor([1.0, 2 / 3, 1.0]))
    assert torch.allclose(scores["geneval"], 0.5 * scores["geneval.strict"] + 0.5 * scores["geneval.partial"])
    with pytest.raises(ValueError, match="metadata of image 0"):
        reward(images[:1], ["p"], [{"ocr_target": "x"}])

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    down = build_reward("geneval", {"url": f"http://127.0.0.1:{dead}", "timeout": 5})
    with pytest.raises(RuntimeError, match=rf"cannot reach the GenEval server at http://127.0.0.1:{dead}/health"):
        down(images[:1], ["p"], meta[:1])


def test_geneval_client_splits_requests_to_the_server_limits(server, monkeypatch):
    host, port = server.server_address[:2]
    reward = build_reward("geneval", {"url": f"http://{host}:{port}", "batch_size": 20})
    sizes = []
    post = reward._post
    monkeypatch.setattr(reward, "_post", lambda images, meta: sizes.append(len(images)) or post(images, meta))
    scene = torch.from_numpy(_scene((RED, (5, 5)))).permute(2, 0, 1).float() / 255
    scores = reward(scene.repeat(12, 1, 1, 1), ["p"] * 12, [COLORS] * 12)
    assert sizes == [8, 4] and scores["geneval.strict"].tolist() == [1.0] * 12  # --max-images 8
    # Noise does not compress: about 65 kB of base64 per 128 px image, three fit under the 200 kB body limit.
    sizes.clear()
    noise = torch.rand(7, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    reward(noise, ["p"] * 7, [COLORS] * 7)
    assert sizes == [3, 3, 1]
    with pytest.raises(RuntimeError, match="one image with its metadata is .* over the limit"):
        reward(torch.rand(1, 3, 256, 256), ["p"], [COLORS])


def test_server_process_binds_loopback(tmp_path):
    (tmp_path / "fake_geneval_backend.py").write_text(
        "from diffrl_bench.geneval import Backend\n"
        "class Empty(Backend):\n"
        "    name = 'empty'\n"
        "    def __init__(self, note='none'):\n"
        "        self.name = 'empty-' + note\n"
        "    def detect(self, images):\n"
        "        return [[] for _ in images]\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "diffrl_bench.geneval", "--port", "0", "--quiet",
                             "--backend", "fake_geneval_backend:Empty", "--option", "note=hi"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read())["backend"] == "empty-hi"
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_geneval_client_sends_jpegs_of_the_configured_quality(server, monkeypatch):
    """`jpeg_quality`: the client encodes JPEG (Flow-GRPO's client: PIL's default quality 75), the server decodes it."""
    from diffrl_bench.rewards.geneval import GenEvalReward

    host, port = server.server_address[:2]
    scene = _scene((RED, (5, 5)))
    images = torch.from_numpy(scene[None]).permute(0, 3, 1, 2).float() / 255
    sent = []
    original = GenEvalReward._post

    def spy(self, encoded, metadata):
        sent.extend(encoded)
        return original(self, encoded, metadata)

    monkeypatch.setattr(GenEvalReward, "_post", spy)
    reward = build_reward("geneval", {"url": f"http://{host}:{port}", "jpeg_quality": 75})
    scores = call_reward("geneval", reward, images, ["p"], [COLORS])
    reference = io.BytesIO()
    Image.fromarray(scene).save(reference, format="JPEG")  # PIL's default quality, what Flow-GRPO's client sends
    assert base64.b64decode(sent[0]) == reference.getvalue()
    # The server decoded and scored the JPEG (the fake detector needs exact colours, which JPEG does not keep).
    assert scores["geneval.strict"].shape == (1,)
    png = build_reward("geneval", {"url": f"http://{host}:{port}"})
    call_reward("geneval", png, images, ["p"], [COLORS])
    assert Image.open(io.BytesIO(base64.b64decode(sent[1]))).format == "PNG"  # the default stays lossless
    with pytest.raises(ValueError, match="jpeg_quality"):
        build_reward("geneval", {"url": f"http://{host}:{port}", "jpeg_quality": 0})


@pytest.mark.parametrize("preset, jpeg", [("flow_grpo_sd35m_geneval", 75), ("awm_sd35m_geneval", 75),
                                          ("nft_sd35m_geneval", None)])
def test_geneval_presets_train_on_the_graded_score(server, preset, jpeg):
    """The graded (partial) score, not the strict one, is what reaches the training advantage; evaluation scores
    lossless images whatever the training client sends."""
    from diffrl_bench.advantages import group_advantages
    from diffrl_bench.config import load_config
    from diffrl_bench.evaluate import build_eval_rewards
    from diffrl_bench.reward_harness import WeightedReward
    from omegaconf import OmegaConf

    cfg = load_config(preset)
    options = OmegaConf.to_container(cfg.reward.options)
    assert options["geneval"]["partial_mode"] == "flow_grpo" and options["geneval"].get("jpeg_quality") == jpeg
    host, port = server.server_address[:2]
    options["geneval"]["url"] = f"http://{host}:{port}"
    options["geneval"].pop("jpeg_quality", None)  # the fake detector needs exact colours
    harness = WeightedReward(dict(cfg.reward.components), options, worker="inline")
    # One prompt group, all strictly wrong (two-object prompts with one object drawn, or none): strict 0 everywhere,
    # so a strict reward would give this group no signal at all; the graded score tells them apart.
    two = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
           "prompt": "a photo of a dog and a cat"}
    scenes = [_scene((YELLOW, (5, 20))), _scene((YELLOW, (5, 20))), _scene(), _scene()]
    images = torch.from_numpy(np.stack(scenes)).permute(0, 3, 1, 2).float() / 255
    scores = harness(images, ["p"] * 4, [two] * 4)
    assert scores["geneval.strict"].tolist() == [0.0] * 4
    assert torch.equal(scores[WeightedReward.TOTAL].float(), scores["geneval.partial"].float())
    assert scores["geneval.partial"][0] > scores["geneval.partial"][2]
    advantages = group_advantages(scores[WeightedReward.TOTAL].double(), torch.zeros(4, dtype=torch.long),
                                  std="group")
    assert advantages[0] > 0 > advantages[2]
    cfg.reward.options.geneval.url = f"http://{host}:{port}"
    assert build_eval_rewards(cfg)["geneval"].jpeg_quality is None


def test_forty_concurrent_clients_are_all_answered_by_a_bounded_pool():
    """Issue 17: 40 clients at once used to be reset (listen backlog 5, a thread per connection). The pool serves
    2 at a time; the others wait in the backlog or retry, and every one gets its scores."""
    srv = gs.make_server(FakeDetector(), port=0, max_body_bytes=200_000, max_images=8, max_pixels=256 * 256,
                         quiet=True, workers=2)
    assert srv.request_queue_size >= 40
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    host, port = srv.server_address[:2]
    scene = torch.from_numpy(_scene((RED, (5, 5)))).permute(2, 0, 1).float() / 255
    results, errors = [], []
    start = threading.Barrier(40)

    def client():
        try:
            reward = build_reward("geneval", {"url": f"http://{host}:{port}", "timeout": 60})
            start.wait(timeout=30)
            results.append(reward(scene[None], ["p"], [COLORS])["geneval.strict"].tolist())
        except Exception as error:  # noqa: BLE001 - collected and shown by the assertion
            errors.append(repr(error))

    threads = [threading.Thread(target=client) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    workers = len(srv._pool._threads)
    srv.shutdown()
    srv.server_close()
    assert errors == [] and results == [[1.0]] * 40
    assert workers <= 2  # the pool's threads only, never one per connection


def test_the_geneval_client_retries_a_reset_connection_with_backoff_and_then_gives_up(monkeypatch):
    from diffrl_bench.rewards import geneval as client_module

    reward = build_reward("geneval", {"url": "http://127.0.0.1:9"})
    calls, sleeps = [], []
    monkeypatch.setattr(client_module.time, "sleep", sleeps.append)

    def flaky(request, timeout):
        calls.append(request.full_url)
        if len(calls) <= 2:
            raise ConnectionResetError(104, "Connection reset by peer")
        return io.BytesIO(b'{"ok": 1}')

    monkeypatch.setattr(client_module.urllib.request, "urlopen", flaky)
    assert reward._open(client_module.urllib.request.Request("http://127.0.0.1:9/health"), "a check") == b'{"ok": 1}'
    assert len(calls) == 3 and sleeps == [0.25, 0.5]
    calls.clear(), sleeps.clear()
    monkeypatch.setattr(client_module.urllib.request, "urlopen",
                        lambda request, timeout: calls.append(1) or (_ for _ in ()).throw(ConnectionResetError(104, "reset")))
    with pytest.raises(RuntimeError, match=r"was refused or reset 4 times while sending a check"):
        reward._open(client_module.urllib.request.Request("http://127.0.0.1:9/health"), "a check")
    assert len(calls) == 4 and sleeps == [0.25, 0.5, 1.0]
