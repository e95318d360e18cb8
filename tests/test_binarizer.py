from __future__ import annotations

import math

import pytest
import torch

from pipeline.pruning.binarizer import kept_count, topk_mask


@pytest.mark.parametrize(
    ("t", "n", "k"),
    [
        (10.0, 12, 12),
        (10.0, 3072, 3072),
        (0.0, 12, 6),
        (0.0, 7, 4),
        (-10.0, 12, 1),
        (math.log(0.3 / 0.7), 10, 3),
    ],
)
def test_kept_count_is_ceil_of_sigmoid(t, n, k):
    assert kept_count(t, n) == k


def test_forward_keeps_the_top_k_scores():
    scores = torch.tensor([0.3, -1.0, 2.0, 0.1, 0.5, 0.0])
    threshold = torch.tensor(0.0)  # sigmoid 0.5 -> k = 3
    mask = topk_mask(scores, threshold)
    assert mask.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    ties = topk_mask(torch.zeros(4), torch.tensor(0.0))
    assert ties.tolist() == [1.0, 1.0, 0.0, 0.0]  # equal scores: earlier units kept


def test_backward_is_straight_through_and_threshold_sums_kept_gradients():
    scores = torch.tensor([0.3, -1.0, 2.0, 0.1, 0.5, 0.0], requires_grad=True)
    threshold = torch.tensor(0.0, requires_grad=True)
    mask = topk_mask(scores, threshold)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    (mask * upstream).sum().backward()
    assert torch.equal(scores.grad, upstream)  # dL/ds = dL/dm for every unit
    assert threshold.grad.item() == pytest.approx(1.0 + 3.0 + 5.0)  # kept units 0, 2, 4
    assert threshold.grad.shape == threshold.shape


def test_gradients_flow_to_scores_through_a_masked_weight():
    w = torch.randn(6, 3)
    scores = torch.zeros(6, requires_grad=True)
    threshold = torch.tensor(10.0, requires_grad=True)
    x = torch.randn(5, 3)
    out = (x @ (w * topk_mask(scores, threshold)[:, None]).T).sum()
    out.backward()
    # d out / d m_i = sum over the batch of x @ w_i
    assert torch.allclose(scores.grad, (x @ w.T).sum(0), atol=1e-5)
    assert threshold.grad.item() == pytest.approx(float(scores.grad.sum()), rel=1e-5)
