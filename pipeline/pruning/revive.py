"""Rounding the rows kept by step 1 up to whole blocks, reviving the next-best rows.

Counts rounded up (MLPruning does this before block pruning):

- FFN rows (unit ``ffn_in``) to a multiple of lcm(b_out, b_in): they are FFN-in's compact
  output rows and FFN-out's compact input columns, so both must split into blocks;
- O's and FFN-out's output rows (``attn_out``, ``ffn_out``: residual-stream dims) to a
  multiple of b_out, as the paper does; they stay element masks and are not compacted;
- heads need nothing: b_out and b_in divide the head dim.

The rows brought back are the pruned ones with the highest step-1 score (``scores.safetensors``
of the step-1 checkpoint). Checkpoints written before step 1 saved its scores have none; their
rows are ranked by the magnitude of their weights in the model step 1 started from:

    FFN row i:       ||W_in[i, :]|| * ||W_out[:, i]||    (what the neuron reads times what it writes)
    O row r:         ||W_O[r, kept head columns]||
    FFN-out row r:   ||W_out[r, kept FFN columns]||

A step-1 checkpoint holds zeros in pruned rows, and a zero FFN neuron gets no gradient (both its
input row and output column are zero), so revived rows take their weights (and Q/K/V/FFN-in
biases) from the model step 1 started from: the values they had before step 1.
"""

from __future__ import annotations

import math

import torch

from pipeline.adapters import Geometry, LayerLinears

ROUNDED = ("ffn_in", "attn_out", "ffn_out")


def multiple_for(unit: str, block: tuple[int, int]) -> int:
    return math.lcm(*block) if unit == "ffn_in" else block[0]


def revive(
    units: dict[str, torch.Tensor], geo: Geometry, block: tuple[int, int], ranking: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Unit masks with rounded-up counts, and the indices revived per mask key."""
    out = {k: v.bool().clone() for k, v in units.items()}
    revived = {}
    for layer in range(geo.num_layers):
        for unit in ROUNDED:
            key = f"layer{layer}_{unit}"
            mask = out[key]
            n, step = int(mask.sum()), multiple_for(unit, block)
            need = min(math.ceil(n / step) * step, mask.numel()) - n
            if need <= 0:
                continue
            score = ranking[key].double().cpu().masked_fill(mask, float("-inf"))
            order = torch.sort(score, descending=True, stable=True).indices[:need]
            mask[order] = True
            revived[key] = sorted(int(i) for i in order)
    return out, revived


def magnitude_ranking(
    linears: list[LayerLinears], units: dict[str, torch.Tensor], geo: Geometry
) -> dict[str, torch.Tensor]:
    """Row importance from weight magnitude (see the module docstring), per unit mask key."""
    ranking = {}
    with torch.no_grad():
        for layer, lin in enumerate(linears):
            heads = units[f"layer{layer}_heads"].bool().repeat_interleave(geo.head_dim)
            ffn = units[f"layer{layer}_ffn_in"].bool()
            w_in, w_out = lin.ffn_in.weight.float(), lin.ffn_out.weight.float()
            ranking[f"layer{layer}_ffn_in"] = w_in.norm(dim=1) * w_out.norm(dim=0)
            ranking[f"layer{layer}_attn_out"] = lin.attn_out.weight.float()[:, heads].norm(dim=1)
            ranking[f"layer{layer}_ffn_out"] = w_out[:, ffn].norm(dim=1)
    return ranking


def copy_revived(
    student: list[LayerLinears], source: list[LayerLinears], revived: dict[str, list[int]]
) -> None:
    """Give revived rows the weights they had before step 1 (masks zero what stays pruned)."""
    with torch.no_grad():
        for layer, (dst, src) in enumerate(zip(student, source, strict=True)):
            ffn = revived.get(f"layer{layer}_ffn_in", [])
            if ffn:
                dst.ffn_in.weight[ffn] = src.ffn_in.weight[ffn].to(dst.ffn_in.weight.dtype)
                if dst.ffn_in.bias is not None:
                    dst.ffn_in.bias[ffn] = src.ffn_in.bias[ffn].to(dst.ffn_in.bias.dtype)
                dst.ffn_out.weight[:, ffn] = src.ffn_out.weight[:, ffn].to(dst.ffn_out.weight.dtype)
            for unit, name in (("attn_out", "attn_out"), ("ffn_out", "ffn_out")):
                rows = revived.get(f"layer{layer}_{unit}", [])
                if rows:
                    w = getattr(dst, name).weight
                    w[rows] = getattr(src, name).weight[rows].to(w.dtype)
