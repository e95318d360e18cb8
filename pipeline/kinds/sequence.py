"""The GLUE kinds: one vector of outputs per example, from a sequence-classification head.

Both kinds build ``AutoModelForSequenceClassification`` (a linear layer on the pooled first
token) and have one output, ``logits`` [batch, C]:

- ``classification`` (SST-2, MRPC, RTE, MNLI; single texts or pairs): C = number of classes.
  Task loss: cross-entropy. Distillation: T^2 * KL(softmax(t / T) || softmax(s / T)), batch mean.
  Metrics: accuracy, and binary F1 of class 1 when the task lists ``f1``. Verify: an example
  agrees when the argmax class is the same. Serve: the class, its softmax probability, and
  every class's probability.
- ``regression`` (STS-B): C = 1, a score. Task loss: mean squared error, and the same between
  student and teacher scores for distillation. Metrics: Pearson and Spearman correlation.
  Verify: an example agrees when its score is within the element tolerances. Serve: the score.

The losses are the ones transformers computes from ``labels`` for these problem types
(``CrossEntropyLoss`` on ``logits.view(-1, C)``; ``MSELoss`` on squeezed scores), so training
through the kind gives the same numbers as passing labels to the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mlpruning.core.errors import UserError
from mlpruning.core.tolerance import INT8_SCORE_SHARE
from pipeline.metrics import accuracy, f1_binary, pearson, spearman
from pipeline.task_kind import BATCH, Output, Outputs, TaskInfo, TaskKind

if TYPE_CHECKING:
    import torch

LOGITS = "logits"


class _SequenceHead(TaskKind):
    auto_class: ClassVar[str] = "AutoModelForSequenceClassification"
    problem_type: ClassVar[str]

    def num_labels(self, task: TaskInfo) -> int:
        return len(task.labels)

    def configure_head(self, config: Any, task: TaskInfo, source: str) -> None:
        n = self.num_labels(task)
        has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        if has_head and config.num_labels != n:
            raise UserError(
                f"{source} is a classifier with {config.num_labels} labels but task {task.name} has "
                f"{n}: pass the matching --task or a plain encoder"
            )
        config.num_labels = n
        config.id2label = dict(enumerate(task.label_names))
        config.label2id = {v: k for k, v in config.id2label.items()}
        config.problem_type = self.problem_type

    def outputs(self, task: TaskInfo) -> tuple[Output, ...]:
        return (Output(LOGITS, (BATCH, self.num_labels(task))),)


class Classification(_SequenceHead):
    name: ClassVar[str] = "classification"
    problem_type: ClassVar[str] = "single_label_classification"
    agreement_rule: ClassVar[str] = "same class"

    def parse_label(self, task: TaskInfo, raw: str) -> float:
        if raw not in task.labels:
            raise ValueError(f"label '{raw}' is not one of {', '.join(task.labels)}")
        return float(task.labels.index(raw))

    def label_tensor(self, values: np.ndarray) -> torch.Tensor:
        import torch

        return torch.as_tensor(values, dtype=torch.long)

    def task_loss(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        logits = outputs[LOGITS]
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))

    def distill_loss(
        self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], temperature: float
    ) -> torch.Tensor:
        import torch.nn.functional as F

        s, t, T = student[LOGITS], teacher[LOGITS], temperature
        return F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T

    def metrics(self, task: TaskInfo, outputs: Outputs, labels: np.ndarray) -> dict[str, float]:
        preds = np.asarray(outputs[LOGITS]).argmax(axis=-1)
        labels = np.asarray(labels).astype(np.int64)
        result = {"accuracy": accuracy(preds, labels)}
        if "f1" in task.metrics:
            result["f1"] = f1_binary(preds, labels)
        return result

    def agreeing(self, want: Outputs, got: Outputs, atol: float, rtol: float) -> np.ndarray:
        return np.asarray(want[LOGITS]).argmax(-1) == np.asarray(got[LOGITS]).argmax(-1)

    def answer(self, row: Outputs, labels: list[str]) -> dict[str, Any]:
        values = np.asarray(row[LOGITS], dtype=np.float64)
        probs = np.exp(values - values.max())
        probs /= probs.sum()
        best = int(probs.argmax())
        return {
            "label": labels[best],
            "score": float(probs[best]),
            "scores": dict(zip(labels, map(float, probs), strict=True)),
        }


class Regression(_SequenceHead):
    name: ClassVar[str] = "regression"
    problem_type: ClassVar[str] = "regression"
    agreement_rule: ClassVar[str] = "score within tolerance"

    def agreement_tolerance(
        self, labels: np.ndarray, atol: float, rtol: float, int8: bool
    ) -> tuple[float, float]:
        """INT8 scores differ from fp32 ones by far more than fp32's 1e-4: they agree within a
        share of the labels' range (STS-B, 0-5: 0.1), which no reader of the score tells apart."""
        if not int8:
            return atol, rtol
        span = float(np.ptp(labels)) if len(labels) else 1.0
        return INT8_SCORE_SHARE * (span or 1.0), 0.0

    def num_labels(self, task: TaskInfo) -> int:
        return 1

    def parse_label(self, task: TaskInfo, raw: str) -> float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"score '{raw}' is not a number") from None

    def label_tensor(self, values: np.ndarray) -> torch.Tensor:
        import torch

        return torch.as_tensor(values, dtype=torch.float32)

    def task_loss(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.mse_loss(outputs[LOGITS].squeeze(), labels.squeeze())

    def distill_loss(
        self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], temperature: float
    ) -> torch.Tensor:
        import torch.nn.functional as F

        return F.mse_loss(student[LOGITS], teacher[LOGITS])

    def metrics(self, task: TaskInfo, outputs: Outputs, labels: np.ndarray) -> dict[str, float]:
        scores = np.asarray(outputs[LOGITS], dtype=np.float64).reshape(-1)
        labels = np.asarray(labels)
        return {"pearson": pearson(scores, labels), "spearman": spearman(scores, labels)}

    def answer(self, row: Outputs, labels: list[str]) -> dict[str, Any]:
        return {"score": float(np.asarray(row[LOGITS], dtype=np.float64).reshape(-1)[0])}

    def serve_labels(self, labels: list[str]) -> list[str] | None:
        return None
