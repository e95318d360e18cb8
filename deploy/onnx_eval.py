"""A task split through an ONNX model folder, without PyTorch: its outputs and its metric.

The folder is opened as serve opens it (:class:`deploy.batcher.ServedModel`: the tokenizer from
``tokenizer.json``, ONNX Runtime, the task kind's output names), with texts cut to
``max_tokens`` as training cut them (128 by default). Examples run in file order, 64 to a
right-padded batch, as verify runs them: with dynamic INT8 a batch shares one activation scale,
padding included, so an example's output depends on its batch, and a score taken here is the
one verify will see. Two models' outputs line up example by example and the task kind can say
how many of them agree. Used by ``quantize`` to score each candidate against the fp32 model it
came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploy.batcher import ServedModel
from mlpruning.core.errors import UserError
from mlpruning.core.tolerance import EVAL_BATCH
from pipeline.task_kind import Outputs, stack_outputs
from pipeline.tasks import Examples, TaskSpec


@dataclass(frozen=True)
class SplitRun:
    """The outputs of every example (file order) and the task's metrics over them."""

    outputs: Outputs
    metrics: dict[str, float]


def open_for_eval(folder: Path, threads: int, max_tokens: int = 128) -> ServedModel:
    model = ServedModel(folder, threads, max_tokens=max_tokens, truncate=True)
    if model.task is None:
        raise UserError(f"{folder} does not say its task (pruning.json or export.json): re-run export")
    return model


def encode(model: ServedModel, examples: Examples) -> list[Any]:
    items = [t[0] if len(t) == 1 else (t[0], t[1]) for t in examples.texts]
    return model.encode(items)


def run_split(model: ServedModel, task: TaskSpec, encodings: list[Any], labels: np.ndarray) -> SplitRun:
    order = np.arange(len(encodings))
    chunks = []
    for start in range(0, len(order), EVAL_BATCH):
        idx = order[start : start + EVAL_BATCH]
        rows = model.run_batch([encodings[i] for i in idx])
        chunks.append((idx, {name: np.stack([r[name] for r in rows]) for name in rows[0]}))
    outputs = stack_outputs(chunks, len(encodings))
    return SplitRun(outputs, task.kind.metrics(task, outputs, labels))
