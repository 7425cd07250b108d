"""Detector backends of the GenEval server: the protocol, GenEval's own Mask2Former + CLIP stack, and the lookup
of `--backend` (a built-in name or `module:factory`; `hf-mask2former`, the transformers stack, lives in hf.py).
A backend's heavy packages are imported when it is built, in the server's environment, never at load time.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List

from diffrl_bench.geneval.rules import Detection

# GenEval's colour vocabulary: the classes the colour classifier chooses among.
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {label}", "a photo of a {c}-colored {label}", "a photo of a {c} object")


def color_text_weights(torch, encode: Callable[[List[str]], Any], label: str):
    """GenEval's zero-shot colour classifier for `label`: per colour, the mean of the normalised CLIP text
    embeddings of COLOR_TEMPLATES, renormalised; a (dim, len(COLORS)) matrix. `encode(texts)` returns the text
    embeddings of whichever CLIP implementation the backend runs."""
    rows = []
    with torch.no_grad():
        for color in COLORS:
            texts = [t.format(c=color, label=label) for t in COLOR_TEMPLATES]
            emb = torch.nn.functional.normalize(encode(texts).float(), dim=-1).mean(0)
            rows.append(emb / emb.norm())
    return torch.stack(rows, dim=1)


class Backend:
    """A detector for the server: `detect(images)` and `classify_colors(image, detections, label)`.

    Images are uint8 numpy arrays (H, W, 3), RGB. `detect` returns every detection with its confidence (the rules
    threshold them); `classify_colors` returns one colour name per detection. Calls are serialised by the server,
    so a backend need not be thread-safe.
    """

    name = "backend"

    def detect(self, images: List[Any]) -> List[List[Detection]]:
        raise NotImplementedError

    def classify_colors(self, image: Any, detections: List[Detection], label: str) -> List[str]:
        raise NotImplementedError


class Mask2FormerBackend(Backend):
    """GenEval's own stack: mmdet Mask2Former (COCO) + OpenCLIP zero-shot colour classification of masked crops.

    Needs, in the server's environment, mmdet (2.x as GenEval pins it, or 3.x), open_clip and torch. Options:
    `config` (mmdet config file), `checkpoint` (.pth), `class_names` (GenEval's object_names.txt, one class a
    line in the detector's label order), `clip_arch` (ViT-L-14), `clip_pretrained` (openai, or a local file),
    `device` (cuda), `bgcolor` (#999, the grey the masked crop is pasted on).
    """

    name = "mask2former"

    def __init__(self, config: str, checkpoint: str, class_names: str, clip_arch: str = "ViT-L-14",
                 clip_pretrained: str = "openai", device: str = "cuda", bgcolor: str = "#999"):
        try:
            import open_clip
            import torch
            from mmdet.apis import inference_detector, init_detector
        except ImportError as error:
            raise ImportError(f"the mask2former GenEval backend needs mmdet, open_clip and torch in the server's "
                              f"environment (GenEval's install instructions): {error}") from error
        with open(class_names, encoding="utf-8") as handle:
            self.class_names = [line.strip() for line in handle if line.strip()]
        self._torch = torch
        self._inference = inference_detector
        self.device = device
        self.bgcolor = bgcolor
        self.detector = init_detector(config, checkpoint, device=device)
        self.clip, _, self.transform = open_clip.create_model_and_transforms(clip_arch, pretrained=clip_pretrained,
                                                                             device=device)
        self.clip.eval()
        self.tokenizer = open_clip.get_tokenizer(clip_arch)
        self._color_weights: Dict[str, Any] = {}

    def detect(self, images):
        import numpy as np

        results = self._inference(self.detector, list(images))
        out = []
        for result in results:
            dets: List[Detection] = []
            if hasattr(result, "pred_instances"):  # mmdet 3.x DetDataSample
                inst = result.pred_instances
                masks = inst.masks.cpu().numpy() if hasattr(inst, "masks") else None
                for i, (box, score, label) in enumerate(zip(inst.bboxes.cpu().numpy(), inst.scores.cpu().numpy(),
                                                            inst.labels.cpu().numpy())):
                    dets.append(Detection(self.class_names[int(label)], float(score), tuple(map(float, box)),
                                          mask=None if masks is None else masks[i]))
            else:  # mmdet 2.x: per-class arrays (N, 5), optionally with per-class mask lists
                bbox, segm = (result if isinstance(result, tuple) else (result, None))[:2]
                for index, label in enumerate(self.class_names):
                    for j, row in enumerate(np.asarray(bbox[index])):
                        dets.append(Detection(label, float(row[4]), tuple(map(float, row[:4])),
                                              mask=None if segm is None else segm[index][j]))
            out.append(dets)
        return out

    def _weights(self, label: str):
        if label not in self._color_weights:
            self._color_weights[label] = color_text_weights(
                self._torch, lambda texts: self.clip.encode_text(self.tokenizer(texts).to(self.device)), label)
        return self._color_weights[label]

    def classify_colors(self, image, detections, label):
        from PIL import Image

        torch = self._torch
        picture = Image.fromarray(image).convert("RGB")
        blank = Image.new("RGB", picture.size, color=self.bgcolor)
        crops = []
        for det in detections:
            crop = picture if det.mask is None else Image.composite(
                picture, blank, Image.fromarray((det.mask > 0).astype("uint8") * 255))
            crops.append(self.transform(crop.crop(tuple(int(round(v)) for v in det.box))))
        with torch.no_grad():
            feats = self.clip.encode_image(torch.stack(crops).to(self.device)).float()
            logits = torch.nn.functional.normalize(feats, dim=-1) @ self._weights(label)
        return [COLORS[i] for i in logits.argmax(dim=1).tolist()]


def _hf_mask2former(**options) -> Backend:
    # Imported on use: the module needs torch, transformers and this project's rewards package.
    from diffrl_bench.geneval.hf import HFMask2FormerBackend

    return HFMask2FormerBackend(**options)


BACKENDS: Dict[str, Callable[..., Backend]] = {"mask2former": Mask2FormerBackend, "hf-mask2former": _hf_mask2former}


def build_backend(spec: str, options: Dict[str, str]) -> Backend:
    """`mask2former`, `hf-mask2former` (geneval/hf.py: transformers, no mmdet) or `package.module:factory` (a class
    or function taking the options as keyword strings)."""
    if spec in BACKENDS:
        factory = BACKENDS[spec]
    elif ":" in spec:
        module_name, attr = spec.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise SystemExit(f"--backend {spec!r}: cannot import {attr!r} from {module_name!r}: {error}")
    else:
        raise SystemExit(f"--backend {spec!r}: unknown; use one of {sorted(BACKENDS)} or module:factory")
    try:
        return factory(**options)
    except TypeError as error:
        raise SystemExit(f"--backend {spec!r} rejected its --option values {options}: {error}")
