from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pipeline.metrics import accuracy, compute_metrics, f1_binary, pearson, spearman
from pipeline.tasks import get_task


def test_accuracy_and_f1_by_hand():
    preds = np.array([1, 1, 0, 0, 1])
    labels = np.array([1, 0, 0, 1, 1])
    assert accuracy(preds, labels) == pytest.approx(3 / 5)
    # tp=2 fp=1 fn=1 -> P=R=2/3 -> F1=2/3
    assert f1_binary(preds, labels) == pytest.approx(2 / 3)
    assert f1_binary(np.zeros(3, int), np.ones(3, int)) == 0.0


def test_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 200).astype(float)  # many ties
    y = x + rng.normal(0, 1.5, 200)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert pearson(np.ones(5), np.arange(5.0)) == 0.0


def test_compute_metrics_per_task():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5]])
    labels = np.array([0.0, 1.0, 1.0])
    assert compute_metrics(get_task("sst2"), logits, labels) == {"accuracy": pytest.approx(2 / 3)}
    m = compute_metrics(get_task("mrpc"), logits, labels)
    assert set(m) == {"accuracy", "f1"} and m["f1"] == pytest.approx(2 / 3)
    r = compute_metrics(get_task("stsb"), np.array([[0.1], [2.0], [4.0]]), np.array([0.0, 2.5, 5.0]))
    assert r["spearman"] == pytest.approx(1.0) and r["pearson"] > 0.99
