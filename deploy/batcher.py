"""Inference side of the server: the model it holds, and the micro-batcher that feeds it.

:class:`ServedModel` loads a model folder once (``model.onnx``, ``config.json``, tokenizer files):
the tokenizer straight from ``tokenizer.json`` with the ``tokenizers`` library, so the serving
process never imports torch (a folder with only slow-tokenizer files goes through transformers
once to convert it), and the ORT session (or TensorRT engine) through :func:`deploy.runners.open_model`. It
tokenizes without padding; :meth:`ServedModel.run_batch` right-pads a batch to its longest
sequence. Padding does not change a sequence's logits beyond float rounding: padded positions
are masked out of attention.

:class:`MicroBatcher`: each request puts its items (one tokenized text or text pair each) on one
asyncio queue, every item with its own future, and awaits them all. A single worker task takes
the first waiting item, then keeps taking until it holds ``max_batch`` items or ``max_wait_ms``
has passed since the first, and hands the batch to ``run_batch`` in a one-thread executor, so the
event loop goes on accepting requests meanwhile. Items that arrive while a batch runs wait in the
queue, so under load batches fill without any waiting, and a lone request under light load waits
at most ``max_wait_ms`` (``0`` batches only what is already queued). On CPU the window is
short by default (2 ms): a batch of 8 short sentences costs about what 8 single runs cost, so
most of the gain comes from items that queue during a run, and a long window only adds latency
(MiniLM, 1 thread, 1 client: p50 8 ms with no window, 13 ms with 5 ms). Model runs never overlap:
the session already uses the configured threads, and two runs at once would only fight over them.

A request with more items than ``max_batch`` is spread over several batches; a batch mixes items
of several requests. Items whose request has gone (client disconnected, future cancelled) are
dropped before the run. An exception in ``run_batch`` fails the futures of that batch only.
The queue is bounded by ``max_queue`` items so an overloaded server refuses work (the caller
answers 503) instead of queueing unbounded latency. Nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from deploy.engine_report import ENGINE_REPORT, profile_ranges
from deploy.runners import open_model, outputs_to_fetch, runtime_name
from deploy.trt_engine import ENGINE_PROVIDER
from mlpruning.core.contract import VOCAB_FILES
from mlpruning.core.errors import UserError
from mlpruning.core.hf_config import position_limit
from mlpruning.core.jsonfile import recorded_task
from pipeline.kinds import kind_for_head
from pipeline.kinds.sequence import LOGITS
from pipeline.task_kind import TaskKind
from pipeline.tasks import TaskSpec, get_task

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass
class BatchStats:
    """Counters for /health: how well requests are being batched."""

    batches: int = 0
    items: int = 0
    largest_batch: int = 0

    def add(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.largest_batch = max(self.largest_batch, size)

    def as_dict(self) -> dict[str, Any]:
        mean = self.items / self.batches if self.batches else 0.0
        return {
            "batches": self.batches,
            "items": self.items,
            "mean_batch": round(mean, 2),
            "largest_batch": self.largest_batch,
        }


class QueueFull(Exception):
    """The batcher holds ``max_queue`` items already: the caller should retry later."""


class MicroBatcher(Generic[ItemT, ResultT]):
    """Collects items from concurrent requests into batches for ``run_batch`` (see module doc)."""

    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], Sequence[ResultT]],
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._queue: asyncio.Queue[tuple[ItemT, asyncio.Future[ResultT]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        """Start the worker; call from the running event loop (the app's lifespan)."""
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="micro-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._worker = self._executor = self._queue = None

    async def submit(self, items: Sequence[ItemT]) -> list[ResultT]:
        """Results of ``items`` in order, once the batches holding them have run."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.submit before start()")
        if self._queue.qsize() + len(items) > self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} items queued (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[ResultT]] = [loop.create_future() for _ in items]
        for item, future in zip(items, futures, strict=True):
            self._queue.put_nowait((item, future))
        return list(await asyncio.gather(*futures))

    async def _collect(self) -> list[tuple[ItemT, asyncio.Future[ResultT]]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [(item, fut) for item, fut in await self._collect() if not fut.done()]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [i for i, _ in batch])
            except Exception as exc:  # one bad batch must not stop the server
                log.exception("model run failed for a batch of %d", len(batch))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.stats.add(len(batch))
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)


def peek_json(path: Path) -> dict[str, Any] | None:
    """A serving-side JSON file, None when absent or unreadable: metadata never stops the server
    (a corrupt file is logged; engine.json, which limits what it serves, is read strictly)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        log.warning("%s is not valid JSON (%s): left out of /metadata", path, exc)
        return None


class ServedModel:
    """Tokenizer, ORT session and label names of one model folder; ``run_batch`` pads and runs."""

    def __init__(
        self,
        folder: Path,
        threads: int | None = None,
        provider: str = "cpu",
        max_tokens: int | None = None,
        truncate: bool = False,
        engine: bool = False,
    ) -> None:
        self.session = open_model(folder, threads, provider, engine)  # one-line error if no model
        self.config = peek_json(folder / "config.json")
        if self.config is None:
            raise UserError(f"{folder} has no readable config.json: pass a folder written by export")
        self.task = _task_of(folder)
        self.tokenizer, self.pad_id = _load_tokenizer(folder, self.config)
        is_engine = runtime_name(self.session) == ENGINE_PROVIDER  # asked for, or the only model
        profile = engine_profile(folder) if is_engine else None
        self.max_batch = profile[0] if profile else None  # None: any batch the server asks for
        self.max_tokens = _token_limit(folder, self.config, max_tokens, profile[1] if profile else None)
        if truncate:
            self.tokenizer.enable_truncation(self.max_tokens)
        # a TensorRT engine's tensors carry names only: int64 ids, width from the labels
        inputs = self.session.get_inputs()
        self.inputs = {i.name: np.int32 if "int32" in getattr(i, "type", "") else np.int64 for i in inputs}
        self.kind = self.task.kind if self.task is not None else _head_kind(self.session, self.config)
        self.names, self.outputs = self._output_names()
        self.labels = _label_names(self.config, self.task)
        self.pairs = None if self.task is None else self.task.pairs

    def _output_names(self) -> tuple[list[str], list[str]]:
        """(the kind's output names, the model's outputs to fetch for them); with no task known,
        a sequence head's one output."""
        wanted = self.kind.output_names(self.task) if self.task is not None else [LOGITS]
        return wanted, outputs_to_fetch(self.session, wanted)

    def encode(self, items: list[str | tuple[str, str]]) -> list[Any]:
        """One unpadded ``tokenizers.Encoding`` per item, special tokens added."""
        return self.tokenizer.encode_batch(items)

    def feeds(self, batch: list[Any]) -> dict[str, np.ndarray]:
        """The model's inputs for ``batch``, right-padded to its longest sequence."""
        width = max(len(enc.ids) for enc in batch)
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        types = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for row, enc in enumerate(batch):
            n = len(enc.ids)
            ids[row, :n], types[row, :n], mask[row, :n] = enc.ids, enc.type_ids, 1
        arrays = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
        return {name: arrays[name].astype(dtype, copy=False) for name, dtype in self.inputs.items()}

    def run_batch(self, batch: list[Any]) -> list[dict[str, np.ndarray]]:
        """Each item's outputs (by the kind's output names), batch axis removed."""
        results = self.session.run(self.outputs, self.feeds(batch))
        return [dict(zip(self.names, (r[i] for r in results), strict=True)) for i in range(len(batch))]

    def prediction(self, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        return self.kind.answer(outputs, self.labels)

    def warm_up(self, max_batch: int) -> None:
        """First runs allocate ORT's buffers; pay for them before the first client does."""
        sample = self.encode(["warm up"] if not self.pairs else [("warm up", "the server")])
        for size in sorted({1, max_batch}):
            self.run_batch(sample * size)


def _head_kind(session: Any, config: dict[str, Any]) -> TaskKind:
    """A model whose task is unknown: a sequence head, read from its config and output width."""
    last = getattr(session.get_outputs()[0], "shape", [None])[-1]
    return kind_for_head(config.get("problem_type"), last if isinstance(last, int) else None)


def _task_of(folder: Path) -> TaskSpec | None:
    """The recorded task, None when none is recorded or it is not registered in this process (a
    sequence head is then served from its config)."""
    task = recorded_task(folder)
    try:
        return None if task is None else get_task(task)
    except UserError:
        return None


# the files one of which holds the vocabulary; the rest (tokenizer_config.json, ...) only tune it


def require_vocab(folder: Path) -> None:
    """A UserError unless ``folder`` holds a vocabulary file: without one transformers would still
    build a tokenizer, with an empty vocabulary, and every word would be served as [UNK]."""
    if not any((folder / name).is_file() for name in VOCAB_FILES):
        raise UserError(f"{folder} has no tokenizer files ({', '.join(VOCAB_FILES)}): re-run export")


def _load_tokenizer(folder: Path, config: dict[str, Any]) -> tuple[Any, int]:
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    require_vocab(folder)
    if path.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
            raise UserError(f"{path} is not a readable tokenizer ({exc}): re-run export") from None
    else:
        from transformers import AutoTokenizer  # converts vocab.txt and friends (imports torch)

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder)).backend_tokenizer
        except (OSError, ValueError, AttributeError) as exc:
            raise UserError(f"{folder} has no usable tokenizer ({exc}): re-run export") from None
    pad_id = (tokenizer.padding or {}).get("pad_id", config.get("pad_token_id") or 0)
    tokenizer.no_padding()  # the batcher pads each batch to its own longest sequence
    tokenizer.no_truncation()
    return tokenizer, int(pad_id)


def engine_profile(folder: Path) -> tuple[int, int] | None:
    """(largest batch, longest sequence) the engine's optimization profile takes, from the
    engine.json ``mlpruning build`` wrote beside it; None without one. Micro-batches come in
    every size from one short text up, so the profile must start at batch 1 and sequence 1."""
    ranges = profile_ranges(folder)
    if ranges is None:
        return None
    (b_min, _, b_max), (s_min, _, s_max) = ranges["batch"], ranges["seq"]
    if b_min > 1 or s_min > 1:
        raise UserError(
            f"{folder / ENGINE_REPORT}: the engine takes batches from {b_min} and sequences from {s_min}, "
            "but serving sends any size: rebuild with --batch 1,OPT,MAX --seq 1,OPT,MAX"
        )
    return int(b_max), int(s_max)


def _token_limit(folder: Path, config: dict[str, Any], asked: int | None, engine_seq: int | None) -> int:
    positions = position_limit(config)
    tokenizer_max = (peek_json(folder / "tokenizer_config.json") or {}).get("model_max_length")
    limit = min(positions, tokenizer_max) if isinstance(tokenizer_max, int) else positions
    limit = min(limit, engine_seq) if engine_seq else limit
    if asked is not None and asked > limit:
        raise UserError(f"--max-tokens {asked} is over what {folder} takes ({limit}): use {limit} or less")
    return asked or limit


def _label_names(config: dict[str, Any], task: Any) -> list[str]:
    id2label = config.get("id2label") or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=int)] or ["LABEL_0"]
    generic = all(name == f"LABEL_{i}" for i, name in enumerate(names))
    if generic and task is not None and len(task.label_names) == len(names):
        return list(task.label_names)  # fine-tuned without names: the task knows them
    return names
