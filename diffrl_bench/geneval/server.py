"""The GenEval server over HTTP: request checks, scoring with a backend, and the command line.

HTTP API (JSON both ways; the server binds 127.0.0.1 unless told otherwise, and has no authentication):

* `GET /health` -> `{"status": "ok", "backend": ..., "max_body_bytes": ..., "max_images": ...}`
* `POST /score` with `{"images": [base64 PNG or JPEG, ...], "metadata": [GenEval record, ...], "partial_mode"?: ...}`
  -> `{"strict": [...], "partial": [...], "details": [{"clauses": [[text, ok], ...], "detected": {class: n}}]}`.
  Errors answer `{"error": message}`: 400 malformed JSON, fields, images or metadata; 404 unknown path; 411 no
  Content-Length; 413 body over `--max-body-mb` or more than `--max-images` images or an image over
  `--max-pixels`; 500 when the backend raises (the server keeps serving).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import io
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Dict, List, Optional, Sequence, Tuple

from diffrl_bench.geneval.detectors import Backend, build_backend
from diffrl_bench.geneval.metadata import MetadataError, validate_metadata
from diffrl_bench.geneval.rules import PARTIAL_MODES, ImageScore, Rules, evaluate, keep_detections


def score_images(backend: Backend, images: List[Any], metadata: List[Dict[str, Any]], rules: Rules,
                 partial_mode: str = "clauses") -> List[ImageScore]:
    """Detect, keep, and evaluate each image against its metadata."""
    detections = backend.detect(images)
    if len(detections) != len(images):
        raise RuntimeError(f"backend {backend.name!r} returned {len(detections)} detection lists "
                           f"for {len(images)} images")
    scores = []
    for image, dets, meta in zip(images, detections, metadata):
        kept = keep_detections(dets, meta.get("tag"), rules)
        scores.append(evaluate(kept, meta, rules, lambda label, objs, image=image: backend.classify_colors(
            image, objs, label), partial_mode))
    return scores


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


IMAGE_FORMATS = ("PNG", "JPEG")
"""PNG (lossless, the default) or JPEG (a client that scores what Flow-GRPO's client sends: `jpeg_quality`)."""


def decode_image(text: Any, index: int, max_pixels: int):
    """base64 PNG or JPEG -> uint8 (H, W, 3) RGB array; refuses oversized images before decoding their pixels."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not isinstance(text, str):
        raise RequestError(400, f"images[{index}] must be a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"images[{index}] is not valid base64") from None
    try:
        picture = Image.open(io.BytesIO(raw))
        if picture.format not in IMAGE_FORMATS:
            raise RequestError(400, f"images[{index}] is {picture.format}, expected one of {list(IMAGE_FORMATS)}")
        width, height = picture.size
        if width * height > max_pixels:
            raise RequestError(413, f"images[{index}] has {width}x{height} pixels, over --max-pixels {max_pixels}")
        return np.asarray(picture.convert("RGB"), dtype=np.uint8)
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise RequestError(400, f"images[{index}] is not a readable PNG or JPEG: {error}") from None


def parse_request(body: bytes, max_images: int, max_pixels: int) -> Tuple[List[Any], List[Dict[str, Any]], str]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise RequestError(400, f"body is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, f"body must be a JSON object with 'images' and 'metadata', "
                                f"got {type(payload).__name__}")
    for name in ("images", "metadata"):
        if name not in payload:
            raise RequestError(400, f"missing field {name!r}")
        if not isinstance(payload[name], list):
            raise RequestError(400, f"field {name!r} must be a list, got {type(payload[name]).__name__}")
    images, metadata = payload["images"], payload["metadata"]
    if len(images) != len(metadata):
        raise RequestError(400, f"got {len(images)} images but {len(metadata)} metadata records")
    if len(images) > max_images:
        raise RequestError(413, f"{len(images)} images in one request, over --max-images {max_images}")
    mode = payload.get("partial_mode", "clauses")
    if mode not in PARTIAL_MODES:
        raise RequestError(400, f"partial_mode must be one of {list(PARTIAL_MODES)}, got {mode!r}")
    for i, record in enumerate(metadata):
        try:
            validate_metadata(record, require_prompt=False)
        except MetadataError as error:
            raise RequestError(400, f"metadata[{i}]: {error}") from None
    return [decode_image(text, i, max_pixels) for i, text in enumerate(images)], metadata, mode


def make_server(backend: Backend, host: str = "127.0.0.1", port: int = 18085, rules: Optional[Rules] = None,
                max_body_bytes: int = 100 * 2**20, max_images: int = 256, max_pixels: int = 4096 * 4096,
                request_timeout: float = 120.0, quiet: bool = False, workers: int = 8) -> "PooledHTTPServer":
    """A ready (bound, not yet serving) server; call `serve_forever()` (port 0 picks a free port)."""
    rules = rules or Rules()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # A stalled client only ties up its own thread, and only this long.
        timeout = request_timeout

        def log_message(self, fmt, *args):
            if not quiet:
                super().log_message(fmt, *args)

        def _discard(self, length: int) -> None:
            # A client still sending when the connection closes sees a broken pipe instead of the 413; reading a
            # moderately oversized body into a small buffer lets the answer arrive. Huge bodies are cut off.
            if length > 4 * max_body_bytes:
                return
            try:
                while length > 0:
                    chunk = self.rfile.read(min(length, 1 << 16))
                    if not chunk:
                        return
                    length -= len(chunk)
            except OSError:
                return

        def _reply(self, status: int, payload: Dict[str, Any], close: bool = False) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") in ("", "/health"):
                self._reply(200, {"status": "ok", "backend": backend.name, "max_body_bytes": max_body_bytes,
                                  "max_images": max_images, "rules": dataclasses.asdict(rules)})
            else:
                self._reply(404, {"error": f"unknown path {self.path!r}; use GET /health or POST /score"})

        def do_POST(self):
            try:
                if self.path.rstrip("/") != "/score":
                    raise RequestError(404, f"unknown path {self.path!r}; use POST /score")
                length_header = self.headers.get("Content-Length")
                if length_header is None:
                    raise RequestError(411, "Content-Length is required (chunked bodies are not accepted)")
                try:
                    length = int(length_header)
                except ValueError:
                    raise RequestError(400, f"bad Content-Length {length_header!r}") from None
                if length < 0:
                    raise RequestError(400, f"bad Content-Length {length_header!r}")
                if length > max_body_bytes:
                    self._discard(length)
                    raise RequestError(413, f"body of {length} bytes is over the server's limit of {max_body_bytes} "
                                            f"(--max-body-mb); send fewer images per request")
                body = self.rfile.read(length)
                if len(body) != length:
                    raise RequestError(400, f"body ended after {len(body)} of {length} bytes")
                images, metadata, mode = parse_request(body, max_images, max_pixels)
                with lock:
                    scores = score_images(backend, images, metadata, rules, mode)
                self._reply(200, {"strict": [s.strict for s in scores], "partial": [s.partial for s in scores],
                                  "details": [{"clauses": s.clauses, "detected": s.detected} for s in scores]})
            except RequestError as error:
                # Past an unread body the connection cannot be reused.
                self._reply(error.status, {"error": str(error)}, close=error.status in (411, 413))
            except Exception as error:  # noqa: BLE001 - a failed request must not take the server down
                self.log_error("scoring failed: %s: %s", type(error).__name__, error)
                self._reply(500, {"error": f"{type(error).__name__}: {error}"}, close=True)

    return PooledHTTPServer((host, port), Handler, workers=workers)


class PooledHTTPServer(HTTPServer):
    """An HTTP server answering on a fixed pool of worker threads instead of a thread per connection.

    At most `2 x workers` connections are taken in at once (one being served or queued per slot); further
    clients wait in the listen backlog (`request_queue_size`, not the default 5, which reset connections at
    about 40 concurrent clients) until a slot frees. With the body limit (`--max-body-mb`) this bounds memory."""

    request_queue_size = 128
    daemon_threads = True

    def __init__(self, address, handler, workers: int = 8):
        super().__init__(address, handler)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="geneval")
        self._slots = threading.BoundedSemaphore(2 * workers)

    def process_request(self, request, client_address):
        self._slots.acquire()

        def serve():
            try:
                self.finish_request(request, client_address)
            except Exception:  # noqa: BLE001 - one failed connection must not stop the server
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                self._slots.release()

        try:
            self._pool.submit(serve)
        except RuntimeError:  # the pool is shut down: the server is closing
            self.shutdown_request(request)
            self._slots.release()

    def server_close(self):
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _parse_options(pairs: Sequence[str]) -> Dict[str, str]:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--option {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        options[key] = value
    return options


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffrl_bench.geneval",
                                     description="GenEval reward server (detector + colour classifier over HTTP)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; there is no auth)")
    parser.add_argument("--port", type=int, default=18085)
    parser.add_argument("--backend", default="mask2former",
                        help="mask2former (mmdet, GenEval's own), hf-mask2former (transformers, no mmdet) "
                             "or module:factory")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="backend option, repeatable (mask2former: config, checkpoint, class_names, ...; "
                             "hf-mask2former: detector, clip, ...)")
    parser.add_argument("--max-body-mb", type=float, default=100.0)
    parser.add_argument("--max-images", type=int, default=256)
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096)
    parser.add_argument("--workers", type=int, default=8, help="requests served at once (a fixed thread pool)")
    for f in dataclasses.fields(Rules):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines")
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: anyone who can reach it can use this GPU; there is no auth",
              file=sys.stderr)
    rules = Rules(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Rules)})
    backend = build_backend(args.backend, _parse_options(args.option))
    server = make_server(backend, args.host, args.port, rules, int(args.max_body_mb * 2**20), args.max_images,
                         args.max_pixels, quiet=args.quiet, workers=args.workers)
    host, port = server.server_address[:2]
    print(f"geneval server ({backend.name}) listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
