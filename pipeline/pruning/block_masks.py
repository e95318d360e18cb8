"""Block masks on the weights (parametrizations) and the differentiable kept-weight count.

Every prunable matrix of every layer gets a grid of block scores S [R/b_out, C/b_in] (in the
compact coordinates of :mod:`pipeline.pruning.blocks`) and one threshold t. The block mask is
the top-k of S over the live blocks, k = ceil(sigmoid(t) * n_live) (row-balanced: that many per
block-row), from the same straight-through binarizer as step 1. The weight the model sees is

    W' = W * E,   E[r, c] = M_pad[i(r), j(c)]

a gather of the padded block mask, so E also carries every fixed step-1 mask of W, and
dL/dS_ij = sum over block (i, j) of W * dL/dW'. Biases of Q, K, V and FFN-in follow their
(fixed, revived) step-1 rows; those of O and FFN-out are kept.

Kept weights, the quantity the regularizer drives, with A_ij the area of block (i, j):

    K = sum over matrices of  soft + (exact - soft).detach(),
    soft = sigmoid(t) * sum_ij A_ij,   exact = sum_ij M_ij A_ij

Its value is the exact count sum M_ij A_ij (what the checkpoint will hold); its gradient is that
of sigmoid(t) times the live area, as in step 1 (or of t / 4 with ``threshold_grad = "constant"``,
see :mod:`pipeline.pruning.regularizer`). Where all live blocks have the same area (Q, K,
V, FFN-in, and O / FFN-out without residual pruning) the value is ceil(sigmoid(t) * n) * A, a
function of t alone; in O and FFN-out it also depends on which block-rows the top-k picks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from pipeline.adapters import Geometry, LayerLinears
from pipeline.pruning.binarizer import block_topk_mask
from pipeline.pruning.blocks import MATRICES, BlockIndex, block_index
from pipeline.pruning.masks import WIRING
from pipeline.pruning.regularizer import soft_keep


def build_indices(
    units: dict[str, torch.Tensor], geo: Geometry, block: tuple[int, int]
) -> dict[str, BlockIndex]:
    """The block index of every matrix, keyed ``layer{i}_{matrix}``."""
    return {
        f"layer{layer}_{m}": block_index(units, geo, layer, m, block)
        for layer in range(geo.num_layers)
        for m in MATRICES
    }


class BlockScores(nn.Module):
    """Block scores and thresholds of every matrix (the only new parameters of step 2)."""

    def __init__(
        self,
        indices: dict[str, BlockIndex],
        threshold_init: float = 10.0,
        score_init: float = 0.0,
        row_balanced: bool = False,
        threshold_grad: str = "sigmoid",
    ) -> None:
        super().__init__()
        self.keys = list(indices)
        self.row_balanced, self.threshold_grad = row_balanced, threshold_grad
        self.scores = nn.ParameterDict(
            {k: nn.Parameter(torch.full(ix.grid, float(score_init))) for k, ix in indices.items()}
        )
        self.thresholds = nn.ParameterDict(
            {k: nn.Parameter(torch.tensor(float(threshold_init))) for k in indices}
        )
        for k, ix in indices.items():  # derived from the step-1 checkpoint: not part of the state
            self.register_buffer(f"area_{k}", ix.area(), persistent=False)
        self.fixed: dict[str, torch.Tensor] = {}

    def area(self, key: str) -> torch.Tensor:
        return getattr(self, f"area_{key}")

    def mask(self, key: str) -> torch.Tensor:
        """The hard 0/1 block mask of one matrix (differentiable to its scores and threshold)."""
        if key in self.fixed:
            return self.fixed[key]
        live = self.area(key) > 0
        return block_topk_mask(self.scores[key], self.thresholds[key], live, self.row_balanced)

    def freeze(self) -> dict[str, torch.Tensor]:
        """Fix every block mask; returned as CPU copies under their masks-dict keys
        (``layer0_query_blocks``), since they are merged with step 1's unit masks, which live on
        the CPU."""
        with torch.no_grad():
            self.fixed = {}
            self.fixed = {k: self.mask(k).detach().clone() for k in self.keys}
        return {f"{k}_blocks": m.cpu() for k, m in self.fixed.items()}

    def unfreeze(self) -> None:
        self.fixed = {}

    def kept(self) -> torch.Tensor:
        """Differentiable kept-weight count K (float64; see the module docstring)."""
        total = torch.zeros((), dtype=torch.float64, device=self.thresholds[self.keys[0]].device)
        for k in self.keys:
            area = self.area(k)
            with torch.no_grad():
                exact = (self.mask(k).double() * area).sum()
            soft = soft_keep(self.thresholds[k], self.threshold_grad) * area.sum()
            total = total + soft + (exact - soft).detach()
        return total


class _BlockMasked(nn.Module):
    """Parametrization W -> W * expand(block mask) for one Linear weight."""

    def __init__(self, scores: BlockScores, key: str, index: BlockIndex) -> None:
        super().__init__()
        self.scores_ref = [scores]  # a list, so the shared module is not registered as a child
        self.key, self.grid = key, index.grid
        self.register_buffer("rows", index.rows, persistent=False)
        self.register_buffer("cols", index.cols, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.scores_ref[0].mask(self.key).to(weight.dtype)
        padded = nn.functional.pad(mask, (0, 1, 0, 1))
        return weight * padded[self.rows][:, self.cols]


class _RowsKept(nn.Module):
    """Parametrization b -> b * keep for a bias that follows fixed step-1 rows."""

    def __init__(self, index: BlockIndex) -> None:
        super().__init__()
        self.register_buffer("keep", (index.rows < index.grid[0]).float(), persistent=False)

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return bias * self.keep.to(bias.dtype)


def attach_blocks(linears: list[LayerLinears], scores: BlockScores, indices: dict[str, BlockIndex]) -> None:
    """Register the block parametrizations on every prunable Linear (``detach_masks`` bakes them)."""
    for layer, lin in enumerate(linears):
        for name, wiring in WIRING.items():
            key, module = f"layer{layer}_{name}", getattr(lin, name)
            parametrize.register_parametrization(module, "weight", _BlockMasked(scores, key, indices[key]))
            if wiring.mask_bias and module.bias is not None:
                parametrize.register_parametrization(module, "bias", _RowsKept(indices[key]))
