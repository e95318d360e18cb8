"""The task-kind registry: name -> :class:`pipeline.task_kind.TaskKind`.

A task names its kind (``TaskSpec.kind``); every stage asks the kind, never the task, what the
model outputs and how they are trained, scored, compared and served. A new kind is one module
with a ``TaskKind`` subclass plus one line here (or :func:`register_kind` from your own code).
"""

from __future__ import annotations

from mlpruning.core.errors import UserError
from pipeline.kinds.sequence import Classification, Regression
from pipeline.task_kind import TaskKind

KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (Classification(), Regression())}


def register_kind(kind: TaskKind) -> None:
    if kind.name in KINDS:
        raise ValueError(f"task kind {kind.name!r} is registered already")
    KINDS[kind.name] = kind


def get_kind(name: str) -> TaskKind:
    if name not in KINDS:
        raise UserError(f"unknown task kind {name!r}: one of {', '.join(KINDS)}")
    return KINDS[name]


def kind_for_head(problem_type: str | None, width: int | None) -> TaskKind:
    """The kind of a sequence-classification export whose task is unknown (a model made
    elsewhere): from its config's ``problem_type``, else from the width of its one output."""
    if problem_type == "regression" or (problem_type is None and width == 1):
        return KINDS["regression"]
    return KINDS["classification"]
