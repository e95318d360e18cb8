"""The task-kind interface: everything that depends on what a model is trained to output.

A *task* (SST-2, STS-B, ...) is data: files, text columns, label names, metric names
(:mod:`pipeline.tasks`). Its *kind* says what the model does with it, in one object:

- the head: which ``transformers`` auto class builds it and how its config is set for the task;
- the labels: how a raw label string is read, and the tensor it becomes in a batch;
- the outputs: their names and axes (``batch`` first), the same in PyTorch, in the exported ONNX
  graph, in verify and in serve;
- the task loss, and the distillation loss between student and teacher outputs (the pruner adds
  the kind-independent hidden-state and attention terms, :mod:`pipeline.pruning.distill`);
- the metrics over a whole split;
- verify's notion of one example *agreeing* between PyTorch and another runtime;
- what serve answers for one example.

The built-in kinds live in :mod:`pipeline.kinds` (sequence classification and regression); a
new kind is one module with a :class:`TaskKind` subclass plus ``pipeline.kinds.register_kind``.
This module and every kind's metadata, metric, agreement and answer methods are torch-free
(serve and verify's runtime side use them); the training methods import torch when called.

Kinds do not import :mod:`pipeline.tasks` (tasks import kinds), so a task is passed in as any
object with the :class:`TaskInfo` fields.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from mlpruning.core.tolerance import beyond_tolerance

if TYPE_CHECKING:
    import torch

BATCH = "batch"


class TaskInfo(Protocol):
    """What a kind reads of a task (:class:`pipeline.tasks.TaskSpec` has all of it)."""

    name: str
    labels: tuple[str, ...]
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str

    @property
    def kind(self) -> TaskKind: ...


@dataclass(frozen=True)
class Output:
    """One model output: its name everywhere, and its axes (``batch`` first; ints are fixed sizes)."""

    name: str
    axes: tuple[str | int, ...]

    def __post_init__(self) -> None:
        if not self.axes or self.axes[0] != BATCH:
            raise ValueError(f"output {self.name}: the first axis must be '{BATCH}', got {self.axes}")


Outputs = dict[str, np.ndarray]


def stack_outputs(chunks: list[tuple[np.ndarray, Outputs]], n: int) -> Outputs:
    """Outputs of batches (example indices, outputs) as one array per output in example order.

    Batches are padded to their own longest example, so a per-token output is padded with
    zeros to the longest over all batches; per-example outputs have the same shape everywhere.
    """
    stacked: Outputs = {}
    for name in chunks[0][1]:
        parts = [(idx, out[name]) for idx, out in chunks]
        trailing = np.max([a.shape[1:] for _, a in parts], axis=0) if parts[0][1].ndim > 1 else ()
        full = np.zeros((n, *map(int, trailing)), dtype=parts[0][1].dtype)
        for idx, a in parts:
            full[(idx, *(slice(0, d) for d in a.shape[1:]))] = a
        stacked[name] = full
    return stacked


class TaskKind(ABC):
    """One way a model maps an example to outputs (see the module docstring)."""

    name: ClassVar[str]
    auto_class: ClassVar[str]  # a transformers auto class, e.g. AutoModelForSequenceClassification

    # -- data and head ------------------------------------------------------------------------
    @abstractmethod
    def parse_label(self, task: TaskInfo, raw: str) -> float:
        """A raw label string as the number stored for it; ValueError names what is wrong."""

    @abstractmethod
    def configure_head(self, config: Any, task: TaskInfo, source: str) -> None:
        """Set ``config`` (a transformers config) for ``task``; UserError if ``source``'s head
        cannot serve it (a classifier trained for another label count)."""

    @abstractmethod
    def outputs(self, task: TaskInfo) -> tuple[Output, ...]:
        """The outputs, in the order the exported graph lists them."""

    def output_names(self, task: TaskInfo) -> list[str]:
        return [o.name for o in self.outputs(task)]

    # -- training (torch) ---------------------------------------------------------------------
    def tensors(self, model_output: Any, task: TaskInfo) -> dict[str, torch.Tensor]:
        """The named outputs of one forward pass of the transformers model."""
        return {name: model_output[name] for name in self.output_names(task)}

    @abstractmethod
    def label_tensor(self, values: np.ndarray) -> torch.Tensor:
        """A batch's labels as the tensor :meth:`task_loss` takes."""

    @abstractmethod
    def task_loss(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The supervised loss of one batch (a scalar)."""

    @abstractmethod
    def distill_loss(
        self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], temperature: float
    ) -> torch.Tensor:
        """The output-matching term of distillation (teacher outputs already detached)."""

    # -- evaluation, verify, serve (numpy) -------------------------------------------------
    @abstractmethod
    def metrics(self, task: TaskInfo, outputs: Outputs, labels: np.ndarray) -> dict[str, float]:
        """The task's metrics over a whole split."""

    def agreeing(self, want: Outputs, got: Outputs, atol: float, rtol: float) -> np.ndarray:
        """Per example, whether ``got`` (another runtime) gives the answer ``want`` (PyTorch) gives.

        The default: every output value within verify's element tolerances (polygraphy's rule).
        A kind whose answer is discrete (a class, a span) overrides it to compare answers.
        """
        ok = np.ones(len(next(iter(want.values()))), dtype=bool)
        for name, w in want.items():
            w2, g2 = w.reshape(len(w), -1), got[name].reshape(len(w), -1)
            ok &= ~beyond_tolerance(g2, w2, atol, rtol)[1].any(axis=1)
        return ok

    agreement_rule: ClassVar[str] = "outputs within tolerance"

    def agreement_tolerance(
        self, labels: np.ndarray, atol: float, rtol: float, int8: bool
    ) -> tuple[float, float]:
        """The (atol, rtol) ``agreeing`` gets: verify's element tolerances, or, for an INT8 model,
        the kind's own notion of the same answer (a kind with graded outputs overrides it)."""
        return atol, rtol

    @abstractmethod
    def answer(self, row: Outputs, labels: list[str]) -> dict[str, Any]:
        """What serve answers for one example (``row``: its outputs, batch axis removed)."""

    def serve_labels(self, labels: list[str]) -> list[str] | None:
        """The label names serve's /metadata lists (None: the kind has no classes)."""
        return labels
