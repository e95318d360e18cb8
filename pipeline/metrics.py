"""GLUE metrics in plain numpy (no torch, no scikit-learn); which ones a task reports is its
kind's choice (:mod:`pipeline.kinds`).

- accuracy: share of predictions equal to the label.
- f1: binary F1 of the positive class (id 1), 2PR / (P + R); MRPC's official metric.
- pearson: sample correlation of prediction and gold score.
- spearman: Pearson correlation of the ranks, ties given their average rank (as scipy does).
"""

from __future__ import annotations

import numpy as np

from pipeline.task_kind import TaskInfo


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(preds == labels))


def f1_binary(preds: np.ndarray, labels: np.ndarray) -> float:
    tp = float(np.sum((preds == 1) & (labels == 1)))
    fp = float(np.sum((preds == 1) & (labels == 0)))
    fn = float(np.sum((preds == 0) & (labels == 1)))
    if tp == 0.0:
        return 0.0
    return 2 * tp / (2 * tp + fp + fn)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    denom = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denom) if denom > 0 else 0.0


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    sorted_vals = np.asarray(values)[order]
    ranks = np.empty(len(values), dtype=np.float64)
    # Tied runs share the mean of the 1-based positions they span.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_average_ranks(np.asarray(x)), _average_ranks(np.asarray(y)))


def compute_metrics(
    task: TaskInfo, outputs: np.ndarray | dict[str, np.ndarray], labels: np.ndarray
) -> dict[str, float]:
    """Score model outputs with the task's kind: a dict by output name, or the one output's array."""
    if not isinstance(outputs, dict):
        outputs = {task.kind.output_names(task)[0]: np.asarray(outputs)}
    return task.kind.metrics(task, outputs, np.asarray(labels))
