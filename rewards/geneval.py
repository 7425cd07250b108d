"""GenEval reward: by default an HTTP client of the GenEval server (diffrl_bench/geneval/), which runs the detector
in its own process and environment; with `backend: hf-mask2former` the transformers detector (geneval/hf.py) runs
in the training process instead, under the same logged names."""
from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from diffrl_bench.geneval import PARTIAL_MODES
from diffrl_bench.geneval.metadata import check_image_records
from diffrl_bench.registry import REWARDS
from diffrl_bench.reward_harness import option_error
from diffrl_bench.rewards._common import check_images, option, to_uint8_hwc

BACKENDS = ("server", "hf-mask2former")

_START_HINT = ("start it in the GenEval environment: python -m diffrl_bench.geneval --port PORT "
               "--backend mask2former --option config=... --option checkpoint=... --option class_names=...")


class _Transient(Exception):
    """A refused or reset connection, worth retrying."""


def encode_image(array, jpeg_quality: Optional[int] = None) -> str:
    """base64 PNG (lossless) or, with `jpeg_quality`, a JPEG of that quality."""
    buffer = io.BytesIO()
    if jpeg_quality is None:
        # Level 1: lossless either way, and the fast end of the size/time trade-off for a loopback hop.
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    else:
        Image.fromarray(array).save(buffer, format="JPEG", quality=jpeg_quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@REWARDS.register("geneval")
class GenEvalReward:
    """GenEval on a detector server: `strict_weight * strict + (1 - strict_weight) * partial`.

    `strict` is GenEval's per-image correctness; `partial` the per-clause credit (`partial_mode`: "clauses", the
    fraction of clauses that hold, or "flow_grpo", the graded score of Flow-GRPO's reward server). Flow-GRPO trains
    on the partial score, hence `strict_weight` 0 by default. Each image's metadata must be a GenEval record
    (`tag`, `include`, `exclude`), as the `geneval:` prompt loader and the toy benchmark provide.

    Options: `url` (http://127.0.0.1:18085), `timeout` (seconds per request, 120), `batch_size` (most images per
    request, 32; requests are also split to fit the server's --max-images and --max-body-mb, which the client
    reads once from GET /health), `strict_weight` (0), `partial_mode`, `jpeg_quality` (null: lossless PNG; an int
    1..100: the client sends JPEGs of that quality, as Flow-GRPO's client does with PIL's default 75
    [yifan123/flow_grpo@ac4c86e8:flow_grpo/rewards.py:191-196], so the detector scores the same compressed image).
    `backend`: "server" (default, the options above) or "hf-mask2former": no server; the transformers Mask2Former +
    CLIP detector runs in this process, and every further option goes to it or to the rules (detector, clip,
    device, dtype, local_files_only, batch_size, threshold, counting_threshold, ...; see geneval/hf.py and
    docs/rewards.md). The logged names are the same either way; runs record the backend in config.yaml.
    Logged parts: `geneval.strict`, `geneval.partial`.
    """

    name = "geneval"
    needs_metadata = ("tag", "include")
    train_only_options = ("jpeg_quality",)
    """evaluation scores lossless images for every arm (diffrl_bench/evaluate.py build_eval_rewards)"""

    def __init__(self, url: str = "http://127.0.0.1:18085", timeout: float = 120.0, batch_size: int = 32,
                 strict_weight: float = 0.0, partial_mode: str = "clauses", jpeg_quality: Optional[int] = None,
                 backend: str = "server", **backend_options: Any):
        name = self.name
        self.backend = option(name, "backend", backend, str, lambda v: v in BACKENDS, f"is not one of {BACKENDS}")
        if backend == "server" and backend_options:
            raise option_error(name, sorted(backend_options)[0], backend_options[sorted(backend_options)[0]],
                               f"is not an option of the server client (options {sorted(backend_options)} "
                               f"need backend: hf-mask2former)")
        self.url = option(name, "url", url, str, lambda v: v.startswith(("http://", "https://")),
                          "is not an http:// URL").rstrip("/")
        self.timeout = option(name, "timeout", timeout, float, lambda v: v > 0, "is not positive")
        self.batch_size = option(name, "batch_size", batch_size, int, lambda v: v >= 1, "is not at least 1")
        self.strict_weight = option(name, "strict_weight", strict_weight, float, lambda v: 0 <= v <= 1,
                                    "is not in [0, 1]")
        self.partial_mode = option(name, "partial_mode", partial_mode, str, lambda v: v in PARTIAL_MODES,
                                   f"is not one of {list(PARTIAL_MODES)}")
        self.jpeg_quality = None if jpeg_quality is None else option(
            name, "jpeg_quality", jpeg_quality, int, lambda v: 1 <= v <= 100, "is not null or in 1..100")
        self._limits: Tuple[int, int] | None = None
        self._in_process = None
        if backend == "hf-mask2former":
            from diffrl_bench.geneval.hf import GenEvalInProcess

            self._in_process = GenEvalInProcess(self.strict_weight, self.partial_mode, **backend_options)

    RETRIES = 3
    """retries of a request whose connection was refused or reset (a busy or restarting server)"""
    BACKOFF_S = 0.25
    """wait before the first retry; doubled before each further one (0.25 + 0.5 + 1 s in all)"""

    def _open(self, request: urllib.request.Request, what: str) -> bytes:
        """One request, retried a bounded number of times with backoff when the connection is refused or reset;
        a timeout or an HTTP error is not retried (it would multiply the wait, or repeat a refusal)."""
        for attempt in range(self.RETRIES + 1):
            try:
                return self._open_once(request, what, last=attempt == self.RETRIES)
            except _Transient:
                time.sleep(self.BACKOFF_S * 2 ** attempt)
        raise AssertionError("unreachable: the last attempt raises")

    def _open_once(self, request: urllib.request.Request, what: str, last: bool) -> bytes:
        endpoint = request.full_url
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except (ConnectionRefusedError, ConnectionResetError, http.client.RemoteDisconnected) as error:
            if not last:
                raise _Transient() from error
            raise RuntimeError(f"geneval: the connection to {endpoint} was refused or reset {self.RETRIES + 1} "
                               f"times while sending {what} ({error!r}); the server may be overloaded or "
                               f"down. {_START_HINT}") from None
        except urllib.error.HTTPError as error:
            try:
                message = json.loads(error.read()).get("error", "")
            except Exception:  # noqa: BLE001 - a non-JSON error page: report the status alone
                message = ""
            raise RuntimeError(f"geneval: the server at {endpoint} answered {error.code} {error.reason}: "
                               f"{message}") from None
        except urllib.error.URLError as error:
            reason = error.reason
            if isinstance(reason, (ConnectionRefusedError, ConnectionResetError)) and not last:
                raise _Transient() from error
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise RuntimeError(f"geneval: no answer from {endpoint} within {self.timeout:g} s "
                                   f"(option timeout)") from None
            if isinstance(reason, (BrokenPipeError, ConnectionResetError)):
                raise RuntimeError(f"geneval: {endpoint} cut the connection while receiving {what} ({reason}); "
                                   f"is the body over the server's --max-body-mb?") from None
            raise RuntimeError(f"geneval: cannot reach the GenEval server at {endpoint} ({reason}); "
                               f"{_START_HINT}") from None
        except (socket.timeout, TimeoutError):
            raise RuntimeError(f"geneval: no answer from {endpoint} within {self.timeout:g} s "
                               f"(option timeout)") from None
        except ConnectionError as error:
            raise RuntimeError(f"geneval: the connection to {endpoint} failed while sending {what} "
                               f"({error})") from None

    def _server_limits(self) -> Tuple[int, int]:
        """(max body bytes, max images) the server accepts, asked once, so requests can be split to fit."""
        if self._limits is None:
            body = self._open(urllib.request.Request(f"{self.url}/health"), "a health check")
            try:
                info = json.loads(body)
                self._limits = (int(info["max_body_bytes"]), int(info["max_images"]))
            except (ValueError, KeyError, TypeError) as error:
                raise RuntimeError(f"geneval: {self.url}/health did not answer like a GenEval server: "
                                   f"{error}") from None
        return self._limits

    def _post(self, images: List[str], metadata: List[Dict[str, Any]]) -> Dict[str, Any]:
        payload = {"images": images, "metadata": metadata, "partial_mode": self.partial_mode}
        request = urllib.request.Request(f"{self.url}/score", data=json.dumps(payload).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        body = self._open(request, f"{len(images)} images")
        try:
            answer = json.loads(body)
            strict, partial = answer["strict"], answer["partial"]
            if len(strict) != len(images) or len(partial) != len(images):
                raise ValueError(f"{len(strict)} strict / {len(partial)} partial scores for {len(images)} images")
            return answer
        except (ValueError, KeyError, TypeError) as error:
            raise RuntimeError(f"geneval: malformed answer from {self.url}/score: {error}") from None

    def _requests(self, encoded: List[str], metadata: List[Dict[str, Any]]):
        """Consecutive (start, stop) slices of at most batch_size images whose JSON fits the server's limits."""
        max_body, max_images = self._server_limits()
        per_request = min(self.batch_size, max_images)
        budget = max_body - 1024  # room for the JSON skeleton
        start, size = 0, 0
        for i, (image, record) in enumerate(zip(encoded, metadata)):
            item = len(image) + len(json.dumps(record)) + 8
            if item > budget:
                raise RuntimeError(f"geneval: one image with its metadata is {item} bytes, over the limit of the "
                                   f"server at {self.url} ({max_body} bytes, --max-body-mb)")
            if i > start and (i - start >= per_request or size + item > budget):
                yield start, i
                start, size = i, 0
            size += item
        if start < len(encoded):
            yield start, len(encoded)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 metadata: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        if self._in_process is not None:
            return self._in_process(images, prompts, metadata)
        check_images(self.name, images, prompts)
        check_image_records(metadata, prompts)
        encoded = [encode_image(a, self.jpeg_quality) for a in to_uint8_hwc(images)]
        metadata = list(metadata)
        strict: List[float] = []
        partial: List[float] = []
        for start, stop in self._requests(encoded, metadata):
            answer = self._post(encoded[start:stop], metadata[start:stop])
            strict += answer["strict"]
            partial += answer["partial"]
        strict_t = torch.tensor(strict, dtype=torch.float32)
        partial_t = torch.tensor(partial, dtype=torch.float32)
        total = self.strict_weight * strict_t + (1.0 - self.strict_weight) * partial_t
        return {self.name: total, f"{self.name}.strict": strict_t, f"{self.name}.partial": partial_t}
