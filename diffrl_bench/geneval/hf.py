"""GenEval detector backend on transformers: Mask2Former (COCO instance segmentation) + CLIP colour classification.

GenEval's own detector (mmdet Mask2Former Swin-S, COCO) needs mmdet/mmcv pinned to old versions; this backend needs
only torch and transformers, so it runs in the training process (`GenEvalInProcess`, a reward) or in the GenEval
server (`--backend hf-mask2former`), and is what the `geneval` reward runs with its option
`backend: hf-mask2former`. What follows GenEval (djghosh13/geneval@af4902f):

* classes: the 80 COCO "thing" classes in the detector's label order, named as GenEval's
  evaluation/object_names.txt names them (`GENEVAL_CLASSES`; e.g. "computer mouse" where COCO says "mouse").
* detections: every instance the detector returns, with its confidence; the rules (threshold 0.3, 0.9 for counting,
  at most 16 per class, NMS off) are applied by the shared GenEval rules, not here.
* instance post-processing as mmdet's MaskFormerFusionHead.instance_postprocess (the detector GenEval runs): per
  image the top `max_per_image` (100) (query, class) pairs by class probability (softmax without the no-object
  class); score = class probability x mean sigmoid of the mask logits inside the binary mask; mask = logits > 0
  after resizing the mask logits to the padded input, cropping the padding off and resizing to the image; box =
  the mask's extent (x0, y0, x_last + 1, y_last + 1), as mmdet's mask2bbox.
* input: resized keeping the aspect ratio to fit 1333 x 800 (short side 800), ImageNet mean/std, padded to a
  multiple of 32, as the mmdet config's test pipeline.
* colour: CLIP zero-shot over GenEval's 10 colours with its three templates ("a photo of a {c} {object}",
  "a photo of a {c}-colored {object}", "a photo of a {c} object"; per colour the normalised text embeddings are
  averaged and renormalised), on the detection's masked image (outside the mask: grey #999) cropped to its box;
  CLIP input: shorter side resized to 224 (bicubic), centre crop, OpenAI CLIP mean/std (open_clip's transform).

What differs from GenEval's detector: the model weights. The transformers checkpoints
(facebook/mask2former-swin-small-coco-instance) are converted from the Mask2Former authors' Detectron2 release,
not mmdet's retrained Swin-S, and resizing is PIL's bilinear instead of OpenCV's, so confidences, masks and hence
GenEval scores are close but not bit-identical to GenEval's. Report which backend produced a number. CLIP ViT-L/14
(openai/clip-vit-large-patch14) holds the same OpenAI weights open_clip loads as ViT-L-14/openai.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from diffrl_bench.rewards._common import CLIP_MEAN, CLIP_STD, check_images, resolve_dtype, to_uint8_hwc

from diffrl_bench.geneval.detectors import COLORS, Backend, color_text_weights
from diffrl_bench.geneval.metadata import check_image_records
from diffrl_bench.geneval.rules import PARTIAL_MODES, Detection, Rules
from diffrl_bench.geneval.server import score_images

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"

# GenEval's evaluation/object_names.txt: the COCO thing classes in the detector's (contiguous) label order.
GENEVAL_CLASSES: Tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

# mmdet's img_norm_cfg for the Mask2Former configs (ImageNet statistics on the 0-255 scale).
DETECTOR_MEAN = (123.675, 116.28, 103.53)
DETECTOR_STD = (58.395, 57.12, 57.375)


# --------------------------------------------------------------------------------------------------------------
# detector input and output (pure tensor code)
# --------------------------------------------------------------------------------------------------------------


def rescaled_size(height: int, width: int, long_edge: int = 1333, short_edge: int = 800) -> Tuple[int, int]:
    """(h, w) after mmcv's keep-ratio rescale to fit long_edge x short_edge (rounded half up)."""
    scale = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def detector_inputs(images: Sequence[Any], long_edge: int = 1333, short_edge: int = 800, size_divisor: int = 32):
    """uint8 (H, W, 3) RGB arrays -> (pixel_values (B, 3, Hp, Wp) float32, resized [(h, w)], original [(H, W)])."""
    import numpy as np
    import torch
    from PIL import Image

    resized, sizes, originals = [], [], []
    for image in images:
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"images must be uint8 (H, W, 3) RGB arrays, got {array.dtype} {array.shape}")
        h, w = array.shape[:2]
        nh, nw = rescaled_size(h, w, long_edge, short_edge)
        picture = Image.fromarray(array).resize((nw, nh), Image.BILINEAR)
        resized.append(torch.from_numpy(np.asarray(picture, dtype=np.float32)).permute(2, 0, 1))
        sizes.append((nh, nw))
        originals.append((h, w))
    pad_h = max(h for h, _ in sizes)
    pad_w = max(w for _, w in sizes)
    pad_h = -(-pad_h // size_divisor) * size_divisor
    pad_w = -(-pad_w // size_divisor) * size_divisor
    mean = torch.tensor(DETECTOR_MEAN).view(3, 1, 1)
    std = torch.tensor(DETECTOR_STD).view(3, 1, 1)
    # mmdet normalises, then pads with zeros (zero in normalised units).
    batch = torch.zeros(len(resized), 3, pad_h, pad_w)
    for i, tensor in enumerate(resized):
        batch[i, :, : tensor.shape[1], : tensor.shape[2]] = (tensor - mean) / std
    return batch, sizes, originals


def masks_to_boxes(masks) -> "Any":
    """(N, H, W) bool -> (N, 4) float boxes (x0, y0, x_last + 1, y_last + 1); all zeros for an empty mask."""
    import torch

    boxes = torch.zeros(masks.shape[0], 4)
    if masks.shape[0] == 0:
        return boxes
    cols = masks.any(dim=1)  # (N, W)
    rows = masks.any(dim=2)  # (N, H)
    for i in range(masks.shape[0]):
        xs = torch.nonzero(cols[i]).flatten()
        ys = torch.nonzero(rows[i]).flatten()
        if len(xs) and len(ys):
            boxes[i] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
    return boxes


def instances(class_logits, mask_logits, padded: Tuple[int, int], resized: Tuple[int, int],
              original: Tuple[int, int], max_per_image: int = 100):
    """One image's instances from Mask2Former's raw outputs, as mmdet's instance post-processing.

    class_logits (Q, C + 1) with the no-object class last; mask_logits (Q, h, w) at any resolution.
    Returns (labels (K,), scores (K,), masks (K, H, W) bool, boxes (K, 4)), K = min(max_per_image, Q * C).
    """
    import torch
    import torch.nn.functional as F

    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    probs = F.softmax(class_logits.float(), dim=-1)[:, :-1]
    k = min(max_per_image, num_queries * num_classes)
    top_scores, top = probs.flatten().topk(k, sorted=True)
    labels = top % num_classes
    queries = torch.div(top, num_classes, rounding_mode="floor")
    logits = F.interpolate(mask_logits[None].float(), size=padded, mode="bilinear", align_corners=False)[0]
    logits = logits[:, : resized[0], : resized[1]]
    logits = F.interpolate(logits[None], size=original, mode="bilinear", align_corners=False)[0]
    logits = logits[queries]
    binary = logits > 0
    mask_scores = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return labels, top_scores * mask_scores, binary, masks_to_boxes(binary)


# --------------------------------------------------------------------------------------------------------------
# colour input (pure image code)
# --------------------------------------------------------------------------------------------------------------


def masked_crop(picture, mask, box, bgcolor: str = "#999"):
    """The object on a plain background, cropped to its box (GenEval's ImageCrops): a PIL image."""
    from PIL import Image

    picture = picture.convert("RGB")
    if mask is not None:
        import numpy as np

        mask = np.asarray(mask)
        if mask.shape != (picture.size[1], picture.size[0]):
            raise ValueError(f"mask of shape {mask.shape} does not match the image's {picture.size[::-1]}")
        blank = Image.new("RGB", picture.size, color=bgcolor)
        picture = Image.composite(picture, blank, Image.fromarray((mask > 0).astype("uint8") * 255))
    return picture.crop(tuple(int(round(float(v))) for v in box))


def clip_pixels(pictures: Sequence[Any], size: int = 224):
    """PIL images -> (N, 3, size, size): shorter side to `size` (bicubic), centre crop, CLIP normalisation."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for picture in pictures:
        w, h = picture.size
        if w == 0 or h == 0:
            raise ValueError(f"cannot classify the colour of an empty crop ({w}x{h})")
        # torchvision's Resize(int): the longer side is truncated, not rounded.
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        picture = picture.convert("RGB").resize((nw, nh), Image.BICUBIC)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        picture = picture.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1))
    batch = torch.stack(out)
    return (batch - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def _features(output):
    """transformers 4.x returns the projected features; 5.x a model output with them as pooler_output."""
    return output if hasattr(output, "shape") else output.pooler_output


# --------------------------------------------------------------------------------------------------------------
# the backend
# --------------------------------------------------------------------------------------------------------------


def _as_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes"):
        return True
    if str(value).lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


class HFMask2FormerBackend(Backend):
    """GenEval detector on transformers' Mask2FormerForUniversalSegmentation + CLIPModel (see the module docstring).

    Options (strings from the server's --option are accepted): `detector` (hub id or local folder, default
    facebook/mask2former-swin-small-coco-instance), `clip` (default openai/clip-vit-large-patch14), `device`
    (cuda when available), `dtype` (float32; float16/bfloat16 for the models' weights), `class_names` (a file,
    one class a line in the detector's label order; default GenEval's names), `bgcolor` (#999), `long_edge`
    (1333), `short_edge` (800), `size_divisor` (32), `max_per_image` (100), `local_files_only` (false; true
    refuses any download), `batch_size` (8 images per detector forward).
    """

    name = "hf-mask2former"

    def __init__(self, detector: str = DEFAULT_DETECTOR, clip: str = DEFAULT_CLIP, device: Optional[str] = None,
                 dtype: str = "float32", class_names: Optional[str] = None, bgcolor: str = "#999",
                 long_edge: int = 1333, short_edge: int = 800, size_divisor: int = 32, max_per_image: int = 100,
                 local_files_only: Any = False, batch_size: int = 8):
        import torch
        from transformers import AutoTokenizer, CLIPModel, Mask2FormerForUniversalSegmentation

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        weights_dtype = resolve_dtype(self.name, dtype)
        offline = _as_bool(local_files_only)
        loaded = {}
        for what, source, loader in (("detector", detector, Mask2FormerForUniversalSegmentation.from_pretrained),
                                     ("clip", clip, CLIPModel.from_pretrained),
                                     ("clip tokenizer", clip, AutoTokenizer.from_pretrained)):
            try:
                loaded[what] = loader(source, local_files_only=offline)
            except (OSError, ValueError) as error:
                raise ValueError(f"hf-mask2former: cannot load the {what} from {source!r} (option "
                                 f"{what.split()[0]}): {error}") from error
        # Cast after loading: the keyword for it changed name between transformers 4 and 5.
        loaded["detector"] = loaded["detector"].to(weights_dtype)
        loaded["clip"] = loaded["clip"].to(weights_dtype)
        names = None
        if class_names is not None:
            with open(class_names, encoding="utf-8") as handle:
                names = [line.strip() for line in handle if line.strip()]
        self._setup(loaded["detector"], loaded["clip"], loaded["clip tokenizer"], device, names, bgcolor,
                    int(long_edge), int(short_edge), int(size_divisor), int(max_per_image), int(batch_size),
                    source=detector)

    @classmethod
    def from_models(cls, detector, clip, tokenizer, device: str = "cpu", class_names: Optional[Sequence[str]] = None,
                    **options) -> "HFMask2FormerBackend":
        """A backend on models already built (tests, or a caller that shares them)."""
        self = cls.__new__(cls)
        self._setup(detector, clip, tokenizer, device, list(class_names) if class_names else None,
                    options.get("bgcolor", "#999"), int(options.get("long_edge", 1333)),
                    int(options.get("short_edge", 800)), int(options.get("size_divisor", 32)),
                    int(options.get("max_per_image", 100)), int(options.get("batch_size", 8)),
                    source=type(detector).__name__)
        return self

    def _setup(self, detector, clip, tokenizer, device, names, bgcolor, long_edge, short_edge, size_divisor,
               max_per_image, batch_size, source):
        import torch

        self._torch = torch
        self.device = device
        self.detector = detector.to(device).eval()
        self.clip = clip.to(device).eval()
        self.tokenizer = tokenizer
        self.class_names = tuple(names) if names else GENEVAL_CLASSES
        num_labels = getattr(getattr(detector, "config", None), "num_labels", len(self.class_names))
        if num_labels != len(self.class_names):
            raise ValueError(f"hf-mask2former: the detector {source!r} has {num_labels} classes but the class names "
                             f"list {len(self.class_names)}; use a COCO instance-segmentation checkpoint "
                             f"(80 classes) or give class_names")
        self.bgcolor = bgcolor
        self.long_edge, self.short_edge, self.size_divisor = long_edge, short_edge, size_divisor
        self.max_per_image, self.batch_size = max_per_image, max(1, batch_size)
        vision = getattr(getattr(clip, "config", None), "vision_config", None)
        self.clip_size = int(getattr(vision, "image_size", 224))
        self._color_weights: Dict[str, Any] = {}

    def _dtype(self, module):
        return next(module.parameters()).dtype

    def detect(self, images):
        torch = self._torch
        out: List[List[Detection]] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            pixels, sizes, originals = detector_inputs(chunk, self.long_edge, self.short_edge, self.size_divisor)
            with torch.no_grad():
                result = self.detector(pixel_values=pixels.to(self.device, self._dtype(self.detector)))
            padded = tuple(pixels.shape[-2:])
            for i in range(len(chunk)):
                labels, scores, masks, boxes = instances(result.class_queries_logits[i],
                                                         result.masks_queries_logits[i],
                                                         padded, sizes[i], originals[i], self.max_per_image)
                masks = masks.cpu().numpy()
                out.append([Detection(self.class_names[int(label)], float(score), tuple(float(v) for v in box),
                                      mask=mask)
                            for label, score, box, mask in zip(labels.tolist(), scores.tolist(), boxes.tolist(),
                                                               masks)])
        return out

    def _weights(self, label: str):
        if label not in self._color_weights:
            self._color_weights[label] = color_text_weights(self._torch, self._encode_texts, label)
        return self._color_weights[label]

    def _encode_texts(self, texts):
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        return _features(self.clip.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()}))

    def classify_colors(self, image, detections, label):
        from PIL import Image

        torch = self._torch
        picture = Image.fromarray(image).convert("RGB")
        crops = [masked_crop(picture, det.mask, det.box, self.bgcolor) for det in detections]
        pixels = clip_pixels(crops, self.clip_size).to(self.device, self._dtype(self.clip))
        with torch.no_grad():
            feats = _features(self.clip.get_image_features(pixel_values=pixels)).float()
            logits = torch.nn.functional.normalize(feats, dim=-1) @ self._weights(label)
        return [COLORS[i] for i in logits.argmax(dim=1).tolist()]


# --------------------------------------------------------------------------------------------------------------
# in-process reward
# --------------------------------------------------------------------------------------------------------------


class GenEvalInProcess:
    """The `geneval` reward without a server: same scores and logged parts as the HTTP client.

    `strict_weight * strict + (1 - strict_weight) * partial`; options as the client's (`strict_weight`,
    `partial_mode`) plus the backend's (see HFMask2FormerBackend) and the rules' (threshold, counting_threshold,
    max_objects, nms_threshold, position_threshold). `backend=` takes a built Backend instead (tests, sharing).
    """

    name = "geneval"

    def __init__(self, strict_weight: float = 0.0, partial_mode: str = "clauses", backend: Optional[Backend] = None,
                 **options):
        import dataclasses

        if not 0.0 <= float(strict_weight) <= 1.0:
            raise ValueError(f"geneval option strict_weight must be in [0, 1], got {strict_weight}")
        if partial_mode not in PARTIAL_MODES:
            raise ValueError(f"geneval option partial_mode must be one of {list(PARTIAL_MODES)}, got {partial_mode!r}")
        rule_names = {f.name for f in dataclasses.fields(Rules)}
        self.rules = Rules(**{k: options.pop(k) for k in list(options) if k in rule_names})
        self.strict_weight, self.partial_mode = float(strict_weight), partial_mode
        self.backend = backend if backend is not None else HFMask2FormerBackend(**options)
        if backend is not None and options:
            raise ValueError(f"geneval: backend options {sorted(options)} given with a built backend")

    def __call__(self, images, prompts: Sequence[str], metadata: List[Dict[str, Any]]):
        import torch

        check_images(self.name, images, prompts)
        check_image_records(metadata, prompts)
        scores = score_images(self.backend, list(to_uint8_hwc(images)), list(metadata), self.rules, self.partial_mode)
        strict = torch.tensor([s.strict for s in scores], dtype=torch.float32)
        partial = torch.tensor([s.partial for s in scores], dtype=torch.float32)
        total = self.strict_weight * strict + (1.0 - self.strict_weight) * partial
        return {self.name: total, f"{self.name}.strict": strict, f"{self.name}.partial": partial}
