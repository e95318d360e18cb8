"""Learnable top-k threshold: hard 0/1 masks from scores and one scalar per matrix.

Each prunable unit (a head, a row) has a score s_i; each matrix has a threshold t. The keep
ratio is sigmoid(t) and the mask keeps the k = ceil(sigmoid(t) * N) highest scores:

    m_i = 1 if s_i is among the top-k of s, else 0          (ties broken by position)

The mask is a step function, so the backward pass is straight-through:

    dL/ds_i = dL/dm_i                    (every score gets its mask's gradient)
    dL/dt   = sum_{i : m_i = 1} dL/dm_i  (the threshold hears from the kept units)

The second line is MLPruning's rule: keeping fewer units is favoured when the kept ones, taken
together, would rather be off. sigmoid is applied inside the forward and not differentiated, so
the threshold gradient does not vanish at t = 10 (where sigmoid'(t) ~ 4.5e-5); the adaptive
regularizer reaches t through its own differentiable path (see ``regularizer.py``).

With t = 10, sigmoid(t) = 0.99995 and ceil(0.99995 * N) = N for N < 20,000: everything is kept.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import FunctionCtx as Ctx


def kept_count(threshold: torch.Tensor | float, n: int) -> int:
    """k = ceil(sigmoid(t) * n), clamped to [1, n]; a small guard against float round-up."""
    ratio = torch.sigmoid(torch.as_tensor(threshold, dtype=torch.float64)).item()
    return min(n, max(1, math.ceil(ratio * n - 1e-9)))


class TopKBinarizer(torch.autograd.Function):
    """mask = top-k(scores) with k from sigmoid(threshold); straight-through backward."""

    @staticmethod
    def forward(ctx: Ctx, scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        k = kept_count(threshold.detach(), scores.numel())
        flat = scores.detach().flatten()
        # stable descending sort: among equal scores the earlier unit is kept
        order = torch.sort(flat, descending=True, stable=True).indices
        mask = torch.zeros_like(flat)
        mask[order[:k]] = 1.0
        mask = mask.view_as(scores)
        ctx.save_for_backward(mask)
        ctx.threshold_shape = threshold.shape
        return mask

    @staticmethod
    def backward(ctx: Ctx, grad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (mask,) = ctx.saved_tensors
        grad_threshold = (grad_mask * mask).sum().reshape(ctx.threshold_shape)
        return grad_mask, grad_threshold


def topk_mask(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return TopKBinarizer.apply(scores, threshold)
