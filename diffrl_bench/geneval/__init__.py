"""GenEval scoring: the clause rules as pure code, pluggable detector backends, and a localhost HTTP server.

GenEval's detector stack (mmdet Mask2Former + an OpenCLIP colour classifier) pins old torch/mmcv versions that
conflict with the training environment, so it runs in its own process; the `geneval` reward (rewards/geneval.py)
is an HTTP client. This package imports only the standard library at load time (numpy and PIL when a request is
scored, the backend's own packages when it is built), so it also runs in the GenEval environment without this
project installed: `python -m diffrl_bench.geneval --port 18085 --backend mask2former --option config=...` from
the repository root (or with it on PYTHONPATH), or `python path/to/diffrl_bench/geneval ...` from anywhere.

Modules: `metadata` (the record format, also used by the prompt-file loader), `rules` (GenEval's clause rules and
the strict / partial scores), `detectors` (the backend protocol, GenEval's Mask2Former + CLIP stack, the
`--backend` lookup), `hf` (the same detector on transformers, no mmdet: `--backend hf-mask2former`, and the
in-process `geneval` reward with `backend: hf-mask2former`; not imported here, it needs torch), `server` (HTTP
API and command line; `__main__` starts it).
"""
from diffrl_bench.geneval.detectors import BACKENDS, COLORS, Backend, Mask2FormerBackend, build_backend
from diffrl_bench.geneval.metadata import RELATIONS, MetadataError, validate_metadata
from diffrl_bench.geneval.rules import (PARTIAL_MODES, ColorFn, Detection, ImageScore, Rules, box_iou, evaluate,
                                        keep_detections, relative_position)
from diffrl_bench.geneval.server import RequestError, decode_image, make_server, parse_request, score_images

__all__ = ["BACKENDS", "COLORS", "PARTIAL_MODES", "RELATIONS", "Backend", "ColorFn", "Detection", "ImageScore",
           "Mask2FormerBackend", "MetadataError", "RequestError", "Rules", "box_iou", "build_backend", "decode_image",
           "evaluate", "keep_detections", "make_server", "parse_request", "relative_position", "score_images",
           "validate_metadata"]
