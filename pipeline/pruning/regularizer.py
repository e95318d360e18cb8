"""Remaining-weight ratio r and the adaptive regularizer that drives it to a target r*.

Weights counted: the six prunable matrices of every encoder layer (biases, embeddings and the
classifier are not). With hidden D, attention width A = H * d and intermediate I, one layer has

    N_layer = 3 * D * A  (Q, K, V)  +  D * A  (O)  +  I * D  (FFN-in)  +  D * I  (FFN-out).

With keep fractions h (heads), o (O rows), f (FFN-in rows) and g (FFN-out rows), the kept
weights are

    3 * D * A * h   +   D * A * h * o   +   I * D * f   +   D * I * f * g

because a pruned head also removes O's input columns and a pruned FFN-in row removes FFN-out's
input columns. r = sum kept / sum N over layers.

Each fraction is the exact kept share ceil(sigmoid(t) * N_unit) / N_unit in value, with the
gradient of sigmoid(t) (straight-through), so r equals the count from the real masks while
still pulling every threshold down:

    frac = sigmoid(t) + (ceil(sigmoid(t) * N) / N - sigmoid(t)).detach()

Gradient of the fraction with respect to t (``threshold_grad``):

- ``sigmoid`` (the reference code): d frac / dt = sigmoid'(t). At t = 10 this is 4.5e-5, so
  the regularizer barely reaches a threshold until the noisy task gradient has moved it down;
  then sigmoid'(t) grows by orders of magnitude and the regularizer takes that matrix alone.
  With few epochs this collapses the matrices that happened to move first (the largest ones,
  whose share of r is largest) to a few percent while others keep everything.
- ``constant``: d frac / dt = 1/4 (sigmoid's slope at 0) whatever t is. Every threshold hears
  the target from the first step in proportion to its matrix's share of the weights, so the
  matrices shrink together and the task gradient decides where they part.

The value is the same exact fraction either way; only the push on t differs.

Step 2 (blocks) drives its own ratio with the same regularizer: see
:mod:`pipeline.pruning.block_masks` (kept-weight count) and :mod:`pipeline.pruning.block_pruner`.

Regularizer (MLPruning): R = (r - r*)^2 while r > r*, else 0;
lambda = max(lambda_final * R / (1 - r*)^2, lambda_min), so lambda is large while far from the
target and decays to lambda_min as r arrives; loss = task loss + lambda * R (lambda detached).

Floor (``ratio_floor``, ours): below r* the one-sided R is 0 and only the task gradient moves the
thresholds. Adam divides each step by the running RMS of the gradient, which decays after the
large-lambda phase, so that gradient's small bias turns into a steady drift: a 3-epoch MiniLM
run at r* = 0.5 fell to r = 0.471. After each optimizer step that leaves r < r*, every threshold
is raised by the same shift delta, the smallest with r(t + delta) >= r* (bisection; r is monotone
in delta) or the one just below it when that lands nearer: r ends within half a unit (one head
or row's weights) of r*, and the matrices keep their learned proportions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline.adapters import Geometry
from pipeline.config import THRESHOLD_GRADS
from pipeline.pruning.binarizer import kept_count
from pipeline.pruning.masks import MaskScores, unit_sizes


def soft_keep(threshold: torch.Tensor, grad: str = "sigmoid") -> torch.Tensor:
    """sigmoid(t) in float64, with the gradient ``grad`` names (see the module docstring)."""
    soft = torch.sigmoid(threshold.double())  # float64: millions of weights summed exactly
    if grad == "sigmoid":
        return soft
    if grad == "constant":
        t = threshold.double()
        return soft.detach() + (t - t.detach()) * 0.25
    raise ValueError(f"threshold_grad must be one of {THRESHOLD_GRADS}, got {grad!r}")


def _fraction(threshold: torch.Tensor, n: int, grad: str) -> torch.Tensor:
    soft = soft_keep(threshold, grad)
    exact = kept_count(threshold.detach(), n) / n
    return soft + (exact - soft).detach()


def layer_weights(geo: Geometry) -> int:
    attn = geo.num_heads * geo.head_dim
    return 4 * geo.hidden * attn + 2 * geo.hidden * geo.intermediate


def remaining_ratio(scores: MaskScores, grad: str = "sigmoid") -> torch.Tensor:
    """Differentiable r over the whole encoder, equal to the ratio counted from the masks."""
    geo = scores.geo
    sizes = unit_sizes(geo)
    attn = geo.num_heads * geo.head_dim
    kept = torch.zeros((), dtype=torch.float64, device=next(iter(scores.thresholds.values())).device)
    for layer in range(geo.num_layers):
        f = {u: _fraction(scores.thresholds[f"layer{layer}_{u}"], n, grad) for u, n in sizes.items()}
        kept = kept + 3 * geo.hidden * attn * f["heads"] + geo.hidden * attn * f["heads"] * f["attn_out"]
        kept = kept + geo.intermediate * geo.hidden * f["ffn_in"] * (1 + f["ffn_out"])
    return kept / (geo.num_layers * layer_weights(geo))


def counted_ratio(masks: dict[str, torch.Tensor], geo: Geometry) -> float:
    """r from hard masks (the definition ``remaining_ratio`` must match)."""
    d, kept = geo.head_dim, 0
    for layer in range(geo.num_layers):
        m = {u: masks[f"layer{layer}_{u}"].bool() for u in ("heads", "attn_out", "ffn_in", "ffn_out")}
        cols = int(m["heads"].sum()) * d
        kept += 3 * geo.hidden * cols + int(m["attn_out"].sum()) * cols
        kept += int(m["ffn_in"].sum()) * geo.hidden + int(m["ffn_out"].sum()) * int(m["ffn_in"].sum())
    return kept / (geo.num_layers * layer_weights(geo))


@dataclass(frozen=True)
class RegTerm:
    penalty: torch.Tensor  # lambda * R, to add to the loss
    ratio: float
    lam: float
    gap: float  # R


def adaptive_regularizer(r: torch.Tensor, target: float, lambda_final: float, lambda_min: float) -> RegTerm:
    over = torch.clamp(r - target, min=0.0)
    gap = over * over
    lam = max(lambda_final * float(gap.detach()) / (1.0 - target) ** 2, lambda_min) if target < 1 else 0.0
    return RegTerm(lam * gap, float(r.detach()), lam, float(gap.detach()))


@torch.no_grad()
def floor_ratio(
    thresholds: Sequence[torch.Tensor], ratio: Callable[[], torch.Tensor], target: float
) -> float:
    """Raise all thresholds by a common shift that brings r to within half a unit of ``target``."""
    if target >= 1 or float(ratio()) >= target:
        return 0.0
    start = [t.detach().clone() for t in thresholds]

    def r_at(delta: float) -> float:
        for t, t0 in zip(thresholds, start, strict=True):
            t.copy_(t0 + delta)
        return float(ratio())

    lo, hi = 0.0, 0.25
    while r_at(hi) < target:  # sigmoid saturates: r -> 1 >= target, so this ends
        lo, hi = hi, hi * 2
    for _ in range(20):  # a millionth of the bracket: far below one kept unit
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if r_at(mid) < target else (lo, mid)
    # r moves in whole units (a head is 6% of a tiny model): take the side nearer to r*
    shift = hi if r_at(hi) - target <= target - r_at(lo) else lo
    r_at(shift)
    return shift
