"""Dev-set evaluation of a model, whatever its task kind.

Batches are sorted by length so padding is minimal; outputs are put back in file order before
scoring, so predictions line up with the data file (and with other runtimes' predictions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mlpruning import __version__
from mlpruning.core.errors import UserError
from mlpruning.core.jsonfile import read_json
from pipeline.batching import Encoded, collate, encode, sorted_batches
from pipeline.metrics import compute_metrics
from pipeline.task_kind import Outputs, stack_outputs
from pipeline.tasks import TaskSpec, get_task, load_split

if TYPE_CHECKING:
    from transformers import PreTrainedModel

METADATA_FILE = "mlpruning.json"


@dataclass(frozen=True)
class EvalResult:
    task: str
    split: str
    metrics: dict[str, float]
    num_examples: int
    seconds: float
    outputs: Outputs  # by output name (the task kind's), in example order

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "split": self.split,
            "metrics": self.metrics,
            "num_examples": self.num_examples,
            "seconds": round(self.seconds, 2),
            "tool_version": __version__,
        }


def predict(model: PreTrainedModel, task: TaskSpec, encoded: Encoded, batch_size: int = 64) -> Outputs:
    """The model's outputs (named by the task's kind) in example order."""
    import torch

    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    chunks: list[tuple[np.ndarray, Outputs]] = []
    with torch.inference_mode():
        for idx in sorted_batches(encoded.lengths, batch_size):
            out = task.kind.tensors(model(**collate(encoded, idx, device)), task)
            chunks.append((idx, {k: v.float().cpu().numpy() for k, v in out.items()}))
    model.train(was_training)
    return stack_outputs(chunks, len(encoded))


def evaluate_encoded(model: PreTrainedModel, task: TaskSpec, encoded: Encoded, split: str) -> EvalResult:
    start = time.perf_counter()
    outputs = predict(model, task, encoded)
    metrics = compute_metrics(task, outputs, encoded.labels)
    return EvalResult(task.name, split, metrics, len(encoded), time.perf_counter() - start, outputs)


def read_metadata(model_dir: Path) -> dict:
    return read_json(model_dir / METADATA_FILE, "re-run finetune or delete it") or {}


def task_for_checkpoint(model_dir: Path, task_name: str | None) -> TaskSpec:
    """The task to evaluate: the one asked for, checked against the checkpoint's own."""
    if not model_dir.is_dir():
        raise UserError(f"checkpoint folder {model_dir} does not exist: check the path")
    trained_on = read_metadata(model_dir).get("task")
    if task_name is None:
        if trained_on is None:
            raise UserError(f"{model_dir} does not say which task it was trained on: pass --task")
        return get_task(trained_on)
    task = get_task(task_name)
    if trained_on is not None and trained_on != task.name:
        raise UserError(
            f"{model_dir} was fine-tuned on {trained_on}, not {task.name}: pass --task {trained_on}"
        )
    return task


def evaluate_checkpoint(
    model_dir: Path, task_name: str | None, data_dir: Path | None, max_length: int = 128
) -> EvalResult:
    from pipeline.models import load_for_task, load_tokenizer

    task = task_for_checkpoint(model_dir, task_name)
    model = load_for_task(str(model_dir), task)
    tokenizer = load_tokenizer(str(model_dir))
    max_length = int(read_metadata(model_dir).get("config", {}).get("max_length", max_length))
    encoded = encode(tokenizer, load_split(task, "dev", data_dir), max_length)
    return evaluate_encoded(model, task, encoded, "dev")
