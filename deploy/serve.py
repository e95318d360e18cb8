"""HTTP server for a deployed model folder: FastAPI + uvicorn in front of ONNX Runtime.

``create_app`` loads the model folder once (:class:`deploy.batcher.ServedModel`: tokenizer, ORT
session on the chosen provider, label names), warms it up, and answers from it; requests from
all clients are batched together by :class:`deploy.batcher.MicroBatcher` (see that module for
the batching policy). A run folder serves ``model_dir(run, default_variant(...))`` unless a variant
is named; a plain folder written by export or optimize is served as it is.

Endpoints:
    GET  /health    {"status": "ok", ...batching counters}
    GET  /metadata  the folder's manifest, optimize/export reports, and the run's verify and bench
                    reports for the variant (when served from a run folder), compacted: per-index
                    lists such as kept rows and kept block columns are left out
    POST /predict   {"texts": ["a sentence", ...]} or {"texts": [["premise", "hypothesis"], ...]}
                    -> {"predictions": [...]}, one answer per text, as the task kind gives it:
                    classification {"label", "score", "scores": {label: p}}; regression
                    (stsb) {"score": value}

Limits and status codes (every error body is {"detail": "<one line that names the fix>"}):
    400  the body is not valid JSON
    413  well-formed but over a limit: body over ``max_body_bytes``, more than ``max_texts``
         texts, a text over ``max_chars`` characters, or over ``max_tokens`` tokens with special
         tokens counted. Too-long input is rejected, not truncated, by default: a prediction on a
         silently cut text is a different prediction. ``truncate=True`` (``--truncate``) cuts it
         to ``max_tokens`` instead (longest-first for pairs).
    422  valid JSON of the wrong shape: not an object, unknown or missing field, empty list,
         an item that is neither a string nor a pair of strings, an empty text, pairs and single
         texts mixed, or single texts sent to a pair task (and the reverse)
    503  the batcher's queue is full (``Retry-After: 1``)
    500  the model run failed

The server binds 127.0.0.1 unless told otherwise: it has no authentication. This module needs the
``serve`` extra (fastapi, uvicorn); the CLI checks for it before importing it.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from deploy.batcher import MicroBatcher, QueueFull, ServedModel, peek_json
from deploy.run_layout import RUN_STATE, bench_report, model_dir, variants
from deploy.run_layout import verify_report as verify_report_path
from deploy.runtime import ONNX_FILE, PROVIDERS
from deploy.triton import resolve_model_folder
from mlpruning import __version__
from mlpruning.core.errors import UserError

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DROPPED_KEYS = ("kept_block_cols", "kept_per_block_row")  # per-block lists: thousands of numbers
MAX_LIST = 64  # any longer list in a report is per-index detail, not metadata
_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "a boolean", dict: "an object"}


@dataclass(frozen=True)
class ServeConfig:
    """What to serve and how; validated on creation (ValueError naming the field and range)."""

    model_dir: Path
    run_dir: Path | None = None  # the run folder model_dir belongs to, for its reports
    variant: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int | None = None  # ORT intra-op threads; None: ORT's default (all cores)
    provider: str = "cpu"
    engine: bool = False  # serve the folder's model.plan (mlpruning build) instead of model.onnx
    max_batch: int = 32
    max_wait_ms: float = 2.0  # every lone request pays it: a short window (see deploy.batcher)
    max_texts: int = 64
    max_chars: int = 10_000
    max_tokens: int | None = None  # None: the model's position limit
    truncate: bool = False
    max_queue: int = 1024
    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        ranges: dict[str, tuple[float, float]] = {
            "port": (0, 65535),
            "max_batch": (1, 4096),
            "max_wait_ms": (0, 1000),
            "max_texts": (1, 65536),
            "max_chars": (1, 10_000_000),
            "max_queue": (1, 1_000_000),
            "max_body_bytes": (64, 1 << 30),
        }
        if self.threads is not None:
            ranges["threads"] = (1, 1024)
        if self.max_tokens is not None:
            ranges["max_tokens"] = (2, 1 << 20)
        for name, (lo, hi) in ranges.items():
            value = getattr(self, name)
            if not lo <= value <= hi:  # NaN fails this too
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        if self.max_queue < self.max_texts:
            raise ValueError(f"max_queue ({self.max_queue}) must be >= max_texts ({self.max_texts})")


def resolve_target(path: Path, variant: str | None = None) -> tuple[Path, Path | None, str | None]:
    """(model folder, run folder or None, variant or None) for a run folder or a model folder."""
    if variant is not None and (path / ONNX_FILE).is_file():
        raise UserError(f"--variant needs a run folder; {path} is a model folder: drop --variant")
    folder, chosen = resolve_model_folder(path, variant)
    if chosen is None:
        return folder, *_run_of(folder)
    return folder, path, chosen


def _run_of(folder: Path) -> tuple[Path | None, str | None]:
    """The run and variant a model folder belongs to, when it sits where a run puts it."""
    run = folder.resolve().parent.parent
    if (run / RUN_STATE).is_file():
        for variant in variants(run):
            if model_dir(run, variant).resolve() == folder.resolve():
                return run, variant.name
    return None, None


class RequestError(Exception):
    """A request the server refuses: HTTP status and the one-line ``detail`` for the client."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def compact(value: Any) -> Any:
    """``value`` without per-index lists (kept row indices, kept block columns, long arrays) or NaN."""
    if isinstance(value, dict):
        return {
            k: compact(v)
            for k, v in value.items()
            if k not in DROPPED_KEYS
            and not k.endswith("_indices")
            and not (isinstance(v, list) and len(v) > MAX_LIST)
        }
    if isinstance(value, list):
        return [compact(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN: a NaN metric would make /metadata fail
    return value


def build_metadata(cfg: ServeConfig, model: ServedModel) -> dict[str, Any]:
    import onnxruntime as ort

    folder, run, variant = cfg.model_dir, cfg.run_dir, cfg.variant
    limits = {k: v for k, v in asdict(cfg).items() if k.startswith("max_") or k == "truncate"}
    limits["max_tokens"] = model.max_tokens
    reports = {
        "manifest": peek_json(folder / "pruning.json"),
        "optimize": peek_json(folder / "optimize.json"),
        "export": peek_json(folder / "export.json"),
        "verify": peek_json(verify_report_path(run, variant)) if run and variant else None,
        "bench": peek_json(bench_report(run, variant)) if run and variant else None,
    }
    return {
        "model_dir": str(folder),
        "run": None if run is None else str(run),
        "variant": variant,
        "task": None if model.task is None else model.task.name,
        "kind": model.kind.name,
        "labels": model.kind.serve_labels(model.labels),
        "regression": model.kind.name == "regression",
        "inputs": list(model.inputs),
        "runtime": {
            "provider": cfg.provider,
            "providers": model.session.get_providers(),
            "threads": cfg.threads,
            "onnxruntime": ort.__version__,
        },
        "limits": limits,
        **{name: compact(report) for name, report in reports.items()},
    }


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    return _JSON_TYPES.get(type(value), "null")


def _item(index: int, value: Any, max_chars: int) -> str | tuple[str, str]:
    if isinstance(value, str):
        parts: tuple[str, ...] = (value,)
    elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        parts = (value[0], value[1])
    else:
        raise RequestError(
            422,
            f"texts[{index}] must be a string or a [text, text_pair] pair of strings, "
            f"got {_json_type(value)}",
        )
    for part in parts:
        if not part.strip():
            raise RequestError(422, f"texts[{index}] is empty: send text to classify")
        if len(part) > max_chars:
            raise RequestError(
                413, f"texts[{index}] has {len(part)} characters, the limit is {max_chars}: shorten it"
            )
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def parse_texts(body: bytes, cfg: ServeConfig, pairs: bool | None) -> list[str | tuple[str, str]]:
    """The texts of a /predict body, or a RequestError (status, one-line detail) saying what is wrong.

    ``pairs``: whether the model's task takes text pairs; None when the task is unknown.
    """
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f'malformed JSON ({exc}): send {{"texts": ["a sentence", ...]}}') from None
    if not isinstance(payload, dict):
        raise RequestError(
            422,
            f'the body must be a JSON object such as {{"texts": ["a sentence"]}}, got {_json_type(payload)}',
        )
    unknown = sorted(set(payload) - {"texts"})
    if unknown:
        raise RequestError(422, f"unknown field {', '.join(map(repr, unknown))}: the body takes only 'texts'")
    if "texts" not in payload:
        raise RequestError(422, 'missing field \'texts\': send {"texts": ["a sentence", ...]}')
    texts = payload["texts"]
    if not isinstance(texts, list):
        raise RequestError(
            422, f"'texts' must be a list of strings or of [text, text_pair] pairs, got {_json_type(texts)}"
        )
    if not texts:
        raise RequestError(422, "'texts' is empty: send at least one text")
    if len(texts) > cfg.max_texts:
        raise RequestError(
            413,
            f"{len(texts)} texts, the limit per request is {cfg.max_texts}: send them in smaller requests",
        )
    items = [_item(i, value, cfg.max_chars) for i, value in enumerate(texts)]
    kinds = {isinstance(item, tuple) for item in items}
    if len(kinds) > 1:
        raise RequestError(
            422, "'texts' mixes single texts and [text, text_pair] pairs: send one kind per request"
        )
    if pairs is not None and kinds != {pairs}:
        want = (
            'text pairs: send {"texts": [["text", "text_pair"], ...]}'
            if pairs
            else 'single texts: send {"texts": ["text", ...]}'
        )
        raise RequestError(422, f"this model's task takes {want}")
    return items


def check_lengths(encodings: list[Any], max_tokens: int) -> None:
    for i, enc in enumerate(encodings):
        if len(enc.ids) > max_tokens:
            raise RequestError(
                413,
                f"texts[{i}] is {len(enc.ids)} tokens long, the limit is {max_tokens}: shorten it "
                "(or start the server with --truncate to cut long texts)",
            )


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(
            413, f"body of {declared} bytes, the limit is {limit}: send fewer or shorter texts"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body over {limit} bytes: send fewer or shorter texts")
        chunks.append(chunk)
    return b"".join(chunks)


_PAIR = {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2}
_TEXTS = {"type": "array", "items": {"oneOf": [{"type": "string"}, _PAIR]}}
_BODY = {"type": "object", "required": ["texts"], "properties": {"texts": _TEXTS}}
_PREDICT_DOC = {"requestBody": {"required": True, "content": {"application/json": {"schema": _BODY}}}}


def create_app(cfg: ServeConfig) -> FastAPI:
    """The FastAPI app for ``cfg``: loads and warms the model now, starts the batcher at startup."""
    model = ServedModel(cfg.model_dir, cfg.threads, cfg.provider, cfg.max_tokens, cfg.truncate, cfg.engine)
    if model.max_batch is not None and cfg.max_batch > model.max_batch:
        raise UserError(
            f"--max-batch {cfg.max_batch} is over the engine's profile ({model.max_batch}): use "
            f"--max-batch {model.max_batch} or rebuild with a larger --batch"
        )
    model.warm_up(cfg.max_batch)
    batcher = MicroBatcher(model.run_batch, cfg.max_batch, cfg.max_wait_ms, cfg.max_queue)
    metadata = build_metadata(cfg, model)
    started = time.monotonic()

    @asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="mlpruning serve", version=__version__, lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def refused(_request: Request, exc: RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        uptime = round(time.monotonic() - started, 1)
        return {"status": "ok", "uptime_s": uptime, "queued": batcher.queued, **batcher.stats.as_dict()}

    @app.get("/metadata")
    async def get_metadata() -> dict[str, Any]:
        return metadata

    @app.post("/predict", openapi_extra=_PREDICT_DOC)
    async def predict(request: Request) -> dict[str, Any]:
        items = parse_texts(await _read_body(request, cfg.max_body_bytes), cfg, model.pairs)
        chars = sum(len(item) if isinstance(item, str) else len(item[0]) + len(item[1]) for item in items)
        # long inputs tokenize in a worker thread so they do not stall every other client
        encodings = model.encode(items) if chars < 4096 else await run_in_threadpool(model.encode, items)
        check_lengths(encodings, model.max_tokens)
        try:
            outputs = await batcher.submit(encodings)
        except QueueFull as exc:
            raise RequestError(503, f"server busy ({exc}): retry shortly") from None
        except Exception as exc:  # logged by the batcher; the client gets one line, not a traceback
            raise RequestError(500, f"model run failed: {' '.join(str(exc).split())}") from None
        return {"predictions": [model.prediction(row) for row in outputs]}

    return app


def run_server(cfg: ServeConfig, log_level: str = "info") -> None:
    """Serve ``cfg`` in the foreground until interrupted (Ctrl-C)."""
    import uvicorn

    app = create_app(cfg)
    uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level)).run()


class BackgroundServer:
    """uvicorn serving ``app`` from a daemon thread of this process (tests, notebooks).

    The socket is bound before the thread starts, so ``port=0`` gets a free port that is known
    (``self.port``) before the first request.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
