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

Step 2 uses the same rule on a grid of block scores (:class:`BlockTopKBinarizer`): the top-k
runs over the *live* blocks only (blocks that still hold weights after step 1), either over the
whole grid or, row-balanced, with k_r = ceil(sigmoid(t) * n_r) in every block-row r.
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


def _row_counts(threshold: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """k_r = ceil(sigmoid(t) * n_r) for each row with n_r live entries (0 for a dead row)."""
    n = live.sum(dim=1).tolist()
    cache = {m: kept_count(threshold, m) if m else 0 for m in set(n)}
    return torch.tensor([cache[m] for m in n], device=live.device)


class BlockTopKBinarizer(torch.autograd.Function):
    """Top-k over a 2-D grid of block scores, restricted to ``live`` blocks.

    Global (``row_balanced`` False): k = ceil(sigmoid(t) * n_live) over the whole grid.
    Row-balanced: every row r with live blocks keeps k_r = ceil(sigmoid(t) * n_live(r)) of them.
    Dead blocks (no weight left in them after step 1) are never kept and do not count in n.
    The backward pass is the one of :class:`TopKBinarizer`.
    """

    @staticmethod
    def forward(
        ctx: Ctx, scores: torch.Tensor, threshold: torch.Tensor, live: torch.Tensor, row_balanced: bool
    ) -> torch.Tensor:
        t = threshold.detach()
        # dead blocks sort last; the stable sort keeps the earlier of equal scores
        ranked = scores.detach().masked_fill(~live, float("-inf"))
        if row_balanced:
            order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
            rank = torch.argsort(order, dim=1)
            mask = (rank < _row_counts(t, live)[:, None]).to(scores.dtype)
        else:
            n_live = int(live.sum())
            k = kept_count(t, n_live) if n_live else 0
            order = torch.sort(ranked.flatten(), descending=True, stable=True).indices
            mask = torch.zeros(scores.numel(), dtype=scores.dtype, device=scores.device)
            mask[order[:k]] = 1.0
            mask = mask.view_as(scores)
        mask = mask * live.to(scores.dtype)
        ctx.save_for_backward(mask)
        ctx.threshold_shape = threshold.shape
        return mask

    @staticmethod
    def backward(ctx: Ctx, grad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        grad_threshold = (grad_mask * mask).sum().reshape(ctx.threshold_shape)
        return grad_mask, grad_threshold, None, None


def block_topk_mask(
    scores: torch.Tensor, threshold: torch.Tensor, live: torch.Tensor, row_balanced: bool = False
) -> torch.Tensor:
    return BlockTopKBinarizer.apply(scores, threshold, live, row_balanced)
