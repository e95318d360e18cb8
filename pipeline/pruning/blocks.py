"""Block layout of MLPruning step 2: where each b_out x b_in block of a matrix lies, and its size.

Block masks live in the coordinates each matrix has once the ONNX strip passes have removed the
pruned heads and FFN rows (torch layout W [out, in]):

    query/key/value  out = kept heads' rows, ascending (kept_heads * d)   in = hidden
    attn_out (O)     out = hidden                                         in = kept heads' columns
    ffn_in           out = kept FFN rows, ascending                       in = hidden
    ffn_out          out = hidden                                         in = kept FFN rows

A block mask of a matrix with compact shape [R, C] has shape [R / b_out, C / b_in]. The
step-1 masks of O's and FFN-out's output rows (units ``attn_out`` and ``ffn_out``: the residual
stream) are not compacted: they stay element row masks in full coordinates on top of the blocks.

Expansion to a full-size element mask is one gather. Each full row r gets a block-row index

    i(r) = pos(r) // b_out   if row r is kept by step 1,   else R / b_out (a padding row of zeros)

where pos(r) is r's rank among the kept rows for compacted axes and r itself otherwise; columns
likewise. With M the block mask padded by one zero row and column, the element mask is
E[r, c] = M[i(r), j(c)], so E already contains every step-1 mask of that weight.

The *area* of block (i, j) is the number of weights of the original matrix it still holds,
rows(i) * cols(j), where rows(i) counts the step-1-kept rows mapped to block-row i: b_out,
except in O and FFN-out, whose block-rows keep only their residual rows. Blocks of area 0 are
*dead* (all their rows were pruned in step 1) and never count as kept. The kept weights of a
matrix are sum over kept blocks of area, so r is exact however the residual rows fall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mlpruning.core.errors import UserError
from pipeline.adapters import Geometry
from pipeline.pruning.masks import WIRING, full_shapes

MATRICES = tuple(WIRING)
COMPACTED = ("heads", "ffn_in")  # units the strip passes remove; attn_out / ffn_out stay in place
BLOCK_SUFFIX = "_blocks"


def block_key(layer: int, matrix: str) -> str:
    """In-memory key of a block mask (``layer0_query_blocks``); the file key is ``layer.0.query.blocks``."""
    return f"layer{layer}_{matrix}{BLOCK_SUFFIX}"


def check_block_fits(geo: Geometry, block: tuple[int, int]) -> None:
    """Every compact dimension must split into whole blocks; a UserError naming the fix otherwise."""
    bo, bi = block
    name = f"{bo}x{bi}" if bo != bi else str(bo)
    if geo.head_dim % bo or geo.head_dim % bi:
        common = math.gcd(geo.head_dim, math.gcd(bo, bi))
        raise UserError(
            f"block {name} does not divide the head dim {geo.head_dim}: pass a --block whose sides "
            f"divide {geo.head_dim} (e.g. --block {common})"
        )
    for what, size in (("hidden size", geo.hidden), ("FFN size", geo.intermediate)):
        if size % bo or size % bi:
            raise UserError(f"block {name} does not divide the {what} {size}: pass a smaller --block")


@dataclass(frozen=True)
class BlockIndex:
    """Where the full rows and columns of one matrix fall in its block grid."""

    rows: torch.Tensor  # [out_full] block-row of each full row; grid[0] for a pruned row
    cols: torch.Tensor  # [in_full]
    grid: tuple[int, int]

    def area(self) -> torch.Tensor:
        """Weights of the original matrix each block holds, float64 [grid]."""
        r = torch.bincount(self.rows, minlength=self.grid[0] + 1)[: self.grid[0]]
        c = torch.bincount(self.cols, minlength=self.grid[1] + 1)[: self.grid[1]]
        return torch.outer(r, c).double()

    def expand(self, blocks: torch.Tensor) -> torch.Tensor:
        """Full-size element mask from a block mask (differentiable in ``blocks``)."""
        padded = F.pad(blocks, (0, 1, 0, 1))
        return padded[self.rows][:, self.cols]


def _axis(keep: torch.Tensor, compacted: bool, size: int, what: str) -> tuple[torch.Tensor, int]:
    keep = keep.bool()
    n = int(keep.sum()) if compacted else keep.numel()
    if n % size:
        raise ValueError(f"{what}: {n} kept is not a multiple of the block side {size}")
    pos = torch.cumsum(keep.long(), 0) - 1 if compacted else torch.arange(keep.numel())
    return torch.where(keep, pos // size, torch.full_like(pos, n // size)), n // size


def block_index(
    units: dict[str, torch.Tensor], geo: Geometry, layer: int, matrix: str, block: tuple[int, int]
) -> BlockIndex:
    """The block index of one matrix from the (revived) step-1 unit masks of its layer."""
    wiring = WIRING[matrix]
    full = full_shapes(geo)[matrix]
    axes = []
    for unit, n_full, side in ((wiring.rows, full[0], block[0]), (wiring.cols, full[1], block[1])):
        if unit is None:
            keep = torch.ones(n_full, dtype=torch.bool)
        else:
            keep = units[f"layer{layer}_{unit}"].bool().cpu()
            keep = keep.repeat_interleave(geo.head_dim) if unit == "heads" else keep
        axes.append(_axis(keep, unit in COMPACTED, side, f"layer {layer} {matrix}"))
    (rows, nr), (cols, nc) = axes
    return BlockIndex(rows, cols, (nr, nc))


def block_of_mask(units: dict[str, torch.Tensor], geo: Geometry, layer: int, matrix: str) -> tuple[int, int]:
    """The block shape a saved block mask implies: compact shape / mask shape."""
    ones = block_index(units, geo, layer, matrix, (1, 1))
    shape = units[block_key(layer, matrix)].shape
    if len(shape) != 2 or ones.grid[0] % shape[0] or ones.grid[1] % shape[1]:
        raise UserError(
            f"block mask of layer {layer} {matrix} has shape {list(shape)}, which does not tile its "
            f"{ones.grid[0]}x{ones.grid[1]} kept weights: masks and manifest disagree"
        )
    return (ones.grid[0] // shape[0], ones.grid[1] // shape[1])


def has_blocks(masks: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(BLOCK_SUFFIX) for k in masks)


def kept_weights(masks: dict[str, torch.Tensor], geo: Geometry) -> dict[tuple[int, str], int]:
    """Kept weights of every (layer, matrix), counted from unit and block masks."""
    out = {}
    for layer in range(geo.num_layers):
        for matrix in MATRICES:
            index = block_index(masks, geo, layer, matrix, block_of_mask(masks, geo, layer, matrix))
            mask = masks[block_key(layer, matrix)].detach().cpu()  # a live mask may sit on the GPU
            out[layer, matrix] = int((mask.double() * index.area()).sum())
    return out


def block_entry(masks: dict[str, torch.Tensor], geo: Geometry, layer: int, matrix: str) -> dict[str, Any]:
    """Manifest record of one block mask: shapes, counts and the kept block columns per block-row."""
    block = block_of_mask(masks, geo, layer, matrix)
    index = block_index(masks, geo, layer, matrix, block)
    mask = masks[block_key(layer, matrix)].detach().bool().cpu()
    live = index.area() > 0
    return {
        "block": list(block),
        "mask_shape": list(mask.shape),
        "mask_key": f"layer.{layer}.{matrix}.blocks",
        "kept": int(mask.sum()),
        "live": int(live.sum()),
        "total": mask.numel(),
        "kept_per_block_row": [int(v) for v in mask.sum(dim=1)],
        "kept_block_cols": [torch.nonzero(row).flatten().tolist() for row in mask],
        "weights_kept": int((mask.double() * index.area()).sum()),
    }


def nonzero_outside(
    weight: torch.Tensor, masks: dict[str, torch.Tensor], geo: Geometry, layer: int, matrix: str
) -> int:
    """How many entries of ``weight`` are non-zero where the block (and step-1) masks are off."""
    index = block_index(masks, geo, layer, matrix, block_of_mask(masks, geo, layer, matrix))
    on = index.expand(masks[block_key(layer, matrix)].float()).bool()
    return int((weight.detach()[~on] != 0).sum())
